"""Parity of mini_supir.sampler with the reference: LegacyDDPM discretisation and SUPIR's four restoration samplers
(run with the real ControlledUNet on the `supir_unet_control` weights; every per-step output is compared)."""
import torch

from reference_configs import unet_config
from fixtures import Fixture, checks
from mini_supir import sampler as S

COND_KEYS = ("crossattn", "vector", "control")


@checks("discretization")
def check_discretization(fx: Fixture):
    ac = S.legacy_ddpm_alphas_cumprod(**fx.config["constructor"])
    ours = {"alphas_cumprod": ac, "denoiser_sigmas": S.denoiser_sigmas()}
    for n in fx.config["Ns"]:
        t = S.legacy_ddpm_timesteps(n)
        ours[f"timesteps.{n}"] = t
        ours[f"sampler_sigmas.{n}"] = S.legacy_ddpm_sigmas(n)
        ours[f"sigmas_float64.{n}"] = ((1 - ac[t]) / ac[t]).sqrt().flip(0)
    fx.check_all(ours)


class RecordingDenoiser:
    """Wraps a Denoiser and remembers the sigma (as the batch-sized tensor it becomes) and control scale of the
    latest call: what the network was really given."""

    def __init__(self, denoiser):
        self.denoiser, self.sigma, self.control_scale = denoiser, None, None

    def __call__(self, x, sigma, cond, control_scale=1.0):
        self.sigma = torch.full((x.shape[0],), sigma) if not torch.is_tensor(sigma) else sigma
        self.control_scale = control_scale
        return self.denoiser(x, sigma, cond, control_scale)


def _denoiser(fx: Fixture) -> RecordingDenoiser:
    from mini_supir.control import ControlledUNet

    cfgs = [unet_config(c) for c in fx.config["constructor"]["network"]]  # [GLVControl, LightGLVUNet]
    assert all(c == cfgs[0] for c in cfgs), "control encoder and UNet configs differ"
    net = ControlledUNet(cfgs[0])
    net.load_state_dict(fx.weights, strict=True)
    return RecordingDenoiser(S.Denoiser(net.eval()))


def _conds(fx: Fixture, local_prompts: bool, num_windows: int = 0):
    c = {k: fx.inputs[f"c.{k}"] for k in COND_KEYS}
    uc = {k: fx.inputs[f"uc.{k}"] for k in COND_KEYS}
    if local_prompts:  # as SUPIRModel.prepare_condition builds them: own prompt, the full LQ latent
        c = [{"crossattn": fx.inputs[f"local.{j}.crossattn"], "vector": fx.inputs[f"local.{j}.vector"],
              "control": c["control"]} for j in range(num_windows)]
    return c, uc


def _run_cases(fx: Fixture, sampler: str, tiled: bool):
    """Run every case of a sampler fixture and collect all outputs under the fixture's names."""
    den = _denoiser(fx)
    edm = sampler == "edm"
    ours = {}
    if tiled:
        ts, stride = fx.config["tile_size"], fx.config["tile_stride"]
        h, w = fx.inputs["x_center"].shape[-2:]
        windows = S.sliding_windows(h, w, ts, stride)
        ours["windows"] = torch.tensor(windows)
        ours["tile_weights"] = S.gaussian_weights(ts).expand(1, 4, ts, ts)
    for case in fx.config["cases"]:
        n, num_steps = case["name"], case["num_steps"]
        noise = fx.inputs[f"{n}.noise"]
        b = noise.shape[0]
        cond, uc = _conds(fx, case.get("local_prompts", False), len(windows) if tiled else 0)
        control_scales, noise_steps = [], []

        def callback(i, info):
            ours[f"{n}.x.{i}"] = info["x"]
            ours[f"{n}.denoised.{i}"] = info["denoised"]
            if "model_out" in info:
                ours[f"{n}.model_out.{i}"] = info["model_out"]
            ours[f"{n}.{'sigma_hat' if edm else 'sigma'}.{i}"] = den.sigma
            ours[f"{n}.cfg_scale.{i}"] = torch.full((b,), info["cfg_scale"])
            control_scales.append(den.control_scale)

        def tile_callback(i, j, info):
            for key in ("x", "denoised", "model_out"):
                ours[f"{n}.tile.{i}.{j}.{key}"] = info[key]

        def eps_fn(i):
            noise_steps.append(i)
            return fx.inputs[f"{n}.eps.{i}"]

        # LinearCFG(scale, scale_min): `scale` at sigma_max = our cfg_scale_start, `scale_min` at 0 = cfg_scale.
        kw = dict(num_steps=num_steps, s_noise=case["s_noise"], cfg_scale=case["scale_min"],
                  cfg_scale_start=case["scale"], control_scale=case["control_scale"], eps_fn=eps_fn,
                  callback=callback)
        if tiled:
            kw.update(tile_size=ts, tile_stride=stride, tile_callback=tile_callback)
        if edm:
            linear = case["use_linear_control_scale"]
            sample = S.sample_restore_edm(den, noise, fx.inputs["x_center"], cond, uc, s_churn=case["s_churn"],
                                          restore_cfg=case["restore_cfg"],
                                          control_scale_start=case["control_scale_start"] if linear else None, **kw)
            ours[f"{n}.sigmas"] = S.legacy_ddpm_sigmas(num_steps)
        else:  # restore_cfg, s_churn, x_center and the linear control schedule are ignored by the reference
            sample = S.sample_restore_dpmpp2m(den, noise, cond, uc, eta=case["eta"], **kw)
            legacy = S.legacy_ddpm_sigmas(num_steps)
            sigmas = S.restore_dpmpp2m_sigmas(num_steps)
            ours[f"{n}.sigmas"], ours[f"{n}.legacy_sigmas"] = sigmas, legacy
            ours[f"{n}.noise_interval"] = torch.stack([legacy[-2], legacy[0]])
            ours[f"{n}.noise_calls"] = torch.stack([sigmas[noise_steps], sigmas[[i + 1 for i in noise_steps]]], 1)
        ours[f"{n}.control_scale"] = torch.tensor(control_scales, dtype=torch.float64)
        ours[f"{n}.sample"] = sample
    fx.check_all(ours)


@checks("restore_edm_sampler")
def check_restore_edm(fx: Fixture):
    _run_cases(fx, "edm", tiled=False)


@checks("restore_dpmpp2m_sampler")
def check_restore_dpmpp2m(fx: Fixture):
    _run_cases(fx, "dpmpp2m", tiled=False)


@checks("tiled_restore_edm_sampler")
def check_tiled_restore_edm(fx: Fixture):
    _run_cases(fx, "edm", tiled=True)


@checks("tiled_restore_dpmpp2m_sampler")
def check_tiled_restore_dpmpp2m(fx: Fixture):
    _run_cases(fx, "dpmpp2m", tiled=True)
