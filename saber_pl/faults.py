"""Fault tolerance: a failing rank stops the whole job; a pre-emption signal checkpoints, then stops.

``FailFast``: when one rank raises (too many bad samples in its shards, the non-finite-loss limit, out of
memory) it prints the error once, prefixed with its rank, and leaves with ``os._exit(1)`` before
Lightning's teardown or any destructor can enter a collective. The others notice because the failed
process is gone: gloo peers fail at once ("Connection closed by peer"), NCCL peers after
``trainer.collective_timeout_s`` (the process-group timeout; NCCL's watchdog then ends the process).
Under Lightning's launcher rank 0 also kills the ranks it started (and Lightning's observer kills
everything when a started rank exits non-zero); torchrun kills the group when a worker exits;
``srun --kill-on-bad-exit=1`` does the same under SLURM.

``Preemption``: SIGTERM (``kill``, a scheduler's time limit) and the SLURM requeue signal (SIGUSR1,
``sbatch --signal=USR1@90``) only set a flag. At each optimizer step's end every rank max-reduces the
flags, so all ranks agree on the step even when one rank got the signal; then ``last.ckpt`` is written at
that step through ``SaberCheckpoint`` (the atomic sharded write), training stops, and under SLURM rank 0
requeues the job (``scontrol requeue``). The process exits 0, like Lightning's own SIGTERM handling;
re-running the same command (or the requeued job) resumes at that step.

Lightning's ``_SignalConnector`` is replaced for these signals at ``on_train_start`` (it registers its
handlers just before): its SIGTERM handler broadcasts from inside the handler, at whatever point the
main thread was (a collective out of step with the other ranks), and then stops without a checkpoint;
its SLURM handler saves a checkpoint inside the signal handler. Its per-step ``received_sigterm``
broadcast stays harmless (the flag is never set). DataLoader workers ignore these signals
(``dataloader_worker_init``) so a signal sent to the whole process group (SLURM, Ctrl-C) does not kill
them with a traceback; the main process shuts them down.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info

if TYPE_CHECKING:
    from saber_pl.checkpoint import SaberCheckpoint

log = logging.getLogger("saber_pl.faults")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: Lightning's (and our) default SLURM requeue signal
WORKER_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def dataloader_worker_init(worker_id: int, rank: int) -> None:
    """DataLoader ``worker_init_fn``: ignore stop signals (the main process ends the workers), then seed like
    Lightning would (``seed_everything(workers=True)`` only adds its own init function when none is set)."""
    for sig in WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank=rank)


def one_line(exn: BaseException) -> str:
    """``Type: message`` on one line; for a wrapped error (DataLoader worker) the original's last line."""
    text = str(exn).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        return lines[-1]
    return f"{type(exn).__name__}: {text}" if text else type(exn).__name__


class FailFast(L.Callback):
    """In a multi-process run, an exception on one rank ends that process at once, with one clear message."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, Exception) or trainer.world_size < 2:
            return  # KeyboardInterrupt / SystemExit, or one process: Lightning's normal path
        rank = trainer.global_rank
        tb = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
        report = "".join(f"[rank{rank}]: {line}\n" for line in tb.rstrip().splitlines())
        report += (f"[rank {rank}] error: {one_line(exception)}\n"
                   f"[rank {rank}] exiting (code 1) without entering collectives, so the other ranks stop too\n")
        sys.stdout.flush()
        sys.stderr.write(report)
        sys.stderr.flush()
        for logger in trainer.loggers:  # flush TensorBoard (rank-zero only, local)
            try:
                logger.finalize("failed")
            except Exception:  # noqa: BLE001 - the run is failing already; the error above is what matters
                pass
        if trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signal.SIGKILL)  # ranks this process started (Lightning's launcher)
        os._exit(1)


class Preemption(L.Callback):
    """Checkpoint at the current step and stop when any rank got SIGTERM or the requeue signal."""

    def __init__(self, checkpoint: SaberCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None  # this process's first stop signal
        self.stopped_at: int | None = None  # global step of the pre-emption checkpoint
        self._requeue_signal: int = signal.SIGUSR1
        self._requeue = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = getattr(trainer.strategy, "cluster_environment", None)
        if env is None and SLURMEnvironment.detect():  # one process: the strategy has no cluster environment
            env = SLURMEnvironment()
        if isinstance(env, SLURMEnvironment):
            self._requeue = env.auto_requeue
            self._requeue_signal = env.requeue_signal or signal.SIGUSR1
        if threading.current_thread() is threading.main_thread():
            for sig in {signal.SIGTERM, self._requeue_signal}:
                signal.signal(sig, self._on_signal)  # replaces Lightning's handlers (restored at its teardown)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only set the flag (no logging: the handler may interrupt the logging module holding its lock)."""
        if self.received is None:
            self.received = signum
            os.write(2, f"[pid {os.getpid()}] received {signal.Signals(signum).name}: checkpointing at the end "
                        f"of this step, then stopping\n".encode())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the state to save is at the optimizer step
        got = torch.tensor([self.received is not None, self.received == self._requeue_signal],
                           dtype=torch.int32, device=trainer.strategy.root_device)
        agreed = trainer.strategy.reduce(got, reduce_op="max")  # [stop, requeue]: identical on every rank
        if not bool(agreed[0]):
            return
        path = self.checkpoint.save_last_now(trainer)
        self.stopped_at = trainer.global_step
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates on should_stop; not in a pre-emption's grace time
        requeue = bool(agreed[1]) and self._requeue
        rank_zero_info(f"pre-empted at step {trainer.global_step}: saved {path}; "
                       + ("requeueing the SLURM job" if requeue else "re-run the same command to resume"))
        if requeue and trainer.is_global_zero:
            requeue_slurm_job()


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job (array jobs: ``<array id>_<task id>``), as Lightning's SLURM handler does."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_id else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job_id):
        log.warning("cannot requeue: no SLURM job id (SLURM_JOB_ID=%r)", job_id)
        return False
    try:
        result = subprocess.call(["scontrol", "requeue", job_id])
    except FileNotFoundError:
        log.warning("cannot requeue SLURM job %s: scontrol not found", job_id)
        return False
    if result != 0:
        log.warning("requeueing SLURM job %s failed with exit code %d", job_id, result)
    else:
        log.info("requeued SLURM job %s", job_id)
    return result == 0
