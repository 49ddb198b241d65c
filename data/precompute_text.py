"""Run the frozen umT5 once over the shards: text sidecar shards for ``data.text: precomputed``.

    python data/precompute_text.py --exp saber_full --scale 14B --wan-dir /ckpt/Wan2.1-T2V-14B-Diffusers \\
        --shards '/data/shards-{000000..009999}.tar' --out /data/text
    torchrun --nproc-per-node 8 data/precompute_text.py --scale 14B ...   # shards dealt out: i mod WORLD_SIZE
    make precompute-text SCALE=14B WAN_DIR=... SHARDS=... ARGS='--out /data/text'

then train with ``data.text=precomputed data.text_sidecars=/data/text``: no rank builds umT5.

Each source shard ``<name>`` gets ``<out>/<name>``: per sample with a caption, ``<key>.text.safetensors``
holding the embedding of its valid tokens only ([L_i, 4096] in ``--dtype``, bf16 by default: what umT5
returns in bf16 at training; not padded to 512), with the caption's digest and the text_len it was
tokenized at. ``<out>/empty.safetensors`` holds the empty caption's embedding once (caption dropout).
Captions are read and tokenized exactly as the DataModule does (datamodule.caption_of, wan.tokenize),
encoded in batches of ``--batch-size`` on the GPU when there is one. Why sidecars and not rewritten
shards: saber_pl/sidecars.py. Resumable: a shard's sidecar is written to a temporary file and renamed
when whole; a rerun skips every sidecar that exists. Prints one JSON line (shards written / skipped).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from saber_pl.datamodule import caption_of  # noqa: E402
from saber_pl.sidecars import (  # noqa: E402
    DTYPES, EMPTY, TEXT_MEMBER, atomic_write, batched, caption_digest, compute_device, frozen_encoders,
    rank_world, shard_samples, tensor_bytes, tool_config, tool_parser, tool_shards, write_sidecars,
)
from saber_pl.wan import TextEncoder  # noqa: E402


def embed(encoder: TextEncoder, captions: list[str], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each caption's umT5 embedding of its valid tokens, as TextEncoder.encode computes it  # [L_i, D] each."""
    ids, mask = encoder.tokenize(captions)  # [B, text_len]
    emb = encoder.encode(ids, mask)  # [B, text_len, D], zero past each length
    return [e[:n].to(dtype).cpu() for e, n in zip(emb, mask.gt(0).sum(1).tolist())]


def text_records(url: str, encoder: TextEncoder, batch_size: int, dtype: torch.dtype) -> Iterator[dict]:
    """The text sidecar samples of one shard, in its order (samples without a caption have none)."""
    captioned = ((raw["__key__"], caption_of(raw)) for raw in shard_samples(url))
    keep = ((key, c) for key, c in captioned if c is not None)  # no caption: training skips it as missing_caption
    for batch in batched(keep, batch_size):
        for (key, caption), e in zip(batch, embed(encoder, [c for _, c in batch], dtype)):
            meta = {"caption": caption_digest(caption), "text_len": encoder.text_len, "tokens": int(e.shape[0])}
            yield {"__key__": key, TEXT_MEMBER: tensor_bytes("emb", e, meta)}


def main(argv: list[str] | None = None) -> int:
    p = tool_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32, help="captions per umT5 call")
    a = p.parse_args(argv)
    cfg = tool_config(a)
    urls = tool_shards(a, cfg)
    rank, world = rank_world(a.rank, a.world)
    device, compute = compute_device(a.device)
    _, encoder = frozen_encoders(cfg.model, True, device, compute)
    out, dtype = Path(a.out), DTYPES[a.dtype]
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (out / EMPTY).exists():
        empty = embed(encoder, [""], dtype)[0]
        meta = {"caption": caption_digest(""), "text_len": encoder.text_len, "tokens": int(empty.shape[0])}
        atomic_write(out / EMPTY, tensor_bytes("emb", empty, meta))
    summary = write_sidecars(urls, out, lambda url: text_records(url, encoder, a.batch_size, dtype), rank, world,
                             desc=f"umT5 rank {rank}/{world}", progress=not a.no_progress)
    print(json.dumps({"tool": "precompute_text", "out": str(out), "text_len": encoder.text_len, "dtype": a.dtype,
                      "device": str(device), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
