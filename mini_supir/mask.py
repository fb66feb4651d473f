"""Damage masks for photo repair: an automatic crack/scratch detector and a synthetic damage generator.

Detector (`detect_damage`, `auto_mask`), on the luma Y of the image:
  1. thin-structure response. The black-hat closing(Y) - Y is large on dark structures narrower than the
     structuring element (cracks), the white top-hat Y - opening(Y) on thin bright ones (scratches). Natural
     photos are full of soft folds and shading that also respond; those keep responding at a larger radius,
     so the response is `(1 + w) * hat(radius) - w * hat(wide_radius)`: ~ the depth for a line of width
     <= 2*radius+1, reduced for anything wider.
  2. adaptive threshold against robust local statistics (median and upper quartile of the response in a
     `window`): textured areas (hair, wood grain, machinery), where everything responds, need a proportionally
     stronger response. The median, unlike the mean, ignores the crack itself (a few % of the window).
  3. hysteresis, like Canny edges: weak pixels are kept only in components that contain a strong seed segment
     at least `seed_length` long, so faint stretches of a crack survive while faint texture does not.
  4. clean-up: closing bridges small gaps, components shorter than `min_length` (bounding-box diagonal) are
     dropped as specks, and the result is dilated to cover the crack's soft border.
  5. `feather` turns the hard mask into a smooth [0, 1] blending weight.
All morphology is max-pooling on torch tensors; connected components are a vectorised union-find in numpy.

Generator (`synthesize_damage`): branching crack polylines (dirt-dark or paper-white), thin bright scratches,
stains and missing paint (flat paper-coloured patches) with their known mask, deterministic per seed.

CLI:
  python -m mini_supir.mask --image photo.png --out mask.png                                # automatic mask
  python -m mini_supir.mask --image photo.png --damage damaged.png --out mask.png --seed 0  # synthetic damage
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import atomic_write, open_image, split_alpha, to_tensor

# ----------------------------------------------------------------------------------------------------------
# parameters


def _param(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MaskParams:
    """Automatic damage detector settings. Lengths are in pixels, intensities in luma units (0..1)."""
    radius: int = _param(2, "hat radius: finds dark / bright lines up to ~2*radius+1 px wide")
    wide_radius: int = _param(5, "structures that still respond at this radius are image content, not damage")
    wide_weight: float = _param(1.0, "how much of the wide response is subtracted (0: plain black-hat / top-hat)")
    dark: bool = _param(True, "detect dark damage (dirt-filled cracks, dust) with the black-hat")
    bright: bool = _param(True, "detect bright damage (scratches, cracks down to the paper) with the top-hat")
    window: int = _param(31, "side of the window of the local statistics of the adaptive threshold")
    weak_k: float = _param(2.0, "weak threshold: median + weak_k * (upper quartile - median) + weak_offset")
    weak_offset: float = _param(0.03, "weak threshold offset (luma units)")
    strong_k: float = _param(4.0, "strong (seed) threshold, same form")
    strong_offset: float = _param(0.10, "strong threshold offset (luma units)")
    seed_length: int = _param(15, "a strong segment seeds a detection only if at least this long")
    min_length: int = _param(40, "drop components shorter than this (bounding-box diagonal): specks, texture")
    close_radius: int = _param(1, "closing radius that bridges small gaps along a crack before labelling")
    dilate_radius: int = _param(1, "grow the final mask to cover the crack's anti-aliased border")
    feather_sigma: float = _param(1.5, "Gaussian sigma of the soft blending mask (`auto_mask`, `feather`)")


# ----------------------------------------------------------------------------------------------------------
# morphology on (H, W) tensors; borders are neutral (max-pool pads with -inf)


def _pool(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    return F.max_pool2d(x[None, None], (kh, kw), stride=1, padding=(kh // 2, kw // 2))[0, 0]


def dilate(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Grey or binary dilation by an octagon of the given radius: alternating 3x3 square and plus-shaped
    steps, the usual cheap disk approximation ({|dy|, |dx| <= radius, |dy| + |dx| <= radius + ceil(radius/2)})."""
    if radius <= 0:
        return x
    y = x.float()
    for i in range(radius):
        y = _pool(y, 3, 3) if i % 2 == 0 else torch.maximum(_pool(y, 3, 1), _pool(y, 1, 3))
    return y.to(x.dtype)


def erode(x: torch.Tensor, radius: int) -> torch.Tensor:
    if x.dtype == torch.bool:
        return ~dilate(~x, radius)
    return -dilate(-x, radius)


def closing(x: torch.Tensor, radius: int) -> torch.Tensor:
    return erode(dilate(x, radius), radius)


def opening(x: torch.Tensor, radius: int) -> torch.Tensor:
    return dilate(erode(x, radius), radius)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x.float()[None, None]
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return y[0, 0]


def local_quantiles(x: torch.Tensor, window: int, qs: tuple[float, ...]) -> torch.Tensor:
    """Quantiles of x over a window x window neighbourhood of every pixel -> (len(qs), H, W).

    Evaluated on a grid of stride window/4 from every second pixel of the window, and bilinearly
    interpolated: the statistics vary slowly, and a per-pixel sort of window^2 values would cost ~4000x more.
    """
    h, w = x.shape
    s = max(1, window // 4)
    ny, nx = math.ceil((h - 1) / s) + 1, math.ceil((w - 1) / s) + 1
    ph, pw = (ny - 1) * s + 1 - h, (nx - 1) * s + 1 - w
    r = window // 2
    xp = F.pad(x.float()[None, None], (r, r + pw, r, r + ph), mode="replicate")
    patches = F.unfold(xp, r + 1, dilation=2, stride=s)[0]            # ((r+1)^2, ny*nx), window 2r+1 wide
    q = torch.quantile(patches, torch.tensor(qs, dtype=torch.float32), dim=0).view(len(qs), 1, ny, nx)
    q = F.interpolate(q, size=((ny - 1) * s + 1, (nx - 1) * s + 1), mode="bilinear", align_corners=True)
    return q[:, 0, :h, :w]


# ----------------------------------------------------------------------------------------------------------
# connected components


def label_components(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """8-connected components of a bool (H, W) mask -> (int64 labels, 0 = background, 1..n; n).

    Vectorised union-find: every foreground pixel starts as its own root; each round hooks the larger root of
    every neighbouring pair onto the smaller one, then pointer jumping flattens the trees. Few rounds, each
    O(pixels): a few milliseconds on a 500x700 mask.
    """
    m = mask.cpu().numpy().astype(bool)
    h, w = m.shape
    idx = np.full((h + 2, w + 2), -1, dtype=np.int64)   # padded so neighbour shifts need no bounds checks
    ys, xs = np.nonzero(m)
    n = len(ys)
    idx[ys + 1, xs + 1] = np.arange(n)
    inner = idx[1:-1, 1:-1]
    src, dst = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):   # half of the 8 neighbours: each pair once
        nb = idx[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx]
        both = (inner >= 0) & (nb >= 0)
        src.append(inner[both])
        dst.append(nb[both])
    u, v = np.concatenate(src), np.concatenate(dst)
    parent = np.arange(n)
    while True:
        pu, pv = parent[u], parent[v]
        diff = pu != pv
        if not diff.any():
            break
        np.minimum.at(parent, np.maximum(pu[diff], pv[diff]), np.minimum(pu[diff], pv[diff]))
        while True:
            pp = parent[parent]
            if np.array_equal(pp, parent):
                break
            parent = pp
    roots, comp = np.unique(parent, return_inverse=True)
    labels = np.zeros((h, w), dtype=np.int64)
    labels[ys, xs] = comp + 1
    return torch.from_numpy(labels), len(roots)


def component_lengths(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Bounding-box diagonal of each component -> (n + 1,) float, index 0 (background) is 0."""
    ys, xs = torch.nonzero(labels, as_tuple=True)
    lab = labels[ys, xs]
    ext = []
    for c in (ys, xs):
        lo = torch.full((n + 1,), 1 << 30, dtype=torch.int64).scatter_reduce(0, lab, c, "amin")
        hi = torch.full((n + 1,), -1, dtype=torch.int64).scatter_reduce(0, lab, c, "amax")
        ext.append((hi - lo + 1).clamp_min(0).float())
    return torch.hypot(*ext)


def keep_components(mask: torch.Tensor, min_length: float, seeds: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the components of `mask` at least `min_length` long (bounding-box diagonal) and, if `seeds` is
    given, touching at least one seed pixel."""
    labels, n = label_components(mask)
    keep = component_lengths(labels, n) >= min_length
    if seeds is not None:
        keep &= torch.bincount(labels.flatten()[seeds.flatten()], minlength=n + 1) > 0
    keep[0] = False
    return keep[labels]


# ----------------------------------------------------------------------------------------------------------
# detector


def _luminance(img: torch.Tensor) -> torch.Tensor:
    if img.ndim == 2:
        return img.float()
    if img.shape[0] == 1:
        return img[0].float()
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, 1, 1)   # Rec. 601 luma
    return (img[:3].float() * w).sum(0)


def damage_response(img: torch.Tensor, params: MaskParams = MaskParams()) -> torch.Tensor:
    """Thin-structure response (H, W) >= 0 (step 1 above). `img` is (3, H, W), (1, H, W) or (H, W) in [0, 1]."""
    y = _luminance(img)
    a, b, wt = params.radius, params.wide_radius, params.wide_weight
    r = torch.zeros_like(y)
    if params.dark:
        r = torch.maximum(r, (1 + wt) * (closing(y, a) - y) - wt * (closing(y, b) - y))
    if params.bright:
        r = torch.maximum(r, (1 + wt) * (y - opening(y, a)) - wt * (y - opening(y, b)))
    return r


def detect_damage(img: torch.Tensor, params: MaskParams = MaskParams()) -> torch.Tensor:
    """Hard damage mask, bool (H, W), True where the image looks cracked or scratched."""
    p = params
    r = damage_response(img, p)
    median, upper = local_quantiles(r, p.window, (0.5, 0.75))
    spread = upper - median
    weak = r > median + p.weak_k * spread + p.weak_offset
    strong = r > median + p.strong_k * spread + p.strong_offset
    seeds = keep_components(strong, p.seed_length)
    weak = closing(weak | seeds, p.close_radius)
    return dilate(keep_components(weak, p.min_length, seeds=seeds), p.dilate_radius)


def feather(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soft blending weight in [0, 1] from a hard mask: exactly 1 on the mask, Gaussian fall-off outside.
    The mask is grown by 2*sigma before blurring so the blur does not eat into the damaged pixels."""
    m = mask.bool()
    if sigma <= 0:
        return m.float()
    soft = gaussian_blur(dilate(m, math.ceil(2 * sigma)).float(), sigma).clamp(0, 1)
    return torch.where(m, torch.ones_like(soft), soft)


def auto_mask(img: torch.Tensor, params: MaskParams = MaskParams()) -> torch.Tensor:
    """Feathered automatic damage mask, float (H, W) in [0, 1]."""
    return feather(detect_damage(img, params), params.feather_sigma)


# ----------------------------------------------------------------------------------------------------------
# synthetic damage

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


# ----------------------------------------------------------------------------------------------------------
# files


def load_image(path) -> torch.Tensor:
    """Image file -> (3, H, W) float in [0, 1] (images.open_image: header size check, 16-bit grey, EXIF)."""
    return to_tensor(split_alpha(open_image(path), background=None)[0])[0]


def load_mask(path, size: tuple[int, int]) -> torch.Tensor:
    """Read a user-painted mask (white = damage) and fit it to an image of size (H, W) -> bool (H, W).

    Images with transparency use the alpha channel (paint on an empty layer); others their grey level.
    Binarised at half intensity, resized with Pillow's antialiased bilinear filter, and a pixel counts as
    damaged if at least a quarter of it was painted, so thin strokes survive downscaling.
    """
    with Image.open(path) as im:
        if "A" in im.getbands() and im.getextrema()[-1][0] < 255:
            grey = im.getchannel("A")
        else:
            grey = im.convert("L")
        h, w = size
        binary = grey.point(lambda v: 255 if v >= 128 else 0)
        if binary.size != (w, h):
            binary = binary.resize((w, h), Image.BILINEAR)
        a = np.asarray(binary, dtype=np.float32) / 255.0
    return torch.from_numpy(a >= 0.25)


def _image_format(path: Path) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image extension {path.suffix!r} for {path}")
    return fmt


def save_image(x: torch.Tensor, path) -> None:
    """(3, H, W) or (H, W) in [0, 1] -> 8-bit file, written atomically (temp file + rename)."""
    path = Path(path)
    a = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    im = Image.fromarray(a if a.ndim == 2 else a.transpose(1, 2, 0))
    fmt = _image_format(path)
    atomic_write(path, lambda tmp: im.save(tmp, format=fmt))


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mini_supir.mask", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", required=True, help="input photo")
    p.add_argument("--out", required=True, help="mask PNG to write (white = damage)")
    p.add_argument("--soft", action="store_true", help="write the feathered mask instead of the hard one")
    p.add_argument("--damage", metavar="DAMAGED", help="synthetic mode: write a damaged copy of --image here "
                   "and its known mask to --out")
    p.add_argument("--seed", type=int, default=0, help="synthetic mode: random seed")
    p.add_argument("--kinds", default=",".join(KINDS), help="synthetic mode: comma-separated damage kinds")
    p.add_argument("--amount", type=float, default=1.0, help="synthetic mode: how much damage")
    defaults = MaskParams()
    for f in fields(MaskParams):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name),
                           help=f.metadata["help"])
        else:
            kind = int if f.type in ("int", int) else float
            p.add_argument(flag, type=kind, default=getattr(defaults, f.name), help=f.metadata["help"])
    a = p.parse_args(argv)
    try:
        for out in (a.out, a.damage):   # fail before any work or any file is written
            if out:
                _image_format(Path(out))
        img = load_image(a.image)
        params = MaskParams(**{f.name: getattr(a, f.name) for f in fields(MaskParams)})
        if a.damage:
            kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
            damaged, mask = synthesize_damage(img, a.seed, kinds, a.amount)
            save_image(damaged, a.damage)
            save_image(feather(mask, params.feather_sigma) if a.soft else mask.float(), a.out)
            print(f"wrote {a.damage} and {a.out} ({mask.float().mean().item():.2%} damaged)")
        else:
            mask = detect_damage(img, params)
            save_image(feather(mask, params.feather_sigma) if a.soft else mask.float(), a.out)
            print(f"wrote {a.out} ({mask.float().mean().item():.2%} of the image marked)")
    except (OSError, ValueError) as e:     # missing / unreadable / non-image files, bad extensions or kinds
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
