"""Saber-mini: does masked-frame training teach a small model to use references? (CPU, minutes)

``make bench-mini`` (= ``python -m saber_pl.eval.mini``) trains each experiment at scale ``mini`` on
the embedded procedural data set (video-text pairs only; captions never name colours or textures),
then generates one video per test case and scores it:

- test cases: a prompt ("an object slides to the left on a striped background") and one reference
  image of a subject never seen in training, rendered alone on a white background at another scale
  and angle than in any clip (a product photo, RGBA), prepared by the normal inference path
  (alpha segmentation, gray fill, aspect-preserving resize + pad);
- every figure is measured on what a person sees (`saber_pl.eval.scene`): is one distinct moving
  subject found, does it move the prompted way, is the background the prompted kind, does the
  found subject's colours pick its own reference among N (chance 1/N; no subject is never a hit),
  are sharpness, flicker and tiling (the token mosaic) inside the real clips' range, plus copy-paste
  and the gray halo on the found subject;
- a first row scores each case's own real clip (rendered, mp4, decoded like training data), and
  every figure carries a bootstrap 95 % interval over the cases.

Results go to ``runs/bench-mini/results.md`` (one row per experiment, like the paper's ablation
table) with a PNG grid per experiment (reference, then frames of the generated video).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from saber_pl import synthetic
from saber_pl.eval.caption_probe import BACKGROUND_SWAPS, DIRECTION_SWAPS, caption_reliance
from saber_pl.eval.metrics import copy_paste_score
from saber_pl.eval.scene import SceneConfig, describe, identity_scores, retrieval_hits

if TYPE_CHECKING:  # imported lazily at run time (the whole model stack)
    from saber_pl.generate import Generator
    from saber_pl.wan import ModelConfig

log = logging.getLogger(__name__)

# The goal's three first (saber_full vs t2v_baseline for identity, vs no_mask_aug for copy-paste).
EXPERIMENTS = ["saber_full", "t2v_baseline", "no_mask_aug", "ellipse_only", "fourier_only", "polygon_only",
               "fixed_ratio", "no_attn_mask"]
MOTIONS = ["slide_left", "slide_right", "slide_up", "slide_down"]
BACKGROUNDS = ["plain", "stripes", "gradient", "checker"]  # the cases cycle through motion x background
REFERENCE_SCALES = ("photo", "fit", "clip")  # BenchConfig.reference_scale


@dataclass
class BenchConfig:
    """What the benchmark trains, how many cases it generates and how it samples."""

    out: str = "runs/bench-mini"  # benchmark folder; runs go to <out>/<exp>-<scale>/
    scale: str = "mini"
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    cases: int = 96  # test cases (one unseen subject each; 6 per motion x background kind)
    candidates: int = 8  # N for identity retrieval: own reference + N-1 distractors
    seed: int = 20261124  # seed of the test subjects (far from the training clip seeds)
    steps: int = 25  # sampler steps
    guidance: float | None = None  # CFG scale; None: each run's sample.guidance (mini: 1.0)
    guidance_interval: tuple[float, float] | None = None  # guided noise levels; None: each run's sample's
    reference_guidance: float | None = None  # guidance on the references alone; None: each run's sample's
    scheduler: str = "unipc"  # sampler: unipc | euler
    photo_size: int = 128  # side of the product-photo references
    # how the references are sized: "photo" = the inference path as the run configures it (its
    # sample.reference_size: mini shows the subject at the size its training clips do; null = "fit");
    # "fit" = the paper's fit of the whole photo to the frame (the subject at 1.6-2.2x its size in the clip);
    # "clip" = the fitted photo shrunk about its centre to the subject's size in its own clip (an oracle
    # diagnostic that separates "does not generalise over scale" from "does not carry identity")
    reference_scale: str = "photo"
    train_overrides: list[str] = field(default_factory=list)  # extra key=value for every training run
    grid_cases: int = 8  # cases shown in each experiment's PNG grid
    bootstraps: int = 1000  # resamples of the cases for the 95 % intervals

    def __post_init__(self) -> None:
        if self.bootstraps < 10:
            raise ValueError(f"bootstraps must be >= 10, got {self.bootstraps}")
        if self.reference_scale not in REFERENCE_SCALES:
            raise ValueError(f"reference_scale must be one of {REFERENCE_SCALES}, got {self.reference_scale!r}")
        if not 2 <= self.candidates <= self.cases:
            raise ValueError(f"candidates must be in [2, cases={self.cases}], got {self.candidates}")
        unknown = sorted(set(self.experiments) - set(EXPERIMENTS) - {"r2v_triplets"})
        if unknown:
            raise ValueError(f"experiments: unknown {unknown}")
        # the sampler's own checks, before any run is trained (a bad --guidance found after training wastes it)
        from saber_pl.sampling import SamplerConfig

        SamplerConfig(steps=self.steps, guidance=1.0 if self.guidance is None else self.guidance,
                      scheduler=self.scheduler, guidance_interval=self.guidance_interval or (0.0, 1.0),
                      reference_guidance=1.0 if self.reference_guidance is None else self.reference_guidance)
        if self.guidance_interval is not None:
            self.guidance_interval = tuple(float(v) for v in self.guidance_interval)  # type: ignore[assignment]


@dataclass
class Case:
    """One test case: a prompt and the path of its reference photo (RGBA, alpha = the subject)."""

    case_id: str
    prompt: str
    ref_path: str
    motion: str
    background: str = ""
    photo_scale: float = 1.0  # the subject's size in the photo / its size in the clip (case_spec: 1.6-2.2)


# ----------------------------------------------------------------------------------------------- cases


def case_spec(i: int, seed: int) -> tuple[synthetic.ClipSpec, float, float]:
    """Case i's clip (a new subject, motion i % 4, background kind (i // 4) % 4, embedded-set sizes) and the
    scale and angle of its product photo; deterministic by (seed, i)."""
    rng = np.random.default_rng([seed, i])
    data = synthetic.SyntheticConfig()
    background, hue = synthetic.sample_background(rng, data)
    background.kind = BACKGROUNDS[(i // len(MOTIONS)) % len(BACKGROUNDS)]
    subject = synthetic.sample_subject(rng, hue, data.subject_radius, data.texture_freq,
                                       synthetic.subject_min_luma(background, data))
    motion = synthetic.sample_motion(rng, kind=MOTIONS[i % len(MOTIONS)], jitter=data.path_jitter,
                                     distance=data.slide_distance)
    noun = str(rng.choice(synthetic.NOUNS))
    spec = synthetic.ClipSpec(int(seed) * 1000 + i, background, [subject], [motion], noun,
                              synthetic.make_caption(noun, [motion], background), data)
    # Another scale and angle than in the clips (clip scales stay near 1), on a plain white table.
    return spec, float(rng.uniform(1.6, 2.2)), float(rng.uniform(-45, 45))


def make_cases(out_dir: Path, n: int, seed: int, photo_size: int = 128) -> list[Case]:
    """Render n unseen subjects as product photos with identity-free prompts (deterministic by seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        spec, scale, angle = case_spec(i, seed)
        image, mask = synthetic.render_subject(spec.subjects[0], photo_size, photo_size, scale=scale, angle=angle,
                                               background=(255, 255, 255))
        rgba = np.concatenate([image, (mask * 255).astype(np.uint8)[..., None]], axis=-1)
        path = out_dir / f"case{i:03d}.png"
        Image.fromarray(rgba, "RGBA").save(path)
        cases.append(Case(f"case{i:03d}", spec.caption, str(path), spec.motions[0].kind, spec.background.kind, scale))
    (out_dir / "cases.json").write_text(json.dumps([dataclasses.asdict(c) for c in cases], indent=1))
    return cases


def real_videos(n: int, seed: int, frames: int, fps: float, height: int, width: int) -> list[torch.Tensor]:
    """The cases' clips as the training data path sees clips: rendered at the embedded set's size, written
    as mp4 and decoded at the run's frames / fps / size  # -> [F, 3, H, W] in [-1, 1] each (the "real clips" row)."""
    from saber_pl.video import decode_clip, encode_mp4

    out = []
    for i in range(n):
        spec, _, _ = case_spec(i, seed)
        mp4 = encode_mp4(synthetic.render_clip(spec), spec.cfg.fps, crf=spec.cfg.crf)
        clip = decode_clip(mp4, frames, fps, height, width, start=0)  # uint8 [F, 3, H, W]
        out.append(clip.float() / 127.5 - 1.0)
    return out


# ----------------------------------------------------------------------------------------------- training


class TrainingCut(RuntimeError):
    """A benchmark run stopped before its last step (the time cap): not scored until it is finished."""


class StaleRun(TrainingCut):
    """A stored benchmark run trained under another config than today's recipe: not scored."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what saber_pl.train checkpoints on (faults.Preemption)


def run_forwarding_stop_signals(cmd: list[str], env: dict[str, str]) -> int | None:
    """Run `cmd` to its end, passing SIGTERM / SIGUSR1 sent to this process on to it -> the stop signal
    received, or None. Raises CalledProcessError when it fails.

    Why: `kill <bench pid>` (or a scheduler's time limit) would otherwise end the benchmark alone and
    leave its training child running on the cores; forwarded, the child checkpoints and exits 0
    (faults.Preemption), and the benchmark stops after it. Ctrl-C reaches the whole process group already.
    """
    received: list[int] = []
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)
    return received[0] if received else None


# keys that change where a run writes or when it stops early, not what it learns
RUN_ONLY_KEYS = ("logging.", "trainer.max_time_minutes", "trainer.ckpt_every_n_steps", "trainer.keep_top_k")


def check_run_matches(run_dir: Path, exp: str, scale: str, overrides: list[str]) -> None:
    """Refuse to score (or resume) a stored run whose config is not today's recipe for `exp`: after a
    change of a default, a finished run of the old recipe would otherwise be scored as the new one."""
    from saber_pl.config import load_config, to_dict
    from saber_pl.export import load_run_config

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    stored, today = flat(to_dict(load_run_config(run_dir))), flat(to_dict(load_config(exp, scale, overrides)))
    differ = sorted(k for k in stored.keys() | today.keys()
                    if not k.startswith(RUN_ONLY_KEYS) and stored.get(k) != today.get(k))
    if differ:
        shown = ", ".join(f"{k}: {stored.get(k)!r} -> {today.get(k)!r}" for k in differ[:6])
        raise StaleRun(f"{run_dir} was trained with another config than today's {exp} ({shown}"
                          f"{', ...' if len(differ) > 6 else ''}): move or delete it to retrain, or pass --out "
                          f"for a new folder")


def train(exp: str, cfg: BenchConfig) -> dict:
    """Train one experiment in a subprocess (resumable: a finished run is not trained again)."""
    from saber_pl.train import resume_step

    run_dir = Path(cfg.out) / f"{exp}-{cfg.scale}"
    done = run_dir / "train_done.json"
    overrides = [f"logging.runs_dir={cfg.out}", *cfg.train_overrides]
    if (run_dir / "config.yaml").is_file():
        check_run_matches(run_dir, exp, cfg.scale, overrides)
    if done.is_file():
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "saber_pl.train", "--exp", exp, "--scale", cfg.scale, *overrides]
    log.info("training %s: %s", exp, " ".join(cmd))
    partial = run_dir / "train_partial.json"  # wall time of earlier, cut attempts (a resumed run adds to it)
    before = json.loads(partial.read_text())["train_minutes"] if partial.is_file() else 0.0
    t0 = time.perf_counter()
    stopped = run_forwarding_stop_signals(cmd, dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    minutes = before + (time.perf_counter() - t0) / 60
    from saber_pl.export import load_run_config

    run_cfg = load_run_config(run_dir)
    steps = resume_step(run_dir / "checkpoints" / "last.ckpt")
    info = {"experiment": exp, "train_minutes": round(minutes, 2), "steps": steps,
            "samples_per_s": round(steps * run_cfg.data.batch_size / max(minutes * 60, 1e-9), 2)}
    if stopped is not None:
        # asked to stop: the child checkpointed; stop here too, scoring nothing (a finished run is scored next time)
        if run_cfg.trainer.max_steps is None or steps >= run_cfg.trainer.max_steps:
            done.write_text(json.dumps(info))
        else:
            partial.write_text(json.dumps(info))
        raise TrainingCut(f"{exp}: stopped by {signal.Signals(stopped).name} at step {steps}; "
                          f"{run_dir / 'checkpoints' / 'last.ckpt'} holds it. Run the same command again to continue")
    if run_cfg.trainer.max_steps is not None and steps < run_cfg.trainer.max_steps:
        # a run cut short (the time cap) is not the experiment: never score it as a row
        partial.write_text(json.dumps(info))
        raise TrainingCut(
            f"{exp}: training stopped at step {steps} of {run_cfg.trainer.max_steps} (trainer.max_time_minutes="
            f"{run_cfg.trainer.max_time_minutes}), so it is not scored. Run the same command again to continue "
            f"from {run_dir / 'checkpoints' / 'last.ckpt'}, or raise the cap (trainer.max_time_minutes=30); "
            f"a slow or shared machine is the usual cause (two trainings at once on 2 cores run ~6x slower)")
    partial.unlink(missing_ok=True)
    done.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------- evaluation


def generate_videos(gen: Generator, run_dir: Path, cases: list[Case], cfg: BenchConfig, use_refs: bool
                    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One video per case from the run's loaded `Generator`
    # -> videos [F, 3, H, W] in [-1, 1], refs [N, 3, H, W], masks [N, 1, H, W]."""
    from saber_pl.sampling import SamplerConfig

    video = gen.defaults
    sampler = SamplerConfig(steps=cfg.steps, guidance=run_guidance(run_dir, cfg), shift=gen_shift(run_dir),
                            scheduler=cfg.scheduler, guidance_interval=run_interval(run_dir, cfg),
                            reference_guidance=run_reference_guidance(run_dir, cfg))
    refs, masks = case_references(cases, video.height, video.width, cfg.reference_scale,
                                  gen.sample.reference_size)  # [N, 3, H, W], [N, 1, H, W]
    videos = []
    for i, case in enumerate(cases):
        r, m = (refs[i:i + 1], masks[i:i + 1]) if use_refs else (None, None)
        out = gen.generate([case.prompt], r, m, video, sampler, seed=i, progress=False)[0]  # [3, F, H, W]
        videos.append(out.permute(1, 0, 2, 3))  # [F, 3, H, W], the metrics' layout
    return videos, refs, masks


def run_reference_size(run_dir: Path, cfg: BenchConfig) -> float | None:
    """The subject size a run's references are prepared at: its sample.reference_size under "photo", else None."""
    from saber_pl.export import load_run_config

    return load_run_config(run_dir).sample.reference_size if cfg.reference_scale == "photo" else None


def run_guidance(run_dir: Path, cfg: BenchConfig) -> float:
    """The CFG scale a run is scored at: the bench's --guidance, else the run's own sample.guidance."""
    from saber_pl.export import load_run_config

    return cfg.guidance if cfg.guidance is not None else load_run_config(run_dir).sample.guidance


def run_reference_guidance(run_dir: Path, cfg: BenchConfig) -> float:
    """The reference guidance a run is scored at: the bench's --reference-guidance, else the run's own."""
    from saber_pl.export import load_run_config

    if cfg.reference_guidance is not None:
        return cfg.reference_guidance
    return load_run_config(run_dir).sample.reference_guidance


def run_interval(run_dir: Path, cfg: BenchConfig) -> tuple[float, float]:
    """The guided noise levels: the bench's --guidance-interval, else the run's own sample.guidance_interval."""
    from saber_pl.export import load_run_config

    if cfg.guidance_interval is not None:
        return tuple(cfg.guidance_interval)  # type: ignore[return-value]
    return tuple(load_run_config(run_dir).sample.guidance_interval)  # type: ignore[return-value]


def gen_shift(run_dir: Path) -> float:
    """Sample with the flow shift the run trained with."""
    from saber_pl.export import load_run_config

    return load_run_config(run_dir).flow.shift


def retrieval_pools(n: int, candidates: int) -> list[list[int]]:
    """Case i's candidate references: its own first, then the next candidates-1 cases' (wrapping)."""
    return [[(i + j) % n for j in range(candidates)] for i in range(n)]


def retrieval_accuracy(scores: torch.Tensor, candidates: int) -> float:
    """Video i against its own reference i and the next candidates-1 cases' references  # scores [V, V].
    A hit needs the own score finite and strictly above every distractor's (no subject = -inf = a miss)."""
    return float(np.mean(retrieval_case_hits(scores, candidates)))


def retrieval_case_hits(scores: torch.Tensor, candidates: int) -> list[float]:
    """1.0 where video i's own reference wins its pool (`retrieval_pools`), else 0.0  # scores [V, V]."""
    pools = retrieval_pools(scores.shape[0], candidates)
    return [float(retrieval_hits(scores[i, pool][None], [0])[0]) for i, pool in enumerate(pools)]


# (key, column, what it is): every figure is a mean over cases of a per-case value
METRICS = [
    ("subject", "subject found ↑", "one distinct moving subject is found (scene.find_subject)"),
    ("text_following", "text following ↑", "it moves the prompted way (left/right/up/down)"),
    ("background", "background kind ↑", "the background is the prompted kind (plain/stripes/gradient/checker)"),
    ("identity", "identity acc ↑", "the subject's colours pick its own reference among N (chance 1/N)"),
    ("frames_ok", "frames as real ↑", "sharpness, flicker and tiling all inside the range of the cases' real clips"),
    ("copy_paste", "copy-paste", "the reference pasted pixel-aligned at its place and scale (1 = verbatim; found subjects)"),
    ("gray_halo", "gray halo ↓", "neutral-gray rim around the subject (the gray fill of a reference; found subjects)"),
    ("reads_direction", "reads direction ↑", "held-out loss increase with the direction word swapped (0 = ignored)"),
    ("reads_background", "reads background ↑", "the same with the background word swapped"),
    ("sharpness", "sharpness", "mean |luma gradient| of the frames"),
    ("flicker", "flicker ↓", "mean frame-to-frame change of the background"),
    ("tiling", "tiling ↓", "median luma step across the DiT's token borders over the step elsewhere (1 = no mosaic)"),
]
FRAME_STATS = ("sharpness", "flicker", "tiling")  # frames_ok: each inside the real clips' range


def per_case(videos: list[torch.Tensor], refs: torch.Tensor, masks: torch.Tensor, cases: list[Case],
             candidates: int, tile: int) -> dict[str, list[float]]:
    """Every metric but frames_ok for every case (NaN where it does not apply: copy-paste and gray halo
    without a found subject). `tile`: the DiT's token size in pixels (`token_tile`)."""
    scfg = SceneConfig()
    rows = [describe(v, c.prompt, scfg, tile) for v, c in zip(videos, cases)]
    scores = identity_scores(videos, refs, masks, scfg)  # [V, N]
    return {
        "subject": [float(r["present"]) for r in rows],
        "text_following": [float(bool(r["direction_match"])) for r in rows],
        "background": [float(bool(r["background_match"])) for r in rows],
        "identity": retrieval_case_hits(scores, candidates),
        # a palette wash is "close" to the reference pixel-wise too: copy-paste only judges a found subject
        "copy_paste": [copy_paste_score(v, r, m) if row["present"] else math.nan
                       for v, r, m, row in zip(videos, refs, masks, rows)],
        "gray_halo": [float(r["gray_halo"]) if r["present"] else math.nan for r in rows],
        "sharpness": [float(r["sharpness"]) for r in rows],
        "flicker": [float(r["flicker"]) for r in rows],
        "tiling": [float(r["tiling"]) for r in rows],
    }


def token_tile(model: ModelConfig) -> int:
    """Pixels per side of one DiT token: the autoencoder's spatial factor x the patch's (mini: 2 x 2)."""
    from saber_pl.generate import vae_factors

    return vae_factors(model)[0] * int(model.spec.dit["patch_size"][-1])


def reading_per_case(gen: Generator, clips: torch.Tensor, cases: list[Case]) -> dict[str, list[float]]:
    """How much worse the DiT predicts each case's real clip with its direction / background word swapped
    (`caption_probe`): 0 = the word is ignored  # clips [N, 3, F, H, W]."""
    prompts = [c.prompt for c in cases]
    return {"reads_direction": caption_reliance(gen, clips, prompts, DIRECTION_SWAPS),
            "reads_background": caption_reliance(gen, clips, prompts, BACKGROUND_SWAPS)}


def with_frames_ok(values: dict[str, list[float]], real_range: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    """`values` plus frames_ok: 1.0 where sharpness, flicker and tiling all lie inside the real clips' range
    (a statistic the range lacks, or NaN in it, is not checked: ranges stored before tiling existed)."""
    keys = [k for k in FRAME_STATS if k in real_range and not math.isnan(real_range[k][0])]
    inside = lambda k, x: real_range[k][0] <= x <= real_range[k][1]  # noqa: E731
    ok = [float(all(inside(k, values[k][i]) for k in keys)) for i in range(len(values["sharpness"]))]
    return values | {"frames_ok": ok}


def frame_range(values: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """The range (min to max) of sharpness, flicker and tiling over the cases' real clips whose subject was found.

    Flicker is measured outside the found subject's swept region; on a real clip where the tracker
    misses the subject (1 of 96: a dim subject on a gradient) it counts the moving subject as flicker
    (0.036 against <= 0.0016 on the other 95), and that one clip let videos flickering 20x more than
    real ones pass as "frames as real".
    """
    found = np.asarray(values["subject"], dtype=float) > 0.5
    if not found.any():
        raise ValueError("no real clip has a found subject: the scene metrics cannot measure frames")
    return {k: (float(np.nanmin(np.asarray(values[k])[found])), float(np.nanmax(np.asarray(values[k])[found])))
            for k in FRAME_STATS if k in values}


def bootstrap(values: list[float], resamples: int, seed: int = 0) -> dict[str, float]:
    """Mean over cases with a percentile bootstrap 95 % interval (torchmetrics' BootStrapper; NaNs dropped)."""
    from torchmetrics.aggregation import MeanMetric
    from torchmetrics.wrappers import BootStrapper

    x = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
    if x.numel() == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boot = BootStrapper(MeanMetric(), num_bootstraps=resamples, quantile=torch.tensor([0.025, 0.975]),
                            sampling_strategy="multinomial")
        boot.update(x)
        lo, hi = boot.compute()["quantile"].tolist()
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": int(x.numel())}


def summarise(values: dict[str, list[float]], cfg: BenchConfig) -> dict[str, dict[str, float]]:
    return {k: bootstrap(v, cfg.bootstraps, seed=i) for i, (k, v) in enumerate(values.items())}


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


def case_references(cases: list[Case], height: int, width: int, reference_scale: str = "photo",
                    reference_size: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cases' photos prepared by the inference path (segment, gray fill, size)  # [N, 3, H, W], [N, 1, H, W].

    "photo": at the run's `reference_size` (`ReferenceConfig.subject_size`; None = the paper's fit); "fit":
    the paper's fit whatever the run says; "clip": the fit shrunk about the frame's centre by 1 / photo_scale,
    so its subject shows at the size it has in the case's clip (`BenchConfig.reference_scale`)."""
    from saber_pl.references import ReferenceConfig, prepare_references

    if reference_scale not in REFERENCE_SCALES:
        raise ValueError(f"reference_scale must be one of {REFERENCE_SCALES}, got {reference_scale!r}")
    size = reference_size if reference_scale == "photo" else None
    refs, masks = prepare_references([c.ref_path for c in cases], ReferenceConfig(
        height=height, width=width, max_references=len(cases), subject_size=size))
    if reference_scale != "clip":
        return refs, masks
    pairs = [shrink_about_centre(refs[i], masks[i], 1.0 / c.photo_scale) for i, c in enumerate(cases)]
    return torch.stack([r for r, _ in pairs]), torch.stack([m for _, m in pairs])


def shrink_about_centre(ref: torch.Tensor, mask: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared reference scaled by `factor` <= 1 about the frame's centre, gray around it.

    ref float [3, H, W] in [-1, 1] (0 = gray), mask float {0, 1} [1, H, W] -> the same shapes."""
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"factor must be in (0, 1], got {factor}")
    _, h, w = ref.shape
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    small = F.interpolate(ref[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    m = (F.interpolate(mask[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0] > 0.5).float()
    top, left = (h - nh) // 2, (w - nw) // 2
    out_ref, out_mask = torch.zeros_like(ref), torch.zeros_like(mask)
    out_ref[:, top:top + nh, left:left + nw] = small * m  # gray (0) outside the shrunk mask
    out_mask[:, top:top + nh, left:left + nw] = m
    return out_ref, out_mask


def evaluate(exp: str, cases: list[Case], cfg: BenchConfig, real_range: dict[str, tuple[float, float]]) -> dict:
    """Generate and score one trained experiment; writes <out>/<exp>-<scale>/bench.json and bench_grid.png."""
    from saber_pl.export import load_run_config

    run_dir = Path(cfg.out) / f"{exp}-{cfg.scale}"
    out = run_dir / f"bench{_suffix(cfg)}.json"
    settings = eval_settings(cfg) | {"guidance": run_guidance(run_dir, cfg),
                                     "guidance_interval": list(run_interval(run_dir, cfg)),
                                     "reference_size": run_reference_size(run_dir, cfg),
                                     "reference_guidance": run_reference_guidance(run_dir, cfg)}
    if out.is_file() and out.stat().st_mtime >= (run_dir / "train_done.json").stat().st_mtime:
        old = json.loads(out.read_text())
        if old.get("settings") == settings:  # same run, same cases and sampler: reuse
            return {k: v for k, v in old.items() if k != "settings"}
    from saber_pl.generate import Generator

    run_cfg = load_run_config(run_dir)
    data = run_cfg.data
    gen = Generator.from_checkpoint(run_dir)
    use_refs = data.refs_max > 0
    videos, refs, masks = generate_videos(gen, run_dir, cases, cfg, use_refs)
    values = with_frames_ok(per_case(videos, refs, masks, cases, cfg.candidates, token_tile(run_cfg.model)), real_range)
    clips = torch.stack(real_videos(len(cases), cfg.seed, data.num_frames, data.fps, data.height, data.width))
    values |= reading_per_case(gen, clips.permute(0, 2, 1, 3, 4), cases)  # [N, 3, F, H, W]
    result = {"metrics": summarise(values, cfg), "per_case": values, "references_used": use_refs,
              "guidance": settings["guidance"], "guidance_interval": settings["guidance_interval"],
              "reference_size": settings["reference_size"], "reference_guidance": settings["reference_guidance"]}
    save_grid(run_dir / f"bench_grid{_suffix(cfg)}.png", videos, refs, cfg.grid_cases)
    out.write_text(json.dumps(result | {"settings": settings}, indent=1))
    return result


def real_row(cases: list[Case], cfg: BenchConfig, exp: str) -> dict:
    """The metrics on the cases' real clips (rendered and decoded as training data): what a perfect model
    scores, and the range of frame statistics a generated video must fall in."""
    from saber_pl.export import load_run_config

    run_cfg = load_run_config(Path(cfg.out) / f"{exp}-{cfg.scale}")
    data = run_cfg.data
    videos = real_videos(len(cases), cfg.seed, data.num_frames, data.fps, data.height, data.width)
    refs, masks = case_references(cases, data.height, data.width, cfg.reference_scale, run_cfg.sample.reference_size)
    values = per_case(videos, refs, masks, cases, cfg.candidates, token_tile(run_cfg.model))
    real_range = frame_range(values)
    values = with_frames_ok(values, real_range)
    save_grid(Path(cfg.out) / f"real_grid{_suffix(cfg)}.png", videos, refs, cfg.grid_cases)
    return {"metrics": summarise(values, cfg), "range": real_range}


def _suffix(cfg: BenchConfig) -> str:
    """File-name suffix of a diagnostic protocol, so it never overwrites the benchmark's own files."""
    return "" if cfg.reference_scale == "photo" else f"_{cfg.reference_scale}"


def eval_settings(cfg: BenchConfig) -> dict:
    """What a stored bench.json depends on besides the run itself."""
    keys = ("cases", "candidates", "seed", "steps", "guidance", "scheduler", "photo_size", "bootstraps",
            "reference_scale")
    return {k: getattr(cfg, k) for k in keys} | {"metrics_version": METRICS_VERSION}


# ----------------------------------------------------------------------------------------------- report


METRICS_VERSION = 7  # bump when a metric changes: stored bench.json files are then re-scored


def _cell(m: dict[str, float] | None) -> str:
    if not m or m.get("n", 0) == 0 or math.isnan(m["mean"]):
        return "—"
    digits = 2 if abs(m["hi"]) >= 0.1 else 3  # flicker and halo live near 0
    return f"{m['mean']:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"


def _guidance_note(rows: dict[str, dict], cfg: BenchConfig) -> str:
    """The CFG scale(s) the rows were scored at (one value, or each run's) and the guided noise levels."""
    if cfg.guidance is not None:
        note = f"{cfg.guidance}"
    else:
        used = sorted({r["guidance"] for r in rows.values() if "guidance" in r})
        note = f"{used[0]} (each run's sample.guidance)" if len(used) == 1 else f"each run's sample.guidance ({used})"
    intervals = sorted({tuple(r.get("guidance_interval", (0.0, 1.0))) for r in rows.values()})
    if intervals and intervals != [(0.0, 1.0)]:
        note += " at noise levels t in " + ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in intervals)
    ref_scales = sorted({r.get("reference_guidance", 1.0) for r in rows.values() if r.get("references_used", True)})
    if ref_scales and ref_scales != [1.0]:
        note += ", reference guidance " + ", ".join(f"{v:g}" for v in ref_scales)
    return note


def _reference_note(rows: dict[str, dict], cfg: BenchConfig) -> str:
    """How the table's references were sized (the photo shows the subject at 1.6-2.2x its clip size)."""
    if cfg.reference_scale == "clip":
        return "each fitted photo shrunk to the subject's size in its clip (oracle diagnostic, --reference-scale clip)."
    fitted = ("each photo prepared by the paper's inference path (segmented, fitted to the frame: the subject at "
              "1.6-2.2x its size in the clip)")
    sizes = sorted({r.get("reference_size") for r in rows.values()}, key=lambda v: (v is not None, v or 0.0))
    if cfg.reference_scale == "fit" or sizes == [None]:
        return fitted + "."
    shown = ", ".join("fit" if v is None else f"{v:g}" for v in sizes)
    return (f"each photo segmented and its subject's bounding box shown at the run's sample.reference_size "
            f"({shown} of the frame; 'fit' = {fitted}).")


def results_table(rows: dict[str, dict], cfg: BenchConfig, real: dict | None = None) -> str:
    """Markdown table, one row per experiment (the shape of the paper's ablation table), each figure with
    its bootstrap 95 % interval over the cases; the first row scores the cases' real clips."""
    head = "| experiment | " + " | ".join(c[1] for c in METRICS) + " | train min | samples/s |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 3)]
    table = ({"real clips": real} if real else {}) | rows
    for exp, r in table.items():
        cells = [_cell(r["metrics"].get(k)) for k, _, _ in METRICS]
        extra = [f"{r[k]:.1f}" if isinstance(r.get(k), (int, float)) else "—" for k in ("train_minutes", "samples_per_s")]
        lines.append(f"| {exp} | " + " | ".join(cells + extra) + " |")
    notes = [f"{cfg.cases} unseen test subjects (product photos), one video each; mean [95 % bootstrap interval, "
             f"{cfg.bootstraps} resamples of the cases]. Identity: N = {cfg.candidates} candidates (chance "
             f"{1.0 / cfg.candidates:.3f}). Sampler: {cfg.scheduler}, {cfg.steps} steps, CFG {_guidance_note(rows, cfg)}.",
             "References: " + _reference_note(rows, cfg)]
    if real:
        rs, rf = real["range"]["sharpness"], real["range"]["flicker"]
        rt = real["range"].get("tiling", (math.nan, math.nan))
        notes.append(f"Real clips' range: sharpness {rs[0]:.3f}-{rs[1]:.3f}, flicker {rf[0]:.4f}-{rf[1]:.4f}, "
                     f"tiling {rt[0]:.2f}-{rt[1]:.2f}.")
    notes += [f"- {title}: {what}" for _, title, what in METRICS]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def run(cfg: BenchConfig) -> Path:
    """Train (resumably), evaluate and report every experiment; returns the results.md path."""
    out = Path(cfg.out)
    cases = make_cases(out / "cases", cfg.cases, cfg.seed, cfg.photo_size)
    rows: dict[str, dict] = {}
    real: dict | None = None
    for exp in cfg.experiments:
        info = train(exp, cfg)
        real = real or real_row(cases, cfg, exp)
        rows[exp] = evaluate(exp, cases, cfg, real["range"]) | info
        log.info("%s: %s", exp, {k: _cell(v) for k, v in rows[exp]["metrics"].items()})
        (out / f"results{_suffix(cfg)}.md").write_text(results_table(rows, cfg, real))
    (out / f"results{_suffix(cfg)}.json").write_text(json.dumps({"real clips": real} | rows, indent=1))
    return out / f"results{_suffix(cfg)}.md"


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
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at noise levels t in [LO, HI]; default: each run's sample.guidance_interval")
    p.add_argument("--reference-guidance", type=float, default=None, metavar="SCALE",
                   help="guidance on the references alone (1 = off); default: each run's sample.reference_guidance")
    p.add_argument("--scheduler", default=BenchConfig.scheduler, choices=["unipc", "euler"])
    p.add_argument("--bootstraps", type=int, default=BenchConfig.bootstraps)
    p.add_argument("--reference-scale", default=BenchConfig.reference_scale, choices=REFERENCE_SCALES,
                   help="photo: the inference path at each run's sample.reference_size; fit: the paper's fit of "
                        "the whole photo to the frame; clip: the fit shrunk to the subject's size in its clip "
                        "(an oracle diagnostic of scale generalisation)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    a = p.parse_args(argv)
    try:
        cfg = BenchConfig(out=a.out, scale=a.scale, experiments=[e for e in a.experiments.split(",") if e],
                          cases=a.cases, candidates=a.candidates, steps=a.steps, guidance=a.guidance, scheduler=a.scheduler,
                          guidance_interval=a.guidance_interval, reference_guidance=a.reference_guidance,
                          bootstraps=a.bootstraps, reference_scale=a.reference_scale, train_overrides=a.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        print(run(cfg))
    except TrainingCut as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
