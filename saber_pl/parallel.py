"""FSDP2 sharding of the Saber DiT: one `fully_shard` unit per transformer block, plus the root.

Called from a LightningModule's `configure_model` under Lightning's `ModelParallelStrategy`:

    def configure_model(self):
        shard_transformer(self.transformer, self.device_mesh["data_parallel"],
                          param_dtype=torch.bfloat16, reduce_dtype=torch.float32, activation_checkpointing=True)

Build the optimizer after this call (from the sharded parameters). Distributed checkpoints of the
sharded state are written by Lightning (or `torch.distributed.checkpoint` directly).
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from saber_pl.dit import SaberTransformer


def shard_transformer(
    model: SaberTransformer,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    activation_checkpointing: bool = True,
) -> SaberTransformer:
    """Shard `model` in place over the 1-D data-parallel `mesh` and return it.

    Each block is (optionally) wrapped for activation checkpointing first and then sharded, as torchtitan
    does, so recomputation happens inside the block's FSDP unit. The root unit does not cast its inputs:
    the timestep must stay fp32 (bf16 cannot hold e.g. 999.3); SaberTransformer casts latents and text to
    the parameter dtype itself.
    """
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    blocks = model.wan.blocks
    for i in range(len(blocks)):
        if activation_checkpointing:
            blocks[i] = checkpoint_wrapper(blocks[i])  # non-reentrant; state-dict keys stay unchanged
        fully_shard(blocks[i], mesh=mesh, mp_policy=block_policy)
    model.gradient_checkpointing = False  # the wrapper does it; never checkpoint twice
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model
