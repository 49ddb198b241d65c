"""Built-in video metrics that run here without external weights (docs/eval.md explains each one).

- `reference_consistency`: does the reference's subject appear somewhere in each frame, at any
  position and a few scales (colour-histogram, masked-pixel or local DINO/CLIP features)?
- `identity_retrieval_accuracy`: is a video closest to its own reference among N (chance 1/N)?
- `copy_paste_score`: is the reference pasted pixel-aligned, at the same place and scale (1 = verbatim)?
- `temporal_smoothness`: how little the frames jitter (1 = static).
- `text_following`: the tracked subject's direction vs the prompt's motion word.

Videos are [F, 3, H, W], uint8 or float in [-1, 1]; references and masks are what
`saber_pl.references.prepare_references` returns for one image: [3, H, W] in [-1, 1] (gray = 0
outside the mask) and {0, 1} [1, H, W], at the video's size. The sliding-window search, the
masked window cosine, the histogram back-projection tracker and the prompt parser are written by
hand: torchmetrics and kornia have no masked or window-searched version of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import av
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional import pairwise_cosine_similarity

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # images float [N, 3, S, S] in [0, 1] -> features [N, D]
DIRECTIONS = ("left", "right", "up", "down", "none")


@dataclass
class MetricsConfig:
    """Knobs of the built-in metrics (all ours: the paper reports OpenS2V-Eval only)."""

    feature: Literal["histogram", "pixels"] = "histogram"  # consistency feature space (a model: pass feature_fn)
    hist_bins: int = 8  # bins per RGB channel of the joint colour histogram (8^3 = 512 bins)
    analysis_size: int = 128  # frames and references are downscaled so their longer side is this (px)
    window_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)  # search window sizes / reference box size
    window_stride: float = 0.25  # window step as a fraction of the window size
    model_crop: int = 224  # side of the square crops given to a feature model
    model_frames: int = 8  # frames (evenly spaced) a feature model looks at; the search is costly
    smoothness: Literal["interpolation", "difference"] = "interpolation"  # see temporal_smoothness
    track_threshold: float = 0.5  # back-projection likelihood above which a pixel belongs to the subject
    background_threshold: float = 0.1  # |frame - median frame| (in [0, 1]) above which a pixel is foreground
    min_displacement: float = 0.05  # centroid travel (fraction of the frame) below which direction is "none"

    def __post_init__(self) -> None:
        if self.feature not in ("histogram", "pixels"):
            raise ValueError(f"feature must be 'histogram' or 'pixels', got {self.feature!r}")
        if not 2 <= self.hist_bins <= 32:
            raise ValueError(f"hist_bins must be in [2, 32], got {self.hist_bins}")
        if self.analysis_size < 16:
            raise ValueError(f"analysis_size must be >= 16, got {self.analysis_size}")
        if not self.window_scales or any(s <= 0 for s in self.window_scales):
            raise ValueError(f"window_scales must be positive, got {self.window_scales}")
        if not 0 < self.window_stride <= 1:
            raise ValueError(f"window_stride must be in (0, 1], got {self.window_stride}")
        if self.model_crop < 16:
            raise ValueError(f"model_crop must be >= 16, got {self.model_crop}")
        if self.model_frames < 1:
            raise ValueError(f"model_frames must be >= 1, got {self.model_frames}")
        if self.smoothness not in ("interpolation", "difference"):
            raise ValueError(f"smoothness must be 'interpolation' or 'difference', got {self.smoothness!r}")
        if not 0 < self.track_threshold < 1:
            raise ValueError(f"track_threshold must be in (0, 1), got {self.track_threshold}")
        if not 0 < self.background_threshold < 1:
            raise ValueError(f"background_threshold must be in (0, 1), got {self.background_threshold}")
        if not 0 <= self.min_displacement < 1:
            raise ValueError(f"min_displacement must be in [0, 1), got {self.min_displacement}")


# ---------------------------------------------------------------------------------------------------
# inputs


def read_video(path: str | Path, max_frames: int | None = None) -> torch.Tensor:
    """Decode a whole video file with PyAV: uint8 [F, 3, H, W]."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"no frames decoded from {path}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """uint8, or float in [-1, 1] -> float in [0, 1]; same shape ([..., 3, H, W])."""
    if video.shape[-3] != 3:
        raise ValueError(f"expected RGB [..., 3, H, W], got shape {tuple(video.shape)}")
    if video.dtype == torch.uint8:
        return video.float() / 255.0
    return ((video.float() + 1) / 2).clamp(0, 1)


Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_pair(video: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> Triple:
    """Validate shapes and return (video [F, 3, H, W], ref [3, H, W], mask [1, H, W]) in [0, 1] / {0, 1}."""
    if video.ndim != 4:
        raise ValueError(f"video must be [F, 3, H, W], got {tuple(video.shape)}")
    mask = mask.reshape(1, *mask.shape[-2:]).float()
    if ref.shape[-2:] != video.shape[-2:] or mask.shape[-2:] != video.shape[-2:]:
        raise ValueError(f"reference {tuple(ref.shape)} / mask {tuple(mask.shape)} must have the video's size "
                         f"{tuple(video.shape[-2:])} (prepare them with saber_pl.references at the video size)")
    if not bool((mask > 0.5).any()):
        raise ValueError("reference mask is empty")
    return to_unit(video), to_unit(ref), (mask > 0.5).float()


def _downscale(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shrink [..., C, H, W] so that max(H, W) <= size (antialiased); never enlarges."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale >= 1:
        return x
    shape = x.shape
    y = F.interpolate(x.reshape(-1, *shape[-3:]), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                      mode="bilinear", align_corners=False, antialias=True)
    return y.reshape(*shape[:-2], *y.shape[-2:])


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the mask's foreground; mask [1, H, W]."""
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    top, left = int(ys.min()), int(xs.min())
    return top, left, int(ys.max()) - top + 1, int(xs.max()) - left + 1


def _window_sizes(bh: int, bw: int, h: int, w: int, scales: tuple[float, ...]) -> list[tuple[int, int]]:
    """Distinct window sizes (reference box x scale), clamped to the frame."""
    sizes = {(min(h, max(2, round(bh * s))), min(w, max(2, round(bw * s)))) for s in scales}
    return sorted(sizes)


# ---------------------------------------------------------------------------------------------------
# reference consistency


def _bin_index(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Joint RGB bin of each pixel: x float [..., 3, H, W] in [0, 1] -> long [..., H, W]."""
    q = (x * bins).long().clamp(0, bins - 1)
    return (q[..., 0, :, :] * bins + q[..., 1, :, :]) * bins + q[..., 2, :, :]


def _one_hot(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-pixel one-hot colour bin: [N, 3, H, W] -> [N, bins^3, H, W]."""
    return F.one_hot(_bin_index(x, bins), bins**3).permute(0, 3, 1, 2).float()


def colour_histogram(image: torch.Tensor, mask: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """Normalised joint RGB histogram of the masked pixels: image [3, H, W] in [0, 1], mask [1, H, W] -> [bins^3]."""
    idx = _bin_index(image, bins)[mask[0] > 0.5]
    hist = torch.bincount(idx, minlength=bins**3).float()
    return hist / hist.sum().clamp_min(1)


def _window_sums(table: torch.Tensor, wh: int, ww: int, stride: tuple[int, int]) -> torch.Tensor:
    """Sums over all (wh, ww) windows at `stride` from a summed-area table [N, C, h+1, w+1] -> [N, C, ny, nx]."""
    h, w = table.shape[-2] - 1, table.shape[-1] - 1
    ys = torch.unique(torch.cat([torch.arange(0, h - wh + 1, stride[0]), torch.tensor([h - wh])]))  # incl. the last
    xs = torch.unique(torch.cat([torch.arange(0, w - ww + 1, stride[1]), torch.tensor([w - ww])]))
    y0, y1, x0, x1 = ys[:, None], ys[:, None] + wh, xs[None, :], xs[None, :] + ww
    return table[..., y1, x1] - table[..., y0, x1] - table[..., y1, x0] + table[..., y0, x0]


def _histogram_scores(frames: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, cfg: MetricsConfig) -> torch.Tensor:
    """Best Bhattacharyya coefficient (cosine of sqrt-histograms) over windows, per frame: [F].

    Only the bins the reference occupies contribute to the coefficient, so window histograms are
    counted for those bins alone, from a summed-area table of per-pixel indicators: every window
    costs a few additions per bin whatever its size.
    """
    ref_hist = colour_histogram(ref, mask, cfg.hist_bins)  # [B]
    used = ref_hist.nonzero().flatten()  # [K] bins present in the reference
    ref_feat = ref_hist[used].sqrt()  # [K]
    _, _, bh, bw = _bbox(mask)
    h, w = frames.shape[-2:]
    best = []
    for chunk in frames.split(8):
        idx = _bin_index(chunk, cfg.hist_bins)  # [f, h, w]
        hot = (idx[:, None] == used[None, :, None, None]).float()  # [f, K, h, w]
        table = F.pad(hot.cumsum(2).cumsum(3), (1, 0, 1, 0))  # [f, K, h+1, w+1]
        scores = []
        for wh, ww in _window_sizes(bh, bw, h, w, cfg.window_scales):
            stride = (max(1, round(wh * cfg.window_stride)), max(1, round(ww * cfg.window_stride)))
            hist = _window_sums(table, wh, ww, stride).clamp_min(0) / (wh * ww)  # [f, K, ny, nx]
            sim = torch.einsum("fkyx,k->fyx", hist.sqrt(), ref_feat)
            scores.append(sim.flatten(1).max(1).values)
        best.append(torch.stack(scores).max(0).values)
    return torch.cat(best)


def _pixel_scores(frames: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, cfg: MetricsConfig) -> torch.Tensor:
    """Best masked cosine similarity of the reference over positions and scales, per frame: [F].

    Pixels are compared in [-1, 1] space (gray = origin), so the cosine between the masked reference
    pixels and the same-shaped masked window tells colours apart (red vs cyan = -1) and ignores a
    global contrast change. Computed for all positions at once with three convolutions.
    """
    top, left, bh, bw = _bbox(mask)
    tmpl, tmask = ref[:, top : top + bh, left : left + bw] * 2 - 1, mask[:, top : top + bh, left : left + bw]
    x = frames * 2 - 1  # [F, 3, h, w] in [-1, 1]
    h, w = frames.shape[-2:]
    scores = []
    for wh, ww in _window_sizes(bh, bw, h, w, cfg.window_scales):
        m = (F.interpolate(tmask[None], size=(wh, ww), mode="bilinear", align_corners=False) > 0.5).float()
        if m.sum() < 4:
            continue
        t = F.interpolate(tmpl[None], size=(wh, ww), mode="bilinear", align_corners=False, antialias=True) * m
        cross = F.conv2d(x, t)  # [F, 1, ny, nx]
        energy = F.conv2d(x * x, m.expand(1, 3, wh, ww))  # squared norm of each masked window
        cos = cross / (energy * (t * t).sum()).sqrt().clamp_min(1e-6)
        scores.append(cos.flatten(1).max(1).values)
    if not scores:
        raise ValueError("reference mask too small at the analysis size; raise analysis_size")
    return torch.stack(scores).max(0).values


def _window_crops(frame: torch.Tensor, wh: int, ww: int, cfg: MetricsConfig, batch: int = 64) -> list[torch.Tensor]:
    """All (wh, ww) windows of a frame [3, H, W] at the configured stride, resized, in batches of [n, 3, S, S]."""
    sy, sx = max(1, round(wh * cfg.window_stride)), max(1, round(ww * cfg.window_stride))
    patches = frame.unfold(1, wh, sy).unfold(2, ww, sx)  # [3, ny, nx, wh, ww] (a view)
    patches = patches.permute(1, 2, 0, 3, 4).reshape(-1, 3, wh, ww)  # [N, 3, wh, ww]
    size = (cfg.model_crop, cfg.model_crop)
    return [F.interpolate(p, size=size, mode="bilinear", align_corners=False, antialias=True)
            for p in patches.split(batch)]


def _model_scores(frames: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, cfg: MetricsConfig,
                  feature_fn: FeatureFn) -> torch.Tensor:
    """Best cosine between the reference crop's features and each window's features, per frame: [F']."""
    top, left, bh, bw = _bbox(mask)
    gray = 0.5 + (ref - 0.5) * mask  # gray outside the mask, as the model saw it
    ref_crop = F.interpolate(gray[None, :, top : top + bh, left : left + bw], size=(cfg.model_crop, cfg.model_crop),
                             mode="bilinear", align_corners=False, antialias=True)
    ref_feat = feature_fn(ref_crop).float()  # [1, D]
    idx = torch.linspace(0, frames.shape[0] - 1, min(cfg.model_frames, frames.shape[0])).round().long()
    sizes = _window_sizes(bh, bw, *frames.shape[-2:], cfg.window_scales)
    scores = []
    for frame in frames[idx]:
        best = torch.tensor(-1.0)
        for wh, ww in sizes:
            for crops in _window_crops(frame, wh, ww, cfg):
                feats = feature_fn(crops).float()  # [n, D]
                best = torch.maximum(best, pairwise_cosine_similarity(ref_feat, feats).max())
        scores.append(best)
    return torch.stack(scores)


def frame_consistency(video: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, cfg: MetricsConfig | None = None,
                      feature_fn: FeatureFn | None = None) -> torch.Tensor:
    """Per-frame similarity of the reference foreground to its best-matching window: [F] (model: [model_frames])."""
    cfg = cfg or MetricsConfig()
    frames, ref, mask = _check_pair(video, ref, mask)
    if feature_fn is not None:  # a model looks at full-resolution crops
        return _model_scores(frames, ref, mask, cfg, feature_fn)
    frames, ref = _downscale(frames, cfg.analysis_size), _downscale(ref, cfg.analysis_size)
    mask = (_downscale(mask, cfg.analysis_size) > 0.5).float()
    if not bool(mask.any()):
        raise ValueError("reference mask vanishes at the analysis size; raise analysis_size")
    if cfg.feature == "pixels":
        return _pixel_scores(frames, ref, mask, cfg)
    return _histogram_scores(frames, ref, mask, cfg)


def reference_consistency(video: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
                          cfg: MetricsConfig | None = None, feature_fn: FeatureFn | None = None) -> float:
    """Mean over frames of the best-window similarity to the reference (histogram: [0, 1]; pixels/model: [-1, 1])."""
    return float(frame_consistency(video, ref, mask, cfg, feature_fn).mean())


def consistency_matrix(videos: list[torch.Tensor], refs: torch.Tensor, masks: torch.Tensor,
                       cfg: MetricsConfig | None = None, feature_fn: FeatureFn | None = None) -> torch.Tensor:
    """Reference consistency of every video with every reference: [V, N]."""
    return torch.tensor([[reference_consistency(v, r, m, cfg, feature_fn) for r, m in zip(refs, masks)]
                         for v in videos])


def identity_retrieval_accuracy(videos: list[torch.Tensor], refs: torch.Tensor, masks: torch.Tensor,
                                targets: list[int], cfg: MetricsConfig | None = None,
                                feature_fn: FeatureFn | None = None) -> float:
    """Fraction of videos whose own reference (refs[targets[i]]) scores highest among the N; chance = 1/N.

    refs [N, 3, H, W], masks [N, 1, H, W]: each video's own reference plus the N-1 distractors.
    """
    if len(videos) != len(targets):
        raise ValueError(f"{len(videos)} videos but {len(targets)} targets")
    if any(not 0 <= t < refs.shape[0] for t in targets):
        raise ValueError(f"targets must index the {refs.shape[0]} references, got {targets}")
    scores = consistency_matrix(videos, refs, masks, cfg, feature_fn)  # [V, N]
    return float((scores.argmax(1) == torch.tensor(targets)).float().mean())


def load_feature_model(local_dir: str, device: str = "cpu") -> FeatureFn:
    """A DINO/CLIP-style image encoder from a LOCAL transformers folder as a FeatureFn (never downloads)."""
    if not Path(local_dir).is_dir():
        raise FileNotFoundError(f"feature model folder not found: {local_dir}")
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(local_dir, local_files_only=True)
    model = AutoModel.from_pretrained(local_dir, local_files_only=True).to(device).eval()

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        arrays = [(im.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy() for im in images]
        pixels = processor(images=arrays, return_tensors="pt")["pixel_values"].to(device)
        if hasattr(model, "get_image_features"):  # CLIP / SigLIP: the projected image embedding
            out = model.get_image_features(pixel_values=pixels)
            return (out.pooler_output if hasattr(out, "pooler_output") else out).float().cpu()
        out = model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)  # DINOv2: the CLS token after layer norm
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float().cpu()

    return features


# ---------------------------------------------------------------------------------------------------
# copy-paste and smoothness


def copy_paste_score(video: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - mean |frame - reference| / 2 over the reference's foreground pixels, same positions, mean over frames.

    Values in [-1, 1] pixel space, so the score lies in [0, 1]; 1 = the reference pasted verbatim.
    """
    frames, ref, mask = _check_pair(video, ref, mask)  # [0, 1] units: |diff| / 2 in [-1, 1] = |diff| here
    diff = ((frames - ref) * mask).abs().sum(dim=(1, 2, 3)) / (3 * mask.sum())  # [F]
    return float(1 - diff.mean())


def temporal_smoothness(video: torch.Tensor, mode: Literal["interpolation", "difference"] = "interpolation") -> float:
    """1 - mean absolute temporal residual in [0, 1] pixel units; 1 = perfectly static.

    interpolation: residual of predicting frame t by the average of frames t-1 and t+1 (warping-free
    second difference: steady motion costs little, flicker and jitter cost a lot).
    difference: residual of predicting frame t by frame t-1 (any change costs).
    """
    x = to_unit(video)  # [F, 3, H, W]
    if mode == "difference":
        if x.shape[0] < 2:
            raise ValueError("temporal_smoothness needs >= 2 frames")
        residual = x[1:] - x[:-1]
    elif mode == "interpolation":
        if x.shape[0] < 3:
            raise ValueError("temporal_smoothness with mode='interpolation' needs >= 3 frames")
        residual = x[1:-1] - (x[:-2] + x[2:]) / 2
    else:
        raise ValueError(f"mode must be 'interpolation' or 'difference', got {mode!r}")
    return float(1 - residual.abs().mean())


# ---------------------------------------------------------------------------------------------------
# motion direction


def track_centroids(video: torch.Tensor, ref: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    cfg: MetricsConfig | None = None) -> torch.Tensor:
    """Subject centroid per frame, (x, y) as fractions of the width/height: [F, 2] (NaN where nothing found).

    With a reference: histogram back-projection (Swain & Ballard), likelihood min(1, H_ref(c) / H_frame(c))
    of each pixel's colour c. Without one: pixels differing from the per-pixel temporal median.
    """
    cfg = cfg or MetricsConfig()
    if ref is not None and mask is not None:
        frames, ref_u, mask_u = _check_pair(video, ref, mask)
        frames = _downscale(frames, cfg.analysis_size)
        ref_hist = colour_histogram(ref_u, mask_u, cfg.hist_bins)  # [B]
        idx = _bin_index(frames, cfg.hist_bins)  # [F, h, w]
        weights = []
        for frame_idx in idx:
            frame_hist = torch.bincount(frame_idx.flatten(), minlength=cfg.hist_bins**3).float()
            ratio = (ref_hist / (frame_hist / frame_idx.numel()).clamp_min(1e-8)).clamp(max=1.0)  # [B]
            weights.append(ratio[frame_idx])
        likelihood = torch.stack(weights)  # [F, h, w]
        weight = likelihood * (likelihood > cfg.track_threshold)
    else:
        frames = _downscale(to_unit(video), cfg.analysis_size)
        background = frames.median(dim=0).values  # [3, h, w]
        weight = ((frames - background).abs().mean(1) > cfg.background_threshold).float()  # [F, h, w]
    h, w = weight.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    total = weight.sum(dim=(1, 2))  # [F]
    cx = (weight.sum(1) * xs).sum(1) / total
    cy = (weight.sum(2) * ys).sum(1) / total
    out = torch.stack([cx, cy], dim=1)
    out[total == 0] = float("nan")
    return out


def direction_from_track(centroids: torch.Tensor, min_displacement: float = 0.05) -> str:
    """'left' / 'right' / 'up' / 'down' from the dominant axis of the travel (mean of the last quarter of
    tracked frames minus mean of the first quarter); 'none' below `min_displacement` or if nothing was tracked."""
    valid = centroids[~torch.isnan(centroids).any(1)]
    if valid.shape[0] < 2:
        return "none"
    q = max(1, valid.shape[0] // 4)
    dx, dy = (valid[-q:].mean(0) - valid[:q].mean(0)).tolist()
    if max(abs(dx), abs(dy)) < min_displacement:
        return "none"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"  # image y grows downwards


_WORDS = {
    "left": r"left|leftwards?",
    "right": r"right|rightwards?",
    "up": r"up|upwards?|rises|rising|ascends?|ascending|climbs?|climbing",
    "down": r"down|downwards?|falls|falling|descends?|descending|sinks?|sinking|drops?|dropping",
    "none": r"still|stationary|motionless|static|immobile",
}
_SIDE = {"left": "left", "right": "right", "top": "up", "bottom": "down"}


def prompt_direction(prompt: str) -> str | None:
    """The motion direction a prompt asks for ("from the left to the right" -> "right"), None if none or ambiguous."""
    text = prompt.lower()
    travel = re.search(r"from (?:the )?(left|right|top|bottom)\b.*?\bto (?:the )?(left|right|top|bottom)\b", text)
    if travel:
        return _SIDE[travel.group(2)]
    toward = re.findall(r"\b(?:to|towards?) the (left|right|top|bottom)\b", text)
    if len(set(toward)) == 1:
        return _SIDE[toward[0]]
    found = {d for d, pattern in _WORDS.items() if re.search(rf"\b(?:{pattern})\b", text)}
    return found.pop() if len(found) == 1 else None


@dataclass
class DirectionResult:
    """Tracked direction of the subject vs the one the prompt asks for."""

    predicted: str  # one of DIRECTIONS
    expected: str | None  # None: the prompt names no (unambiguous) direction
    match: bool | None  # None when expected is None


def text_following(video: torch.Tensor, prompt: str, ref: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, cfg: MetricsConfig | None = None) -> DirectionResult:
    """Track the subject (by the reference's colours, or against the background) and compare to the prompt."""
    cfg = cfg or MetricsConfig()
    predicted = direction_from_track(track_centroids(video, ref, mask, cfg), cfg.min_displacement)
    expected = prompt_direction(prompt)
    return DirectionResult(predicted, expected, None if expected is None else predicted == expected)


def evaluate_video(video: torch.Tensor, ref: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   prompt: str | None = None, cfg: MetricsConfig | None = None,
                   feature_fn: FeatureFn | None = None) -> dict[str, float | str | bool | None]:
    """Every built-in metric that applies to one video (reference metrics need ref + mask, direction a prompt)."""
    cfg = cfg or MetricsConfig()
    out: dict[str, float | str | bool | None] = {"smoothness": temporal_smoothness(video, cfg.smoothness)}
    if ref is not None and mask is not None:
        out["consistency"] = reference_consistency(video, ref, mask, cfg, feature_fn)
        out["copy_paste"] = copy_paste_score(video, ref, mask)
    if prompt is not None:
        result = text_following(video, prompt, ref, mask, cfg)
        out.update(direction=result.predicted, expected_direction=result.expected, direction_match=result.match)
    return out
