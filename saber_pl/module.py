"""SaberModule: the LightningModule that fine-tunes the Saber DiT with masked-frame references.

Per step (SABER.md): encode the clip with the frozen VAE, encode each augmented reference as a
one-frame video, build the reference coverage at latent resolution, draw t with Wan's shifted
schedule, z_t = (1 - t) z0 + t eps, predict the velocity and take the MSE against eps - z0 on the
video frames only. The VAE and text encoder are frozen and kept out of the state dict and the
optimizer; only the DiT trains (and is sharded with FSDP2 under ``strategy: fsdp2``).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from dataclasses import replace
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from saber_pl import loading
from saber_pl.config import ExperimentConfig
from saber_pl.flow import draw_flow_inputs, interpolate, per_sample_mse, step_seed, velocity_target
from saber_pl.optim import build_optimizer
from saber_pl.wan import Components, build_components, pretrained_dit, tokenize

log = logging.getLogger(__name__)


class FrozenParts:
    """Holds the frozen VAE and text encoder outside ``nn.Module`` registration.

    Keeping them unregistered keeps them out of checkpoints (5.7B umT5 parameters at 14B), out of
    the optimizer, out of FSDP sharding and out of EMA; the module moves them to its device itself.
    `text_encoder=False` (data.text=precomputed): no umT5 and no tokenizer (`text_encoder`, `tokenize` None).
    """

    def __init__(self, components: Components, text_encoder: bool = True) -> None:
        self.vae = components.vae
        self.text_encoder = components.text_encoder if text_encoder else None
        # A picklable tokenize(captions) -> (ids, mask) for dataloader workers (no encoder inside).
        self.tokenize = (functools.partial(tokenize, components.tokenizer, text_len=self.text_encoder.text_len)
                         if self.text_encoder is not None else None)

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.vae.to(device=device, dtype=dtype)
        if self.text_encoder is not None:
            self.text_encoder.to(device=device, dtype=dtype)


class SaberModule(L.LightningModule):
    """Trainable Saber DiT + frozen VAE / umT5, flow-matching loss on the video frames."""

    def __init__(self, cfg: ExperimentConfig, components: Components | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": _plain(cfg)})
        # fsdp2 + pretrained DiT: built on meta here, its shards loaded in configure_model (loading.py)
        self._dit_folder = loading.sharded_dit_folder(cfg) if components is None else None
        self.frozen: FrozenParts | loading.LazyFrozenParts
        online_text = cfg.data.text == "online"  # precomputed: umT5 is never built nor loaded on this rank
        if components is None and cfg.model.spec.pretrained:  # VAE / umT5 in bf16 on the device, at setup
            self.frozen = loading.LazyFrozenParts(cfg.model, text_encoder=online_text)
            self.dit = loading.meta_dit(cfg.model, self._dit_folder) if self._dit_folder else pretrained_dit(cfg.model)
        else:  # small seeded parts (tiny/mini); a wan_dir's DiT replaces the random one
            comps = components or build_components(replace(cfg.model, wan_dir=None) if self._dit_folder else cfg.model,
                                                   text_encoder=online_text)
            self.frozen = FrozenParts(comps, text_encoder=online_text)
            self.dit = loading.meta_dit(cfg.model, self._dit_folder) if self._dit_folder else comps.transformer
            for module in (self.frozen.vae, self.frozen.text_encoder):
                if module is None:
                    continue
                module.requires_grad_(False)
                module.eval()
        # EMA of the DiT as a registered, frozen copy: it is sharded like the DiT under FSDP2 and saved
        # and resumed with the model state (Lightning's EMAWeightAveraging copies the whole module,
        # frozen VAE and umT5 included, and cannot be sharded). A meta DiT gives a meta EMA (no memory).
        self.dit_ema = copy.deepcopy(self.dit).requires_grad_(False) if cfg.optim.ema else None
        self._sharded = False
        self._nonfinite_in_row = 0
        self._nonfinite_total = 0
        self._last_step_time: float | None = None
        self._micro_step, self._micro = -1, 0  # micro-batch counter within one optimizer step

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        """Shard the DiT with FSDP2 (per block + root) when the strategy gives a device mesh."""
        if self._sharded or self.cfg.trainer.strategy != "fsdp2":
            return
        from saber_pl.parallel import shard_transformer

        mesh = self.device_mesh
        # bf16 compute over fp32 master weights under bf16-mixed; bf16-true: Lightning casts the shards to
        # bf16 after this hook and FSDP2 computes in the stored dtype (no policy)
        param_dtype = None if self.cfg.trainer.precision == "bf16-true" else self.compute_dtype
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        for dit in (self.dit, self.dit_ema):
            if dit is not None:
                shard_transformer(dit, dp_mesh, param_dtype=param_dtype, reduce_dtype=torch.float32,
                                  activation_checkpointing=self.cfg.model.gradient_checkpointing and dit is self.dit)
        if self._dit_folder is not None:  # meta until now: each rank reads its own rows, the EMA copies them
            loading.load_local_shards(self.dit, self._dit_folder, self.device)
            if self.dit_ema is not None:
                loading.copy_local_shards(self.dit_ema, self.dit)
        self._sharded = True

    def setup(self, stage: str) -> None:
        self.frozen.to(self.device, self.compute_dtype)

    def on_fit_start(self) -> None:
        # The device is final here (setup may run before the strategy moved the module).
        self.frozen.to(self.device, self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 under the config's ``bf16-*`` precisions (``auto`` = bf16 on CUDA), else float32: the dtype of
        the frozen encoders and of the DiT's block compute. Read from the config, not from Lightning's plugin:
        under FSDP2 Lightning runs at ``32-true`` and the bf16 compute is FSDP2's (train.lightning_precision)."""
        precision = self.cfg.trainer.precision
        if precision == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return torch.bfloat16 if precision.startswith("bf16") else torch.float32

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        opt = build_optimizer(self.dit, o)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, o, self.cfg.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_text(self, batch: dict[str, Any]) -> Tensor:
        """umT5 embeddings, zero past each prompt: the batch's precomputed ones, else the frozen umT5's  # [B, L, D]."""
        if "text" in batch:  # data.text=precomputed: padded to text_len in collate
            return batch["text"].to(self.device, self.compute_dtype)
        if self.frozen.text_encoder is None:
            raise ValueError("data.text=precomputed but the batch has no 'text' (stored embeddings): no umT5 here")
        return self.frozen.text_encoder.encode(batch["input_ids"], batch["attention_mask"]).to(self.compute_dtype)

    @torch.no_grad()
    def encode_empty_text(self, n: int) -> Tensor:
        """The empty caption's embedding n times (the CFG negative): umT5's, or the stored one  # [n, L, D]."""
        if self.frozen.text_encoder is not None:
            ids, mask = self.frozen.tokenize([""] * n)
            return self.frozen.text_encoder.encode(ids.to(self.device), mask.to(self.device)).to(self.compute_dtype)
        from saber_pl.sidecars import load_empty_text

        emb = load_empty_text(self.cfg.data.text_sidecars)  # [L_0, D]
        out = emb.new_zeros(n, self.cfg.model.resolved_text_len, emb.shape[-1])
        out[:, : emb.shape[0]] = emb
        return out.to(self.device, self.compute_dtype)

    @torch.no_grad()
    def encode_video(self, video: Tensor) -> Tensor:
        """Normalised VAE latents of a clip  # [B, 3, F, H, W] -> [B, C, f, h, w]."""
        return self.frozen.vae.encode(video.to(self.compute_dtype))

    def clip_latents(self, batch: dict[str, Any]) -> Tensor:
        """The clip's latents: cached in the batch (data.latents=cached), else encoded now  # [B, C, f, h, w]."""
        if "latents" in batch:
            return batch["latents"].to(self.device, self.compute_dtype)
        return self.encode_video(batch["video"])

    @torch.no_grad()
    def encode_references(self, refs: Tensor, ref_masks: Tensor, ref_counts: Tensor) -> tuple[Tensor, Tensor]:
        """Each real reference through the VAE as a one-frame video; coverage = mask area per latent pixel.

        refs [B, K, 3, H, W], ref_masks [B, K, 1, H, W] -> latents [B, K, C, h, w], coverage [B, K, 1, h, w].
        Padded slots (k >= ref_counts[b]) are not encoded and stay zero.
        """
        vae = self.frozen.vae
        b, k, _, h, w = refs.shape
        fs = vae.spatial_factor
        lat = refs.new_zeros(b, k, vae.latent_channels, h // fs, w // fs, dtype=self.compute_dtype)
        real = torch.arange(k, device=refs.device)[None, :] < ref_counts[:, None]  # [B, K]
        if real.any():
            frames = refs[real].to(self.compute_dtype).unsqueeze(2)  # [N, 3, 1, H, W]
            lat[real] = vae.encode(frames)[:, :, 0]
        coverage = F.avg_pool2d(ref_masks.flatten(0, 1).float(), fs).view(b, k, 1, h // fs, w // fs)
        coverage = coverage * real[:, :, None, None, None]
        return lat, coverage.to(self.compute_dtype)

    # ------------------------------------------------------------------ loss
    def flow_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Flow-matching loss of one batch; returns the mean loss, per-sample losses and the t draws."""
        z0 = self.clip_latents(batch)  # [B, C, f, h, w]
        text = self.encode_text(batch)  # [B, L, D]
        ref_lat = ref_cov = counts = None
        if batch["ref_counts"].numel() and int(batch["ref_counts"].max()) > 0:
            counts = batch["ref_counts"]
            ref_lat, ref_cov = self.encode_references(batch["refs"], batch["ref_masks"], counts)
        z0 = z0.float()
        t, noise = draw_flow_inputs(self.cfg.flow, tuple(z0.shape), z0.device, generator)  # [B] and [B, C, f, h, w]
        zt = interpolate(z0, noise, t)  # float32; the DiT casts to its compute dtype
        pred = self.dit(zt, t * 1000.0, text, ref_lat, ref_cov, counts)  # [B, C, f, h, w]
        losses = per_sample_mse(pred, velocity_target(z0, noise))  # [B]
        return {"loss": losses.mean(), "losses": losses, "t": t, "tokens": self._token_count(z0, ref_cov)}

    def _token_count(self, z0: Tensor, ref_cov: Tensor | None) -> Tensor:
        """Video + valid reference tokens of the batch (what the packed attention computes)."""
        p = tuple(self.dit.wan.config.patch_size)
        video = z0.shape[0] * (z0.shape[2] // p[0]) * (z0.shape[3] // p[1]) * (z0.shape[4] // p[2])
        refs = 0
        if ref_cov is not None:
            pooled = F.avg_pool2d(ref_cov.flatten(0, 1).float(), (p[1], p[2]))
            refs = int((pooled >= self.cfg.model.valid_threshold).sum()) if self.cfg.model.ref_attn_mask \
                else int((pooled.sum((1, 2, 3)) > 0).sum()) * pooled.shape[-1] * pooled.shape[-2]
        return torch.tensor(float(video + refs))

    def step_generator(self) -> torch.Generator:
        """The generator of this micro-batch's t and noise, seeded by (seed, global rank, step, micro-batch)."""
        if self._micro_step != self.global_step:
            self._micro_step, self._micro = self.global_step, 0
        seed = step_seed(self.cfg.trainer.seed, self.global_rank, self.global_step, self._micro)
        self._micro += 1
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        out = self.flow_loss(batch, generator=self.step_generator())
        loss = out["loss"]
        finite = torch.isfinite(loss).float()
        # Every rank must agree, or a skipped backward on one rank hangs the collectives of the others.
        finite = self.trainer.strategy.reduce(finite, reduce_op="min") if self.trainer.world_size > 1 else finite
        if finite.item() < 1.0:
            return self._skip_nonfinite(loss)
        self._nonfinite_in_row = 0
        bsz = out["losses"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bsz, sync_dist=False)
        self._log_timestep_buckets(out["losses"].detach(), out["t"])
        self._log_throughput(bsz, float(out["tokens"]))
        return loss

    def _skip_nonfinite(self, loss: Tensor) -> None:
        self._nonfinite_in_row += 1
        self._nonfinite_total += 1
        self.log("train/skipped_nonfinite", float(self._nonfinite_total), batch_size=1)
        log.warning("non-finite loss %s at step %d: step skipped (%d in a row)", loss.item(), self.global_step,
                    self._nonfinite_in_row)
        limit = self.cfg.trainer.max_nonfinite_in_row
        if self._nonfinite_in_row >= limit:
            raise FloatingPointError(
                f"{self._nonfinite_in_row} non-finite losses in a row (limit trainer.max_nonfinite_in_row={limit}); "
                f"stopping. The weights were not updated by these steps: the last checkpoint is the last good one.")
        return None

    def _log_timestep_buckets(self, losses: Tensor, t: Tensor) -> None:
        n = self.cfg.logging.timestep_buckets
        bucket = (t * n).long().clamp(max=n - 1)
        for i in range(n):
            sel = bucket == i
            if sel.any():
                self.log(f"train/loss_t{i}", losses[sel].mean(), batch_size=int(sel.sum()))

    def _log_throughput(self, bsz: int, tokens: float) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            dt = max(now - self._last_step_time, 1e-9)
            world = self.trainer.world_size
            self.log("train/samples_per_s", bsz * world / dt, prog_bar=True, batch_size=1)
            self.log("train/tokens_per_s", tokens * world / dt, batch_size=1)
        self._last_step_time = now

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.trainer.seed + batch_idx)
        out = self.flow_loss(batch, generator=gen)
        self.log("val/loss", out["loss"], batch_size=out["losses"].shape[0], sync_dist=True)
        return out["loss"]

    # ------------------------------------------------------------------ gradients
    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by global norm (works on FSDP2 DTensor grads) and log the pre-clip norm."""
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.dit.parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm.float(), batch_size=1)

    # ------------------------------------------------------------------ EMA
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update of the step, so a checkpoint written at the end of the
        batch (callbacks run before the module's batch-end hook) holds the EMA of the same step."""
        super().optimizer_step(*args, **kwargs)
        if self.dit_ema is not None:
            self.update_ema(self.global_step + 1)  # global_step counts this step only after the hook

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """ema <- decay * ema + (1 - decay) * dit on the local fp32 shards after optimizer step `step`
        (a copy up to ``ema_start_step``)."""
        o = self.cfg.optim
        ema = [_local(p) for p in self.dit_ema.parameters()]
        cur = [_local(p) for p in self.dit.parameters()]
        if step <= o.ema_start_step:
            torch._foreach_copy_(ema, cur)
        else:
            torch._foreach_lerp_(ema, cur, 1.0 - o.ema_decay)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_validation_videos(self, batch: dict[str, Any], n: int) -> Tensor:
        """Sample videos for the first n validation samples from their references and prompts  # [n, 3, F, H, W]."""
        from saber_pl.sampling import sample_latents

        lg = self.cfg.logging
        sub = {k: (v[:n] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
        text = self.encode_text(sub)
        neg = self.encode_empty_text(text.shape[0]).to(text.dtype)
        ref_lat = ref_cov = counts = None
        if sub["ref_counts"].numel() and int(sub["ref_counts"].max()) > 0:
            counts = sub["ref_counts"]
            ref_lat, ref_cov = self.encode_references(sub["refs"], sub["ref_masks"], counts)
        shape = tuple(self.clip_latents(sub).shape)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.trainer.seed)
        cfg = self.cfg.sample.sampler(self.cfg.flow.shift, steps=lg.val_sample_steps, guidance=lg.val_guidance)
        dit = self.dit_ema if self.dit_ema is not None else self.dit
        was_training = dit.training
        dit.eval()
        latents = sample_latents(dit, shape, text, neg, ref_lat, ref_cov, counts, cfg, gen, progress=False)
        dit.train(was_training)
        return self.frozen.vae.decode(latents.to(self.compute_dtype)).float().clamp(-1, 1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["saber"] = {"nonfinite_total": self._nonfinite_total, "rng": _rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("saber", {})
        self._nonfinite_total = state.get("nonfinite_total", 0)
        if "rng" in state:
            _set_rng_state(state["rng"])


def lr_factor(o: Any, max_steps: int, step: int) -> float:
    """Multiplier of optim.lr at a step: linear warm-up, then constant or cosine down to min_lr_ratio."""
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _local(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 DTensor parameter (the tensor itself otherwise)."""
    t = t.data
    return t.to_local() if hasattr(t, "to_local") else t


def _plain(cfg: ExperimentConfig) -> dict[str, Any]:
    from saber_pl.config import to_dict

    return to_dict(cfg)


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    # Tensors and plain Python values only, so `torch.load(weights_only=True)` accepts the checkpoint.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
             int(has_gauss), float(gauss)], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only: see _set_rng_state
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    # One state for the current device. Older checkpoints hold a list per visible GPU (get_rng_state_all),
    # which cannot be restored when the GPUs per process change between runs (torchrun -> srun): take the
    # first. No draw that matters depends on it: t and noise come from step_generator, data and
    # augmentation from their own seeded generators.
    if isinstance(cuda, (list, tuple)):
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
