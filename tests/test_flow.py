"""Flow-matching timestep draws: the logit-normal base and the high-t share (flow.high_t_fraction)."""

from __future__ import annotations

import pytest
import torch

from saber_pl.config import ConfigError, load_config
from saber_pl.flow import FlowConfig, sample_timesteps, shift_timesteps


def _draw(cfg: FlowConfig, n: int = 200_000, seed: int = 0) -> torch.Tensor:
    return sample_timesteps(cfg, n, generator=torch.Generator().manual_seed(seed))


def test_no_high_t_share_replays_the_plain_logit_normal_draws() -> None:
    """With the share off the draws are exactly sigmoid(m + s z), shifted: older runs replay unchanged."""
    cfg = FlowConfig(shift=3.0, sampling="logit_normal", logit_mean=0.8, logit_std=0.8)
    z = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    expected = shift_timesteps(torch.sigmoid(0.8 + 0.8 * z), 3.0)
    assert torch.equal(_draw(cfg, 1000, seed=5), expected)


def test_high_t_share_puts_the_asked_fraction_in_its_range() -> None:
    """A share f uniform in [0.9, 1]: P(t > 0.9) = f + (1 - f) P_base(t > 0.9), and that range is uniform."""
    base = FlowConfig(shift=1.0, sampling="logit_normal", logit_mean=0.8, logit_std=0.8)
    mixed = FlowConfig(shift=1.0, sampling="logit_normal", logit_mean=0.8, logit_std=0.8, high_t_fraction=0.25)
    p_base = float((_draw(base) > 0.9).float().mean())
    t = _draw(mixed)
    assert 0.03 < p_base < 0.05  # the shipped mini draws: ~4 % above 0.9
    assert float((t > 0.9).float().mean()) == pytest.approx(0.25 + 0.75 * p_base, abs=0.005)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    top = t[t > 0.9]
    # the share is uniform: each half of [0.9, 1] holds half of its draws (the base adds a falling tail)
    assert float((top > 0.95).float().mean()) == pytest.approx(0.5, abs=0.05)


def test_high_t_share_is_a_config_knob_with_checked_values() -> None:
    cfg = load_config("t2v_baseline", "mini", ["flow.high_t_fraction=0.2", "flow.high_t_range=[0.85,1.0]"])
    assert cfg.flow.high_t_fraction == 0.2 and tuple(cfg.flow.high_t_range) == (0.85, 1.0)
    with pytest.raises((ConfigError, ValueError), match="high_t_fraction"):
        load_config("t2v_baseline", "mini", ["flow.high_t_fraction=1.5"])
    with pytest.raises((ConfigError, ValueError), match="high_t_range"):
        load_config("t2v_baseline", "mini", ["flow.high_t_range=[1.0,0.9]"])
