"""benchmarks/gpu.py --smoke: the GPU kit's code path runs on the CPU and prints one complete JSON line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def numbers(node, path=""):
    """Every (path, number) in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def test_gpu_kit_smoke_prints_complete_finite_json():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout[-2000:]
    res = json.loads(lines[0])

    assert "error" not in json.dumps(res), lines[0]  # no section or backend failed
    assert {"attention", "step_1.3B", "blocks_14B", "mfu_formula", "peak_tflops"} <= res.keys()
    for path, x in numbers(res):
        assert math.isfinite(x), path

    attn = res["attention"]
    assert set(attn["backends"]) == {"varlen", "xformers", "sdpa_per_segment", "dense_masked_sdpa"}
    for name in ("varlen", "xformers"):  # CUDA kernels: reported as unavailable on the CPU, with the reason
        assert "CUDA only" in attn["backends"][name]["unavailable"]
    for name in ("sdpa_per_segment", "dense_masked_sdpa"):
        r = attn["backends"][name]
        assert r["fwd_bwd_ms"] > 0 and r["max_abs_err_out"] < 1e-5 and r["max_abs_err_grad"] < 1e-5, r
    assert attn["auto_picks"] == "sdpa" and attn["fastest"] in attn["backends"]

    step = res["step_1.3B"]
    assert step["layers"] == 2 and step["tokens"] > 0 and step["s_per_step"] > 0
    flops = 6 * step["params"] * step["tokens"] + 12 * step["tokens"] ** 2 * step["dim"] * step["layers"]
    assert math.isclose(step["model_tflop_per_step"], flops / 1e12, rel_tol=1e-3)
    assert math.isclose(step["mfu"], flops / (step["s_per_step"] * res["peak_tflops"] * 1e12), rel_tol=1e-2)

    blocks = res["blocks_14B"]
    assert blocks["extrapolated_layers"] == 40 and blocks["ms_per_block"] != 0
    want = blocks["s_per_step_4_blocks"] + 36 * blocks["ms_per_block"] / 1e3
    assert math.isclose(blocks["extrapolated_s_per_step"], want, rel_tol=1e-2)
    # at --smoke both sections use the tiny DiT: 40 blocks = the 2-block model + 38 blocks
    assert blocks["block_params"] == step["block_params"]
    assert blocks["extrapolated_params"] == step["params"] + 38 * step["block_params"]
    assert blocks["plan"], blocks  # plan.py's estimate, or why it is unavailable
