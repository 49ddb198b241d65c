"""Kill a CPU training run and restart it with the same command: it resumes from the last checkpoint.

The runs are real subprocesses (``python -m saber_pl.train`` at scale tiny). A kill *during* a
checkpoint write is simulated by a tiny launcher that makes the checkpoint file writer SIGKILL its
own process half-way through writing the second checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

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
        # Checkpoint writes: step 2 (top-k file, last.ckpt), step 4 (top-k file, last.ckpt). Tear the
        # 4th, last.ckpt of step 4: write half of it, then die like a preempted node.
        if str(self.path).endswith(".ckpt"):
            calls["n"] += 1
            if calls["n"] == 4:
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
    # last.ckpt of step 2 is intact: the torn write of step 4 went to a temporary file, never moved in place.
    assert _load(last)["global_step"] == 2
    out = subprocess.run(_cmd(tmp_path, 4), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2" in out.stderr
    assert _load(last)["global_step"] == 4
