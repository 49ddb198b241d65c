"""Sidecar shards: per-sample tensors computed once offline, stored beside the video shards, joined by key.

Two kinds, written by ``data/precompute_text.py`` (``data.text: precomputed``) and
``data/cache_latents.py`` (``data.latents: cached``), so the training ranks hold only the DiT (and the
VAE for the one-frame reference encodes):

    text sidecar   <dir>/<shard name>   <key>.text.safetensors    {"emb": [L_i, D]}, valid tokens only
                   <dir>/empty.safetensors                        {"emb": [L_0, D]}, the empty caption, once
    latent sidecar <dir>/<shard name>   <key>.latent.safetensors  {"latent": [C, f, h, w]} (the first window)
                                        <key>.frame<j>.png        clip frame window["frames"][j], training size

Why parallel shards joined by ``__key__`` and not rewritten shards: the video shards (TBs) are never
rewritten or copied, so they stay readable by the online path as they are; the text and the latents
can be recomputed on their own (another text_len, another window) without touching the video; and a
sidecar shard is a small unit of work that is written to a temporary file and renamed when complete,
so a killed run resumes at the first missing shard. The cost: a reader streams two or three tars per
shard at once. WebDataset streams each tar in order, so the join is a merge of ordered streams with
O(1) memory: the tools write a sidecar in its source shard's order, skipping only samples they could
not use; a source sample whose key is not next in the sidecar has no embedding / latent and is
skipped and counted (``missing_text`` / ``missing_latent``).

A sidecar's location is ``data.text_sidecars`` / ``data.latent_sidecars``: a folder (the sidecar of
``.../shards-000123.tar`` is ``<folder>/shards-000123.tar``) or any WebDataset URL with ``{name}``
where the shard's file name goes (``pipe:aws s3 cp s3://bucket/text/{name} -``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import webdataset as wds
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

EMPTY = "empty.safetensors"  # the empty caption's embedding, once per text sidecar folder
TEXT_MEMBER = "text.safetensors"
LATENT_MEMBER = "latent.safetensors"
META_KEYS = ("__key__", "__url__", "__local_path__")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def shard_name(url: str) -> str:
    """The file name of a shard URL: ``/a/b-000001.tar``, ``pipe:aws s3 cp s3://x/b-000001.tar -`` -> b-000001.tar."""
    tokens = [t for t in url.removeprefix("pipe:").split() if ".tar" in t] or [url]
    name = os.path.basename(urlsplit(tokens[-1]).path if "://" in tokens[-1] else tokens[-1])
    if not name:
        raise ValueError(f"cannot tell the shard file name of {url!r} (sidecars are named after it)")
    return name


def sidecar_url(template: str, name: str) -> str:
    """Where the sidecar `name` lives: `template` with ``{name}`` replaced, or `template` as a folder."""
    if "{name}" in template:
        return template.replace("{name}", name)
    return os.path.join(template, name) if "://" not in template else f"{template.rstrip('/')}/{name}"


def caption_digest(caption: str) -> str:
    """What a text sidecar records of its caption, so an embedding of another caption is never used."""
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()[:16]


def tensor_bytes(name: str, tensor: Tensor, meta: dict[str, Any]) -> bytes:
    """One tensor (+ JSON-able metadata) as safetensors bytes: no pickle, bf16 kept. The metadata is one sorted
    JSON string (safetensors keeps several metadata keys in a hash map: the bytes would vary run to run)."""
    return st_save({name: tensor.detach().cpu().contiguous()}, metadata={"saber": json.dumps(meta, sort_keys=True)})


def read_tensor(data: bytes, name: str) -> tuple[Tensor, dict[str, Any]]:
    """The tensor `name` and the metadata of `tensor_bytes` output (read from the safetensors JSON header)."""
    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")  # format: u64 header size, JSON header, raw tensors
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    return tensors[name], json.loads(meta.get("saber", "{}"))


def load_empty_text(template: str) -> Tensor:
    """The stored empty-caption embedding [L_0, D] of a text sidecar folder / URL template."""
    url = sidecar_url(template, EMPTY)
    try:
        with wds.gopen(url, "rb") as f:
            data = f.read()
    except Exception as exn:
        raise FileNotFoundError(f"no empty-caption embedding at {url} (data.text_sidecars={template!r}): "
                                f"run data/precompute_text.py over the shards first") from exn
    return read_tensor(data, "emb")[0]


class _Peek:
    """An iterator with a look at its next item."""

    def __init__(self, it: Iterator[dict]) -> None:
        self.it, self.head = it, next(it, None)

    def pop(self) -> dict:
        head, self.head = self.head, next(self.it, None)
        return head


def joined_samples(src: Iterable[dict], templates: list[str], handler: Callable[[Exception], bool],
                   drop: tuple[str, ...] = ()) -> Iterator[dict]:
    """WebDataset stage: shard URLs -> raw samples of each shard with its sidecars' members merged in.

    Replaces ``tarfile_to_samples``: for each shard, the source tar and one sidecar tar per template are
    streamed side by side; a sidecar sample is merged into the source sample of the same key (the
    sidecar lists a subsequence of the source's keys, in order). Members in `drop` (e.g. the video when
    the latents are cached) are removed before anything buffers them.
    """
    for shard in src:
        url = shard["url"]
        sides = [_Peek(wds.tarfile_to_samples(handler=handler)(iter([{"url": sidecar_url(t, shard_name(url))}])))
                 for t in templates]
        for raw in wds.tarfile_to_samples(handler=handler)(iter([dict(shard)])):
            for side in sides:
                if side.head is not None and side.head.get("__key__") == raw.get("__key__"):
                    raw.update({k: v for k, v in side.pop().items() if k not in META_KEYS})
            for ext in drop:
                raw.pop(ext, None)
            yield raw


# ------------------------------------------------------------------------------------------- writing (tools)


def batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """Consecutive lists of `n` items (the last one shorter): the tools' encoder batches."""
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def shard_samples(url: str) -> Iterator[dict]:
    """The raw samples of one shard, in order; a broken member is warned about and skipped."""
    import webdataset as wds

    return wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": url}]))


def rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """This process's share: explicit ``--rank/--world``, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    rank = rank if rank is not None else int(os.environ.get("RANK", 0))
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank {rank}, world {world}")
    return rank, world


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that it exists whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_sidecars(urls: list[str], out: Path, records: Callable[[str], Iterator[dict]], rank: int, world: int,
                   desc: str, progress: bool = True) -> dict[str, Any]:
    """Write ``out/<shard name>`` for this process's shards (i = rank mod world), each atomically.

    A shard whose sidecar already exists is skipped (resume after a kill); a partial one (``.name.tmp-*``)
    is removed and redone. `records(url)` yields the sidecar samples of one source shard in its order.
    """
    names = [shard_name(u) for u in urls]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"shards share file names {dup[:3]}: their sidecars would collide; use one --out per set")
    out.mkdir(parents=True, exist_ok=True)
    mine = list(zip(urls, names))[rank::world]
    done, written, samples = [], [], 0
    from tqdm import tqdm

    bar = tqdm(mine, desc=desc, unit="shard", disable=not progress)
    for url, name in bar:
        final = out / name
        if final.exists():
            done.append(name)
            continue
        for stale in out.glob(f".{name}.tmp-*"):
            stale.unlink()
        tmp = out / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, mtime=0.0)
            for rec in records(url):
                writer.write(rec)
                samples += 1
                bar.set_postfix(samples=samples)
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        written.append(name)
    return {"rank": rank, "world": world, "written": written, "already_done": done, "samples": samples}


def compute_device(name: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: this process's GPU (LOCAL_RANK under torchrun) in bf16 when there is one, as training computes;
    else the CPU in float32."""
    if name == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def frozen_encoders(model_cfg: Any, text: bool, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The frozen VAE and (when `text`) umT5 of a scale exactly as training builds them: seeded at tiny/mini
    (the DiT is built too, the umT5 draws come after it), read from wan_dir at 1.3B/14B (no DiT read)."""
    from dataclasses import replace

    from saber_pl import wan

    if model_cfg.spec.pretrained:
        root = wan.resolve_wan_dir(model_cfg, ("vae",) + (("text_encoder", "tokenizer") if text else ()))
        vae, encoder = wan.load_pretrained_frozen(root, model_cfg.resolved_text_len, dtype, device=device,
                                                  vae_dtype=dtype, text_encoder=text)
    else:
        comps = wan.build_components(replace(model_cfg, wan_dir=None), text_encoder=text)
        vae, encoder = comps.vae, comps.text_encoder
    vae.to(device=device, dtype=dtype)
    if encoder is not None:
        encoder.to(device=device, dtype=dtype)
    return vae, encoder


def tool_config(args: Any) -> Any:
    """The run config a tool works for (``--exp/--scale/--wan-dir`` + overrides, as saber_pl.train)."""
    from saber_pl.config import load_config

    from saber_pl.config import ConfigError

    overrides = list(args.overrides) + ([f"model.wan_dir={args.wan_dir}"] if args.wan_dir else [])
    try:
        return load_config(args.exp, args.scale, overrides)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None  # exit code 1 with the message, no traceback


def tool_shards(args: Any, cfg: Any) -> list[str]:
    """``--shards``, else the config's training and validation shards."""
    from saber_pl.datamodule import expand_shards

    specs = [args.shards] if args.shards else [s for s in (cfg.data.train_shards, cfg.data.val_shards) if s]
    if not specs:
        raise SystemExit("error: no shards: pass --shards (or set data.train_shards)")
    urls = list(dict.fromkeys(u for spec in specs for u in expand_shards(spec)))
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:  # a typo would otherwise write empty sidecars, and training would skip every sample
        raise SystemExit(f"error: {len(missing)} of {len(urls)} shard(s) not found: {', '.join(missing[:3])}"
                         + (" ..." if len(missing) > 3 else ""))
    return urls


def tool_parser(doc: str) -> Any:
    """The command line both tools share."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="saber_full")
    p.add_argument("--scale", default="mini")
    p.add_argument("--wan-dir", default=None, help="local Wan2.1 diffusers folder (1.3B/14B)")
    p.add_argument("--shards", default=None, help="source shards (default: the config's train + val shards)")
    p.add_argument("--out", required=True, help="folder the sidecar shards are written to")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="stored dtype")
    p.add_argument("--device", default="auto", help="auto = this process's GPU if any, else cpu")
    p.add_argument("--rank", type=int, default=None, help="this process's index (default: $RANK or 0)")
    p.add_argument("--world", type=int, default=None, help="processes sharing the shards (default: $WORLD_SIZE or 1)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, as for training")
    return p
