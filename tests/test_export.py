"""Export: a run's DiT (EMA or raw) becomes a diffusers folder that WanTransformer3DModel loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from saber_pl.config import load_config
from saber_pl.export import export, main
from saber_pl.train import fit


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("saber_full", "tiny", [f"logging.runs_dir={root}", "trainer.max_steps=2",
                                             "optim.ema=true", "optim.ema_decay=0.5", "optim.lr=1e-2"])
    assert fit(cfg) == 0
    return cfg.run_dir


def test_export_loads_with_diffusers(run_dir: Path, tmp_path: Path) -> None:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for raw, prefix in ((False, "dit_ema."), (True, "dit.")):
        out = export(run_dir, tmp_path / f"export_{raw}", prefer_ema=not raw)
        model = WanTransformer3DModel.from_pretrained(out)
        assert model.config.in_channels == 2 * model.config.out_channels + 4  # noisy + mask + reference
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[prefix + "wan." + name]), name
        assert (out / "saber.json").is_file()
    # EMA and raw weights differ after 2 steps with decay 0.5 and a large lr.
    assert any(not torch.equal(state["dit." + k[len("dit_ema."):]], v)
               for k, v in state.items() if k.startswith("dit_ema."))


def test_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--run", str(tmp_path / "nothing")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_export_keeps_the_prediction_knob(tmp_path: Path) -> None:
    """A run whose DiT predicts the clean latent is rebuilt from its export with the same head, same velocities."""
    import json

    from saber_pl.generate import load_export_dit, load_run_dit, resolve_checkpoint

    cfg = load_config("t2v_baseline", "tiny", [f"logging.runs_dir={tmp_path}", "trainer.max_steps=1",
                                               "model.init=random", "model.prediction=sample"])
    assert fit(cfg) == 0
    out = export(cfg.run_dir, tmp_path / "export")
    assert json.loads((out / "saber.json").read_text())["saber"]["prediction"] == "sample"
    exported = load_export_dit(resolve_checkpoint(out), torch.float32).eval()
    run, _ = load_run_dit(resolve_checkpoint(cfg.run_dir), False, torch.float32)
    assert exported.prediction == run.eval().prediction == "sample"
    z, t = torch.randn(1, 16, 2, 8, 8), torch.tensor([700.0])
    text = torch.randn(1, cfg.model.resolved_text_len, exported.wan.config.text_dim)
    with torch.no_grad():
        torch.testing.assert_close(exported(z, t, text), run(z, t, text))
