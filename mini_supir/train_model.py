"""Around the frozen SUPIR model of a LoRA run (train.py; pipeline.Restorer.load loads it and runs the
previews on it): the adapter targets, the captions' text conditioning, the VAE side of a training batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import lora
from .pipeline import Restorer
from .vae import AutoencoderKL

# "conv" adds the ResBlock convolutions (kohya's LoCon): the only adapters at the full latent resolution,
# where SDXL's UNet has no transformers.
TARGETS = {"attention": lora.ATTENTION, "transformer": lora.TRANSFORMER,
           "conv": lora.TRANSFORMER + ("in_layers.2", "out_layers.3", "skip_connection")}


class Captions:
    """Captions -> SDXL text conditioning: the text encoders on the device for the run, or (`cache`) every
    caption encoded once, up front, and the encoders freed (0.8 B parameters for SDXL)."""

    def __init__(self, restorer: Restorer, captions: list[str], device: torch.device, cache: bool):
        self.conditioner, self.cache = restorer.conditioner.to(device), None
        if cache:
            texts, self.cache = sorted(set(captions) | {""}), {}  # "": what caption dropout gives
            for i in range(0, len(texts), 16):
                with torch.no_grad():
                    out = self.conditioner.encode(texts[i:i + 16])
                self.cache.update({t: {k: v[j:j + 1] for k, v in out.items()} for j, t in enumerate(texts[i:i + 16])})
            restorer.free_text_encoders()
            self.conditioner = None

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict:
        if self.cache is not None:
            return {k: torch.cat([self.cache[c][k] for c in captions]) for k in ("crossattn", "vector")}
        return self.conditioner.encode(captions)


@torch.no_grad()
def encode_batch(vae: AutoencoderKL, batch: dict, device: torch.device, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 = HQ posterior sample, _z = denoise-encoder mode of the LQ, loss weight pooled to the latent grid)."""
    hq, lq = (batch[k].to(device) * 2 - 1 for k in ("hq", "lq"))
    x0 = vae.encode(hq, sample=True, generator=generator).float()
    z_lq = vae.encode(lq, denoise=True).float()
    weight = F.adaptive_avg_pool2d(batch["weight"].to(device).float(), x0.shape[-2:])
    return x0, z_lq, weight
