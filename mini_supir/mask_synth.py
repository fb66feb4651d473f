"""Synthetic photo damage with its known mask: branching crack polylines (dirt-dark or paper-white), thin
bright scratches, stains and missing paint (flat paper-coloured patches), deterministic per seed.

What the automatic detector (mask.py) is tested on, what degrade.py's `cracks` / `cracks-paint` settings draw
for evaluation and for repair training pairs, and what `python -m mini_supir.mask --damage` writes.
"""
from __future__ import annotations

import math

import torch

from .mask import gaussian_blur

KINDS = ("cracks", "scratches", "blotches", "missing")
PAPER = (0.93, 0.90, 0.81)      # faded photo paper showing through where the emulsion flaked off


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _stamp(alpha: torch.Tensor, pts: torch.Tensor, rad: torch.Tensor, strength: torch.Tensor) -> None:
    """Max-composite anti-aliased discs (centres pts (N, 2) as (y, x), radii, peak strengths) into alpha."""
    h, w = alpha.shape
    R = math.ceil(rad.max().item() + 1)
    off = torch.arange(-R, R + 1, dtype=torch.float32)
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    py = pts[:, 0].round()[:, None] + oy.flatten()[None]
    px = pts[:, 1].round()[:, None] + ox.flatten()[None]
    dist = torch.sqrt((py - pts[:, :1]) ** 2 + (px - pts[:, 1:]) ** 2)
    cover = (rad[:, None] + 0.5 - dist).clamp(0, 1) * strength[:, None]    # 1-px linear edge ramp
    ok = (py >= 0) & (py < h) & (px >= 0) & (px < w) & (cover > 0)
    flat = (py[ok] * w + px[ok]).long()
    alpha.view(-1).scatter_reduce_(0, flat, cover[ok], reduce="amax")


def _densify(poly: torch.Tensor, *attrs: torch.Tensor, step: float = 0.5):
    """Resample a polyline (K, 2) and per-vertex attributes every `step` px along its length."""
    seg = (poly[1:] - poly[:-1]).norm(dim=1)
    s = torch.cat([torch.zeros(1), seg.cumsum(0)])
    t = torch.arange(0, s[-1].item() + step, step)
    i = torch.searchsorted(s, t, right=True).clamp(1, len(s) - 1) - 1
    f = ((t - s[i]) / seg[i].clamp_min(1e-6)).clamp(0, 1)[:, None]
    lerp = lambda a: a[i] + f[:, 0] * (a[i + 1] - a[i]) if a.ndim == 1 else a[i] + f * (a[i + 1] - a[i])
    return (lerp(poly),) + tuple(lerp(a) for a in attrs)


def _smooth_walk(g: torch.Generator, n: int, lo: float, hi: float, jitter: float) -> torch.Tensor:
    """A slowly varying random sequence in [lo, hi] (width / darkness along a crack)."""
    v = torch.empty(n)
    v[0] = _u(g, lo, hi)
    for k in range(1, n):
        v[k] = min(hi, max(lo, v[k - 1].item() + jitter * (hi - lo) * (2 * _u(g) - 1)))
    return v


def _crack(g, alpha, start, angle, length, width, depth):
    """Random-walk polyline with direction drift; spawns thinner side branches (recursively, `depth` levels)."""
    n = max(2, int(length / 6))
    ang = angle + torch.cumsum(torch.randn(n, generator=g) * 0.35, 0)
    steps = torch.stack([torch.sin(ang), torch.cos(ang)], 1) * (3 + 6 * torch.rand(n, 1, generator=g))
    poly = torch.cat([start[None], start[None] + steps.cumsum(0)])
    rad = _smooth_walk(g, n + 1, 0.35 * width, width, 0.3)
    dark = _smooth_walk(g, n + 1, 0.7, 1.0, 0.25)
    pts, rad_d, dark_d = _densify(poly, rad, dark)
    _stamp(alpha, pts, rad_d, dark_d)
    if depth > 0:
        for k in range(1, n):
            if _u(g) < 0.08:
                side = 1 if _u(g) < 0.5 else -1
                _crack(g, alpha, poly[k], ang[k - 1].item() + side * _u(g, 0.4, 1.2),
                       length * _u(g, 0.15, 0.45), max(0.5, rad[k].item() * 0.8), depth - 1)


def _blob(g: torch.Generator, h: int, w: int, radius: float) -> torch.Tensor:
    """Irregular star-shaped region: an ellipse whose radius wobbles with a few random harmonics. (H, W) bool."""
    cy, cx = _u(g, 0, h), _u(g, 0, w)
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                          indexing="ij")
    rot, aspect = _u(g, 0, math.pi), _u(g, 0.5, 1.0)
    dy, dx = y - cy, x - cx
    a = dx * math.cos(rot) + dy * math.sin(rot)
    b = (-dx * math.sin(rot) + dy * math.cos(rot)) / aspect
    theta, dist = torch.atan2(b, a), torch.sqrt(a * a + b * b)
    r = torch.ones_like(theta)
    for k in range(2, 7):
        r = r + _u(g, 0, 0.5 / k) * torch.cos(k * theta + _u(g, 0, 2 * math.pi))
    return dist < radius * r


def synthesize_damage(img: torch.Tensor, generator: torch.Generator | int | None = 0,
                      kinds=KINDS, amount: float = 1.0, visible: float = 0.03):
    """Draw synthetic damage on a clean image.

    img: (3, H, W) float in [0, 1]. generator: torch.Generator or int seed (same seed -> same damage).
    kinds: subset of KINDS. amount: scales the number of cracks / scratches / stains / patches.
    Returns (damaged (3, H, W) in [0, 1], mask (H, W) bool): the mask marks every pixel the damage changed by
    more than `visible` in some channel (a crack over a black area changes nothing and is not damage).
    """
    if isinstance(generator, torch.Generator):
        g = generator
    else:
        g = torch.Generator().manual_seed(0 if generator is None else int(generator))
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown damage kinds {sorted(unknown)}; choose from {KINDS}")
    img = img.float().clamp(0, 1)
    _, h, w = img.shape
    diag, short = math.hypot(h, w), min(h, w)
    out = img.clone()

    def count(base: float) -> int:
        return int(base * amount + _u(g))      # stochastic rounding keeps the expected count = base * amount

    if "blotches" in kinds:       # stains: translucent yellow-brown discolouration with a soft edge
        for _ in range(count(2)):
            region = _blob(g, h, w, _u(g, 0.03, 0.10) * short).float()
            a = gaussian_blur(region, 2.0) * _u(g, 0.3, 0.6)
            tint = torch.tensor([_u(g, 0.45, 0.6), _u(g, 0.3, 0.4), _u(g, 0.1, 0.2)]).view(3, 1, 1)
            out = out * (1 - a) + tint * out.mean(0, keepdim=True).clamp_min(0.3) * 1.4 * a
    if "missing" in kinds:        # paint loss: flat paper colour, faint paper grain
        for _ in range(count(2)):
            region = gaussian_blur(_blob(g, h, w, _u(g, 0.02, 0.06) * short).float(), 0.7)
            paper = torch.tensor(PAPER).view(3, 1, 1) * (1 + 0.02 * torch.randn(1, h, w, generator=g))
            out = out * (1 - region) + paper * region
    if "cracks" in kinds:         # branching cracks: dirt in the broken emulsion, or the bare paper beneath
        for _ in range(count(3)):
            alpha = torch.zeros(h, w)
            start = torch.tensor([_u(g, 0, h), _u(g, 0, w)])
            _crack(g, alpha, start, _u(g, 0, 2 * math.pi), _u(g, 0.25, 0.6) * diag, _u(g, 0.6, 1.6), 2)
            ink = torch.tensor(PAPER) if _u(g) < 0.3 else torch.tensor([0.09, 0.07, 0.05]) * _u(g, 0.6, 1.4)
            out = out * (1 - alpha) + ink.view(3, 1, 1) * alpha
    if "scratches" in kinds:      # bright, thin, nearly straight lines, often broken into dashes
        alpha = torch.zeros(h, w)
        for _ in range(count(3)):
            p0 = torch.tensor([_u(g, 0, h), _u(g, 0, w)])
            ang, length = _u(g, 0, 2 * math.pi), _u(g, 0.2, 0.7) * diag
            p2 = p0 + length * torch.tensor([math.sin(ang), math.cos(ang)])
            p1 = (p0 + p2) / 2 + _u(g, -0.08, 0.08) * length * torch.tensor([math.cos(ang), -math.sin(ang)])
            t = torch.linspace(0, 1, 64)[:, None]
            poly = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2     # quadratic Bezier
            n = len(poly)
            rad = _smooth_walk(g, n, 0.4, _u(g, 0.6, 1.2), 0.2)
            dash = (torch.rand(n, generator=g) > _u(g, 0, 0.3)).float()
            strength = _smooth_walk(g, n, 0.5, 0.95, 0.2) * dash
            pts, rad_d, s_d = _densify(poly, rad, strength)
            _stamp(alpha, pts, rad_d, s_d)
        out = out * (1 - alpha) + torch.tensor([0.97, 0.97, 0.95]).view(3, 1, 1) * alpha
    out = out.clamp(0, 1)
    return out, (out - img).abs().amax(0) > visible
