"""Build the embedded procedural data set (train + val shards) used by the tiny/mini scales.

    python data/make_embedded.py --out data/embedded             # 1024 train clips (8 shards) + 64 val
    python data/make_embedded.py --out /tmp/e --train 64 --val 16 --workers 2

Clips: 17 frames at 16 fps, 64x64, h264 mp4, one subject sliding over a plain, striped, gradient or
checkered background, captions without colours or textures; see saber_pl/synthetic.py and docs/data.md.
A harder set: --motions all --backgrounds all --max-subjects 2 --subject-radius 0.14 0.24.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from saber_pl.synthetic import BACKGROUNDS, MOTIONS, SyntheticConfig, build_embedded  # noqa: E402


def _float_or_none(text: str) -> float | None:
    """A number, or None for 'none' (argparse type: a bad value is reported with the flag's name)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/embedded", help="output folder (train-%%06d.tar, val-%%06d.tar)")
    p.add_argument("--train", type=int, default=1024, help="training clips")
    p.add_argument("--val", type=int, default=64, help="validation clips (one shard)")
    p.add_argument("--maxcount", type=int, default=128, help="clips per training shard")
    d = SyntheticConfig()
    p.add_argument("--frames", type=int, default=d.num_frames)
    p.add_argument("--fps", type=float, default=d.fps)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--motions", nargs="+", default=list(d.motions), help=f"of {' '.join(MOTIONS)}, or all")
    p.add_argument("--backgrounds", nargs="+", default=list(d.backgrounds), help=f"of {' '.join(BACKGROUNDS)}, or all")
    p.add_argument("--max-subjects", type=int, default=d.max_subjects)
    p.add_argument("--subject-radius", type=float, nargs=2, default=SyntheticConfig.subject_radius,
                   metavar=("LOW", "HIGH"), help="subject radius range, fraction of min(H, W)")
    p.add_argument("--background-value", type=float, nargs=2, default=SyntheticConfig.background_value,
                   metavar=("LOW", "HIGH"), help="HSV value range of the background colours")
    p.add_argument("--subject-contrast", type=_float_or_none, default=SyntheticConfig.subject_contrast,
                   help="min luma a subject exceeds the background by, or 'none' (any brightness: the old set)")
    p.add_argument("--background-contrast", type=float, default=SyntheticConfig.background_contrast,
                   help="min value difference of the two background colours")
    p.add_argument("--slide-distance", type=float, nargs=2, default=SyntheticConfig.slide_distance,
                   metavar=("LOW", "HIGH"), help="path length range of a slide, fraction of the frame")
    p.add_argument("--background-order", choices=("random", "dark_first"), default=SyntheticConfig.background_order,
                   help="which background colour comes first (dark_first: each kind's mean clip differs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="render/encode processes")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = SyntheticConfig(num_frames=a.frames, fps=a.fps, height=a.height, width=a.width,
                              subject_radius=tuple(a.subject_radius), max_subjects=a.max_subjects,
                              background_value=tuple(a.background_value), subject_contrast=a.subject_contrast,
                              background_contrast=a.background_contrast, slide_distance=tuple(a.slide_distance),
                              background_order=a.background_order,
                              motions=MOTIONS if a.motions == ["all"] else tuple(a.motions),
                              backgrounds=BACKGROUNDS if a.backgrounds == ["all"] else tuple(a.backgrounds))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.time()
    summary = build_embedded(a.out, a.train, a.val, cfg, a.seed, a.workers, max(a.maxcount, 1), not a.no_progress)
    splits = {k: len(v["shards"]) for k, v in summary["splits"].items()}
    print(json.dumps({"out": a.out, "shards": splits, "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
