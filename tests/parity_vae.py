"""Parity of mini_supir.vae and mini_supir.colorfix with the `vae` and `colorfix` reference fixtures."""
import torch

from fixtures import Fixture, checks
from reference_configs import vae_config
from mini_supir.colorfix import (adaptive_instance_normalization, wavelet_blur, wavelet_decomposition,
                                 wavelet_reconstruction)
from mini_supir.vae import SCALE_FACTOR, AutoencoderKL


def load_vae(fx: Fixture, prefix: str = "", denoise_encoder: bool = False) -> AutoencoderKL:
    """The fixture's VAE; with `prefix`, its state dict is loaded under that prefix (e.g. into denoise_encoder)."""
    model = AutoencoderKL(vae_config(fx.config["constructor"]), denoise_encoder=denoise_encoder)
    model.load_state_dict({prefix + k: v for k, v in fx.weights.items()}, strict=True)
    return model.eval()


@checks("vae")
@torch.no_grad()
def check_vae(fx: Fixture):
    model = load_vae(fx)
    image, z = fx.inputs["image"], fx.inputs["z"]
    h_enc = model.encoder(image)
    moments = model.quant_conv(h_enc)
    mean, logvar = moments.chunk(2, dim=1)
    fx.check_all({"h_enc": h_enc, "moments": moments, "mean": mean, "logvar": logvar.clamp(-30.0, 20.0),
                  "decoded": model.decoder(model.post_quant_conv(z)),
                  "decoded_from_mean": model.decoder(model.post_quant_conv(mean))})
    # the public API (scaled latents) computes the same
    fx.check("mean", model.encode(image) / SCALE_FACTOR)
    fx.check("decoded", model.decode(z * SCALE_FACTOR))


@checks("colorfix")
def check_colorfix(fx: Fixture):
    content, style = fx.inputs["content"], fx.inputs["style"]
    high, low = wavelet_decomposition(content, levels=5)
    fx.check_all({"wavelet": wavelet_reconstruction(content, style),
                  "adain": adaptive_instance_normalization(content, style),
                  "content_high": high, "content_low": low,
                  "blur_r1": wavelet_blur(content, 1), "blur_r16": wavelet_blur(content, 16)})
