"""benchmarks/step.py runs the cached training step next to the DiT-only step and prints one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_step_benchmark_runs_at_tiny_without_umt5() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "benchmarks/step.py", "--scale", "tiny", "--steps", "2", "--warmup", "1",
                          "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["umt5_built"] is False  # data.text=precomputed: no text encoder in the process
    assert row["full_step_s"] > 0 and row["dit_only_step_s"] > 0
    assert abs(row["ratio"] / (row["full_step_s"] / row["dit_only_step_s"]) - 1) < 0.05  # rounded in the JSON
