"""The restoration pipeline end to end on a tiny random SUPIR (restores nothing; checks the plumbing)."""
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import png_header
from mini_supir import pipeline, presets, supir, text
from mini_supir.images import ImageError
from mini_supir.pipeline import RestoreError, Restorer
from mini_supir.presets import RestoreSettings

FAST = RestoreSettings(min_size=0, steps=2)


@pytest.fixture(scope="module")
def restorer():
    return Restorer.random(supir.TINY, seed=0, device="cpu")


def photo(w=64, h=64, mode="RGB", seed=0) -> Image.Image:
    """Smooth colours plus some texture: a stand-in photo."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    rgb = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 90 + 128 + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert(mode)


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int32)


def test_processing_size_as_supir():
    # short side 384 -> 1024 (x 2.667): 1365.3 x 1024 -> multiples of 64; the result keeps the input size
    assert presets.processing_size(512, 384, 1, 1024) == ((1344, 1024), (512, 384))
    assert presets.processing_size(100, 60, 4, 0) == ((384, 256), (400, 240))
    assert presets.processing_size(2000, 1000, 1, 1024) == ((2048, 1024), (2000, 1000))  # 1000 -> 1024 first
    assert presets.processing_size(1500, 1100, 1, 1024) == ((1472, 1088), (1500, 1100))
    assert presets.processing_size(10, 10, 1, 0) == ((64, 64), (10, 10))


def test_presets_are_supirs_settings():
    q, f = presets.QUALITY, presets.FIDELITY
    assert (q.sampler, q.steps, q.cfg, q.cfg_start, q.control_scale, q.restore_cfg, q.s_noise) == \
        ("edm", 50, 7.5, 4.0, 1.0, 4.0, 1.003)
    assert (f.cfg, f.cfg_start) == (4.0, 1.0)
    light_q, light_f = presets.preset("quality", "dpmpp2m"), presets.preset("fidelity", "dpmpp2m")
    assert (light_q.steps, light_q.cfg, light_q.cfg_start, light_f.cfg, light_f.cfg_start) == (8, 2.0, 2.0, 1.5, 1.5)
    assert q.positive == text.DEFAULT_POSITIVE and q.negative == text.DEFAULT_NEGATIVE


def test_settings_validate_and_round_trip():
    with pytest.raises(ValueError, match="sampler"):
        RestoreSettings(sampler="ddim")
    with pytest.raises(ValueError, match="multiple of 64"):
        RestoreSettings(tile_size=100)
    with pytest.raises(ValueError, match="tile_stride"):
        RestoreSettings(tile_size=512, tile_stride=1024)
    s = replace(FAST, prompt="a red car", tile_size=1024, tile_stride=512, cfg_start=None)
    assert RestoreSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown"):
        RestoreSettings.from_dict({**s.to_dict(), "guidance": 3})


def test_prompt_joins_caption_and_quality_prompt():
    s = replace(FAST, prompt="a cat.")
    assert s.positive_text == "a cat. " + text.DEFAULT_POSITIVE
    # SUPIR concatenates without a separator; after punctuation the space changes no token
    assert torch.equal(text.tokenize(s.positive_text), text.tokenize("a cat." + text.DEFAULT_POSITIVE))
    assert FAST.positive_text == text.DEFAULT_POSITIVE


def test_same_seed_same_image_and_exact_output_size(restorer):
    s = replace(FAST, upscale=1.5)
    a = restorer.restore(photo(64, 48), s, seed=3)
    assert a.size == (96, 72) and a.mode == "RGB"  # processed at 128x64, resized back to 1.5x
    assert np.array_equal(pixels(a), pixels(restorer.restore(photo(64, 48), s, seed=3)))
    assert np.abs(pixels(a) - pixels(restorer.restore(photo(64, 48), s, seed=4))).mean() > 1


def test_sample_k_uses_seed_plus_k(restorer):
    two = restorer.restore_samples(photo(), replace(FAST, num_samples=2), seed=5)
    assert len(two) == 2
    assert np.array_equal(pixels(two[1]), pixels(restorer.restore(photo(), FAST, seed=6)))


def test_alpha_and_greyscale_inputs(restorer):
    rgba = photo(64, 64, "RGBA")
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)), "L")
    rgba.putalpha(alpha)
    out = restorer.restore(rgba, FAST, seed=0)
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out.getchannel("A")), np.asarray(alpha))
    assert restorer.restore(photo(64, 64, "L"), FAST, seed=0).mode == "L"
    deep = Image.fromarray(np.asarray(photo(64, 64, "L")).astype(np.uint16) * 257)  # 16-bit greyscale
    assert restorer.restore(deep, FAST, seed=0).mode == "L"


def test_text_encoders_run_once_per_prompt(restorer, monkeypatch):
    calls = []
    encode = restorer.conditioner.encode
    monkeypatch.setattr(restorer.conditioner, "encode", lambda texts, **kw: calls.append(texts) or encode(texts, **kw))
    s = replace(FAST, prompt="a lighthouse at dusk")
    restorer.restore(photo(), s, seed=0)
    restorer.restore(photo(), s, seed=1)
    assert calls in ([[s.positive_text]], [sorted([s.positive_text, s.negative])])  # negative: maybe cached before
    assert restorer._text[s.positive_text]["crossattn"].shape == (1, 77, 96)


def test_freed_text_encoders_keep_cached_prompts(restorer):
    conditioner = restorer.conditioner
    restorer.encode_prompts([FAST.positive_text, FAST.negative])
    restorer.free_text_encoders()
    try:
        assert restorer.model.conditioner is None
        restorer.restore(photo(), FAST, seed=0)
        with pytest.raises(RestoreError, match="freed"):
            restorer.restore(photo(), replace(FAST, prompt="never seen"), seed=0)
    finally:
        restorer.model.conditioner = restorer.conditioner = conditioner


def test_samplers_and_cfg_free_lightning(restorer):
    batch_sizes = []
    network = restorer.denoiser.network
    restorer.denoiser.network = lambda x, *a: batch_sizes.append(x.shape[0]) or network(x, *a)
    try:
        for s in (replace(presets.LIGHTNING, min_size=0, steps=2), replace(presets.EULER_LIGHTNING, min_size=0, steps=2)):
            assert np.isfinite(pixels(restorer.restore(photo(), s, seed=0))).all()
    finally:
        restorer.denoiser.network = network
    assert batch_sizes == [2, 2, 1, 1]  # DPM++ runs [uncond; cond]; Lightning at CFG 1 skips uncond


def test_tiled_sampling(restorer):
    st1 = restorer.stage1(pipeline.prepare(photo(128, 128), FAST).lq, FAST)
    run = lambda s: restorer.sample(st1, s, torch.Generator().manual_seed(0))  # noqa: E731
    whole = run(FAST)
    one_window = run(replace(FAST, tile_size=128))  # the tile covers the latent: only the blend weights differ
    torch.testing.assert_close(one_window, whole, atol=1e-4, rtol=1e-4)
    tiled = run(replace(FAST, tile_size=64, tile_stride=64))  # 4 windows of 8x8 latents, no overlap
    assert torch.isfinite(tiled).all() and not torch.allclose(tiled, whole, atol=1e-2)


def test_tiled_vae_matches_untiled_with_bounded_tiles():
    # Random weights see much farther than trained ones: with them the tiles' 32 px (encoder) / 8 latent px
    # (decoder) of context are far too little. Zeroing each ResnetBlock's second conv leaves a VAE that sees
    # as locally as trained ones effectively do; then tiling must reproduce the whole-image result.
    restorer = Restorer.random(supir.TINY, seed=1, device="cpu")
    with torch.no_grad():
        for name, p in restorer.vae.named_parameters():
            if ".conv2." in name:
                p.zero_()
    lq = pipeline.prepare(photo(384, 256), FAST).lq
    seen = []
    hook = restorer.vae.denoise_encoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    try:
        tiled = restorer.stage1(lq, replace(FAST, tile_vae=True, vae_tile_size=256))
    finally:
        hook.remove()
    whole = restorer.stage1(lq, FAST)
    assert max(seen) < 384  # tiles plus their context margins, never the whole 384 px width
    torch.testing.assert_close(tiled.z_lq, whole.z_lq, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(tiled.x_stage1, whole.x_stage1, atol=1e-3, rtol=1e-3)


def test_color_fix_follows_stage1(restorer):
    st1 = restorer.stage1(pipeline.prepare(photo(), FAST).lq, FAST)
    latent = restorer.sample(st1, FAST, torch.Generator().manual_seed(0))
    out = {c: restorer.decode(latent, st1, replace(FAST, color_fix=c)) for c in presets.COLOR_FIXES}
    style_mean = st1.x_stage1.mean(dim=(2, 3))
    assert (out["adain"].mean(dim=(2, 3)) - style_mean).abs().max() < 0.05  # AdaIN takes the style's mean
    assert not torch.allclose(out["wavelet"], out["none"]) and not torch.allclose(out["adain"], out["none"])


def test_nan_during_sampling_is_an_error(restorer):
    weight = restorer.unet.diffusion_model.out[2].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0, 0, 0] = float("nan")
    try:
        with pytest.raises(RestoreError, match="NaN.*step 1"):
            restorer.restore(photo(), FAST, seed=0)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_fp16_vae_is_refused(restorer):
    with pytest.raises(ValueError, match="bf16 or fp32"):
        Restorer(restorer.model, device="cpu", vae_dtype="fp16")



def test_open_image_refuses_bad_files(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        pipeline.open_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ImageError, match="not an image"):
        pipeline.open_image(tmp_path / "notes.png")
    photo(64, 64).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageError, match="cannot decode"):
        pipeline.open_image(tmp_path / "cut.png")
    huge = png_header(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(ImageError, match="needs tiling"):
        pipeline.open_image(huge, FAST)
    tiled = replace(FAST, tile_vae=True, tile_size=1024)
    with pytest.raises(ImageError, match="cannot decode"):  # allowed with tiling: fails only when decoded
        pipeline.open_image(huge, tiled)
    with pytest.raises(ImageError, match="MP this tool decodes"):
        pipeline.open_image(png_header(tmp_path / "huger.png", 30000, 30000), tiled)


def test_open_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    photo(64, 48).save(tmp_path / "rotated.jpg", exif=exif)
    assert pipeline.open_image(tmp_path / "rotated.jpg", FAST).size == (48, 64)


def test_bench_restore_prints_a_stage_table(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_restore
    bench_restore.main(["--model", "tiny", "--size", "64", "--steps", "1", "--device", "cpu"])
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == ["stage", "text encode", "stage 1", "sampling", "decode", "total"]
