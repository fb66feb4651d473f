"""Diffusion maths for SUPIR, k-diffusion style: plain functions over a denoiser D(x, sigma, cond, control_scale).

- LegacyDDPM discretisation (SDXL's 1000-step scaled-linear betas), Karras and "trailing" (SDXL-Lightning)
  schedules.
- `Denoiser`: sgm's DiscreteDenoiserWithControl: sigma snapped to the nearest of the 1000 training sigmas,
  eps-parameterised network, D(x, sigma) = x - sigma_q * eps(x / sqrt(sigma_q^2 + 1), t_q).
- Samplers, each a per-step function plus one loop that runs it on the whole latent or tile by tile:
  SUPIR's restore EDM sampler (Euler with churn, linear CFG, restoration guidance towards the stage-1 latent),
  the restore DPM++ 2M SDE sampler (Karras sigmas, SUPIR's Lightning config) and plain Euler on trailing
  timesteps for SDXL-Lightning checkpoints.

All per-step numbers (sigmas, CFG and control scales, solver coefficients) are computed once on the host in
float32 with the reference's operation order, so the loop never reads back from the device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch

Cond = dict[str, torch.Tensor]  # {"crossattn": (B, 77, C), "vector": (B, adm), "control": (B, 4, h, w) LQ latent}
Window = tuple[int, int, int, int]  # (row start, row end, column start, column end) in latent pixels

# The reference hard-codes this rounded LegacyDDPM sigma_max (the exact value is 14.614641) in LinearCFG and in
# the control / restoration schedules; using the rounded value reproduces its numbers (incl. the tiny overshoot
# of the linear control scale at the first step).
SIGMA_MAX = 14.6146


# ----------------------------------------------------------------------------------------------------------
# Discretisation


def legacy_ddpm_alphas_cumprod(num_timesteps: int = 1000, linear_start: float = 0.00085,
                               linear_end: float = 0.012) -> torch.Tensor:
    """SD/SDXL "scaled linear" schedule: betas linear in sqrt space; cumulative product of 1 - beta (float64)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _sigmas_at(timesteps: torch.Tensor) -> torch.Tensor:
    ac = legacy_ddpm_alphas_cumprod()[timesteps]
    # The ratio goes to float32 BEFORE the square root, exactly as sgm does.
    return ((1.0 - ac) / ac).float() ** 0.5


def legacy_ddpm_timesteps(n: int, num_timesteps: int = 1000) -> torch.Tensor:
    """sgm's roughly equally spaced training steps for an n-step schedule, ascending (n=4 -> [249, 499, 749, 999])."""
    if n == num_timesteps:
        return torch.arange(n)
    if not 0 < n < num_timesteps:
        raise ValueError(f"need 0 < n <= {num_timesteps}, got {n}")
    steps = np.linspace(num_timesteps - 1, 0, n, endpoint=False).astype(np.int64)[::-1]
    return torch.from_numpy(steps.copy())


def legacy_ddpm_sigmas(n: int) -> torch.Tensor:
    """The samplers' schedule: n sigmas descending from 14.614641, then a 0 (float32, n + 1 values)."""
    return torch.cat([_sigmas_at(legacy_ddpm_timesteps(n)).flip(0), torch.zeros(1)])


def denoiser_sigmas() -> torch.Tensor:
    """The denoiser's table: the 1000 training sigmas, ascending (index = integer timestep), float32."""
    return _sigmas_at(torch.arange(1000))


def karras_sigmas(sigma_min, sigma_max, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: n sigmas interpolated linearly in sigma^(1/rho), then a 0 (float32).

    Same float32 operations as k_diffusion.get_sigmas_karras with 0-dim float32 endpoints (what SUPIR passes).
    """
    sigma_min = torch.as_tensor(sigma_min, dtype=torch.float32)
    sigma_max = torch.as_tensor(sigma_max, dtype=torch.float32)
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, torch.zeros(1)])


def restore_dpmpp2m_sigmas(n: int) -> torch.Tensor:
    """SUPIR's DPM++ schedule: Karras between the smallest and largest sigma of the n-step LegacyDDPM schedule."""
    legacy = legacy_ddpm_sigmas(n)
    return karras_sigmas(legacy[-2], legacy[0], n)


def trailing_timesteps(n: int, num_timesteps: int = 1000) -> torch.Tensor:
    """"Trailing" spacing (Lin et al. 2024, "Common diffusion noise schedules..."; SDXL-Lightning): n steps that
    start at the last training step, descending (n=4 -> [999, 749, 499, 249])."""
    if not 0 < n <= num_timesteps:
        raise ValueError(f"need 0 < n <= {num_timesteps}, got {n}")
    steps = np.round(num_timesteps - np.arange(n) * (num_timesteps / n)).astype(np.int64) - 1
    return torch.from_numpy(steps)


def trailing_sigmas(n: int) -> torch.Tensor:
    """Sigmas of `trailing_timesteps(n)` (descending, exact entries of the denoiser table), then a 0."""
    return torch.cat([_sigmas_at(trailing_timesteps(n)), torch.zeros(1)])


# ----------------------------------------------------------------------------------------------------------
# Denoiser


class Denoiser:
    """D(x, sigma) for an eps-prediction network trained on the 1000 discrete LegacyDDPM steps.

    `network(x_in, timesteps, context, y, control_latent, control_scale) -> eps` is the ControlledUNet
    interface; `cond` carries "crossattn", "vector" and "control" (the LQ latent, NOT scaled by c_in).
    The sigma is snapped to the nearest training sigma (first index on ties), whose index is the integer
    timestep the network sees; EpsScaling: c_in = 1 / sqrt(sigma_q^2 + 1), c_out = -sigma_q, c_skip = 1.
    """

    def __init__(self, network: Callable[..., torch.Tensor]):
        self.network = network
        self._tables: dict[torch.device, torch.Tensor] = {}

    def sigma_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        device = torch.device(device)
        if device not in self._tables:  # built lazily: the network may live on any device (or be built on meta)
            self._tables[device] = denoiser_sigmas().to(device)
        return self._tables[device]

    def quantize(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) sigmas -> (integer timestep, snapped sigma)."""
        table = self.sigma_table(sigma.device)
        idx = (sigma.float()[None] - table[:, None]).abs().argmin(dim=0)
        return idx, table[idx]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond,
                 control_scale: float = 1.0) -> torch.Tensor:
        if not torch.is_tensor(sigma):
            sigma = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        idx, sigma_q = self.quantize(sigma)
        s = sigma_q.view(-1, *[1] * (x.ndim - 1))
        eps = self.network(x * (1 / (s ** 2 + 1.0) ** 0.5), idx, cond["crossattn"], cond["vector"],
                           cond["control"], control_scale)
        return eps * -s + x


def cfg_denoise(denoiser, x: torch.Tensor, sigma: float, cond: Cond, uncond: Cond | None, cfg_scale: float,
                control_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance with ONE denoiser call on [x; x] with cond [uc; c]: u + scale * (c - u).

    Returns (guided estimate, raw denoiser output). Without `uncond` the denoiser runs once, unguided.
    """
    if uncond is None:
        out = denoiser(x, sigma, cond, control_scale)
        return out, out
    out = denoiser(torch.cat([x, x]), sigma, {k: torch.cat([uncond[k], cond[k]]) for k in cond}, control_scale)
    u, c = out.chunk(2)
    return u + cfg_scale * (c - u), out


def _linear_cfg(sigma: torch.Tensor, cfg_scale: float, cfg_scale_start: float | None) -> float:
    """SUPIR's LinearCFG: cfg_scale_start at sigma = 14.6146, falling (or rising) linearly to cfg_scale at 0."""
    if cfg_scale_start is None:
        return float(cfg_scale)
    return ((cfg_scale_start - cfg_scale) * sigma / SIGMA_MAX + cfg_scale).item()  # float32, as the reference


# ----------------------------------------------------------------------------------------------------------
# Restore EDM sampler (Karras et al. 2022, Alg. 2 with Euler steps) + SUPIR's restoration guidance


@dataclass(frozen=True)
class EDMStep:
    sigma: float           # sigma_i of the schedule
    sigma_next: float      # sigma_{i+1}
    sigma_hat: float       # sigma_i * (1 + gamma): what the denoiser sees (it snaps it further)
    churn_std: float       # sqrt(sigma_hat^2 - sigma^2): noise added before the step (0 without churn)
    s_noise: float
    dt: float              # sigma_{i+1} - sigma_hat
    cfg_scale: float
    control_scale: float
    restore_weight: float  # (sigma_i / 14.6146) ** restore_cfg, 0 where restoration guidance is off


def edm_schedule(sigmas: torch.Tensor, *, s_churn: float = 0.0, s_noise: float = 1.003, restore_cfg: float = 4.0,
                 restore_cfg_s_tmin: float = 0.05, cfg_scale: float = 7.5, cfg_scale_start: float | None = None,
                 control_scale: float = 1.0, control_scale_start: float | None = None) -> list[EDMStep]:
    n = len(sigmas) - 1
    gamma = min(s_churn / n, 2 ** 0.5 - 1)
    steps = []
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        s_hat = s * (gamma + 1.0)
        churn = ((s_hat ** 2 - s ** 2) ** 0.5).item() if gamma > 0 else 0.0
        # The reference schedules the control scale on sigma (not sigma_hat) in float64 ...
        cs = control_scale if control_scale_start is None else \
            (s.item() / SIGMA_MAX) * (control_scale_start - control_scale) + control_scale
        # ... and pulls towards x_center on every step but the ones ending at or below restore_cfg_s_tmin.
        restore = ((s / SIGMA_MAX) ** restore_cfg).item() if s_next > restore_cfg_s_tmin and restore_cfg > 0 else 0.0
        steps.append(EDMStep(s.item(), s_next.item(), s_hat.item(), churn, s_noise, (s_next - s_hat).item(),
                             _linear_cfg(s_hat, cfg_scale, cfg_scale_start), cs, restore))
    return steps


def edm_step(denoiser, x: torch.Tensor, st: EDMStep, cond: Cond, uncond: Cond | None,
             x_center: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    if st.churn_std > 0:
        x = x + eps * st.s_noise * st.churn_std
    denoised, model_out = cfg_denoise(denoiser, x, st.sigma_hat, cond, uncond, st.cfg_scale, st.control_scale)
    if st.restore_weight > 0:  # SUPIR eq. 7: move the estimate towards the stage-1 latent, more at high noise
        denoised = denoised - (denoised - x_center) * st.restore_weight
    x = x + st.dt * ((x - denoised) / st.sigma_hat)
    return {"x": x, "denoised": denoised, "model_out": model_out}


# ----------------------------------------------------------------------------------------------------------
# Restore DPM++ 2M SDE sampler (Lu et al. 2022, DPM-Solver++ 2M with k-diffusion's SDE term)


@dataclass(frozen=True)
class DPMStep:
    sigma: float
    sigma_next: float
    cfg_scale: float
    control_scale: float
    m1: float                # first order: x' = m1 * x - m2 * D
    m2: float
    m3: float | None         # second order: D' = m3 * D - m4 * D_prev (None on the first and the last step)
    m4: float | None
    noise_scale: float       # sqrt(1 - exp(-2 eta h)): SDE noise std / sigma_next (0 where no noise is added)
    s_noise: float


def dpmpp2m_schedule(sigmas: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.003, cfg_scale: float = 2.0,
                     cfg_scale_start: float | None = None, control_scale: float = 1.0) -> list[DPMStep]:
    n = len(sigmas) - 1
    t = -sigmas.log()  # t = -log sigma; +inf for the final 0
    steps = []
    for i in range(n):
        h = t[i + 1] - t[i]
        # The reference computes eta * h = 0 * inf = NaN on the last step when eta = 0 (all-NaN sample); with
        # eta_h = 0 the last step is m1 = 0, m2 = -1, i.e. x = D, the deterministic DPM++ 2M limit.
        eta_h = eta * h if eta else torch.zeros(())
        m1 = ((-t[i + 1]).exp() / (-t[i]).exp() * (-eta_h).exp()).item()
        m2 = (-h - eta_h).expm1().item()
        m3 = m4 = None
        noise = 0.0
        if i > 0 and sigmas[i + 1] > 0:
            r = (t[i] - t[i - 1]) / h
            m3, m4 = (1 + 1 / (2 * r)).item(), (1 / (2 * r)).item()
            noise = (-2 * eta_h).expm1().neg().sqrt().item() if eta else 0.0
        steps.append(DPMStep(sigmas[i].item(), sigmas[i + 1].item(), _linear_cfg(sigmas[i], cfg_scale, cfg_scale_start),
                             control_scale, m1, m2, m3, m4, noise, s_noise))
    return steps


def dpmpp2m_step(denoiser, x: torch.Tensor, st: DPMStep, cond: Cond, uncond: Cond | None,
                 old_denoised: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    denoised, model_out = cfg_denoise(denoiser, x, st.sigma, cond, uncond, st.cfg_scale, st.control_scale)
    if st.m3 is None:
        x = st.m1 * x - st.m2 * denoised
    else:
        x = st.m1 * x - st.m2 * (st.m3 * denoised - st.m4 * old_denoised)
        if st.noise_scale > 0:
            x = x + eps * st.sigma_next * st.noise_scale * st.s_noise
    return {"x": x, "denoised": denoised, "model_out": model_out}


# ----------------------------------------------------------------------------------------------------------
# Tiling (SUPIR's tiled samplers: overlapping windows, step results blended with a Gaussian mask)


def sliding_windows(h: int, w: int, tile: int, stride: int) -> list[Window]:
    """Row-major windows; starts 0, stride, ... plus one flush with the far edge if the stride does not land there.

    A side shorter than `tile` gets one window of its full length (the reference produces garbage there).
    """
    if not 0 < stride <= tile:
        raise ValueError(f"need 0 < stride <= tile, got stride {stride}, tile {tile}")

    def starts(size: int, t: int) -> list[int]:
        s = list(range(0, size - t + 1, stride))
        return s + [size - t] if (size - t) % stride else s

    th, tw = min(tile, h), min(tile, w)
    return [(hi, hi + th, wi, wi + tw) for hi in starts(h, th) for wi in starts(w, tw)]


def gaussian_weights(height: int, width: int | None = None, var: float = 0.01) -> torch.Tensor:
    """SUPIR's tile blending mask (float64, (height, width)).

    Quirk kept from the reference: the row centre is height / 2 but the column centre (width - 1) / 2, so the
    mask is symmetric left/right but not top/bottom.
    """
    width = height if width is None else width

    def bell(n: int, mid: float) -> torch.Tensor:
        c = torch.arange(n, dtype=torch.float64)
        return torch.exp(-(c - mid) ** 2 / (n * n) / (2 * var)) / np.sqrt(2 * np.pi * var)

    return bell(height, height / 2)[:, None] * bell(width, (width - 1) / 2)[None, :]


def _cut(t: torch.Tensor, win: Window) -> torch.Tensor:
    return t[..., win[0]:win[1], win[2]:win[3]]


def _stack(t: torch.Tensor | None, wins: list[Window]) -> torch.Tensor | None:
    return None if t is None else torch.cat([_cut(t, win) for win in wins])


def _stack_conds(conds: list[Cond], wins: list[Window]) -> Cond:
    """Per-window conds batched like `_stack`: "control" (the LQ latent) is cut to each window."""
    return {k: torch.cat([_cut(c[k], win) if k == "control" else c[k] for c, win in zip(conds, wins)])
            for k in conds[0]}


class Tiles:
    """SUPIR's tiled sampling: a step runs on every window (`batch` windows per denoiser call), each reading the
    same latent, and the step RESULTS ("x", "denoised") are blended with the Gaussian mask."""

    def __init__(self, x: torch.Tensor, size: int, stride: int | None = None, batch: int = 1):
        self.windows = sliding_windows(x.shape[-2], x.shape[-1], size, stride or size // 2)
        win = self.windows[0]
        self.weight = gaussian_weights(win[1] - win[0], win[3] - win[2]).to(x)
        self.count = torch.zeros(x.shape[-2:], dtype=x.dtype, device=x.device)
        for win in self.windows:
            _cut(self.count, win).add_(self.weight)
        self.batch = batch

    def __call__(self, fn, x: torch.Tensor, cond: Cond | list[Cond], uncond: Cond | None,
                 inputs: dict[str, torch.Tensor | None], on_tile=None) -> dict[str, torch.Tensor]:
        if isinstance(cond, list) and len(cond) != len(self.windows):
            raise ValueError(f"{len(cond)} local prompts for {len(self.windows)} windows")
        acc = {"x": torch.zeros_like(x), "denoised": torch.zeros_like(x)}
        b = x.shape[0]
        for first in range(0, len(self.windows), self.batch):
            wins = self.windows[first:first + self.batch]
            conds = cond[first:first + len(wins)] if isinstance(cond, list) else [cond] * len(wins)
            out = fn(x=_stack(x, wins), cond=_stack_conds(conds, wins),
                     uncond=None if uncond is None else _stack_conds([uncond] * len(wins), wins),
                     **{k: _stack(v, wins) for k, v in inputs.items()})
            for k, win in enumerate(wins):
                tile = {name: out[name][k * b:(k + 1) * b] for name in acc}
                for name in acc:
                    _cut(acc[name], win).add_(tile[name] * self.weight)
                if on_tile is not None:  # model_out is [uncond tiles; cond tiles]: regroup as this tile's [u; c]
                    model_out = out["model_out"].unflatten(0, (-1, len(wins), b))[:, k].flatten(0, 1)
                    on_tile(first + k, {**tile, "model_out": model_out, "window": win})
        return {name: a / self.count for name, a in acc.items()}


# ----------------------------------------------------------------------------------------------------------
# Sampling loops


def _noise_source(eps_fn, generator: torch.Generator | None, like: torch.Tensor) -> Callable[[int], torch.Tensor]:
    if eps_fn is not None:
        return eps_fn
    # Drawn on the generator's device, so a CPU generator reproduces the same sample on any accelerator.
    return lambda step: torch.randn(like.shape, generator=generator, dtype=torch.float32,
                                    device=generator.device if generator is not None else like.device).to(like)


def _loop(step_fn, steps, x, cond, uncond, inputs_for, tile_size, tile_stride, tile_batch_size, callback,
          tile_callback):
    """The one loop all samplers share: each step on the whole latent, or on every tile and blended."""
    tiles = None if tile_size is None else Tiles(x, tile_size, tile_stride, tile_batch_size)
    if tiles is None and isinstance(cond, list):
        raise ValueError("per-window conds (local prompts) need tile_size")
    state = {}
    for i, st in enumerate(steps):
        inputs = inputs_for(i, st, state)
        if tiles is None:
            state = step_fn(x=x, st=st, cond=cond, uncond=uncond, **inputs)
        else:
            on_tile = None if tile_callback is None else partial(tile_callback, i)
            state = tiles(partial(step_fn, st=st), x, cond, uncond, inputs, on_tile)
        x = state["x"]
        if callback is not None:
            callback(i, {**asdict(st), **state})
    return x


@torch.no_grad()
def sample_restore_edm(denoiser, noise: torch.Tensor, x_center: torch.Tensor | None, cond: Cond | list[Cond],
                       uncond: Cond | None = None, *, num_steps: int = 50, sigmas: torch.Tensor | None = None,
                       s_churn: float = 0.0, s_noise: float = 1.003, restore_cfg: float = 4.0,
                       restore_cfg_s_tmin: float = 0.05, cfg_scale: float = 7.5, cfg_scale_start: float | None = None,
                       control_scale: float = 1.0, control_scale_start: float | None = None,
                       tile_size: int | None = None, tile_stride: int | None = None, tile_batch_size: int = 1,
                       eps_fn: Callable[[int], torch.Tensor] | None = None, generator: torch.Generator | None = None,
                       callback=None, tile_callback=None) -> torch.Tensor:
    """SUPIR's RestoreEDMSampler (and TiledRestoreEDMSampler with `tile_size`).

    noise: (B, 4, h, w) standard normal (scaled here by sqrt(1 + sigma_0^2), never modified in place).
    x_center: the stage-1 latent the restoration guidance pulls towards ((sigma/14.6146)^restore_cfg; off for
        restore_cfg <= 0, where x_center may be None).
    cond / uncond: see `Denoiser`; uncond=None runs without CFG. With tiling, `cond` may be a list with one
        dict per window (local prompts); every dict's own "control" is cut to the window. (The reference uses
        the FIRST cond's control for all windows and for uncond: the same numbers whenever, as in SUPIR, they
        all hold the one LQ latent.)
    sigmas: override the LegacyDDPM `num_steps` schedule (descending, ending in 0).
    cfg_scale / cfg_scale_start: guidance at sigma = 0 / at sigma = 14.6146, linear in between (LinearCFG with
        scale = cfg_scale_start, scale_min = cfg_scale); start None = constant.
    control_scale / control_scale_start: the same linear schedule for the control strength (on sigma, not
        sigma_hat).
    tile_size / tile_stride / tile_batch_size: latent tile size, stride (default size // 2) and how many
        windows share one denoiser call.
    eps_fn(step) -> full-latent churn noise, else drawn from `generator` (only when s_churn > 0).
    callback(step, info): info = the EDMStep fields + "x" (after the step), "denoised" (guided, after the
        restoration pull; blended when tiled) and, untiled, "model_out" (raw denoiser output, [uc; c]).
    tile_callback(step, window_index, info): per-window "x", "denoised", "model_out", "window".
    """
    sigmas = legacy_ddpm_sigmas(num_steps) if sigmas is None else sigmas
    steps = edm_schedule(sigmas, s_churn=s_churn, s_noise=s_noise, restore_cfg=restore_cfg,
                         restore_cfg_s_tmin=restore_cfg_s_tmin, cfg_scale=cfg_scale, cfg_scale_start=cfg_scale_start,
                         control_scale=control_scale, control_scale_start=control_scale_start)
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2.0).item()
    draw = _noise_source(eps_fn, generator, x)

    def inputs_for(i, st, state):
        return {"x_center": x_center, "eps": draw(i) if st.churn_std > 0 else None}

    return _loop(partial(edm_step, denoiser), steps, x, cond, uncond, inputs_for, tile_size, tile_stride,
                 tile_batch_size, callback, tile_callback)


@torch.no_grad()
def sample_lightning(denoiser, noise: torch.Tensor, x_center: torch.Tensor | None, cond: Cond | list[Cond],
                     uncond: Cond | None = None, *, num_steps: int = 4, cfg_scale: float = 1.0,
                     restore_cfg: float = 0.0, **kwargs) -> torch.Tensor:
    """Euler on "trailing" timesteps (999, 749, 499, 249 for 4 steps), as SDXL-Lightning's 2/4/8-step
    checkpoints were distilled for; uncond=None (default) runs without CFG (Lightning is distilled without it).
    The start noise is scaled by sqrt(1 + sigma_0^2) (diffusers uses sigma_0; 14.65 vs 14.61).
    The 1-step Lightning checkpoint predicts x0, not eps, and is not supported by `Denoiser`.
    Other keyword arguments as `sample_restore_edm` (no churn: plain Euler)."""
    return sample_restore_edm(denoiser, noise, x_center, cond, uncond, sigmas=trailing_sigmas(num_steps),
                              cfg_scale=cfg_scale, restore_cfg=restore_cfg, **kwargs)


@torch.no_grad()
def sample_restore_dpmpp2m(denoiser, noise: torch.Tensor, cond: Cond | list[Cond], uncond: Cond | None = None, *,
                           num_steps: int = 8, eta: float = 1.0, s_noise: float = 1.003, cfg_scale: float = 2.0,
                           cfg_scale_start: float | None = None, control_scale: float = 1.0,
                           tile_size: int | None = None, tile_stride: int | None = None, tile_batch_size: int = 1,
                           eps_fn: Callable[[int], torch.Tensor] | None = None,
                           generator: torch.Generator | None = None, callback=None, tile_callback=None) -> torch.Tensor:
    """SUPIR's RestoreDPMPP2MSampler (its Lightning config; TiledRestoreDPMPP2MSampler with `tile_size`).

    Karras sigmas between the smallest and largest LegacyDDPM sigma of `num_steps`; DPM++ 2M with SDE noise
    (eta = 1: m1 = (s'/s)^2); no noise on the first and the last step; the second-order correction uses the
    previous step's guided estimate (blended, when tiled). The reference accepts and ignores restore_cfg,
    x_center, s_churn and the linear control schedule: this function does not take them.
    Differences from the reference, which are fixes: eta = 0 gives the deterministic DPM++ 2M sample (the
    reference returns NaN), and any batch size works (the reference's noise term only broadcasts for batch 1).
    eps_fn(step) -> full-latent standard normal noise for the SDE term (steps 1 .. num_steps - 2), else drawn
    from `generator`. (The reference uses a Brownian-tree sampler; its normalised increments are standard
    normal too.) callback / tile_callback / tiling / cfg / control arguments as in `sample_restore_edm`.
    """
    legacy = legacy_ddpm_sigmas(num_steps)
    steps = dpmpp2m_schedule(karras_sigmas(legacy[-2], legacy[0], num_steps), eta=eta, s_noise=s_noise,
                             cfg_scale=cfg_scale, cfg_scale_start=cfg_scale_start, control_scale=control_scale)
    x = noise * torch.sqrt(1.0 + legacy[0] ** 2.0).item()
    draw = _noise_source(eps_fn, generator, x)

    def inputs_for(i, st, state):
        return {"old_denoised": state.get("denoised"), "eps": draw(i) if st.noise_scale > 0 else None}

    return _loop(partial(dpmpp2m_step, denoiser), steps, x, cond, uncond, inputs_for, tile_size, tile_stride,
                 tile_batch_size, callback, tile_callback)
