"""Packed reference attention vs dense masking, and a Saber training step vs a stock Wan step.

    PYTHONPATH=. .venv/bin/python benchmarks/attention.py

Prints one JSON line.
1. Attention slice (4 heads x 128 head dim, float32, CPU): video = 5 latent frames of 30x52 latents in 2x2
   patches (5 x 15 x 26 = 1950 tokens); references of 15 x 26 = 390 tokens with ~30 % of tokens inside an
   elliptic mask; batch 2 with K = 3 and K = 1. Dense: SDPA over all samples padded to Kmax = 3 with a
   boolean key mask [B, 1, S, S]. Packed: invalid tokens dropped, one SDPA call per sample.
   Goal: `speedup` >= `flop_ratio` (dense FLOPs / packed FLOPs), `max_abs_err` ~ 1e-6.
2. Whole model at the mini scale: Saber forward+backward (the same clips plus references) over the stock
   diffusers Wan forward+backward. Goal: `saber_over_stock_step_ratio` <= `token_ratio` * 1.1. Attention is
   quadratic in the tokens, so `step_flop_ratio` (analytic block FLOPs, Saber over stock) is printed too:
   the packing itself should cost nothing beyond it.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from saber_pl.attention import sdpa_packed
from saber_pl.dit import SaberTransformer
from saber_pl.wan import SCALES

HEADS, HEAD_DIM, FRAMES, HP, WP, KMAX, COUNTS, COVERAGE = 4, 128, 5, 15, 26, 3, (3, 1), 0.3


def ellipse_mask(hp: int, wp: int, area: float, gen: torch.Generator) -> torch.Tensor:
    """A random axis-aligned ellipse covering about `area` of an hp x wp grid. -> [hp, wp] bool."""
    cy, cx = (torch.rand(2, generator=gen) * 0.4 + 0.3).tolist()
    aspect = float(torch.rand(1, generator=gen) * 1.0 + 0.5)
    ry = (area * hp * wp / (torch.pi * aspect)) ** 0.5
    rx = ry * aspect
    y, x = torch.meshgrid(torch.arange(hp) + 0.5, torch.arange(wp) + 0.5, indexing="ij")
    return ((y - cy * hp) / ry) ** 2 + ((x - cx * wp) / rx) ** 2 <= 1.0


def timed_pair(fn_a, fn_b, reps: int) -> tuple[float, float]:
    """Median CPU times (ms) of two functions, alternated.

    One torch thread and process CPU time rather than wall time: the 2 cores are shared, and wall time
    swings by 2x with the other load while the CPU time of a single-threaded run stays put.
    """
    fn_a(), fn_b()  # warm-up
    times_a, times_b = [], []
    for _ in range(reps):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.process_time()
            fn()
            times.append((time.process_time() - start) * 1e3)
    return statistics.median(times_a), statistics.median(times_b)


def attention_slice(reps: int = 3) -> dict:
    gen = torch.Generator().manual_seed(0)
    s_vid, s_ref = FRAMES * HP * WP, HP * WP
    s_full, b = s_vid + KMAX * s_ref, len(COUNTS)
    valid = torch.ones(b, s_full, dtype=torch.bool)
    for i, k in enumerate(COUNTS):
        refs = torch.zeros(KMAX, s_ref, dtype=torch.bool)
        for j in range(k):
            refs[j] = ellipse_mask(HP, WP, COVERAGE, gen).flatten()
        valid[i, s_vid:] = refs.flatten()
    q, k, v = (torch.randn(b, s_full, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
    grad_out = torch.randn(b, s_full, HEADS, HEAD_DIM, generator=gen)
    idx = valid.flatten().nonzero().squeeze(1)
    seqlens = valid.sum(1).tolist()
    mask = valid[:, None, None, :].expand(b, 1, s_full, s_full)  # [B, 1, S, S] keys that may be read
    # the model packs once before the first block, so the gather is not part of an attention call
    q_p, k_p, v_p, grad_p = (t.flatten(0, 1)[idx][None] for t in (q, k, v, grad_out))  # [1, N, H, Dh]

    def dense() -> torch.Tensor:
        qd, kd, vd = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask).transpose(1, 2)  # [B, S, H, Dh]
        out.backward(grad_out)
        return out.detach()

    def packed() -> torch.Tensor:
        qp, kp, vp = (t.detach().requires_grad_() for t in (q_p, k_p, v_p))
        out = sdpa_packed(qp, kp, vp, seqlens, seqlens)  # [1, N, H, Dh]
        out.backward(grad_p)
        return out.detach()

    err = (packed()[0] - dense().flatten(0, 1)[idx]).abs().max().item()
    dense_ms, packed_ms = timed_pair(dense, packed, reps)
    dense_flops, packed_flops = b * s_full**2, sum(s * s for s in seqlens)
    return {
        "attn_shape": f"B={b} K={list(COUNTS)} heads={HEADS} head_dim={HEAD_DIM} video={FRAMES}x{HP}x{WP} tokens "
        f"ref={HP}x{WP} tokens coverage~{COVERAGE} padded_S={s_full} packed_seqlens={seqlens}",
        "dense_ms": round(dense_ms, 1),
        "packed_ms": round(packed_ms, 1),
        "speedup": round(dense_ms / packed_ms, 3),
        "flop_ratio": round(dense_flops / packed_flops, 3),
        "flops_saved_frac": round(1 - packed_flops / dense_flops, 4),
        "max_abs_err": err,
    }


def block_flops(seq: int, text_len: int, dim: int, ffn: int) -> int:
    """Forward FLOPs of one Wan block on one sample: projections, FFN, self- and cross-attention."""
    linear = seq * (2 * 4 * dim * dim + 2 * 2 * dim * dim + 2 * 2 * dim * ffn) + text_len * 2 * 2 * dim * dim
    return linear + 4 * seq * seq * dim + 4 * seq * text_len * dim


def model_step(reps: int = 5) -> dict:
    """Saber vs stock Wan forward+backward at the mini scale (2 clips of 17 frames at 64x64 pixels)."""
    gen = torch.Generator().manual_seed(1)
    dit = SCALES["mini"]().dit
    torch.manual_seed(0)
    stock = WanTransformer3DModel(**dit)
    saber = SaberTransformer(copy.deepcopy(stock))
    c, f, h, w = dit["out_channels"], 5, 32, 32
    b, kmax = len(COUNTS), max(COUNTS)
    z = torch.randn(b, c, f, h, w, generator=gen)
    t = torch.rand(b, generator=gen) * 1000
    text = torch.randn(b, 64, dit["text_dim"], generator=gen)
    refs = torch.randn(b, kmax, c, h, w, generator=gen)
    cov = torch.stack([
        torch.stack([ellipse_mask(h, w, COVERAGE, gen).float() for _ in range(kmax)]) for _ in range(b)
    ])[:, :, None]  # [B, K, 1, h, w]
    counts = torch.tensor(COUNTS)

    def stock_step() -> None:
        stock.zero_grad(set_to_none=True)
        stock(z, t, text).sample.square().mean().backward()

    def saber_step() -> None:
        saber.zero_grad(set_to_none=True)
        saber(z, t, text, refs, cov, counts).square().mean().backward()

    ph, pw = dit["patch_size"][1:]
    pooled = F.avg_pool2d(cov.flatten(0, 1), (ph, pw)).view(b, kmax, -1) >= 0.5
    ref_tokens = sum(int(pooled[i, :n].sum()) for i, n in enumerate(COUNTS))
    s_vid = f * (h // ph) * (w // pw)
    stock_tokens = b * s_vid
    dim = dit["num_attention_heads"] * dit["attention_head_dim"]
    saber_seqs = [s_vid + int(pooled[i, :n].sum()) for i, n in enumerate(COUNTS)]
    flops = lambda seqs: sum(block_flops(s, text.shape[1], dim, dit["ffn_dim"]) for s in seqs)  # noqa: E731
    stock_ms, saber_ms = timed_pair(stock_step, saber_step, reps)
    return {
        "step_shape": f"mini scale, B={b} K={list(COUNTS)} latents {c}x{f}x{h}x{w}, coverage~{COVERAGE}",
        "stock_step_ms": round(stock_ms, 1),
        "saber_step_ms": round(saber_ms, 1),
        "saber_over_stock_step_ratio": round(saber_ms / stock_ms, 3),
        "token_ratio": round((stock_tokens + ref_tokens) / stock_tokens, 3),
        # attention is quadratic in the tokens and ~60 % of a mini step, so FLOPs grow faster than tokens
        "step_flop_ratio": round(flops(saber_seqs) / flops([s_vid] * b), 3),
    }


def main() -> None:
    torch.set_num_threads(1)
    result = {"timing": "median CPU ms, 1 thread, float32", **attention_slice(), **model_step()}
    result["goal_speedup_ge_flop_ratio"] = result["speedup"] >= result["flop_ratio"]
    result["goal_step_ratio_le_1.1x_token_ratio"] = result["saber_over_stock_step_ratio"] <= 1.1 * result["token_ratio"]
    result["goal_step_ratio_le_1.1x_flop_ratio"] = result["saber_over_stock_step_ratio"] <= 1.1 * result["step_flop_ratio"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
