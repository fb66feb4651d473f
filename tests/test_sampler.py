"""Sampler maths without the real model: schedules, the denoiser, replayed reference runs, tiling, reproducibility."""
import pytest
import torch

from reference_configs import unet_config
from fixtures import REFERENCE, Fixture
from mini_supir import sampler as S


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
        self.outs, self.sigmas = list(outs), []

    def __call__(self, x, sigma, cond, control_scale):
        assert x.shape == self.outs[0].shape and all(v.shape[0] == x.shape[0] for v in cond.values())
        self.sigmas.append(sigma)
        return self.outs.pop(0)


def conds(fx):
    return tuple({k: fx.inputs[f"{p}.{k}"] for k in ("crossattn", "vector", "control")} for p in ("c", "uc"))


def test_replay_restore_edm():
    fx = fixture("restore_edm_sampler")
    c, uc = conds(fx)
    for case in fx.config["cases"]:
        n, steps = case["name"], case["num_steps"]
        rec = []
        den = Replay(fx.outputs[f"{n}.model_out.{i}"] for i in range(steps))
        sample = S.sample_restore_edm(
            den, fx.inputs[f"{n}.noise"], fx.inputs["x_center"], c, uc, num_steps=steps, s_churn=case["s_churn"],
            s_noise=case["s_noise"], restore_cfg=case["restore_cfg"], cfg_scale=case["scale_min"],
            cfg_scale_start=case["scale"], control_scale=case["control_scale"],
            control_scale_start=case["control_scale_start"] if case["use_linear_control_scale"] else None,
            eps_fn=lambda i: fx.inputs[f"{n}.eps.{i}"], callback=lambda i, info: rec.append(info))
        for i, info in enumerate(rec):
            fx.check(f"{n}.x.{i}", info["x"])
            fx.check(f"{n}.sigma_hat.{i}", torch.full((2,), info["sigma_hat"]))
            fx.check(f"{n}.cfg_scale.{i}", torch.tensor([info["cfg_scale"]]))
        fx.check(f"{n}.control_scale", torch.tensor([info["control_scale"] for info in rec], dtype=torch.float64))
        fx.check(f"{n}.sample", sample)


def test_replay_restore_dpmpp2m():
    fx = fixture("restore_dpmpp2m_sampler")
    c, uc = conds(fx)
    for case in fx.config["cases"]:
        n, steps = case["name"], case["num_steps"]
        rec, drawn = [], []
        den = Replay(fx.outputs[f"{n}.model_out.{i}"] for i in range(steps))
        sample = S.sample_restore_dpmpp2m(
            den, fx.inputs[f"{n}.noise"], c, uc, num_steps=steps, eta=case["eta"], s_noise=case["s_noise"],
            cfg_scale=case["scale_min"], cfg_scale_start=case["scale"], control_scale=case["control_scale"],
            eps_fn=lambda i: drawn.append(i) or fx.inputs[f"{n}.eps.{i}"], callback=lambda i, info: rec.append(info))
        assert drawn == list(range(1, steps - 1))  # no noise on the first and the last step
        for i, info in enumerate(rec):
            fx.check(f"{n}.x.{i}", info["x"])
            fx.check(f"{n}.denoised.{i}", info["denoised"])
        fx.check(f"{n}.sample", sample)


@pytest.mark.parametrize("kind", ["tiled_restore_edm_sampler", "tiled_restore_dpmpp2m_sampler"])
def test_replay_tiled_first_steps(kind):
    """The fixtures record every window's denoiser output for the first step(s): replay them, check the blend."""
    fx = fixture(kind)
    c, uc = conds(fx)
    ts, stride = fx.config["tile_size"], fx.config["tile_stride"]
    windows = S.sliding_windows(*fx.config["latent_hw"], ts, stride)
    fx.check("windows", torch.tensor(windows))
    fx.check("tile_weights", S.gaussian_weights(ts).expand(1, 4, ts, ts))
    edm = "edm" in kind
    for case in fx.config["cases"]:
        n, recorded = case["name"], 1 if edm else 2
        den = Replay(fx.outputs[f"{n}.tile.{i}.{j}.model_out"] for i in range(recorded) for j in range(len(windows)))
        cond = c
        if case["local_prompts"]:
            cond = [{"crossattn": fx.inputs[f"local.{j}.crossattn"], "vector": fx.inputs[f"local.{j}.vector"],
                     "control": c["control"]} for j in range(len(windows))]
        rec = []

        def callback(i, info):
            rec.append(info)
            if len(rec) == recorded:
                raise StopIteration

        def tile_callback(i, j, info):
            fx.check(f"{n}.tile.{i}.{j}.x", info["x"])
            if not edm:
                fx.check(f"{n}.tile.{i}.{j}.denoised", info["denoised"])

        kw = dict(num_steps=case["num_steps"], s_noise=case["s_noise"], cfg_scale=case["scale_min"],
                  cfg_scale_start=case["scale"], control_scale=case["control_scale"], tile_size=ts, tile_stride=stride,
                  eps_fn=lambda i: fx.inputs[f"{n}.eps.{i}"], callback=callback, tile_callback=tile_callback)
        with pytest.raises(StopIteration):
            if edm:
                linear = case["use_linear_control_scale"]
                S.sample_restore_edm(den, fx.inputs[f"{n}.noise"], fx.inputs["x_center"], cond, uc,
                                     s_churn=case["s_churn"], restore_cfg=case["restore_cfg"],
                                     control_scale_start=case["control_scale_start"] if linear else None, **kw)
            else:
                S.sample_restore_dpmpp2m(den, fx.inputs[f"{n}.noise"], cond, uc, eta=case["eta"], **kw)
        for i, info in enumerate(rec):
            fx.check(f"{n}.x.{i}", info["x"])
            if not edm:
                fx.check(f"{n}.denoised.{i}", info["denoised"])


# --- behaviour --------------------------------------------------------------------------------------------------

def test_seed_reproducible():
    den, (c, uc) = S.Denoiser(ToyNet()), toy_cond()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run = lambda seed: S.sample_restore_edm(den, noise, noise, c, uc, num_steps=6, s_churn=3.0,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed))
    a, b, other = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.allclose(a, other)
    dpm = lambda seed: S.sample_restore_dpmpp2m(den, noise, c, uc, num_steps=6,  # noqa: E731
                                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(dpm(3), dpm(3)) and not torch.allclose(dpm(3), dpm(4))


def test_dpmpp2m_eta0_is_deterministic_and_finite():
    den, (c, uc) = S.Denoiser(ToyNet()), toy_cond()
    noise = torch.randn(1, 4, 8, 8)
    drawn = []
    x = S.sample_restore_dpmpp2m(den, noise, c, uc, num_steps=6, eta=0.0, eps_fn=lambda i: drawn.append(i))
    assert torch.isfinite(x).all() and drawn == []
    steps = S.dpmpp2m_schedule(S.restore_dpmpp2m_sigmas(6), eta=0.0)
    assert (steps[-1].m1, steps[-1].m2) == (0.0, -1.0)  # the last step returns the denoised estimate
    assert steps[1].m1 == pytest.approx(steps[1].sigma_next / steps[1].sigma, rel=1e-6)


def test_dpmpp2m_batch2_matches_batch1():
    den = S.Denoiser(ToyNet())
    c, uc = toy_cond(2)
    noise = torch.randn(2, 4, 8, 8)
    eps = {i: torch.randn(2, 4, 8, 8) for i in range(8)}
    both = S.sample_restore_dpmpp2m(den, noise, c, uc, num_steps=8, cfg_scale=3.0, eps_fn=eps.__getitem__)
    for k in range(2):
        pick = lambda d: {key: v[k:k + 1] for key, v in d.items()}  # noqa: E731
        one = S.sample_restore_dpmpp2m(den, noise[k:k + 1], pick(c), pick(uc), num_steps=8, cfg_scale=3.0,
                                       eps_fn=lambda i: eps[i][k:k + 1])
        assert torch.allclose(both[k:k + 1], one, atol=1e-5)


def test_cfg_is_one_batched_call():
    net = ToyNet()
    c, uc = toy_cond(2)
    S.sample_restore_edm(S.Denoiser(net), torch.randn(2, 4, 8, 8), None, c, uc, num_steps=3, restore_cfg=0)
    assert len(net.calls) == 3 and all(call["x_in"].shape[0] == 4 for call in net.calls)
    assert torch.equal(net.calls[0]["y"], torch.cat([uc["vector"], c["vector"]]))  # [uncond; cond]
    net.calls.clear()
    S.sample_restore_edm(S.Denoiser(net), torch.randn(2, 4, 8, 8), None, c, None, num_steps=3, restore_cfg=0)
    assert all(call["x_in"].shape[0] == 2 for call in net.calls)


def test_linear_control_and_cfg_schedules():
    steps = S.edm_schedule(S.legacy_ddpm_sigmas(8), cfg_scale=4.0, cfg_scale_start=7.5,
                           control_scale=0.9, control_scale_start=0.2, restore_cfg=4.0)
    assert steps[0].control_scale == pytest.approx(0.2, abs=1e-5)
    assert steps[-1].control_scale == pytest.approx(0.9, abs=0.03)
    assert steps[0].cfg_scale == pytest.approx(7.5, abs=1e-4) and steps[-1].cfg_scale < 4.1
    assert steps[-1].restore_weight == 0 and steps[0].restore_weight == pytest.approx(1.0, abs=1e-4)


def test_lightning_uses_trailing_timesteps():
    net = ToyNet()
    c, _ = toy_cond()
    x = S.sample_lightning(S.Denoiser(net), torch.randn(1, 4, 8, 8), None, c, num_steps=4)
    assert [call["t"].item() for call in net.calls] == [999, 749, 499, 249] and torch.isfinite(x).all()


def test_windows_cover_latent():
    for h, w, tile, stride in [(24, 44, 16, 8), (16, 16, 16, 8), (37, 50, 16, 12), (10, 40, 16, 8)]:
        windows = S.sliding_windows(h, w, tile, stride)
        covered = torch.zeros(h, w, dtype=torch.int64)
        for hi, he, wi, we in windows:
            assert he - hi == min(tile, h) and we - wi == min(tile, w)
            covered[hi:he, wi:we] += 1
        assert (covered > 0).all() and windows[-1][1] == h and windows[-1][3] == w
    assert S.sliding_windows(24, 44, 16, 8)[:5] == [(0, 16, 0, 16), (0, 16, 8, 24), (0, 16, 16, 32), (0, 16, 24, 40),
                                                    (0, 16, 28, 44)]
    g = S.gaussian_weights(16)
    assert torch.equal(g, g.flip(1)) and not torch.equal(g, g.flip(0)) and g.argmax() // 16 == 8


def test_tiling_batches_and_single_window():
    den = S.Denoiser(ToyNet())
    c, uc = toy_cond(1, 24, 40)
    noise, center = torch.randn(1, 4, 24, 40), torch.randn(1, 4, 24, 40)
    kw = dict(num_steps=4, s_churn=2.0, eps_fn=lambda i: torch.full((1, 4, 24, 40), 0.1 * i))
    one = S.sample_restore_edm(den, noise, center, c, uc, tile_size=16, tile_stride=8, **kw)
    three = S.sample_restore_edm(den, noise, center, c, uc, tile_size=16, tile_stride=8, tile_batch_size=3, **kw)
    assert torch.allclose(one, three, atol=1e-5)
    full = S.sample_restore_edm(den, noise, center, c, uc, **kw)
    assert torch.allclose(full, S.sample_restore_edm(den, noise, center, c, uc, tile_size=64, **kw), atol=1e-5)
    dpm = [S.sample_restore_dpmpp2m(den, noise, c, uc, num_steps=5, tile_size=16, tile_stride=8, tile_batch_size=b,
                                    generator=torch.Generator().manual_seed(0)) for b in (1, 4)]
    assert torch.allclose(*dpm, atol=1e-5)
    with pytest.raises(ValueError):
        S.sample_restore_edm(den, noise, center, [c, c], uc, tile_size=16, tile_stride=8)
