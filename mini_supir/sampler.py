"""The samplers, k-diffusion style: one plain function per sampler with the loop inline, all called as

    x = sample(model, x, sigmas, *, <its options>, generator=None, noise_sampler=None, callback=None)

with x the start latent (`start_latent(noise)`, as SUPIR scales the noise) and `model(x, sigma, step)` the
guided estimate, built from layers that each wrap the one below:

    Denoiser(network)        sgm's DiscreteDenoiserWithControl: D(x, sigma, cond, control_scale)
    TiledDenoiser(D)         SUPIR's tiled samplers: D on Gaussian-weighted windows (tiling.py)
    GuidedModel(D, ...)      CFG on [uc; c] with SUPIR's linear CFG / control schedules and its restoration pull

- Schedules: LegacyDDPM (SDXL's 1000-step scaled-linear betas), Karras, and "trailing" (SDXL-Lightning).
- `sample_euler`: Euler with EDM churn, SUPIR's RestoreEDMSampler (and, on trailing sigmas without churn, the
  SDXL-Lightning sampler); `sample_dpmpp_2m_sde`: SUPIR's RestoreDPMPP2MSampler (its Lightning config).
- `SAMPLERS`: what the pipeline picks by name (function, schedule, options).

Per-step scalars are host floats computed from the float32 schedule (in the reference's operations, up to
rounding), so the loops never read back from the device. Line references `sampling.py:L548` etc. are to the files in
SUPIR/sgm/modules/diffusionmodules/ of github.com/Fanghua-Yu/SUPIR (commit bda91af); `k_diffusion/...` ones to
github.com/crowsonkb/k-diffusion (commit 4601bf0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Cond = dict[str, torch.Tensor]  # {"crossattn": (B, 77, C), "vector": (B, adm), "control": (B, 4, h, w) LQ latent}
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # k-diffusion's: (sigma, sigma_next) -> N(0, I)

# The reference hard-codes this rounded LegacyDDPM sigma_max (the exact value is 14.614641) in LinearCFG and in
# the control / restoration schedules; using the rounded value reproduces its numbers (incl. the tiny overshoot
# of the linear control scale at the first step).
SIGMA_MAX = 14.6146


# ----------------------------------------------------------------------------------------------------------
# Discretisation


def legacy_ddpm_alphas_cumprod(num_timesteps: int = 1000, linear_start: float = 0.00085,
                               linear_end: float = 0.012) -> torch.Tensor:
    """SD/SDXL "scaled linear" schedule: betas linear in sqrt space; cumulative product of 1 - beta (float64).
    SUPIR/sgm/modules/diffusionmodules/util.py:L19-L31, discretizer.py:L42-L55."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _sigmas_at(timesteps: torch.Tensor) -> torch.Tensor:
    ac = legacy_ddpm_alphas_cumprod()[timesteps]
    # The ratio goes to float32 BEFORE the square root, exactly as sgm does (discretizer.py:L67-L68).
    return ((1.0 - ac) / ac).float() ** 0.5


def legacy_ddpm_timesteps(n: int, num_timesteps: int = 1000) -> torch.Tensor:
    """sgm's roughly equally spaced training steps for an n-step schedule, ascending (n=4 -> [249, 499, 749, 999]);
    discretizer.py:L11-L14, L58-L65."""
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

    Same float32 operations as k-diffusion's get_sigmas_karras (k_diffusion/sampling.py:L17-L23) with 0-dim
    float32 endpoints (what SUPIR passes).
    """
    sigma_min = torch.as_tensor(sigma_min, dtype=torch.float32)
    sigma_max = torch.as_tensor(sigma_max, dtype=torch.float32)
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, torch.zeros(1)])


def restore_dpmpp2m_sigmas(n: int) -> torch.Tensor:
    """SUPIR's DPM++ schedule: Karras between the smallest and largest sigma of the n-step LegacyDDPM schedule
    (sampling.py:L490-L492)."""
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
    """D(x, sigma) for an eps-prediction network trained on the 1000 discrete LegacyDDPM steps: sgm's
    DiscreteDenoiserWithControl (denoiser.py:L49-L73) with EpsScaling (denoiser_scaling.py:L16-L22).

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


# ----------------------------------------------------------------------------------------------------------
# Guidance: what the samplers call as model(x, sigma, step)


def linear(sigma: float, at_zero: float, at_max: float | None) -> float:
    """SUPIR's linear schedules: `at_max` at sigma = 14.6146, straight down (or up) to `at_zero` at sigma = 0;
    None = constant `at_zero`. CFG: LinearCFG(scale=at_max, scale_min=at_zero)
    (SUPIR/sgm/modules/diffusionmodules/guiders.py:L48); control: sampling.py:L559."""
    return at_zero if at_max is None else (sigma / SIGMA_MAX) * (at_max - at_zero) + at_zero


@dataclass
class GuidedModel:
    """model(x, sigma, step) -> the guided estimate, as SUPIR's RestoreEDMSampler.denoise + LinearCFG + its pull
    compute it (sampling.py:L543-L565, guiders.py:L59-L74).

    - CFG: ONE denoiser call on [x; x] with cond [uc; c], then u + scale * (c - u), the scale on `linear` at the
      sigma the sampler passes (sigma_hat with churn, as the reference). A scale of 1 is the conditional
      estimate alone, so that step skips the unconditional half (SDXL-Lightning is distilled without CFG);
      uncond=None never guides.
    - Control strength on `linear` at the step's own sigma_i = sigmas[step], not sigma_hat (sampling.py:L559).
    - Restoration guidance (SUPIR paper, eq. 7; sampling.py:L563-L565): the estimate is pulled towards the
      stage-1 latent, denoised -= (denoised - x_center) * (sigma_i / 14.6146) ** restore_cfg, on every step
      whose next sigma is above restore_cfg_s_tmin (never the last). Off without x_center or for
      restore_cfg <= 0.
    """
    denoiser: Callable[..., torch.Tensor]   # D(x, sigma, cond, control_scale)
    cond: Cond
    uncond: Cond | None
    sigmas: torch.Tensor                    # the sampler's schedule, indexed by `step`
    cfg_scale: float = 7.5                  # at sigma 0 (LinearCFG's scale_min)
    cfg_scale_start: float | None = None    # at sigma 14.6146 (LinearCFG's scale); None = constant
    control_scale: float = 1.0
    control_scale_start: float | None = None
    x_center: torch.Tensor | None = None
    restore_cfg: float = 4.0
    restore_cfg_s_tmin: float = 0.05

    def __call__(self, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        s, s_next = self.sigmas[step], self.sigmas[step + 1]
        control = linear(s.item(), self.control_scale, self.control_scale_start)
        scale = linear(sigma, self.cfg_scale, self.cfg_scale_start)
        if self.uncond is None or scale == 1.0:
            denoised = self.denoiser(x, sigma, self.cond, control)
        else:
            both = {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond}
            u, c = self.denoiser(torch.cat([x, x]), sigma, both, control).chunk(2)
            denoised = u + scale * (c - u)
        if self.x_center is not None and self.restore_cfg > 0 and s_next > self.restore_cfg_s_tmin:
            denoised = denoised - (denoised - self.x_center) * ((s / SIGMA_MAX) ** self.restore_cfg).item()
        return denoised


# ----------------------------------------------------------------------------------------------------------
# Samplers


def start_latent(noise: torch.Tensor) -> torch.Tensor:
    """x at the first sigma as SUPIR makes it (sampling.py:L51): noise * sqrt(1 + sigma_max^2), sigma_max the
    largest training sigma, where every schedule here starts (the DPM++ one up to the rounding of its Karras
    round trip: the reference scales x before it swaps in the Karras sigmas, L490-L492)."""
    return noise * torch.sqrt(1.0 + denoiser_sigmas()[-1] ** 2.0).item()


def gaussian_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """The default noise sampler: N(0, I) like `like`, drawn on the generator's device, so a CPU generator gives
    the same noise on any accelerator."""
    device = like.device if generator is None else generator.device
    return lambda sigma, sigma_next: torch.randn(like.shape, generator=generator, dtype=torch.float32,
                                                 device=device).to(like)


@torch.no_grad()
def sample_euler(model, x: torch.Tensor, sigmas: torch.Tensor, *, s_churn: float = 0.0, s_noise: float = 1.003,
                 generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                 callback=None) -> torch.Tensor:
    """Euler steps with EDM churn (Karras et al. 2022, Alg. 2; k-diffusion's sample_euler,
    k_diffusion/sampling.py:L118-L135): the loop of SUPIR's RestoreEDMSampler (sampling.py:L548-L597), whose
    restoration pull lives in `GuidedModel`. Without churn on trailing sigmas it is the SDXL-Lightning sampler.

    s_churn: gamma = min(s_churn / steps, sqrt(2) - 1) on every step (the reference's s_tmin 0, s_tmax inf);
        the noise raising sigma to sigma_hat is noise_sampler(sigma, sigma_hat) * s_noise (default: drawn from
        `generator`, only when gamma > 0).
    callback(step, info): info = {"x": x after the step, "denoised", "sigma", "sigma_hat"}.
    """
    noise_sampler = noise_sampler or gaussian_noise(x, generator)
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1)  # sampling.py:L579-L583
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:  # sampling.py:L550-L556
            x = x + noise_sampler(sigma, sigma_hat) * s_noise * ((sigma_hat ** 2 - sigma ** 2) ** 0.5).item()
        denoised = model(x, sigma_hat.item(), i)
        d = (x - denoised) / sigma_hat.item()
        x = x + (sigma_next - sigma_hat).item() * d  # sampling.py:L567-L569; the last step lands on denoised
        if callback is not None:
            callback(i, {"x": x, "denoised": denoised, "sigma": sigma.item(), "sigma_hat": sigma_hat.item()})
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.003,
                        generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                        callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022) as SUPIR's RestoreDPMPP2MSampler runs it (sampling.py:L422-L515).

    The terms are k-diffusion's (sample_dpmpp_2m_sde, k_diffusion/sampling.py:L611-L652): t = -log sigma,
    h = t_next - t, r = h_last / h. The reference's own choices are kept: no SDE noise on the first step, the
    second-order term as a corrected estimate denoised_d fed to the first-order update (sampling.py:L474-L475;
    k-diffusion's midpoint form is the same up to rounding), first order on the first and the last step. Fixes: eta = 0
    gives the deterministic DPM++ 2M sample (the reference's 0 * inf on the last step makes it all NaN), and any
    batch size works (the reference's noise term only broadcasts for batch 1).

    eta: SDE noise (1 = SUPIR's default); its noise is noise_sampler(sigma, sigma_next) (the reference: a
        Brownian tree, whose normalised increments are N(0, I) too; default: drawn from `generator`).
    callback(step, info): info = {"x": x after the step, "denoised", "sigma"}.
    """
    noise_sampler = noise_sampler or gaussian_noise(x, generator)
    old_denoised = h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma.item(), i)
        t, t_next = -sigma.log(), -sigma_next.log()  # t_next = +inf on the last step
        h = t_next - t
        eta_h = eta * h if eta else torch.zeros(())  # not 0 * inf = NaN on the last step
        decay = (sigma_next / sigma * (-eta_h).exp()).item()  # sampling.py:L436
        gain = (-h - eta_h).expm1().neg().item()  # 1 - exp(-h - eta h), sampling.py:L437
        if old_denoised is None or sigma_next == 0:
            x = decay * x + gain * denoised  # the last step: decay 0, gain 1, x = denoised
        else:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)).item() * denoised - (1 / (2 * r)).item() * old_denoised
            x = decay * x + gain * denoised_d
            if eta:  # sampling.py:L481-L482, L498-L501
                x = x + noise_sampler(sigma, sigma_next) * sigma_next.item() \
                    * (-2 * eta_h).expm1().neg().sqrt().item() * s_noise
        old_denoised, h_last = denoised, h
        if callback is not None:
            callback(i, {"x": x, "denoised": denoised, "sigma": sigma.item()})
    return x


@dataclass(frozen=True)
class Sampler:
    """A sampler by name: sample(model, x, sigmas, *, generator, callback, **{option: value})."""
    sample: Callable[..., torch.Tensor]
    sigmas: Callable[[int], torch.Tensor]  # number of steps -> the schedule
    options: tuple[str, ...]               # its own keyword options (RestoreSettings uses the same names)
    restoration: bool = True               # it takes the restoration pull and the linear control schedule


SAMPLERS = {
    "edm": Sampler(sample_euler, legacy_ddpm_sigmas, ("s_churn", "s_noise")),
    # The reference's DPM++ takes restore_cfg, s_churn, x_center and the linear control schedule and ignores
    # them (sampling.py:L422-L427, L486-L515): they are not offered.
    "dpmpp2m": Sampler(sample_dpmpp_2m_sde, restore_dpmpp2m_sigmas, ("eta", "s_noise"), restoration=False),
    # SDXL-Lightning 2/4/8-step checkpoints: Euler on trailing timesteps. (The 1-step one predicts x0, not eps.)
    "lightning": Sampler(sample_euler, trailing_sigmas, ()),
}
