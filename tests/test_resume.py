"""Kill a CPU training run and restart it with the same command: it resumes from the last checkpoint.

The runs are real subprocesses (``python -m saber_pl.train`` at scale tiny). A kill *during* a
checkpoint write is simulated by a tiny launcher that makes the checkpoint file writer SIGKILL its
own process half-way through writing the second checkpoint. ``last.ckpt`` is a link to the step
checkpoint (each state written once): checked on a sharded run, and in-process for the top-k cases.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import saber_pl.checkpoint as checkpoint
from saber_pl.checkpoint import SaberCheckpoint, find_resume_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _cmd(tmp_path: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "saber_pl.train", "--exp", "saber_full", "--scale", "tiny",
            f"logging.runs_dir={tmp_path}", f"trainer.max_steps={steps}", "trainer.ckpt_every_n_steps=2",
            "trainer.keep_top_k=1", "optim.ema=true", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_sigkill_after_checkpoint_then_resume(tmp_path: Path) -> None:
    last = tmp_path / "saber_full-tiny" / "checkpoints" / "last.ckpt"
    # A long run, killed with SIGKILL as soon as its first checkpoint is on disk.
    proc = subprocess.Popen(_cmd(tmp_path, 500), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = _load(last)
    step = saved["global_step"]
    assert step >= 2 and step % 2 == 0
    # Restart with the same command but a limit 2 steps further: it continues from `step`.
    out = subprocess.run(_cmd(tmp_path, step + 2), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"step {step}" in out.stderr  # "resuming ... (step N)"
    resumed = _load(last)
    assert resumed["global_step"] == step + 2
    # The optimizer state went on from the saved one (AdamW step count), and the EMA was kept.
    first_state = next(iter(saved["optimizer_states"][0]["state"].values()))
    new_state = next(iter(resumed["optimizer_states"][0]["state"].values()))
    assert float(new_state["step"]) == float(first_state["step"]) + 2
    assert any(k.startswith("dit_ema.") for k in resumed["state_dict"])
    assert "saber" in resumed and "rng" in resumed["saber"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    import fsspec.implementations.local as local
    calls = {"n": 0}
    real_write = local.LocalFileOpener.write
    def write(self, data):
        # Checkpoint writes: step 2 (step0000002.ckpt; last.ckpt links to it), step 4. Tear the 2nd,
        # step0000004.ckpt: write half of it, then die like a preempted node.
        if str(self.path).endswith(".ckpt"):
            calls["n"] += 1
            if calls["n"] == 2:
                real_write(self, data[: len(data) // 2])
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return real_write(self, data)
    local.LocalFileOpener.write = write
    from saber_pl.train import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_checkpoint_write_still_resumes(tmp_path: Path) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    cmd = _cmd(tmp_path, 500)
    out = subprocess.run([sys.executable, str(script), *cmd[3:]], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    ckpt_dir = tmp_path / "saber_full-tiny" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    # last.ckpt (step 2) is intact: the torn write of step 4 went to a temporary file, never moved in place.
    assert _load(last)["global_step"] == 2 and not (ckpt_dir / "step0000004.ckpt").exists()
    out = subprocess.run(_cmd(tmp_path, 4), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2" in out.stderr
    assert _load(last)["global_step"] == 4


def _stored(ckpt_dir: Path) -> tuple[list[Path], int]:
    """Checkpoint data actually on disk (links not followed): regular files and their total bytes."""
    files = [Path(d) / f for d, _, names in os.walk(ckpt_dir) for f in names if not (Path(d) / f).is_symlink()]
    return files, sum(f.stat().st_size for f in files)


def test_sharded_last_is_a_link_state_written_once(tmp_path: Path) -> None:
    """2 fsdp2 processes, top-1 and last at the same step: one sharded state on disk (2 .distcp, one per
    rank), last.ckpt links to it, and the run resumes, exports and is found by generate through the link."""
    cmd = [sys.executable, "-m", "saber_pl.train", "--exp", "saber_full", "--scale", "tiny",
           f"logging.runs_dir={tmp_path}", "trainer.devices=2", "trainer.strategy=fsdp2", "trainer.max_steps=4",
           "trainer.ckpt_every_n_steps=2", "trainer.keep_top_k=1"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "saber_full-tiny"
    ckpt_dir = run / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step0000004.ckpt"
    files, size = _stored(ckpt_dir)
    distcp = [f for f in files if f.suffix == ".distcp"]
    assert len(distcp) == 2 and all(f.parent.name == "step0000004.ckpt" for f in distcp), files
    assert size < 1.2 * sum(f.stat().st_size for f in (ckpt_dir / "step0000004.ckpt").iterdir())
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step0000004.ckpt"]  # top-1 removed step 2
    cmd[cmd.index("trainer.max_steps=4")] = "trainer.max_steps=6"
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(step 4)" in out.stderr
    assert os.readlink(last) == "step0000006.ckpt"
    assert len([f for f in _stored(ckpt_dir)[0] if f.suffix == ".distcp"]) == 2
    from saber_pl.export import export
    from saber_pl.generate import resolve_checkpoint

    assert resolve_checkpoint(run).ckpt == last
    assert (export(run, tmp_path / "export") / "config.json").is_file()


class _Toy(L.LightningModule):
    """A linear model whose val/loss follows a given schedule by global step."""

    def __init__(self, val_losses: dict[int, float]) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.val_losses = val_losses

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.val_losses[self.global_step])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(64, 2), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(4, 2), batch_size=4)


def _fit(tmp_path: Path, steps: int, validate: bool, val_losses: dict[int, float] | None = None) -> Path:
    ckpt_dir = tmp_path / "checkpoints"
    ckpt = SaberCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                           every_n_train_steps=2, save_last=True, save_top_k=1,
                           monitor="val/loss" if validate else "step", mode="min" if validate else "max",
                           save_on_train_epoch_end=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, callbacks=[ckpt], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=2 if validate else None, check_val_every_n_epoch=None,
                        limit_val_batches=1 if validate else 0)
    trainer.fit(_Toy(val_losses or {}))
    return ckpt_dir


def test_last_holds_the_newest_step_when_top_k_skips_it(tmp_path: Path) -> None:
    """Top-1 by val/loss keeps step 2 (the losses get worse): last.ckpt still moves to steps 4 and 6, each
    written once under its step name and dropped when the link moves on (Lightning's save_last="link"
    would leave last.ckpt at step 2)."""
    ckpt_dir = _fit(tmp_path, 6, validate=True, val_losses={2: 1.0, 4: 2.0, 6: 3.0})
    last = ckpt_dir / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step0000006.ckpt"
    assert _load(last)["global_step"] == 6
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000006.ckpt"]
    assert _load(ckpt_dir / "step0000002.ckpt")["global_step"] == 2
    assert find_resume_checkpoint(ckpt_dir) == last


def test_last_link_never_dangles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-1 replaces the checkpoint last.ckpt points at: the old one is removed only after the relink, so a
    kill at any moment leaves a last.ckpt to resume from."""
    seen: list[tuple[str, bool]] = []
    real = checkpoint.point_link

    def point_link(link: Path, target: Path) -> None:
        seen.append((os.readlink(link) if link.is_symlink() else "", link.exists()))  # before the relink
        real(link, target)

    monkeypatch.setattr(checkpoint, "point_link", point_link)
    ckpt_dir = _fit(tmp_path, 6, validate=False)
    assert seen == [("", False), ("step0000002.ckpt", True), ("step0000004.ckpt", True)]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step0000006.ckpt"]
