"""Train Saber: ``python -m saber_pl.train --exp EXP --scale SCALE [key.sub=value ...]``.

Launch commands (see README.md):

    make train                                   # saber_full at scale mini, embedded data, CPU, minutes
    make ablate EXP=ellipse_only                 # saber_full + the ablation's delta, same scale
    make train EXP=saber_full SCALE=14B WAN_DIR=/ckpt/Wan2.1-T2V-14B-Diffusers \\
        SHARDS='/data/shards-{000000..000999}.tar'   # the paper's run (torchrun / SLURM env for multi-node)
    python -m saber_pl.train --exp saber_full --scale tiny --dry-run   # print the resolved config, exit

The run folder is ``runs/<exp>-<scale>/`` (same on every rank): ``config.yaml`` (written before
step 0), ``checkpoints/`` (``stepNNNNNNN.ckpt`` top-k, ``last.ckpt`` a link to the newest; sharded
folders under FSDP2), ``tb/`` (TensorBoard).
Re-running the same command resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import yaml

from saber_pl.config import ConfigError, ExperimentConfig, dump_config, load_config, save_config
from saber_pl.paths import ROOT

log = logging.getLogger("saber_pl.train")

REAL_SCALES = ("1.3B", "14B")


class SetupError(RuntimeError):
    """A missing input (weights, shards) the user must provide; the message names the variable to set."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="saber_full", help="experiment (experiments/<exp>.yaml)")
    p.add_argument("--scale", default="mini", help="scale (experiments/scales/<scale>.yaml)")
    p.add_argument("--wan-dir", default=None, help="local Wan2.1 diffusers folder (WAN_DIR); needed at 1.3B/14B")
    p.add_argument("--shards", default=None, help="training shards (SHARDS): path, brace pattern or URL")
    p.add_argument("--val-shards", default=None, help="validation shards (VAL_SHARDS)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-resume", action="store_true", help="start from step 0 even if a checkpoint exists")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value (YAML values)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> ExperimentConfig:
    """Config from the experiment, the scale, the Make variables and the overrides."""
    overrides = list(args.overrides)
    if args.wan_dir:
        overrides.append(f"model.wan_dir={args.wan_dir}")
    if args.shards:
        overrides.append(f"data.train_shards={args.shards}")
    if args.val_shards:
        overrides.append(f"data.val_shards={args.val_shards}")
    return load_config(args.exp, args.scale, overrides)


def check_inputs(cfg: ExperimentConfig) -> None:
    """Fail early, with one message naming the variable to set, when weights or shards are missing."""
    if cfg.scale in REAL_SCALES or cfg.model.wan_dir is not None:
        wan = cfg.model.wan_dir
        if not wan:
            raise SetupError(f"scale {cfg.scale} needs Wan2.1 weights: set WAN_DIR=/path/to/Wan2.1-...-Diffusers "
                             f"(a local diffusers folder with transformer/, vae/, text_encoder/, tokenizer/)")
        needed = (("transformer",) if cfg.model.init != "random" else ()) + ("vae",) + (
            ("text_encoder", "tokenizer") if cfg.data.text == "online" else ())  # precomputed: no umT5 needed
        missing = [d for d in needed if not (Path(wan) / d).is_dir()]
        if missing:
            raise SetupError(f"WAN_DIR={wan} lacks {', '.join(missing)}/: set WAN_DIR to a Wan2.1 diffusers folder")
    shards = cfg.data.train_shards
    if not shards:
        raise SetupError(f"no training data for {cfg.run_name}: set SHARDS='/data/shards-{{000000..000099}}.tar'")
    if _is_local(shards) and not _local_shards_exist(shards):
        roots = " and ".join(dict.fromkeys((str(Path.cwd()), str(ROOT))))  # the CWD, then the checkout / install
        where = "" if os.path.isabs(shards) else f" (looked in {roots})"
        hint = " (run `make data` in the repo to build the embedded data set)" if "embedded" in shards else ""
        raise SetupError(f"training shards not found: {shards}{where}: set SHARDS to existing shards{hint}")


def _is_local(spec: str) -> bool:
    return "://" not in spec and not spec.startswith("pipe:")


def _local_shards_exist(spec: str) -> bool:
    from saber_pl.datamodule import expand_shards

    return all(Path(p).exists() for p in expand_shards(spec))


def resume_step(path: Path) -> int:
    """The global step stored in a checkpoint (file or sharded folder), read without loading the weights."""
    meta = path / "meta.pt" if path.is_dir() else path
    ckpt = torch.load(meta, map_location="cpu", weights_only=False, mmap=not path.is_dir())
    return int(ckpt.get("global_step", 0))


def build_trainer(cfg: ExperimentConfig, run_dir: Path) -> Any:
    """Lightning Trainer with the strategy, precision, logger and callbacks of the config."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy

    from saber_pl.callbacks import MediaLogger, SessionTimer
    from saber_pl.checkpoint import AtomicModelParallelStrategy, SaberCheckpoint
    from saber_pl.faults import FailFast, Preemption

    t = cfg.trainer
    on_gpu = torch.cuda.is_available() and t.accelerator != "cpu"
    precision = lightning_precision(t, on_gpu)
    if t.strategy == "fsdp2":
        # Pure data parallelism over every process (FSDP2 sharding), no tensor parallelism.
        strategy: Any = AtomicModelParallelStrategy(data_parallel_size=world_size(t, on_gpu), tensor_parallel_size=1,
                                                    save_distributed_checkpoint=True,
                                                    timeout=timedelta(seconds=t.collective_timeout_s))
    elif t.strategy == "ddp":
        strategy = DDPStrategy(timeout=timedelta(seconds=t.collective_timeout_s))
    else:
        strategy = t.strategy
    validate = t.val_every_n_steps is not None and cfg.data.val_shards is not None
    log_validation_plan(cfg, validate)
    ckpt = SaberCheckpoint(
        dirpath=run_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=t.ckpt_every_n_steps, save_last=True, save_top_k=t.keep_top_k,
        monitor="val/loss" if validate else "step", mode="min" if validate else "max",
        save_on_train_epoch_end=False)
    callbacks = [ckpt, LearningRateMonitor(logging_interval="step"),
                 MediaLogger(cfg.logging.image_every_n_steps, cfg.logging.val_videos, cfg.logging.val_fps),
                 FailFast(), Preemption(ckpt)]
    if t.max_time_minutes is not None:
        callbacks.append(SessionTimer(duration={"minutes": t.max_time_minutes}, interval="step"))
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="tb", default_hp_metric=False)
    return L.Trainer(
        accelerator="cpu" if t.accelerator == "cpu" else ("gpu" if on_gpu else "auto"),
        devices=t.devices, num_nodes=t.num_nodes, strategy=strategy, precision=precision,
        max_steps=t.max_steps, accumulate_grad_batches=accumulation(cfg, world_size(t, on_gpu)),
        log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_every_n_steps if validate else None,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches if validate else 0,
        num_sanity_val_steps=0, callbacks=callbacks, logger=logger, deterministic=t.deterministic,
        gradient_clip_val=None, enable_model_summary=True, use_distributed_sampler=False)


def log_validation_plan(cfg: ExperimentConfig, validate: bool) -> None:
    """Say at start-up what validation will do, so VAL_SHARDS never has a silent lack of effect."""
    t, lg = cfg.trainer, cfg.logging
    if cfg.data.val_shards is None:
        log.info("validation off: no data.val_shards (VAL_SHARDS)")
    elif not validate:
        log.warning("validation off: data.val_shards is set but trainer.val_every_n_steps is null; set "
                    "trainer.val_every_n_steps=N to compute val/loss every N steps")
    else:
        guidance = lg.val_guidance if lg.val_guidance is not None else cfg.sample.guidance
        videos = (f"{lg.val_videos} sample video(s) ({lg.val_sample_steps} steps, CFG {guidance})"
                  if lg.val_videos else "no sample videos (logging.val_videos=0)")
        log.info("validation every %d steps: val/loss on %d batch(es) of %s, %s", t.val_every_n_steps,
                 t.limit_val_batches, cfg.data.val_shards, videos)


def lightning_precision(t: Any, on_gpu: bool) -> str:
    """The precision plugin Lightning gets for `trainer.precision` (``auto``: bf16-mixed on GPU, else 32-true).

    Under ``fsdp2``, ``bf16-mixed`` is FSDP2's `MixedPrecisionPolicy` (bf16 all-gathered weights and compute,
    fp32 gradient reduction; parallel.shard_transformer) over fp32 sharded parameters, gradients, AdamW
    moments and EMA, so Lightning stays at ``32-true``: its ``bf16-true`` would cast the sharded module to
    bf16 after `configure_model` (and make bf16 the default dtype inside the step). ``bf16-true`` stays an
    explicit choice (bf16 weights and optimizer state: a step at lr 1e-5 mostly rounds away). Under ``ddp``
    ``bf16-mixed`` is Lightning's autocast over fp32 weights.
    """
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if on_gpu else "32-true")
    if t.strategy == "fsdp2" and precision == "bf16-mixed":
        return "32-true"
    if precision == "bf16-true":
        log.warning("trainer.precision=bf16-true: weights, AdamW moments and EMA are bf16; updates below bf16's "
                    "resolution (lr 1e-5 on weights ~0.02) are lost. bf16-mixed keeps fp32 master weights.")
    return precision


def accumulation(cfg: ExperimentConfig, world: int) -> int:
    """Micro-batches per optimizer step: ``trainer.global_batch / (world x data.batch_size)`` when the global
    batch is set (the recipe's 64 on 64 GPUs is 1, on 8 GPUs 8), else ``trainer.accumulate_grad_batches``."""
    t = cfg.trainer
    if t.global_batch is None:
        return t.accumulate_grad_batches
    per_step = world * cfg.data.batch_size
    if t.global_batch % per_step:
        raise ConfigError(f"trainer.global_batch={t.global_batch} is not a multiple of {world} rank(s) x "
                          f"data.batch_size={cfg.data.batch_size} = {per_step}: change the GPUs or the batch size")
    accumulate = t.global_batch // per_step
    if accumulate != t.accumulate_grad_batches:
        log.info("global batch %d = %d rank(s) x batch %d x accumulate_grad_batches %d", t.global_batch, world,
                 cfg.data.batch_size, accumulate)
    return accumulate


def world_size(t: Any, on_gpu: bool) -> int:
    """Processes in the run: devices per node (``auto`` = visible GPUs, or 1 CPU process) x nodes."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    devices = t.devices if isinstance(t.devices, int) else (max(torch.cuda.device_count(), 1) if on_gpu else 1)
    return devices * t.num_nodes


def build_datamodule(cfg: ExperimentConfig, tokenize: Any, seed_offset: int) -> Any:
    from saber_pl.datamodule import SaberDataModule

    import dataclasses

    data = dataclasses.replace(cfg.data, seed=cfg.data.seed + seed_offset)
    return SaberDataModule(data, cfg.masks, cfg.augment, tokenize, text_len=cfg.model.resolved_text_len)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = resolve(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_config(cfg))
        return 0
    try:
        check_inputs(cfg)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return fit(cfg, resume=not args.no_resume)
    except ConfigError as err:  # found while building the trainer (e.g. the global batch vs the world size)
        print(f"config error: {err}", file=sys.stderr)
        return 2


def fit(cfg: ExperimentConfig, resume: bool = True) -> int:
    """Build everything, resume from the last checkpoint if there is one, train."""
    import lightning as L

    from saber_pl.checkpoint import find_resume_checkpoint
    from saber_pl.module import SaberModule

    run_dir = cfg.run_dir
    ckpt_path = find_resume_checkpoint(run_dir / "checkpoints") if resume else None
    step0 = resume_step(ckpt_path) if ckpt_path is not None else 0
    if ckpt_path is not None:
        check_same_optimizer(run_dir / "config.yaml", cfg, ckpt_path)
    save_config(cfg, run_dir / "config.yaml")  # before step 0 (identical on every rank)
    L.seed_everything(cfg.trainer.seed + step0, workers=True)
    module = SaberModule(cfg)
    dm = build_datamodule(cfg, module.frozen.tokenize, seed_offset=step0)
    trainer = build_trainer(cfg, run_dir)
    if ckpt_path is not None:
        log.info("resuming %s from %s (step %d)", cfg.run_name, ckpt_path, step0)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
    warn_if_time_capped(trainer, cfg)
    return 0


def check_same_optimizer(saved_config: Path, cfg: ExperimentConfig, ckpt_path: Path) -> None:
    """Refuse to resume a run under another `optim.name`: its checkpoint holds the other optimizer's state,
    which cannot be loaded (and silently starting that optimizer fresh would not be the same run)."""
    if not saved_config.is_file():
        return
    before = (yaml.safe_load(saved_config.read_text()) or {}).get("optim", {}).get("name", "adamw")
    if before != cfg.optim.name:
        raise ConfigError(f"{ckpt_path} was trained with optim.name={before}, this run asks for "
                          f"optim.name={cfg.optim.name}: train into another folder (logging.runs_dir=...), "
                          f"or pass optim.name={before} to continue it")


def warn_if_time_capped(trainer: Any, cfg: ExperimentConfig) -> None:
    """Say loudly when `trainer.max_time_minutes` (a safety net) ended the run before `max_steps`."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is None or trainer.global_step >= cfg.trainer.max_steps:
        return
    left = timer.time_remaining("train")
    if left is not None and left <= 0:
        bar = "!" * 100
        log.warning("%s\nSTOPPED BY THE TIME CAP trainer.max_time_minutes=%g at step %d of %d: the schedule did not "
                    "finish (the LR never reached its floor). Re-run the same command to continue from last.ckpt, "
                    "or raise the cap.\n%s", bar, cfg.trainer.max_time_minutes, trainer.global_step,
                    cfg.trainer.max_steps, bar)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
