"""Synthetic degradations that turn a ground-truth (GT) photo into a low-quality (LQ) input, for evaluation
and for training pairs.

Images are float tensors (B, 3, H, W) in [0, 1]. Every random choice is drawn from a `torch.Generator` the
caller passes in (or one seeded from `seed`), so a result is a pure function of (image, setting, seed).

`degrade(img, setting, seed)` returns the LQ image at LOW resolution, (H // s, W // s) for a setting of scale
s, quantised to 8-bit levels (what a PNG of it holds); restoring means upsampling it by s first (the caller
does this, e.g. `upsample(lq, gt.shape[-2:])`). When H or W is not a multiple of s, the last H % s rows and
W % s columns are dropped first (`modcrop`), so compare restorations with `modcrop(gt, s)`.

Named settings (`SETTINGS`):
- fixed pipelines (`Setting`): Gaussian blur -> down-sampling -> Gaussian noise -> JPEG -> 8-bit;
  `sr4-blur2` (Gaussian blur sigma 2, bicubic x4) is the SUPIR / seed-paper setting.
- `realesrgan`: the second-order random pipeline of Real-ESRGAN (Wang et al. 2021, arXiv:2107.10833) with
  the ranges of its x4plus training config (`RealESRGANConfig`).
- `cracks`, `cracks-paint` (`Damage`): synthetic photo damage from `mask_synth.synthesize_damage` at the GT size:
  cracks and scratches (what the automatic damage detector looks for), and those plus patches of missing
  paint. `damage(img, setting, seed)` also returns where the damage is (the mask a repair is scored inside).

CLI (degrade_cli.py): python -m mini_supir.degrade --in GT_DIR --out LQ_DIR --setting sr4-blur2 [--seed 0]
"""
import hashlib
import io
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import quantize, to_uint8
from .mask_synth import synthesize_damage

# --------------------------------------------------------------------------------------------------
# Building blocks


def modcrop(img: torch.Tensor, scale: int) -> torch.Tensor:
    """Drop the last H % scale rows and W % scale columns, so that the image tiles into scale x scale cells."""
    h, w = img.shape[-2:]
    return img[..., : h - h % scale, : w - w % scale]


def blur_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
                beta: float = 1.0, plateau: bool = False) -> torch.Tensor:
    """(size, size) kernel summing to 1 from the quadratic form d = x^T Sigma^-1 x, where
    Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T:
    exp(-d / 2) (Gaussian, beta = 1), exp(-d^beta / 2) (generalized Gaussian), 1 / (d^beta + 1) (plateau).
    These are the shapes of Real-ESRGAN's kernel pool; sigma_y = sigma_x gives an isotropic kernel."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([sigma_x ** 2, sigma_y ** 2], dtype=torch.float64)) @ rot.T
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    grid = torch.stack(torch.meshgrid(ax, ax, indexing="xy"), dim=-1)  # (size, size, 2) as (x, y)
    d = torch.einsum("...i,ij,...j->...", grid, torch.linalg.inv(cov), grid)
    k = 1.0 / (d ** beta + 1.0) if plateau else torch.exp(-0.5 * d ** beta)
    return (k / k.sum()).float()


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """(size, size) ideal circular low-pass filter with cut-off frequency `cutoff` (radians per pixel):
    cutoff * J1(cutoff r) / (2 pi r). Models ringing and overshoot artefacts (Real-ESRGAN Sec. 3.3)."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    r = torch.hypot(ax[None, :], ax[:, None])
    k = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r)
    k[r == 0] = cutoff ** 2 / (4 * math.pi)  # the limit at r -> 0
    return (k / k.sum()).float()


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel with a (k, k) kernel (k odd), padded so that the size is unchanged."""
    k = kernel.shape[-1]
    # reflection needs more pixels than the padding; tiny images (after a strong random down-scale) replicate
    mode = "reflect" if min(img.shape[-2:]) > k // 2 else "replicate"
    x = F.pad(img, [k // 2] * 4, mode=mode)
    weight = kernel.to(img).expand(img.shape[1], 1, k, k)
    return F.conv2d(x, weight, groups=img.shape[1])


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Isotropic Gaussian blur, kernel size 2 ceil(3 sigma) + 1 (13 taps for sigma 2)."""
    return filter2d(img, blur_kernel(2 * math.ceil(3 * sigma) + 1, sigma))


def resize(img: torch.Tensor, size: tuple[int, int], mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Resize to (h, w) with 'bicubic' (Keys a = -0.5), 'bilinear' or 'area' (box average). With antialias
    the bicubic / bilinear kernel is widened by the down-scaling factor, as in PIL and MATLAB's imresize."""
    if min(size) < 1:
        raise ValueError(f"cannot resize an image of {tuple(img.shape[-2:])} to {tuple(size)}")
    if mode == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=mode, align_corners=False, antialias=antialias)


def downsample(img: torch.Tensor, factor: int, mode: str = "bicubic") -> torch.Tensor:
    """Anti-aliased down-sampling by an integer factor to (H // factor, W // factor)."""
    h, w = img.shape[-2:]
    return resize(img, (h // factor, w // factor), mode)


def upsample(lq: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """The caller's side of `degrade`: bring an LQ image back to the GT size, clipped to [0, 1]."""
    return resize(lq, tuple(size), mode).clamp(0, 1)


def _per_image(value, batch: int, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=ref.dtype).to(ref.device).expand(batch).view(batch, 1, 1, 1)


def add_gaussian_noise(img: torch.Tensor, sigma, generator: torch.Generator, gray=False) -> torch.Tensor:
    """img + N(0, sigma^2), clipped to [0, 1]. sigma (in [0, 1] units, 8-bit sigma / 255) and gray (the same
    noise on all three channels) are scalars or one value per image."""
    b, c, h, w = img.shape
    gen = dict(generator=generator, device=generator.device)
    colour = torch.randn((b, c, h, w), **gen).to(img)
    grey = torch.randn((b, 1, h, w), **gen).to(img)
    gray = _per_image(gray, b, img).bool()
    noise = torch.where(gray, grey.expand_as(colour), colour) * _per_image(sigma, b, img)
    return (img + noise).clamp(0, 1)


def add_poisson_noise(img: torch.Tensor, scale, generator: torch.Generator, gray=False) -> torch.Tensor:
    """Shot noise, clipped to [0, 1]: each 8-bit-rounded value v is replaced by Poisson(v n) / n, where n is
    the number of distinct levels in the image rounded up to a power of two (Real-ESRGAN's rule), and the
    difference is scaled by `scale`. With gray the noise of the BT.601 luma is added to all channels."""
    b = img.shape[0]
    gray = _per_image(gray, b, img).bool().flatten().tolist()
    luma = (img * img.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    noise = []
    for x, y, is_gray in zip(img, luma, gray):
        x = ((y if is_gray else x) * 255).round().clamp(0, 255) / 255
        levels = 2 ** math.ceil(math.log2(len(torch.unique(x))))
        counts = torch.poisson((x * levels).to(generator.device), generator=generator).to(x)
        noise.append((counts / levels - x).expand_as(img[0]))  # a grey (1, H, W) noise goes to all channels
    return (img + torch.stack(noise) * _per_image(scale, b, img)).clamp(0, 1)


def jpeg(img: torch.Tensor, quality) -> torch.Tensor:
    """JPEG round trip through pillow (libjpeg, 4:2:0 chroma subsampling) at a quality in [1, 100] (rounded);
    one quality for the batch or one per image. Values are clipped to [0, 1]; the result is on 8-bit levels."""
    qualities = [quality] * img.shape[0] if np.isscalar(quality) else list(quality)
    out = []
    for x, q in zip(to_uint8(img), qualities):
        buffer = io.BytesIO()
        Image.fromarray(x).save(buffer, format="JPEG", quality=int(round(float(q))))
        buffer.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(img) / 255


# --------------------------------------------------------------------------------------------------
# Fixed settings


@dataclass(frozen=True)
class Setting:
    """A fixed degradation: blur -> down-sample by `scale` -> Gaussian noise -> JPEG -> 8-bit."""
    scale: int = 4
    blur_sigma: float = 0.0  # isotropic Gaussian blur, in GT pixels; 0 = none
    downsample: str = "bicubic"  # 'bicubic', 'bilinear' or 'area' (all anti-aliased)
    noise_sigma: float = 0.0  # Gaussian noise std in 8-bit units (added at LQ resolution)
    jpeg_quality: int | None = None  # pillow JPEG quality; None = none


def apply_setting(img: torch.Tensor, setting: Setting, generator: torch.Generator) -> torch.Tensor:
    x = modcrop(img, setting.scale)
    if setting.blur_sigma > 0:
        x = gaussian_blur(x, setting.blur_sigma)
    if setting.scale > 1:
        x = downsample(x, setting.scale, setting.downsample)
    if setting.noise_sigma > 0:
        x = add_gaussian_noise(x, setting.noise_sigma / 255, generator)
    if setting.jpeg_quality is not None:
        x = jpeg(x, setting.jpeg_quality)
    return quantize(x)


# --------------------------------------------------------------------------------------------------
# Real-ESRGAN second-order random pipeline


@dataclass(frozen=True)
class RealESRGANConfig:
    """Ranges of Real-ESRGAN's degradation model (defaults: its `train_realesrgan_x4plus.yml`). Each stage
    draws: a blur kernel, a resize, Gaussian or Poisson noise, a JPEG quality; `*2` fields are stage 2's."""
    scale: int = 4
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    # kernel shapes and their probabilities
    kernel_types: tuple[str, ...] = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                                     "plateau_aniso")
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1  # chance that a stage's blur is a sinc (ringing) filter instead
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)  # generalized Gaussian shape
    betap_range: tuple[float, float] = (1.0, 2.0)  # plateau shape
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_range: tuple[float, float] = (1.0, 30.0)  # Gaussian sigma, 8-bit units
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    second_blur_prob: float = 0.8
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    final_sinc_prob: float = 0.8  # chance of a sinc filter with the final resize


REALESRGAN = RealESRGANConfig()
RESIZE_MODES = ("area", "bilinear", "bicubic")


class _Draw:
    """Scalar random draws from one generator, in a fixed order."""

    def __init__(self, generator: torch.Generator):
        self.g = generator

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * torch.rand((), generator=self.g, device=self.g.device).item()

    def choice(self, options, probs=None):
        probs = torch.ones(len(options)) if probs is None else torch.tensor(probs, dtype=torch.float)
        return options[torch.multinomial(probs.to(self.g.device), 1, generator=self.g).item()]


def random_kernel(draw: _Draw, cfg: RealESRGANConfig, sigma_range, sinc_prob: float) -> torch.Tensor:
    """One stage's blur kernel, zero-padded to the largest kernel size."""
    size = draw.choice(cfg.kernel_sizes)
    if draw.uniform() < sinc_prob:
        # small kernels cannot represent very low cut-offs without strong truncation
        kernel = sinc_kernel(size, draw.uniform(math.pi / 3 if size < 13 else math.pi / 5, math.pi))
    else:
        kind = draw.choice(cfg.kernel_types, cfg.kernel_prob)
        sigma_x = draw.uniform(*sigma_range)
        sigma_y, theta = (draw.uniform(*sigma_range), draw.uniform(-math.pi, math.pi)) if "aniso" in kind \
            else (sigma_x, 0.0)
        # (the x4plus config uses the same beta ranges in both stages)
        beta_range = cfg.betag_range if kind.startswith("generalized") else cfg.betap_range
        # half of the draws below 1 (heavier tails), half above (flatter top), as Real-ESRGAN does
        beta = 1.0 if kind in ("iso", "aniso") else \
            draw.uniform(beta_range[0], 1.0) if draw.uniform() < 0.5 else draw.uniform(1.0, beta_range[1])
        kernel = blur_kernel(size, sigma_x, sigma_y, theta, beta, plateau=kind.startswith("plateau"))
    pad = (max(cfg.kernel_sizes) - size) // 2
    return F.pad(kernel, [pad] * 4)


def _random_noise(x, draw: _Draw, generator, gaussian_prob, sigma_range, poisson_range, gray_prob):
    gaussian = draw.uniform() < gaussian_prob
    strength = draw.uniform(*sigma_range) / 255 if gaussian else draw.uniform(*poisson_range)
    gray = draw.uniform() < gray_prob
    return (add_gaussian_noise if gaussian else add_poisson_noise)(x, strength, generator, gray)


def _random_scale(draw: _Draw, probs, value_range) -> float:
    """Up (in [1, max]), down (in [min, 1]) or keep (1), with probabilities `probs`."""
    direction = draw.choice(("up", "down", "keep"), probs)
    if direction == "up":
        return draw.uniform(1.0, value_range[1])
    return draw.uniform(value_range[0], 1.0) if direction == "down" else 1.0


def _resize_and_sinc(x: torch.Tensor, size, mode: str, kernel: torch.Tensor | None) -> torch.Tensor:
    x = resize(x, size, mode, antialias=False)
    return x if kernel is None else filter2d(x, kernel)


def realesrgan_degrade(img: torch.Tensor, generator: torch.Generator, cfg: RealESRGANConfig = REALESRGAN):
    """Real-ESRGAN's second-order degradation, one image at a time (each with its own draws):
    [blur -> random resize -> noise -> JPEG] x 2, then (resize to H/s + sinc filter) and JPEG in random
    order, then 8-bit. Stage-1 resizes scale the image; stage 2 resizes relative to the final size."""
    draw, s = _Draw(generator), cfg.scale
    img = modcrop(img, s)
    h, w = img.shape[-2:]
    out = []
    for x in img.split(1):
        k1 = random_kernel(draw, cfg, cfg.blur_sigma, cfg.sinc_prob)
        k2 = random_kernel(draw, cfg, cfg.blur_sigma2, cfg.sinc_prob2)
        final_sinc = sinc_kernel(max(cfg.kernel_sizes), draw.uniform(math.pi / 3, math.pi)) \
            if draw.uniform() < cfg.final_sinc_prob else None
        # stage 1
        x = filter2d(x, k1)
        f = _random_scale(draw, cfg.resize_prob, cfg.resize_range)
        x = resize(x, (max(1, int(x.shape[-2] * f)), max(1, int(x.shape[-1] * f))), draw.choice(RESIZE_MODES),
                   antialias=False)
        x = _random_noise(x, draw, generator, cfg.gaussian_noise_prob, cfg.noise_range,
                          cfg.poisson_scale_range, cfg.gray_noise_prob)
        x = jpeg(x, draw.uniform(*cfg.jpeg_range))
        # stage 2
        if draw.uniform() < cfg.second_blur_prob:
            x = filter2d(x, k2)
        f = _random_scale(draw, cfg.resize_prob2, cfg.resize_range2)
        x = resize(x, (max(1, int(h / s * f)), max(1, int(w / s * f))), draw.choice(RESIZE_MODES), antialias=False)
        x = _random_noise(x, draw, generator, cfg.gaussian_noise_prob2, cfg.noise_range2,
                          cfg.poisson_scale_range2, cfg.gray_noise_prob2)
        # final resize + sinc and JPEG, in random order
        resize_first, mode, quality = draw.uniform() < 0.5, draw.choice(RESIZE_MODES), draw.uniform(*cfg.jpeg_range2)
        if resize_first:
            x = jpeg(_resize_and_sinc(x, (h // s, w // s), mode, final_sinc), quality)
        else:
            x = _resize_and_sinc(jpeg(x, quality), (h // s, w // s), mode, final_sinc)
        out.append(quantize(x))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# Synthetic damage (repair rather than restoration)


@dataclass(frozen=True)
class Damage:
    """Cracks, scratches, stains or missing paint drawn on the image (`mask_synth.synthesize_damage`); size kept."""
    kinds: tuple[str, ...] = ("cracks", "scratches")
    amount: float = 1.0  # scales the number of cracks / scratches / patches

    @property
    def scale(self) -> int:
        return 1


def damage(img: torch.Tensor, setting: str | Damage, seed: int = 0, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(damaged img (B, 3, H, W) on 8-bit levels, mask (B, 1, H, W) bool: the pixels the damage changed)."""
    setting = SETTINGS[setting] if isinstance(setting, str) else setting
    if not isinstance(setting, Damage):
        raise ValueError(f"{setting} is not a damage setting")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    pairs = [synthesize_damage(x, generator, setting.kinds, setting.amount) for x in img]
    return quantize(torch.stack([d for d, _ in pairs])), torch.stack([m[None] for _, m in pairs])


# --------------------------------------------------------------------------------------------------
# Named settings and the entry point

SETTINGS: dict[str, Setting | RealESRGANConfig | Damage] = {
    "sr4": Setting(scale=4),
    "sr8": Setting(scale=8),
    "sr4-blur2": Setting(scale=4, blur_sigma=2.0),
    "sr4-blur2-noise": Setting(scale=4, blur_sigma=2.0, noise_sigma=10.0),
    "sr4-blur2-noise20-jpeg50": Setting(scale=4, blur_sigma=2.0, noise_sigma=20.0, jpeg_quality=50),
    "jpeg30": Setting(scale=1, jpeg_quality=30),
    "realesrgan": REALESRGAN,
    "cracks": Damage(),
    "cracks-paint": Damage(("cracks", "scratches", "missing")),
}


def degrade(img: torch.Tensor, setting: str | Setting | RealESRGANConfig | Damage, seed: int = 0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """LQ version of img (B, 3, H, W) in [0, 1], at (H // s, W // s) for the setting's scale s, on 8-bit
    levels. Random draws come from `generator` when given (it advances), else from one seeded with `seed`."""
    setting = SETTINGS[setting] if isinstance(setting, str) else setting
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) image, got {tuple(img.shape)}")
    if min(img.shape[-2:]) < setting.scale:
        raise ValueError(f"image {tuple(img.shape[-2:])} is smaller than the scale factor {setting.scale}")
    if isinstance(setting, RealESRGANConfig):
        return realesrgan_degrade(img, generator, setting)
    if isinstance(setting, Damage):
        return damage(img, setting, generator=generator)[0]
    return apply_setting(img, setting, generator)


# --------------------------------------------------------------------------------------------------
# Files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def image_seed(seed: int, name: str) -> int:
    """Per-file seed from the base seed and the file name (not from which other files are in the folder).
    32 bits, because torch's CPU generator (mt19937) only uses the low 32 bits of a seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


if __name__ == "__main__":  # python -m mini_supir.degrade: the command line lives in degrade_cli.py
    from .degrade_cli import main
    sys.exit(main())
