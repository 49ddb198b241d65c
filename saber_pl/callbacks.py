"""Training callbacks: TensorBoard media (references, masks, sample videos) and data-skip counters.

Media are written by rank 0 only. Videos go to TensorBoard as animated GIF image summaries, the
format ``SummaryWriter.add_video`` writes; it is built here with Pillow because ``add_video``
needs moviepy (and its 1.x API), which this project does not depend on.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

log = logging.getLogger(__name__)


def to_uint8(x: Tensor) -> np.ndarray:
    """[-1, 1] float -> uint8 numpy, same layout."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()


def reference_grid(refs: Tensor, masks: Tensor, counts: Tensor, max_samples: int = 4) -> np.ndarray:
    """One row per sample: each real reference next to its mask  # -> uint8 [H', W', 3].

    refs [B, K, 3, H, W] in [-1, 1], masks [B, K, 1, H, W] in {0, 1}, counts [B].
    """
    b, k, _, h, w = refs.shape
    rows = []
    for i in range(min(b, max_samples)):
        tiles = []
        for j in range(max(k, 1)):
            if j < int(counts[i]):
                ref = to_uint8(refs[i, j]).transpose(1, 2, 0)
                mask = (masks[i, j, 0].float().cpu().numpy() * 255).astype(np.uint8)
                tiles += [ref, np.repeat(mask[:, :, None], 3, axis=2)]
            else:
                tiles += [np.zeros((h, w, 3), np.uint8)] * 2
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def gif_bytes(video: np.ndarray, fps: int) -> bytes:
    """uint8 [F, H, W, 3] -> animated GIF bytes (Pillow)."""
    from PIL import Image

    frames = [Image.fromarray(f) for f in video]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / max(fps, 1)),
                   loop=0)
    return buf.getvalue()


def add_video(writer: Any, tag: str, video: np.ndarray, step: int, fps: int) -> None:
    """Write a video summary (GIF-encoded image, as ``SummaryWriter.add_video`` does)  # video uint8 [F, H, W, 3]."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    f, h, w, c = video.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(video, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def _tb_writer(trainer: L.Trainer) -> Any | None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class MediaLogger(L.Callback):
    """Masked references every N steps; data-skip counters; sample videos at validation."""

    def __init__(self, image_every_n_steps: int, val_videos: int, val_fps: int) -> None:
        self.image_every_n_steps = image_every_n_steps
        self.val_videos = val_videos
        self.val_fps = val_fps
        self._val_batch: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "skip_counts"):
            for reason, n in dm.skip_counts().items():
                pl_module.log(f"data/skipped_{reason}", float(n), batch_size=1, rank_zero_only=True)
        step = trainer.global_step
        if step % self.image_every_n_steps == 1 or self.image_every_n_steps == 1:
            self._log_references(trainer, batch, step)

    @rank_zero_only
    def _log_references(self, trainer: L.Trainer, batch: dict[str, Any], step: int) -> None:
        writer = _tb_writer(trainer)
        if writer is None or batch["refs"].shape[1] == 0:
            return
        grid = reference_grid(batch["refs"], batch["ref_masks"], batch["ref_counts"])
        writer.add_image("train/references", grid, step, dataformats="HWC")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0:
            self._val_batch = batch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_batch is None or trainer.sanity_checking or self.val_videos < 1:
            return
        # Generation runs on every rank (FSDP2 collectives need all of them); rank 0 writes.
        videos = pl_module.generate_validation_videos(self._val_batch, self.val_videos)
        self._write_videos(trainer, videos, self._val_batch)
        self._val_batch = None

    @rank_zero_only
    def _write_videos(self, trainer: L.Trainer, videos: Tensor, batch: dict[str, Any]) -> None:
        writer = _tb_writer(trainer)
        if writer is None:
            return
        for i, video in enumerate(videos):  # [3, F, H, W] in [-1, 1]
            frames = to_uint8(video).transpose(1, 2, 3, 0)  # [F, H, W, 3]
            add_video(writer, f"val/sample_{i}", frames, trainer.global_step, self.val_fps)
            writer.add_text(f"val/prompt_{i}", batch["caption"][i] or "(empty)", trainer.global_step)
        if batch["refs"].shape[1] > 0:
            grid = reference_grid(batch["refs"][: len(videos)], batch["ref_masks"][: len(videos)],
                                  batch["ref_counts"][: len(videos)])
            writer.add_image("val/references", grid, trainer.global_step, dataformats="HWC")


class SessionTimer(Timer):
    """Lightning's `Timer` whose cap (`trainer.max_time_minutes`) applies to each invocation: the elapsed time
    of the run that wrote the checkpoint is not restored, which would stop a resumed run at its first step."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None
