"""Full-reference image quality metrics: PSNR, SSIM (RGB or BT.601 Y) and LPIPS v0.1 (AlexNet).

Images are float tensors (B, 3, H, W). PSNR and SSIM take values in [0, data_range] (1.0 by default) and
return one number per image, shape (B,), computed in float64:

- PSNR = 10 log10(data_range^2 / MSE), the MSE taken over all pixels and channels of an image (as
  `skimage.metrics.peak_signal_noise_ratio` and BasicSR do).
- SSIM is Wang et al. (2004) with an 11x11 Gaussian window of sigma 1.5 (radius int(3.5 sigma + 0.5) = 5),
  K1 = 0.01, K2 = 0.03, population (not sample) covariances, the SSIM map averaged over the positions where
  the window lies fully inside the image, then over channels. That is `skimage.metrics.structural_similarity(
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=..., channel_axis=...)`, and also
  BasicSR's `calculate_ssim` (OpenCV 11x11 window, valid region).
- `y_channel=True` compares luma only: Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 for RGB in [0, 1]
  (ITU-R BT.601 studio range, as BasicSR's `to_y_channel`), so Y lies in [16/255, 235/255] and data_range
  stays 1.
- `crop_border=c` drops c pixels on every side first (SR convention: crop = the scale factor).

LPIPS follows the `lpips` package (v0.1, net='alex'): inputs in [-1, 1] (or [0, 1] with normalize=True),
returns shape (B,). The AlexNet backbone (torchvision's ImageNet weights) and the five linear heads are
downloaded only by `LPIPS.from_pretrained`, never at import.
"""
from pathlib import Path

import torch
import torch.nn as nn

# --------------------------------------------------------------------------------------------------
# PSNR / SSIM


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) BT.601 studio-range luma in [16/255, 235/255]."""
    weights = img.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (16.0 + (img * weights).sum(1, keepdim=True)) / 255.0


def _prepare(a: torch.Tensor, b: torch.Tensor, crop_border: int, y_channel: bool):
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def psnr(a: torch.Tensor, b: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
         data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, shape (B,); inf for identical images."""
    a, b = _prepare(a, b, crop_border, y_channel)
    mse = (a - b).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(sigma: float, truncate: float = 3.5) -> list[float]:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's rule; 5 for sigma 1.5 -> 11 taps
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).tolist()


def _filter_valid(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """Separable correlation with a 1-D window along H, then W, keeping the 'valid' region only.
    (A running sum of shifted views: several times faster than a float64 depthwise conv on CPU.)"""
    for dim in (-2, -1):
        size = x.shape[dim] - len(taps) + 1
        out = x.narrow(dim, 0, size) * taps[0]
        for i, tap in enumerate(taps[1:], start=1):
            out.add_(x.narrow(dim, i, size), alpha=tap)
        x = out
    return x


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM (B,C,H-2r,W-2r) over the 'valid' region where the Gaussian window lies inside the image
    (skimage filters with reflect padding, then crops (win_size - 1) / 2 on each side)."""
    taps = _gaussian_window(sigma)
    if min(a.shape[-2:]) < len(taps):
        raise ValueError(f"image {tuple(a.shape[-2:])} is smaller than the {len(taps)}x{len(taps)} SSIM window")
    moments = _filter_valid(torch.cat([a, b, a * a, b * b, a * b], dim=1), taps)
    mu_a, mu_b, aa, bb, ab = moments.chunk(5, dim=1)
    var_a, var_b, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
         data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity per image, shape (B,) (see the module docstring for the convention)."""
    a, b = _prepare(a, b, crop_border, y_channel)
    return ssim_map(a, b, data_range, sigma).mean(dim=(2, 3)).mean(1)


# --------------------------------------------------------------------------------------------------
# LPIPS v0.1, AlexNet (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
# Perceptual Metric")

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_HEADS_URL = ("https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/"
                   "lpips/weights/v0.1/alex.pth")
# The package's per-channel input scaling for images in [-1, 1] (ImageNet statistics mapped to [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
TAPS = (1, 4, 7, 9, 11)  # indices of the five ReLUs in AlexNet's `features` whose outputs are compared
TAP_CHANNELS = (64, 192, 384, 256, 256)


class LinearHead(nn.Module):
    """A learned non-negative 1x1 channel weighting of one layer's squared feature difference."""

    def __init__(self, channels: int):
        super().__init__()
        # Slot 0 is the package's dropout, used only while the heads were trained; the identity keeps the
        # checkpoint key `model.1.weight`.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with AlexNet features. Keys: `features.{0,3,6,8,10}.*` (torchvision's AlexNet
    names) and `lin{0..4}.model.1.weight` (the names inside the lpips package's `weights/v0.1/alex.pth`)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(  # torchvision's AlexNet `features` up to its last ReLU
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )
        for k, channels in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{k}", LinearHead(channels))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs, each unit-normalised over channels at every position."""
        shift = torch.tensor(LPIPS_SHIFT, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        scale = torch.tensor(LPIPS_SCALE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - shift) / scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, in0: torch.Tensor, in1: torch.Tensor, normalize: bool = False,
                return_layers: bool = False):
        """Distance (B,) between images in [-1, 1] ([0, 1] with normalize=True). With return_layers, also
        the list of the five per-layer terms (B,) that sum to it."""
        if normalize:
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        layers = [getattr(self, f"lin{k}")((f0 - f1).square()).mean(dim=(1, 2, 3))
                  for k, (f0, f1) in enumerate(zip(self.taps(in0), self.taps(in1)))]
        distance = sum(layers)
        return (distance, layers) if return_layers else distance

    @classmethod
    def from_pretrained(cls, alexnet: str | Path | None = None, heads: str | Path | None = None,
                        download: bool = True) -> "LPIPS":
        """The real metric: torchvision's ImageNet AlexNet + the lpips v0.1 heads, in eval mode, frozen.
        Paths default to files in torch.hub's cache (`$TORCH_HOME/hub/checkpoints`, shared with
        torchvision), fetched from their public URLs when missing and `download` is true."""
        alexnet = Path(alexnet) if alexnet else cached_file(ALEXNET_URL, "alexnet-owt-7be5be79.pth", download,
                                                            hash_prefix="7be5be79")
        heads = Path(heads) if heads else cached_file(LPIPS_HEADS_URL, "lpips-v0.1-alex.pth", download)
        state = torch.load(alexnet, map_location="cpu", weights_only=True)
        state.update(torch.load(heads, map_location="cpu", weights_only=True))
        with torch.device("meta"):
            model = cls()
        model.load_state_dict(lpips_state_dict(state), strict=True, assign=True)
        return model.eval().requires_grad_(False)


def lpips_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys from torchvision's AlexNet file and/or the lpips package's: AlexNet's `classifier.*` is not
    part of the metric, and `lins.{k}.*` is the package's ModuleList alias of `lin{k}.*` (same tensors)."""
    return {k: v for k, v in state.items() if not k.startswith(("classifier.", "lins."))}


def cached_file(url: str, filename: str, download: bool = True, hash_prefix: str | None = None) -> Path:
    """Path of `filename` in torch.hub's checkpoint cache, downloading `url` there first if needed."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.exists():
        return path
    if not download:
        raise FileNotFoundError(f"{path} not found; download {url} there or pass its path")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # torch.hub writes to a temporary file and renames it, so a failed download leaves nothing behind
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=True)
    except OSError as e:  # urllib's URLError and socket errors (offline, DNS, refused) are OSErrors
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"could not download {url} ({reason}); offline? fetch it by hand to {path} "
                           f"or pass its path") from None
    return path
