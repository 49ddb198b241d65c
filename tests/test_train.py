"""Training at scale tiny on the CPU: every experiment runs, the loss falls, logging, non-finite skips."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from saber_pl.config import list_experiments, load_config
from saber_pl.module import SaberModule
from saber_pl.train import build_datamodule, fit

ROOT = Path(__file__).resolve().parent.parent


def tiny_cfg(exp: str, tmp_path: Path, *overrides: str):
    return load_config(exp, "tiny", [f"logging.runs_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("exp", list_experiments())
def test_fast_dev_run_every_experiment(exp: str, tmp_path: Path) -> None:
    cfg = tiny_cfg(exp, tmp_path)
    module = SaberModule(cfg)
    dm = build_datamodule(cfg, module.frozen.tokenize, seed_offset=0)
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.state.finished
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)


def _fixed_batch(cfg, module: SaberModule) -> dict:
    dm = build_datamodule(cfg, module.frozen.tokenize, seed_offset=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return dm.on_after_batch_transfer(batch, 0)


def _overfit(module: SaberModule, batch: dict, steps: int = 40, lr: float = 2e-3) -> tuple[float, float]:
    """Loss before and after `steps` AdamW steps on one batch with the same t and noise every step."""
    opt = torch.optim.AdamW([p for p in module.dit.parameters() if p.requires_grad], lr=lr)
    gen = lambda: torch.Generator().manual_seed(0)  # same t and noise every step: a pure overfit
    first = module.flow_loss(batch, generator=gen())["loss"].item()
    for _ in range(steps):
        loss = module.flow_loss(batch, generator=gen())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, module.flow_loss(batch, generator=gen())["loss"].item()


def test_loss_decreases_on_a_fixed_batch(tmp_path: Path) -> None:
    cfg = tiny_cfg("saber_full", tmp_path, "optim.lr=2e-3", "optim.warmup_steps=0")
    module = SaberModule(cfg)
    batch = _fixed_batch(cfg, module)
    first, last = _overfit(module, batch)
    assert last < 0.5 * first, (first, last)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path: Path) -> None:
    cfg = tiny_cfg("saber_full", tmp_path, "trainer.max_nonfinite_in_row=2")
    module = SaberModule(cfg)
    batch = _fixed_batch(cfg, module)
    bad = dict(batch, video=batch["video"].clone())
    bad["video"][0, :, 0, 0, 0] = math.nan
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    module.trainer = trainer
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value.detach() if torch.is_tensor(value) else value))  # type: ignore[method-assign]
    before = [p.detach().clone() for p in module.dit.parameters()]
    assert module.training_step(bad, 0) is None
    assert logged["train/skipped_nonfinite"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, module.dit.parameters()))
    assert module.training_step(batch, 1) is not None  # a good step resets the run of bad ones
    assert module.training_step(bad, 2) is None
    with pytest.raises(FloatingPointError, match="max_nonfinite_in_row=2"):
        module.training_step(bad, 3)
    assert logged["train/skipped_nonfinite"] == 3.0


def test_tensorboard_has_scalars_images_videos(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("saber_full", tmp_path, "trainer.max_steps=3", "trainer.val_every_n_steps=3",
                   "trainer.limit_val_batches=1", "logging.image_every_n_steps=1", "optim.ema=true")
    assert fit(cfg) == 0  # what `python -m saber_pl.train` runs after parsing
    events = EventAccumulator(str(cfg.run_dir / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/samples_per_s", "train/tokens_per_s",
                "val/loss"):
        assert tag in scalars, (tag, sorted(scalars))
    assert any(t.startswith("train/loss_t") for t in scalars)
    assert any(t.startswith("data/skipped_") for t in scalars), sorted(scalars)
    images = set(events.Tags()["images"])
    assert "train/references" in images and "val/sample_0" in images, images
    video = events.Images("val/sample_0")[-1]
    assert video.encoded_image_string[:6] in (b"GIF89a", b"GIF87a")
    assert (cfg.run_dir / "config.yaml").is_file()
    # ckpt_every_n_steps is 2 at tiny: last.ckpt still holds the final step 3.
    last = torch.load(cfg.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3


def test_lr_schedule_warmup_then_cosine() -> None:
    from saber_pl.config import OptimConfig
    from saber_pl.module import lr_factor

    o = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(o, 110, 0) == pytest.approx(0.1) and lr_factor(o, 110, 9) == pytest.approx(1.0)
    assert lr_factor(o, 110, 10) == pytest.approx(1.0)
    assert lr_factor(o, 110, 60) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_factor(o, 110, 110) == pytest.approx(0.1) and lr_factor(o, 110, 500) == pytest.approx(0.1)
    assert lr_factor(OptimConfig(warmup_steps=0), 100, 50) == 1.0


def test_global_batch_derives_the_accumulation_of_the_recipe() -> None:
    """The recipe's global batch of 64 holds on any cluster size that divides it."""
    from saber_pl.config import ConfigError, load_config
    from saber_pl.train import accumulation

    for scale in ("14B", "1.3B"):
        cfg = load_config("saber_full", scale)
        assert cfg.trainer.global_batch == 64
        assert accumulation(cfg, 64) == 1 and accumulation(cfg, 8) == 8 and accumulation(cfg, 16) == 4
        with pytest.raises(ConfigError, match="global_batch=64 is not a multiple of 48"):
            accumulation(cfg, 48)
    tiny = load_config("saber_full", "tiny", ["trainer.accumulate_grad_batches=3"])
    assert tiny.trainer.global_batch is None and accumulation(tiny, 2) == 3


def test_wan_dir_needs_umt5_only_when_text_is_encoded_online(tmp_path) -> None:
    from saber_pl.config import load_config
    from saber_pl.train import SetupError, check_inputs

    for sub in ("transformer", "vae"):
        (tmp_path / sub).mkdir()
    shards = "data/test/tiny-000000.tar"
    online = load_config("saber_full", "14B", [f"model.wan_dir={tmp_path}", f"data.train_shards={shards}"])
    with pytest.raises(SetupError, match="lacks text_encoder, tokenizer/"):
        check_inputs(online)
    check_inputs(load_config("saber_full", "14B", [f"model.wan_dir={tmp_path}", f"data.train_shards={shards}",
                                                   "data.text=precomputed", f"data.text_sidecars={tmp_path}"]))


def test_a_run_ended_by_the_time_cap_says_so(tmp_path, caplog) -> None:
    """trainer.max_time_minutes is a safety net: when it ends a run before max_steps, the run says so loudly."""
    import logging

    from saber_pl.config import load_config
    from saber_pl.train import fit

    cfg = load_config("saber_full", "tiny", [f"logging.runs_dir={tmp_path}", "trainer.max_steps=1000",
                                             "trainer.max_time_minutes=0.0001", "trainer.ckpt_every_n_steps=1000"])
    with caplog.at_level(logging.WARNING, logger="saber_pl.train"):
        assert fit(cfg) == 0
    assert "STOPPED BY THE TIME CAP" in caplog.text and "of 1000" in caplog.text


def test_a_resumed_run_gets_its_own_time_cap() -> None:
    """The cap is per invocation: Lightning's Timer restores the elapsed time of the checkpointed run, which
    stops a run resumed after the cap at once; SessionTimer does not."""
    from lightning.pytorch.callbacks import Timer

    from saber_pl.callbacks import SessionTimer

    state = {"time_elapsed": {"train": 600.0, "validate": 0.0, "test": 0.0, "predict": 0.0}}
    stock, ours = Timer(duration={"minutes": 10}), SessionTimer(duration={"minutes": 10})
    stock.load_state_dict(state)
    ours.load_state_dict(state)
    assert stock.time_remaining("train") <= 0 and ours.time_remaining("train") == 600.0


def test_sample_prediction_trains_with_the_flow_loss(tmp_path: Path) -> None:
    """model.prediction=sample (the DiT predicts z0, turned into a velocity) learns under the real loss and AdamW."""
    cfg = tiny_cfg("t2v_baseline", tmp_path, "model.init=random", "model.prediction=sample", "optim.warmup_steps=0")
    module = SaberModule(cfg)
    assert module.dit.prediction == "sample"
    batch = _fixed_batch(cfg, module)
    first, last = _overfit(module, batch)
    assert last < 0.5 * first, (first, last)
