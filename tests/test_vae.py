"""SDXL VAE: checkpoint layout, SUPIR's denoise encoder, posterior sampling, exact tiling, fp16 refusal."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import REFERENCE, Fixture
from mini_supir.vae import SCALE_FACTOR, SDXL_VAE, TINY, AutoencoderKL

IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "images"
needs_reference = pytest.mark.skipif(not (REFERENCE / "vae").is_dir(), reason=f"no reference fixtures under {REFERENCE}")


def manifest_keys(name: str, prefix: str) -> dict[str, list[int]]:
    keys = json.loads((REFERENCE / "manifests" / name).read_text())["keys"]
    return {k[len(prefix):]: v["shape"] for k, v in keys.items() if k.startswith(prefix)}


@needs_reference
def test_sdxl_vae_matches_checkpoint_layout():
    with torch.device("meta"):
        model = AutoencoderKL(SDXL_VAE, denoise_encoder=True)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = manifest_keys("sdxl_base.json", "first_stage_model.")
    expected |= {"denoise_encoder." + k: v for k, v in manifest_keys("supir_v0.json", "first_stage_model.denoise_encoder.").items()}
    assert ours == expected
    assert sum(v.numel() for k, v in model.state_dict().items() if not k.startswith("denoise_encoder.")) == 83_653_863


@needs_reference
@torch.no_grad()
def test_denoise_encoder_is_used_with_denoise():
    fx = Fixture(REFERENCE / "vae")
    torch.manual_seed(0)
    model = AutoencoderKL(TINY, denoise_encoder=True).eval()  # `encoder` keeps its random init
    weights = {("denoise_" + k if k.startswith("encoder.") else k): v for k, v in fx.weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert all(k.startswith("encoder.") for k in missing) and not unexpected
    image, mean = fx.inputs["image"], fx.outputs["mean"]
    assert torch.allclose(model.encode(image, denoise=True) / SCALE_FACTOR, mean, atol=5e-5, rtol=1e-4)
    assert (model.encode(image) / SCALE_FACTOR - mean).abs().max() > 0.1
    with pytest.raises(ValueError, match="denoise_encoder"):
        AutoencoderKL(TINY).encode(image, denoise=True)


@needs_reference
@torch.no_grad()
def test_sampled_encode_uses_the_given_noise():
    fx = Fixture(REFERENCE / "vae")
    model = AutoencoderKL(TINY).eval()
    model.load_state_dict(fx.weights)
    image, mean = fx.inputs["image"], fx.outputs["mean"]
    std = torch.exp(0.5 * fx.outputs["logvar"])
    expected = SCALE_FACTOR * (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(7)))
    ours = model.encode(image, sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(ours, expected, atol=1e-5)
    torch.manual_seed(7)  # no generator: the global CPU RNG, like sgm's DiagonalGaussianDistribution.sample
    assert torch.allclose(model.encode(image, sample=True), expected, atol=1e-5)


def photo(height: int, width: int, batch: int = 2) -> torch.Tensor:
    """Non-square crops of a real photo in [-1, 1], different per batch item."""
    img = torch.from_numpy(np.array(Image.open(IMAGES / "astronaut.png").convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
    return torch.stack([img[:, 40 * i:40 * i + height, 64 * i:64 * i + width] for i in range(batch)])


@pytest.mark.skipif(not IMAGES.is_dir(), reason="no shared/images")
@torch.no_grad()
def test_tiled_equals_untiled_on_a_photo():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY).eval()
    image = photo(112, 168)  # latent 14 x 21: a 2 x 3 grid of uneven tiles below
    z = model.encode(image)
    z_tiled = model.encode(image, tile=64)
    # measured: 4.3e-7 max abs (|z| <= 0.15): float32 rounding, not an approximation
    assert (z_tiled - z).abs().max() < 5e-6
    x = model.decode(z)
    x_tiled = model.decode(z, tile=8)
    # measured: 1.3e-5 max abs, 3.4e-7 mean (|x| <= 3.6), as large as float32 vs float64 untiled
    assert (x_tiled - x).abs().max() < 2e-4 and (x_tiled - x).abs().mean() < 3e-6


def test_float16_is_refused():
    model = AutoencoderKL(TINY).half()
    with pytest.raises(ValueError, match="float16"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="float16"):
        model.decode(torch.zeros(1, 4, 4, 4))


@torch.no_grad()
def test_bfloat16_tiled_is_as_close_to_float32_as_untiled():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY).eval()
    image = torch.rand(1, 3, 64, 48) * 2 - 1
    z32 = model.encode(image)
    x32 = model.decode(z32)
    model.to(torch.bfloat16)
    rel = lambda a, b: ((a - b).abs().mean() / b.abs().mean()).item()
    z, z_tiled = model.encode(image), model.encode(image, tile=32)
    x, x_tiled = model.decode(z32), model.decode(z32, tile=4)
    assert z_tiled.dtype == x_tiled.dtype == torch.float32 and x_tiled.shape == image.shape
    # a random network amplifies bfloat16 rounding; tiling adds no error of its own (measured relative
    # mean error vs float32: latents 1.7% untiled / 1.4% tiled, images 4.1% / 4.0%)
    assert rel(z, z32) < 0.03 and rel(z_tiled, z32) < 1.5 * rel(z, z32)
    assert rel(x, x32) < 0.08 and rel(x_tiled, x32) < 1.5 * rel(x, x32)
