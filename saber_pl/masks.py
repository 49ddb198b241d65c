"""Random-shape masks with an exact foreground pixel count, for Saber's masked references.

SABER.md ("Training data", steps 1-2): pick a shape family, draw a target ratio r from the ratio
bins, scale the shape until its rasterised area is r·H·W, then fix pixel rounding without changing
the topology (one 8-connected piece, no holes).

Every family is star-shaped about its centre c, with a radius function R(θ) > 0 drawn per mask:

    shape(s) = {p : |p - c| <= s · R(θ(p))},   g(p) = |p - c| / R(θ(p)),   area(s) = #{p : g(p) <= s}.

area(s) is monotone in the scale s, so the binary search on s is an order statistic of g: the k-th
smallest g is the smallest scale whose rasterisation has k pixels (one ``np.partition``, exact, with
no early stop anywhere inside the bin, hence no skew toward the bin's lower end). Ties on that level
are cut to exactly k. A cheap sufficient test (every foreground pixel has a foreground neighbour one
step closer to c, every background pixel a background 4-neighbour one step farther) proves one
8-connected piece and no holes; when it fails (thin spikes), the piece holding c is kept, holes are
filled, and simple points (the 3×3 topology-preserving test, 8-connected foreground, 4-connected
background) are added or removed in order of g until the count is k again.

Speed: per (H, W) a (2H, 2W) grid of radii and quantised angle indices is cached; a mask slices it
at its centre, gathers R from a small angle table, and works in a window around the expected extent.

    from saber_pl.masks import MaskConfig, MaskGenerator
    gen = MaskGenerator(MaskConfig())
    mask = gen.sample(480, 832, np.random.default_rng(0))        # bool [480, 832]
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage

FAMILIES = ("ellipse", "fourier", "convex_polygon", "concave_polygon", "superellipse", "rounded_rect")
PAPER_FAMILIES = ("ellipse", "fourier", "convex_polygon", "concave_polygon")
DEFAULT_RATIO_BINS = [(0.0, 0.1, 0.1), (0.1, 0.5, 0.8), (0.5, 1.0, 0.1)]


def _check_range(name: str, value: tuple, low: float, high: float, integer: bool = False) -> tuple:
    """A (lo, hi) config range: two numbers, lo <= hi, both inside [low, high] (YAML lists become tuples)."""
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be (lo, hi) with {low} <= lo <= hi <= {high}, got {value!r}")
    if integer and any(int(v) != v for v in value):
        raise ValueError(f"{name} must hold integers, got {value!r}")
    return tuple(int(v) if integer else float(v) for v in value)


@dataclass
class MaskConfig:
    """Mask generator knobs: families, target ratio sampling, and per-family shape ranges."""

    families: list[str] = field(default_factory=lambda: list(FAMILIES))  # drawn per mask (paper: first 4, "etc.")
    family_weights: list[float] | None = None  # sampling weight per family; None = uniform (ours)
    # (low, high, probability): a bin by its probability, then r uniform inside it
    ratio_bins: list[tuple[float, float, float]] = field(default_factory=lambda: list(DEFAULT_RATIO_BINS))
    fixed_ratio: float | None = None  # overrides the bins (the `fixed_ratio` ablation uses 0.3)
    center_margin: float = 0.1  # centre uniform in [m, 1-m] of each side (ours)
    ellipse_aspect: tuple[float, float] = (0.3, 1.0)  # minor / major axis
    fourier_harmonics: tuple[int, int] = (2, 6)  # highest harmonic N; terms n = 1..N
    fourier_amplitude: tuple[float, float] = (0.2, 0.6)  # sum of |a_n|, so R >= 1 - amplitude > 0
    fourier_decay: float = 1.0  # |a_n| ~ U(0, 1) / n^decay before normalising to the amplitude
    polygon_aspect: tuple[float, float] = (0.4, 1.0)  # polygon vertices lie on an ellipse of this axis ratio
    polygon_jitter: float = 0.4  # vertex angle jitter, fraction of the even spacing 2π/n (< 0.5)
    convex_vertices: tuple[int, int] = (3, 8)  # vertex count range
    concave_vertices: tuple[int, int] = (5, 12)  # vertex count range (>= 4: centre stays in the kernel)
    concave_depth: tuple[float, float] = (0.3, 0.7)  # vertex radii ~ U(1 - depth, 1): notch depth
    superellipse_exponent: tuple[float, float] = (1.5, 5.0)  # |x|^p + |y/b|^p = 1 (p > 2: boxy)
    superellipse_aspect: tuple[float, float] = (0.4, 1.0)  # b
    rounded_rect_aspect: tuple[float, float] = (0.3, 1.0)  # short / long side
    rounded_rect_radius: tuple[float, float] = (0.1, 0.6)  # corner radius / half the short side

    def __post_init__(self) -> None:
        self.families = list(self.families)
        if not self.families:
            raise ValueError("families must name at least one family")
        for name in self.families:
            if name not in FAMILIES:
                raise ValueError(f"families: unknown family {name!r}; known: {', '.join(FAMILIES)}")
        if self.family_weights is not None:
            self.family_weights = [float(w) for w in self.family_weights]
            w = self.family_weights
            if len(w) != len(self.families) or min(w) < 0 or sum(w) <= 0:
                raise ValueError("family_weights must give one weight >= 0 per family, not all zero")
        self.ratio_bins = [tuple(float(v) for v in b) for b in self.ratio_bins]
        if not self.ratio_bins:
            raise ValueError("ratio_bins must hold at least one (low, high, probability) bin")
        for b in self.ratio_bins:
            if len(b) != 3 or not 0.0 <= b[0] <= b[1] <= 1.0 or b[2] < 0.0:
                raise ValueError(f"ratio_bins: each bin is (low, high, p) with 0 <= low <= high <= 1, p >= 0; got {b}")
        if abs(sum(b[2] for b in self.ratio_bins) - 1.0) > 1e-6:
            raise ValueError("ratio_bins: probabilities must sum to 1")
        if self.fixed_ratio is not None and not 0.0 < self.fixed_ratio <= 1.0:
            raise ValueError(f"fixed_ratio must be in (0, 1], got {self.fixed_ratio}")
        if not 0.0 <= self.center_margin <= 0.5:
            raise ValueError(f"center_margin must be in [0, 0.5], got {self.center_margin}")
        self.ellipse_aspect = _check_range("ellipse_aspect", self.ellipse_aspect, 1e-3, 1.0)
        self.fourier_harmonics = _check_range("fourier_harmonics", self.fourier_harmonics, 1, 64, integer=True)
        self.fourier_amplitude = _check_range("fourier_amplitude", self.fourier_amplitude, 0.0, 0.95)
        if self.fourier_decay < 0:
            raise ValueError(f"fourier_decay must be >= 0, got {self.fourier_decay}")
        self.polygon_aspect = _check_range("polygon_aspect", self.polygon_aspect, 1e-3, 1.0)
        if not 0.0 <= self.polygon_jitter < 0.5:
            raise ValueError(f"polygon_jitter must be in [0, 0.5), got {self.polygon_jitter}")
        self.convex_vertices = _check_range("convex_vertices", self.convex_vertices, 3, 1024, integer=True)
        self.concave_vertices = _check_range("concave_vertices", self.concave_vertices, 4, 1024, integer=True)
        self.concave_depth = _check_range("concave_depth", self.concave_depth, 0.0, 0.95)
        self.superellipse_exponent = _check_range("superellipse_exponent", self.superellipse_exponent, 0.5, 64.0)
        self.superellipse_aspect = _check_range("superellipse_aspect", self.superellipse_aspect, 1e-3, 1.0)
        self.rounded_rect_aspect = _check_range("rounded_rect_aspect", self.rounded_rect_aspect, 1e-3, 1.0)
        self.rounded_rect_radius = _check_range("rounded_rect_radius", self.rounded_rect_radius, 0.0, 1.0)


# ---------------------------------------------------------------- angle tables and polar grids


class Angles(NamedTuple):
    """The angle table of one frame size: bin centres θ_j = (j + 1/2)·2π/A and their cos, sin [A]."""

    theta: np.ndarray
    cos: np.ndarray
    sin: np.ndarray

    def rotated(self, phi: float) -> tuple[np.ndarray, np.ndarray]:
        """cos(θ - φ), sin(θ - φ) [A] by the angle-difference formulas (no trig on the table)."""
        c, s = math.cos(phi), math.sin(phi)
        return self.cos * c + self.sin * s, self.sin * c - self.cos * s


@lru_cache(maxsize=8)
def _angles(n_angles: int) -> Angles:
    theta = (np.arange(n_angles) + 0.5) * (2 * np.pi / n_angles)  # [A]
    return Angles(theta, np.cos(theta), np.sin(theta))


@lru_cache(maxsize=8)
def _harmonics(n_angles: int, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """cos(nθ), sin(nθ) for n = 1..n_max on the angle table, [n_max, A] each."""
    n_theta = np.arange(1, n_max + 1)[:, None] * _angles(n_angles).theta[None]
    return np.cos(n_theta), np.sin(n_theta)


@lru_cache(maxsize=8)
def _polar_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray, Angles]:
    """(2H, 2W) radii and angle-table indices around the grid point (H, W), and the angle table.

    A frame with centre (cy, cx) is the slice [H - cy : 2H - cy, W - cx : 2W - cx]. The table has
    one angle per pixel of arc at the frame's diagonal (a power of two, at least 64).
    """
    n_angles = max(64, 1 << math.ceil(math.log2(2 * math.pi * math.hypot(height, width))))
    dy = np.arange(-height, height, dtype=np.float64)[:, None]  # [2H, 1]
    dx = np.arange(-width, width, dtype=np.float64)[None, :]  # [1, 2W]
    rad = np.sqrt(dy**2 + dx**2).astype(np.float32)  # [2H, 2W]
    idx = np.floor(np.mod(np.arctan2(dy, dx), 2 * np.pi) * (n_angles / (2 * np.pi))).astype(np.int64) % n_angles
    ang = idx.astype(np.int16 if n_angles <= np.iinfo(np.int16).max else np.int32)  # [2H, 2W]
    for a in (rad, ang):
        a.setflags(write=False)
    return rad, ang, _angles(n_angles)


# ---------------------------------------------------------------- radius functions R(θ) per family
# Each takes (rng, cfg, angle table) and returns R [A] > 0 of a unit shape with a random rotation.
# Hand-written: no library draws random star-shaped outlines as polar radius tables.


def _ellipse(rng: np.random.Generator, cfg: MaskConfig, ang: Angles) -> np.ndarray:
    b, phi = rng.uniform(*cfg.ellipse_aspect), rng.uniform(0, 2 * np.pi)
    c, s = ang.rotated(phi)
    return 1.0 / np.sqrt(c * c + (s / b) ** 2)


def _fourier(rng: np.random.Generator, cfg: MaskConfig, ang: Angles) -> np.ndarray:
    n_max = int(rng.integers(cfg.fourier_harmonics[0], cfg.fourier_harmonics[1] + 1))
    coef = rng.uniform(0, 1, n_max) / np.arange(1, n_max + 1) ** cfg.fourier_decay
    coef *= rng.uniform(*cfg.fourier_amplitude) / coef.sum()
    phase = rng.uniform(0, 2 * np.pi, n_max)
    cos_n, sin_n = _harmonics(len(ang.theta), cfg.fourier_harmonics[1])
    # sum_n a_n cos(nθ + φ_n) = sum_n a_n (cos φ_n cos nθ - sin φ_n sin nθ)
    return 1.0 + (coef * np.cos(phase)) @ cos_n[:n_max] - (coef * np.sin(phase)) @ sin_n[:n_max]


def _polygon_radius(vx: np.ndarray, vy: np.ndarray, ang: Angles) -> np.ndarray:
    """R(θ) of a polygon star-shaped about the origin, vertices in counter-clockwise order.

    Edge i lies on the line a_i·x + b_i·y = 1, so along direction u: 1/R = a_i cos θ + b_i sin θ.
    The table is uniform in θ, so each edge's run of angles is filled with np.repeat.
    """
    beta = np.mod(np.arctan2(vy, vx), 2 * np.pi)
    order = (np.arange(len(vx)) + int(np.argmin(beta))) % len(vx)  # start at the smallest angle
    vx, vy, beta = vx[order], vy[order], beta[order]
    nxt = np.arange(1, len(vx) + 1) % len(vx)
    wx, wy = vx[nxt], vy[nxt]  # next vertex
    cross = vx * wy - vy * wx  # > 0: counter-clockwise about the origin
    a, b = (wy - vy) / cross, (vx - wx) / cross
    n_angles = len(ang.theta)
    first = np.ceil(beta * (n_angles / (2 * np.pi)) - 0.5).astype(np.int64).clip(0, n_angles)  # first bin of edge i
    runs = np.diff(np.concatenate([[0], first, [n_angles]]))  # bins before vertex 0 belong to the last edge
    a_t = np.repeat(np.concatenate([a[-1:], a]), runs)  # [A]
    b_t = np.repeat(np.concatenate([b[-1:], b]), runs)
    return 1.0 / (a_t * ang.cos + b_t * ang.sin)


def _polygon_angles(rng: np.random.Generator, n: int, jitter: float) -> np.ndarray:
    """n increasing angles, evenly spaced plus jitter: gaps stay in 2π(1 ± 2·jitter)/n."""
    return (np.arange(n) + rng.uniform(-jitter, jitter, n)) * (2 * np.pi / n) + rng.uniform(0, 2 * np.pi)


def _rotate(x: np.ndarray, y: np.ndarray, phi: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(phi), math.sin(phi)
    return x * c - y * s, x * s + y * c


def _convex_polygon(rng: np.random.Generator, cfg: MaskConfig, ang: Angles) -> np.ndarray:
    n = int(rng.integers(cfg.convex_vertices[0], cfg.convex_vertices[1] + 1))
    b, phi = rng.uniform(*cfg.polygon_aspect), rng.uniform(0, 2 * np.pi)
    a = _polygon_angles(rng, n, cfg.polygon_jitter)
    vx, vy = _rotate(np.cos(a), b * np.sin(a), phi)  # on an ellipse: convex position, counter-clockwise
    nxt = np.arange(1, n + 1) % n
    wx, wy = vx[nxt], vy[nxt]
    cross = vx * wy - wx * vy  # shoelace centroid: inside a convex polygon, so it is star-shaped about it
    cx, cy = ((vx + wx) * cross).sum() / (3 * cross.sum()), ((vy + wy) * cross).sum() / (3 * cross.sum())
    return _polygon_radius(vx - cx, vy - cy, ang)


def _concave_polygon(rng: np.random.Generator, cfg: MaskConfig, ang: Angles) -> np.ndarray:
    n = int(rng.integers(cfg.concave_vertices[0], cfg.concave_vertices[1] + 1))
    b, phi = rng.uniform(*cfg.polygon_aspect), rng.uniform(0, 2 * np.pi)
    a = _polygon_angles(rng, n, cfg.polygon_jitter)  # gaps < π for n >= 4: star-shaped about 0
    depth = rng.uniform(*cfg.concave_depth)
    rho = rng.uniform(1.0 - depth, 1.0, n)
    return _polygon_radius(*_rotate(rho * np.cos(a), b * rho * np.sin(a), phi), ang)


def _superellipse(rng: np.random.Generator, cfg: MaskConfig, ang: Angles) -> np.ndarray:
    p, b = rng.uniform(*cfg.superellipse_exponent), rng.uniform(*cfg.superellipse_aspect)
    c, s = ang.rotated(rng.uniform(0, 2 * np.pi))
    return (np.abs(c) ** p + np.abs(s / b) ** p) ** (-1.0 / p)


def _rounded_rect(rng: np.random.Generator, cfg: MaskConfig, ang: Angles) -> np.ndarray:
    b, phi = rng.uniform(*cfg.rounded_rect_aspect), rng.uniform(0, 2 * np.pi)
    rad = rng.uniform(*cfg.rounded_rect_radius) * b  # half sides (1, b), corner radius rad
    c, s = ang.rotated(phi)
    ux, uy = np.maximum(np.abs(c), 1e-12), np.maximum(np.abs(s), 1e-12)  # first quadrant, by symmetry
    t = np.minimum(1.0 / ux, b / uy)  # hit on the box's straight sides
    corner = (t * ux > 1.0 - rad) & (t * uy > b - rad)
    cx, cy = 1.0 - rad, b - rad  # corner circle centre
    uc = ux * cx + uy * cy
    t_corner = uc + np.sqrt(np.maximum(uc * uc - cx * cx - cy * cy + rad * rad, 0.0))
    return np.where(corner, t_corner, t)


SHAPES: dict[str, Callable[[np.random.Generator, MaskConfig, Angles], np.ndarray]] = {
    "ellipse": _ellipse,
    "fourier": _fourier,
    "convex_polygon": _convex_polygon,
    "concave_polygon": _concave_polygon,
    "superellipse": _superellipse,
    "rounded_rect": _rounded_rect,
}


# ---------------------------------------------------------------- topology: simple points


_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))  # bit i of a 3x3 code


def _components(cells: list[tuple[int, int]], adjacent: Callable[[tuple, tuple], bool]) -> list[set]:
    """Connected components of a few cells under an adjacency predicate (plain flood fill)."""
    comps: list[set] = []
    todo = set(cells)
    while todo:
        stack, comp = [todo.pop()], set()
        while stack:
            c = stack.pop()
            comp.add(c)
            nxt = [d for d in todo if adjacent(c, d)]
            todo.difference_update(nxt)
            stack.extend(nxt)
        comps.append(comp)
    return comps


def _simple_point_table() -> np.ndarray:
    """256-entry lookup: can the centre of this 3x3 neighbourhood flip without changing topology?

    Simple iff the foreground neighbours form exactly one 8-connected piece and the background
    neighbours exactly one 4-connected piece touching the centre's 4-neighbours (8/4 connectivity).
    """
    eight = lambda a, b: max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1  # noqa: E731
    four = lambda a, b: abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1  # noqa: E731
    table = np.zeros(256, dtype=bool)
    for code in range(256):
        fg = [_RING[i] for i in range(8) if code >> i & 1]
        bg = [_RING[i] for i in range(8) if not code >> i & 1]
        t8 = len(_components(fg, eight))
        t4 = sum(any(0 in c for c in comp) for comp in _components(bg, four))
        table[code] = t8 == 1 and t4 == 1
    return table


SIMPLE = _simple_point_table()


def radially_simple(mask: np.ndarray, cy: int, cx: int) -> bool:
    """Sufficient test for "one 8-connected piece holding (cy, cx), no holes" in O(H·W) slices.

    Every foreground pixel needs a foreground 8-neighbour one step closer to c (so it chains to c);
    every background pixel a background 4-neighbour one step farther from c (so it chains out of the
    frame). Both hold for almost every rasterised star-shaped set; a False only means "check fully".
    """
    m = mask
    h, w = m.shape
    if not m[cy, cx]:
        return False
    near = np.zeros_like(m)  # [h, w] has a foreground neighbour closer to c
    near[cy + 1 :] = m[cy : h - 1]
    near[:cy] = m[1 : cy + 1]
    near[:, cx + 1 :] |= m[:, cx : w - 1]
    near[:, :cx] |= m[:, 1 : cx + 1]
    near[cy + 1 :, cx + 1 :] |= m[cy : h - 1, cx : w - 1]
    near[cy + 1 :, :cx] |= m[cy : h - 1, 1 : cx + 1]
    near[:cy, cx + 1 :] |= m[1 : cy + 1, cx : w - 1]
    near[:cy, :cx] |= m[1 : cy + 1, 1 : cx + 1]
    near[cy, cx] = True
    if np.any(m > near):
        return False
    p = np.zeros((h + 2, w + 2), dtype=bool)  # foreground padded with background
    p[1:-1, 1:-1] = m
    far_v = np.empty_like(m)  # every vertical neighbour farther from c is foreground
    far_v[cy + 1 :] = p[cy + 3 : h + 2, 1:-1]
    far_v[:cy] = p[:cy, 1:-1]
    far_v[cy] = p[cy, 1:-1] & p[cy + 2, 1:-1]
    far_h = np.empty_like(m)
    far_h[:, cx + 1 :] = p[1:-1, cx + 3 : w + 2]
    far_h[:, :cx] = p[1:-1, :cx]
    far_h[:, cx] = p[1:-1, cx] & p[1:-1, cx + 2]
    return not np.any(far_v & far_h > m)


def _neighbour_code(pf: np.ndarray, i: int, offsets: tuple[int, ...]) -> int:
    return sum(int(pf[i + o]) << b for b, o in enumerate(offsets))


def fix_count(mask: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """Add (lowest g first) or remove (highest g first) simple points until the mask has k pixels.

    ``mask`` must be one 8-connected piece without holes; flipping simple points keeps it so. In 2D
    such a set always has a simple point to add (unless full) or remove (unless a single pixel).
    """
    h, w = mask.shape
    w2 = w + 2
    pf = np.zeros((h + 2) * w2, dtype=np.uint8)  # padded mask, flat
    pf.reshape(h + 2, w2)[1:-1, 1:-1] = mask
    gf = np.full((h + 2) * w2, np.inf)  # padded g, inf outside the frame
    gf.reshape(h + 2, w2)[1:-1, 1:-1] = g
    offsets = tuple(dy * w2 + dx for dy, dx in _RING)
    diff = k - int(mask.sum())
    if diff == 0:
        return mask.astype(bool)
    grow = diff > 0
    want = 0 if grow else 1  # candidates to flip: background when growing, foreground when shrinking
    sign = 1.0 if grow else -1.0
    pad = pf.reshape(h + 2, w2)
    touch = np.zeros_like(pad, dtype=bool)  # has a neighbour of the other value (8-nbr; 4-nbr suffices to shrink)
    other = pad != want
    for dy, dx in _RING:
        touch[1:-1, 1:-1] |= other[1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx]
    cand = np.flatnonzero(touch.ravel() & (pf == want) & np.isfinite(gf))
    heap = list(zip((sign * gf[cand]).tolist(), cand.tolist()))
    heapq.heapify(heap)
    left = abs(diff)
    while left:
        if not heap:
            raise RuntimeError("fix_count: no simple point left (mask not simply connected?)")
        _, i = heapq.heappop(heap)
        if pf[i] != want or not SIMPLE[_neighbour_code(pf, i, offsets)]:
            continue  # re-pushed when a neighbour flips
        pf[i] = 1 - want
        left -= 1
        for o in offsets:
            j = i + o
            if pf[j] == want and gf[j] < np.inf:
                heapq.heappush(heap, (sign * gf[j], j))
    return pad[1:-1, 1:-1].astype(bool)


def repair(mask: np.ndarray, g: np.ndarray, k: int, cy: int, cx: int) -> np.ndarray:
    """Keep the 8-connected piece holding (cy, cx), fill its holes, then fix the count to k."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    piece = labels == labels[cy, cx]
    bg, _ = ndimage.label(~piece)  # 4-connected background pieces
    border = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    filled = ~np.isin(bg, border[border > 0])  # holes (background not reaching the border) become foreground
    return fix_count(filled, g, k)


# ---------------------------------------------------------------- rasterisation with exactly k pixels


def target_pixels(ratio: float, n_pixels: int) -> int:
    """k = clamp(round(r·N), 1, N): the achievable pixel count nearest to ratio r."""
    return min(max(math.floor(ratio * n_pixels + 0.5), 1), n_pixels)


def _smallest_k(g: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Mask of the k smallest values of g (ties on the k-th value cut in raster order), and that value."""
    flat = g.reshape(-1)
    t = float(np.partition(flat, k - 1)[k - 1]) if k < flat.size else float(flat.max())
    m = g <= t
    extra = int(np.count_nonzero(m)) - k
    if extra > 0:
        ties = np.flatnonzero(flat == np.float32(t))
        m.reshape(-1)[ties[len(ties) - extra :]] = False
    return m, t


def _scale_estimate(radius: np.ndarray, ang: Angles, height: int, width: int, cy: int, cx: int, k: int) -> float:
    """Scale whose continuous shape, clipped to the frame, has area k (on <= 256 of the table's rays).

    Along ray j the clipped star shape reaches min(s·R_j, D_j), D_j the distance to the frame's
    edge, so area(s) = ½Δθ·Σ_j min(s·R_j, D_j)²: piecewise quadratic in s, solved on its piece.
    """
    step = max(1, len(radius) // 256)
    r, c, s = radius[::step], ang.cos[::step], ang.sin[::step]
    with np.errstate(divide="ignore"):
        d = np.minimum(np.where(c > 0, width - 0.5 - cx, cx + 0.5) / np.abs(c),
                       np.where(s > 0, height - 0.5 - cy, cy + 0.5) / np.abs(s))
    brk = d / r  # scale at which ray j reaches the frame's edge
    order = np.argsort(brk)
    brk, r2, d2 = brk[order], r[order] ** 2, d[order] ** 2
    half_dtheta = math.pi / len(r)
    clipped = np.concatenate([[0.0], np.cumsum(d2)])  # sum of D² over the first i rays
    free = np.concatenate([np.cumsum(r2[::-1])[::-1], [0.0]])  # sum of R² over rays i..
    i = int(np.searchsorted(half_dtheta * (clipped[1:] + brk**2 * free[1:]), k))  # piece holding area k
    if i >= len(brk):
        return float(brk[-1])
    return math.sqrt(max(k / half_dtheta - clipped[i], 0.0) / free[i])


_WINDOW_MIN_PIXELS = 32768  # smaller frames are cheaper to scan whole than to window


def rasterise(radius: np.ndarray, height: int, width: int, cy: int, cx: int, k: int) -> np.ndarray:
    """Exactly k pixels of the star shape {g <= s} centred at (cy, cx): one 8-connected piece, no holes.

    ``radius`` is R on the angle table of ``_polar_grid(height, width)``. The work is done in a window
    around the shape at its estimated scale; the window is kept only if no pixel outside it can reach
    the k-th level of g, otherwise the full frame is used.
    """
    if k >= height * width:
        return np.ones((height, width), dtype=bool)
    rad, ang, angles = _polar_grid(height, width)
    inv = (1.0 / radius).astype(np.float32)
    slack = radius.max() * math.pi / len(radius)  # a pixel's angle is within half a bin of its table angle
    rs, rc = radius * angles.sin, radius * angles.cos
    ext = np.array([-rs.min(), rs.max(), -rc.min(), rc.max()]) + slack  # reach per unit scale: up, down, left, right
    y0, y1, x0, x1 = 0, height, 0, width
    if height * width > _WINDOW_MIN_PIXELS:
        est = ext * (1.03 * _scale_estimate(radius, angles, height, width, cy, cx, k)) + 2.0
        y0, y1 = max(0, math.floor(cy - est[0])), min(height, math.ceil(cy + est[1]) + 1)
        x0, x1 = max(0, math.floor(cx - est[2])), min(width, math.ceil(cx + est[3]) + 1)
        if (y1 - y0) * (x1 - x0) < k:
            y0, y1, x0, x1 = 0, height, 0, width
    oy, ox = height - cy, width - cx  # frame origin in the big grid
    while True:
        win = (slice(oy + y0, oy + y1), slice(ox + x0, ox + x1))
        g = rad[win] * np.take(inv, ang[win])  # [h, w] level of each pixel
        m, t = _smallest_k(g, k)
        reach = t * (1 + 1e-5) * ext + 1e-3  # farthest pixel offsets the level-t shape can hold
        if (
            (y0 == 0 or cy - y0 + 1 > reach[0])
            and (y1 == height or y1 - cy > reach[1])
            and (x0 == 0 or cx - x0 + 1 > reach[2])
            and (x1 == width or x1 - cx > reach[3])
        ):
            break
        y0, y1, x0, x1 = 0, height, 0, width  # the estimate was short: redo on the full frame
    out = np.zeros((height, width), dtype=bool)
    out[y0:y1, x0:x1] = m
    if radially_simple(m, cy - y0, cx - x0):
        return out
    frame = (slice(oy, oy + height), slice(ox, ox + width))  # rare (thin spikes): full-frame repair
    return repair(out, rad[frame] * np.take(inv, ang[frame]), k, cy, cx)


# ---------------------------------------------------------------- public API


def _check_size(height: int, width: int) -> None:
    if int(height) != height or height < 1:
        raise ValueError(f"height must be an integer >= 1, got {height!r}")
    if int(width) != width or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")


class MaskGenerator:
    """Draws a family, a target ratio and a centre per mask; returns exactly round(r·H·W) pixels."""

    def __init__(self, cfg: MaskConfig) -> None:
        self.cfg = cfg
        w = np.asarray(cfg.family_weights if cfg.family_weights is not None else [1.0] * len(cfg.families))
        self._family_cdf = np.cumsum(w / w.sum())
        self._bins = np.asarray(cfg.ratio_bins, dtype=np.float64)  # [B, 3]
        self._bin_cdf = np.cumsum(self._bins[:, 2])

    def sample_target(self, rng: np.random.Generator) -> float:
        """Target foreground ratio r: a bin by its probability, then uniform inside it."""
        if self.cfg.fixed_ratio is not None:
            return float(self.cfg.fixed_ratio)
        b = int(np.searchsorted(self._bin_cdf, rng.random() * self._bin_cdf[-1], side="right"))
        b = min(b, len(self._bins) - 1)  # guards against rounding in the cumulative sum
        return float(rng.uniform(self._bins[b, 0], self._bins[b, 1]))

    def sample_family(self, rng: np.random.Generator) -> str:
        """A family name, uniform or by ``family_weights``."""
        i = int(np.searchsorted(self._family_cdf, rng.random() * self._family_cdf[-1], side="right"))
        return self.cfg.families[min(i, len(self.cfg.families) - 1)]

    def make(self, height: int, width: int, ratio: float, family: str, rng: np.random.Generator) -> np.ndarray:
        """One mask of a given family with exactly target_pixels(ratio, H·W) pixels."""
        _check_size(height, width)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if family not in SHAPES:
            raise ValueError(f"family: unknown family {family!r}; known: {', '.join(FAMILIES)}")
        m = self.cfg.center_margin
        cy = min(height - 1, math.floor(rng.uniform(m, 1 - m) * height))
        cx = min(width - 1, math.floor(rng.uniform(m, 1 - m) * width))
        radius = SHAPES[family](rng, self.cfg, _polar_grid(height, width)[2])  # [A] > 0
        return rasterise(radius, height, width, cy, cx, target_pixels(ratio, height * width))

    def sample(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """A random mask, bool [H, W]."""
        family = self.sample_family(rng)
        ratio = max(self.sample_target(rng), 1e-12)  # a bin's low end may be 0: k is clamped to 1 anyway
        return self.make(height, width, ratio, family, rng)

    def sample_batch(
        self, n: int, height: int, width: int, rng: np.random.Generator, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """n masks as float {0, 1} [N, 1, H, W] on ``device`` (drawn on the CPU, then moved)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        _check_size(height, width)
        masks = np.zeros((n, height, width), dtype=bool)  # [N, H, W]
        for i in range(n):
            masks[i] = self.sample(height, width, rng)
        return torch.from_numpy(masks).to(device).unsqueeze(1).float()


_CONFIG_FIELDS = {f.name for f in fields(MaskConfig)}


def make_mask(
    height: int, width: int, ratio: float, family: str, rng: np.random.Generator, **family_params
) -> np.ndarray:
    """One mask of ``family`` with exactly clamp(round(ratio·H·W), 1, H·W) pixels, bool [H, W].

    ``family_params`` override MaskConfig's per-family fields (e.g. ``ellipse_aspect=(0.5, 1.0)``).
    """
    for key in family_params:
        if key not in _CONFIG_FIELDS or key in ("families", "family_weights", "ratio_bins", "fixed_ratio"):
            raise ValueError(f"{key}: not a family parameter of MaskConfig")
    if family not in SHAPES:
        raise ValueError(f"family: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    cfg = MaskConfig(families=[family], **family_params)
    return MaskGenerator(cfg).make(height, width, ratio, family, rng)
