"""Mask-guided repair: regenerate the damaged pixels of a photo and keep every other pixel.

Given a damage weight m (1 = damaged, 0 = keep; from `mask.py`, automatic or painted), the photo is repaired
in three steps, all plain functions here that the pipeline, evaluation and training share:

1. `prefill`: a classical inpainting (pull-push pyramid + membrane smoothing) replaces the damaged pixels
   (m >= HOLE) by a smooth guess from their surroundings. SUPIR then sees a blurry patch where the crack
   was, the kind of degradation it was trained to restore; shown the crack itself, its control would
   reproduce it. Stage 1, the control latent and the restoration-guidance target come from this image.
2. Mask-guided sampling, for every sampler: the denoiser is wrapped,

       D'(x, sigma) = m D(x, sigma) + (1 - m) z_known,

   z_known the latent of the prefilled input (posterior mean) and m the mask pooled to latent size and
   feathered (`latent_mask`). Every solver step moves x towards D', so outside the mask x keeps the form
   z_known + sigma * n: an Euler step gives x' - z_known = (sigma' / sigma) (x - z_known), a DPM++ 2M SDE
   step x' - z_known = sigma' (exp(-eta h) n + sqrt(1 - exp(-2 eta h)) eps), churn adds noise of the
   matching size. So once the start is z_known + sigma_max * n there (`Known.start`), the known region
   follows the input re-noised to each sigma and ends exactly at z_known, while the masked region is
   generated in its context. This is RePaint's replacement (Lugmayr et al. 2022) done inside the denoiser
   rather than in a sampler callback: the samplers stay untouched, and tiled sampling works because z_known
   and m travel as extra channels of cond["control"], which tiling.TiledDenoiser cuts to each window like
   the LQ latent. The restoration-guidance target is blended the same way, so it pulls nothing outside the mask.
   With control_scale 0 this is plain SDXL inpainting.
3. `composite`: the decoded result is blended into the original with the pixel mask, in 8 bits, so every
   pixel with m = 0 is byte-identical to the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import mask as masks
from .sampler import Cond, denoiser_sigmas

# Feathering of the latent mask, in latent pixels (8 image pixels each): `mask.feather` grows the mask by
# 2 sigma and blurs it, so the latents next to a damaged one are ~94 % free and the fall-off to 0 takes ~5
# latents. The VAE decoder mixes neighbouring latents: a hard latent mask leaves a seam one latent wide.
LATENT_FEATHER = 1.0
# The prefill replaces the pixels whose damage weight is at least this: the hard mask (weight 1) and the inner
# ring of its feathering. Further out the feathered weight only blends, and the original pixels there are
# better context for the fill (and for SUPIR) than an interpolation would be.
HOLE = 0.5
# Membrane smoothing of the pull-push fill (3x3 mean iterations over the hole): removes the blockiness of the
# pyramid's bilinear up-sampling at the cost of a few ms.
SMOOTH_ITERATIONS = 16


# ----------------------------------------------------------------------------------------------------------
# Classical inpainting: the prefill, and the evaluation's classical baseline


def _pull_push(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pull-push interpolation (Gortler et al. 1996, the Lumigraph): x premultiplied by the confidence w in
    [0, 1]. Pull: 2x2 averages of x and w down to a level without holes. Push: each level is its own value
    where it is sure and the up-sampled coarser level where it is not. Returns normalised values."""
    value = x / w.clamp_min(1e-12)
    if bool((w > 0).all()) or min(x.shape[-2:]) == 1:
        return value
    coarse = _pull_push(F.avg_pool2d(x, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True))
    up = F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return w * value + (1 - w) * up


def prefill(img: torch.Tensor, hole: torch.Tensor, smooth: int = SMOOTH_ITERATIONS) -> torch.Tensor:
    """Fill `hole` (bool, (B or 1, 1, H, W); for a damage weight m: m >= HOLE) of `img` (B, C, H, W) from the
    pixels around it; the others are returned unchanged. Works in any value range (linear in the image)."""
    hole = hole.expand(img.shape[0], 1, *img.shape[-2:])
    known = (~hole).to(img.dtype)
    if not bool(known.any()):  # nothing to fill from
        return img.clone()
    x = torch.where(hole, _pull_push(img * known, known.expand_as(img)), img)
    for _ in range(smooth):  # Jacobi iterations of Laplace's equation with the known pixels as boundary
        x = torch.where(hole, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), img)
    return x


# ----------------------------------------------------------------------------------------------------------
# Masks


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) damage weight in [0, 1] (or bool) -> (1, 1, h, w) float at the processing size. Bilinear, so a
    thin stroke stays non-zero (and is regenerated) wherever it touches a pixel."""
    m = mask.float()[None, None]
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m.clamp(0, 1)


def latent_mask(mask: torch.Tensor, factor: int, sigma: float = LATENT_FEATHER) -> torch.Tensor:
    """(B, 1, H, W) pixel weight -> (B, 1, H / factor, W / factor) latent weight in [0, 1]: 1 on every latent
    that covers a pixel with weight > 0, feathered outside (`mask.feather`)."""
    hard = F.max_pool2d((mask > 0).float(), factor) > 0
    return torch.stack([masks.feather(h[0], sigma)[None] for h in hard]).to(mask.dtype)


def soft_mask(hard: torch.Tensor, params: masks.MaskParams = masks.MaskParams()) -> torch.Tensor:
    """The blending weight of a hard damage mask (H, W): exactly 1 on it, feathered outside."""
    return masks.feather(hard.bool(), params.feather_sigma)


# ----------------------------------------------------------------------------------------------------------
# Mask-guided sampling


@dataclass
class Known:
    """What the sampler keeps: the latent of the (prefilled) input and where it may not change (1 - mask)."""
    z: torch.Tensor      # (1, C, h, w)
    mask: torch.Tensor   # (1, 1, h, w) in [0, 1], 1 = generate

    def pack(self, cond: Cond) -> Cond:
        """cond with z and the mask appended to "control" as channels (see the module docstring)."""
        n = cond["control"].shape[0]
        return {**cond, "control": torch.cat([cond["control"], self.z.expand(n, -1, -1, -1),
                                              self.mask.expand(n, -1, -1, -1)], dim=1)}

    def blend(self, generated: torch.Tensor) -> torch.Tensor:
        return self.mask * generated + (1 - self.mask) * self.z

    def start(self, noise: torch.Tensor, sigma_max: float | None = None) -> torch.Tensor:
        """The noise such that the sampler's start latent, `sampler.start_latent(noise)` = noise * sqrt(1 +
        sigma_max^2), is the usual pure noise inside the mask and z + sigma_max * noise outside. Every
        sampler here starts at the largest training sigma."""
        sigma_max = float(denoiser_sigmas()[-1]) if sigma_max is None else sigma_max
        scale = (1.0 + sigma_max ** 2) ** 0.5
        return self.mask * noise + (1 - self.mask) * (self.z + sigma_max * noise) / scale


class MaskedDenoiser:
    """D'(x, sigma) = m D(x, sigma) + (1 - m) z_known for a cond packed by `Known.pack`."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor, sigma, cond: Cond, control_scale: float = 1.0) -> torch.Tensor:
        c = x.shape[1]
        control, z, m = cond["control"].split([cond["control"].shape[1] - c - 1, c, 1], dim=1)
        d = self.denoiser(x, sigma, {**cond, "control": control}, control_scale)
        return m * d + (1 - m) * z


# ----------------------------------------------------------------------------------------------------------
# Pixels


def composite(result: Image.Image, original: Image.Image, mask: torch.Tensor) -> Image.Image:
    """`result` where the (H, W) weight is 1, `original` where it is 0, blended in between; both images of
    one mode and size. The weight is rounded to 8 bits first, so m = 0 gives the original's bytes."""
    m = (mask.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.composite(result, original, Image.fromarray(m, "L"))


def image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [0, 1] (the detector's input)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def mask_image(mask: torch.Tensor) -> Image.Image:
    """(H, W) mask in [0, 1] or bool -> 8-bit grey PNG-ready image (white = damage)."""
    return Image.fromarray((mask.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), "L")
