"""Saber-mini: does masked-frame training teach a small model to use references? (CPU, minutes)

``make bench-mini`` (= ``python -m saber_pl.eval.mini``) trains each experiment at scale ``mini`` on
the embedded procedural data set (video-text pairs only; captions never name colours or textures),
then generates one video per test case and scores it:

- test cases: a prompt ("an object slides to the left on a striped background") and one reference
  image of a subject never seen in training, rendered alone on a white background at another scale
  and angle than in any clip (a product photo, RGBA), prepared by the normal inference path
  (alpha segmentation, gray fill, aspect-preserving resize + pad);
- identity retrieval: the video's reference consistency (colour histograms, as the OpenS2V harness)
  with its own reference vs N-1 distractor references of other cases; chance = 1/N;
- copy-paste: how exactly the prepared reference appears pixel-aligned, at its position and scale;
- text following: the tracked subject moves the way the prompt says (left/right/up/down).

Results go to ``runs/bench-mini/results.md`` (one row per experiment, like the paper's ablation
table) with a PNG grid per experiment (reference, then frames of the generated video).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from saber_pl import synthetic
from saber_pl.eval.metrics import (MetricsConfig, consistency_matrix, copy_paste_score, temporal_smoothness,
                                   text_following)

log = logging.getLogger(__name__)

# The goal's three first (saber_full vs t2v_baseline for identity, vs no_mask_aug for copy-paste).
EXPERIMENTS = ["saber_full", "t2v_baseline", "no_mask_aug", "ellipse_only", "fourier_only", "polygon_only",
               "fixed_ratio", "no_attn_mask"]
MOTIONS = ["slide_left", "slide_right", "slide_up", "slide_down"]


@dataclass
class BenchConfig:
    """What the benchmark trains, how many cases it generates and how it samples."""

    out: str = "runs/bench-mini"  # benchmark folder; runs go to <out>/<exp>-<scale>/
    scale: str = "mini"
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    cases: int = 32  # test cases (one unseen subject each)
    candidates: int = 8  # N for identity retrieval: own reference + N-1 distractors
    seed: int = 20261124  # seed of the test subjects (far from the training clip seeds)
    steps: int = 25  # sampler steps
    guidance: float = 5.0  # CFG scale
    scheduler: str = "unipc"  # sampler: unipc | euler
    photo_size: int = 128  # side of the product-photo references
    train_overrides: list[str] = field(default_factory=list)  # extra key=value for every training run
    grid_cases: int = 4  # cases shown in each experiment's PNG grid

    def __post_init__(self) -> None:
        if not 2 <= self.candidates <= self.cases:
            raise ValueError(f"candidates must be in [2, cases={self.cases}], got {self.candidates}")
        unknown = sorted(set(self.experiments) - set(EXPERIMENTS) - {"r2v_triplets"})
        if unknown:
            raise ValueError(f"experiments: unknown {unknown}")


@dataclass
class Case:
    """One test case: a prompt and the path of its reference photo (RGBA, alpha = the subject)."""

    case_id: str
    prompt: str
    ref_path: str
    motion: str


# ----------------------------------------------------------------------------------------------- cases


def make_cases(out_dir: Path, n: int, seed: int, photo_size: int = 128) -> list[Case]:
    """Render n unseen subjects as product photos with identity-free prompts (deterministic by seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        background, hue = synthetic.sample_background(rng)
        subject = synthetic.sample_subject(rng, hue)
        motion = synthetic.sample_motion(rng, kind=MOTIONS[i % len(MOTIONS)])
        noun = str(rng.choice(synthetic.NOUNS))
        prompt = synthetic.make_caption(noun, [motion], background)
        # Another scale and angle than in the clips (clip scales stay near 1), on a plain white table.
        image, mask = synthetic.render_subject(subject, photo_size, photo_size, scale=float(rng.uniform(1.6, 2.2)),
                                               angle=float(rng.uniform(-45, 45)), background=(255, 255, 255))
        rgba = np.concatenate([image, (mask * 255).astype(np.uint8)[..., None]], axis=-1)
        path = out_dir / f"case{i:03d}.png"
        Image.fromarray(rgba, "RGBA").save(path)
        cases.append(Case(f"case{i:03d}", prompt, str(path), motion.kind))
    (out_dir / "cases.json").write_text(json.dumps([dataclasses.asdict(c) for c in cases], indent=1))
    return cases


# ----------------------------------------------------------------------------------------------- training


def train(exp: str, cfg: BenchConfig) -> dict:
    """Train one experiment in a subprocess (resumable: a finished run is not trained again)."""
    from saber_pl.train import resume_step

    run_dir = Path(cfg.out) / f"{exp}-{cfg.scale}"
    done = run_dir / "train_done.json"
    if done.is_file():
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "saber_pl.train", "--exp", exp, "--scale", cfg.scale,
           f"logging.runs_dir={cfg.out}", *cfg.train_overrides]
    log.info("training %s: %s", exp, " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    minutes = (time.perf_counter() - t0) / 60
    from saber_pl.export import load_run_config

    run_cfg = load_run_config(run_dir)
    steps = resume_step(run_dir / "checkpoints" / "last.ckpt")
    info = {"experiment": exp, "train_minutes": round(minutes, 2), "steps": steps,
            "samples_per_s": round(steps * run_cfg.data.batch_size / max(minutes * 60, 1e-9), 2)}
    done.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------- evaluation


def generate_videos(run_dir: Path, cases: list[Case], cfg: BenchConfig, use_refs: bool
                    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One video per case  # -> videos [F, 3, H, W] in [-1, 1], refs [N, 3, H, W], masks [N, 1, H, W]."""
    from saber_pl.generate import Generator
    from saber_pl.references import ReferenceConfig, prepare_references
    from saber_pl.sampling import SamplerConfig

    gen = Generator.from_checkpoint(run_dir)
    video = gen.defaults
    sampler = SamplerConfig(steps=cfg.steps, guidance=cfg.guidance, shift=gen_shift(run_dir), scheduler=cfg.scheduler)
    ref_cfg = ReferenceConfig(height=video.height, width=video.width, max_references=len(cases))  # one per case
    refs, masks = prepare_references([c.ref_path for c in cases], ref_cfg)  # [N, 3, H, W], [N, 1, H, W]
    videos = []
    for i, case in enumerate(cases):
        r, m = (refs[i:i + 1], masks[i:i + 1]) if use_refs else (None, None)
        out = gen.generate([case.prompt], r, m, video, sampler, seed=i, progress=False)[0]  # [3, F, H, W]
        videos.append(out.permute(1, 0, 2, 3))  # [F, 3, H, W], the metrics' layout
    return videos, refs, masks


def gen_shift(run_dir: Path) -> float:
    """Sample with the flow shift the run trained with."""
    from saber_pl.export import load_run_config

    return load_run_config(run_dir).flow.shift


def retrieval_accuracy(scores: torch.Tensor, candidates: int) -> float:
    """Video i against its own reference i and the next candidates-1 cases' references  # scores [V, V]."""
    n = scores.shape[0]
    hits = 0
    for i in range(n):
        pool = [(i + j) % n for j in range(candidates)]  # own first
        hits += int(int(scores[i, pool].argmax()) == 0)
    return hits / n


def score(videos: list[torch.Tensor], refs: torch.Tensor, masks: torch.Tensor, cases: list[Case],
          cfg: BenchConfig) -> dict:
    """The benchmark's metrics over all cases."""
    mcfg = MetricsConfig()
    matrix = consistency_matrix(videos, refs, masks, mcfg)  # [V, N]
    follows = [text_following(v, c.prompt, r, m, mcfg) for v, c, r, m in zip(videos, cases, refs, masks)]
    return {
        "identity_acc": retrieval_accuracy(matrix, cfg.candidates),
        "chance": 1.0 / cfg.candidates,
        "consistency_own": float(matrix.diag().mean()),
        "consistency_other": float((matrix.sum() - matrix.diag().sum()) / (matrix.numel() - matrix.shape[0])),
        "copy_paste": float(np.mean([copy_paste_score(v, r, m) for v, r, m in zip(videos, refs, masks)])),
        "text_following": float(np.mean([bool(f.match) for f in follows])),
        "smoothness": float(np.mean([temporal_smoothness(v) for v in videos])),
    }


def save_grid(path: Path, videos: list[torch.Tensor], refs: torch.Tensor, n: int, frames: int = 5) -> None:
    """Rows: reference, then `frames` frames of its generated video (uint8 PNG)."""
    rows = []
    for v, r in list(zip(videos, refs))[:n]:
        idx = np.linspace(0, v.shape[0] - 1, frames).round().astype(int)  # v [F, 3, H, W]
        tiles = [r] + [v[i] for i in idx]  # [3, H, W] each
        rows.append(torch.cat(tiles, dim=2))
    grid = torch.cat(rows, dim=1)  # [3, n*H, (1+frames)*W]
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


def evaluate(exp: str, cases: list[Case], cfg: BenchConfig) -> dict:
    """Generate and score one trained experiment; writes <out>/<exp>-<scale>/bench.json and grid.png."""
    from saber_pl.export import load_run_config

    run_dir = Path(cfg.out) / f"{exp}-{cfg.scale}"
    out = run_dir / "bench.json"
    settings = eval_settings(cfg)
    if out.is_file() and out.stat().st_mtime >= (run_dir / "train_done.json").stat().st_mtime:
        old = json.loads(out.read_text())
        if old.get("settings") == settings:  # same run, same cases and sampler: reuse
            return {k: v for k, v in old.items() if k != "settings"}
    use_refs = load_run_config(run_dir).data.refs_max > 0
    videos, refs, masks = generate_videos(run_dir, cases, cfg, use_refs)
    metrics = score(videos, refs, masks, cases, cfg) | {"references_used": use_refs}
    save_grid(run_dir / "bench_grid.png", videos, refs, cfg.grid_cases)
    out.write_text(json.dumps(metrics | {"settings": settings}, indent=1))
    return metrics


def eval_settings(cfg: BenchConfig) -> dict:
    """What a stored bench.json depends on besides the run itself."""
    keys = ("cases", "candidates", "seed", "steps", "guidance", "scheduler", "photo_size")
    return {k: getattr(cfg, k) for k in keys}


# ----------------------------------------------------------------------------------------------- report


COLUMNS = [("identity_acc", "identity acc ↑"), ("consistency_own", "ref. consistency ↑"),
           ("copy_paste", "copy-paste"), ("text_following", "text following ↑"), ("smoothness", "smoothness"),
           ("train_minutes", "train min"), ("samples_per_s", "samples/s")]


def results_table(rows: dict[str, dict], cfg: BenchConfig) -> str:
    """Markdown table, one row per experiment (the shape of the paper's ablation table)."""
    head = "| experiment | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for exp, r in rows.items():
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "—")) for k, _ in COLUMNS]
        lines.append(f"| {exp} | " + " | ".join(cells) + " |")
    chance = 1.0 / cfg.candidates
    return "\n".join(lines) + (f"\n\nIdentity retrieval: {cfg.cases} unseen subjects, N = {cfg.candidates} "
                               f"candidates (chance {chance:.3f}); {cfg.steps} sampler steps, CFG {cfg.guidance}.\n")


def run(cfg: BenchConfig) -> Path:
    """Train (resumably), evaluate and report every experiment; returns the results.md path."""
    out = Path(cfg.out)
    cases = make_cases(out / "cases", cfg.cases, cfg.seed, cfg.photo_size)
    rows: dict[str, dict] = {}
    for exp in cfg.experiments:
        info = train(exp, cfg)
        rows[exp] = evaluate(exp, cases, cfg) | info
        log.info("%s: %s", exp, rows[exp])
        (out / "results.md").write_text(results_table(rows, cfg))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return out / "results.md"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=BenchConfig.out)
    p.add_argument("--scale", default="mini")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated")
    p.add_argument("--cases", type=int, default=BenchConfig.cases)
    p.add_argument("--candidates", type=int, default=BenchConfig.candidates)
    p.add_argument("--steps", type=int, default=BenchConfig.steps)
    p.add_argument("--guidance", type=float, default=BenchConfig.guidance)
    p.add_argument("--scheduler", default=BenchConfig.scheduler, choices=["unipc", "euler"])
    p.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    a = p.parse_args(argv)
    try:
        cfg = BenchConfig(out=a.out, scale=a.scale, experiments=[e for e in a.experiments.split(",") if e],
                          cases=a.cases, candidates=a.candidates, steps=a.steps, guidance=a.guidance, scheduler=a.scheduler,
                          train_overrides=a.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
