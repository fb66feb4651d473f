"""Sampler maths without the real model: schedules, the denoiser, guidance, replayed reference runs, tiling,
reproducibility, and the reference quirks we fix (DPM++ at eta 0, batch > 1)."""
import pytest
import torch

from reference_configs import unet_config
from fixtures import REFERENCE, Fixture
from mini_supir import pipeline, sampler as S
from mini_supir.tiling import TiledDenoiser, gaussian_weights, sliding_windows


def fixture(name: str) -> Fixture:
    if not (REFERENCE / name / "config.json").exists():
        pytest.skip(f"reference fixture {name} not found")
    return Fixture(REFERENCE / name)


class ToyNet:
    """eps-network of data ~ N(0, I) shifted by the prompt vector: exact eps given the timestep's sigma."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_in, t, context, y, control, control_scale=1.0):
        self.calls.append({"t": t, "x_in": x_in, "y": y, "control_scale": control_scale})
        s = S.denoiser_sigmas()[t].view(-1, 1, 1, 1)
        shift = y.mean(1).view(-1, 1, 1, 1) + control_scale * control.mean((1, 2, 3)).view(-1, 1, 1, 1)
        return s * x_in / (s ** 2 + 1) ** 0.5 - 0.1 * shift


def toy_cond(b=1, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    control = torch.randn(b, 4, h, w, generator=g)
    c = {"crossattn": torch.randn(b, 3, 8, generator=g), "vector": torch.randn(b, 6, generator=g) + 1,
         "control": control}
    uc = {"crossattn": torch.zeros(b, 3, 8), "vector": torch.zeros(b, 6), "control": control}
    return c, uc


# --- schedules ------------------------------------------------------------------------------------------------

def test_legacy_schedule():
    assert S.legacy_ddpm_timesteps(4).tolist() == [249, 499, 749, 999]
    s = S.legacy_ddpm_sigmas(4)
    assert s.dtype == torch.float32 and s.shape == (5,) and s[-1] == 0 and (s[:-1].diff() < 0).all()
    assert abs(s[0].item() - 14.614641) < 1e-5
    table = S.denoiser_sigmas()
    assert table.shape == (1000,) and (table.diff() > 0).all()
    assert torch.equal(table.flip(0), S.legacy_ddpm_sigmas(1000)[:-1])


def test_trailing_and_karras():
    assert S.trailing_timesteps(4).tolist() == [999, 749, 499, 249]
    assert S.trailing_timesteps(1).tolist() == [999]
    assert S.trailing_timesteps(8).tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
    assert torch.equal(S.trailing_sigmas(4)[:-1], S.denoiser_sigmas()[[999, 749, 499, 249]])
    k = S.restore_dpmpp2m_sigmas(8)
    assert torch.allclose(k[[0, 7, 8]], torch.tensor([14.61464, 0.39775, 0.0]), atol=1e-5)
    assert torch.allclose(k[1:7], torch.tensor([9.65603, 6.21553, 3.88422, 2.34652, 1.36318, 0.75654]), atol=1e-5)


# --- denoiser -------------------------------------------------------------------------------------------------

def test_denoiser_quantises_and_scales():
    net, den = ToyNet(), None
    den = S.Denoiser(net)
    c, _ = toy_cond(2)
    x = torch.randn(2, 4, 8, 8)
    table = S.denoiser_sigmas()
    sigma = torch.tensor([3.7, table[10].item()])
    out = den(x, sigma, c, 0.5)
    idx, sq = den.quantize(sigma)
    assert idx[1] == 10 and torch.equal(sq, table[idx]) and (sq - sigma).abs()[0] < 0.01
    assert torch.equal(net.calls[0]["t"], idx)
    s = sq.view(-1, 1, 1, 1)
    assert torch.allclose(net.calls[0]["x_in"], x / (s ** 2 + 1).sqrt())
    assert torch.allclose(out, x - s * net(x / (s ** 2 + 1).sqrt(), idx, None, c["vector"], c["control"], 0.5))
    # a float sigma is broadcast over the batch
    assert torch.equal(den(x, 3.7, c, 0.5)[0], out[0])


def test_denoiser_fixture_tables():
    fx = fixture("supir_unet_control")
    den = S.Denoiser(None)
    fx.check("den.sigmas_table", den.sigma_table())
    idx, sigma_q = den.quantize(fx.inputs["den.sigma"])
    fx.check("den.idx", idx)
    fx.check("den.sigma_q", sigma_q)


def test_denoiser_fixture_denoised():
    control = pytest.importorskip("mini_supir.control")

    fx = fixture("supir_unet_control")
    net = control.ControlledUNet(unet_config(fx.config["constructor"]["diffusion_model"]))
    net.load_state_dict(fx.weights, strict=True)
    cond = {k: fx.inputs[f"den.c.{k}"] for k in ("crossattn", "vector", "control")}
    with torch.no_grad():
        out = S.Denoiser(net.eval())(fx.inputs["den.input"], fx.inputs["den.sigma"], cond,
                                     fx.config["den_control_scale"])
    fx.check("den.denoised", out)


# --- replayed reference runs: the fixtures' recorded denoiser outputs drive our loops ---------------------------

class Replay:
    def __init__(self, outs):
        self.outs, self.sigmas, self.control_scales = list(outs), [], []

    def __call__(self, x, sigma, cond, control_scale):
        assert x.shape == self.outs[0].shape and all(v.shape[0] == x.shape[0] for v in cond.values())
        self.sigmas.append(sigma)
        self.control_scales.append(control_scale)
        return self.outs.pop(0)


def conds(fx):
    return tuple({k: fx.inputs[f"{p}.{k}"] for k in ("crossattn", "vector", "control")} for p in ("c", "uc"))


def run_case(fx, case, edm, den, callback=None, drawn=None):
    """A fixture case through our sampler with denoiser `den` and the fixture's noise (steps drawn -> `drawn`)."""
    n, c, uc = case["name"], *conds(fx)
    sigmas = (S.legacy_ddpm_sigmas if edm else S.restore_dpmpp2m_sigmas)(case["num_steps"])
    step_of = {s: i for i, s in enumerate(sigmas.tolist())}

    def noise(sigma, sigma_next):  # k-diffusion's noise sampler interface
        if drawn is not None:
            drawn.append(step_of[sigma.item()])
        return fx.inputs[f"{n}.eps.{step_of[sigma.item()]}"]

    guidance = dict(cfg_scale=case["scale_min"], cfg_scale_start=case["scale"], control_scale=case["control_scale"])
    if edm:
        linear = case["use_linear_control_scale"]
        guidance.update(x_center=fx.inputs["x_center"], restore_cfg=case["restore_cfg"],
                        control_scale_start=case["control_scale_start"] if linear else None)
    options = dict(s_churn=case["s_churn"]) if edm else dict(eta=case["eta"])
    return (S.sample_euler if edm else S.sample_dpmpp_2m_sde)(
        S.GuidedModel(den, c, uc, sigmas, **guidance), S.start_latent(fx.inputs[f"{n}.noise"]), sigmas,
        s_noise=case["s_noise"], noise_sampler=noise, callback=callback, **options)


def test_replay_restore_edm():
    fx = fixture("restore_edm_sampler")
    for case in fx.config["cases"]:
        n, rec = case["name"], []
        den = Replay(fx.outputs[f"{n}.model_out.{i}"] for i in range(case["num_steps"]))
        sample = run_case(fx, case, True, den, lambda i, info: rec.append(info))
        for i, info in enumerate(rec):
            fx.check(f"{n}.x.{i}", info["x"])
            fx.check(f"{n}.sigma_hat.{i}", torch.full((2,), den.sigmas[i]))
            cfg = S.linear(info["sigma_hat"], case["scale_min"], case["scale"])
            fx.check(f"{n}.cfg_scale.{i}", torch.tensor([cfg]))
        fx.check(f"{n}.control_scale", torch.tensor(den.control_scales, dtype=torch.float64))
        fx.check(f"{n}.sample", sample)


def test_replay_restore_dpmpp2m():
    fx = fixture("restore_dpmpp2m_sampler")
    for case in fx.config["cases"]:
        n, steps, rec, drawn = case["name"], case["num_steps"], [], []
        den = Replay(fx.outputs[f"{n}.model_out.{i}"] for i in range(steps))
        sample = run_case(fx, case, False, den, lambda i, info: rec.append(info), drawn)
        assert drawn == list(range(1, steps - 1))  # no noise on the first and the last step
        for i, info in enumerate(rec):
            fx.check(f"{n}.x.{i}", info["x"])
            fx.check(f"{n}.denoised.{i}", info["denoised"])
        fx.check(f"{n}.sample", sample)


@pytest.mark.parametrize("kind", ["tiled_restore_edm_sampler", "tiled_restore_dpmpp2m_sampler"])
def test_replay_tiled_first_steps(kind):
    """The fixtures record every window's denoiser output for the first step(s): replayed through TiledDenoiser,
    the blended estimate must step to the reference's blended step results."""
    fx = fixture(kind)
    ts, stride = fx.config["tile_size"], fx.config["tile_stride"]
    windows = sliding_windows(*fx.config["latent_hw"], ts, stride)
    fx.check("windows", torch.tensor(windows))
    fx.check("tile_weights", gaussian_weights(ts).expand(1, 4, ts, ts))
    edm = "edm" in kind
    for case in fx.config["cases"]:
        n, recorded, rec = case["name"], 1 if edm else 2, []
        outs = (fx.outputs[f"{n}.tile.{i}.{j}.model_out"] for i in range(recorded) for j in range(len(windows)))

        def callback(i, info):
            rec.append(info)
            if len(rec) == recorded:
                raise StopIteration

        with pytest.raises(StopIteration):
            run_case(fx, case, edm, TiledDenoiser(Replay(outs), ts, stride), callback)
        for i, info in enumerate(rec):
            fx.check(f"{n}.x.{i}", info["x"])
            if not edm:
                fx.check(f"{n}.denoised.{i}", info["denoised"])


# --- guidance -----------------------------------------------------------------------------------------------------

def test_cfg_is_one_batched_call():
    net = ToyNet()
    c, uc = toy_cond(2)
    sigmas = S.legacy_ddpm_sigmas(3)
    S.sample_euler(S.GuidedModel(S.Denoiser(net), c, uc, sigmas), torch.randn(2, 4, 8, 8), sigmas)
    assert len(net.calls) == 3 and all(call["x_in"].shape[0] == 4 for call in net.calls)
    assert torch.equal(net.calls[0]["y"], torch.cat([uc["vector"], c["vector"]]))  # [uncond; cond]
    for uncond, cfg in ((None, 7.5), (uc, 1.0)):  # no uncond, or a scale of 1: the conditional estimate alone
        net.calls.clear()
        model = S.GuidedModel(S.Denoiser(net), c, uncond, sigmas, cfg_scale=cfg)
        S.sample_euler(model, torch.randn(2, 4, 8, 8), sigmas)
        assert [call["x_in"].shape[0] for call in net.calls] == [2, 2, 2]


def test_linear_schedules():
    # LinearCFG(scale=7.5, scale_min=4): 7.5 at sigma 14.6146, 4 at 0; the control schedule on the same line
    assert S.linear(S.SIGMA_MAX, 4.0, 7.5) == pytest.approx(7.5) and S.linear(0.0, 4.0, 7.5) == 4.0
    assert S.linear(S.SIGMA_MAX / 2, 0.9, 0.2) == pytest.approx(0.55) and S.linear(3.0, 0.9, None) == 0.9
    # the reference's first sigma 14.614641 is above its rounded 14.6146: the start value overshoots slightly
    assert S.linear(S.legacy_ddpm_sigmas(8)[0].item(), 0.9, 0.2) == pytest.approx(0.19999803, abs=1e-8)


def test_restoration_pull():
    """denoised - (denoised - x_center) * (sigma_i / 14.6146) ** restore_cfg, at sigma_i (not sigma_hat), on every
    step whose next sigma is above 0.05; nothing without x_center."""
    sigmas = S.legacy_ddpm_sigmas(4)
    const = torch.ones(1, 4, 8, 8)
    den = lambda x, sigma, cond, cs: const  # noqa: E731
    c, _ = toy_cond()
    center = torch.full((1, 4, 8, 8), 3.0)
    model = S.GuidedModel(den, c, None, sigmas, x_center=center, restore_cfg=2.0)
    for step in range(4):
        w = (sigmas[step] / S.SIGMA_MAX).item() ** 2 if step < 3 else 0.0  # the last step ends at 0 < 0.05
        torch.testing.assert_close(model(const, 99.0, step), const + 2.0 * w)
    assert torch.equal(S.GuidedModel(den, c, None, sigmas, restore_cfg=2.0)(const, 1.0, 0), const)


# --- behaviour --------------------------------------------------------------------------------------------------

def toy_run(fn, c, uc, noise, steps=6, **kw):
    sigmas = S.restore_dpmpp2m_sigmas(steps) if fn is S.sample_dpmpp_2m_sde else S.legacy_ddpm_sigmas(steps)
    model = S.GuidedModel(S.Denoiser(ToyNet()), c, uc, sigmas, cfg_scale=3.0, x_center=noise)
    return fn(model, S.start_latent(noise), sigmas, **kw)


def test_seed_reproducible():
    c, uc = toy_cond()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for fn, kw in ((S.sample_euler, dict(s_churn=3.0)), (S.sample_dpmpp_2m_sde, {})):
        run = lambda seed: toy_run(fn, c, uc, noise, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
        a, b, other = run(7), run(7), run(8)
        assert torch.equal(a, b) and not torch.allclose(a, other)


def test_euler_churn():
    """gamma = min(s_churn / steps, sqrt(2) - 1): the model sees sigma_hat = sigma (1 + gamma), after noise of std
    s_noise sqrt(sigma_hat^2 - sigma^2) was added."""
    sigmas, seen = S.legacy_ddpm_sigmas(4), []
    model = lambda x, sigma, step: seen.append((sigma, x.clone())) or torch.zeros_like(x)  # noqa: E731
    eps = torch.randn(1, 4, 8, 8)
    S.sample_euler(model, torch.zeros(1, 4, 8, 8), sigmas, s_churn=0.5, s_noise=2.0, noise_sampler=lambda s, s_hat: eps)
    for (sigma_hat, x), sigma in zip(seen, sigmas.tolist()):
        assert sigma_hat == pytest.approx(sigma * 1.125, rel=1e-6)  # gamma = 0.5 / 4
    torch.testing.assert_close(seen[0][1], eps * 2.0 * (1.125 ** 2 - 1) ** 0.5 * sigmas[0].item())


def test_dpmpp2m_eta0_is_deterministic_and_finite():
    """The reference returns all NaN at eta 0 (eta * h = 0 * inf on the last step); we give the deterministic
    DPM++ 2M sample: no noise drawn, and the last step lands exactly on its denoised estimate."""
    c, uc = toy_cond()
    drawn, rec = [], []
    x = toy_run(S.sample_dpmpp_2m_sde, c, uc, torch.randn(1, 4, 8, 8), eta=0.0,
                noise_sampler=lambda s, s_next: drawn.append(s), callback=lambda i, info: rec.append(info))
    assert torch.isfinite(x).all() and drawn == [] and torch.equal(x, rec[-1]["denoised"])


def test_dpmpp2m_batch2_matches_batch1():
    """The reference's SDE noise term only broadcasts for batch 1; ours is per sample."""
    c, uc = toy_cond(2)
    noise = torch.randn(2, 4, 8, 8)
    eps = {s: torch.randn(2, 4, 8, 8) for s in S.restore_dpmpp2m_sigmas(8).tolist()}
    both = toy_run(S.sample_dpmpp_2m_sde, c, uc, noise, steps=8, noise_sampler=lambda s, s_next: eps[s.item()])
    for k in range(2):
        pick = lambda d: {key: v[k:k + 1] for key, v in d.items()}  # noqa: E731
        one = toy_run(S.sample_dpmpp_2m_sde, pick(c), pick(uc), noise[k:k + 1], steps=8,
                      noise_sampler=lambda s, s_next: eps[s.item()][k:k + 1])
        assert torch.allclose(both[k:k + 1], one, atol=1e-5)


def test_samplers_table():
    assert pipeline.SAMPLERS == ("edm", "dpmpp2m", "lightning")
    assert all(hasattr(pipeline.QUALITY, name) for entry in S.SAMPLERS.values() for name in entry.options)
    assert not S.SAMPLERS["dpmpp2m"].restoration  # the reference's DPM++ ignores restore_cfg and control_start
    net = ToyNet()
    c, _ = toy_cond()
    lightning = S.SAMPLERS["lightning"]
    sigmas = lightning.sigmas(4)
    model = S.GuidedModel(S.Denoiser(net), c, None, sigmas)
    x = lightning.sample(model, S.start_latent(torch.randn(1, 4, 8, 8)), sigmas)
    assert [call["t"].item() for call in net.calls] == [999, 749, 499, 249] and torch.isfinite(x).all()


# --- tiling -----------------------------------------------------------------------------------------------------

def test_windows_cover_latent():
    for h, w, tile, stride in [(24, 44, 16, 8), (16, 16, 16, 8), (37, 50, 16, 12), (10, 40, 16, 8)]:
        windows = sliding_windows(h, w, tile, stride)
        covered = torch.zeros(h, w, dtype=torch.int64)
        for hi, he, wi, we in windows:
            assert he - hi == min(tile, h) and we - wi == min(tile, w)
            covered[hi:he, wi:we] += 1
        assert (covered > 0).all() and windows[-1][1] == h and windows[-1][3] == w
    assert sliding_windows(24, 44, 16, 8)[:5] == [(0, 16, 0, 16), (0, 16, 8, 24), (0, 16, 16, 32), (0, 16, 24, 40),
                                                  (0, 16, 28, 44)]
    g = gaussian_weights(16)
    assert torch.equal(g, g.flip(1)) and not torch.equal(g, g.flip(0)) and g.argmax() // 16 == 8


def test_tiled_denoiser_blends_windows():
    c, _ = toy_cond(1, 24, 40)
    x = torch.randn(1, 4, 24, 40)
    seen = []

    def pointwise(x, sigma, cond, cs):  # a denoiser that looks at no neighbour: tiling must not change it
        seen.append((x.shape[-2:], cond["control"].shape[-2:]))
        return 0.5 * x + cs * cond["control"]
    tiled = TiledDenoiser(pointwise, 16, 8)(x, 1.0, c, 0.3)
    assert seen == [(torch.Size([16, 16]),) * 2] * 8  # 2 x 4 windows, control cut like x
    torch.testing.assert_close(tiled, pointwise(x, 1.0, c, 0.3), atol=1e-6, rtol=1e-6)
    # a window-dependent denoiser: one window covering the latent is the untiled call, smaller ones are not
    den = S.Denoiser(ToyNet())
    whole = den(x, 1.0, c, 0.3)
    torch.testing.assert_close(TiledDenoiser(den, 64)(x, 1.0, c, 0.3), whole, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(TiledDenoiser(den, 16, 8)(x, 1.0, c, 0.3), whole, atol=1e-3)
