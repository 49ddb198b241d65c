"""Random affine augmentation of masked references, batched on any device (SABER.md, step 3-4).

One transform per reference, the same for the frame and its mask: rotation, isotropic scale, shear
(x then y) and a horizontal flip about the frame centre, then a translation drawn uniformly among
those that keep every transformed foreground pixel (its whole square) inside the frame. If no
translation fits, that sample's scale is reduced until one does: the subject is never cropped.
The reference is the warped frame where the warped mask is 1 and gray (``fill_value``) elsewhere;
it breaks the pixel alignment between reference and video so the model cannot copy-paste.

Matrices come from kornia (``get_affine_matrix2d``; source -> destination pixel coordinates, pixel
centres at integers) and are applied as ``kornia.geometry.warp_affine`` does (``align_corners=True``).

    aug = ReferenceAugment(AugmentConfig())
    refs, masks = aug(frames, masks, generator=torch.Generator(frames.device).manual_seed(0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.geometry.conversions import convert_affinematrix_to_homography, normalize_homography
from kornia.geometry.transform import get_affine_matrix2d, invert_affine_transform
from torch import Tensor


@dataclass
class AugmentConfig:
    """Reference augmentation knobs (paper values)."""

    enabled: bool = True  # False = the `no_mask_aug` ablation (reference = frame * mask, gray outside, no warp)
    rotation: tuple[float, float] = (-10.0, 10.0)  # degrees
    scale: tuple[float, float] = (0.8, 2.0)  # isotropic, before fitting into the frame
    shear: tuple[float, float] = (-10.0, 10.0)  # degrees, drawn independently for x and y
    hflip_p: float = 0.5  # probability of a horizontal flip
    fill_value: float = 0.0  # gray in [-1, 1], outside the mask

    def __post_init__(self) -> None:
        self.rotation, self.scale, self.shear = tuple(self.rotation), tuple(self.scale), tuple(self.shear)
        if len(self.rotation) != 2 or not -180.0 <= self.rotation[0] <= self.rotation[1] <= 180.0:
            raise ValueError(f"rotation must be (lo, hi) degrees with -180 <= lo <= hi <= 180, got {self.rotation}")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {self.scale}")
        if len(self.shear) != 2 or not -60.0 <= self.shear[0] <= self.shear[1] <= 60.0:
            raise ValueError(f"shear must be (lo, hi) degrees with -60 <= lo <= hi <= 60, got {self.shear}")
        if not 0.0 <= self.hflip_p <= 1.0:
            raise ValueError(f"hflip_p must be in [0, 1], got {self.hflip_p}")
        if not -1.0 <= self.fill_value <= 1.0:
            raise ValueError(f"fill_value must be in [-1, 1], got {self.fill_value}")


@dataclass
class AffineParams:
    """One affine per sample; ``matrix`` maps source to destination pixel coordinates (x, y, 1)."""

    angle: Tensor  # [N] degrees (kornia: positive = clockwise as displayed)
    scale: Tensor  # [N] after fitting into the frame
    shear_x: Tensor  # [N] degrees
    shear_y: Tensor  # [N] degrees
    flip: Tensor  # [N] bool, horizontal flip (applied first)
    translation: Tensor  # [N, 2] pixels (x, y)
    matrix: Tensor  # [N, 3, 3]


def _uniform(u: Tensor, bounds: tuple[float, float]) -> Tensor:
    return bounds[0] + u * (bounds[1] - bounds[0])


def _foreground_extent(masks: Tensor, lin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Box (lo, hi) [N, 2] (x, y) of the foreground pixel squares under ``lin`` [N, 2, 2] about the frame centre.

    A linear function's extremes over a row's pixels lie at its leftmost or rightmost foreground
    pixel, so 2·H points per mask suffice; a square's corners add 0.5·(|l_0| + |l_1|). Also
    returns which masks are empty [N].
    """
    n, h, w = masks.shape
    m = masks.to(torch.uint8)  # [N, H, W]
    left = m.argmax(-1)  # [N, H] first maximum = first foreground pixel
    right = w - 1 - m.flip(-1).argmax(-1)
    rows = m.amax(-1).bool()[:, None, :, None]  # [N, 1, H, 1] rows with foreground
    xs = torch.stack([left, right], -1).to(lin.dtype) - (w - 1) / 2  # [N, H, 2]
    ys = torch.arange(h, device=masks.device, dtype=lin.dtype)[:, None] - (h - 1) / 2  # [H, 1]
    proj = lin[:, :, 0, None, None] * xs[:, None] + lin[:, :, 1, None, None] * ys  # [N, 2, H, 2]
    half = 0.5 * lin.abs().sum(-1)  # [N, 2]
    hi = torch.where(rows, proj, -math.inf).amax((2, 3)) + half
    lo = torch.where(rows, proj, math.inf).amin((2, 3)) - half
    empty = ~rows.flatten(1).any(-1)
    return torch.where(empty[:, None], 0.0, lo), torch.where(empty[:, None], 0.0, hi), empty


class ReferenceAugment(torch.nn.Module):
    """frames [N, 3, H, W] in [-1, 1], masks {0, 1} [N, 1, H, W] -> (references, warped masks)."""

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def sample_params(self, masks: Tensor, generator: torch.Generator | None = None) -> AffineParams:
        """Draw one affine per mask, its translation chosen so the mask's foreground stays in the frame.

        With ``enabled=False`` every transform is the identity (for logging).
        """
        n, _, h, w = masks.shape
        cfg, device, f64 = self.cfg, masks.device, torch.float64
        if not cfg.enabled:
            zero = torch.zeros(n, device=device, dtype=f64)
            eye = torch.eye(3, device=device, dtype=f64).repeat(n, 1, 1)
            return AffineParams(zero, zero + 1.0, zero, zero, zero.bool(), zero[:, None].repeat(1, 2), eye)
        u = torch.rand(n, 7, generator=generator, device=device, dtype=f64)  # all draws at once: deterministic
        angle = _uniform(u[:, 0], cfg.rotation)
        scale = _uniform(u[:, 1], cfg.scale)
        shear_x, shear_y = _uniform(u[:, 2], cfg.shear), _uniform(u[:, 3], cfg.shear)
        flip = u[:, 4] < cfg.hflip_p
        center = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=device, dtype=f64).expand(n, 2)
        flip_m = torch.eye(3, device=device, dtype=f64).repeat(n, 1, 1)  # [N, 3, 3] mirror about the centre
        flip_m[:, 0, 0] = torch.where(flip, -1.0, 1.0)
        flip_m[:, 0, 2] = torch.where(flip, w - 1.0, 0.0)

        def matrix(t: Tensor, s: Tensor) -> Tensor:  # [N, 3, 3]: flip, shear, rotate and scale about the centre, then t
            sxy = torch.deg2rad(shear_x), torch.deg2rad(shear_y)
            return get_affine_matrix2d(t, center, s[:, None].expand(n, 2), angle, *sxy) @ flip_m

        lin = matrix(torch.zeros(n, 2, device=device, dtype=f64), torch.ones_like(scale))[:, :2, :2]
        lo, hi, empty = _foreground_extent(masks[:, 0] > 0.5, lin)  # [N, 2] each, at scale 1
        size = torch.tensor([w, h], device=device, dtype=f64)
        fit = (size / (hi - lo).clamp_min(1e-12)).amin(-1) * (1 - 1e-9)  # largest scale with room
        scale = torch.where(empty, scale, torch.minimum(scale, fit))  # shrink only when nothing fits
        # Allowed translations: c + s·lo + t >= -0.5 and c + s·hi + t <= size - 0.5, per axis.
        t_lo = -0.5 - center - scale[:, None] * lo
        t_hi = size - 0.5 - center - scale[:, None] * hi
        t = t_lo + u[:, 5:7] * (t_hi - t_lo).clamp_min(0.0)
        t = torch.where(empty[:, None], 0.0, t)  # nothing to keep inside: no shift
        return AffineParams(angle, scale, shear_x, shear_y, flip, t, matrix(t, scale))

    def apply(self, frames: Tensor, masks: Tensor, params: AffineParams) -> tuple[Tensor, Tensor]:
        """Warp frames (bilinear) and masks (nearest, re-binarised) by ``params``; gray outside the mask.

        One sampling grid serves the frame and its mask (kornia's ``warp_affine`` would build it
        twice, half the cost on the CPU); kornia provides the pixel-to-normalised conversion.
        """
        n, _, h, w = frames.shape
        out_dtype = frames.dtype
        dtype = frames.dtype if frames.dtype in (torch.float32, torch.float64) else torch.float32
        inv = invert_affine_transform(params.matrix[:, :2])  # [N, 2, 3] destination -> source pixels
        theta = normalize_homography(convert_affinematrix_to_homography(inv), (h, w), (h, w))[:, :2]
        grid = F.affine_grid(theta.to(dtype), [n, 1, h, w], align_corners=True)  # [N, H, W, 2]
        frames = F.grid_sample(frames.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=True)
        masks = F.grid_sample(masks.to(dtype), grid, mode="nearest", padding_mode="zeros", align_corners=True)
        refs, keep = self.composite(frames, masks)
        return refs.to(out_dtype), keep.to(out_dtype)

    def composite(self, frames: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Reference = frame inside the (re-binarised) mask, ``fill_value`` outside."""
        keep = (masks > 0.5).to(frames.dtype)  # [N, 1, H, W]
        refs = frames * keep
        if self.cfg.fill_value != 0.0:
            refs = refs + self.cfg.fill_value * (1.0 - keep)
        return refs, keep

    def forward(self, frames: Tensor, masks: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(references [N, 3, H, W], masks [N, 1, H, W]); deterministic given ``generator``."""
        if frames.dim() != 4 or masks.dim() != 4 or masks.shape[1] != 1:
            shapes = f"{tuple(frames.shape)}, {tuple(masks.shape)}"
            raise ValueError(f"frames must be [N, C, H, W] and masks [N, 1, H, W], got {shapes}")
        if frames.shape[0] != masks.shape[0] or frames.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"masks {tuple(masks.shape)} do not match frames {tuple(frames.shape)}")
        if frames.shape[0] == 0:
            return frames.clone(), masks.clone()
        if not self.cfg.enabled:
            return self.composite(frames, masks)
        return self.apply(frames, masks, self.sample_params(masks, generator))
