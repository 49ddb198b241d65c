"""OpenS2V-Eval harness: case files, resumable generation, and the benchmark's Total from raw metric files.

Matches the benchmark's own repository (PKU-YuanGroup/OpenS2V-Nexus, ``eval/``, v1.1):

- case files ``<root>/{Open-Domain,Human-Domain,Single-Domain}_Eval.json`` map a case id
  (``singleobj_1`` ...) to ``{"img_paths": [...relative to <root>], "prompt", "class_label", "synthesis_flag"}``;
- generated videos go flat into one folder as ``<case_id>.mp4`` (the scripts' ``--input_video_folder``);
- the scripts write raw per-video JSON files into one folder (``aesthetic_score.json``,
  ``motion_amplitude.json``, ``motion_smoothness.json``, ``facesim.json``, ``gmescore.json``,
  ``nexusscore.json``, ``naturalscore_{1,2,3}.json``) that ``merge_result.py`` turns into the Total.
  `aggregate` re-implements that merge exactly (clip per video, mean, then scale; weights per domain).

Usage::

    cases = load_cases("data/OpenS2V-Eval", "Open-Domain")
    summary = generate_cases(cases, "runs/saber_full/opens2v/videos", generate, seed=42)
    # ... run the benchmark's get_*.py scripts on the videos folder, writing into .../raw ...
    python -m saber_pl.eval.opens2v aggregate --domain Open-Domain --raw runs/saber_full/opens2v/raw \\
        --out runs/saber_full/opens2v/Open-Domain.json --table runs/saber_full/opens2v/table.md
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import av
from tqdm import tqdm

log = logging.getLogger(__name__)

DOMAINS = ("Open-Domain", "Human-Domain", "Single-Domain")
CASE_KEYS = ("img_paths", "prompt")
SCENE_DIRS = ("/scene/", "/environment/")  # OpenS2V folders that hold background-scene references

GenerateFn = Callable[[str, list[str], str, int], None]  # (prompt, ref_paths, out_path, seed) -> writes out_path


@dataclass
class OpenS2VConfig:
    """Where the benchmark lives and how videos are generated for it."""

    root: str = "data/OpenS2V-Eval"  # local OpenS2V-Eval folder: <domain>_Eval.json and Images/
    domain: Literal["Open-Domain", "Human-Domain", "Single-Domain"] = "Open-Domain"  # which case file
    video_dir: str = "runs/opens2v/videos"  # flat folder of <case_id>.mp4 (the scripts' input_video_folder)
    seed: int = 42  # (ours) one seed for every case, so a resumed run gives the same videos
    fail_fast: bool = False  # stop at the first failed case instead of recording it and going on

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        if not self.root:
            raise ValueError("root must name the local OpenS2V-Eval folder")
        if not self.video_dir:
            raise ValueError("video_dir must name the output folder")


# ---------------------------------------------------------------------------------------------------
# cases


@dataclass
class OpenS2VCase:
    """One benchmark prompt with its reference images (absolute paths)."""

    case_id: str  # e.g. "multiobject_30"; the video must be <case_id>.mp4
    prompt: str
    img_paths: list[str]  # absolute paths of the reference images
    class_labels: list[str] = field(default_factory=list)  # one label per image (used by NexusScore)
    synthesis_flag: str = ""  # as in the case file

    @property
    def ref_kinds(self) -> list[str]:
        """Per image: 'scene' for background images (OpenS2V's scene/environment folders), else 'subject'."""
        return [reference_kind(p) for p in self.img_paths]


def reference_kind(img_path: str) -> str:
    """OpenS2V keeps background-scene references under scene/ or environment/ folders."""
    path = "/" + img_path.replace("\\", "/")
    return "scene" if any(d in path for d in SCENE_DIRS) else "subject"


def case_file(root: str | Path, domain: str) -> Path:
    """Path of a domain's case file, e.g. <root>/Open-Domain_Eval.json."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    return Path(root) / f"{domain}_Eval.json"


def load_cases(root: str | Path, domain: str, check_images: bool = True) -> list[OpenS2VCase]:
    """Read a case file; image paths are resolved against `root` (and checked to exist)."""
    path = case_file(root, domain)
    if not path.is_file():
        raise FileNotFoundError(f"OpenS2V case file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping case ids to cases")
    cases = []
    for case_id, entry in data.items():
        missing = [k for k in CASE_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{path}: case {case_id} lacks {missing}")
        img_paths = [str(Path(root) / p) for p in entry["img_paths"]]
        if check_images:
            for p in img_paths:
                if not Path(p).is_file():
                    raise FileNotFoundError(f"{path}: case {case_id} reference image not found: {p}")
        cases.append(OpenS2VCase(case_id, entry["prompt"], img_paths, list(entry.get("class_label", [])),
                                 str(entry.get("synthesis_flag", ""))))
    return cases


# ---------------------------------------------------------------------------------------------------
# generation


def video_is_readable(path: str | Path) -> bool:
    """Whether `path` is a video whose first frame decodes (a crashed run leaves unreadable files)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return False
            next(container.decode(video=0))
        return True
    except (av.error.FFmpegError, OSError, StopIteration, ValueError):
        return False


@dataclass
class GenerationSummary:
    """Which cases were generated now, skipped (already done) or failed (with the error)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"done {len(self.done)}, skipped {len(self.skipped)}, failed {len(self.failed)}"
        return text + "".join(f"\n  failed {k}: {v}" for k, v in self.failed.items())


def generate_cases(
    cases: list[OpenS2VCase],
    video_dir: str | Path,
    generate: GenerateFn,
    seed: int = 42,
    fail_fast: bool = False,
    progress: bool = True,
) -> GenerationSummary:
    """Write <video_dir>/<case_id>.mp4 for every case; cases whose video already decodes are skipped."""
    video_dir = Path(video_dir)
    video_dir.mkdir(parents=True, exist_ok=True)
    summary = GenerationSummary()
    bar = tqdm(cases, desc="OpenS2V generate", unit="video", disable=not progress)
    for case in bar:
        out = video_dir / f"{case.case_id}.mp4"
        if out.exists() and video_is_readable(out):
            summary.skipped.append(case.case_id)
            continue
        try:
            out.unlink(missing_ok=True)  # a partial file from a crashed run
            generate(case.prompt, list(case.img_paths), str(out), seed)
            if not video_is_readable(out):
                raise RuntimeError(f"generate wrote no readable video at {out}")
            summary.done.append(case.case_id)
        except Exception as exn:  # one bad case must not stop a 180-video run
            out.unlink(missing_ok=True)
            if fail_fast:
                raise
            summary.failed[case.case_id] = f"{type(exn).__name__}: {exn}"
            log.warning("OpenS2V case %s failed: %s", case.case_id, exn)
        bar.set_postfix(done=len(summary.done), skipped=len(summary.skipped), failed=len(summary.failed))
    log.info("OpenS2V generation: %s", summary)
    return summary


def run_generation(cfg: OpenS2VConfig, generate: GenerateFn, progress: bool = True) -> GenerationSummary:
    """Load the configured domain's cases and generate them into `cfg.video_dir`."""
    cases = load_cases(cfg.root, cfg.domain)
    return generate_cases(cases, cfg.video_dir, generate, cfg.seed, cfg.fail_fast, progress)


# ---------------------------------------------------------------------------------------------------
# aggregation (merge_result.py of OpenS2V-Eval v1.1)


@dataclass(frozen=True)
class MetricSpec:
    """One Total term: its raw file and field, per-video clipping and the scaling range of the mean."""

    key: str  # name in merge_result.py's output JSON
    column: str  # table column
    file: str  # raw output file written by the benchmark's get_*.py script
    field: str  # field of each per-video entry
    low: float  # scaled = (mean - low) / (high - low)
    high: float
    script: str  # the script that writes `file`


METRICS = (
    MetricSpec("aes_score", "Aesthetics", "aesthetic_score.json", "aes_score", 4.0, 7.0, "get_aesscore.py"),
    MetricSpec("motion_smoothness", "MotionSmoothness", "motion_smoothness.json", "motion_smoothness", 0.0, 1.0,
               "get_motion_smoothness.py"),
    MetricSpec("motion_amplitude", "MotionAmplitude", "motion_amplitude.json", "motion_fb", 0.0, 1.0,
               "get_motion_amplitude.py"),
    MetricSpec("facesim_cur", "FaceSim", "facesim.json", "cur_score", 0.0, 1.0, "get_facesim.py"),
    MetricSpec("gme_score", "GmeScore", "gmescore.json", "gme_score", 0.0, 1.0, "get_gmescore.py"),
    MetricSpec("nexus_score", "NexusScore", "nexusscore.json", "nexus_score", 0.0, 0.05, "get_nexusscore.py"),
    MetricSpec("natural_score", "NaturalScore", "naturalscore_{1,2,3}.json", "", 1.0, 5.0, "get_naturalscore.py"),
)
NATURAL_FILES = ("naturalscore_1.json", "naturalscore_2.json", "naturalscore_3.json")

# Total weights; merge_result.py uses the Open-Domain weights for every domain but Human-Domain.
WEIGHTS = {
    "Open-Domain": {"aes_score": 0.16, "motion_smoothness": 0.06, "motion_amplitude": 0.02, "facesim_cur": 0.20,
                    "gme_score": 0.12, "nexus_score": 0.20, "natural_score": 0.24},
    "Human-Domain": {"aes_score": 0.18, "motion_smoothness": 0.09, "motion_amplitude": 0.03, "facesim_cur": 0.25,
                     "gme_score": 0.15, "natural_score": 0.30},
}

# The paper's Open-Domain rows (SABER.md), in percent.
PAPER_ROWS = {
    "Kling1.6": {"total_score": 56.23, "nexus_score": 45.89, "facesim_cur": 40.10, "natural_score": 74.59},
    "Phantom-14B": {"total_score": 56.77, "nexus_score": 37.43, "facesim_cur": 51.46, "natural_score": 69.35},
    "VACE-14B": {"total_score": 57.55, "nexus_score": 44.08, "facesim_cur": 55.09, "natural_score": 67.04},
    "BindWeave": {"total_score": 57.61, "nexus_score": 46.84, "facesim_cur": 53.71, "natural_score": 66.85},
    "Saber (paper)": {"total_score": 57.91, "nexus_score": 47.22, "facesim_cur": 49.89, "natural_score": 72.55},
}


def domain_weights(domain: str) -> dict[str, float]:
    """The Total's weights for a domain (Single-Domain shares Open-Domain's, as in merge_result.py)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    return WEIGHTS["Human-Domain" if domain == "Human-Domain" else "Open-Domain"]


def clip_value(key: str, x: float) -> float | None:
    """Per-video clipping of merge_result.py; None = left out of the mean (NexusScore zeros)."""
    if key == "aes_score":
        return max(min(x, 7.0), 4.0)
    if key in ("motion_smoothness", "motion_amplitude"):
        return min(abs(x), 1.0)
    if key in ("facesim_cur", "gme_score"):
        return min(x, 1.0)  # no lower clip in the benchmark
    if key == "nexus_score":
        return None if x == 0 else min(x, 0.05)  # zeros = nothing detected; no lower clip either
    if key == "natural_score":
        return max(min(x, 5.0), 1.0)
    raise ValueError(f"unknown OpenS2V metric {key!r}")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping video ids to scores")
    return data


def _read_field(path: Path, field_name: str) -> dict[str, float]:
    """{video_id: {field: value, ...}} -> {video_id: value}."""
    out = {}
    for vid, entry in _read_json(path).items():
        if not isinstance(entry, dict) or field_name not in entry:
            raise ValueError(f"{path}: entry {vid} has no {field_name!r}")
        out[vid] = float(entry[field_name])
    return out


def _read_natural(paths: list[Path]) -> dict[str, float]:
    """Per-video mean of the available 1-5 judgements (stored as strings such as "4")."""
    votes: dict[str, list[float]] = {}
    for path in paths:
        for vid, value in _read_json(path).items():
            if value is None:
                continue
            try:
                votes.setdefault(vid, []).append(float(value))
            except (TypeError, ValueError) as exn:
                raise ValueError(f"{path}: entry {vid} is {value!r}, not a 1-5 score; rerun get_naturalscore.py "
                                 "for it") from exn
    return {vid: sum(v) / len(v) for vid, v in votes.items() if v}


def load_raw_scores(raw_dir: str | Path, domain: str) -> dict[str, dict[str, float]]:
    """Read the raw per-video files a domain's Total needs: {metric key: {video id: raw value}}."""
    raw_dir = Path(raw_dir)
    weights = domain_weights(domain)
    scores, missing = {}, []
    for spec in METRICS:
        if spec.key not in weights:
            continue
        if spec.key == "natural_score":
            paths = [raw_dir / name for name in NATURAL_FILES if (raw_dir / name).is_file()]
            if not paths:
                missing.append(f"{spec.file} ({spec.script})")
                continue
            scores[spec.key] = _read_natural(paths)
        elif (raw_dir / spec.file).is_file():
            scores[spec.key] = _read_field(raw_dir / spec.file, spec.field)
        else:
            missing.append(f"{spec.file} ({spec.script})")
    if missing:
        raise FileNotFoundError(f"raw OpenS2V scores missing in {raw_dir}: {', '.join(missing)}")
    return scores


def aggregate(raw: dict[str, dict[str, float]], domain: str) -> dict[str, float]:
    """Clip each video's value, average, scale to [0, 1], weight: merge_result.py's output dict.

    A metric with no (kept) video averages to 0 before scaling, as in the benchmark.
    """
    weights = domain_weights(domain)
    result = {"total_score": 0.0}
    for spec in METRICS:
        if spec.key not in weights:
            continue
        kept = [c for c in (clip_value(spec.key, x) for x in raw.get(spec.key, {}).values()) if c is not None]
        mean = sum(kept) / len(kept) if kept else 0.0
        result[spec.key] = (mean - spec.low) / (spec.high - spec.low)
    result["total_score"] = sum(w * result[k] for k, w in weights.items())
    return result


def aggregate_folder(raw_dir: str | Path, domain: str) -> dict[str, float]:
    """`aggregate` of the raw files in `raw_dir`."""
    return aggregate(load_raw_scores(raw_dir, domain), domain)


def markdown_table(result: dict[str, float], domain: str, name: str = "saber_pl (ours)") -> str:
    """Our row (in percent) beside the paper's Open-Domain rows; columns the paper omits show '—'."""
    keys = ["total_score"] + [s.key for s in METRICS if s.key in domain_weights(domain)]
    columns = ["Total"] + [s.column for s in METRICS if s.key in domain_weights(domain)]
    lines = [f"OpenS2V-Eval {domain} (scores in %)", "", "| model | " + " | ".join(columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    if domain == "Open-Domain":
        for model, row in PAPER_ROWS.items():
            cells = [f"{row[k]:.2f}" if k in row else "—" for k in keys]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append(f"| {name} | " + " | ".join(f"{100 * result[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """`aggregate`: raw metric folder -> merge_result.py's JSON and a markdown table."""
    parser = argparse.ArgumentParser(prog="python -m saber_pl.eval.opens2v")
    sub = parser.add_subparsers(dest="command", required=True)
    agg = sub.add_parser("aggregate", help="compute the Total from the benchmark's raw per-video JSON files")
    agg.add_argument("--domain", choices=DOMAINS, default="Open-Domain")
    agg.add_argument("--raw", required=True, help="folder with aesthetic_score.json, facesim.json, ...")
    agg.add_argument("--out", help="write merge_result.py's JSON here")
    agg.add_argument("--table", help="write the markdown table here")
    agg.add_argument("--name", default="saber_pl (ours)", help="our row's name in the table")
    args = parser.parse_args(argv)
    result = aggregate_folder(args.raw, args.domain)
    table = markdown_table(result, args.domain, args.name)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=4))
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
