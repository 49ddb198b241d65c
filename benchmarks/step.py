"""The training step with everything cached against the DiT-only step: what the frozen parts still cost.

    PYTHONPATH=. .venv/bin/python benchmarks/step.py [--scale mini] [--steps 12] [--warmup 3]

With `data.text: precomputed` and `data.latents: cached` the step still augments the K references on the
device (kornia), encodes each through the VAE as a one-frame video and pads the stored text embeddings;
everything else is the DiT. Both steps below run the same batch, the same draws (t, eps from the step
generator) and the same AdamW update:

- full: `SaberDataModule.on_after_batch_transfer` (augmentation) + `SaberModule.flow_loss` (reference
  encodes, flow loss) + backward + AdamW step;
- dit_only: the DiT forward on the already-augmented, already-encoded inputs + the same MSE + backward +
  AdamW step.

Prints one JSON line with the median seconds of each and their ratio (goal: <= 1.1). Both are timed in
one process, interleaved, so the ratio holds on a noisy machine. On the CPU the scale is mini (the real VAE
of 1.3B/14B needs its weights); `benchmarks/gpu.py` times the DiT step on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from saber_pl.config import load_config
from saber_pl.datamodule import SaberDataModule, collate
from saber_pl.flow import draw_flow_inputs, interpolate, per_sample_mse, velocity_target
from saber_pl.masks import MaskGenerator
from saber_pl.module import SaberModule


def cached_batch(module: SaberModule, rng: np.random.Generator) -> dict:
    """One collated batch as the cached data path delivers it: latents, stored text, uint8 frames, masks."""
    cfg = module.cfg
    d = cfg.data
    vae = module.frozen.vae
    f = 1 + (d.num_frames - 1) // vae.temporal_factor
    h, w = d.height // vae.spatial_factor, d.width // vae.spatial_factor
    masks = MaskGenerator(cfg.masks)
    samples = []
    for i in range(d.batch_size):
        k = int(rng.integers(d.refs_min, d.refs_max + 1))
        ref_masks = np.stack([masks.sample(d.height, d.width, rng) for _ in range(k)])[:, None]  # [K, 1, H, W]
        samples.append({
            "latent": torch.randn(cfg.model.spec.dit["out_channels"], f, h, w),
            "ref_frames": torch.from_numpy(rng.integers(0, 256, (k, 3, d.height, d.width), dtype=np.uint8)),
            "ref_masks": torch.from_numpy(ref_masks.astype(bool)),
            "text": torch.randn(int(rng.integers(1, cfg.model.resolved_text_len + 1)), module.dit.wan.config.text_dim),
            "caption": f"clip {i}", "key": f"{i:06d}",
        })
    return collate(samples, None, cfg.model.resolved_text_len)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="mini")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config("saber_full", args.scale, ["data.text=precomputed", "data.text_sidecars=/unused",
                                                 "data.latents=cached", "data.latent_sidecars=/unused"])
    module = SaberModule(cfg)
    dm = SaberDataModule(cfg.data, cfg.masks, cfg.augment, None, text_len=cfg.model.resolved_text_len)
    opt = torch.optim.AdamW(module.dit.parameters(), lr=cfg.optim.lr)
    rng = np.random.default_rng(0)

    def full(batch: dict, gen: torch.Generator) -> tuple[float, dict]:
        start = time.perf_counter()
        batch = dm.on_after_batch_transfer(batch, 0)
        module.flow_loss(batch, gen)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start, batch

    def dit_only(inputs: tuple, gen: torch.Generator) -> float:
        z0, text, ref_lat, ref_cov, counts = inputs
        start = time.perf_counter()
        t, noise = draw_flow_inputs(cfg.flow, tuple(z0.shape), z0.device, gen)
        pred = module.dit(interpolate(z0, noise, t), t * 1000.0, text, ref_lat, ref_cov, counts)
        per_sample_mse(pred, velocity_target(z0, noise)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"full": [], "dit_only": []}
    for i in range(args.warmup + args.steps):
        raw = cached_batch(module, rng)
        spent, batch = full(raw, torch.Generator().manual_seed(i))
        with torch.no_grad():  # the same inputs, prepared outside the timed DiT-only step
            ref_lat, ref_cov = module.encode_references(batch["refs"], batch["ref_masks"], batch["ref_counts"])
        inputs = (batch["latents"].float(), module.encode_text(batch), ref_lat, ref_cov, batch["ref_counts"])
        spent_dit = dit_only(inputs, torch.Generator().manual_seed(i))
        if i >= args.warmup:
            times["full"].append(spent)
            times["dit_only"].append(spent_dit)
    full_s, dit_s = statistics.median(times["full"]), statistics.median(times["dit_only"])
    d = cfg.data
    print(json.dumps({
        "bench": "step", "scale": args.scale, "batch": d.batch_size, "frames": d.num_frames,
        "size": f"{d.height}x{d.width}", "refs": f"{d.refs_min}..{d.refs_max}", "threads": args.threads,
        "steps": args.steps, "full_step_s": round(full_s, 4), "dit_only_step_s": round(dit_s, 4),
        "ratio": round(full_s / dit_s, 3), "goal": 1.1, "meets_goal": full_s / dit_s <= 1.1,
        "umt5_built": module.frozen.text_encoder is not None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
