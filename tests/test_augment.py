"""Reference augmentation: one affine for frame and mask, mask kept inside the frame, gray outside."""

import numpy as np
import pytest
import torch
from kornia.geometry.transform import warp_affine

from saber_pl.augment import AugmentConfig, ReferenceAugment
from saber_pl.masks import MaskConfig, MaskGenerator

H, W = 40, 64


def random_masks(n: int, seed: int, h: int = H, w: int = W, **cfg) -> torch.Tensor:
    return MaskGenerator(MaskConfig(**cfg)).sample_batch(n, h, w, np.random.default_rng(seed))  # [N, 1, H, W]


def coordinate_frames(n: int, h: int = H, w: int = W) -> torch.Tensor:
    """Frames whose channels hold each pixel's own (x, y) and a constant, [N, 3, H, W]."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys, torch.full_like(xs, 0.25)])[None].repeat(n, 1, 1, 1)


def source_points(matrix: torch.Tensor, h: int = H, w: int = W) -> torch.Tensor:
    """Source pixel (x, y) of every destination pixel under the inverse matrices, [N, H, W, 2]."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    q = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # [H, W, 3]
    return torch.einsum("nij,hwj->nhwi", torch.linalg.inv(matrix), q)[..., :2]


def test_frame_and_mask_share_the_returned_transform() -> None:
    n = 24
    masks, frames = random_masks(n, 0), coordinate_frames(n)
    aug = ReferenceAugment(AugmentConfig())
    params = aug.sample_params(masks, torch.Generator().manual_seed(0))
    refs, out = aug.apply(frames, masks, params)
    src = source_points(params.matrix)  # [N, H, W, 2]
    inside = out[:, 0] > 0.5
    # the frame: bilinear of a linear ramp is exact (clamped at the border by border padding)
    clamp = torch.tensor([W - 1.0, H - 1.0], dtype=torch.float64)
    expect = torch.minimum(src.clamp_min(0.0), clamp)
    got = refs.permute(0, 2, 3, 1)[..., :2].double()
    assert (got - expect)[inside].abs().max() < 1e-3
    assert torch.allclose(refs[:, 2][inside], torch.tensor(0.25), atol=1e-6)
    # the mask: nearest source pixel under the same matrix
    idx = src.round().long()
    ok = (idx[..., 0] >= 0) & (idx[..., 0] < W) & (idx[..., 1] >= 0) & (idx[..., 1] < H)
    nearest = torch.zeros_like(inside)
    b = torch.arange(n)[:, None, None].expand(n, H, W)
    nearest[ok] = masks[:, 0][b[ok], idx[..., 1][ok], idx[..., 0][ok]] > 0.5
    assert (nearest != inside).float().mean() < 1e-3  # only exact .5 rounding ties may differ


def test_matches_kornia_warp_affine() -> None:
    masks = random_masks(6, 1)
    frames = torch.rand(6, 3, H, W) * 2 - 1
    aug = ReferenceAugment(AugmentConfig())
    params = aug.sample_params(masks, torch.Generator().manual_seed(1))
    refs, out = aug.apply(frames, masks, params)
    m = params.matrix[:, :2].float()
    ref_frames = warp_affine(frames, m, (H, W), mode="bilinear", padding_mode="border", align_corners=True)
    ref_masks = warp_affine(masks, m, (H, W), mode="nearest", padding_mode="zeros", align_corners=True)
    assert (ref_masks != out).float().mean() < 1e-3
    both = (ref_masks > 0.5) & (out > 0.5)
    assert torch.allclose((refs * both), (ref_frames * both), atol=1e-4)


def test_mask_stays_inside_frame_and_keeps_its_area() -> None:
    n = 64
    masks = torch.cat([random_masks(n - 4, 2), torch.ones(2, 1, H, W), random_masks(2, 3, fixed_ratio=0.9)])
    aug = ReferenceAugment(AugmentConfig())
    params = aug.sample_params(masks, torch.Generator().manual_seed(2))
    _, out = aug.apply(torch.zeros(n, 3, H, W), masks, params)
    lo = torch.tensor([-0.5, -0.5], dtype=torch.float64)
    hi = torch.tensor([W - 0.5, H - 0.5], dtype=torch.float64)
    for i in range(n):
        yx = torch.nonzero(masks[i, 0] > 0.5).double()
        corners = torch.cat([torch.stack([yx[:, 1] + dx, yx[:, 0] + dy, torch.ones(len(yx), dtype=torch.float64)], -1)
                             for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)])  # [4P, 3] pixel squares' corners
        pts = (corners @ params.matrix[i].T)[:, :2]
        assert torch.all(pts >= lo - 1e-6) and torch.all(pts <= hi + 1e-6)
        # rotation and shear keep area; the warped mask has scale² times the pixels (up to its rim)
        area, warped = masks[i].sum().item(), out[i].sum().item()
        expect = params.scale[i].item() ** 2 * area
        assert abs(warped - expect) <= 0.1 * expect + 4 * expect**0.5 + 2
    assert torch.all(params.scale <= 2.0 + 1e-9)
    assert params.scale[n - 4 : n - 2].max() < 1.0  # full masks need a smaller scale to fit


def test_outputs_binary_gray_outside_and_dtype() -> None:
    masks = random_masks(8, 4)
    frames = torch.rand(8, 3, H, W) * 2 - 1
    for fill in (0.0, -0.5):
        refs, out = ReferenceAugment(AugmentConfig(fill_value=fill))(frames, masks, torch.Generator().manual_seed(3))
        assert refs.shape == (8, 3, H, W) and out.shape == (8, 1, H, W)
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert torch.all(refs.masked_select((out < 0.5).expand_as(refs)) == fill)
    refs, out = ReferenceAugment(AugmentConfig())(frames.bfloat16(), masks.bfloat16(), torch.Generator().manual_seed(3))
    assert refs.dtype == out.dtype == torch.bfloat16


def test_parameter_ranges_and_flip_frequency() -> None:
    masks = random_masks(4, 5, h=12, w=16).repeat(500, 1, 1, 1)  # 2000 samples, small frames
    cfg = AugmentConfig()
    p = ReferenceAugment(cfg).sample_params(masks, torch.Generator().manual_seed(4))
    assert 0.45 < p.flip.float().mean().item() < 0.55
    for value, (lo, hi) in [(p.angle, cfg.rotation), (p.shear_x, cfg.shear), (p.shear_y, cfg.shear)]:
        assert value.min() >= lo and value.max() <= hi and value.std() > 0.25 * (hi - lo)
    assert p.scale.max() <= cfg.scale[1] and p.scale.min() > 0
    assert p.matrix.shape == (2000, 3, 3) and p.translation.shape == (2000, 2)
    never = ReferenceAugment(AugmentConfig(hflip_p=0.0)).sample_params(masks[:50], torch.Generator().manual_seed(4))
    assert not never.flip.any()


def test_disabled_is_the_plain_composite() -> None:
    masks = random_masks(5, 6)
    frames = torch.rand(5, 3, H, W) * 2 - 1
    aug = ReferenceAugment(AugmentConfig(enabled=False, fill_value=0.0))
    refs, out = aug(frames, masks, torch.Generator().manual_seed(5))
    assert torch.equal(out, masks)
    assert torch.equal(refs, frames * masks)
    p = aug.sample_params(masks, torch.Generator().manual_seed(5))
    assert torch.allclose(p.matrix, torch.eye(3, dtype=torch.float64).expand(5, 3, 3), atol=1e-9)


def test_deterministic_given_the_generator() -> None:
    masks = random_masks(6, 7)
    frames = torch.rand(6, 3, H, W) * 2 - 1
    aug = ReferenceAugment(AugmentConfig())
    a = aug(frames, masks, torch.Generator().manual_seed(9))
    b = aug(frames, masks, torch.Generator().manual_seed(9))
    c = aug(frames, masks, torch.Generator().manual_seed(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_empty_batch_and_empty_mask() -> None:
    aug = ReferenceAugment(AugmentConfig())
    refs, out = aug(torch.zeros(0, 3, H, W), torch.zeros(0, 1, H, W), torch.Generator().manual_seed(0))
    assert refs.shape == (0, 3, H, W) and out.shape == (0, 1, H, W)
    refs, out = aug(torch.rand(1, 3, H, W), torch.zeros(1, 1, H, W), torch.Generator().manual_seed(0))
    assert not out.any() and not refs.any()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rotation": (10.0, -10.0)}, "rotation"),
        ({"scale": (0.0, 2.0)}, "scale"),
        ({"scale": (2.0, 1.0)}, "scale"),
        ({"shear": (-80.0, 10.0)}, "shear"),
        ({"hflip_p": 1.5}, "hflip_p"),
        ({"fill_value": 2.0}, "fill_value"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AugmentConfig(**kwargs)


def test_shape_errors() -> None:
    aug = ReferenceAugment(AugmentConfig())
    with pytest.raises(ValueError, match="masks"):
        aug(torch.zeros(2, 3, H, W), torch.zeros(3, 1, H, W))
    with pytest.raises(ValueError, match="masks"):
        aug(torch.zeros(2, 3, H, W), torch.zeros(2, 2, H, W))
