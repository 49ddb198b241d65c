"""FSDP2 sharding of the Saber DiT: fp32 master weights, bf16 compute, one unit group per block.

Called from a LightningModule's `configure_model` under Lightning's `ModelParallelStrategy` (kept at
Lightning precision ``32-true``: Lightning's ``bf16-true`` would cast the sharded parameters, and so
AdamW's moments and the EMA, to bf16 — PLATFORM.md):

    def configure_model(self):
        shard_transformer(self.dit, self.device_mesh["data_parallel"],
                          param_dtype=torch.bfloat16, reduce_dtype=torch.float32, activation_checkpointing=True)

The sharded parameters, their gradients, AdamW's moments and the EMA stay in the dtype the model was
built in (float32). FSDP2's `MixedPrecisionPolicy` all-gathers them in `param_dtype` for compute and
reduce-scatters gradients in `reduce_dtype`. The modules diffusers keeps in float32 when it loads a Wan
DiT in bf16 (`WanTransformer3DModel._keep_in_fp32_modules`: time embedder, modulation tables, norms) are
their own FSDP units with a float32 policy, so training computes exactly what `generate.py` computes
with the same weights (`generate.cast_like_pretrained`).

Build the optimizer after this call (from the sharded parameters).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from saber_pl.dit import SaberTransformer


def keep_fp32_names(model: SaberTransformer) -> set[str]:
    """Module / parameter names diffusers keeps in float32 under a bf16 load (same name rule)."""
    return set(getattr(model.wan, "_keep_in_fp32_modules", None) or [])


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _shard_children(parent: nn.Module, mesh: DeviceMesh, low: MixedPrecisionPolicy, fp32: MixedPrecisionPolicy,
                    keep: set[str], skip: tuple[str, ...] = ()) -> None:
    """Shard `parent`'s children that hold parameters: the low-precision ones as one FSDP unit group (one
    all-gather), each float32 one (a name in `keep`) as its own unit with the float32 policy."""
    low_group = []
    for name, child in parent.named_children():
        if name in skip or not _has_params(child):
            continue
        if name in keep:
            fully_shard(child, mesh=mesh, mp_policy=fp32)
        else:
            low_group.append(child)
    if low_group:
        fully_shard(low_group if len(low_group) > 1 else low_group[0], mesh=mesh, mp_policy=low)


def shard_transformer(
    model: SaberTransformer,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    activation_checkpointing: bool = True,
) -> SaberTransformer:
    """Shard `model` in place over the 1-D data-parallel `mesh` and return it.

    Per block: its attention and FFN as one bf16 unit group, and the block itself (its norm2 and its
    `scale_shift_table`, kept float32 by diffusers) as a float32 unit. Each block is (optionally) wrapped
    for activation checkpointing first, as torchtitan does, so recomputation happens inside the block's
    FSDP units. At the root: patch embedding, text/time projections and output projection in bf16, the
    time embedder and the output `scale_shift_table` in float32. No unit casts its forward inputs: the
    timestep must stay float32 (bf16 cannot hold e.g. 999.3); SaberTransformer casts latents and text to
    `model.compute_dtype` itself.
    """
    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    fp32 = MixedPrecisionPolicy(param_dtype=None if param_dtype is None else torch.float32,
                                reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    keep = keep_fp32_names(model) if param_dtype not in (None, torch.float32) else set()
    blocks = model.wan.blocks
    for i in range(len(blocks)):
        block = blocks[i]
        _shard_children(block, mesh, low, fp32, keep)
        if activation_checkpointing:
            blocks[i] = checkpoint_wrapper(block)  # non-reentrant; state-dict keys stay unchanged
        direct_low = any(n not in keep for n, _ in block.named_parameters(recurse=False))
        fully_shard(blocks[i], mesh=mesh, mp_policy=low if direct_low else fp32)
    model.gradient_checkpointing = False  # the wrapper does it; never checkpoint twice
    _shard_children(model.wan.condition_embedder, mesh, low, fp32, keep)
    _shard_children(model.wan, mesh, low, fp32, keep, skip=("blocks", "condition_embedder"))
    direct_low = any(n.split(".")[-1] not in keep for n, _ in model.wan.named_parameters(recurse=False))
    fully_shard(model, mesh=mesh, mp_policy=low if direct_low else fp32)
    model.compute_dtype = param_dtype
    return model
