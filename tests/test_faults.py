"""Fault tolerance with real training processes at scale tiny (saber_pl/faults.py).

A rank that fails (every sample of its shards corrupt) or hangs stops the whole job in bounded time
with one rank-prefixed message; SIGTERM (to the whole process group, or to one rank only) and the SLURM
requeue signal checkpoint at the current step, between two periodic checkpoints, and the same command
resumes there.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARD = ROOT / "data" / "test" / "tiny-000000.tar"

# The training entry point plus a callback that writes the global step after every batch (rank 0), so a
# test can send its signal between two periodic checkpoints. Lightning's launcher re-runs this script for
# rank 1, so both ranks are the same program.
STEP_FILE = textwrap.dedent("""
    import os, sys
    import lightning as L
    import saber_pl.train as train

    class StepFile(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.is_global_zero:
                with open(os.environ["SABER_STEP_FILE"] + ".tmp", "w") as fh:
                    fh.write(str(trainer.global_step))
                os.replace(os.environ["SABER_STEP_FILE"] + ".tmp", os.environ["SABER_STEP_FILE"])

    build = train.build_trainer
    def build_trainer(cfg, run_dir):
        trainer = build(cfg, run_dir)
        trainer.callbacks.append(StepFile())
        return trainer
    train.build_trainer = build_trainer
    sys.exit(train.main(sys.argv[1:]))
""")

# Rank 1 stops answering at step 2 (a stuck GPU, a dead NCCL peer that nobody notices).
HANG = textwrap.dedent("""
    import sys, time
    from saber_pl import module
    step = module.SaberModule.training_step
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 2:
            time.sleep(600)
        return step(self, batch, batch_idx)
    module.SaberModule.training_step = training_step
    from saber_pl.train import main
    sys.exit(main(sys.argv[1:]))
""")


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--exp", "saber_full", "--scale", "tiny", f"logging.runs_dir={tmp_path}", *extra]


def _alive(marker: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose command line contains `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(proc.name))
        except OSError:
            continue
    return out


def _wait_gone(marker: str, deadline: float) -> list[int]:
    while (left := _alive(marker)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def _kill_all(marker: str) -> None:
    for pid in _alive(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _corrupt_copy(src: Path, dst: Path) -> Path:
    """The shard with every mp4 member truncated to 64 bytes: every sample is skipped as corrupt_video."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name.endswith(".mp4"):
                data = data[:64]
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launch", ["lightning", "external"])
def test_failing_rank_stops_the_whole_job(launch: str, tmp_path: Path) -> None:
    """Rank 1's shard is all corrupt: its data raises, and both processes exit non-zero within 120 s.

    ``lightning``: ``trainer.devices=2`` (rank 0 starts rank 1); ``external``: both ranks started by the
    test with the environment torchrun/srun give (LOCAL_RANK, WORLD_SIZE, ...), so both exit codes are seen.
    """
    bad = _corrupt_copy(SHARD, tmp_path / "bad-000000.tar")
    args = _args(tmp_path, "trainer.devices=2", "trainer.strategy=fsdp2", "trainer.max_steps=200",
                 f"data.train_shards={SHARD}::{bad}", "data.resampled=false", "data.epoch_batches=50",
                 "data.min_samples_before_raise=4")
    cmd = [sys.executable, "-m", "saber_pl.train", *args]
    start = time.time()
    if launch == "lightning":
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    else:
        dist = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(**dist, LOCAL_RANK=str(r)), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for r in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1].decode(errors="replace") for p in procs]
        left = _wait_gone(str(tmp_path), start + 120)
    finally:
        _kill_all(str(tmp_path))
    stderr = "\n".join(errs)
    assert not left, f"processes still running after 120 s: {left}"
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    assert time.time() - start < 120
    # One clear, rank-prefixed message naming the bad shard.
    lines = [ln for ln in stderr.splitlines() if ln.startswith("[rank 1] error:")]
    assert lines and str(bad) in lines[0], stderr[-3000:]


def test_hung_rank_is_timed_out_and_the_job_ends(tmp_path: Path) -> None:
    """Rank 1 hangs at step 2: rank 0's collective fails after trainer.collective_timeout_s, rank 0 reports
    it and takes rank 1 (which it launched) down with it."""
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    args = _args(tmp_path, "trainer.devices=2", "trainer.strategy=fsdp2", "trainer.max_steps=50",
                 "trainer.collective_timeout_s=20")
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        stderr = proc.communicate(timeout=85)[1].decode(errors="replace")
        left = _wait_gone(str(tmp_path), start + 88)
    finally:
        _kill_all(str(tmp_path))
    assert not left, f"hung rank still running: {left}"
    assert proc.returncode != 0
    assert "[rank 0] error:" in stderr, stderr[-3000:]
    assert (tmp_path / "saber_full-tiny" / "checkpoints" / "step0000002.ckpt").is_dir()  # it did train to step 2


def _start_until_step(tmp_path: Path, script: Path, args: list[str], step: int, env: dict[str, str],
                      timeout: float = 60) -> tuple[subprocess.Popen, int]:
    """Start the run in its own session and wait until rank 0 has logged `step`."""
    step_file = Path(env["SABER_STEP_FILE"])
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    seen = 0
    while time.time() < deadline and proc.poll() is None:
        if step_file.exists() and (seen := int(step_file.read_text() or 0)) >= step:
            return proc, seen
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s: {proc.stderr.read().decode()[-3000:]}")


def _step(ckpt: Path) -> int:
    meta = ckpt / "meta.pt" if ckpt.is_dir() else ckpt
    return int(torch.load(meta, map_location="cpu", weights_only=False)["global_step"])


def _resume(script: Path, args: list[str], env: dict[str, str], step: int) -> str:
    args = [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={step + 1}" for a in args]
    out = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=80)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def test_sigterm_to_the_process_group_checkpoints_and_resumes(tmp_path: Path) -> None:
    """SIGTERM to the whole group (main process and its DataLoader worker, as SLURM or Ctrl-C send it)
    between two periodic checkpoints: last.ckpt at that step, a clean exit, and the same command resumes."""
    script = tmp_path / "train.py"
    script.write_text(STEP_FILE)
    env = _env(SABER_STEP_FILE=str(tmp_path / "step"))
    args = _args(tmp_path, "trainer.max_steps=500", "trainer.ckpt_every_n_steps=100", "data.num_workers=1")
    proc, seen = _start_until_step(tmp_path, script, args, 3, env)
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.time()
    try:
        stderr = proc.communicate(timeout=30)[1].decode(errors="replace")
    finally:
        _kill_all(str(tmp_path))
    assert proc.returncode == 0, stderr[-3000:]
    assert time.time() - sent < 30
    assert "Traceback" not in stderr, stderr[-3000:]  # the worker ignored SIGTERM; the main process ended it
    ckpts = tmp_path / "saber_full-tiny" / "checkpoints"
    step = _step(ckpts / "last.ckpt")
    assert seen <= step <= seen + 3  # the step the signal arrived in, not a periodic one (every 100)
    assert (ckpts / "last.ckpt").is_symlink() and (ckpts / "last.ckpt").resolve().name == f"step{step:07d}.ckpt"
    assert f"pre-empted at step {step}" in stderr
    resumed = _resume(script, args, env, step)
    assert f"(step {step})" in resumed  # "resuming ... (step N)"
    assert _step(ckpts / "last.ckpt") == step + 1


def test_sigterm_to_one_rank_checkpoints_every_rank(tmp_path: Path) -> None:
    """2 fsdp2 gloo processes, SIGTERM to rank 1 only: the flag is reduced over the ranks, both save the
    same step into one sharded last.ckpt and stop; the same command resumes there."""
    script = tmp_path / "train.py"
    script.write_text(STEP_FILE)
    env = _env(SABER_STEP_FILE=str(tmp_path / "step"))
    args = _args(tmp_path, "trainer.devices=2", "trainer.strategy=fsdp2", "trainer.max_steps=500",
                 "trainer.ckpt_every_n_steps=100")
    proc, seen = _start_until_step(tmp_path, script, args, 3, env, timeout=70)
    try:
        (rank1,) = [pid for pid in _children(proc.pid) if str(tmp_path) in Path(f"/proc/{pid}/cmdline").read_text()]
        os.kill(rank1, signal.SIGTERM)
        stderr = proc.communicate(timeout=40)[1].decode(errors="replace")
        left = _wait_gone(str(tmp_path), time.time() + 10)
    finally:
        _kill_all(str(tmp_path))
    assert proc.returncode == 0 and not left, stderr[-3000:]
    last = tmp_path / "saber_full-tiny" / "checkpoints" / "last.ckpt"
    step = _step(last)
    assert seen <= step <= seen + 3
    assert last.is_symlink() and (last / ".metadata").is_file() and len(list(last.glob("*.distcp"))) == 2
    resumed = _resume(script, args, env, step)
    assert f"(step {step})" in resumed
    assert _step(last) == step + 1


def test_slurm_requeue_signal_checkpoints_and_requeues(tmp_path: Path) -> None:
    """Under SLURM, SIGUSR1 (``--signal=USR1@90``) checkpoints at the current step and requeues the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    script = tmp_path / "train.py"
    script.write_text(STEP_FILE)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "saber", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    env = _env(SABER_STEP_FILE=str(tmp_path / "step"), PATH=f"{bin_dir}:{os.environ['PATH']}", **slurm)
    args = _args(tmp_path, "trainer.max_steps=500", "trainer.ckpt_every_n_steps=100")
    proc, seen = _start_until_step(tmp_path, script, args, 3, env)
    proc.send_signal(signal.SIGUSR1)
    try:
        stderr = proc.communicate(timeout=30)[1].decode(errors="replace")
    finally:
        _kill_all(str(tmp_path))
    assert proc.returncode == 0, stderr[-3000:]
    step = _step(tmp_path / "saber_full-tiny" / "checkpoints" / "last.ckpt")
    assert seen <= step <= seen + 3
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
