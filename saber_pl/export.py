"""Export a trained Saber DiT as a diffusers folder: ``python -m saber_pl.export --run runs/<exp>-<scale>``.

Reads the run's ``config.yaml`` and a checkpoint (``last.ckpt`` by default; a single file or an
FSDP2 sharded folder), takes the EMA weights when the run kept an EMA (``--raw`` for the trained
weights), and writes ``WanTransformer3DModel.save_pretrained`` (safetensors) plus ``saber.json``
(the reference-input knobs a sampler needs). The folder loads with
``WanTransformer3DModel.from_pretrained(out)``: 2C + 4 input channels (noisy, mask, reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from saber_pl.checkpoint import find_resume_checkpoint
from saber_pl.config import ExperimentConfig, from_dict, to_dict


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run must be a run folder written by saber_pl.train")
    return from_dict(ExperimentConfig, yaml.safe_load(path.read_text()))


def checkpoint_state(ckpt: Path, template: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The module state dict of a checkpoint file, or of a sharded folder read in one process."""
    if ckpt.is_file():
        return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {k: torch.empty_like(v) for k, v in template.items()}}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state["state_dict"]


def dit_weights(state: dict[str, Any], prefer_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The DiT's own keys (``wan.*``) from the LightningModule state, EMA first when asked and present."""
    for prefix in (("dit_ema.", "dit.") if prefer_ema else ("dit.",)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub, prefix.rstrip(".")
    raise KeyError("the checkpoint holds no DiT weights (no 'dit.' keys)")


def export(run_dir: Path, out: Path, ckpt: Path | None = None, prefer_ema: bool = True) -> Path:
    """Write the diffusers folder; returns its path."""
    from saber_pl.wan import meta_transformer, saber_kwargs

    cfg = load_run_config(run_dir)
    ckpt = ckpt or find_resume_checkpoint(run_dir / "checkpoints")
    if ckpt is None or not Path(ckpt).exists():
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'} (train first, or pass --ckpt)")
    dit = meta_transformer(cfg.model).to_empty(device="cpu")
    template = {f"dit.{k}": v for k, v in dit.state_dict().items()}
    if cfg.optim.ema:
        template |= {f"dit_ema.{k}": v for k, v in dit.state_dict().items()}
    weights, source = dit_weights(checkpoint_state(Path(ckpt), template), prefer_ema)
    dit.load_state_dict(weights, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    dit.wan.save_pretrained(out, safe_serialization=True)
    meta = {"source": source, "checkpoint": str(ckpt), "experiment": cfg.exp, "scale": cfg.scale,
            "saber": saber_kwargs(cfg.model), "model": to_dict(cfg.model), "data": to_dict(cfg.data),
            "sample": to_dict(cfg.sample)}
    (out / "saber.json").write_text(json.dumps(meta, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run folder (runs/<exp>-<scale>)")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the run's last.ckpt)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/export)")
    p.add_argument("--raw", action="store_true", help="export the trained weights, not the EMA")
    args = p.parse_args(argv)
    try:
        out = export(args.run, args.out or args.run / "export", args.ckpt, prefer_ema=not args.raw)
    except (FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
