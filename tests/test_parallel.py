"""FSDP2 on 2 gloo CPU processes: same loss and gradients as one process, sharded checkpoint round trip."""

import copy

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from saber_pl.dit import SaberTransformer
from saber_pl.parallel import shard_transformer

WORLD = 2


def tiny_model(seed: int) -> SaberTransformer:
    from diffusers import WanTransformer3DModel

    from saber_pl.wan import SCALES

    torch.manual_seed(seed)
    return SaberTransformer(WanTransformer3DModel(**SCALES["tiny"]().dit), ref_timestep="zero")


def global_batch():
    """4 samples with different numbers of references (2 per rank), and the flow-matching target."""
    g = torch.Generator().manual_seed(7)
    b, k = 4, 2
    z = torch.randn(b, 16, 2, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 1000
    text = torch.randn(b, 5, 32, generator=g)
    refs = torch.randn(b, k, 16, 8, 8, generator=g)
    cov = torch.rand(b, k, 1, 8, 8, generator=g)
    counts = torch.tensor([2, 0, 1, 2])
    target = torch.randn(b, 16, 2, 8, 8, generator=g)
    return (z, t, text, refs, cov, counts), target


def full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def worker(rank: int, init_file: str, ckpt_dir: str) -> None:
    torch.set_num_threads(1)  # before any parallel region: a forked child must not reuse the parent's pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = tiny_model(seed=0)
    single = copy.deepcopy(model)
    inputs, target = global_batch()

    loss_single = torch.nn.functional.mse_loss(single(*inputs), target)
    loss_single.backward()

    shard_transformer(model, mesh, param_dtype=None, reduce_dtype=torch.float32, activation_checkpointing=True)
    part = slice(rank * 2, rank * 2 + 2)
    local = [x[part] for x in inputs]
    loss = torch.nn.functional.mse_loss(model(*local), target[part])
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / WORLD, loss_single.detach(), atol=1e-5, rtol=1e-5)

    want = dict(single.named_parameters())
    names = 0
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(full(p.grad), want[name].grad, atol=1e-5, rtol=1e-5, msg=name)
        names += 1
    assert names == len(want)

    state = get_model_state_dict(model)
    dcp.save(state, checkpoint_id=ckpt_dir)
    fresh = shard_transformer(tiny_model(seed=1), mesh, param_dtype=None, activation_checkpointing=True)
    fresh_state = get_model_state_dict(fresh)
    assert any(not torch.equal(full(fresh_state[k]), full(v)) for k, v in state.items())
    dcp.load(fresh_state, checkpoint_id=ckpt_dir)
    set_model_state_dict(fresh, fresh_state)
    for key, value in get_model_state_dict(fresh).items():
        assert torch.equal(full(value), full(state[key])), key

    # bf16 parameters (GPU setting): runs, keeps grads fp32 in the sharded params, stays close to fp32
    bf16 = shard_transformer(tiny_model(seed=0), mesh, param_dtype=torch.bfloat16, activation_checkpointing=True)
    out = bf16(*local)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), single(*local), atol=0.1, rtol=0.1)
    torch.nn.functional.mse_loss(out.float(), target[part]).backward()
    assert all(p.grad.dtype == torch.float32 for p in bf16.parameters())
    dist.destroy_process_group()


def test_fsdp2_two_processes_match_one_and_checkpoint_round_trips(tmp_path):
    # fork: the children inherit the imported torch/diffusers (spawn would re-import them, ~5 s each)
    mp.start_processes(
        worker, args=(str(tmp_path / "init"), str(tmp_path / "ckpt")), nprocs=WORLD, join=True, start_method="fork"
    )
