"""Damage masks for photo repair: the automatic crack/scratch detector, and reading painted masks.

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

Synthetic damage with its known mask is mask_synth.py; the command line (mask_cli.py):
  python -m mini_supir.mask --image photo.png --out mask.png                                # automatic mask
  python -m mini_supir.mask --image photo.png --damage damaged.png --out mask.png --seed 0  # synthetic damage
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import ImageError, open_image, split_alpha

# ----------------------------------------------------------------------------------------------------------
# parameters


def _param(default, help: str, low: float = 0, high: float | None = None):
    # [low, high]: outside it the detector finds nothing (radius 0, window 1) or never ends (huge windows)
    return field(default=default, metadata={"help": help, "low": low, "high": high})


@dataclass(frozen=True)
class MaskParams:
    """Automatic damage detector settings. Lengths are in pixels, intensities in luma units (0..1)."""
    radius: int = _param(2, "hat radius: finds dark / bright lines up to ~2*radius+1 px wide", 1, 64)
    wide_radius: int = _param(5, "structures that still respond at this radius are image content, not damage", 1, 128)
    wide_weight: float = _param(1.0, "how much of the wide response is subtracted (0: plain black-hat / top-hat)", 0, 10)
    dark: bool = _param(True, "detect dark damage (dirt-filled cracks, dust) with the black-hat")
    bright: bool = _param(True, "detect bright damage (scratches, cracks down to the paper) with the top-hat")
    window: int = _param(31, "side of the window of the local statistics of the adaptive threshold", 3, 1024)
    weak_k: float = _param(2.0, "weak threshold: median + weak_k * (upper quartile - median) + weak_offset", 0, 100)
    weak_offset: float = _param(0.03, "weak threshold offset (luma units)", 0, 1)
    strong_k: float = _param(4.0, "strong (seed) threshold, same form", 0, 100)
    strong_offset: float = _param(0.10, "strong threshold offset (luma units)", 0, 1)
    seed_length: int = _param(15, "a strong segment seeds a detection only if at least this long")
    min_length: int = _param(40, "drop components shorter than this (bounding-box diagonal): specks, texture")
    close_radius: int = _param(1, "closing radius that bridges small gaps along a crack before labelling", 0, 64)
    dilate_radius: int = _param(1, "grow the final mask to cover the crack's anti-aliased border", 0, 64)
    feather_sigma: float = _param(1.5, "Gaussian sigma of the soft blending mask (`auto_mask`, `feather`)", 0, 64)

    def __post_init__(self):
        problems = []
        for f in fields(self):
            v, low, high = getattr(self, f.name), f.metadata["low"], f.metadata["high"]
            if isinstance(v, bool) or f.type in ("bool", bool):
                if not isinstance(v, bool):
                    problems.append(f"{f.name} is true or false, not {v!r}")
            elif not math.isfinite(v) or v < low or (high is not None and v > high):
                problems.append(f"{f.name} must be in [{low:g}, {high if high is not None else 'inf'}], not {v}")
        if problems:
            raise ValueError("; ".join(problems))


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
# painted masks


def check_aspect(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """Refuse a mask (width, height) that is not the image's shape at some scale (up to rounding to whole
    pixels): stretching it would move the marked damage off the real damage."""
    (mw, mh), (w, h) = mask_size, image_size
    (cw, ch), (fw, fh) = sorted([(mw, mh), (w, h)], key=lambda s: s[0] * s[1])  # coarse, fine grid
    # some scale s maps the fine grid onto the coarse one with each side within a pixel: round(fw * s) ~ cw
    if max((cw - 1) / fw, (ch - 1) / fh) > min((cw + 1) / fw, (ch + 1) / fh):
        raise ImageError(f"the mask is {mw}x{mh}, the image {w}x{h}: another shape (a mask is scaled, never "
                         "stretched: paint it on the image or a resized copy)")


def load_mask(path, size: tuple[int, int]) -> torch.Tensor:
    """Read a user-painted mask (white = damage) and fit it to an image of size (H, W) -> bool (H, W).

    Images with transparency use the alpha channel (paint on an empty layer); others their grey level (8- or
    16-bit). Binarised at half intensity, resized with Pillow's antialiased bilinear filter, and a pixel
    counts as damaged if at least a quarter of it was painted, so thin strokes survive downscaling. A mask
    of another shape is refused (check_aspect).
    """
    im = open_image(path)
    h, w = size
    check_aspect(im.size, (w, h))
    rgb, alpha = split_alpha(im, background=None)
    grey = alpha if alpha is not None and alpha.getextrema()[0] < 255 else rgb.convert("L")
    binary = grey.point(lambda v: 255 if v >= 128 else 0)
    if binary.size != (w, h):
        binary = binary.resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.asarray(binary, dtype=np.float32) / 255.0 >= 0.25)


if __name__ == "__main__":  # python -m mini_supir.mask: the command line lives in mask_cli.py
    from .mask_cli import main
    sys.exit(main())
