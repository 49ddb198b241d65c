"""What a person sees in a mini clip: one distinct subject, where it is, where it goes, on what.

A mini clip (saber_pl/synthetic.py) shows one textured, saturated subject sliding left, right, up
or down over a static, muted background that is plain, striped, a gradient or a checkerboard. A
person watching it (or a bad generation) answers these questions, and this module measures each:

- is there one distinct subject? (`find_subject`) The subject is the moving foreground: pixels
  that differ from a background estimate, whose largest connected component must be compact (it
  holds most of the frame's foreground: one object, not scattered tiles), of a plausible size, in
  most frames, on a path without jumps, and keep its colours from frame to frame.
- where is it in each frame? The component's mask, area and centroid per frame (`SubjectTrack`).
- which way does it move? (`motion_direction`) The centroid's travel, first vs last quarter.
- what kind of background is it on? (`background_kind`) Hand-written masked features (spread,
  plane fit, two-colour split, edge-orientation coherence) of the background estimate with every
  place the subject might be cut out.
- frame statistics (`frame_stats`, `gray_halo`, `tiling`): sharpness, flicker of the static background,
  the neutral-gray rim a model leaves when it pastes the gray fill of a prepared reference, and the
  mosaic a DiT leaves at its token borders.
- is it the reference's subject? (`identity_scores`, `retrieval_hits`) The reference's colours
  vs the detected subject's.

Every measurement is made on the subject's region (or on the background with that region cut
out), never on whole frames: whole-frame statistics are fooled by a frame washed in the
reference's colours (its colour histogram matches the reference; nothing in it moves against a
median background, so a centroid tracker follows noise), while such a frame has no distinct
subject at all. `identity_scores` therefore compares the reference with the detected subject's
pixels only and is -inf where no subject is present, so a video without a subject can never be a
retrieval hit. The price: a subject that never moves cannot be told from its background here.

The background estimate, per pixel, is the frame in which the subject (first located against the
plain temporal median, then again with its own masks) is farthest from that pixel. The plain
median fails on a mini clip: the subject overlaps itself in most frames, the median there takes
its colour, and only its leading and trailing parts would be foreground, as two pieces. Pixels
the subject covers in every frame (the "core") are never seen as background; they are recovered
by closing gaps along the motion axis across never-foreground pixels, and as the holes enclosed
by the union of the per-frame subjects. Videos are [F, 3, H, W] uint8 or float in [-1, 1] as in
saber_pl.eval.metrics; all thresholds are in `SceneConfig`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from saber_pl.eval.metrics import colour_histogram, direction_from_track, prompt_direction, to_unit

KINDS = ("plain", "stripes", "gradient", "checker", "other")
PROMPT_KINDS = {"plain": "plain", "striped": "stripes", "gradient": "gradient", "checkered": "checker",
                "noisy": "noise"}  # caption word before "background" -> kind (saber_pl.synthetic.BACKGROUND_WORDS)
LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights


@dataclass
class SceneConfig:
    """Every threshold of the scene metrics (tuned on clips rendered by saber_pl.synthetic at 32x32, 9 frames)."""

    # subject detection (fractions are of the frame: area of H*W, distances of W and H)
    fg_threshold: float = 0.12  # max over channels |frame - background| (in [0, 1]) above which a pixel is foreground
    far_frames: int = 1  # the background is the median over the frames where the subject is farthest (0 = all frames)
    refine: int = 1  # extra passes that re-locate the subject with its masks and re-estimate the background
    opening: int = 0  # iterations of a 3x3 binary opening of the foreground (0 = none)
    connectivity: int = 8  # 4 or 8: pixel neighbourhood of a connected component
    fill_core: bool = True  # add the pixels the subject covers in every frame (holes of its union) back to each frame
    core_gap: float = 0.3  # per frame, close gaps up to this long along the motion axis across never-foreground pixels
    min_area: float = 0.015  # smallest plausible subject area
    max_area: float = 0.45  # largest plausible subject area (real clips: <= 0.35)
    min_share: float = 0.6  # the largest component must hold this share of the frame's foreground (compact)
    min_valid_fraction: float = 2 / 3  # share of frames that must show one compact subject of plausible size
    max_jump: float = 0.25  # largest centroid step between consecutive valid frames
    min_consistency: float = 0.6  # median colour-histogram intersection of consecutive masks (one object's look)
    consistency_bins: int = 4  # bins per RGB channel of that histogram (coarse: robust to edge pixels)
    swept_dilation: int = 2  # pixels the masks are grown by in `SubjectTrack.swept`
    # motion
    min_displacement: float = 0.08  # centroid travel below which the direction is "none"
    # background kind
    min_background: float = 0.15  # fewest background pixels (share of the frame) outside the swept region
    plain_std: float = 0.015  # colour std below which the background is plain
    gradient_r2: float = 0.9  # R^2 of a per-channel plane fit above which it is a gradient
    two_tone_share: float = 0.78  # variance share of a two-colour split above which it is stripes or checker
    stripes_coherence: float = 0.93  # edge-orientation coherence above which two tones are stripes, else checker
    # gray halo
    halo_gap: int = 1  # pixels just outside the subject skipped by the halo ring (anti-aliased and chroma-blurred edge)
    halo_width: int = 1  # width in pixels of the halo ring after the gap
    gray_tolerance: float = 0.08  # a gray pixel has every channel within this of 0.5
    gray_saturation: float = 0.06  # ... and max - min channel below this
    gray_margin: float = 2.0  # a halo pixel's background must be non-gray even at these times the gray tolerances
    # tiling
    tiling_floor: float = 0.01  # luma step (2.5 of 255) added to both sides: steps a person cannot see (the codec's) count little
    # identity
    hist_bins: int = 8  # bins per RGB channel of the subject's joint colour histogram

    def __post_init__(self) -> None:
        unit_open = ("fg_threshold", "min_area", "max_area", "min_share", "min_valid_fraction",
                     "max_jump", "min_consistency", "min_displacement", "min_background", "plain_std", "gradient_r2",
                     "two_tone_share", "stripes_coherence", "gray_tolerance", "gray_saturation", "tiling_floor")
        for name in unit_open:
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.min_area >= self.max_area:
            raise ValueError(f"min_area must be < max_area, got {self.min_area} >= {self.max_area}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")
        if not 0.0 <= self.core_gap <= 1.0:
            raise ValueError(f"core_gap must be in [0, 1], got {self.core_gap}")
        for name in ("far_frames", "refine", "opening", "swept_dilation", "halo_gap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.gray_margin < 1:
            raise ValueError(f"gray_margin must be >= 1, got {self.gray_margin}")
        if self.halo_width < 1:
            raise ValueError(f"halo_width must be >= 1, got {self.halo_width}")
        for name in ("hist_bins", "consistency_bins"):
            if not 2 <= getattr(self, name) <= 32:
                raise ValueError(f"{name} must be in [2, 32], got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------
# the subject


@dataclass
class SubjectTrack:
    """The subject found in one video: per-frame masks and centroids, and whether it is one real subject."""

    masks: torch.Tensor = field(repr=False)  # bool [F, H, W]: largest foreground component per frame, core included
    centroids: torch.Tensor  # float [F, 2]: (x, y) as fractions of (W, H); NaN where the frame is not valid
    areas: torch.Tensor  # float [F]: the component's area / (H * W)
    shares: torch.Tensor  # float [F]: the component's share of the frame's foreground pixels
    valid: torch.Tensor  # bool [F]: area in [min_area, max_area] and share >= min_share
    consistency: float  # median colour-histogram intersection of consecutive valid masks (NaN with < 2 valid)
    present: bool  # one compact, consistent subject on a smooth path in enough frames
    reason: str  # why (not) present, for reports
    swept: torch.Tensor = field(repr=False)  # bool [H, W]: where the subject might be (dilated masks + boxes between)
    background: torch.Tensor = field(repr=False)  # float [3, H, W] in [0, 1]: the background estimate
    foreground: torch.Tensor = field(repr=False)  # bool [F, H, W]: every foreground pixel


def _unit_frames(video: torch.Tensor) -> np.ndarray:
    """uint8 or [-1, 1] video [F, 3, H, W] (any device) -> float32 numpy [F, 3, H, W] in [0, 1]."""
    return to_unit(video.detach().cpu()).numpy().astype(np.float32)


def _structure(connectivity: int) -> np.ndarray:
    """3x3 neighbourhood of a connected component (4: cross, 8: full square)."""
    return ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)


def _largest_component(fg: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """The largest connected component of a bool image [H, W] (all False if empty)."""
    labels, n = ndimage.label(fg, structure=structure)
    if n == 0:
        return np.zeros_like(fg)
    sizes = np.bincount(labels.ravel())[1:]  # [n]
    return labels == (int(sizes.argmax()) + 1)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of a bool mask [H, W] as fractions of (W, H); NaN if empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return math.nan, math.nan
    h, w = mask.shape
    return float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h)


def _difference(x: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Max over channels of |frame - background|: x [F, 3, H, W], background [3, H, W] -> [F, H, W]."""
    return np.abs(x - background[None]).max(axis=1)


def _far_median(x: np.ndarray, centres: np.ndarray, frames: int) -> np.ndarray:
    """Per-pixel median over the `frames` frames (0: all) whose subject centre is farthest from the pixel: [3, H, W].

    x [F, 3, H, W]; centres [F, 2] (x, y fractions, no NaN). A pixel the subject covers in more
    than half of the frames still shows background in the frames where the subject is far away.
    """
    f, _, h, w = x.shape
    k = f if frames == 0 else min(f, frames)
    if k == f:
        return np.median(x, axis=0)
    gy, gx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")  # [H, W]
    dist = (gx[None] - centres[:, 0, None, None]) ** 2 + (gy[None] - centres[:, 1, None, None]) ** 2  # [F, H, W]
    far = np.argsort(-dist, axis=0, kind="stable")[:k]  # [k, H, W] frame indices
    picked = np.take_along_axis(x, np.broadcast_to(far[:, None], (k, 3, h, w)), axis=0)  # [k, 3, H, W]
    return np.median(picked, axis=0)


def _rough_centres(fg: np.ndarray, min_pixels: float) -> np.ndarray | None:
    """Centroid of all foreground pixels per frame, interpolated over frames with too few: [F, 2] or None."""
    f = fg.shape[0]
    centres = np.array([_centroid(m) if m.sum() >= min_pixels else (math.nan, math.nan) for m in fg])  # [F, 2]
    ok = ~np.isnan(centres[:, 0])
    if not ok.any():
        return None
    t = np.arange(f)
    return np.stack([np.interp(t, t[ok], centres[ok, i]) for i in range(2)], axis=1)


def _close_core(fg: np.ndarray, centres: np.ndarray | None, cfg: SceneConfig) -> np.ndarray:
    """Join the leading and trailing parts of a subject across the pixels it covers in every frame: [F, H, W].

    Those pixels never differ from the background estimate, so a subject whose sides are parallel
    to its motion (a square sliding down) falls apart into two pieces in the middle frames. Gaps up
    to `core_gap` of the frame along the motion axis (both axes if it barely moves) are closed,
    across never-foreground pixels only.
    """
    f, h, w = fg.shape
    if cfg.core_gap <= 0 or centres is None:
        return fg
    q = max(1, f // 4)
    dx, dy = np.abs(centres[-q:].mean(0) - centres[:q].mean(0))
    axes = [1] if dx > 2 * dy else [0] if dy > 2 * dx else [0, 1]  # 1: along x, 0: along y
    never = ~fg.any(0)  # [H, W]
    out = fg.copy()
    for axis in axes:
        size = 2 * round(cfg.core_gap * (w if axis == 1 else h) / 2) + 1  # odd
        line = np.ones((1, size) if axis == 1 else (size, 1), bool)
        for t in range(f):
            out[t] |= never & ndimage.binary_closing(fg[t], structure=line)
    return out


def _swept(masks: np.ndarray, use: np.ndarray, dilation: int) -> np.ndarray:
    """Dilated masks plus the bounding box of each consecutive pair of masks: bool [H, W]."""
    h, w = masks.shape[1:]
    swept = np.zeros((h, w), bool)
    idx = [i for i in np.flatnonzero(use) if masks[i].any()]
    for i in idx:
        swept |= ndimage.binary_dilation(masks[i], iterations=dilation) if dilation else masks[i]
    for a, b in zip(idx[:-1], idx[1:]):
        ys, xs = np.nonzero(masks[a] | masks[b])
        swept[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    return swept


def _segment(x: np.ndarray, background: np.ndarray, centres: np.ndarray | None,
             cfg: SceneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Foreground against `background` and its largest component per frame (core gaps closed, holes filled).

    x [F, 3, H, W], background [3, H, W] -> (foreground, masks), both bool [F, H, W].
    """
    structure = _structure(cfg.connectivity)
    fg = _difference(x, background) > cfg.fg_threshold  # [F, H, W]
    if cfg.opening:
        fg = np.stack([ndimage.binary_opening(m, iterations=cfg.opening) for m in fg])
    fg = _close_core(fg, centres, cfg)
    masks = np.stack([_largest_component(m, structure) for m in fg])  # [F, H, W]
    if cfg.fill_core and masks.any():  # pixels covered in every frame: enclosed by the union, never foreground
        union = masks.any(0)
        core = ndimage.binary_fill_holes(union) & ~union  # [H, W]
        if core.any():
            fg = fg | core[None]
            masks = np.stack([_largest_component(m, structure) for m in fg])
    return fg, masks


def find_subject(video: torch.Tensor, cfg: SceneConfig | None = None) -> SubjectTrack:
    """Find the subject as the moving foreground of a video [F, 3, H, W] and decide whether it is one real subject.

    A frame is valid when its largest component has a plausible area and holds most of the frame's
    foreground; the subject is present when enough frames are valid, the centroid never jumps
    between them and the component keeps its colours (see `SceneConfig` for every threshold).
    """
    cfg = cfg or SceneConfig()
    if video.ndim != 4:
        raise ValueError(f"video must be [F, 3, H, W], got {tuple(video.shape)}")
    x = _unit_frames(video)  # [F, 3, H, W]
    f, _, h, w = x.shape
    # pass 1: against the plain median, where (roughly) is the subject in each frame?
    median = np.median(x, axis=0)  # [3, H, W]
    min_pixels = cfg.min_area * h * w / 4
    centres = _rough_centres(_difference(x, median) > cfg.fg_threshold, min_pixels)
    background, fg, masks = median, None, None
    # later passes: the background from the frames where the subject is farthest, then the subject against it
    for _ in range(1 + cfg.refine):
        if centres is None:  # nothing moves
            break
        background = _far_median(x, centres, cfg.far_frames)
        fg, masks = _segment(x, background, centres, cfg)
        centres = _rough_centres(masks, min_pixels) if masks.any() else None
    if fg is None:
        fg, masks = _segment(x, background, None, cfg)
    counts = fg.reshape(f, -1).sum(1)  # [F]
    area_px = masks.reshape(f, -1).sum(1)  # [F]
    areas = area_px / (h * w)
    shares = np.where(counts > 0, area_px / np.maximum(counts, 1), 0.0)
    valid = (areas >= cfg.min_area) & (areas <= cfg.max_area) & (shares >= cfg.min_share)  # [F]
    centroids = np.array([_centroid(m) if v else (math.nan, math.nan) for m, v in zip(masks, valid)])  # [F, 2]
    consistency = _consistency(x, masks, valid, cfg.consistency_bins)
    present, reason = _presence(centroids, valid, consistency, cfg)
    swept = _swept(masks, valid if valid.any() else area_px > 0, cfg.swept_dilation)
    return SubjectTrack(
        masks=torch.from_numpy(masks),
        centroids=torch.from_numpy(centroids.astype(np.float32)),
        areas=torch.from_numpy(areas.astype(np.float32)),
        shares=torch.from_numpy(shares.astype(np.float32)),
        valid=torch.from_numpy(valid),
        consistency=consistency,
        present=present,
        reason=reason,
        swept=torch.from_numpy(swept),
        background=torch.from_numpy(background.astype(np.float32)),
        foreground=torch.from_numpy(fg),
    )


def _consistency(x: np.ndarray, masks: np.ndarray, valid: np.ndarray, bins: int) -> float:
    """Median histogram intersection of the subject's colours in consecutive valid frames: [0, 1], NaN if < 2.

    One object keeps its look from frame to frame; a blob of flickering tiles does not.
    """
    idx = np.flatnonzero(valid)
    frames = torch.from_numpy(x)
    hists = {int(i): colour_histogram(frames[i], torch.from_numpy(masks[i])[None].float(), bins) for i in idx}
    sims = [float(torch.minimum(hists[int(a)], hists[int(b)]).sum()) for a, b in zip(idx[:-1], idx[1:])]
    return float(np.median(sims)) if sims else math.nan


def _presence(centroids: np.ndarray, valid: np.ndarray, consistency: float, cfg: SceneConfig) -> tuple[bool, str]:
    """Present when enough frames are valid, the centroid path between them has no jump and the look is consistent."""
    f, n = valid.size, int(valid.sum())
    if n < cfg.min_valid_fraction * f:
        return False, (f"only {n}/{f} frames show one compact subject (area in [{cfg.min_area:g}, {cfg.max_area:g}], "
                       f"share >= {cfg.min_share:g}); need {math.ceil(cfg.min_valid_fraction * f)}")
    path = centroids[valid]  # [n, 2]
    steps = np.abs(np.diff(path, axis=0)).max(1) if n > 1 else np.zeros(0)  # [n-1]
    if steps.size and steps.max() > cfg.max_jump:
        return False, f"the centroid jumps by {steps.max():.2f} of the frame (max_jump {cfg.max_jump:g})"
    if not consistency >= cfg.min_consistency:
        return False, (f"the subject's colours change from frame to frame "
                       f"(consistency {consistency:.2f} < {cfg.min_consistency:g})")
    return True, f"one compact subject in {n}/{f} frames (consistency {consistency:.2f})"


# ---------------------------------------------------------------------------------------------------
# motion


def motion_direction(track: SubjectTrack, cfg: SceneConfig | None = None) -> str:
    """'left' / 'right' / 'up' / 'down' from the centroid's travel (last vs first quarter of valid frames); 'none'
    when no subject is present or it travels less than `min_displacement`."""
    cfg = cfg or SceneConfig()
    if not track.present:
        return "none"
    return direction_from_track(track.centroids, cfg.min_displacement)


# ---------------------------------------------------------------------------------------------------
# background


@dataclass
class BackgroundResult:
    """The background kind and the features the rules used."""

    kind: str  # one of KINDS
    std: float  # colour spread of the background pixels (plain: ~0)
    plane_r2: float  # R^2 of a per-channel plane a + b x + c y (gradient: ~1)
    two_tone: float  # variance share explained by the best two-colour split (stripes / checker: ~1, gradient: ~0.75)
    coherence: float  # edge-orientation coherence (stripes: ~1, checker: ~0; NaN without edges)
    pixels: float  # share of the frame's pixels the features saw (per frame)
    source: str  # "background" (estimate outside the swept region) or "frames" (each frame outside its mask)


def _grown_masks(track: SubjectTrack, cfg: SceneConfig) -> np.ndarray:
    """Each frame's subject mask grown by `swept_dilation` (at least 1) pixels: bool [F, H, W]."""
    return np.stack([ndimage.binary_dilation(m, iterations=max(1, cfg.swept_dilation)) for m in track.masks.numpy()])


def _background_samples(x: np.ndarray, track: SubjectTrack, cfg: SceneConfig) -> tuple[list, str]:
    """(image [3, H, W], keep bool [H, W]) pairs to measure the background on, and their source."""
    keep = ~track.swept.numpy()  # [H, W]
    if keep.mean() >= cfg.min_background:
        return [(track.background.numpy(), keep)], "background"
    grown = _grown_masks(track, cfg)  # [F, H, W]
    return [(frame, ~g) for frame, g in zip(x, grown)], "frames"


def _plane_r2(pixels: np.ndarray, coords: np.ndarray) -> float:
    """R^2 of a least-squares plane a + b x + c y per channel, pooled: pixels [N, 3], coords [N, 2]."""
    design = np.concatenate([np.ones((coords.shape[0], 1)), coords], axis=1)  # [N, 3]
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)  # [3, 3]
    residual = ((pixels - design @ coef) ** 2).sum()
    total = ((pixels - pixels.mean(0)) ** 2).sum()
    return float(1 - residual / total) if total > 1e-12 else 0.0


def _principal_axis(pixels: np.ndarray) -> np.ndarray:
    """Unit vector of the largest colour variance: pixels [N, 3] -> [3]."""
    centred = pixels - pixels.mean(0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    return vectors[:, -1]


def _two_tone(pixels: np.ndarray, axis: np.ndarray) -> float:
    """Variance share explained by the best split of the colours into two along `axis` (1-D 2-means): [0, 1]."""
    s = (pixels - pixels.mean(0)) @ axis  # [N]
    order = np.argsort(s, kind="stable")
    p = pixels[order].astype(np.float64)  # [N, 3], sorted along the axis
    n = p.shape[0]
    total = ((p - p.mean(0)) ** 2).sum()
    if n < 2 or total <= 1e-12:
        return 0.0
    csum = np.cumsum(p, axis=0)[:-1]  # [N-1, 3]: sums of the first k+1 pixels
    k = np.arange(1, n)[:, None]  # [N-1, 1]
    mean_all = p.sum(0) / n
    between = k * ((csum / k - mean_all) ** 2).sum(1, keepdims=True) \
        + (n - k) * (((p.sum(0) - csum) / (n - k) - mean_all) ** 2).sum(1, keepdims=True)  # [N-1, 1]
    return float(between.max() / total)


def _coherence(images: list[tuple[np.ndarray, np.ndarray]], axis: np.ndarray) -> float:
    """Orientation coherence of the structure tensor summed over the kept pixels (1: one edge direction).

    The colours are projected on the principal colour axis; Sobel gradients are taken only where the
    whole 3x3 neighbourhood is kept, so the cut-out subject adds no edges.
    """
    jxx = jyy = jxy = 0.0
    for image, keep in images:
        s = np.tensordot(axis, image, axes=(0, 0))  # [H, W]
        inner = ndimage.binary_erosion(keep, structure=np.ones((3, 3), bool), border_value=0)
        gx, gy = ndimage.sobel(s, axis=1), ndimage.sobel(s, axis=0)
        jxx += float((gx[inner] ** 2).sum())
        jyy += float((gy[inner] ** 2).sum())
        jxy += float((gx[inner] * gy[inner]).sum())
    trace = jxx + jyy
    if trace <= 1e-12:
        return math.nan
    return math.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / trace


def background_kind(video: torch.Tensor, track: SubjectTrack, cfg: SceneConfig | None = None) -> BackgroundResult:
    """Classify the background (plain / stripes / gradient / checker / other) from masked features.

    Measured on the background estimate outside `track.swept` (everywhere the subject might be); if
    too little of it remains, on each frame outside its own subject mask. Rules, in order: plain if
    the spread is tiny; gradient if a plane fits; stripes or checker if two colours explain the
    variance (one edge orientation: stripes; two: checker); else other (e.g. a many-coloured patchwork).
    """
    cfg = cfg or SceneConfig()
    x = _unit_frames(video)  # [F, 3, H, W]
    samples, source = _background_samples(x, track, cfg)
    h, w = x.shape[-2:]
    gy, gx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")  # [H, W]
    pixels = np.concatenate([img[:, keep].T for img, keep in samples]).astype(np.float64)  # [N, 3]
    coords = np.concatenate([np.stack([gx[keep], gy[keep]], 1) for _, keep in samples])  # [N, 2]
    share = pixels.shape[0] / (len(samples) * h * w)
    if pixels.shape[0] < 8:
        return BackgroundResult("other", math.nan, math.nan, math.nan, math.nan, share, source)
    std = float(np.sqrt(pixels.var(0).mean()))
    r2 = _plane_r2(pixels, coords)
    axis = _principal_axis(pixels)
    tone = _two_tone(pixels, axis)
    coh = _coherence(samples, axis)
    if std < cfg.plain_std:
        kind = "plain"
    elif r2 >= cfg.gradient_r2:
        kind = "gradient"
    elif tone >= cfg.two_tone_share and not math.isnan(coh):
        kind = "stripes" if coh >= cfg.stripes_coherence else "checker"
    else:
        kind = "other"
    return BackgroundResult(kind, std, r2, tone, coh, share, source)


def prompt_background(prompt: str) -> str | None:
    """The background kind a caption names ("... on a striped background" -> "stripes"), None if none."""
    found = re.findall(r"\b(plain|striped|gradient|checkered|noisy)\s+background\b", prompt.lower())
    kinds = {PROMPT_KINDS[word] for word in found}
    return kinds.pop() if len(kinds) == 1 else None


# ---------------------------------------------------------------------------------------------------
# frame statistics


def _luma(x: np.ndarray) -> np.ndarray:
    """Rec. 601 luma: [..., 3, H, W] -> [..., H, W]."""
    return LUMA[0] * x[..., 0, :, :] + LUMA[1] * x[..., 1, :, :] + LUMA[2] * x[..., 2, :, :]


def frame_stats(video: torch.Tensor, track: SubjectTrack, cfg: SceneConfig | None = None) -> dict[str, float]:
    """Sharpness and background flicker, in [0, 1] pixel units.

    sharpness: mean |horizontal| + |vertical| luma difference over the whole frame. Whole frame, not
    the background: a plain background has no edges at all in a perfect clip, so only the subject's
    outline and texture show whether a video is crisp or blurred.
    flicker: mean |x_t - x_{t-1}| over the pixels outside the subject's swept region: a static
    background should not change (real clips: compression noise only). If the swept region leaves
    less than `min_background` of the frame, over the pixels outside both frames' dilated masks.
    Without a present subject the whole frame is background (what changes there is flicker, not
    motion). NaN for a single frame.
    """
    cfg = cfg or SceneConfig()
    x = _unit_frames(video)  # [F, 3, H, W]
    y = _luma(x)  # [F, H, W]
    sharp = float(np.abs(np.diff(y, axis=2)).mean() + np.abs(np.diff(y, axis=1)).mean())
    if x.shape[0] < 2:
        return {"sharpness": sharp, "flicker": math.nan}
    change = np.abs(np.diff(x, axis=0)).mean(1)  # [F-1, H, W]
    if not track.present:
        keep = np.ones_like(change, dtype=bool)
    elif (~track.swept).float().mean() >= cfg.min_background:
        keep = np.broadcast_to(~track.swept.numpy(), change.shape)
    else:
        grown = _grown_masks(track, cfg)
        keep = ~(grown[1:] | grown[:-1])  # [F-1, H, W]
    flicker = float(change[keep].mean()) if keep.any() else math.nan
    return {"sharpness": sharp, "flicker": flicker}


def tiling(video: torch.Tensor, tile: int, cfg: SceneConfig | None = None) -> float:
    """Median |luma step| across the borders of a `tile` x `tile` pixel grid over the median step elsewhere.

    A DiT's head turns each token into its own patch of latent pixels, `tile` = the autoencoder's factor
    x the patch size pixels square (mini: 2 x 2 = 4); where neighbouring tokens disagree, the frame has
    a step at every tile border, the mosaic a person sees. Real clips have their edges anywhere: ~1.
    Medians, so a real clip's few strong edges do not decide it (with means, grid-aligned stripes ranged
    0.5-1.7); both get `tiling_floor` added, so flat frames and invisible codec steps score ~1. Whole
    frames, all steps between horizontally and vertically adjacent pixels; `tile` 1 has no inside, NaN.
    """
    cfg = cfg or SceneConfig()
    if tile < 2:
        return math.nan
    y = _luma(_unit_frames(video))  # [F, H, W]
    dx, dy = np.abs(np.diff(y, axis=2)), np.abs(np.diff(y, axis=1))  # [F, H, W-1], [F, H-1, W]
    bx = np.arange(dx.shape[2]) % tile == tile - 1  # the step from column x to x + 1 crosses a border
    by = np.arange(dy.shape[1]) % tile == tile - 1
    if not (bx.any() or by.any()):  # a frame no larger than one tile has no border inside it
        return math.nan
    border = np.concatenate([dx[:, :, bx].ravel(), dy[:, by, :].ravel()])
    inner = np.concatenate([dx[:, :, ~bx].ravel(), dy[:, ~by, :].ravel()])
    return float((np.median(border) + cfg.tiling_floor) / (np.median(inner) + cfg.tiling_floor))


# ---------------------------------------------------------------------------------------------------
# gray halo


def _is_gray(x: np.ndarray, tolerance: float, saturation: float) -> np.ndarray:
    """Neutral gray near the reference fill (0.5): x [..., 3, H, W] -> bool [..., H, W]."""
    near = (np.abs(x - 0.5) <= tolerance).all(axis=-3)
    flat = (x.max(axis=-3) - x.min(axis=-3)) <= saturation
    return near & flat


def gray_halo(video: torch.Tensor, track: SubjectTrack, cfg: SceneConfig | None = None) -> float:
    """Share of the pixels in a ring just outside the subject that are neutral gray where their background is not:
    real clips ~0, a gray rim ~1, and a gray background never counts.

    A gray rim moves with the subject, so the foreground detection may count it as part of the
    subject: the ring is therefore taken around the subject's *non-gray* pixels, `halo_width`
    pixels wide after a `halo_gap` (edge pixels blend subject and background). The baseline is
    per pixel: the background estimate at the same pixel (seen when the subject is far away) must
    be clearly not gray (`gray_margin` times the tolerances), so a gray or grayish background, and pixels hovering
    at the gray threshold under compression noise, do not count. Averaged over valid frames; 0
    when there are none.
    """
    cfg = cfg or SceneConfig()
    masks, valid = track.masks.numpy(), track.valid.numpy()  # [F, H, W], [F]
    if not valid.any():
        return 0.0
    gray = _is_gray(_unit_frames(video), cfg.gray_tolerance, cfg.gray_saturation)  # [F, H, W]
    grayish_bg = _is_gray(track.background.numpy(), cfg.gray_margin * cfg.gray_tolerance,
                          cfg.gray_margin * cfg.gray_saturation)  # [H, W]
    hits = count = 0
    for t in np.flatnonzero(valid):
        subject = masks[t] & ~gray[t]  # [H, W]
        if not subject.any():  # an all-gray "subject": the whole detection is the artefact
            subject = ndimage.binary_erosion(masks[t], iterations=cfg.halo_width)
        inner = ndimage.binary_dilation(subject, iterations=cfg.halo_gap) if cfg.halo_gap else subject
        ring = ndimage.binary_dilation(inner, iterations=cfg.halo_width) & ~inner  # [H, W]
        hits, count = hits + int((gray[t] & ~grayish_bg)[ring].sum()), count + int(ring.sum())
    return hits / count if count else 0.0


# ---------------------------------------------------------------------------------------------------
# identity


def subject_histogram(video: torch.Tensor, track: SubjectTrack, bins: int = 8) -> torch.Tensor:
    """Normalised joint RGB histogram of the pixels inside the subject masks of the valid frames, pooled: [bins^3]."""
    frames = to_unit(video.detach().cpu())  # [F, 3, H, W]
    total = torch.zeros(bins**3)
    for frame, m, ok in zip(frames, track.masks, track.valid):
        n = int(m.sum())
        if n and ok:
            total += colour_histogram(frame, m[None].float(), bins) * n
    return total / total.sum().clamp_min(1)


def identity_similarity(video_hist: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """Histogram intersection of a subject histogram [B] and the reference's foreground histogram: [0, 1].

    ref [3, H, W] in [-1, 1] (or uint8), mask [1, H, W] {0, 1}; bins inferred from the histogram's length.
    """
    bins = round(video_hist.numel() ** (1 / 3))
    if bins**3 != video_hist.numel():
        raise ValueError(f"histogram length {video_hist.numel()} is not bins^3")
    ref_hist = colour_histogram(to_unit(ref), mask.reshape(1, *mask.shape[-2:]).float(), bins)
    return float(torch.minimum(video_hist, ref_hist).sum())


def identity_scores(videos: list[torch.Tensor], refs: torch.Tensor, masks: torch.Tensor,
                    cfg: SceneConfig | None = None) -> torch.Tensor:
    """Identity similarity of every video's detected subject with every reference: [N, M], -inf in the rows of
    videos without a present subject (so they are never a retrieval hit). refs [M, 3, H, W], masks [M, 1, H, W]."""
    cfg = cfg or SceneConfig()
    scores = torch.full((len(videos), refs.shape[0]), -math.inf)
    for i, video in enumerate(videos):
        track = find_subject(video, cfg)
        if not track.present:
            continue
        hist = subject_histogram(video, track, cfg.hist_bins)
        scores[i] = torch.tensor([identity_similarity(hist, r, m) for r, m in zip(refs, masks)])
    return scores


def retrieval_hits(scores: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Whether each video's own reference wins: scores [N, M] -> bool [N].

    A hit needs a finite own score strictly above every other one. (A plain argmax is not enough:
    on a row of -inf it returns index 0, which would count a video without a subject as a hit
    whenever its own reference comes first.)
    """
    if len(targets) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {len(targets)} targets")
    hits = []
    for row, t in zip(scores, targets):
        others = torch.cat([row[:t], row[t + 1 :]])
        hits.append(bool(torch.isfinite(row[t])) and bool((row[t] > others).all()))
    return torch.tensor(hits, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------
# one video


def describe(video: torch.Tensor, prompt: str | None = None, cfg: SceneConfig | None = None,
             tile: int | None = None) -> dict:
    """Everything this module measures for one video, compared with what its prompt asks for.

    A match is None where the prompt names no direction / background kind, or one this module does
    not recognise ("noise": the mini data has no noisy backgrounds). Without a present subject the
    direction is "none", so it never matches a prompted one. `tile`: the DiT's token size in pixels, for
    `tiling` (None: not measured, NaN).
    """
    cfg = cfg or SceneConfig()
    track = find_subject(video, cfg)
    direction = motion_direction(track, cfg)
    bg = background_kind(video, track, cfg)
    expected_dir = prompt_direction(prompt) if prompt else None
    expected_kind = prompt_background(prompt) if prompt else None
    stats = frame_stats(video, track, cfg)
    valid_areas = track.areas[track.valid]
    return {
        "present": track.present,
        "reason": track.reason,
        "consistency": track.consistency,
        "direction": direction,
        "expected_direction": expected_dir,
        "direction_match": None if expected_dir is None else direction == expected_dir,
        "background": bg.kind,
        "expected_background": expected_kind,
        "background_match": None if expected_kind not in KINDS else bg.kind == expected_kind,
        "sharpness": stats["sharpness"],
        "flicker": stats["flicker"],
        "gray_halo": gray_halo(video, track, cfg),
        "tiling": tiling(video, tile, cfg) if tile else math.nan,
        "subject_area": float(valid_areas.mean()) if valid_areas.numel() else 0.0,
    }
