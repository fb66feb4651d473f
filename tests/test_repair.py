"""Mask-guided repair on a tiny random SUPIR: what is outside the mask is kept, in the latent and in pixels."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from mini_supir import pipeline, presets, repair, sampler, supir
from mini_supir.pipeline import Restorer
from mini_supir.presets import RestoreSettings

FAST = RestoreSettings(min_size=0, steps=3)


@pytest.fixture(scope="module")
def restorer():
    return Restorer.random(supir.TINY, seed=0, device="cpu")


def photo(w=128, h=96, mode="RGB") -> Image.Image:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(0)
    rgb = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 90 + 128
    rgb = rgb + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert(mode)


def scratch(w=128, h=96) -> torch.Tensor:
    """A feathered diagonal scratch, as mask.feather makes it: 1 on the line, 0 a few px away."""
    hard = torch.zeros(h, w, dtype=torch.bool)
    for i in range(20, 60):
        hard[i, i + 30:i + 32] = True
    return repair.soft_mask(hard)


def test_prefill_keeps_known_pixels_and_fills_smoothly():
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 80), indexing="ij")
    img = torch.stack([x, y, 0.5 * x + 0.3 * y])[None]
    hole = torch.zeros(1, 1, 64, 80, dtype=torch.bool)
    hole[..., 10:40, 20:30] = True   # a 30 x 10 px patch
    hole[..., 50, :] = True          # a line across the image
    out = repair.prefill(img, hole)
    assert torch.equal(out[~hole.expand_as(img)], img[~hole.expand_as(img)])
    # a linear ramp is harmonic: the membrane fill should land near it (measured: max error 0.018)
    assert (out - img).abs().max() < 0.03
    assert torch.equal(repair.prefill(img, torch.ones_like(hole)), img)  # nothing known: nothing to fill from


def test_latent_mask_covers_every_touched_latent():
    m = scratch()[None, None]
    lat = repair.latent_mask(m, 8)
    assert lat.shape == (1, 1, 12, 16)
    touched = torch.nn.functional.max_pool2d((m > 0).float(), 8) > 0
    assert (lat[touched] == 1).all() and (lat == 0).any() and ((lat > 0) & (lat < 1)).any()


SAMPLERS = {  # name: (settings, sigmas the sampler steps to)
    "edm": (replace(FAST, s_churn=0.0), sampler.legacy_ddpm_sigmas(3)),
    "edm-no-control": (replace(FAST, s_churn=0.0, control_scale=0.0), sampler.legacy_ddpm_sigmas(3)),
    "dpmpp2m": (replace(presets.LIGHTNING, min_size=0, steps=3, eta=0.0), sampler.restore_dpmpp2m_sigmas(3)),
    "lightning": (replace(presets.EULER_LIGHTNING, min_size=0, steps=3), sampler.trailing_sigmas(3)),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_outside_mask_latent_follows_the_renoised_input(restorer, monkeypatch, name):
    """After every step, outside the latent mask x = z_known + sigma_next * n, n the start noise (with the
    deterministic samplers: EDM without churn, DPM++ 2M with eta 0, Euler), ending at z_known."""
    settings, sigmas = SAMPLERS[name]
    image, m = photo(256, 192), scratch(256, 192)  # the latent mask reaches ~5 latents (40 px) past the damage
    prepared, known = restorer.prepare_repair(pipeline.prepare(image, settings), m, settings)
    outside = (known.mask == 0).expand_as(known.z)
    assert 0.3 < outside.float().mean() < 0.9
    st1 = restorer.stage1(prepared.lq, settings)
    steps = []
    real = sampler.SAMPLERS[settings.sampler]

    def spy(*args, callback, **kwargs):  # record every step's latent
        return real.sample(*args, callback=lambda i, info: steps.append(info["x"]) or callback(i, info), **kwargs)
    monkeypatch.setitem(sampler.SAMPLERS, settings.sampler, replace(real, sample=spy))
    generator = torch.Generator().manual_seed(0)
    final = restorer.sample(st1, settings, generator, known=known)
    generator = torch.Generator().manual_seed(0)
    restorer.vae.encode(st1.x_stage1, sample=True, generator=generator)  # the draw sample() makes first
    n = torch.randn(known.z.shape, generator=generator)
    assert len(steps) == 3
    for x, sigma in zip(steps, sigmas[1:]):
        torch.testing.assert_close(x[outside], (known.z + sigma * n)[outside], atol=2e-5, rtol=0)
        assert (x[~outside] - (known.z + sigma * n)[~outside]).abs().max() > 0.1  # generated inside
    torch.testing.assert_close(final[outside], known.z[outside], atol=1e-6, rtol=0)


def test_tiled_repair_keeps_the_known_latent(restorer):
    """z_known and the mask travel in cond["control"], so every window cuts its own part of them."""
    settings = replace(FAST, s_churn=0.0)
    prepared, known = restorer.prepare_repair(pipeline.prepare(photo(256, 192), settings), scratch(256, 192), settings)
    st1 = restorer.stage1(prepared.lq, settings)
    run = lambda s: restorer.sample(st1, s, torch.Generator().manual_seed(0), known=known)  # noqa: E731
    whole = run(settings)
    tiled = run(replace(settings, tile_size=128, tile_stride=64))  # 2 x 3 windows of 16 x 16 latents
    outside = (known.mask == 0).expand_as(known.z)
    assert (~outside).any() and outside.any()
    for latent in (whole, tiled):
        torch.testing.assert_close(latent[outside], known.z[outside], atol=1e-6, rtol=0)
    assert not torch.allclose(tiled, whole, atol=1e-2)


@pytest.fixture(scope="module")
def lora_restorer(style_lora):
    return Restorer.random(supir.TINY, seed=0, loras=((style_lora, 1.0),), device="cpu")


@pytest.mark.parametrize("variant", ["edm", "dpmpp2m", "no-control", "lora", "tiled", "grey", "rgba", "min-size"])
def test_pixels_outside_the_mask_are_byte_identical(restorer, lora_restorer, variant):
    settings = {"edm": FAST, "dpmpp2m": replace(presets.LIGHTNING, min_size=0, steps=3), "no-control": replace(FAST, control_scale=0),
                "lora": FAST, "tiled": replace(FAST, tile_size=64), "grey": FAST, "rgba": FAST,
                "min-size": replace(FAST, min_size=192)}[variant]
    image = photo(mode={"grey": "L", "rgba": "RGBA"}.get(variant, "RGB"))
    m = scratch()
    out = (lora_restorer if variant == "lora" else restorer).restore(image, settings, seed=0, mask=m)
    assert out.mode == image.mode and out.size == image.size
    a, b = np.asarray(out).astype(int), np.asarray(image).astype(int)
    keep = (m == 0).numpy()
    assert np.array_equal(a[keep], b[keep])
    assert np.abs(a[(m == 1).numpy()] - b[(m == 1).numpy()]).mean() > 5  # the scratch was regenerated


def test_lora_and_control_change_the_repair(restorer, lora_restorer):
    m = scratch()
    plain = np.asarray(restorer.restore(photo(), FAST, seed=0, mask=m))
    assert not np.array_equal(plain, np.asarray(lora_restorer.restore(photo(), FAST, seed=0, mask=m)))
    no_control = restorer.restore(photo(), replace(FAST, control_scale=0), seed=0, mask=m)
    assert not np.array_equal(plain, np.asarray(no_control))


def test_repair_refuses_upscaling_and_wrong_mask_size(restorer):
    with pytest.raises(ValueError, match="upscale 1"):
        restorer.restore(photo(), replace(FAST, upscale=2), mask=scratch())
    with pytest.raises(ValueError, match="mask is"):
        restorer.restore(photo(), FAST, mask=scratch(64, 64))


def test_composite_is_exact_where_the_weight_is_0_or_1():
    a, b = photo(), Image.new("RGB", (128, 96), (10, 200, 30))
    m = torch.zeros(96, 128)
    m[:, :40], m[:, 40:60] = 1.0, 0.5
    out = np.asarray(repair.composite(b, a, m)).astype(int)
    assert np.array_equal(out[:, :40], np.asarray(b)[:, :40]) and np.array_equal(out[:, 60:], np.asarray(a)[:, 60:])
    mid = (np.asarray(a)[:, 40:60].astype(int) + np.asarray(b)[:, 40:60]) / 2
    assert np.abs(out[:, 40:60] - mid).max() <= 1
