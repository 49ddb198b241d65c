"""Packed, reference-masked attention for the Saber DiT.

Saber's self-attention lets every token see all video tokens and the *valid* reference tokens (those
inside the reference mask). Invalid reference tokens are never read by a valid token, so they are
dropped before the first block; the valid tokens of each sample are packed back to back into one
sequence `[1, sum(S_b), ...]` (the batch may mix clips with different numbers of references), and
attention runs block-diagonally over the packed samples:

- `varlen`: PyTorch's `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2, CUDA sm80+, bf16/fp16) with
  the packing's cumulative sequence lengths; the fastest exact kernel (benchmarks/gpu.py, docs/gpu.md);
- `xformers`: `memory_efficient_attention` with a `BlockDiagonalMask` (CUDA, any float dtype);
- `sdpa`: one PyTorch `scaled_dot_product_attention` call per packed sample (anywhere; no dense mask);
- `reference`: an explicit softmax over a dense boolean mask (tests and the dense debug path only).

`auto` takes the first of varlen, xformers, sdpa that runs on the inputs' device and dtype (on the CPU always
sdpa). Asking for `varlen` or `xformers` where it cannot run is an error naming the reason, never a silent
fallback: a run configured for a kernel gets that kernel. Both GPU kernels are imported lazily, on CUDA only.

`SaberAttnProcessor` is diffusers' `WanAttnProcessor` with the attention call replaced by the above; it
is installed on `attn1` and `attn2` of every diffusers `WanTransformerBlock`, which then runs on the
packed sequence unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections
from torch import Tensor

log = logging.getLogger(__name__)

AttnBackend = Literal["auto", "varlen", "xformers", "sdpa"]
_BACKENDS = ("auto", "varlen", "xformers", "sdpa")
_HALF = (torch.bfloat16, torch.float16)
_logged: set[str] = set()


class Packing:
    """Layout of a packed batch: sample b owns tokens `offsets[b] : offsets[b] + seqlens[b]`.

    `key_valid` ([N] bool) is only set on the dense debug path, where every token is kept and invalid keys
    are masked instead. A plain class (not a dataclass) on purpose: FSDP's input casting walks dataclasses
    and would cast the RoPE tables of `PackedRotary` to bf16.
    """

    def __init__(self, seqlens: list[int], key_valid: Tensor | None = None) -> None:
        self.seqlens = [int(s) for s in seqlens]
        self.key_valid = key_valid
        self.offsets = [0]
        for s in self.seqlens:
            self.offsets.append(self.offsets[-1] + s)

    @property
    def total(self) -> int:
        return self.offsets[-1]


class PackedRotary:
    """Per-token RoPE tables of a packed batch plus its `Packing`.

    Passed to diffusers' blocks in the `rotary_emb` slot, which they hand to `attn1` untouched; this is how
    the packing reaches the processor, also when activation checkpointing re-runs a block in backward.
    """

    def __init__(self, cos: Tensor, sin: Tensor, packing: Packing) -> None:
        self.cos = cos  # [1, N, 1, head_dim]
        self.sin = sin  # [1, N, 1, head_dim]
        self.packing = packing


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def _probe(device: torch.device, dtype: torch.dtype, run: Callable[[Tensor], None]) -> str | None:
    """Run a tiny attention call; None when it works, else the error (a build for another torch imports but fails)."""
    try:
        with torch.no_grad():
            run(torch.zeros(4, 1, 8, device=device, dtype=dtype))  # q = k = v [N, H, Dh]
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "not usable here"
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def _varlen_run(q: Tensor) -> None:
    from torch.nn.attention.varlen import varlen_attn  # lazy: public since torch 2.10

    cu = torch.tensor([0, q.shape[0]], device=q.device, dtype=torch.int32)
    varlen_attn(q, q, q, cu, cu, q.shape[0], q.shape[0])


def _xformers_run(q: Tensor) -> None:
    import xformers.ops as xops  # lazy: only on CUDA

    xops.memory_efficient_attention(q[None], q[None], q[None])


@functools.lru_cache(maxsize=None)
def unavailable(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run on `device` for `dtype` inputs, or None when it can (probed once per key)."""
    if backend in ("sdpa", "reference"):
        return None
    if device.type != "cuda":
        return f"{backend} is CUDA only (inputs on {device})"
    if backend == "varlen":
        if dtype not in _HALF:
            return f"varlen_attn (FlashAttention-2) takes bf16/fp16, inputs are {dtype}"
        try:
            import torch.nn.attention.varlen  # noqa: F401
        except ImportError as err:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10): {err}"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"varlen_attn needs an sm80+ GPU (A100 or newer), {device} is sm{major}{minor}"
        return _probe(device, dtype, _varlen_run)
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as err:  # noqa: BLE001 - ImportError or a broken build
            return f"xformers does not import: {type(err).__name__}: {err}"[:300]
        return _probe(device, dtype, _xformers_run)
    raise ValueError(f"attn_backend must be one of {_BACKENDS}, got {backend!r}")


_resolved: dict[tuple[str, str, torch.dtype], str] = {}


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel for q/k/v of `dtype` on `device`.

    auto: varlen, else xformers, else sdpa, the first that runs here (the CPU: sdpa). An explicit varlen or
    xformers that cannot run raises ValueError with the reason (no silent fallback).
    """
    if requested not in _BACKENDS:
        raise ValueError(f"attn_backend must be one of {_BACKENDS}, got {requested!r}")
    key = (requested, str(device), dtype)
    if key not in _resolved:
        if requested == "auto":
            chosen = next(b for b in ("varlen", "xformers", "sdpa") if unavailable(b, device, dtype) is None)
        elif (why := unavailable(requested, device, dtype)) is not None:
            raise ValueError(f"attn_backend={requested!r} cannot run here: {why}; "
                             "use attn_backend='auto' (picks what runs) or 'sdpa'")
        else:
            chosen = requested
        _resolved[key] = chosen
        _log_once(f"saber attention backend: {chosen} (requested {requested}, device {device}, {dtype})")
    return _resolved[key]


def dense_mask(
    q_seqlens: list[int], kv_seqlens: list[int], key_valid: Tensor | None = None, device: torch.device | None = None
) -> Tensor:
    """Block-diagonal boolean mask [Nq, Nk] (True = may attend), optionally also masking invalid keys."""
    q_seg = torch.repeat_interleave(torch.arange(len(q_seqlens), device=device), torch.tensor(q_seqlens, device=device))
    k_seg = torch.repeat_interleave(torch.arange(len(kv_seqlens), device=device), torch.tensor(kv_seqlens, device=device))
    mask = q_seg[:, None] == k_seg[None, :]
    if key_valid is not None:
        mask = mask & key_valid.to(device=mask.device, dtype=torch.bool)[None, :]
    return mask


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Plain attention with an explicit softmax over a dense mask, for tests.

    q [1, Nq, H, Dh], k/v [1, Nk, H, Dh], mask [Nq, Nk] bool -> [1, Nq, H, Dh].
    """
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5  # [1, H, Nq, Nk]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def sdpa_packed(q: Tensor, k: Tensor, v: Tensor, q_seqlens: list[int], kv_seqlens: list[int]) -> Tensor:
    """Block-diagonal attention as one SDPA call per packed sample (no dense mask is ever built).

    Written by hand because PyTorch has no variable-length SDPA on the CPU (FlexAttention has no CPU backward).
    q [1, Nq, H, Dh], k/v [1, Nk, H, Dh] -> [1, Nq, H, Dh].
    """
    outs = [
        F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)).transpose(1, 2)
        for qs, ks, vs in zip(q.split(q_seqlens, 1), k.split(kv_seqlens, 1), v.split(kv_seqlens, 1))
    ]
    return torch.cat(outs, dim=1)


def xformers_packed(q: Tensor, k: Tensor, v: Tensor, q_seqlens: list[int], kv_seqlens: list[int]) -> Tensor:
    """Block-diagonal attention with xformers' fused varlen kernel (CUDA). Shapes as `sdpa_packed`."""
    import xformers.ops as xops  # lazy: only on CUDA
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    bias = BlockDiagonalMask.from_seqlens(q_seqlens, kv_seqlens, device=q.device)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)


def cu_seqlens(seqlens: tuple[int, ...], device: torch.device) -> Tensor:
    """Cumulative sequence lengths [B + 1] int32 on `device`: the `Packing` offsets, as varlen kernels take them.

    Cached: every block of a step (and its recomputation) reuses one host-to-device copy. The key includes
    inference mode, since a tensor made under `torch.inference_mode` (validation) cannot be saved for backward.
    """
    return _cu_seqlens(tuple(seqlens), device, torch.is_inference_mode_enabled())


@functools.lru_cache(maxsize=256)
def _cu_seqlens(seqlens: tuple[int, ...], device: torch.device, inference: bool) -> Tensor:
    return torch.tensor(Packing(list(seqlens)).offsets, dtype=torch.int32, device=device)


def varlen_packed(q: Tensor, k: Tensor, v: Tensor, q_seqlens: list[int], kv_seqlens: list[int]) -> Tensor:
    """Block-diagonal attention with `torch.nn.attention.varlen.varlen_attn` (CUDA). Shapes as `sdpa_packed`.

    The kernel takes [N, H, Dh] and the segment boundaries as cumulative lengths; default scale 1/sqrt(Dh).
    """
    from torch.nn.attention.varlen import varlen_attn  # lazy: public since torch 2.10

    cu_q = cu_seqlens(tuple(q_seqlens), q.device)
    cu_k = cu_seqlens(tuple(kv_seqlens), q.device)
    out = varlen_attn(q[0], k[0], v[0], cu_q, cu_k, max(q_seqlens), max(kv_seqlens))  # [Nq, H, Dh]
    return out.unsqueeze(0)


def packed_attention(
    q: Tensor, k: Tensor, v: Tensor, q_seqlens: list[int], kv_seqlens: list[int], backend: str,
    key_valid: Tensor | None = None,
) -> Tensor:
    """Attention of each packed query segment to its own key segment. q [1, Nq, H, Dh] -> [1, Nq, H, Dh]."""
    if key_valid is not None or backend == "reference":
        return reference_attention(q, k, v, dense_mask(q_seqlens, kv_seqlens, key_valid, q.device))
    if backend == "varlen":
        return varlen_packed(q, k, v, q_seqlens, kv_seqlens)
    if backend == "xformers":
        return xformers_packed(q, k, v, q_seqlens, kv_seqlens)
    return sdpa_packed(q, k, v, q_seqlens, kv_seqlens)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's interleaved RoPE, copied from `WanAttnProcessor.__call__` (defined inline there, not importable)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SaberAttnProcessor:
    """`WanAttnProcessor` on a packed batch (self- and cross-attention, no CLIP image branch).

    Self-attention (`attn1`) gets a `PackedRotary` in the `rotary_emb` slot. Diffusers' block calls
    `attn2` with no mask and no RoPE, so the cross-attention reads the packing that `attn1` of the same
    block stored just before (a block always runs attn1 then attn2, also when checkpointing recomputes it).
    """

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend
        self._packing: Packing | None = None

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: Tensor,  # [1, N, D] packed tokens
        encoder_hidden_states: Tensor | None = None,  # [B, L, D] text (cross-attention only)
        attention_mask: Tensor | None = None,
        rotary_emb: PackedRotary | None = None,
    ) -> Tensor:
        if attn.add_k_proj is not None:
            raise ValueError("SaberAttnProcessor has no CLIP image branch: drop it first (dit.drop_image_branch)")
        if attention_mask is not None:
            raise ValueError("SaberAttnProcessor takes its mask from the packing, not attention_mask")
        if encoder_hidden_states is None:
            if not isinstance(rotary_emb, PackedRotary):
                raise ValueError("self-attention needs a PackedRotary in rotary_emb (run through SaberTransformer)")
            packing = self._packing = rotary_emb.packing
            kv_seqlens, context = packing.seqlens, None
        else:
            if self._packing is None:
                raise RuntimeError("cross-attention ran before any packed self-attention")
            packing = self._packing
            kv_seqlens = [encoder_hidden_states.shape[1]] * encoder_hidden_states.shape[0]
            context = encoder_hidden_states.flatten(0, 1).unsqueeze(0)  # [1, B*L, D]

        query, key, value = _get_qkv_projections(attn, hidden_states, context)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [1, N, H, Dh]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if context is None:
            query = apply_rotary_emb(query, rotary_emb.cos, rotary_emb.sin)
            key = apply_rotary_emb(key, rotary_emb.cos, rotary_emb.sin)

        if query.is_cuda and torch.is_autocast_enabled("cuda") and query.dtype == torch.float32:
            # under autocast (DDP + bf16-mixed) the RMSNorm'd q/k are float32; SDPA would cast them itself
            half = torch.get_autocast_dtype("cuda")
            query, key, value = query.to(half), key.to(half), value.to(half)
        backend = resolve_backend(self.backend, query.device, query.dtype)
        key_valid = packing.key_valid if context is None else None
        out = packed_attention(query, key, value, packing.seqlens, kv_seqlens, backend, key_valid)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
