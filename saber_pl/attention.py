"""Packed, reference-masked attention for the Saber DiT.

Saber's self-attention lets every token see all video tokens and the *valid* reference tokens (those
inside the reference mask). Invalid reference tokens are never read by a valid token, so they are
dropped before the first block; the valid tokens of each sample are packed back to back into one
sequence `[1, sum(S_b), ...]` (the batch may mix clips with different numbers of references), and
attention runs block-diagonally over the packed samples:

- `xformers`: `memory_efficient_attention` with a `BlockDiagonalMask` (CUDA only, imported lazily);
- `sdpa`: one PyTorch `scaled_dot_product_attention` call per packed sample (anywhere; no dense mask);
- `reference`: an explicit softmax over a dense boolean mask (tests and the dense debug path only).

`SaberAttnProcessor` is diffusers' `WanAttnProcessor` with the attention call replaced by the above; it
is installed on `attn1` and `attn2` of every diffusers `WanTransformerBlock`, which then runs on the
packed sequence unchanged.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections
from torch import Tensor

log = logging.getLogger(__name__)

AttnBackend = Literal["auto", "xformers", "sdpa"]
_BACKENDS = ("auto", "xformers", "sdpa")
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


def _xformers_works(device: torch.device) -> bool:
    """True when xformers imports and its kernel runs here (builds for another torch import but fail)."""
    if device.type != "cuda":
        return False
    try:
        import xformers.ops as xops  # lazy: only on CUDA

        q = torch.zeros(1, 4, 1, 8, device=device, dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


_resolved: dict[tuple[str, str], str] = {}


def resolve_backend(requested: str, device: torch.device) -> str:
    """Pick the attention backend for `device` ("auto": xformers on CUDA when it works, else sdpa)."""
    if requested not in _BACKENDS:
        raise ValueError(f"attn_backend must be one of {_BACKENDS}, got {requested!r}")
    key = (requested, str(device))
    if key not in _resolved:
        if requested == "sdpa":
            chosen = "sdpa"
        elif requested == "xformers":
            if not _xformers_works(device):
                raise ValueError(
                    f"attn_backend='xformers' but xformers' memory_efficient_attention does not run on {device} "
                    "(CUDA only, and the xformers build must match torch); use attn_backend='sdpa' or 'auto'"
                )
            chosen = "xformers"
        else:
            chosen = "xformers" if _xformers_works(device) else "sdpa"
        _resolved[key] = chosen
        _log_once(f"saber attention backend: {chosen} (requested {requested}, device {device})")
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


def packed_attention(
    q: Tensor, k: Tensor, v: Tensor, q_seqlens: list[int], kv_seqlens: list[int], backend: str,
    key_valid: Tensor | None = None,
) -> Tensor:
    """Attention of each packed query segment to its own key segment. q [1, Nq, H, Dh] -> [1, Nq, H, Dh]."""
    if key_valid is not None or backend == "reference":
        return reference_attention(q, k, v, dense_mask(q_seqlens, kv_seqlens, key_valid, q.device))
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

        backend = resolve_backend(self.backend, query.device)
        key_valid = packing.key_valid if context is None else None
        out = packed_attention(query, key, value, packing.seqlens, kv_seqlens, backend, key_valid)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
