"""SUPIR's control path (SUPIR/modules/SUPIR_v0.py): the GLVControl encoder, the ZeroSFT / ZeroCrossAttn
connectors, the connector-fed SDXL decoder (LightGLVUNet) and the ControlWrapper pairing them (checkpoint
prefix `model.`).

SUPIR (Yu et al. 2024, sec. 3.2) trims a copy of the SDXL encoder into a control encoder fed with the
low-quality latent, and injects its features into the UNet decoder through zero-initialised SFT layers
(spatial feature transform: per-pixel scale and shift predicted from the control feature) and, at the
upsampling blocks, cross-attention from the decoder features to the control features. Initialised as in
the official code (the hint conv and the SFT convs at zero), a fresh model ignores the LQ latent: training
starts from a control path that steers nothing and learns to listen.
"""
from __future__ import annotations

import torch
from torch import nn

from .unet import CrossAttention, UNet, UNetConfig, UNetEncoder, Upsample, group_norm, layer_forward


def zero(module: nn.Module) -> nn.Module:
    """sgm's `zero_module`: every parameter set to zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ZeroSFT(nn.Module):
    """Modulate `h` (a skip connection, or the middle block output) by control feature `c`.

    With `concat_channels` the running decoder features `h_ori` are prepended first, so the output is the
    already-concatenated input of the next output block. `control_scale` blends with the unmodulated input.
    """

    def __init__(self, label_nc: int, norm_nc: int, concat_channels: int = 0, nhidden: int = 128):
        super().__init__()
        self.param_free_norm = group_norm(norm_nc + concat_channels)  # affine, despite the (SPADE) name
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, 3, padding=1), nn.SiLU())
        self.zero_mul = zero(nn.Conv2d(nhidden, norm_nc + concat_channels, 3, padding=1))  # SUPIR_v0.py:82
        self.zero_add = zero(nn.Conv2d(nhidden, norm_nc + concat_channels, 3, padding=1))  # SUPIR_v0.py:83
        self.zero_conv = zero(nn.Conv2d(label_nc, norm_nc, 1))                              # SUPIR_v0.py:87

    def forward(self, c: torch.Tensor, h: torch.Tensor, h_ori: torch.Tensor | None = None,
                control_scale: float = 1.0) -> torch.Tensor:
        out = h + self.zero_conv(c)
        if h_ori is not None:
            out = torch.cat([h_ori, out], dim=1)
        actv = self.mlp_shared(c)
        # norm(h) * (1 + gamma) + beta, in place (autograd needs none of the overwritten values): these are
        # the decoder's largest tensors, and rebinding `out` first frees the concatenation
        out = self.param_free_norm(out)
        out = out.mul_(self.zero_mul(actv).add_(1)).add_(self.zero_add(actv))
        if control_scale == 1:  # the blend below gives exactly `out` (for finite inputs): skip its copies
            return out
        h_raw = h if h_ori is None else torch.cat([h_ori, h], dim=1)
        return out * control_scale + h_raw * (1 - control_scale)


class ZeroCrossAttn(nn.Module):
    """Residual cross-attention from decoder features `x` (queries) to control feature `context`. Despite
    the name it starts random: the official zero init of `attn.to_out` is commented out (SUPIR_v0.py:136)."""

    def __init__(self, context_dim: int, query_dim: int):
        super().__init__()
        self.attn = CrossAttention(query_dim, context_dim, heads=query_dim // 64, dim_head=64)
        self.norm1 = group_norm(query_dim)
        self.norm2 = group_norm(context_dim)

    def forward(self, context: torch.Tensor, x: torch.Tensor, control_scale: float = 1.0) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.norm1(x).flatten(2).transpose(1, 2)
        ctx = self.norm2(context).flatten(2).transpose(1, 2)
        out = self.attn(q, ctx).transpose(1, 2).reshape(B, C, H, W)
        return x + out * control_scale


class GLVControl(UNetEncoder):
    """The UNet encoder (embeddings, input blocks, middle block) plus a hint conv for the LQ latent.

    Returns the output of every input block and of the middle block: one control feature per skip
    connection of the UNet (plus one for the middle), each as wide as the UNet feature it steers.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        # key .0; zero-initialised (SUPIR_v0.py:482), so the LQ latent enters through training only
        self.input_hint_block = nn.Sequential(zero(nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, xt: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor) -> list[torch.Tensor]:
        """`x`: the LQ latent (unscaled), `xt`: the UNet's (c_in-scaled) noisy input."""
        xt, context, y = xt.to(x.dtype), context.to(x.dtype), y.to(x.dtype)
        emb = self.embed(timesteps, y, x.dtype)
        hint = self.input_hint_block(x)
        hs, h = [], xt
        for i, block in enumerate(self.input_blocks):
            h = self.run(block, h, emb, context)
            if i == 0:  # the LQ latent enters once, added to the first feature map
                h = h + hint
            hs.append(h)
        hs.append(self.run(self.middle_block, h, emb, context))
        return hs


class LightGLVUNet(UNet):
    """SDXL's UNet whose decoder is steered by GLVControl's features through `project_modules` (ZeroSFT at
    every skip and after the middle block, ZeroCrossAttn before every Upsample)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        self.project_modules = connectors(self.skip_channels, self.decoder_layout)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                control: list[torch.Tensor], control_scale: float = 1.0) -> torch.Tensor:
        x, context, y = (t.to(control[0].dtype) for t in (x, context, y))  # runs in the control features' dtype
        h, hs, emb = self.encode(x, timesteps, context, y)
        # Connectors and control features are consumed from the end, middle block first; each output block's
        # skip is merged with h by a ZeroSFT (which also concatenates), and blocks that upsample get a
        # ZeroCrossAttn to the same control feature between their transformer and their Upsample.
        adapters, ctrl = iter(reversed(self.project_modules)), iter(reversed(control))
        c = next(ctrl)
        h = self.run(next(adapters), c, h, None, control_scale)
        for block in self.output_blocks:
            c = next(ctrl)
            h = self.run(next(adapters), c, hs.pop(), h, control_scale)
            if isinstance(block[-1], Upsample):
                for layer in block[:-1]:
                    h = self.run(layer_forward, layer, h, emb, context)
                h = self.run(next(adapters), c, h, control_scale)
                h = block[-1](h)
            else:
                h = self.run(block, h, emb, context)
        return self.out(h)


def connectors(skip_channels: list[int], decoder: list[tuple[int, int, bool]]) -> nn.ModuleList:
    """SUPIR's `project_modules` in checkpoint order (the reverse of the order the decoder uses them).

    ZeroSFT k modulates skip k (and control feature k, equally wide) and concatenates the running h of the
    output block that consumes it; the last one sits after the middle block. Each upsampling output block
    also gets a ZeroCrossAttn, listed just before its ZeroSFT. For SDXL this is the list LightGLVUNet
    hard-codes for mode="XL-base" (SUPIR_v0.py:543).
    """
    modules = nn.ModuleList()
    for k, skip in enumerate(skip_channels):
        h_in, width, upsample = decoder[len(decoder) - 1 - k]  # the output block that consumes skip k
        if upsample:
            modules.append(ZeroCrossAttn(context_dim=skip, query_dim=width))
        modules.append(ZeroSFT(label_nc=skip, norm_nc=skip, concat_channels=h_in))
    mid = skip_channels[-1]
    modules.append(ZeroSFT(label_nc=mid, norm_nc=mid, concat_channels=0))
    return modules


class ControlledUNet(nn.Module):
    """sgm's ControlWrapper: GLVControl features steer the connector-equipped UNet; returns float32 eps."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.control_model = GLVControl(cfg)
        self.diffusion_model = LightGLVUNet(cfg)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.diffusion_model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool):
        self.control_model.gradient_checkpointing = self.diffusion_model.gradient_checkpointing = enabled

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                control_latent: torch.Tensor, control_scale: float = 1.0) -> torch.Tensor:
        dtype = self.control_model.input_hint_block[0].weight.dtype  # the reference runs under autocast
        control = self.control_model(control_latent.to(dtype), timesteps, x.to(dtype), context, y)
        return self.diffusion_model(x, timesteps, context, y, control, control_scale).float()
