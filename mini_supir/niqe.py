"""NIQE, the no-reference "Natural Image Quality Evaluator" (Mittal, Soundararajan & Bovik 2013, "Making a
completely blind image quality analyzer"); lower = more natural.

This reproduces BasicSR 1.4.2's `calculate_niqe(img, crop_border, convert_to='y')` (basicsr/metrics/niqe.py)
to ~1e-13, including its float32 steps, which move NIQE by up to 0.09 against a float64 (MATLAB-like) run:

1. MATLAB BT.601 luma Y = 16 + 65.481 R + 128.553 G + 24.966 B (RGB in [0, 1]), rounded to integers;
2. drop `crop_border` px per side, then keep the top-left whole 96x96 blocks (no overlap);
3. per block 18 features of the MSCN coefficients (mean-subtracted, contrast-normalised with a 7x7 Gaussian)
   and of their products with the right / lower / lower-right / lower-left neighbours: the shape and spreads
   of an asymmetric generalised Gaussian (AGGD) fitted by grid search; at full scale and on MATLAB's
   `imresize(Y, 0.5)` (bicubic, antialiased) with 48x48 blocks;
4. a Gaussian fit to the 36-d block features against the authors' pristine model (`data/niqe_pris_params.npz`):
   sqrt(d pinv((cov_p + cov_d) / 2) d^T), d = mu_p - mu_d.
"""
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

BLOCK = 96  # the block size the pristine model was fitted with
PARAMS = Path(__file__).parent / "data" / "niqe_pris_params.npz"
_gamma = np.vectorize(math.gamma, otypes=[np.float64])


@lru_cache(maxsize=1)
def _pristine() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(PARAMS) as p:
        return p["mu_pris_param"][0], p["cov_pris_param"], p["gaussian_window"]


@lru_cache(maxsize=1)
def _aggd_grid() -> tuple[np.ndarray, np.ndarray]:
    # candidate shapes 0.2:0.001:10 and their ratio Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)), built like
    # basicsr/metrics/niqe.py:estimate_aggd_param (same np.arange, so the same float grid)
    alpha = np.arange(0.2, 10.001, 0.001)
    inv = 1 / alpha
    return alpha, _gamma(2 * inv) ** 2 / (_gamma(inv) * _gamma(3 * inv))


def _moments(v: np.ndarray) -> tuple[float, float, float]:
    """Left / right std and the normalised ratio r^ of one flat float32 sample (Eqs. 5-6 of Lasmar et al.).

    float32 numpy means on the same 1-D arrays as basicsr/metrics/niqe.py:estimate_aggd_param, so the
    grid search below picks the same shape even when r^ falls close to a midpoint of two grid values.
    """
    with np.errstate(invalid="ignore", divide="ignore"):  # no negatives (or positives): NaN, as in BasicSR
        left, right = np.sqrt(np.mean(v[v < 0] ** 2)), np.sqrt(np.mean(v[v > 0] ** 2))
        g = left / right
        rhat = np.mean(np.abs(v)) ** 2 / np.mean(v ** 2)
        return left, right, rhat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2


def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching AGGD fit of each row of x (N, M) -> shape alpha, left and right spreads (N,) each."""
    left, right, rhat_norm = np.array([_moments(v) for v in x], dtype=np.float64).T
    grid, ratio = _aggd_grid()
    alpha = grid[np.argmin((ratio - rhat_norm[:, None]) ** 2, axis=1)]  # all-NaN row -> index 0, like np.argmin
    spread = np.sqrt(_gamma(1 / alpha) / _gamma(3 / alpha))
    return alpha, left * spread, right * spread


def _features(blocks: np.ndarray) -> np.ndarray:
    """(N, h, w) MSCN blocks -> (N, 18) features, as basicsr/metrics/niqe.py:compute_feature."""
    n = len(blocks)
    alpha, left, right = _aggd(blocks.reshape(n, -1))
    feats = [alpha, (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        # neighbour products; np.roll wraps around inside each block, exactly as BasicSR does
        alpha, left, right = _aggd((blocks * np.roll(blocks, shift, axis=(1, 2))).reshape(n, -1))
        feats += [alpha, (right - left) * (_gamma(2 / alpha) / _gamma(1 / alpha)), left, right]  # Eq. 8: AGGD mean
    return np.stack(feats, axis=1)


def _mscn(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(img - mu) / (sigma + 1), local Gaussian mean and std (Eq. 1 of the paper); float32 in and out.

    As basicsr/metrics/niqe.py:niqe: scipy.ndimage.convolve(mode='nearest') = the flipped window over an
    edge-replicated border, summed in float64 but stored as float32, the rest float32. In flat areas
    sigma^2 = E[x^2] - mu^2 is then pure float32 rounding, which is why float64 here moves NIQE by up to 0.09.
    """
    k = window[::-1, ::-1]
    r, (h, w) = k.shape[0] // 2, img.shape

    def blur(x):
        p = np.pad(x.astype(np.float64), r, mode="edge")
        return sum(k[i, j] * p[i:i + h, j:j + w] for i in range(k.shape[0]) for j in range(k.shape[1])).astype(
            np.float32)

    mu = blur(img)
    sigma = np.sqrt(np.abs(blur(img * img) - mu * mu))
    return (img - mu) / (sigma + np.float32(1))


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic (a = -0.5), MATLAB's bicubic kernel."""
    x = np.abs(x)
    return np.where(x <= 1, 1.5 * x ** 3 - 2.5 * x ** 2 + 1,
                    np.where(x <= 2, -0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2, 0.0))


@lru_cache(maxsize=1)
def _halve_taps() -> torch.Tensor:
    # imresize by 1/2: output i (0-based) sits at input 2i + 0.5; antialiasing stretches the cubic to width 8,
    # so it reads inputs 2i-3 .. 2i+4 at distances 3.5 .. -3.5 (basicsr/utils/matlab_functions.py:
    # calculate_weights_indices). The weights are exact dyadic numbers (-3, -9, 29, 111, ...) / 256.
    w = 0.5 * _cubic(0.5 * np.arange(3.5, -4, -1))
    return torch.tensor(w / w.sum(), dtype=torch.float32)


def _halve(y: np.ndarray) -> np.ndarray:
    """MATLAB imresize(y, 0.5) (bicubic, antialiased) on an even-sized image, unrounded and unclipped.

    Done in float32 torch with the same calls as basicsr/utils/matlab_functions.py:imresize (values / 255,
    symmetric 3-px border, one matrix-vector product per output row, then per output column): BasicSR's
    float32 MSCN of nearly flat areas amplifies the last bit of this image, so only the same BLAS arithmetic
    reproduces its NIQE to 1e-6 (a float64 resize moves it by up to 3e-3).
    """
    w = _halve_taps()
    x = torch.from_numpy(y / np.float32(255))
    p = torch.cat([x[:3].flip(0), x, x[-3:].flip(0)], 0)
    x = torch.stack([p[2 * i:2 * i + 8].T.mv(w) for i in range(x.shape[0] // 2)], 0)
    p = torch.cat([x[:, :3].flip(1), x, x[:, -3:].flip(1)], 1)
    x = torch.stack([p[:, 2 * i:2 * i + 8].mv(w) for i in range(x.shape[1] // 2)], 1)
    return x.numpy() * np.float32(255)


def _blocks(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W) -> (N, size, size), column of blocks by column (BasicSR's loop order)."""
    h, w = img.shape
    return img.reshape(h // size, size, w // size, size).transpose(2, 0, 1, 3).reshape(-1, size, size)


def niqe(image: np.ndarray, crop_border: int = 0) -> float:
    """NIQE of an RGB (H, W, 3) or luma (H, W) uint8 image, as BasicSR's calculate_niqe(convert_to='y')."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"niqe expects an (H, W, 3) RGB or (H, W) uint8 image, got {image.dtype} {image.shape}")
    if image.ndim == 3:  # MATLAB rgb2ycbcr's Y, in BasicSR's float32 / float64 steps (to_y_channel, bgr2ycbcr)
        bgr = image[..., ::-1].astype(np.float32) / np.float32(255)
        y = ((bgr @ np.array([24.966, 128.553, 65.481]) + 16) / 255).astype(np.float32) * np.float32(255)
    else:
        y = image.astype(np.float32)
    if crop_border:
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    h, w = (s // BLOCK * BLOCK for s in y.shape)
    if h * w < 2 * BLOCK * BLOCK:  # one block has no covariance (BasicSR dies in pinv / imresize)
        raise ValueError(f"NIQE needs at least two {BLOCK}x{BLOCK} blocks (e.g. {BLOCK}x{2 * BLOCK} px) after "
                         f"crop_border={crop_border}, got {y.shape[0]}x{y.shape[1]} px")
    y = np.round(y[:h, :w])  # calculate_niqe rounds Y "for consistency with MATLAB"
    mu_p, cov_p, window = _pristine()
    feats = np.concatenate([_features(_blocks(_mscn(y, window), BLOCK)),
                            _features(_blocks(_mscn(_halve(y), window), BLOCK // 2))], axis=1)
    mu_d = np.nanmean(feats, axis=0)
    cov_d = np.cov(feats[~np.isnan(feats).any(axis=1)], rowvar=False)  # MATLAB's nancov: drop rows with NaN
    d = mu_p - mu_d
    return float(np.sqrt(d @ np.linalg.pinv((cov_p + cov_d) / 2) @ d))
