"""Peak host memory of an FSDP2 start-up from a Wan2.1-1.3B diffusers folder, up to step 0.

    PYTHONPATH=. .venv/bin/python benchmarks/startup.py [--ema] [--cache /tmp/saber_startup_wan13b]
    mkdir /tmp/old && git archive <commit> | tar -x -C /tmp/old      # an older source tree, to measure "before"
    PYTHONPATH=. .venv/bin/python benchmarks/startup.py --code /tmp/old

Prints one JSON line. The folder (written once into `--cache`, 5.7 GB) holds a DiT with the real 1.3B config
(wan.SCALES["1.3B"], random weights, in 1 GB safetensors files with an index as diffusers writes them), a small
random `AutoencoderKLWan`, and a 1-layer umT5 of width 4096 (the DiT's text_dim) with a byte-level tokenizer.
Two gloo ranks run the real trainer (`saber_pl.train.main`: saber_full, scale 1.3B, trainer.strategy=fsdp2,
bf16-mixed, on the CPU), started here as an external launcher would (LOCAL_RANK, WORLD_SIZE); a callback
stops each rank at `on_train_start`: the model is built, sharded and loaded, the optimizer set up.
`rss_gb_rank*` is each process's peak RSS (`ru_maxrss` from wait4; file pages it mapped count too).

Goal: `sum_gb` <= 1.2 x `dit_fp32_gb`: the node holds one fp32 copy of the DiT, not one per rank. On the CPU
the shards live in host memory: `shards_gb` is what the ranks' DiT (and EMA) shards take together, and
`ratio_beyond_shards` = (sum_gb - shards_gb) / dit_fp32_gb the rest (interpreters, libraries, transients).
With `--ema` the EMA's shards add one more DiT's worth to `shards_gb` (on GPUs: device memory).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
GOAL = 1.2


def write_folder(root: Path, shard_gb: float = 1.0) -> None:
    """The benchmark's Wan folder, written once; at most one `shard_gb` file's tensors are in memory."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors.torch import save_file
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from saber_pl.wan import SCALES

    if (root / "complete").is_file():
        return
    dit = SCALES["1.3B"]().dit
    with torch.device("meta"):
        meta = WanTransformer3DModel(**dit)
    out = root / "transformer"
    out.mkdir(parents=True, exist_ok=True)
    meta.save_config(out)
    groups: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for key, value in meta.state_dict().items():
        if size and size + value.numel() * 4 > shard_gb * 1e9:
            groups.append([])
            size = 0
        groups[-1].append((key, value.shape))
        size += value.numel() * 4
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {key: torch.randn(shape, generator=gen) * 0.02 for key, shape in group}
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        total += sum(t.numel() * 4 for t in shard.values())
        del shard
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    AutoencoderKLWan(**SCALES["tiny"]().vae).save_pretrained(root / "vae")
    umt5 = UMT5Config(vocab_size=384, d_model=dit["text_dim"], d_kv=64, d_ff=256, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32)
    UMT5EncoderModel(umt5).save_pretrained(root / "text_encoder")
    ByT5Tokenizer().save_pretrained(root / "tokenizer")
    (root / "complete").write_text("ok\n")


def dit_fp32_gb() -> float:
    """The 1.3B Saber DiT (36 input channels, as trained) in fp32, counted on the meta device."""
    from saber_pl.wan import ModelConfig, meta_transformer, num_params

    return num_params(meta_transformer(ModelConfig(scale="1.3B"))) * 4 / 1e9


def rank_main(out: Path, argv: list[str]) -> None:
    """One rank: the real trainer, stopped at on_train_start (step 0) after writing its shard sizes."""
    import lightning as L
    import torch.distributed as dist

    import saber_pl.train as train

    class StopAtStepZero(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            local = 0
            for p in module.parameters():
                data = p.data.to_local() if hasattr(p.data, "to_local") else p.data
                local += data.numel() * data.element_size()
            status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
            peak = int(status["VmHWM"].split()[0]) * 1024 / 1e9  # /proc's kB are KiB
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"shards_gb": local / 1e9, "peak_gb": peak}))
            if dist.is_initialized():
                dist.barrier()
            os._exit(0)  # the measurement ends here: no step, no teardown

    build = train.build_trainer

    def build_with_stop(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(StopAtStepZero())
        return trainer

    train.build_trainer = build_with_stop
    sys.exit(train.main(argv))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_rss_gb(code: Path) -> float:
    """Peak RSS of a process that only imports what a rank imports (the per-rank floor)."""
    modules = "lightning, diffusers, transformers, tensorboard, saber_pl.train, saber_pl.module, saber_pl.datamodule"
    cmd = [sys.executable, "-c", f"import {modules}"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1"))
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0
    return usage.ru_maxrss * 1024 / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path("/tmp/saber_startup_wan13b"), help="the Wan folder (written once)")
    p.add_argument("--ema", action="store_true", help="optim.ema=true (one more DiT's worth of shards)")
    p.add_argument("--code", type=Path, default=ROOT, help="source tree to run (e.g. an older checkout: before)")
    p.add_argument("--rank-out", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one rank
    args, rest = p.parse_known_args()
    if args.rank_out is not None:
        return rank_main(args.rank_out, rest)

    write_folder(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--exp", "saber_full", "--scale", "1.3B", "--wan-dir", str(args.cache),
                "--shards", str(ROOT / "data/test/tiny-000000.tar"), "--no-resume",
                f"logging.runs_dir={tmp}/runs", f"trainer.devices={WORLD}", "trainer.strategy=fsdp2",
                "trainer.accelerator=cpu", "trainer.precision=bf16-mixed", f"optim.ema={str(args.ema).lower()}",
                "trainer.max_steps=1", "data.height=32", "data.width=32", "data.num_frames=5", "data.num_workers=0",
                "model.text_len=16"]
        env = dict(os.environ, PYTHONPATH=str(args.code), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(WORLD), NODE_RANK="0")
        logs = [open(f"{tmp}/rank{r}.log", "w") for r in range(WORLD)]
        procs = [subprocess.Popen([sys.executable, __file__, "--rank-out", tmp, *argv], cwd=args.code,
                                  env=dict(env, LOCAL_RANK=str(r), RANK=str(r)), stdout=subprocess.DEVNULL, stderr=log)
                 for r, log in enumerate(logs)]
        rss = []
        for r, proc in enumerate(procs):
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                sys.exit(f"rank {r} failed ({status}):\n" + Path(f"{tmp}/rank{r}.log").read_text()[-4000:])
            rss.append(usage.ru_maxrss * 1024 / 1e9)  # Linux: KiB
            logs[r].close()
        ranks = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(WORLD)]
        shards = sum(r["shards_gb"] for r in ranks)
        peak_at_step0 = [r["peak_gb"] for r in ranks]  # equal to rss_gb_*: the peak is reached by step 0
    full = dit_fp32_gb()
    total = sum(rss)
    result = {f"rss_gb_rank{r}": round(v, 3) for r, v in enumerate(rss)}
    result |= {"sum_gb": round(total, 3), "dit_fp32_gb": round(full, 3), "ratio": round(total / full, 3),
               "goal": GOAL, "ema": args.ema, "shards_gb": round(shards, 3),
               "ratio_beyond_shards": round((total - shards) / full, 3),
               "import_gb_per_rank": round(import_rss_gb(args.code), 3),
               "peak_at_step0_gb": [round(v, 3) for v in peak_at_step0], "code": str(args.code)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
