"""The embedded data set: procedural clips of moving, textured subjects, deterministic by seed.

Each clip shows one or two subjects (a shape filled with a colour texture) moving over a background
with one simple motion each. Captions name the motion, a generic noun and the background kind but
never the subjects' colours, textures or shapes, so a model can only learn *what* a subject looks
like from its references (a later benchmark relies on this). Every sample's json keeps the full
subject specs and per-frame trajectories, and `render_subject` draws one subject alone on a plain
background at another scale and angle (a "product photo" reference for evaluation).

    python data/make_embedded.py --out data/embedded   # ~1000 train clips + a val shard
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from saber_pl.video import encode_mp4

SHAPES = ("disc", "ellipse", "square", "diamond", "triangle", "star", "blob", "cross")
TEXTURES = ("solid", "stripes", "checker", "dots", "gradient")
BACKGROUNDS = ("plain", "stripes", "gradient", "noise", "checker")
MOTIONS = ("slide_left", "slide_right", "slide_up", "slide_down", "diagonal", "bounce", "zoom_in", "zoom_out", "rotate")

NOUNS = ("an object", "a shape", "a thing", "an item", "a figure")
BACKGROUND_WORDS = {
    "plain": "a plain background",
    "stripes": "a striped background",
    "gradient": "a gradient background",
    "noise": "a noisy background",
    "checker": "a checkered background",
}


@dataclass
class SyntheticConfig:
    """Size and content of the procedural clips (defaults = the embedded data set, see docs/data.md).

    The defaults are sized for the mini scale (32x32 pixels, 8x8 DiT tokens of 4x4 pixels, 9 frames):
    one subject large enough to span several tokens, backgrounds whose structure is coarser than a
    token, and the four slide motions over the whole clip. The kinds and ranges are knobs, so a
    harder set (all nine motions, noise backgrounds, two subjects) is one flag away (docs/data.md).
    """

    num_frames: int = 17  # frames per clip: 17 at 16 fps -> the mini window (9 frames at 8 fps) is the whole clip
    fps: float = 16.0  # frame rate written into the mp4
    height: int = 64  # frame height (even, for yuv420p: 2x the mini size keeps the chroma sharp)
    width: int = 64  # frame width (even, for yuv420p)
    subject_radius: tuple[float, float] = (0.2, 0.3)  # subject radius range / min(H, W) (~25% of the frame)
    max_subjects: int = 1  # 1..max_subjects subjects per clip
    two_subject_prob: float = 0.3  # probability of more than one subject (when max_subjects > 1)
    motions: tuple[str, ...] = ("slide_left", "slide_right", "slide_up", "slide_down")  # of MOTIONS
    backgrounds: tuple[str, ...] = ("plain", "stripes", "gradient", "checker")  # of BACKGROUNDS
    background_freq: tuple[float, float] = (1.5, 2.5)  # stripe / checker cycles across the frame
    background_contrast: float = 0.2  # min value difference of the two background colours (0..1)
    # HSV value range of the background colours. Dark (<= 0.45) with subjects brighter by
    # `subject_contrast`: a subject of random colour on a background of random value is, on average,
    # the background's colour, so the mean clip of a caption is the same for every direction and the
    # direction word tells a denoiser nothing at high noise, where the layout is decided (the direction
    # explained -1 % of the latent variance held out; +15 % when dark, +21 % with the longer slides; docs/data.md)
    background_value: tuple[float, float] = (0.1, 0.45)
    # min luma (mean RGB, 0..1) by which each subject colour exceeds the brighter background colour;
    # None = subject colours independent of the background's brightness (the old data set: (0.2, 0.9), None)
    subject_contrast: float | None = 0.2
    texture_freq: tuple[float, float] = (1.5, 3.0)  # subject texture cycles across its diameter
    # slides: the path's centre is the frame's centre +- this (fraction of the frame; 0.2 = anywhere the
    # subject stays in view), so the prompt alone says roughly where the subject is in each frame
    path_jitter: float = 0.05
    # slides and diagonals: path length, fraction of the frame (was 0.3-0.45: the start and end frames of
    # "left" and "right" overlapped over most of the subject; the subject may now touch the frame's edge)
    slide_distance: tuple[float, float] = (0.4, 0.55)
    background_angles: tuple[float, ...] | None = (0.0, 90.0)  # stripes / gradient directions; None = any angle
    # which of the two background colours comes first (stripes and checkers start with it, gradients run from
    # it): "random", or "dark_first", so each kind's mean clip differs (a ramp, bands from the top-left) and the
    # background word explains more of a clip at high noise (benchmarks/caption_variance.py; docs/data.md)
    background_order: str = "random"
    supersample: int = 2  # render at this factor and area-downsample (anti-aliased edges)
    crf: int = 20  # x264 quality of the written mp4
    references: bool = True  # store a product photo + mask per subject (ref<i>.png, ref<i>.mask.png)

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.height < 8 or self.width < 8 or self.height % 2 or self.width % 2:
            raise ValueError(f"height and width must be even and >= 8, got {self.height}x{self.width}")
        lo, hi = self.subject_radius
        if not 0.0 < lo <= hi <= 0.5:
            raise ValueError(f"subject_radius must satisfy 0 < low <= high <= 0.5, got {self.subject_radius}")
        if self.max_subjects < 1:
            raise ValueError(f"max_subjects must be >= 1, got {self.max_subjects}")
        if not 0.0 <= self.two_subject_prob <= 1.0:
            raise ValueError(f"two_subject_prob must be in [0, 1], got {self.two_subject_prob}")
        self.motions, self.backgrounds = tuple(self.motions), tuple(self.backgrounds)
        for name, got, known in (("motions", self.motions, MOTIONS), ("backgrounds", self.backgrounds, BACKGROUNDS)):
            bad = [k for k in got if k not in known]
            if not got or bad:
                raise ValueError(f"{name} must be a non-empty subset of {known}, got {list(got)}")
        for name in ("background_freq", "texture_freq"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {getattr(self, name)}")
        lo, hi = self.slide_distance
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"slide_distance must satisfy 0 < low <= high <= 1, got {self.slide_distance}")
        if not 0.0 <= self.path_jitter <= 0.25:
            raise ValueError(f"path_jitter must be in [0, 0.25], got {self.path_jitter}")
        if self.background_order not in ("random", "dark_first"):
            raise ValueError(f"background_order must be 'random' or 'dark_first', got {self.background_order!r}")
        if self.background_angles is not None:
            self.background_angles = tuple(float(a) for a in self.background_angles)
            if not self.background_angles:
                raise ValueError("background_angles must be None (any angle) or a non-empty list of degrees")
        if not 0.0 <= self.background_contrast <= 0.5:
            raise ValueError(f"background_contrast must be in [0, 0.5], got {self.background_contrast}")
        lo, hi = self.background_value
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"background_value must satisfy 0 <= low <= high <= 1, got {self.background_value}")
        if self.subject_contrast is not None and not 0.0 <= self.subject_contrast <= 0.5:
            raise ValueError(f"subject_contrast must be None or in [0, 0.5], got {self.subject_contrast}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")


@dataclass
class SubjectSpec:
    """One subject's identity: shape, texture and colours (sizes relative to min(H, W))."""

    shape: str
    texture: str
    color: tuple[int, int, int]
    color2: tuple[int, int, int]  # second texture colour
    radius: float  # subject radius / min(H, W) at scale 1
    texture_freq: float  # texture cycles across the subject's diameter
    texture_angle: float  # degrees, in the subject's frame (turns with it)
    blob: tuple[float, ...] = ()  # Fourier blob coefficients (a2, b2, a3, b3, ...)


@dataclass
class MotionSpec:
    """One subject's motion over the clip: linear paths in position, scale and angle (+ bounce)."""

    kind: str
    start: tuple[float, float]  # centre (x, y) at t=0, fractions of (W, H)
    end: tuple[float, float]  # centre at t=1
    scale: tuple[float, float]  # scale at t=0 and t=1
    angle: tuple[float, float]  # degrees at t=0 and t=1 (positive = clockwise on screen)
    bounces: int = 0  # number of hops (bounce only)
    bounce_height: float = 0.0  # hop height, fraction of H


@dataclass
class BackgroundSpec:
    """The static background."""

    kind: str
    color: tuple[int, int, int]
    color2: tuple[int, int, int]
    freq: float  # stripes / checker cycles across the frame
    angle: float  # stripes / gradient direction, degrees
    noise_seed: int  # seed of the value-noise grid


@dataclass
class ClipSpec:
    """Everything that defines a clip; `render_clip` draws it."""

    seed: int
    background: BackgroundSpec
    subjects: list[SubjectSpec]
    motions: list[MotionSpec]
    noun: str
    caption: str = ""
    cfg: SyntheticConfig = field(default_factory=SyntheticConfig)


# ---------------------------------------------------------------------------------------------
# sampling


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return round(r * 255), round(g * 255), round(b * 255)


RGB = tuple[int, int, int]


def luma(color: RGB) -> float:
    """Mean of R, G, B in [0, 1]: the luma axis of the mini autoencoder (wan.spectral_basis)."""
    return sum(color) / (3 * 255.0)


MIN_SUBJECT_SATURATION = 0.3  # a paled subject colour stays this saturated: never the gray of a reference's fill


def _bright_enough(rng: np.random.Generator, hue: float, sat: tuple[float, float], val: tuple[float, float],
                   min_luma: float) -> RGB:
    """A colour of `hue` with saturation / value drawn from the ranges, brightened, then paled (down to
    `MIN_SUBJECT_SATURATION`) until its luma >= min_luma (a saturated blue has luma 0.33 at full value:
    only a paler blue is brighter than that). At saturation 0.3 and value 1 every hue has luma >= 0.8."""
    s, v = rng.uniform(*sat), rng.uniform(max(val[0], min(min_luma, 1.0)), val[1])
    color = _hsv_to_rgb(hue, s, v)
    while luma(color) < min_luma and (v < 1.0 or s > MIN_SUBJECT_SATURATION):
        if v < 1.0:
            v = min(1.0, v + 0.05)
        else:
            s = max(MIN_SUBJECT_SATURATION, min(s, 1.0) - 0.05)
        color = _hsv_to_rgb(hue, s, v)
    return color


def _subject_color(rng: np.random.Generator, avoid_hue: float, min_luma: float = 0.0) -> tuple[RGB, RGB, float]:
    """A saturated colour whose hue is at least 0.15 away from the background's, and a contrasting one,
    both of luma >= min_luma."""
    hue = (avoid_hue + rng.uniform(0.15, 0.85)) % 1.0
    c1 = _bright_enough(rng, hue, (0.6, 1.0), (0.65, 1.0), min_luma)
    c2 = _bright_enough(rng, (hue + rng.uniform(0.3, 0.7)) % 1.0, (0.3, 1.0), (0.15, 1.0), min_luma)
    return c1, c2, hue


def sample_subject(rng: np.random.Generator, avoid_hue: float = 0.0,
                   radius: tuple[float, float] = SyntheticConfig.subject_radius,
                   texture_freq: tuple[float, float] = SyntheticConfig.texture_freq,
                   min_luma: float = 0.0) -> SubjectSpec:
    """Draw a random subject (shape, texture, colours of luma >= min_luma, size: radius / min(H, W) uniform
    in `radius`)."""
    color, color2, _ = _subject_color(rng, avoid_hue, min_luma)
    shape = str(rng.choice(SHAPES))
    blob = tuple(float(x) for x in rng.uniform(-0.18, 0.18, size=6)) if shape == "blob" else ()
    return SubjectSpec(
        shape=shape,
        texture=str(rng.choice(TEXTURES)),
        color=color,
        color2=color2,
        radius=float(rng.uniform(*radius)),
        texture_freq=float(rng.uniform(*texture_freq)),
        texture_angle=float(rng.uniform(0.0, 180.0)),
        blob=blob,
    )


def sample_motion(rng: np.random.Generator, kind: str | None = None,
                  kinds: tuple[str, ...] = MOTIONS, jitter: float = 0.2,
                  distance: tuple[float, float] = (0.3, 0.45)) -> MotionSpec:
    """Draw a motion of `kind` (else one of `kinds`) that keeps the subject mostly in frame.

    jitter: a slide's path is centred on the frame's centre +- jitter (0.2: the old, anywhere-in-view paths).
    distance: range of a slide's (or diagonal's) path length, fraction of the frame.
    """
    kind = kind or str(rng.choice(list(kinds)))
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    dist = rng.uniform(*distance)
    s0 = rng.uniform(0.85, 1.15)
    a0 = rng.uniform(-20.0, 20.0)
    start, end, scale, angle = (cx, cy), (cx, cy), (s0, s0), (a0, a0)
    bounces, hop = 0, 0.0
    if kind in ("slide_left", "slide_right", "slide_up", "slide_down"):
        along, across = 0.5 + rng.uniform(-jitter, jitter, size=2)  # the path's centre
        sign = -1.0 if kind in ("slide_left", "slide_up") else 1.0
        a0, a1 = along - sign * dist / 2, along + sign * dist / 2
        start, end = ((a0, across), (a1, across)) if kind in ("slide_left", "slide_right") else ((across, a0), (across, a1))
    elif kind == "diagonal":
        sx, sy = rng.choice([-1.0, 1.0], size=2)
        d = dist / math.sqrt(2)
        start = (0.5 - sx * d / 2 * 1.2, 0.5 - sy * d / 2 * 1.2)
        end = (0.5 + sx * d / 2 * 1.2, 0.5 + sy * d / 2 * 1.2)
    elif kind == "bounce":
        bounces, hop = int(rng.integers(1, 4)), float(rng.uniform(0.2, 0.35))
        base = rng.uniform(0.7, 0.75)
        drift = rng.uniform(-0.15, 0.15)
        start, end = (cx - drift, base), (cx + drift, base)
    elif kind == "zoom_in":
        scale = (rng.uniform(0.5, 0.7), rng.uniform(1.4, 1.8))
    elif kind == "zoom_out":
        scale = (rng.uniform(1.4, 1.8), rng.uniform(0.5, 0.7))
    elif kind == "rotate":
        turn = rng.uniform(90.0, 270.0) * rng.choice([-1.0, 1.0])
        angle = (a0, a0 + turn)
    else:
        raise ValueError(f"unknown motion {kind!r}; expected one of {MOTIONS}")
    f = lambda p: (round(float(p[0]), 4), round(float(p[1]), 4))  # noqa: E731 (json-friendly floats)
    return MotionSpec(kind, f(start), f(end), f(scale), f(angle), bounces, round(hop, 4))


def sample_background(rng: np.random.Generator, cfg: SyntheticConfig | None = None) -> tuple[BackgroundSpec, float]:
    """Draw a background (muted colours, values at least `background_contrast` apart) and return it with its hue."""
    cfg = cfg or SyntheticConfig()
    hue = float(rng.uniform())
    lo, hi = cfg.background_value
    v1 = float(rng.uniform(lo, hi))
    # the second value: uniform over [lo, hi] minus the band within `contrast` of v1 (stripes stay visible)
    c = cfg.background_contrast
    below, above = max(0.0, v1 - c - lo), max(0.0, hi - v1 - c)
    if below + above > 0:
        u = float(rng.uniform(0.0, below + above))
        v2 = lo + u if u < below else v1 + c + (u - below)
    else:  # no value in [lo, hi] is far enough: step out of the range, staying in [0, 1]
        v2 = v1 + c if v1 + c <= 1.0 else v1 - c
    if cfg.background_order == "dark_first" and v2 < v1:  # same draws as "random", only the order differs
        v1, v2 = v2, v1
    c1 = _hsv_to_rgb(hue, rng.uniform(0.0, 0.45), v1)
    c2 = _hsv_to_rgb((hue + rng.uniform(-0.08, 0.08)) % 1.0, rng.uniform(0.0, 0.45), v2)
    spec = BackgroundSpec(
        kind=str(rng.choice(list(cfg.backgrounds))),
        color=c1,
        color2=c2,
        freq=float(rng.uniform(*cfg.background_freq)),
        angle=float(rng.uniform(0.0, 180.0)) if cfg.background_angles is None else float(rng.choice(cfg.background_angles)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )
    return spec, hue


def subject_min_luma(background: BackgroundSpec, cfg: SyntheticConfig) -> float:
    """The luma a subject's colours must reach on `background` (0 when cfg.subject_contrast is None)."""
    if cfg.subject_contrast is None:
        return 0.0
    return max(luma(background.color), luma(background.color2)) + cfg.subject_contrast


def _motion_phrase(m: MotionSpec) -> str:
    if m.kind == "slide_left":
        return "slides to the left"
    if m.kind == "slide_right":
        return "slides to the right"
    if m.kind == "slide_up":
        return "moves up"
    if m.kind == "slide_down":
        return "moves down"
    if m.kind == "diagonal":
        v = "down" if m.end[1] > m.start[1] else "up"
        h = "right" if m.end[0] > m.start[0] else "left"
        return f"moves diagonally {v} and to the {h}"
    if m.kind == "bounce":
        return "bounces up and down"
    if m.kind == "zoom_in":
        return "grows larger"
    if m.kind == "zoom_out":
        return "shrinks"
    return "rotates clockwise" if m.angle[1] > m.angle[0] else "rotates counterclockwise"


def make_caption(noun: str, motions: list[MotionSpec], background: BackgroundSpec) -> str:
    """Caption from the motions, a generic noun and the background kind only (never colours/textures)."""
    bg = BACKGROUND_WORDS[background.kind]
    if len(motions) == 1:
        return f"{noun} {_motion_phrase(motions[0])} on {bg}"
    count = {2: "two", 3: "three", 4: "four"}.get(len(motions), str(len(motions)))
    parts = [f"one {_motion_phrase(motions[0])}"]
    parts += [f"another {_motion_phrase(m)}" for m in motions[1:-1]]
    parts.append(f"the other {_motion_phrase(motions[-1])}")
    return f"{count} objects on {bg}: " + ", ".join(parts[:-1]) + " and " + parts[-1]


def sample_clip_spec(seed: int, cfg: SyntheticConfig | None = None) -> ClipSpec:
    """Draw a whole clip spec from `seed` (same seed and cfg -> same clip)."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(seed)
    background, bg_hue = sample_background(rng, cfg)
    n = 1
    if cfg.max_subjects > 1 and rng.uniform() < cfg.two_subject_prob:
        n = int(rng.integers(2, cfg.max_subjects + 1))
    floor = subject_min_luma(background, cfg)
    subjects = [sample_subject(rng, bg_hue, cfg.subject_radius, cfg.texture_freq, floor) for _ in range(n)]
    motions = [sample_motion(rng, kinds=cfg.motions, jitter=cfg.path_jitter, distance=cfg.slide_distance)
               for _ in range(n)]
    if n > 1:  # spread the subjects apart horizontally/vertically so they do not overlap completely
        for i, m in enumerate(motions):
            off = (i - (n - 1) / 2) * 0.25
            if m.kind in ("slide_up", "slide_down", "bounce", "zoom_in", "zoom_out", "rotate"):
                m.start, m.end = (round(m.start[0] + off, 4), m.start[1]), (round(m.end[0] + off, 4), m.end[1])
            else:
                m.start, m.end = (m.start[0], round(m.start[1] + off, 4)), (m.end[0], round(m.end[1] + off, 4))
        for s in subjects:
            s.radius *= 0.75
    noun = str(rng.choice(NOUNS))
    return ClipSpec(seed, background, subjects, motions, noun, make_caption(noun, motions, background), cfg)


# ---------------------------------------------------------------------------------------------
# rendering (numpy, hand-written: no library draws these parametric shapes and textures)


def trajectory(m: MotionSpec, num_frames: int) -> np.ndarray:
    """Per-frame (cx, cy, scale, angle_deg), cx/cy as fractions of (W, H): float [F, 4]."""
    t = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    cx = m.start[0] + (m.end[0] - m.start[0]) * t
    cy = m.start[1] + (m.end[1] - m.start[1]) * t
    if m.kind == "bounce":
        cy = cy - m.bounce_height * np.abs(np.sin(math.pi * m.bounces * t))
    scale = m.scale[0] + (m.scale[1] - m.scale[0]) * t
    angle = m.angle[0] + (m.angle[1] - m.angle[0]) * t
    return np.stack([cx, cy, scale, angle], axis=1)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of min(H, W): x [1, W], y [H, 1]."""
    m = min(height, width)
    x = (np.arange(width, dtype=np.float32) + 0.5)[None, :] / m
    y = (np.arange(height, dtype=np.float32) + 0.5)[:, None] / m
    return x, y


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, blob: tuple[float, ...]) -> np.ndarray:
    """Inside test of a unit-size shape in its own coordinates (u right, v down): bool."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "ellipse":
        return u * u + (v / 0.6) ** 2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.9)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.9))
    if shape == "triangle":  # equilateral, circumradius 1, apex up
        return (v <= 0.5) & (math.sqrt(3) * u - v <= 1.0) & (-math.sqrt(3) * u - v <= 1.0)
    r = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    if shape == "star":  # five points
        return r <= 0.45 + 0.55 * ((1.0 + np.cos(5.0 * (theta + math.pi / 2))) / 2.0) ** 2
    if shape == "blob":  # radius = short Fourier series in the angle
        radius = np.full_like(r, 0.85)
        for k in range(len(blob) // 2):
            radius = radius + 0.85 * (blob[2 * k] * np.cos((k + 2) * theta) + blob[2 * k + 1] * np.sin((k + 2) * theta))
        return r <= radius
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(s: SubjectSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Subject colour at local coordinates (turns and scales with the subject): float [..., 3]."""
    c1 = np.asarray(s.color, np.float32)
    c2 = np.asarray(s.color2, np.float32)
    a = math.radians(s.texture_angle)
    d = u * math.cos(a) + v * math.sin(a)  # [-1, 1] across the subject
    f = s.texture_freq
    if s.texture == "solid":
        w = np.zeros_like(u)
    elif s.texture == "stripes":
        w = (np.sin(d * f * math.pi) > 0).astype(np.float32)
    elif s.texture == "checker":
        w = ((np.floor(u * f) + np.floor(v * f)) % 2).astype(np.float32)
    elif s.texture == "dots":
        fu, fv = u * f - np.round(u * f), v * f - np.round(v * f)
        w = (fu * fu + fv * fv <= 0.3**2).astype(np.float32)
    elif s.texture == "gradient":
        w = np.clip((d + 1.0) / 2.0, 0.0, 1.0)
    else:
        raise ValueError(f"unknown texture {s.texture!r}; expected one of {TEXTURES}")
    return c1 + (c2 - c1) * w[..., None]


def render_background(bg: BackgroundSpec, height: int, width: int) -> np.ndarray:
    """The background image: float [H, W, 3] in [0, 255]."""
    x, y = _grid(height, width)
    c1 = np.asarray(bg.color, np.float32)
    c2 = np.asarray(bg.color2, np.float32)
    a = math.radians(bg.angle)
    d = np.broadcast_to(x * math.cos(a) + y * math.sin(a), (height, width))
    if bg.kind == "plain":
        w = np.zeros((height, width), np.float32)
    elif bg.kind == "stripes":
        w = (np.sin(d * bg.freq * 2 * math.pi) > 0).astype(np.float32)
    elif bg.kind == "gradient":
        w = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)
    elif bg.kind == "checker":
        f = 2.0 * bg.freq  # one cycle = two cells, as for stripes
        w = ((np.floor(x * f) + np.floor(y * f)) % 2).astype(np.float32)
    elif bg.kind == "noise":  # smooth value noise plus a little grain
        g = np.random.default_rng(bg.noise_seed)
        coarse = torch.from_numpy(g.uniform(size=(1, 1, 6, 6)).astype(np.float32))
        w = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0, 0].numpy()
        w = np.clip(w + g.normal(0.0, 0.08, size=(height, width)).astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"unknown background {bg.kind!r}; expected one of {BACKGROUNDS}")
    return c1 + (c2 - c1) * w[..., None]


def _draw(canvas: np.ndarray, s: SubjectSpec, cx: float, cy: float, scale: float, angle: float) -> np.ndarray:
    """Paint a subject onto `canvas` float [H, W, 3] in place; return its coverage mask bool [H, W]."""
    h, w = canvas.shape[:2]
    m = min(h, w)
    r = s.radius * scale
    inside = np.zeros((h, w), bool)
    # every shape lies within 2 radii of its centre (blob: 0.85 (1 + sum |coeffs|) < 2): draw only that box
    reach = 2.0 * r * m
    x0, x1 = max(0, math.floor(cx * w - reach)), min(w, math.ceil(cx * w + reach) + 1)
    y0, y1 = max(0, math.floor(cy * h - reach)), min(h, math.ceil(cy * h + reach) + 1)
    if x0 >= x1 or y0 >= y1:
        return inside
    x, y = _grid(h, w)
    dx, dy = x[:, x0:x1] - cx * w / m, y[y0:y1] - cy * h / m  # [1, w'], [h', 1]
    a = math.radians(angle)  # inverse rotation: screen -> subject frame
    u = (dx * math.cos(a) + dy * math.sin(a)) / r  # [h', w']
    v = (-dx * math.sin(a) + dy * math.cos(a)) / r  # [h', w']
    box = _shape_mask(s.shape, u, v, s.blob)  # [h', w']
    if box.any():
        canvas[y0:y1, x0:x1][box] = _texture(s, u[box], v[box])
        inside[y0:y1, x0:x1] = box
    return inside


def _downsample(img: np.ndarray, k: int) -> np.ndarray:
    """Area-average by an integer factor k: [H*k, W*k, C] -> [H, W, C] (strided sums: faster than a reduce)."""
    if k == 1:
        return img
    out = sum(img[i::k, j::k] for i in range(k) for j in range(k))
    return out / float(k * k)


def render_clip(spec: ClipSpec) -> np.ndarray:
    """Draw the clip: uint8 [F, H, W, 3]."""
    cfg = spec.cfg
    k = cfg.supersample
    hs, ws = cfg.height * k, cfg.width * k
    background = render_background(spec.background, hs, ws)
    paths = [trajectory(m, cfg.num_frames) for m in spec.motions]
    frames = np.empty((cfg.num_frames, cfg.height, cfg.width, 3), np.uint8)
    for i in range(cfg.num_frames):
        canvas = background.copy()
        for s, p in zip(spec.subjects, paths):
            _draw(canvas, s, *p[i])
        frames[i] = np.clip(_downsample(canvas, k) + 0.5, 0, 255).astype(np.uint8)
    return frames


def render_subject(
    subject: SubjectSpec,
    height: int,
    width: int,
    scale: float = 1.0,
    angle: float = 0.0,
    center: tuple[float, float] = (0.5, 0.5),
    background: tuple[int, int, int] = (128, 128, 128),
    supersample: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """A "product photo": the subject alone on a plain background -> (uint8 [H, W, 3], bool mask [H, W])."""
    k = max(1, supersample)
    canvas = np.empty((height * k, width * k, 3), np.float32)
    canvas[:] = np.asarray(background, np.float32)
    inside = _draw(canvas, subject, center[0], center[1], scale, angle)
    image = np.clip(_downsample(canvas, k) + 0.5, 0, 255).astype(np.uint8)
    mask = _downsample(inside[..., None].astype(np.float32), k)[..., 0] >= 0.5
    return image, mask


# ---------------------------------------------------------------------------------------------
# samples and the embedded data set


def clip_record(spec: ClipSpec) -> dict:
    """The sample json: video metadata plus the subject specs and their per-frame trajectories."""
    cfg = spec.cfg
    return {
        "fps": cfg.fps,
        "frames": cfg.num_frames,
        "width": cfg.width,
        "height": cfg.height,
        "source": f"synthetic:{spec.seed}",
        "seed": spec.seed,
        "background": dataclasses.asdict(spec.background),
        "subjects": [
            {**dataclasses.asdict(s), "motion": dataclasses.asdict(m),
             "trajectory": np.round(trajectory(m, cfg.num_frames), 4).tolist()}  # [F, 4] cx, cy, scale, angle
            for s, m in zip(spec.subjects, spec.motions)
        ],
    }


def subject_from_record(d: dict) -> SubjectSpec:
    """Rebuild a `SubjectSpec` from one entry of the json's "subjects" list."""
    names = {f.name for f in dataclasses.fields(SubjectSpec)}
    kw = {k: v for k, v in d.items() if k in names}
    kw["color"], kw["color2"], kw["blob"] = tuple(kw["color"]), tuple(kw["color2"]), tuple(kw.get("blob", ()))
    return SubjectSpec(**kw)


def clip_seed(seed: int, split: str, index: int) -> int:
    """Independent per-clip seed for (data set seed, split, index)."""
    tag = sum(ord(c) << (8 * i) for i, c in enumerate(split[:4]))
    return int(np.random.SeedSequence([seed, tag, index]).generate_state(1)[0])


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def reference_members(spec: ClipSpec) -> dict[str, bytes]:
    """One product photo per subject (another scale and angle, gray background) and its mask, as PNGs.

    These make the embedded set a triplet set too: `source: triplets` (the r2v_triplets ablation)
    reads them as the references, and an evaluation can use them as unseen-pose references.
    """
    cfg = spec.cfg
    rng = np.random.default_rng([spec.seed, 1])
    members = {}
    for j, subject in enumerate(spec.subjects):
        image, mask = render_subject(subject, cfg.height, cfg.width, scale=float(rng.uniform(0.9, 1.3)),
                                     angle=float(rng.uniform(-30.0, 30.0)), supersample=cfg.supersample)
        members[f"ref{j}.png"] = _png(image)
        members[f"ref{j}.mask.png"] = _png(mask.astype(np.uint8) * 255)
    return members


def make_sample(args: tuple[int, str, int, SyntheticConfig]) -> dict:
    """One shard sample (key, mp4, txt, json, references) for clip `index` of `split` (picklable for a Pool)."""
    seed, split, index, cfg = args
    spec = sample_clip_spec(clip_seed(seed, split, index), cfg)
    mp4 = encode_mp4(render_clip(spec), cfg.fps, crf=cfg.crf)
    sample = {
        "__key__": f"{split}_{index:07d}",
        "mp4": mp4,
        "txt": spec.caption.encode(),
        "json": json.dumps(clip_record(spec)).encode(),
    }
    if cfg.references:
        sample.update(reference_members(spec))
    return sample


def iter_samples(seed: int, split: str, count: int, cfg: SyntheticConfig, workers: int) -> Iterator[dict]:
    """Samples 0..count-1 of `split`, rendered by `workers` processes, in order (deterministic)."""
    jobs = [(seed, split, i, cfg) for i in range(count)]
    if workers <= 1:
        yield from map(make_sample, jobs)
        return
    with get_context("fork").Pool(workers) as pool:
        yield from pool.imap(make_sample, jobs, chunksize=4)


def build_embedded(
    out: str | Path,
    num_train: int = 1000,
    num_val: int = 64,
    cfg: SyntheticConfig | None = None,
    seed: int = 0,
    workers: int = 2,
    maxcount: int = 100,
    progress: bool = True,
) -> dict:
    """Write `train-%06d.tar` and `val-%06d.tar` shards of procedural clips into `out`; return a summary."""
    from tqdm import tqdm

    from saber_pl.shards import write_samples

    cfg = cfg or SyntheticConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"config": dataclasses.asdict(cfg), "seed": seed, "splits": {}}
    for split, count in (("train", num_train), ("val", num_val)):
        if count <= 0:
            continue
        stream = tqdm(iter_samples(seed, split, count, cfg, workers), total=count, desc=split, disable=not progress)
        shards = write_samples(stream, str(out / f"{split}-%06d.tar"), maxcount=maxcount)
        summary["splits"][split] = {"clips": count, "shards": [Path(s).name for s in shards]}
    (out / "embedded.json").write_text(json.dumps(summary, indent=1))
    (out / ".complete").touch()  # the Makefile's stamp: the data set is whole
    return summary
