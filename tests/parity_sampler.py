"""Parity of mini_supir.sampler with the reference: LegacyDDPM discretisation and SUPIR's four restoration samplers
(run with the real ControlledUNet on the `supir_unet_control` weights; every per-step output is compared).

What the fixtures record inside a run is observed here through the public interface only: the denoiser is
wrapped to see what the network was given and returned, the fixture's noise comes in as a noise sampler, and
the per-step latents through the samplers' callback."""
import torch

from reference_configs import unet_config
from fixtures import Fixture, checks
from mini_supir import sampler as S
from mini_supir.tiling import TiledDenoiser, gaussian_weights, sliding_windows

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


class Recording:
    """A denoiser wrapper that remembers every call: the sigma (as the batch-sized tensor it becomes), the control
    scale and the output. Between the sampler and TiledDenoiser it sees one call per step, inside it one per window."""

    def __init__(self, denoiser, local_prompts=None):
        self.denoiser, self.local, self.calls = denoiser, local_prompts, []

    def __call__(self, x, sigma, cond, control_scale=1.0):
        if self.local is not None:  # window j's own prompt, as SUPIRModel.prepare_condition builds them
            prompt, b = self.local[len(self.calls) % len(self.local)], x.shape[0] // 2  # cond is [uc; c]
            cond = {**cond, **{k: torch.cat([cond[k][:b], v]) for k, v in prompt.items()}}
        out = self.denoiser(x, sigma, cond, control_scale)
        self.calls.append({"sigma": torch.full((x.shape[0],), sigma), "control_scale": control_scale, "out": out})
        return out


class _Stop(Exception):
    pass


def _network(fx: Fixture) -> S.Denoiser:
    from mini_supir.control import ControlledUNet

    cfgs = [unet_config(c) for c in fx.config["constructor"]["network"]]  # [GLVControl, LightGLVUNet]
    assert all(c == cfgs[0] for c in cfgs), "control encoder and UNet configs differ"
    net = ControlledUNet(cfgs[0])
    net.load_state_dict(fx.weights, strict=True)
    return S.Denoiser(net.eval())


def _case(fx: Fixture, case: dict, edm: bool):
    """(sigmas, run) for one fixture case: run(denoiser, callback, noise_calls=None) -> sample, with the case's
    guidance and options and the fixture's noise (each draw's (sigma, sigma_next) appended to noise_calls)."""
    n = case["name"]
    sigmas = (S.legacy_ddpm_sigmas if edm else S.restore_dpmpp2m_sigmas)(case["num_steps"])
    step_of = {s: i for i, s in enumerate(sigmas.tolist())}
    c, uc = ({k: fx.inputs[f"{p}.{k}"] for k in COND_KEYS} for p in ("c", "uc"))
    # LinearCFG(scale, scale_min): `scale` at sigma_max = our cfg_scale_start, `scale_min` at 0 = cfg_scale.
    guidance = dict(cfg_scale=case["scale_min"], cfg_scale_start=case["scale"], control_scale=case["control_scale"])
    options = dict(s_noise=case["s_noise"])
    if edm:  # restore_cfg, s_churn, x_center and the linear control schedule are ignored by the reference DPM++
        linear = case["use_linear_control_scale"]
        guidance.update(x_center=fx.inputs["x_center"], restore_cfg=case["restore_cfg"],
                        control_scale_start=case["control_scale_start"] if linear else None)
        options.update(s_churn=case["s_churn"])
    else:
        options.update(eta=case["eta"])

    def run(denoiser, callback, noise_calls=None):
        def noise(sigma, sigma_next):
            if noise_calls is not None:
                noise_calls.append(torch.stack([sigma, sigma_next]))
            return fx.inputs[f"{n}.eps.{step_of[sigma.item()]}"]

        model = S.GuidedModel(denoiser, c, uc, sigmas, **guidance)
        return (S.sample_euler if edm else S.sample_dpmpp_2m_sde)(
            model, S.start_latent(fx.inputs[f"{n}.noise"]), sigmas, noise_sampler=noise, callback=callback, **options)
    return sigmas, run


def _tile_outputs(n: str, run, blended: list, per_window: list, windows: list, recorded_steps: int, ours: dict):
    """The reference tiles the STEP and records what it returned for each window; we tile the denoiser. A step is
    elementwise in (x, denoiser output), so window j's own step result is our untiled step where the denoiser
    output is window j's: replayed from the recorded outputs, window j's pasted into the blended one."""
    for k in range(recorded_steps):
        for j, (top, bottom, left, right) in enumerate(windows):
            win, out_j = (..., slice(top, bottom), slice(left, right)), per_window[k * len(windows) + j]
            outs = blended[:k] + [blended[k].clone()]
            outs[k][win] = out_j
            seen = {}

            def stop(i, info, k=k):
                if i == k:
                    seen.update(info)
                    raise _Stop

            try:
                run(lambda x, sigma, cond, control_scale: outs.pop(0), stop)
            except _Stop:
                pass
            ours.update({f"{n}.tile.{k}.{j}.model_out": out_j, f"{n}.tile.{k}.{j}.x": seen["x"][win],
                         f"{n}.tile.{k}.{j}.denoised": seen["denoised"][win]})


def _run_cases(fx: Fixture, sampler: str, tiled: bool):
    """Run every case of a sampler fixture and collect all outputs under the fixture's names."""
    network = _network(fx)
    edm = sampler == "edm"
    ours = {}
    if tiled:
        ts, stride = fx.config["tile_size"], fx.config["tile_stride"]
        windows = sliding_windows(*fx.inputs["x_center"].shape[-2:], ts, stride)
        ours["windows"] = torch.tensor(windows)
        ours["tile_weights"] = gaussian_weights(ts).expand(1, 4, ts, ts)
    for case in fx.config["cases"]:
        n = case["name"]
        local = None
        if case.get("local_prompts", False):
            local = [{k: fx.inputs[f"local.{j}.{k}"] for k in ("crossattn", "vector")} for j in range(len(windows))]
        inner = Recording(network, local)
        outer = Recording(TiledDenoiser(inner, ts, stride) if tiled else inner)
        sigmas, run = _case(fx, case, edm)
        noise_calls = []

        def callback(i, info):
            call, sigma = outer.calls[i], info["sigma_hat"] if edm else info["sigma"]
            ours.update({f"{n}.x.{i}": info["x"], f"{n}.denoised.{i}": info["denoised"],
                         f"{n}.model_out.{i}": call["out"], f"{n}.{'sigma_hat' if edm else 'sigma'}.{i}": call["sigma"],
                         f"{n}.cfg_scale.{i}": torch.full(info["x"].shape[:1],
                                                          S.linear(sigma, case["scale_min"], case["scale"]))})

        ours[f"{n}.sample"] = run(outer, callback, noise_calls)
        ours[f"{n}.sigmas"] = sigmas
        ours[f"{n}.control_scale"] = torch.tensor([call["control_scale"] for call in outer.calls], dtype=torch.float64)
        if not edm:
            legacy = S.legacy_ddpm_sigmas(case["num_steps"])
            ours[f"{n}.legacy_sigmas"] = legacy
            ours[f"{n}.noise_interval"] = torch.stack([legacy[-2], legacy[0]])  # the reference Brownian tree's span
            ours[f"{n}.noise_calls"] = torch.stack(noise_calls)
        if tiled:
            _tile_outputs(n, run, [call["out"] for call in outer.calls], [call["out"] for call in inner.calls],
                          windows, 1 if edm else 2, ours)
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
