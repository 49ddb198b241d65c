"""Mask generator: exact pixel counts, one 8-connected piece without holes, ratio distribution, errors."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from saber_pl.masks import (
    _RING,
    FAMILIES,
    SHAPES,
    SIMPLE,
    MaskConfig,
    MaskGenerator,
    _polar_grid,
    fix_count,
    make_mask,
    radially_simple,
    rasterise,
    repair,
    target_pixels,
)

EIGHT = np.ones((3, 3), dtype=bool)


def topology(mask: np.ndarray) -> tuple[int, int]:
    """(8-connected foreground pieces, holes): holes are 4-connected background pieces off the border."""
    n_fg = ndimage.label(mask, structure=EIGHT)[1]
    n_bg = ndimage.label(np.pad(~mask, 1, constant_values=True))[1]  # the ring joins every border piece
    return n_fg, n_bg - 1


def assert_valid(mask: np.ndarray, k: int) -> None:
    assert mask.dtype == bool
    assert int(mask.sum()) == k
    assert topology(mask) == (1, 0)


def test_target_pixels_rule() -> None:
    for n in (1, 7, 64, 6240):
        for r in np.linspace(1e-6, 1.0, 97):
            k = target_pixels(r, n)
            assert 1 <= k <= n
            if r * n >= 0.5:
                assert abs(k / n - r) <= 0.5 / n + 1e-12
            else:
                assert k == 1


def test_exact_count_and_topology_random_draws() -> None:
    rng = np.random.default_rng(0)
    gen = {f: MaskGenerator(MaskConfig(families=[f])) for f in FAMILIES}
    for i in range(3000):
        h, w = (int(v) for v in rng.integers(1, 48, 2)) if i % 10 else (8, 8)
        kind = i % 4
        r = [rng.uniform(1e-6, 1.0), 10 ** rng.uniform(-6, -1), 1.0, 1.0 - rng.uniform(0, 0.05)][kind]
        family = FAMILIES[i % len(FAMILIES)]
        mask = gen[family].make(h, w, r, family, rng)
        assert mask.shape == (h, w)
        assert_valid(mask, target_pixels(r, h * w))


@pytest.mark.parametrize("size", [(480, 832), (720, 1280)])
def test_exact_count_and_topology_large_frames(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    gen = MaskGenerator(MaskConfig())
    for i, family in enumerate(FAMILIES):
        r = [0.003, 0.3, 0.45, 0.8, 1.0, 1e-7][i]
        assert_valid(gen.make(*size, r, family, rng), target_pixels(r, size[0] * size[1]))
    for _ in range(4):
        r, family = gen.sample_target(rng), gen.sample_family(rng)
        assert_valid(gen.make(*size, max(r, 1e-9), family, rng), target_pixels(r, size[0] * size[1]))


def test_one_pixel_frames_and_extreme_ratios() -> None:
    rng = np.random.default_rng(2)
    assert make_mask(1, 1, 1e-9, "ellipse", rng).tolist() == [[True]]
    assert make_mask(1, 1, 1.0, "fourier", rng).tolist() == [[True]]
    assert make_mask(48, 64, 1.0, "concave_polygon", rng).all()
    tiny = make_mask(48, 64, 1e-9, "convex_polygon", rng)
    assert tiny.sum() == 1
    line = make_mask(1, 50, 0.3, "superellipse", rng)  # a 1-pixel-high frame: one run of 15 pixels
    assert line.sum() == 15 and topology(line) == (1, 0)


def _reference_level_mask(radius: np.ndarray, h: int, w: int, cy: int, cx: int, k: int) -> np.ndarray:
    """Plain reference: g in float64 from arctan2/hypot, then a bisection on the scale s."""
    n_angles = len(radius)
    dy, dx = np.mgrid[:h, :w]
    dy, dx = dy - cy, dx - cx
    idx = np.floor(np.mod(np.arctan2(dy, dx), 2 * np.pi) * (n_angles / (2 * np.pi))).astype(int) % n_angles
    g = np.hypot(dy, dx) / radius[idx]
    lo, hi = 0.0, float(g.max())
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if (g <= mid).sum() >= k else (mid, hi)
    return g <= hi


def test_matches_plain_bisection_on_the_scale() -> None:
    rng = np.random.default_rng(3)
    cfg = MaskConfig()
    for i in range(60):
        h, w = [(60, 104), (97, 41), (128, 128)][i % 3]
        family = FAMILIES[i % len(FAMILIES)]
        radius = SHAPES[family](rng, cfg, _polar_grid(h, w)[2])
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        k = target_pixels(float(rng.uniform(0.001, 0.9)), h * w)
        ours = rasterise(radius, h, w, cy, cx, k)
        ref = _reference_level_mask(radius, h, w, cy, cx, k)
        assert_valid(ours, k)
        # same level set up to ties at the k-th level (and rare topology fixes): a few pixels at most
        assert (ours ^ ref).sum() <= max(16, k // 100), (family, (ours ^ ref).sum())


def test_ratio_bins_and_uniformity_inside_the_main_bin() -> None:
    rng = np.random.default_rng(4)
    gen = MaskGenerator(MaskConfig())
    targets = np.array([gen.sample_target(rng) for _ in range(20000)])
    frac = [np.mean(targets < 0.1), np.mean((targets >= 0.1) & (targets < 0.5)), np.mean(targets >= 0.5)]
    assert np.allclose(frac, [0.1, 0.8, 0.1], atol=0.015)
    h, w = 60, 104
    achieved = np.array([gen.sample(h, w, rng).mean() for _ in range(1500)])
    mid = achieved[(achieved > 0.1) & (achieved < 0.5)]
    assert abs(np.median(mid) - 0.3) < 0.02  # a first-hit search would sit near 0.2
    assert np.allclose(np.quantile(mid, [0.25, 0.75]), [0.2, 0.4], atol=0.025)
    fixed = MaskGenerator(MaskConfig(fixed_ratio=0.3))
    assert all(fixed.sample(h, w, rng).sum() == target_pixels(0.3, h * w) for _ in range(20))


def test_seeded_determinism_and_batch() -> None:
    gen = MaskGenerator(MaskConfig())
    a = [gen.sample(37, 53, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    rng1, rng2 = np.random.default_rng(8), np.random.default_rng(8)
    batch = gen.sample_batch(5, 37, 53, rng1)
    assert batch.shape == (5, 1, 37, 53) and batch.dtype == torch.float32
    singles = np.stack([gen.sample(37, 53, rng2) for _ in range(5)])
    assert np.array_equal(batch[:, 0].numpy().astype(bool), singles)
    assert set(batch.unique().tolist()) <= {0.0, 1.0}
    other = gen.sample_batch(5, 37, 53, np.random.default_rng(9))
    assert not torch.equal(batch, other)
    assert gen.sample_batch(0, 8, 8, rng1).shape == (0, 1, 8, 8)


def test_family_params_reach_the_shape() -> None:
    """A circle (aspect 1) centred in the frame has isotropic second moments; aspect 0.3 does not."""
    rng = np.random.default_rng(10)

    def axis_ratio(mask: np.ndarray) -> float:
        ev = np.linalg.eigvalsh(np.cov(np.argwhere(mask).T))
        return float(np.sqrt(ev[0] / ev[1]))

    circle = make_mask(128, 128, 0.1, "ellipse", rng, ellipse_aspect=(1.0, 1.0), center_margin=0.5)
    assert axis_ratio(circle) > 0.97
    thin = make_mask(128, 128, 0.1, "ellipse", rng, ellipse_aspect=(0.3, 0.3), center_margin=0.5)
    assert abs(axis_ratio(thin) - 0.3) < 0.03


def test_simple_point_table_matches_global_topology() -> None:
    """Flipping a pixel keeps (pieces, holes) of the whole image exactly when the table says simple."""
    rng = np.random.default_rng(11)
    for _ in range(1500):
        m = rng.random((6, 6)) < rng.uniform(0.2, 0.8)
        y, x = (int(v) for v in rng.integers(0, 6, 2))
        p = np.pad(m, 1)
        code = sum(int(p[y + 1 + dy, x + 1 + dx]) << b for b, (dy, dx) in enumerate(_RING))
        flipped = m.copy()
        flipped[y, x] = not flipped[y, x]
        assert (topology(m) == topology(flipped)) == SIMPLE[code]


def test_radial_test_is_sound() -> None:
    """Whenever the fast test accepts a mask, the mask really is one piece without holes."""
    rng = np.random.default_rng(12)
    cfg, h, w = MaskConfig(), 24, 32
    accepted = 0
    for i in range(600):
        family = FAMILIES[i % len(FAMILIES)]
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        m = rasterise(SHAPES[family](rng, cfg, _polar_grid(h, w)[2]), h, w, cy, cx, int(rng.integers(1, h * w)))
        if i % 2:  # damage half: specks, bites and holes
            m = m ^ (rng.random(m.shape) < 0.02)
        if radially_simple(m, cy, cx):
            accepted += 1
            assert topology(m) == (1, 0)
    assert accepted > 250  # nearly every undamaged mask takes the fast path


def test_repair_from_arbitrary_masks() -> None:
    """The fallback keeps the centre's piece, fills holes and reaches exactly k via simple points."""
    rng = np.random.default_rng(13)
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 16, 2))
        m = rng.random((h, w)) < rng.uniform(0.2, 0.9)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        m[cy, cx] = True
        g = rng.random((h, w)).astype(np.float32)
        k = int(rng.integers(1, h * w + 1))
        out = repair(m, g, k, cy, cx)
        assert_valid(out, k)


def test_fix_count_follows_the_level_order() -> None:
    """Growing a disc adds the lowest-g simple pixels first: the result is the next level set."""
    dy, dx = np.mgrid[:41, :41] - 20
    g = np.hypot(dy, dx).astype(np.float32) + 1e-3 * np.arctan2(dy, dx).astype(np.float32)  # no ties
    order = np.sort(g.ravel())
    disc = g <= order[300 - 1]
    grown = fix_count(disc, g, 340)
    assert np.array_equal(grown, g <= order[340 - 1])
    shrunk = fix_count(disc, g, 250)
    assert np.array_equal(shrunk, g <= order[250 - 1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"families": []}, "families"),
        ({"families": ["ellipse", "blob"]}, "families"),
        ({"ratio_bins": [(0.0, 0.5, 0.5), (0.5, 1.0, 0.4)]}, "ratio_bins"),
        ({"ratio_bins": [(0.6, 0.4, 1.0)]}, "ratio_bins"),
        ({"ratio_bins": [(0.0, 1.5, 1.0)]}, "ratio_bins"),
        ({"ratio_bins": []}, "ratio_bins"),
        ({"fixed_ratio": 0.0}, "fixed_ratio"),
        ({"fixed_ratio": 1.2}, "fixed_ratio"),
        ({"family_weights": [1.0]}, "family_weights"),
        ({"ellipse_aspect": (0.8, 0.2)}, "ellipse_aspect"),
        ({"fourier_amplitude": (0.2, 1.0)}, "fourier_amplitude"),
        ({"concave_vertices": (3, 6)}, "concave_vertices"),
        ({"polygon_jitter": 0.5}, "polygon_jitter"),
        ({"center_margin": 0.7}, "center_margin"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MaskConfig(**kwargs)


def test_call_errors_name_the_argument() -> None:
    rng = np.random.default_rng(0)
    gen = MaskGenerator(MaskConfig())
    for args, name in [
        ((8, 8, 0.0, "ellipse"), "ratio"),
        ((8, 8, 1.5, "ellipse"), "ratio"),
        ((0, 8, 0.3, "ellipse"), "height"),
        ((8, 0, 0.3, "ellipse"), "width"),
        ((8, 8, 0.3, "blob"), "family"),
    ]:
        with pytest.raises(ValueError, match=name):
            make_mask(*args, rng)
    with pytest.raises(ValueError, match="height"):
        gen.sample(0, 5, rng)
    with pytest.raises(ValueError, match="width"):
        gen.sample_batch(2, 5, -1, rng)
    with pytest.raises(ValueError, match="n "):
        gen.sample_batch(-1, 5, 5, rng)
    with pytest.raises(ValueError, match="bogus"):
        make_mask(8, 8, 0.3, "ellipse", rng, bogus=1)
