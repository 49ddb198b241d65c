"""Checkpoint safety: atomic sharded checkpoints under FSDP2 and finding the checkpoint to resume.

Single-file checkpoints are already written atomically by Lightning (``_atomic_save`` writes through
an fsspec transaction: temp file, then move). Lightning's ``ModelParallelStrategy`` writes its
distributed-checkpoint *folder* in place, so a kill during the write would leave a half folder
where the previous checkpoint was. ``AtomicModelParallelStrategy`` writes into ``<name>.tmp`` and
swaps folders only after every rank finished, so the previous checkpoint stays usable.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

LAST = "last.ckpt"


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose sharded checkpoints appear atomically (write to tmp, then rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(final.name + ".tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("saber_ckpt_tmp_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("saber_ckpt_written")
        if self.global_rank == 0:
            swap_in(tmp, final)
        self.barrier("saber_ckpt_swapped")

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()


class SaberCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that always leaves ``last.ckpt`` at the final step.

    Lightning skips the end-of-fit ``last`` save once any ``last`` was written during the run, so a
    run stopped by ``max_time`` (or a ``max_steps`` between two periodic saves) would lose its
    final steps; here ``last.ckpt`` is rewritten whenever the final step is newer than the last save.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step > self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)


def swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with at most a window where only ``final.old`` exists (resume handles it)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def find_resume_checkpoint(ckpt_dir: Path | str) -> Path | None:
    """The checkpoint a restarted run continues from: ``last.ckpt`` (file or sharded folder), else its
    ``.old`` copy left by a kill between the two renames of a swap, else None."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / LAST
    if last.exists() and _complete(last):
        return last
    old = ckpt_dir / (LAST + ".old")
    if old.exists() and _complete(old):
        return old
    return None


def _complete(path: Path) -> bool:
    """A folder checkpoint is complete when its distributed-checkpoint metadata exists."""
    if path.is_file():
        return path.stat().st_size > 0
    return (path / ".metadata").is_file()
