"""Encode each clip once with the frozen VAE: latent sidecar shards for ``data.latents: cached``.

    python data/cache_latents.py --exp saber_full --scale 14B --wan-dir /ckpt/Wan2.1-T2V-14B-Diffusers \\
        --shards '/data/shards-{000000..009999}.tar' --out /data/latents
    torchrun --nproc-per-node 8 data/cache_latents.py --scale 14B ...     # shards dealt out: i mod WORLD_SIZE
    make cache-latents SCALE=14B WAN_DIR=... SHARDS=... ARGS='--out /data/latents'

then train with ``data.latents=cached data.latent_sidecars=/data/latents``: no rank runs the 81-frame encode.

The window: the clip the DataModule would decode at the run's ``data.num_frames``, ``data.fps``,
``data.height`` x ``data.width``, from a fixed start, the first window (source frame 0). One window per
clip keeps one latent per sample (14B: [16, 21, 60, 104] bf16, 4.2 MB); the random temporal crop of the
online path is what is given up (run the tool again over a trimmed copy for more windows). Per sample
``<key>.latent.safetensors`` holds the normalised latent ([C, f, h, w] in ``--dtype``; the window's
size, fps and frame indices in its metadata, checked against the run's data config at load) and
``<key>.frame<j>.png`` ``--frames`` (8) frames spread evenly over the window, lossless at the training
size: the pool the references are drawn from at every step, so K, the masks, the affine augmentation
and the one-frame reference encodes stay online and random. Clips the online path would skip (corrupt,
too short, ...) are left out and counted in the JSON line. Resumable like precompute_text.py.
"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from saber_pl.datamodule import DataConfig  # noqa: E402
from saber_pl.sidecars import (  # noqa: E402
    DTYPES, LATENT_MEMBER, batched, compute_device, frozen_encoders, rank_world, shard_samples, tensor_bytes,
    tool_config, tool_parser, tool_shards, write_sidecars,
)
from saber_pl.video import VIDEO_EXTENSIONS, VideoError, decode_clip  # noqa: E402
from saber_pl.wan import VideoVAE  # noqa: E402


def stored_frames(num_frames: int, n: int) -> list[int]:
    """Clip frame indices of the n stored frames, spread evenly over the window (first and last included)."""
    return sorted({int(i) for i in np.linspace(0, num_frames - 1, max(1, min(n, num_frames))).round()})


def png(frame: torch.Tensor) -> bytes:
    """uint8 [3, H, W] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def latent_records(url: str, vae: VideoVAE, data: DataConfig, batch_size: int, n_frames: int, dtype: torch.dtype,
                   skipped: Counter) -> Iterator[dict]:
    """The latent sidecar samples of one shard, in its order; undecodable clips are counted in `skipped`."""
    device = vae.latents_mean.device
    compute = next(vae.model.parameters(), vae.latents_mean).dtype
    picks = stored_frames(data.num_frames, n_frames)
    window = {"num_frames": data.num_frames, "fps": data.fps, "height": data.height, "width": data.width,
              "start": 0, "frames": picks}

    def clips() -> Iterator[tuple[str, torch.Tensor]]:
        for raw in shard_samples(url):
            ext = next((e for e in VIDEO_EXTENSIONS if e in raw), None)
            if ext is None:
                skipped["missing_video"] += 1
                continue
            try:
                clip = decode_clip(raw[ext], data.num_frames, data.fps, data.height, data.width, start=0,
                                   threads=data.decode_threads)  # [F, 3, H, W]
            except VideoError as exn:
                skipped[exn.reason] += 1
                continue
            except Exception:  # anything else PyAV throws at a broken file, as the DataModule
                skipped["corrupt_video"] += 1
                continue
            yield raw["__key__"], clip

    for batch in batched(clips(), batch_size):
        frames = torch.stack([c for _, c in batch])  # [B, F, 3, H, W] uint8
        video = frames.permute(0, 2, 1, 3, 4).float().div(127.5).sub(1.0)  # [B, 3, F, H, W], as on_after_batch_transfer
        z = vae.encode(video.to(device, compute))  # [B, C, f, h, w]
        for (key, clip), latent in zip(batch, z):
            rec = {"__key__": key, LATENT_MEMBER: tensor_bytes("latent", latent.to(dtype), window)}
            rec.update({f"frame{j}.png": png(clip[i]) for j, i in enumerate(picks)})
            yield rec


def main(argv: list[str] | None = None) -> int:
    p = tool_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=1, help="clips per VAE call (one 81x480x832 clip is large)")
    p.add_argument("--frames", type=int, default=8, help="frames of the window stored for the references")
    a = p.parse_args(argv)
    cfg = tool_config(a)
    urls = tool_shards(a, cfg)
    rank, world = rank_world(a.rank, a.world)
    device, compute = compute_device(a.device)
    vae, _ = frozen_encoders(cfg.model, False, device, compute)
    skipped: Counter[str] = Counter()
    records = lambda url: latent_records(url, vae, cfg.data, a.batch_size, a.frames, DTYPES[a.dtype], skipped)  # noqa: E731
    summary = write_sidecars(urls, Path(a.out), records, rank, world, desc=f"VAE rank {rank}/{world}",
                             progress=not a.no_progress)
    print(json.dumps({"tool": "cache_latents", "out": a.out, "dtype": a.dtype, "device": str(device),
                      "window": {"num_frames": cfg.data.num_frames, "fps": cfg.data.fps, "height": cfg.data.height,
                                 "width": cfg.data.width, "start": 0}, "skipped": dict(skipped), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
