"""The SDXL UNet (sgm `UNetModel`, sgm/modules/diffusionmodules/openaimodel.py).

One config and one encoder (embeddings, input blocks, middle block) that SUPIR's control encoder reuses
(control.py, which also holds SUPIR's connector-fed decoder). Attribute names mirror the checkpoint keys
under `model.diffusion_model.` (e.g. `input_blocks.4.1.transformer_blocks.0.attn1.to_q`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (B,) timesteps, float32 (B, dim); sgm's exact op order.

    Arguments reach ~2000 where one float32 ulp is ~1e-4, so the frequencies are formed exactly as the
    reference does (-ln(P) * arange, then / half, then exp) to land on the same float32 values.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2)  # downsampling factors (1, 2, 4, ...) that get attention
    transformer_depth: tuple[int, ...] = (1, 2, 10)  # per level; the middle block uses the last
    num_head_channels: int = 64
    context_dim: int = 2048
    adm_in_channels: int = 2816

    def __post_init__(self):
        assert len(self.transformer_depth) == len(self.channel_mult), "one transformer depth per level"
        assert all(self.model_channels * m % 32 == 0 for m in self.channel_mult), "GroupNorm(32) needs widths % 32 == 0"
        attention_widths = [self.model_channels * m for lvl, m in enumerate(self.channel_mult) if 2 ** lvl in self.attention_resolutions]
        assert all(w % self.num_head_channels == 0 for w in attention_widths + [self.widths[-1]]), "widths must split into heads"

    @property
    def widths(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def has_attention(self, level: int) -> bool:
        return 2 ** level in self.attention_resolutions


# SUPIR_v0.yaml's network_config (= SDXL base 1.0): 2,567,463,684 parameters.
SDXL_BASE = UNetConfig()
# Smallest layout SUPIR's connectors accept (3 levels, 2 res blocks, attention at levels 1-2, widths >= 64
# there); context 96 / vector 1584 match the tiny text towers of text.py.
TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 1), num_head_channels=16,
                  context_dim=96, adm_in_channels=1584)
# SDXL's shape at 3/10 width with a shallower deepest level: a CPU-benchmarkable stand-in (71M parameters).
MEDIUM = UNetConfig(model_channels=96, channel_mult=(1, 2, 4), transformer_depth=(1, 1, 2), num_head_channels=64,
                    context_dim=96, adm_in_channels=1584)


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=eps)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (self-attention when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # checkpoint key to_out.0 (to_out.1 was Dropout(0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, _ = x.shape
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)  # in place: the widest activation of the UNet is not held twice


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 was a Dropout(0); an Identity keeps the checkpoint index net.2 for the output projection.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W tokens of a feature map, with linear in/out projections and a residual."""

    def __init__(self, channels: int, head_channels: int, depth: int, context_dim: int):
        super().__init__()
        heads = channels // head_channels
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, head_channels, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class ResBlock(nn.Module):
    """Two 3x3 convs with the (timestep + vector) embedding added in between; 1x1 skip if widths change."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # out_layers.2 was a Dropout(0); an Identity keeps the checkpoint index out_layers.3.
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference upsamples in float32 (old PyTorch lacked a bfloat16 kernel); nearest copies values, so
        # the native-dtype kernel gives the same bits without a float32 copy four times the input's size.
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Block(nn.Sequential):
    """One UNet block (sgm's TimestepEmbedSequential): each layer gets what it needs of (emb, context)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer_forward(layer, x, emb, context)
        return x


def layer_forward(layer: nn.Module, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, ResBlock):
        return layer(x, emb)
    if isinstance(layer, SpatialTransformer):
        return layer(x, context)
    return layer(x)


class UNetEncoder(nn.Module):
    """Embeddings, input blocks and middle block: the part SDXL's UNet and SUPIR's GLVControl share."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                     nn.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        self.skip_channels = [mc]  # width of each input block's output (the decoder's skip connections)
        ch = mc
        for level, width in enumerate(cfg.widths):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(Block(ResBlock(ch, emb_dim, width), *self.transformer(width, level)))
                ch = width
                self.skip_channels.append(ch)
            if level != len(cfg.widths) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                self.skip_channels.append(ch)
        self.middle_block = Block(ResBlock(ch, emb_dim, ch),
                                  SpatialTransformer(ch, cfg.num_head_channels, cfg.transformer_depth[-1], cfg.context_dim),
                                  ResBlock(ch, emb_dim, ch))
        # Opt-in activation checkpointing for training (recompute each block in backward); same numerics.
        self.gradient_checkpointing = False

    def transformer(self, width: int, level: int) -> list[nn.Module]:
        """The SpatialTransformer that follows each ResBlock on attention levels (none elsewhere)."""
        if not self.cfg.has_attention(level):
            return []
        return [SpatialTransformer(width, self.cfg.num_head_channels, self.cfg.transformer_depth[level], self.cfg.context_dim)]

    def run(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(dtype)
        return self.time_embed(t_emb) + self.label_emb(y)


class UNet(UNetEncoder):
    """SDXL's eps-prediction UNet: the encoder, then output blocks that each take one skip connection."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        emb_dim, skips = cfg.model_channels * 4, list(self.skip_channels)
        ch = skips[-1]
        self.output_blocks = nn.ModuleList()
        # per output block: (width of the running h it receives, its own width, whether it upsamples)
        self.decoder_layout: list[tuple[int, int, bool]] = []
        for level, width in reversed(list(enumerate(cfg.widths))):
            for i in range(cfg.num_res_blocks + 1):
                skip = skips.pop()
                layers = [ResBlock(ch + skip, emb_dim, width), *self.transformer(width, level)]
                upsample = level > 0 and i == cfg.num_res_blocks
                if upsample:
                    layers.append(Upsample(width))
                self.output_blocks.append(Block(*layers))
                self.decoder_layout.append((ch, width, upsample))
                ch = width
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(middle block output, every input block's output (the skips), the timestep + vector embedding)."""
        emb = self.embed(timesteps, y, x.dtype)
        hs, h = [], x
        for block in self.input_blocks:
            h = self.run(block, h, emb, context)
            hs.append(h)
        return self.run(self.middle_block, h, emb, context), hs, emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, hs, emb = self.encode(x, timesteps, context, y)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)  # rebound before the call, so the previous h is freed now
            h = self.run(block, h, emb, context)
        return self.out(h)
