"""How much of the training clips does each caption word explain? (data side of the caption probe)

    PYTHONPATH=. .venv/bin/python benchmarks/caption_variance.py [--shards 'data/embedded/train-*.tar'] [--clips 512]

Decodes clips as training does (the mini size: 9 frames at 8 fps, 32x32) and prints one JSON line: the
share of the pixel variance explained by the direction word's mean clip, by the background word's, and
the share that is the backgrounds' own spatial structure (each clip's median frame around its mean
colour). At t ~ 1 a clean-latent estimate can only be a caption's mean clip, so a word whose share is
near 0 is not read there whatever the training length (the embedded set: direction 0.158, background
0.012, background structure 0.65; docs/bench_mini.md, tenth round).
"""

from __future__ import annotations

import argparse
import glob
import json
import tarfile

import torch

from saber_pl.eval.caption_probe import BACKGROUND_SWAPS, DIRECTION_SWAPS, caption_word, explained_share
from saber_pl.video import VIDEO_EXTENSIONS, decode_clip


def read_clips(pattern: str, limit: int, frames: int, fps: float, size: int) -> tuple[torch.Tensor, list[str]]:
    """Up to `limit` (clip, caption) pairs from the tar shards  # -> [N, F, 3, H, W] in [0, 1], captions."""
    clips, captions = [], []
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            samples: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                if member.isfile():
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in samples.values():
            video = next((sample[e] for e in VIDEO_EXTENSIONS if e in sample), None)
            if video is None or "txt" not in sample:
                continue
            clips.append(decode_clip(video, frames, fps, size, size).float() / 255.0)
            captions.append(sample["txt"].decode("utf-8"))
            if len(clips) == limit:
                return torch.stack(clips), captions
    if not clips:
        raise SystemExit(f"no clips found in {pattern!r}")
    return torch.stack(clips), captions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="data/embedded/train-*.tar")
    p.add_argument("--clips", type=int, default=512)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    clips, captions = read_clips(a.shards, a.clips, a.frames, a.fps, a.size)
    shares = {}
    for name, words in (("direction", DIRECTION_SWAPS), ("background", BACKGROUND_SWAPS)):
        labels = [caption_word(c, words) or "none" for c in captions]
        shares[f"{name}_explains"] = round(explained_share(clips, labels), 4)
    still = clips.median(1).values  # [N, 3, H, W]: the static background (the subject moves)
    structure = (still - still.mean((2, 3), keepdim=True)).pow(2).sum() / (clips - clips.mean(0)).pow(2).sum()
    print(json.dumps({"bench": "caption_variance", "clips": len(captions), **shares,
                      "background_structure": round(float(structure) * clips.shape[1], 4)}))


if __name__ == "__main__":
    main()
