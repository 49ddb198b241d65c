"""GPU kit: packed-attention kernels at the 14B shape, a real 1.3B training step, the 14B width per block.

    python benchmarks/gpu.py > gpu.json                # one H100/H200, <= 8 minutes, prints one JSON line
    python benchmarks/gpu.py --peak-tflops 989 --sections attention,step,block14b --time-limit 450
    python benchmarks/gpu.py --smoke                   # the same code at tiny shapes on the CPU (seconds)

Needs torch (>= 2.10 for `varlen`), diffusers and transformers (saber_pl.wan imports it); xformers is
optional, Lightning is not needed (only the `plan` estimate uses it, and reports why when it is missing).
Every section runs in its own try/except, so one failure (an OOM, a missing kernel) leaves the rest.

1. `attention`: each packed-attention backend (varlen, xformers, SDPA per segment, dense masked SDPA) at
   the 14B attention shape: 40 heads x 128, 21 x 1,560 = 32,760 video tokens + 3 references of 1,560
   tokens at 30 % coverage (468 valid tokens each), bf16. Max abs error of the output and of dq/dk/dv
   against an fp32 explicit-softmax reference on the same (bf16-rounded) inputs, forward+backward ms.
2. `step`: one training step of the real 1.3B config (`SCALES["1.3B"]`, random weights built on the GPU):
   SaberTransformer + flow-matching loss + AdamW, fp32 master weights, FSDP2 bf16 `MixedPrecisionPolicy`
   (`parallel.shard_transformer` on a 1-rank process group), activation checkpointing, 480x832x81
   (latent 16 x 21 x 60 x 104) + 3 references: s/step, peak GiB, MFU.
3. `block14b`: the 14B width (40 heads x 128, ffn 13,824) with 4 and with 2 of its 40 blocks: ms and GiB
   per block (the difference), and the 40-block step time and MFU it extrapolates to, next to the
   estimate of `saber_pl/plan.py` when it imports.

MFU = model FLOPs / (step time x peak), model FLOPs = 6 x params x tokens + 12 x sum_b(N_b^2) x D x layers
(tokens = packed tokens N = video + valid reference tokens; D = heads x head_dim; cross-attention and the
recomputation of checkpointing are not counted). Peak: 989 TFLOP/s (dense bf16, H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from saber_pl import attention  # noqa: E402
from saber_pl.flow import FlowConfig, interpolate, per_sample_mse, sample_timesteps, velocity_target  # noqa: E402
from saber_pl.wan import SCALES  # noqa: E402

GiB = 2**30


@dataclass(frozen=True)
class Shape:
    """One benchmark geometry: latent video, references and the DiT they run through."""

    frames: int  # latent frames
    h: int  # latent height (patches: h / 2)
    w: int
    refs: int  # references per clip
    coverage: float  # fraction of a reference's patches inside its mask (valid tokens)
    text_len: int
    attn_heads: int  # attention slice
    attn_head_dim: int
    attn_batch: int  # clips packed in the attention slice
    step_dit: dict  # the 1.3B (smoke: tiny) DiT config
    wide_dit: dict  # the 14B-width (smoke: tiny) DiT config
    wide_layers: int  # the model the block timing extrapolates to
    block_layers: tuple[int, int]  # the two depths whose difference is one block
    warmup: int
    reps: int  # timed training steps
    attn_reps: int  # timed attention calls

    @property
    def frame_tokens(self) -> int:
        return (self.h // 2) * (self.w // 2)

    @property
    def ref_tokens(self) -> int:  # valid tokens per reference
        return round(self.frame_tokens * self.coverage)

    @property
    def seq(self) -> int:  # packed tokens per clip
        return self.frames * self.frame_tokens + self.refs * self.ref_tokens


FULL = Shape(frames=21, h=60, w=104, refs=3, coverage=0.3, text_len=512, attn_heads=40, attn_head_dim=128,
             attn_batch=1, step_dit=SCALES["1.3B"]().dit, wide_dit=SCALES["14B"]().dit,
             wide_layers=SCALES["14B"]().dit["num_layers"], block_layers=(4, 2), warmup=2, reps=3, attn_reps=10)
SMOKE = Shape(frames=3, h=8, w=8, refs=3, coverage=0.3, text_len=16, attn_heads=2, attn_head_dim=16,
              attn_batch=2, step_dit=SCALES["tiny"]().dit, wide_dit=SCALES["tiny"]().dit, wide_layers=40,
              block_layers=(4, 2), warmup=1, reps=2, attn_reps=2)


# ----------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall seconds of `fn` after `warmup` calls, synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; return the bytes allocated now (0 on the CPU: not measured)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_gib(device: torch.device, base: int = 0) -> float | None:
    """Peak GiB allocated since `reset_peak`, less `base` (None on the CPU: not measured)."""
    return sig((torch.cuda.max_memory_allocated(device) - base) / GiB) if device.type == "cuda" else None


def sig(x: float | None, digits: int = 4) -> float | None:
    """`x` to `digits` significant digits (tiny smoke values stay non-zero)."""
    return None if x is None else float(f"{x:.{digits}g}")


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def section(name: str, fn: Callable[[], dict], deadline: float) -> dict:
    """Run one section; its error or a skip (past the time limit) is reported instead of lost."""
    if time.monotonic() > deadline:
        return {"skipped": "time limit reached before this section"}
    start = time.monotonic()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - report and go on with the next section
        traceback.print_exc(file=sys.stderr)
        out = {"error": f"{type(err).__name__}: {err}"[:500]}
    out["section_s"] = round(time.monotonic() - start, 1)
    return out


# ----------------------------------------------------------------------------------------------- attention


def dense_kernels(device: torch.device) -> Any:
    """On CUDA, SDPA's memory-efficient kernel (the fused one that takes a mask): the math fallback would
    materialise [B, H, S, S] scores (~100 GiB at the 14B shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])


class NoTF32:
    """Context: full-fp32 matmuls (TF32 would make the 'fp32' reference a 10-bit-mantissa one)."""

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def reference_fwd_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, seqlens: list[int],
                      heads_per_chunk: int) -> tuple[torch.Tensor, ...]:
    """fp32 explicit-softmax attention per segment and head chunk: (out, dq, dk, dv), all [N, H, Dh] float32."""
    out, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
    for start, n in zip(attention.Packing(seqlens).offsets, seqlens):
        for h0 in range(0, q.shape[1], heads_per_chunk):
            sl = (slice(start, start + n), slice(h0, h0 + heads_per_chunk))
            qs, ks, vs = (t[sl].transpose(0, 1).detach().requires_grad_() for t in (q, k, v))  # [h, n, Dh]
            scores = (qs @ ks.transpose(1, 2)) * q.shape[-1] ** -0.5  # [h, n, n]
            o = scores.softmax(-1) @ vs
            o.backward(grad[sl].transpose(0, 1))
            for dst, src in ((out, o), (dq, qs.grad), (dk, ks.grad), (dv, vs.grad)):
                dst[sl] = src.detach().transpose(0, 1)
            del scores, o
    return out, dq, dk, dv


def bench_attention(sh: Shape, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)  # token picks
    dgen = torch.Generator(device=device).manual_seed(0)  # tensors, drawn where they live
    b, hh, dh = sh.attn_batch, sh.attn_heads, sh.attn_head_dim
    s_vid, s_full = sh.frames * sh.frame_tokens, sh.frames * sh.frame_tokens + sh.refs * sh.frame_tokens
    seqlens = [sh.seq] * b
    n = sum(seqlens)
    # packed inputs, rounded to the benchmark dtype once: the reference sees exactly what the kernels see
    q, k, v, grad = (torch.randn(n, hh, dh, generator=dgen, device=device).to(dtype) for _ in range(4))
    # where each packed token sits in the padded [B, S_full] layout of the dense path
    valid = torch.zeros(b, s_full, dtype=torch.bool)
    valid[:, :s_vid] = True
    for i in range(b):
        for j in range(sh.refs):
            pick = torch.randperm(sh.frame_tokens, generator=gen)[: sh.ref_tokens]
            valid[i, s_vid + j * sh.frame_tokens + pick] = True
    valid = valid.to(device)
    idx = valid.flatten().nonzero().squeeze(1)  # [N]

    with NoTF32():  # the reference is true fp32
        hc = 1 if device.type == "cuda" else hh
        ref = reference_fwd_bwd(q.float(), k.float(), v.float(), grad.float(), seqlens, hc)
    ref_out_max = ref[0].abs().max().item()
    ref_grad_max = max(t.abs().max().item() for t in ref[1:])

    def packed(fn: Callable) -> Callable[[], tuple]:
        def run() -> tuple:
            qp, kp, vp = (t[None].detach().requires_grad_() for t in (q, k, v))  # [1, N, H, Dh]
            out = fn(qp, kp, vp, seqlens, seqlens)
            out.backward(grad[None])
            return out[0].detach(), qp.grad[0], kp.grad[0], vp.grad[0]
        return run

    # the dense path: every clip padded to S_full (K references of all their tokens), invalid keys masked
    pad = []
    for src in (q, k, v, grad):
        t = torch.randn(b * s_full, hh, dh, generator=dgen, device=device).to(dtype) if src is not grad \
            else torch.zeros(b * s_full, hh, dh, device=device, dtype=dtype)
        t[idx] = src
        pad.append(t.view(b, s_full, hh, dh).transpose(1, 2))  # [B, H, S, Dh]
    bias = torch.zeros(b, 1, s_full, s_full, device=device, dtype=dtype)  # [B, 1, S, S] additive key mask
    bias.masked_fill_(~valid[:, None, None, :], float("-inf"))

    def dense() -> tuple:
        qd, kd, vd = (t.detach().requires_grad_() for t in pad[:3])
        with dense_kernels(device):
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bias)
            out.backward(pad[3])
        return out.detach(), qd.grad, kd.grad, vd.grad

    def unpad(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, Dh] -> the packed tokens [N, H, Dh]
        return t.transpose(1, 2).reshape(b * s_full, hh, dh)[idx]

    runs = {"varlen": packed(attention.varlen_packed), "xformers": packed(attention.xformers_packed),
            "sdpa_per_segment": packed(attention.sdpa_packed), "dense_masked_sdpa": dense}
    results: dict[str, dict] = {}
    for name, run in runs.items():
        why = attention.unavailable(name, device, dtype) if name in ("varlen", "xformers") else None
        if why is not None:
            results[name] = {"unavailable": why}
            continue
        try:
            got = [unpad(t) if name == "dense_masked_sdpa" else t for t in run()]
            errs = [(g.float() - r).abs().max().item() for g, r in zip(got, ref)]
            del got
            base = reset_peak(device)
            ms = timed(run, device, sh.warmup, sh.attn_reps) * 1e3
            results[name] = {"fwd_bwd_ms": sig(ms), "max_abs_err_out": sig(errs[0]),
                             "max_abs_err_grad": sig(max(errs[1:])), "peak_gib": peak_gib(device, base)}
        except Exception as err:  # noqa: BLE001 - e.g. an OOM of the dense path
            traceback.print_exc(file=sys.stderr)
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        free(device)
    timed_ok = {k: r["fwd_bwd_ms"] for k, r in results.items() if "fwd_bwd_ms" in r}
    return {
        "shape": f"B={b} heads={hh} head_dim={dh} video={sh.frames}x{sh.frame_tokens} + {sh.refs} refs x "
                 f"{sh.ref_tokens} valid of {sh.frame_tokens} tokens, packed seqlens={seqlens}, padded S={s_full}",
        "dtype": str(dtype).removeprefix("torch."),
        "reference": "fp32 explicit softmax per segment on the same rounded inputs (TF32 off)",
        "ref_out_absmax": sig(ref_out_max), "ref_grad_absmax": sig(ref_grad_max),
        "backends": results,
        "fastest": min(timed_ok, key=timed_ok.get) if timed_ok else None,
        "auto_picks": attention.resolve_backend("auto", device, dtype),
    }


# ----------------------------------------------------------------------------------------------- training step


def model_flops(params: int, seqlens: list[int], dim: int, layers: int) -> float:
    """Model FLOPs of one training step: 6 x params x tokens + 12 x sum(N_b^2) x D x layers."""
    return 6.0 * params * sum(seqlens) + 12.0 * sum(s * s for s in seqlens) * dim * layers


def step_inputs(sh: Shape, dit: dict, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One clip: latents [1, C, F, h, w], text [1, L, D_text], references [1, K, C, h, w] whose coverage
    keeps exactly `ref_tokens` patches each ([1, K, 1, h, w], whole 2x2 patches in or out), counts [1]."""
    c = dit["out_channels"]
    z0 = torch.randn(1, c, sh.frames, sh.h, sh.w, generator=gen)
    text = torch.randn(1, sh.text_len, dit["text_dim"], generator=gen)
    refs = torch.randn(1, sh.refs, c, sh.h, sh.w, generator=gen)
    patches = torch.zeros(sh.refs, sh.frame_tokens)
    for j in range(sh.refs):
        patches[j, torch.randperm(sh.frame_tokens, generator=gen)[: sh.ref_tokens]] = 1.0
    cov = patches.view(1, sh.refs, 1, sh.h // 2, sh.w // 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    counts = torch.tensor([sh.refs])
    return tuple(t.to(device) for t in (z0, text, refs, cov, counts))


def bench_step(sh: Shape, dit: dict, device: torch.device, compute: torch.dtype, peak_tflops: float) -> dict:
    """Build the DiT on `device` (fp32), shard it with FSDP2 on the 1-rank group, time flow-loss + AdamW steps."""
    from diffusers import WanTransformer3DModel
    from torch.distributed.device_mesh import init_device_mesh

    from saber_pl.dit import SaberTransformer
    from saber_pl.parallel import shard_transformer

    torch.manual_seed(0)
    with torch.device(device):
        model = SaberTransformer(WanTransformer3DModel(**dit), attn_backend="auto")
    params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.wan.blocks[0].parameters())
    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("data_parallel",))
    shard_transformer(model, mesh, param_dtype=compute, reduce_dtype=torch.float32, activation_checkpointing=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    z0, text, refs, cov, counts = step_inputs(sh, dit, device, gen)
    flow = FlowConfig()
    losses: list[float] = []

    def step() -> None:
        t = sample_timesteps(flow, 1, device=device)  # [1]
        noise = torch.randn_like(z0)
        pred = model(interpolate(z0, noise, t), t * 1000.0, text, refs, cov, counts)  # [1, C, F, h, w]
        loss = per_sample_mse(pred, velocity_target(z0, noise)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for _ in range(sh.warmup):
        step()
    base = reset_peak(device)  # parameters, AdamW state: all counted (base is reported apart)
    s_step = timed(step, device, 0, sh.reps)
    peak = peak_gib(device)
    layers, dim = dit["num_layers"], dit["num_attention_heads"] * dit["attention_head_dim"]
    flops = model_flops(params, [sh.seq], dim, layers)
    out = {
        "layers": layers, "dim": dim, "ffn": dit["ffn_dim"], "params": params, "block_params": block_params,
        "tokens": sh.seq, "text_tokens": sh.text_len, "s_per_step": sig(s_step), "peak_gib": peak,
        "allocated_before_step_gib": sig(base / GiB) if device.type == "cuda" else None,
        "model_tflop_per_step": sig(flops / 1e12), "mfu": sig(flops / (s_step * peak_tflops * 1e12)),
        "attention_backend": _picked(device, compute),
        "final_loss": losses[-1],
    }
    del model, opt, z0, text, refs, cov
    free(device)
    return out


def _picked(device: torch.device, dtype: torch.dtype) -> str:
    return attention.resolve_backend("auto", device, dtype)


def bench_step_section(sh: Shape, device: torch.device, compute: torch.dtype, peak_tflops: float) -> dict:
    out = bench_step(sh, sh.step_dit, device, compute, peak_tflops)
    out["what"] = (f"1 clip {sh.frames}x{sh.h}x{sh.w} latent + {sh.refs} refs at {sh.coverage:.0%} coverage, "
                   f"flow loss, AdamW, FSDP2 1 rank ({str(compute).removeprefix('torch.')} compute, fp32 master), "
                   "activation checkpointing")
    return out


def bench_blocks(sh: Shape, device: torch.device, compute: torch.dtype, peak_tflops: float, scale: str) -> dict:
    """The wide DiT at two depths: one block = the difference; extrapolated to `wide_layers` blocks."""
    deep, shallow = sh.block_layers
    runs = {n: bench_step(sh, {**sh.wide_dit, "num_layers": n}, device, compute, peak_tflops) for n in (deep, shallow)}
    a, b = runs[deep], runs[shallow]
    per_block_s = (a["s_per_step"] - b["s_per_step"]) / (deep - shallow)
    per_block_gib = None if a["peak_gib"] is None else (a["peak_gib"] - b["peak_gib"]) / (deep - shallow)
    block_params = (a["params"] - b["params"]) // (deep - shallow)
    layers = sh.wide_layers
    params = a["params"] + (layers - deep) * block_params
    step_s = a["s_per_step"] + (layers - deep) * per_block_s
    flops = model_flops(params, [sh.seq], a["dim"], layers)
    out = {
        "dim": a["dim"], "ffn": a["ffn"], "tokens": sh.seq, f"s_per_step_{deep}_blocks": a["s_per_step"],
        f"s_per_step_{shallow}_blocks": b["s_per_step"], f"peak_gib_{deep}_blocks": a["peak_gib"],
        f"peak_gib_{shallow}_blocks": b["peak_gib"], "ms_per_block": sig(per_block_s * 1e3),
        "gib_per_block": sig(per_block_gib),
        # fp32 parameter + gradient + 2 AdamW moments of one block (unsharded: 1 rank); the rest is activations
        "gib_per_block_state": sig(16 * block_params / GiB),
        "block_params": block_params, "extrapolated_layers": layers, "extrapolated_params": params,
        "extrapolated_s_per_step": sig(step_s),
        "extrapolated_model_tflop_per_step": sig(flops / 1e12),
        "extrapolated_mfu": sig(flops / (step_s * peak_tflops * 1e12)),
        "extrapolation": f"step({layers}) = step({deep}) + {layers - deep} x block; compute of one rank with "
                         "batch 1, no FSDP communication (on 64 GPUs the all-gathers overlap compute)",
        "plan": plan_estimate(scale, peak_tflops),
    }
    return out


def plan_estimate(scale: str, peak_tflops: float) -> dict:
    """`saber_pl.plan`'s step-time estimate for saber_full at `scale` on 64 GPUs, if that module imports."""
    try:
        from saber_pl import plan
        from saber_pl.config import load_config

        p = plan.make_plan(load_config("saber_full", scale), world=64, gpu_mem_gib=80.0, peak_tflops=peak_tflops)
        out = {"step_time_s": getattr(p, "step_time_s", None), "mfu_assumed": getattr(p, "mfu", None),
               "peak_gib_per_rank_64_gpus": getattr(p, "peak_gib", None)}
        flops = getattr(p, "flops", {}) or {}
        if "model per rank per step" in flops:
            out["model_tflop_per_rank_step"] = flops["model per rank per step"] / 1e12
        tokens = getattr(p, "tokens", {}) or {}
        if "per micro-batch (expected)" in tokens:
            out["tokens_expected"] = tokens["per micro-batch (expected)"]
        return {k: (sig(v) if isinstance(v, float) else v) for k, v in out.items() if v is not None}
    except Exception as err:  # noqa: BLE001 - plan.py is optional and its API may move
        return {"unavailable": f"{type(err).__name__}: {err}"[:300]}


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, float32, on the CPU (seconds)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    ap.add_argument("--sections", default="attention,step,block14b", help="comma-separated subset to run")
    ap.add_argument("--time-limit", type=float, default=450.0, help="seconds after which no new section starts")
    ap.add_argument("--attn-batch", type=int, default=None, help="clips in the attention slice (default 1; smoke 2)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # diffusers' modules return views (harmless)
    start = time.monotonic()
    deadline = start + args.time_limit

    sh = SMOKE if args.smoke else FULL
    if args.attn_batch:
        sh = replace(sh, attn_batch=args.attn_batch)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke")
    else:
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        torch.cuda.set_device(device)

    result: dict[str, Any] = {
        "smoke": args.smoke, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": args.peak_tflops,
        "mfu_formula": "model FLOPs / (s_per_step x peak); model FLOPs = 6 x params x tokens + "
                       "12 x tokens^2 x dim x layers (packed tokens per clip; no cross-attention, no recompute)",
    }
    wanted = set(args.sections.split(","))
    if "attention" in wanted:
        result["attention"] = section("attention", lambda: bench_attention(sh, device, dtype), deadline)
    if wanted & {"step", "block14b"}:
        # FSDP2 needs a process group: one rank, in-process store (no network, no launcher)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        try:
            if "step" in wanted:
                result["step_1.3B"] = section(
                    "step", lambda: bench_step_section(sh, device, dtype, args.peak_tflops), deadline)
            if "block14b" in wanted:
                result["blocks_14B"] = section(
                    "block14b", lambda: bench_blocks(sh, device, dtype, args.peak_tflops,
                                                     "tiny" if args.smoke else "14B"), deadline)
        finally:
            dist.destroy_process_group()
    result["elapsed_s"] = round(time.monotonic() - start, 1)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), default=str))
