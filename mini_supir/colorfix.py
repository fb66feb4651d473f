"""SUPIR's colour correction of the restored image towards the stage-1 image (SUPIR/utils/colorfix.py).

Both fixes take `content` (the decoded restoration) and `style` (the decoded stage-1 image, whose colours are
trusted), (B, C, H, W) in [-1, 1], any B and C, and return the corrected content.
"""
import torch
import torch.nn.functional as F


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """3x3 binomial blur [1,2,1]x[1,2,1]/16 with dilation `radius` (one level of an a-trous wavelet transform)."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=image.dtype, device=image.device) / 16
    channels = image.shape[1]
    image = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(image, kernel.expand(channels, 1, 3, 3), groups=channels, dilation=radius)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): `low` is the image blurred at radii 1, 2, ..., 2**(levels-1); `high` = image - low,
    accumulated level by level as the reference does."""
    high = torch.zeros_like(image)
    for i in range(levels):
        low = wavelet_blur(image, 2 ** i)
        high += image - low
        image = low
    return high, low


def wavelet_reconstruction(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Wavelet colour fix: the content's detail (high frequencies) over the style's low frequencies."""
    return wavelet_decomposition(content)[0] + wavelet_decomposition(style)[1]


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(*x.shape[:2], -1)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]  # unbiased var


def adaptive_instance_normalization(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """AdaIN colour fix: give each channel of `content` the mean and std of the same channel of `style`."""
    content_mean, content_std = _mean_std(content)
    style_mean, style_std = _mean_std(style)
    return (content - content_mean) / content_std * style_std + style_mean


wavelet_color_fix = wavelet_reconstruction
adain_color_fix = adaptive_instance_normalization
