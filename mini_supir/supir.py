"""The whole SUPIR model as one module tree whose state-dict keys are the official checkpoint keys.

    model.control_model.*                   GLVControl (SUPIR file)
    model.diffusion_model.*                 SDXL UNet (SDXL file) + project_modules.* connectors (SUPIR file)
    first_stage_model.{encoder,decoder,…}   SDXL VAE (SDXL file)
    first_stage_model.denoise_encoder.*     degradation-robust encoder (SUPIR file)
    conditioner.embedders.0.transformer.*   CLIP ViT-L/14 text tower (SDXL file)
    conditioner.embedders.1.model.*         OpenCLIP ViT-bigG/14 text tower (SDXL file)

So an SDXL single file plus a SUPIR file, merged, is exactly this module's state dict.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from . import text, unet, vae
from .control import ControlledUNet
from .text import Conditioner
from .weights import IGNORED_PREFIXES, CheckpointError, check_keys, load_into, read_state_dict, resolve


@dataclass(frozen=True)
class SUPIRConfig:
    unet: unet.UNetConfig
    vae: vae.VAEConfig
    clip: text.CLIPTextConfig
    openclip: text.OpenCLIPTextConfig


SDXL = SUPIRConfig(unet.SDXL_BASE, vae.SDXL_VAE, text.CLIP_L, text.OPENCLIP_BIGG)
# Random-weight presets for smoke tests and CPU benchmarks: same structure, tiny widths.
TINY = SUPIRConfig(unet.TINY, vae.TINY, text.TINY_CLIP, text.TINY_OPENCLIP)
MEDIUM = SUPIRConfig(unet.MEDIUM, vae.TINY, text.TINY_CLIP, text.TINY_OPENCLIP)
PRESETS = {"sdxl": SDXL, "tiny": TINY, "medium": MEDIUM}
SUPIR_PARTS = ("model.control_model.", "model.diffusion_model.project_modules.", "first_stage_model.denoise_encoder.")


class SUPIR(nn.Module):
    """Holds the networks under the names sgm's DiffusionEngine gives them."""

    def __init__(self, cfg: SUPIRConfig):
        super().__init__()
        self.model = ControlledUNet(cfg.unet)
        self.first_stage_model = vae.AutoencoderKL(cfg.vae, denoise_encoder=True)
        self.conditioner = Conditioner(cfg.clip, cfg.openclip)
        self.cfg = cfg


def build(cfg: SUPIRConfig = SDXL, device: str | torch.device = "meta") -> SUPIR:
    """Build without allocating (meta) or with random init on a real device (tiny presets, tests)."""
    with torch.device(device):
        return SUPIR(cfg)


def official_state_dict(sdxl: str | os.PathLike, supir: str | os.PathLike | None,
                        dtypes: dict[str, torch.dtype] | None = None, model: nn.Module | None = None
                        ) -> dict[str, torch.Tensor]:
    """SDXL single file overlaid with a SUPIR file; keys no module owns (see IGNORED_PREFIXES) dropped.
    `dtypes` maps key prefixes to the dtype each part is cast to as it is read (e.g. UNet in bf16, VAE fp32).
    With `model`, each file is checked against it on its own, so that a wrong file is the one named."""
    files = [(sdxl, read_state_dict(resolve(sdxl), dtypes))]
    if supir is not None:
        files.append((supir, read_state_dict(resolve(supir), dtypes)))
        if not any(k.startswith("model.control_model.") for k in files[1][1]):
            raise CheckpointError(f"{supir} is not a SUPIR checkpoint (no model.control_model.* keys)")
    sd = {}
    for name, part in files:
        part = {k: v for k, v in part.items() if not k.startswith(IGNORED_PREFIXES)}
        if model is not None:
            check_keys(model, part, os.fspath(name), partial=True)
        sd.update(part)
    return sd


def load(cfg: SUPIRConfig, sdxl: str | os.PathLike, supir: str | os.PathLike | None = None,
         dtypes: dict[str, torch.dtype] | None = None) -> SUPIR:
    """Meta-build the model and make the files' tensors its parameters (one copy in host RAM).
    Without a SUPIR file the control model, connectors and denoise encoder stay unloaded, which is
    refused: SUPIR needs both."""
    model = build(cfg, "meta")
    sd = official_state_dict(sdxl, supir, dtypes, model)
    # missing keys are blamed on the file that should hold them: the SUPIR file owns these three parts
    supir_missing = any(k.startswith(SUPIR_PARTS) and k not in sd for k in model.state_dict(keep_vars=True))
    load_into(model, sd, what=os.fspath(supir if supir_missing or supir is None else sdxl))
    return model.eval().requires_grad_(False)
