"""Data loading throughput: clip decoding per worker, and the whole DataModule on the embedded set.

    PYTHONPATH=. .venv/bin/python benchmarks/data.py [--clips 6] [--batches 30]
    PYTHONPATH=. .venv/bin/python benchmarks/data.py --mode cached [--batches 30]

clips_per_s_per_worker: 81 frames at 16 fps, 480x832, decoded (seek + frame stepping) in one process
with one FFmpeg thread from a 6 s 832x480 24 fps h264 mp4 made here with av.
samples_per_s: data/embedded (or, if absent, 128 clips built into a temporary folder) through
SaberDataModule with 2 workers: decode 33 frames at 16 fps, 128x128, K in 1..3 masks, batch 4,
then on_after_batch_transfer (the reference augmentation) on the CPU.
--mode cached: samples/s of ONE worker with cached latents + precomputed embeddings (data.latents=cached,
data.text=precomputed: no decode, no umT5 or VAE in the loop) against one online worker (decode + tokenize),
same data and batches; the sidecars are made first by data/precompute_text.py and data/cache_latents.py at
scale mini (33 frames at 16 fps, 128x128) over the first 2 embedded shards (or the temporary set).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saber_pl.augment import AugmentConfig
from saber_pl.datamodule import DataConfig, SaberDataModule
from saber_pl.masks import MaskConfig
from saber_pl.synthetic import build_embedded
from saber_pl.video import clip_span, decode_clip, encode_mp4

ROOT = Path(__file__).resolve().parent.parent


def source_video(seconds: float = 6.0, fps: int = 24, height: int = 480, width: int = 832) -> bytes:
    """Smooth moving content (gradients, a moving box, light noise) so x264 sizes look like real video."""
    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        base = np.stack([(x + 4 * i) % width / width, y / height, (x + y + 6 * i) % 256 / 256], -1) * 200 + 20
        box = (np.abs(x - (100 + 5 * i) % width) < 60) & (np.abs(y - 240 - 80 * np.sin(i / 10)) < 60)
        base[box] = (230, 60, 40)
        frames[i] = np.clip(base + rng.normal(0, 3, (height, width, 1)), 0, 255).astype(np.uint8)
    return encode_mp4(frames, fps, crf=23, preset="veryfast")


def decode_rate(data: bytes, clips: int) -> float:
    rng = np.random.default_rng(0)
    decode_clip(data, 81, 16.0, 480, 832, rng=rng)  # warm-up
    t0 = time.perf_counter()
    for _ in range(clips):
        clip = decode_clip(data, 81, 16.0, 480, 832, rng=rng, threads=1)
    assert clip.shape == (81, 3, 480, 832)
    return clips / (time.perf_counter() - t0)


def datamodule_rate(batches: int, tmp: Path) -> tuple[float, str]:
    emb = ROOT / "data" / "embedded"
    if (emb / ".complete").exists():
        pattern, used = str(emb / "train-{000000..000007}.tar"), "data/embedded"
    else:
        build_embedded(tmp, num_train=128, num_val=0, workers=2, maxcount=32, progress=False)
        pattern, used = str(tmp / "train-{000000..000003}.tar"), "temporary 128-clip embedded set"
    cfg = DataConfig(train_shards=pattern, num_frames=33, fps=16.0, height=128, width=128, batch_size=4,
                     num_workers=2, shuffle_buffer=64)
    dm = SaberDataModule(cfg, MaskConfig(), AugmentConfig())
    it = iter(dm.train_dataloader())
    for _ in range(3):  # warm-up: worker start and the shuffle buffer fill
        dm.on_after_batch_transfer(next(it), 0)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += dm.on_after_batch_transfer(next(it), 0)["video"].shape[0]
    rate = n / (time.perf_counter() - t0)
    del it
    return rate, used


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_rate(cfg: DataConfig, tokenize, text_len: int | None, batches: int) -> float:
    """Samples/s of one DataLoader worker (batches after the warm-up), augmentation on the CPU included."""
    dm = SaberDataModule(cfg, MaskConfig(), AugmentConfig(), tokenize, text_len=text_len)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        dm.on_after_batch_transfer(next(it), 0)
    t0 = time.perf_counter()
    n = sum(len(dm.on_after_batch_transfer(next(it), 0)["key"]) for _ in range(batches))
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def cached_mode(batches: int, tmp: Path) -> dict:
    """One worker online vs one worker on cached latents + precomputed text, same shards and batches."""
    from saber_pl.config import load_config
    from saber_pl.sidecars import EMPTY
    from saber_pl.wan import build_components

    emb = ROOT / "data" / "embedded"
    if (emb / ".complete").exists():
        pattern, used = str(emb / "train-{000000..000001}.tar"), "data/embedded (2 shards, 256 clips)"
    else:
        build_embedded(tmp, num_train=128, num_val=0, workers=2, maxcount=32, progress=False)
        pattern, used = str(tmp / "train-{000000..000003}.tar"), "temporary 128-clip embedded set"
    over = ["data.num_frames=33", "data.fps=16.0", "data.height=128", "data.width=128"]
    common = ["--scale", "mini", "--shards", pattern, "--no-progress", "--device", "cpu", *over]
    import contextlib
    import sys

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the tools' own JSON lines: this script prints one line
        _tool("precompute_text").main([*common, "--out", str(tmp / "text")])
        t1 = time.perf_counter()
        _tool("cache_latents").main([*common, "--out", str(tmp / "latents")])
    t2 = time.perf_counter()
    model = load_config("saber_full", "mini", over).model
    text_len = model.resolved_text_len
    tokenizer = build_components(model).tokenizer
    from functools import partial

    from saber_pl.wan import tokenize

    base = DataConfig(train_shards=pattern, num_frames=33, fps=16.0, height=128, width=128, batch_size=4,
                      num_workers=1, shuffle_buffer=64)
    online = worker_rate(base, partial(tokenize, tokenizer, text_len=text_len), None, batches)
    cached_cfg = DataConfig(**{**base.__dict__, "text": "precomputed", "text_sidecars": str(tmp / "text"),
                               "latents": "cached", "latent_sidecars": str(tmp / "latents")})
    cached = worker_rate(cached_cfg, None, text_len, batches)
    size = lambda d: sum(f.stat().st_size for f in (tmp / d).glob("*.tar"))  # noqa: E731
    n = len(list((tmp / "latents").glob("*.tar")))
    return {"mode": "cached", "data": used, "workers": 1, "frames": 33, "size": "128x128", "batch": 4,
            "refs": "1..3", "augment": "cpu",
            "online_samples_per_s_per_worker": round(online, 2), "cached_samples_per_s_per_worker": round(cached, 2),
            "speedup": round(cached / online, 2), "sidecar_shards": n,
            "text_sidecar_mb": round(size("text") / 1e6, 2), "latent_sidecar_mb": round(size("latents") / 1e6, 2),
            "empty_embedding": (tmp / "text" / EMPTY).is_file(),
            "precompute_text_s": round(t1 - t0, 1), "cache_latents_s": round(t2 - t1, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["online", "cached"], default="online",
                   help="online: decode rate + DataModule; cached: one worker on sidecars vs one online")
    p.add_argument("--clips", type=int, default=6, help="clips decoded for the per-worker rate")
    p.add_argument("--batches", type=int, default=30, help="batches timed through the DataModule")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.mode == "cached":
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(cached_mode(a.batches, Path(tmp))))
        return
    data = source_video()
    per_worker = decode_rate(data, a.clips)
    with tempfile.TemporaryDirectory() as tmp:
        samples, used = datamodule_rate(a.batches, Path(tmp))
    print(json.dumps({
        "clips_per_s_per_worker": round(per_worker, 3),
        "decode": {"frames": 81, "fps": 16, "size": "480x832", "source": "6 s 832x480 24 fps h264",
                   "source_mb": round(len(data) / 1e6, 2), "span_source_frames": clip_span(24, 81, 16)},
        "samples_per_s": round(samples, 2),
        "datamodule": {"data": used, "workers": 2, "frames": 33, "size": "128x128", "batch": 4, "refs": "1..3",
                       "augment": "cpu"},
    }))


if __name__ == "__main__":
    main()
