"""Checkpoint safety: atomic sharded checkpoints under FSDP2, ``last.ckpt`` as a link, finding the resume point.

Single-file checkpoints are written by Lightning through an fsspec transaction (``_atomic_save``: a
temp file in the system temp folder, then a move, which is a copy when that folder is on another
filesystem). Either way ``last.ckpt`` only moves to a checkpoint after its write has finished, so a
kill mid-write leaves at worst an unlinked partial step file. Lightning's ``ModelParallelStrategy``
writes its distributed-checkpoint *folder* in place, so a kill during the write would leave a half
folder where the previous checkpoint was. ``AtomicModelParallelStrategy`` writes into ``<name>.tmp`` and
swaps folders only after every rank finished, so the previous checkpoint stays usable.

Each step's state is written once: ``last.ckpt`` is a relative symlink to the step checkpoint
(``SaberCheckpoint``), replaced atomically (a new link renamed over the old one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor

LAST = "last.ckpt"


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose sharded checkpoints appear atomically (write to tmp, then rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(final.name + ".tmp")
        if self.global_rank == 0:
            remove_path(tmp)
        self.barrier("saber_ckpt_tmp_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("saber_ckpt_written")
        if self.global_rank == 0:
            swap_in(tmp, final)
        self.barrier("saber_ckpt_swapped")

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            remove_path(Path(filepath))


class SaberCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` links to the newest step checkpoint, always at the final step.

    With ``save_top_k`` and ``save_last`` Lightning writes every saved state twice (the top-k checkpoint
    and ``last.ckpt``: ~170 GB each at 14B). Here the state is written once under its step name and
    ``last.ckpt`` is a relative symlink to it. When top-k keeps nothing at a step where ``last`` is due
    (a val/loss outside the best k, the end of training, a pre-emption), that step is written once
    under its step name and linked; it is removed when the link moves on and top-k does not hold it.
    A checkpoint the link points at is removed by top-k only after the link has moved.

    Lightning's own ``save_last="link"`` is not used: it links to the previous save when the monitored
    top-k skips the current step (``last.ckpt`` would go back in time), it deletes the old link before
    making the new one and top-k deletes the link's target before the relink (a kill in between leaves
    no ``last.ckpt``: the restart would begin at step 0).

    Lightning also skips the end-of-fit ``last`` save once any ``last`` was written during the run, so a
    run stopped by ``max_time`` (or a ``max_steps`` between two periodic saves) would lose its final
    steps; here ``last.ckpt`` moves to the final step whenever it is newer than the last save.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[str] = []  # top-k removals of the link's target, done once the link moved

    @property
    def last_path(self) -> Path:
        assert self.dirpath is not None
        return Path(self.dirpath) / LAST

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path is not None:  # resumed: the restored step is on disk already
            self._last_global_step_saved = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step > self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def save_last_now(self, trainer: L.Trainer) -> Path:
        """Make ``last.ckpt`` hold the current step (pre-emption); nothing is written if it already does."""
        if trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_path

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if not self.save_last:
            return
        link = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        previous = link_target(Path(link))
        self.last_model_path = link  # before saving: it is part of the callback state
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved:
            target = self._last_checkpoint_saved  # top-k wrote this step
        else:
            target = self.format_checkpoint_name(monitor_candidates)  # write this step once, under its name
            self._save_checkpoint(trainer, target)
        if trainer.is_global_zero:
            point_link(Path(link), Path(target))
        trainer.strategy.barrier("saber_last_linked")
        stale = [*self._deferred, *([str(previous)] if previous is not None else [])]
        self._deferred = []
        kept = [target, *self.best_k_models]
        for path in stale:
            if not any(_same(path, k) for k in kept) and self._should_remove_checkpoint(trainer, path, target):
                super()._remove_checkpoint(trainer, path)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = link_target(self.last_path)
        if self.save_last and target is not None and _same(filepath, target):
            self._deferred.append(filepath)  # removed after `last.ckpt` points elsewhere
            return
        super()._remove_checkpoint(trainer, filepath)


def link_target(link: Path) -> Path | None:
    """The resolved target of a symlink, None when ``link`` is not one."""
    return Path(os.path.realpath(link)) if link.is_symlink() else None


def point_link(link: Path, target: Path) -> None:
    """Make ``link`` a relative symlink to ``target`` atomically (a real file or folder there is swapped out)."""
    tmp = link.with_name(link.name + ".link")
    remove_path(tmp)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    if link.is_dir() and not link.is_symlink():
        swap_in(tmp, link)  # a folder cannot be renamed over: keep `.old` until the link is in place
    else:
        os.replace(tmp, link)


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (never what it points at) or a folder; nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with at most a window where only ``final.old`` exists (resume handles it)."""
    old = final.with_name(final.name + ".old")
    remove_path(old)
    if final.exists() or final.is_symlink():
        final.rename(old)
    tmp.rename(final)
    remove_path(old)


def find_resume_checkpoint(ckpt_dir: Path | str) -> Path | None:
    """The checkpoint a restarted run continues from: ``last.ckpt`` (file, sharded folder or a link to one),
    else its ``.old`` copy left by a kill between the two renames of a swap, else None."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / LAST
    if last.exists() and _complete(last):
        return last
    old = ckpt_dir / (LAST + ".old")
    if old.exists() and _complete(old):
        return old
    return None


def _same(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _complete(path: Path) -> bool:
    """A folder checkpoint is complete when its distributed-checkpoint metadata exists."""
    if path.is_file():
        return path.stat().st_size > 0
    return (path / ".metadata").is_file()
