"""Tiled sampling (SUPIR's TiledRestoreEDMSampler / TiledRestoreDPMPP2MSampler) as a denoiser wrapper.

The reference runs each sampler STEP on overlapping windows of the latent and blends the step results with a
Gaussian mask (SUPIR/sgm/modules/diffusionmodules/sampling.py:L632-L659, L698-L729). Every step of our
samplers is affine in the denoised estimate, with coefficients that are the same for every window (and the
noise, x and x_center are one full-size tensor cut to the windows); CFG is linear and the restoration pull
affine. So blending the step results is stepping with the blended estimate, and the tiling can live here, in
the denoiser, instead of in every sampler loop.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Window = tuple[int, int, int, int]  # (row start, row end, column start, column end) in latent pixels


def sliding_windows(h: int, w: int, tile: int, stride: int) -> list[Window]:
    """Row-major windows; starts 0, stride, ... plus one flush with the far edge if the stride does not land
    there (sampling.py:L753-L766). A side shorter than `tile` gets one window of its full length (the reference
    produces negative starts there)."""
    if not 0 < stride <= tile:
        raise ValueError(f"need 0 < stride <= tile, got stride {stride}, tile {tile}")

    def starts(size: int, t: int) -> list[int]:
        s = list(range(0, size - t + 1, stride))
        return s + [size - t] if (size - t) % stride else s

    th, tw = min(tile, h), min(tile, w)
    return [(hi, hi + th, wi, wi + tw) for hi in starts(h, th) for wi in starts(w, tw)]


def gaussian_weights(height: int, width: int | None = None, var: float = 0.01) -> torch.Tensor:
    """SUPIR's tile blending mask (float64, (height, width); sampling.py:L733-L750).

    Quirk kept from the reference: the row centre is height / 2 but the column centre (width - 1) / 2, so the
    mask is symmetric left/right but not top/bottom.
    """
    width = height if width is None else width

    def bell(n: int, mid: float) -> torch.Tensor:
        c = torch.arange(n, dtype=torch.float64)
        return torch.exp(-(c - mid) ** 2 / (n * n) / (2 * var)) / np.sqrt(2 * np.pi * var)

    return bell(height, height / 2)[:, None] * bell(width, (width - 1) / 2)[None, :]


class TiledDenoiser:
    """D(x, sigma, cond, control_scale) on every `size` x `size` window (stride default size // 2), blended with
    `gaussian_weights`. The network only ever sees one window; cond["control"] (the LQ latent, and in repair the
    known latent and mask packed with it) is cut to the window like x, the text conditioning is shared.

    The reference writes c's control window into uc as well (sampling.py:L640-L641): the same numbers, as
    SUPIR's uc and c hold the same LQ latent.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], size: int, stride: int | None = None):
        self.denoiser, self.size, self.stride = denoiser, size, stride or size // 2

    def __call__(self, x: torch.Tensor, sigma, cond: dict[str, torch.Tensor], control_scale: float = 1.0
                 ) -> torch.Tensor:
        windows = sliding_windows(x.shape[-2], x.shape[-1], self.size, self.stride)
        top, bottom, left, right = windows[0]
        weight = gaussian_weights(bottom - top, right - left).to(x)
        out, count = torch.zeros_like(x), x.new_zeros(x.shape[-2:])
        for top, bottom, left, right in windows:
            win = (..., slice(top, bottom), slice(left, right))
            d = self.denoiser(x[win], sigma, {**cond, "control": cond["control"][win]}, control_scale)
            out[win] += d * weight
            count[win] += weight
        return out / count
