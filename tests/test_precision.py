"""fp32 master weights with bf16 compute, and per-rank random draws, on the 14B path (FSDP2 + bf16-mixed).

The runs are real trainer subprocesses with the shipped strategy and precision on 2 gloo processes at scale
tiny. A small launcher wraps `SaberModule.flow_loss` to record what each rank draws at each step.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent

RECORDER = textwrap.dedent("""
    import json, os, sys
    import torch
    import saber_pl.module as m
    from saber_pl.flow import sample_timesteps
    real_draw, real_loss = m.draw_flow_inputs, m.SaberModule.flow_loss
    drawn = {}
    def draw(cfg, shape, device, generator):
        t, noise = real_draw(cfg, shape, device, generator)
        # 4096 more draws in the same context (default dtype, precision plugin) as the step's own
        big = sample_timesteps(cfg, 4096, device=device)
        drawn.update(t=t.tolist(), t_dtype=str(t.dtype), noise_dtype=str(noise.dtype),
                     noise=[float(noise.double().sum()), float(noise.double().abs().sum())],
                     distinct=int(big.unique().numel()), big_dtype=str(big.dtype))
        return t, noise
    def flow_loss(self, batch, generator=None):
        drawn.clear()
        out = real_loss(self, batch, generator)
        if generator is not None:  # training steps only
            row = dict(rank=self.global_rank, step=self.global_step, ref_counts=batch["ref_counts"].tolist(),
                       masks=float(batch["ref_masks"].double().sum()), refs=float(batch["refs"].double().sum()),
                       **drawn)
            with open(os.environ["SABER_RECORD"], "a") as f:
                f.write(json.dumps(row) + "\\n")
        return out
    m.draw_flow_inputs, m.SaberModule.flow_loss = draw, flow_loss
    from saber_pl.train import main
    sys.exit(main(sys.argv[1:]))
""")

SCALE_PATH = ["trainer.devices=2", "trainer.strategy=fsdp2", "trainer.precision=bf16-mixed", "optim.ema=true"]


def _run(tmp: Path, runs: str, record: Path, steps: int, *extra: str) -> None:
    script = tmp / "recorder.py"
    script.write_text(RECORDER)
    cmd = [sys.executable, str(script), "--exp", "saber_full", "--scale", "tiny", f"logging.runs_dir={tmp / runs}",
           f"trainer.max_steps={steps}", "trainer.ckpt_every_n_steps=1", "trainer.keep_top_k=1", "optim.lr=1e-5",
           "optim.warmup_steps=0", "optim.ema_decay=0.999", *SCALE_PATH, *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               SABER_RECORD=str(record))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def _rows(path: Path) -> dict[tuple[int, int], dict]:
    return {(r["rank"], r["step"]): r for r in map(json.loads, path.read_text().splitlines())}


def _dcp_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a distributed checkpoint, read in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
             if isinstance(v, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 3-step run, and a 1-step run resumed (same command) to step 3."""
    tmp = tmp_path_factory.mktemp("precision")
    _run(tmp, "straight", tmp / "straight.jsonl", 3)
    _run(tmp, "resumed", tmp / "resumed.jsonl", 1)
    ckpt = tmp / "resumed" / "saber_full-tiny" / "checkpoints" / "last.ckpt"
    step1 = tmp / "step1.ckpt"
    subprocess.run(["cp", "-rL", str(ckpt), str(step1)], check=True)  # last.ckpt links to the step checkpoint
    _run(tmp, "resumed", tmp / "resumed.jsonl", 3)
    return {"tmp": tmp, "straight": tmp / "straight.jsonl", "resumed": tmp / "resumed.jsonl", "step1": step1}


def test_sharded_state_is_fp32_and_one_step_at_lr_1e5_moves_weights_and_ema(runs: dict[str, Path]) -> None:
    from saber_pl.config import load_config
    from saber_pl.wan import build_components

    state = _dcp_tensors(runs["step1"])
    dit = {k[len("state_dict.dit."):]: v for k, v in state.items() if k.startswith("state_dict.dit.")}
    ema = {k[len("state_dict.dit_ema."):]: v for k, v in state.items() if k.startswith("state_dict.dit_ema.")}
    moments = {k: v for k, v in state.items() if k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert dit and set(ema) == set(dit) and len(moments) == 2 * len(dit)
    for name, tensor in {**dit, **{f"ema.{k}": v for k, v in ema.items()}, **moments}.items():
        assert tensor.dtype == torch.float32, name

    # The initial weights: the run's tiny DiT is built from a fixed seed, identically here.
    cfg = load_config("saber_full", "tiny")
    init = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in
            build_components(cfg.model).transformer.state_dict().items()}
    changed = sum(int((dit[k] != init[k]).sum()) for k in dit)
    total = sum(v.numel() for v in dit.values())
    assert changed / total >= 0.99, f"only {changed / total:.3f} of the weights moved in one AdamW step at lr 1e-5"
    # EMA (decay 0.999, from step 1 on): ema = init + 0.001 (dit - init), in fp32; it moved.
    ema_moved = sum(int((ema[k] != init[k]).sum()) for k in dit)
    assert ema_moved / total >= 0.5, f"the EMA moved on only {ema_moved / total:.3f} of the weights"
    for k in dit:
        torch.testing.assert_close(ema[k], init[k] + 0.001 * (dit[k] - init[k]), atol=2e-7, rtol=1e-6)


def test_timesteps_are_fp32_and_each_rank_draws_its_own(runs: dict[str, Path]) -> None:
    rows = _rows(runs["straight"])
    assert {s for _, s in rows} == {0, 1, 2} and {r for r, _ in rows} == {0, 1}
    for row in rows.values():
        assert row["t_dtype"] == row["noise_dtype"] == row["big_dtype"] == "torch.float32"
        assert row["distinct"] > 1000  # of 4096 draws in the step's context (bf16 has 126 in [0.5, 1))
    for step in range(3):
        r0, r1 = rows[(0, step)], rows[(1, step)]
        assert r0["t"] != r1["t"], f"ranks drew the same timesteps at step {step}"
        assert r0["noise"] != r1["noise"], f"ranks drew the same noise at step {step}"
        assert r0["masks"] != r1["masks"] and r0["refs"] != r1["refs"]  # masks and reference frames too
    assert any(rows[(0, s)]["ref_counts"] != rows[(1, s)]["ref_counts"] for s in range(3))  # and K


def test_resumed_run_replays_the_uninterrupted_draws(runs: dict[str, Path]) -> None:
    straight, resumed = _rows(runs["straight"]), _rows(runs["resumed"])
    assert set(resumed) == set(straight)  # steps 0 (first run), 1 and 2 (after the resume at step 1)
    for key in straight:
        assert resumed[key]["t"] == straight[key]["t"], key
        assert resumed[key]["noise"] == straight[key]["noise"], key


# ---------------------------------------------------------------------------------------- numerics


def _tiny_inputs(b: int = 2) -> tuple:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(b, 16, 2, 8, 8, generator=g), torch.rand(b, generator=g) * 1000,
            torch.randn(b, 5, 32, generator=g), torch.randn(b, 2, 16, 8, 8, generator=g),
            torch.rand(b, 2, 1, 8, 8, generator=g), torch.tensor([2, 1][:b]))


def _tiny_dit():
    from saber_pl.config import load_config
    from saber_pl.wan import build_components

    return build_components(load_config("saber_full", "tiny").model).transformer


def _fp32_inputs_of(module: torch.nn.Module, seen: list) -> None:
    module.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))


def _numerics_worker(rank: int, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from saber_pl.generate import cast_like_pretrained
    from saber_pl.parallel import shard_transformer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = _tiny_dit()
    reference = cast_like_pretrained(copy.deepcopy(model), torch.bfloat16)  # what generate.py runs in bf16
    inputs = _tiny_inputs()
    want = reference(*inputs)
    shard_transformer(model, init_device_mesh("cpu", (2,)), param_dtype=torch.bfloat16, activation_checkpointing=True)
    seen: list = []
    _fp32_inputs_of(model.wan.condition_embedder.time_embedder.linear_1, seen)
    got = model(*inputs)
    assert got.dtype == want.dtype == torch.bfloat16
    # Same weights, same dtypes per module: the same numbers (up to bf16 matmul reduction order).
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
    assert (got.float() - want.float()).abs().mean() < 1e-3
    assert seen == [(torch.float32, torch.float32)]  # the time embedder computes in fp32, as diffusers keeps it
    got.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
    dist.destroy_process_group()


def test_fsdp2_bf16_policy_computes_what_generate_computes(tmp_path: Path) -> None:
    mp.start_processes(_numerics_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True, start_method="fork")


def test_autocast_keeps_the_time_embedder_fp32() -> None:
    """DDP + bf16-mixed: fp32 weights under autocast; the time embedder still computes in fp32."""
    model = _tiny_dit()
    seen: list = []
    _fp32_inputs_of(model.wan.condition_embedder.time_embedder.linear_1, seen)
    blocks: list = []
    model.wan.blocks[0].ffn.net[2].register_forward_hook(lambda m, a, o: blocks.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*_tiny_inputs())
    assert seen == [(torch.float32, torch.float32)] and blocks == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    clone = copy.deepcopy(model)  # the EMA: its time embedder uses its own weights
    with torch.no_grad():
        for p in clone.wan.condition_embedder.time_embedder.parameters():
            p.zero_()
    x = torch.randn(1, 64)
    assert model.wan.condition_embedder.time_embedder(x).abs().sum() > 0
    assert clone.wan.condition_embedder.time_embedder(x).abs().sum() == 0


def test_raw_export_and_generate_read_the_trained_weights_not_the_ema(runs: dict[str, Path]) -> None:
    """`--raw` on a 2-rank sharded checkpoint with EMA: the trained weights; the default: the EMA."""
    from safetensors.torch import load_file

    from saber_pl.export import main as export_main
    from saber_pl.generate import load_run_dit, resolve_checkpoint

    run = runs["tmp"] / "resumed" / "saber_full-tiny"
    state = _dcp_tensors(run / "checkpoints" / "last.ckpt")
    trained = {k[len("state_dict.dit.wan."):]: v for k, v in state.items() if k.startswith("state_dict.dit.wan.")}
    ema = {k[len("state_dict.dit_ema.wan."):]: v for k, v in state.items() if k.startswith("state_dict.dit_ema.wan.")}
    assert any(not torch.equal(trained[k], ema[k]) for k in trained)
    for raw, want in ((True, trained), (False, ema)):
        out = runs["tmp"] / f"export_raw{raw}"
        assert export_main(["--run", str(run), "--out", str(out)] + (["--raw"] if raw else [])) == 0
        got = load_file(str(next(out.glob("*.safetensors"))))
        for k in want:
            assert torch.equal(got[k], want[k]), (raw, k)
        dit, prefix = load_run_dit(resolve_checkpoint(run), raw=raw, dtype=torch.float32)
        assert prefix == ("dit" if raw else "dit_ema")
        for k, v in dit.wan.state_dict().items():
            assert torch.equal(v, want[k]), (raw, k)
