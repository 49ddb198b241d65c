"""2-process CPU training (gloo) through Lightning's ModelParallelStrategy (FSDP2) and DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_process_cpu_run(strategy: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "saber_pl.train", "--exp", "saber_full", "--scale", "tiny",
           f"logging.runs_dir={tmp_path}", "trainer.devices=2", f"trainer.strategy={strategy}",
           "trainer.max_steps=2", "trainer.ckpt_every_n_steps=2", "optim.ema=true"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    last = tmp_path / "saber_full-tiny" / "checkpoints" / "last.ckpt"
    if strategy == "fsdp2":
        # A distributed (sharded) checkpoint: a folder with the DCP metadata and one file per rank.
        assert last.is_dir() and (last / ".metadata").is_file() and (last / "meta.pt").is_file()
        assert len(list(last.glob("*.distcp"))) == 2
        assert not (last.parent / "last.ckpt.tmp").exists()
    else:
        assert last.is_file()
    # Resume the sharded run for 2 more steps with the same command.
    cmd[cmd.index("trainer.max_steps=2")] = "trainer.max_steps=4"
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "(step 2)" in out.stderr
    if strategy == "fsdp2":
        # The sharded checkpoint exports in one process to a folder diffusers loads.
        from diffusers import WanTransformer3DModel

        from saber_pl.export import export

        out = export(tmp_path / "saber_full-tiny", tmp_path / "export")
        model = WanTransformer3DModel.from_pretrained(out)
        assert all(torch.isfinite(p).all() for p in model.parameters())
