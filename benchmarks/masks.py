"""Mask generator and reference augmentation speed and exactness; prints one JSON line.

    PYTHONPATH=. .venv/bin/python benchmarks/masks.py

One CPU thread throughout. Goals: >= 500 masks/s at 480x832, >= 5,000 masks/s at 60x104 (single
masks, default config), ratio error 0, single component (and no holes) 1.0. Rates are per second
of this process's CPU time (one core); the ``wall_`` fields are the same runs in wall-clock time,
which other jobs on a shared machine slow down.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: before numpy/torch load their thread pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from saber_pl.augment import AugmentConfig, ReferenceAugment  # noqa: E402
from saber_pl.masks import MaskConfig, MaskGenerator, target_pixels  # noqa: E402


def rates(fn, n: int) -> tuple[float, float]:
    """(items per CPU second, items per wall second) of n items made by fn()."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


def masks_per_s(gen: MaskGenerator, height: int, width: int, n: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    gen.sample(height, width, rng)  # builds the cached polar grid

    def run() -> None:
        for _ in range(n):
            gen.sample(height, width, rng)

    return rates(run, n)


def exactness(gen: MaskGenerator, draws: int) -> dict[str, float]:
    """Ratio error against the brief's interval, and topology, over draws at several sizes."""
    rng = np.random.default_rng(1)
    sizes = [(60, 104), (480, 832), (8, 8), (37, 53), (1, 9)]
    err, single, no_holes = 0.0, 0, 0
    for i in range(draws):
        h, w = sizes[i % len(sizes)]
        n = h * w
        family, r = gen.sample_family(rng), max(gen.sample_target(rng), 1e-12)
        mask = gen.make(h, w, r, family, rng)
        r_near = min(max(r, 1.0 / n), 1.0)  # r·N < 0.5 rounds up to one pixel, the nearest achievable
        err = max(err, abs(mask.sum() / n - r_near) - 0.5 / n)
        assert mask.sum() == target_pixels(r, n)
        single += ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))[1] == 1
        no_holes += ndimage.label(np.pad(~mask, 1, constant_values=True))[1] == 1
    return {"ratio_abs_err_max": max(err, 0.0), "single_component_frac": single / draws,
            "no_holes_frac": no_holes / draws}


def aug_refs_per_s(batch: int, height: int, width: int, repeats: int) -> tuple[float, float]:
    masks = MaskGenerator(MaskConfig()).sample_batch(batch, height, width, np.random.default_rng(2))
    frames = torch.rand(batch, 3, height, width) * 2 - 1
    aug, gen = ReferenceAugment(AugmentConfig()), torch.Generator().manual_seed(0)
    aug(frames, masks, gen)

    def run() -> None:
        for _ in range(repeats):
            aug(frames, masks, gen)

    return rates(run, batch * repeats)


def main() -> None:
    torch.set_num_threads(1)
    gen = MaskGenerator(MaskConfig())
    out: dict[str, float] = {}
    for name, (cpu, wall) in [
        ("masks_per_s_480x832", masks_per_s(gen, 480, 832, 2000)),
        ("masks_per_s_60x104", masks_per_s(gen, 60, 104, 20000)),
        ("masks_per_s_720x1280", masks_per_s(gen, 720, 1280, 500)),
        ("aug_refs_per_s_480x832", aug_refs_per_s(16, 480, 832, 5)),
    ]:
        out[name], out["wall_" + name] = round(cpu, 1), round(wall, 1)
    out.update(exactness(gen, 2000))
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
