"""Wan2.1's flow-matching objective: shifted timestep sampling, interpolation and velocity target.

z_t = (1 - t) z_0 + t eps, target v = eps - z_0, MSE on the video tokens only (SABER.md). The shift
s maps a draw u in [0, 1] to t = s u / (1 + (s - 1) u), the same warp diffusers'
``FlowMatchEulerDiscreteScheduler`` applies with ``shift=s`` (Wan2.1 uses 5.0 for T2V at 480p/720p),
so training spends more steps at high noise, where the layout of the video is decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass
class FlowConfig:
    """Timestep distribution of the flow-matching loss."""

    shift: float = 5.0  # Wan's timestep shift (1.0 = no shift)
    sampling: Literal["uniform", "logit_normal"] = "uniform"  # distribution of u before the shift
    logit_mean: float = 0.0  # logit-normal location (sampling: logit_normal)
    logit_std: float = 1.0  # logit-normal scale (sampling: logit_normal)
    t_min: float = 0.0  # clamp of t, keeps the target defined at the ends
    t_max: float = 1.0
    # (ours) a share of the draws taken uniform in high_t_range instead, after the shift: where the input is
    # nearly pure noise and only the text can say where the subject is (the layout); 0 = off
    high_t_fraction: float = 0.0
    high_t_range: tuple[float, float] = (0.9, 1.0)

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"flow.shift must be > 0, got {self.shift}")
        if self.logit_std <= 0:
            raise ValueError(f"flow.logit_std must be > 0, got {self.logit_std}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"flow.t_min/t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if not 0.0 <= self.high_t_fraction <= 1.0:
            raise ValueError(f"flow.high_t_fraction must be in [0, 1], got {self.high_t_fraction}")
        lo, hi = self.high_t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"flow.high_t_range must satisfy 0 <= low < high <= 1, got {self.high_t_range}")


def shift_timesteps(u: Tensor, shift: float) -> Tensor:
    """Wan / SD3 time shift: t = s u / (1 + (s - 1) u), monotone, fixes 0 and 1."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_timesteps(cfg: FlowConfig, n: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> Tensor:
    """Draw n flow times t in [t_min, t_max]  # [n] float32 (whatever the default dtype: bf16 holds only
    126 distinct values in [0.5, 1))."""
    f32 = torch.float32
    if cfg.sampling == "uniform":
        u = torch.rand(n, device=device, generator=generator, dtype=f32)
    else:
        z = torch.randn(n, device=device, generator=generator, dtype=f32)
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    t = shift_timesteps(u, cfg.shift)
    if cfg.high_t_fraction > 0:  # drawn only when on, so configs without it replay the same t and noise
        lo, hi = cfg.high_t_range
        high = lo + (hi - lo) * torch.rand(n, device=device, generator=generator, dtype=f32)
        pick = torch.rand(n, device=device, generator=generator, dtype=f32) < cfg.high_t_fraction
        t = torch.where(pick, high, t)
    return t.clamp(cfg.t_min, cfg.t_max)


def step_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """Seed of one micro-batch's draws: a function of (seed, global rank, optimizer step, micro-batch).

    Different on every rank (each clip of a global batch gets its own t and noise) and replayed exactly
    after a resume from the step alone, with no RNG state to restore.
    """
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, np.uint64)[0] >> 1)


def draw_flow_inputs(cfg: FlowConfig, shape: tuple[int, ...], device: torch.device | str,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The random inputs of one flow-matching loss: t [B] and noise eps (float32, `shape`)."""
    t = sample_timesteps(cfg, shape[0], device=device, generator=generator)
    noise = torch.randn(shape, device=device, dtype=torch.float32, generator=generator)
    return t, noise


def interpolate(z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """z_t = (1 - t) z0 + t eps with t broadcast over all but the batch axis."""
    tb = t.view(-1, *([1] * (z0.dim() - 1))).to(z0.dtype)
    return (1.0 - tb) * z0 + tb * noise


def velocity_target(z0: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching target eps - z0 (the paper writes the opposite sign convention)."""
    return noise - z0


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample, in float32  # [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
