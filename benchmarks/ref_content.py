"""What Saber's masked training references show on the embedded data: subject or background?

    PYTHONPATH=. .venv/bin/python benchmarks/ref_content.py [--exp saber_full --scale mini]
                                                           [--subject-radius 0.14 0.24]

Renders procedural clips at the scale's resolution (`saber_pl.synthetic`, the same specs as
`make data`), draws one training mask per clip with the experiment's mask config, and measures how
much of the masked reference is subject. Prints one JSON line. Why it matters: at inference a
reference is a segmented subject on gray; if training references are mostly background, the model
learns to spread a reference over the whole frame (docs/bench_mini.md, "what limits text following").
"""

import argparse
import json

import numpy as np

from saber_pl import synthetic
from saber_pl.config import load_config
from saber_pl.masks import MaskGenerator


def subject_coverage(spec: synthetic.ClipSpec, frame: int) -> np.ndarray:
    """bool [H, W]: pixels covered by any subject in one frame of the clip."""
    cfg = spec.cfg
    canvas = np.zeros((cfg.height, cfg.width, 3), np.float32)
    inside = np.zeros((cfg.height, cfg.width), bool)
    for s, m in zip(spec.subjects, spec.motions):
        inside |= synthetic._draw(canvas, s, *synthetic.trajectory(m, cfg.num_frames)[frame])
    return inside


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="saber_full")
    p.add_argument("--scale", default="mini")
    p.add_argument("--clips", type=int, default=500)
    p.add_argument("--subject-radius", type=float, nargs=2, default=synthetic.SyntheticConfig.subject_radius)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = load_config(a.exp, a.scale)
    syn = synthetic.SyntheticConfig(num_frames=9, height=cfg.data.height, width=cfg.data.width, supersample=1,
                                    subject_radius=tuple(a.subject_radius))
    masks = MaskGenerator(cfg.masks)
    rng = np.random.default_rng(a.seed)
    frame_share, ref_share, covered = [], [], []
    for seed in range(a.clips):
        spec = synthetic.sample_clip_spec(seed, syn)
        subject = subject_coverage(spec, int(rng.integers(syn.num_frames)))  # [H, W]
        mask = masks.make(syn.height, syn.width, masks.sample_target(rng), masks.sample_family(rng), rng)
        frame_share.append(subject.mean())
        ref_share.append((mask & subject).sum() / mask.sum())
        covered.append((mask & subject).sum() / max(subject.sum(), 1))
    ref_share = np.asarray(ref_share)
    print(json.dumps({
        "experiment": a.exp, "scale": a.scale, "clips": a.clips, "subject_radius": list(a.subject_radius),
        "subject_share_of_frame": round(float(np.mean(frame_share)), 4),
        "subject_share_of_reference_mean": round(float(ref_share.mean()), 4),
        "subject_share_of_reference_median": round(float(np.median(ref_share)), 4),
        "references_under_10pct_subject": round(float((ref_share < 0.1).mean()), 4),
        "references_over_50pct_subject": round(float((ref_share > 0.5).mean()), 4),
        "subject_covered_by_mask": round(float(np.mean(covered)), 4),
    }))


if __name__ == "__main__":
    main()
