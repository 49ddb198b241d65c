"""Evaluation entry point: ``python -m saber_pl.eval {generate,aggregate} ...``.

    # 1. one <case_id>.mp4 per OpenS2V case (resumable: videos that already decode are skipped)
    python -m saber_pl.eval generate --ckpt runs/saber_full-14B --wan-dir /ckpt/Wan2.1-T2V-14B-Diffusers \\
        --birefnet-dir /ckpt/BiRefNet --cases data/OpenS2V-Eval --domain Open-Domain \\
        --out runs/saber_full-14B/opens2v/videos
    # 2. the benchmark's own get_*.py scripts on that folder, writing raw JSON into .../raw
    # 3. the Total (merge_result.py v1.1) and a table beside the paper's rows
    python -m saber_pl.eval aggregate --domain Open-Domain --raw runs/saber_full-14B/opens2v/raw \\
        --out runs/saber_full-14B/opens2v/Open-Domain.json --table runs/saber_full-14B/opens2v/table.md

`generate` wraps `saber_pl.generate.Generator` in the harness's ``generate(prompt, ref_paths, out_path,
seed)`` callable: images under OpenS2V's scene/ or environment/ folders are used whole, the others are
subjects segmented by BiRefNet (``--birefnet-dir``) unless they carry an alpha channel. Every case is
checked (files, reference count, a way to segment each subject, video size) before the model loads, and
the model loads only when a case is left to generate. `aggregate` is
``python -m saber_pl.eval.opens2v aggregate``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from saber_pl.eval import opens2v
from saber_pl.eval.opens2v import DOMAINS, OpenS2VCase, OpenS2VConfig, load_cases, reference_kind, run_generation
from saber_pl.generate import (
    CheckpointSource,
    Generator,
    Limits,
    VideoSpec,
    add_model_args,
    check_source,
    model_limits,
    request_from_args,
    resolve_checkpoint,
    subject_size,
    torch_dtype,
)
from saber_pl.references import AutoSegmenter, Reference, ReferenceConfig, load_image
from saber_pl.sampling import SamplerConfig

log = logging.getLogger("saber_pl.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saber_pl.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate the OpenS2V-Eval videos with a Saber checkpoint")
    add_model_args(gen)
    gen.add_argument("--cases", required=True, help="local OpenS2V-Eval folder (<domain>_Eval.json, Images/)")
    gen.add_argument("--domain", choices=DOMAINS, default="Open-Domain")
    gen.add_argument("--out", required=True, help="flat folder of <case_id>.mp4 (the scripts' input_video_folder)")
    gen.add_argument("--seed", type=int, default=42, help="one seed for every case")
    gen.add_argument("--fail-fast", action="store_true", help="stop at the first failed case")
    sub.add_parser("aggregate", add_help=False,
                   help="the Total from the benchmark's raw JSON files (python -m saber_pl.eval.opens2v aggregate)")
    return p


def opens2v_references(paths: list[str]) -> list[Reference]:
    """OpenS2V's scene/ and environment/ images are used whole; the others are subjects."""
    return [Reference(p, kind=reference_kind(p)) for p in paths]


def preflight(cases: list[OpenS2VCase], limits: Limits, video: VideoSpec, birefnet_dir: str | None) -> None:
    """Raise ValueError listing the cases that cannot run: too many references, or a subject with no
    segmentation (no BiRefNet folder and no alpha channel). Reads the images, loads no model."""
    limits.check(video, 0)
    if birefnet_dir and not Path(birefnet_dir).is_dir():
        raise FileNotFoundError(f"BiRefNet folder not found: {birefnet_dir}")
    chooser = AutoSegmenter(birefnet=None)
    problems = []
    for case in cases:
        refs = opens2v_references(case.img_paths)
        if len(refs) > limits.max_refs:
            problems.append(f"{case.case_id}: {len(refs)} references, model.max_refs={limits.max_refs}")
        if birefnet_dir:
            continue
        for ref in refs:
            if ref.kind == "subject":
                try:
                    chooser.choose(load_image(ref.path), ref)
                except ValueError:
                    problems.append(f"{case.case_id}: subject {ref.path} has no alpha channel and no --birefnet-dir")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError("cases that cannot be generated:\n  " + "\n  ".join(problems[:10]) + more)


class OpenS2VGenerate:
    """The harness's `generate(prompt, ref_paths, out_path, seed)`, loading the model on its first call."""

    def __init__(self, source: CheckpointSource, video: VideoSpec, sampler: SamplerConfig, refs_cfg: ReferenceConfig,
                 negative_prompt: str = "", device: str = "cpu", raw: bool = False, dtype_name: str = "auto") -> None:
        self.source, self.video, self.sampler, self.refs_cfg = source, video, sampler, refs_cfg
        self.negative_prompt, self.device, self.raw, self.dtype_name = negative_prompt, device, raw, dtype_name
        self.generator: Generator | None = None

    def __call__(self, prompt: str, ref_paths: list[str], out_path: str, seed: int) -> None:
        if self.generator is None:
            self.generator = Generator.from_source(self.source, self.device, self.raw,
                                                   torch_dtype(self.dtype_name, self.device))
        self.generator.generate_to_file([prompt], opens2v_references(ref_paths), out_path, self.video, self.sampler,
                                        seed, self.negative_prompt, self.refs_cfg, save_extras=False, progress=False)


def run_generate(args: argparse.Namespace) -> int:
    try:  # everything that needs no model
        source = resolve_checkpoint(args.ckpt, args.wan_dir)
        check_source(source, args.raw)
        video, sampler = request_from_args(args, source)
        limits = model_limits(source.model)
        cases = load_cases(args.cases, args.domain)
        preflight(cases, limits, video, args.birefnet_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    refs_cfg = ReferenceConfig(height=video.height, width=video.width, birefnet_dir=args.birefnet_dir,
                               device=args.device, max_references=limits.max_refs,
                               subject_size=subject_size(args, source))
    generate = OpenS2VGenerate(source, video, sampler, refs_cfg, args.negative_prompt, args.device, args.raw,
                               args.dtype)
    cfg = OpenS2VConfig(root=args.cases, domain=args.domain, video_dir=args.out, seed=args.seed,
                        fail_fast=args.fail_fast)
    summary = run_generation(cfg, generate)
    print(summary)
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "aggregate":  # the existing command, flags and all
        opens2v.main(argv)
        return 0
    args = build_parser().parse_args(argv)
    return run_generate(args)


if __name__ == "__main__":
    sys.exit(main())
