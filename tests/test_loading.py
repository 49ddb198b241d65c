"""Sharded start-up (loading.py): 2 gloo FSDP2 ranks build the DiT on meta and read only their own slices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch.distributed.device_mesh import init_device_mesh
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from saber_pl import loading
from saber_pl.config import load_config
from saber_pl.wan import SCALES, i2v_dit, saber_dit

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
# T2V through the real-scale branch (frozen parts from the folder), I2V through tiny + an explicit wan_dir
CASES = {"t2v": ("1.3B", ["model.text_len=8"]), "i2v": ("tiny", ["model.init=i2v"])}


def write_folder(root: Path, i2v: bool) -> None:
    """A tiny Wan2.1 diffusers folder: the T2V DiT in several safetensors files with an index, the I2V one
    in one file. An odd FFN width makes FSDP2's last shard uneven (129 rows: 65 + 64), and
    `scale_shift_table` (1 row) leaves rank 1 an empty shard."""
    dit = {**SCALES["tiny"]().dit, "ffn_dim": 129}
    shard = {} if i2v else {"max_shard_size": "100KB"}
    WanTransformer3DModel(**(i2v_dit(dit) if i2v else dit)).save_pretrained(root / "transformer", **shard)
    AutoencoderKLWan(**SCALES["tiny"]().vae).save_pretrained(root / "vae")
    UMT5EncoderModel(UMT5Config(**SCALES["tiny"]().umt5)).save_pretrained(root / "text_encoder")
    ByT5Tokenizer().save_pretrained(root / "tokenizer")


def config(name: str, root: Path):
    scale, extra = CASES[name]
    return load_config("saber_full", scale, [f"model.wan_dir={root}", "trainer.strategy=fsdp2", "optim.ema=true",
                                             "trainer.precision=32-true",  # fp32 compute: compare outputs closely
                                             "model.gradient_checkpointing=true", *extra])


def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 16, 2, 4, 4, generator=g)
    refs, cov = torch.randn(2, 1, 16, 4, 4, generator=g), torch.rand(2, 1, 1, 4, 4, generator=g)
    return z, torch.tensor([300.0, 700.0]), torch.randn(2, 5, 32, generator=g), refs, cov, torch.tensor([1, 0])


class CountingOpen:
    """`safe_open` that counts the elements read; a whole-tensor read is an error."""

    read = 0
    opener = staticmethod(loading.safe_open)

    def __init__(self, *args, **kwargs) -> None:
        self.f = CountingOpen.opener(*args, **kwargs)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, key):
        raise AssertionError(f"a rank read the whole tensor {key}")

    def get_slice(self, key):
        part, outer = self.f.get_slice(key), self

        class Slice:
            def get_shape(self):
                return part.get_shape()

            def __getitem__(self, box):
                out = part[box]
                outer.__class__.read += out.numel()
                return out

        return Slice()


def forbidden(*args, **kwargs):
    raise AssertionError("a rank loaded the whole DiT")


def worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("data_parallel",))
    from saber_pl.module import SaberModule

    # (b) no whole copy: diffusers' from_pretrained and whole-file / whole-tensor reads fail on a rank
    WanTransformer3DModel.from_pretrained = forbidden
    import safetensors.torch
    safetensors.torch.load_file = safetensors.torch.load = forbidden
    loading.safe_open = CountingOpen
    loading.CHUNK_BYTES = 256  # a few rows per read: the chunked path
    for name in CASES:
        root = Path(tmp) / name
        ref = torch.load(root / "reference.pt")
        CountingOpen.read = 0
        module = SaberModule(config(name, root))
        assert all(p.is_meta for p in module.parameters()), "the DiT and EMA start on the meta device"
        module._device_mesh = mesh
        module.configure_model()
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])

        # each rank read exactly its own rows; together the node read the checkpoint's kept tensors once
        read = torch.tensor(CountingOpen.read)
        dist.all_reduce(read)
        assert read.item() == ref["file_elements"] and 0 < CountingOpen.read < ref["file_elements"] * 0.6
        params = dict(loading.state_tensors(module.dit.wan))
        rows = {k: loading.local_box(params[k])[0].shape[0] for k in ("blocks.0.ffn.net.0.proj.bias", "scale_shift_table")}
        assert rows == ({"blocks.0.ffn.net.0.proj.bias": 65, "scale_shift_table": 1} if rank == 0
                        else {"blocks.0.ffn.net.0.proj.bias": 64, "scale_shift_table": 0})

        # (a) every gathered parameter equals the single-process from_pretrained (+ widen / drop) model
        ema = dict(loading.state_tensors(module.dit_ema.wan))
        assert set(params) == set(ema) == set(ref["state"])
        for key in sorted(params):
            full = params[key].full_tensor()
            assert full.dtype == torch.float32 and torch.equal(full, ref["state"][key]), key
            assert torch.equal(ema[key].full_tensor(), full), key
            mine, theirs = loading.local_box(ema[key])[0], loading.local_box(params[key])[0]
            assert mine.numel() == 0 or mine.data_ptr() != theirs.data_ptr(), f"{key}: the EMA aliases the DiT"
        assert not any(p.requires_grad for p in module.dit_ema.parameters())
        # the RoPE tables were rebuilt and FSDP2 computes with the loaded shards
        for dit in (module.dit, module.dit_ema):
            torch.testing.assert_close(dit(*inputs()), ref["out"], atol=1e-5, rtol=1e-5)
    dist.destroy_process_group()


def test_two_ranks_load_their_own_shards(tmp_path: Path) -> None:
    for name in CASES:
        root = tmp_path / name
        write_folder(root, i2v=name == "i2v")
        cfg = config(name, root)
        wan = WanTransformer3DModel.from_pretrained(root / "transformer")
        kept = saber_dit(cfg.model, wan)  # the single-process path: from_pretrained, widen / drop image branch
        state = {k: v.detach().clone() for k, v in kept.wan.state_dict().items()}
        files = loading.weight_files(root / "transformer")
        assert len(set(files.values())) == (1 if name == "i2v" else 3), "both layouts: one file, shards + index"
        original = WanTransformer3DModel.from_pretrained(root / "transformer").state_dict()
        file_elements = sum(original[k].numel() for k in state)
        if name == "t2v":
            assert state["patch_embedding.weight"].shape[1] == 36 and not state["patch_embedding.weight"][:, 16:].any()
        else:
            assert len(original) > len(state)  # the image branch is in the file but not in Saber's DiT
        with torch.no_grad():
            out = kept(*inputs())
        torch.save({"state": state, "file_elements": file_elements, "out": out}, root / "reference.pt")
    # fork: the children inherit the imported modules (spawn would re-import them, ~5 s each)
    mp.start_processes(worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="fork")


def test_frozen_parts_load_in_the_compute_dtype_on_the_device(tmp_path: Path, monkeypatch) -> None:
    write_folder(tmp_path, i2v=False)
    calls = []
    real = UMT5EncoderModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(UMT5EncoderModel, "from_pretrained", classmethod(spy))
    frozen = loading.LazyFrozenParts(config("t2v", tmp_path).model)
    assert frozen.tokenize(["a cat"])[0].shape == (1, 8) and not calls  # tokenizer at once, models at setup
    frozen.to(torch.device("cpu"), torch.bfloat16)
    assert [(c["dtype"], c["device_map"]) for c in calls] == [(torch.bfloat16, {"": "cpu"})]  # never fp32 first
    saved = UMT5EncoderModel.from_pretrained(tmp_path / "text_encoder").state_dict()
    for key, value in frozen.text_encoder.encoder.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, saved[key].to(torch.bfloat16)), key
    assert all(p.dtype == torch.bfloat16 for p in frozen.vae.parameters())
    ids, mask = frozen.tokenize(["a cat"])
    assert frozen.text_encoder.encode(ids, mask).dtype == torch.bfloat16


def test_trainer_starts_from_the_folder(tmp_path: Path) -> None:
    """The real trainer (2 gloo ranks, fsdp2, bf16-mixed, EMA) at 1.3B settings from a tiny folder: its first
    checkpoint holds the folder's weights in the DiT and the EMA (lr 1e-30: the one step changes nothing
    above 1e-20, so the checkpoint shows the start-up weights)."""
    root = tmp_path / "wan"
    write_folder(root, i2v=False)
    cmd = [sys.executable, "-m", "saber_pl.train", "--exp", "saber_full", "--scale", "1.3B", "--wan-dir", str(root),
           "--shards", "data/test/tiny-000000.tar", f"logging.runs_dir={tmp_path}", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.strategy=fsdp2", "trainer.precision=bf16-mixed", "trainer.global_batch=2",
           "trainer.max_steps=1", "trainer.ckpt_every_n_steps=1", "optim.ema=true", "optim.lr=1e-30",
           "data.height=32", "data.width=32", "data.num_frames=5", "data.num_workers=0", "model.text_len=16"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "loaded the local shards" in out.stderr

    from saber_pl.export import checkpoint_state

    cfg = load_config("saber_full", "1.3B", [f"model.wan_dir={root}"])
    want = saber_dit(cfg.model, WanTransformer3DModel.from_pretrained(root / "transformer")).wan.state_dict()
    template = {f"{prefix}.wan.{k}": torch.empty_like(v) for k, v in want.items() for prefix in ("dit", "dit_ema")}
    state = checkpoint_state(tmp_path / "saber_full-1.3B" / "checkpoints" / "last.ckpt", template)
    for key, value in want.items():
        for prefix in ("dit", "dit_ema"):
            got = state[f"{prefix}.wan.{key}"]
            assert got.dtype == torch.float32, key  # fp32 master weights
            torch.testing.assert_close(got, value, atol=1e-20, rtol=0, msg=f"{prefix}.{key}")
