"""SDXL's KL autoencoder (sgm `AutoencoderKL`) with SUPIR's denoise encoder and an exact tiled encode/decode.

Module names mirror the `first_stage_model.*` checkpoint keys. `encode` returns and `decode` takes latents
already multiplied by SCALE_FACTOR, the form the diffusion model works in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

SCALE_FACTOR = 0.13025  # SDXL's latent scale: SUPIR multiplies encoded latents by it and divides before decoding
GROUPS = 32


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


SDXL_VAE = VAEConfig()
TINY = VAEConfig(ch=32, ch_mult=(1, 1, 1, 2))  # same 8x downsampling as SDXL; 32 groups need ch >= 32


class GroupNorm(nn.GroupNorm):
    """The VAE's `Normalize`: GroupNorm(32, C, eps=1e-6).

    `stats` = (mean, var), each (B, 32), replaces the statistics of `x` when `x` is only a tile of the
    feature map being normalised (tiled encode/decode)."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels, eps=1e-6)

    def forward(self, x, stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        if stats is None:
            return super().forward(x)
        # fold the statistics into a per-(batch, channel) affine map: one pass over the tile
        mean, var = (s.to(x.device).repeat_interleave(x.shape[1] // GROUPS, dim=1) for s in stats)
        scale = self.weight.float() * torch.rsqrt(var + self.eps)
        shift = self.bias.float() - mean * scale
        return torch.addcmul(shift[:, :, None, None], x.float(), scale[:, :, None, None]).to(x.dtype)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = GroupNorm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    # The block is two halves, each GroupNorm -> SiLU -> 3x3 conv: the units of tiled execution, where
    # `stats` carries the whole feature map's GroupNorm statistics.
    def first_half(self, x, stats=None):
        return self.conv1(F.silu(self.norm1(x, stats)))

    def second_half(self, h, x, stats=None):
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h, stats)))

    def forward(self, x):
        return self.second_half(self.first_half(x), x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (only at the latent resolution, in `mid`)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = GroupNorm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        # contiguous: with strided inputs the CPU SDPA falls back to materialising the (HW)^2 score matrix
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c").contiguous() for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # default scale C**-0.5, as in sgm
        return x + self.proj_out(rearrange(h, "b 1 (h w) c -> b c h w", h=x.shape[2]))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # sgm pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """`down.i` / `up.i`: ResnetBlocks, then the level's `downsample` or `upsample` if it has one."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, downsample: bool = False, upsample: bool = False):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(num_blocks))
        if downsample:
            self.downsample = Downsample(out_ch)
        if upsample:
            self.upsample = Upsample(out_ch)

    def forward(self, h):
        for block in self.block:
            h = block(h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> (B, 2*z_channels, H/8, W/8) (mean and log-variance before quant_conv).

    `down_path` (convolutions, GroupNorms) is what tiling splits; `mid_path` runs at the latent resolution
    and holds the only global operation besides GroupNorm, the attention."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in (1, *cfg.ch_mult)]
        last = len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(Level(widths[i], widths[i + 1], cfg.num_res_blocks, downsample=i != last)
                                  for i in range(len(cfg.ch_mult)))
        self.mid = MidBlock(widths[-1])
        self.norm_out = GroupNorm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def down_path(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return h

    def mid_path(self, h):
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

    def forward(self, x):
        return self.mid_path(self.down_path(x))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, 8h, 8w): `mid_path` then `up_path` (see Encoder)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # up.i is indexed by level like down.i; it runs from the deepest level to up.0
        self.up = nn.ModuleList(Level(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1,
                                      upsample=i != 0) for i in range(len(widths)))
        self.norm_out = GroupNorm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def mid_path(self, z):
        return self.mid(self.conv_in(z))

    def out(self, h, stats=None):
        return self.conv_out(F.silu(self.norm_out(h, stats)))

    def up_path(self, h):
        for level in reversed(self.up):
            h = level(h)
        return self.out(h)

    def forward(self, z):
        return self.up_path(self.mid_path(z))


class AutoencoderKL(nn.Module):
    """The SDXL VAE (`first_stage_model`), optionally with SUPIR's `denoise_encoder`.

    Images are (B, 3, H, W) in [-1, 1]; latents are (B, 4, H/8, W/8) and SCALED (x SCALE_FACTOR). Inputs are
    cast to the weights' dtype; latents and images come back in float32. `tile` switches to the
    exact tiled path (see `_Tiler`): same result up to float rounding, bounded accelerator memory."""

    def __init__(self, cfg: VAEConfig, denoise_encoder: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        if denoise_encoder:
            self.denoise_encoder = Encoder(cfg)  # SUPIR's degradation-robust copy of `encoder`; shares quant_conv
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def _weights(self) -> torch.Tensor:
        """A weight tensor standing for the model's dtype and device, once float16 has been ruled out."""
        w = self.quant_conv.weight
        if w.dtype == torch.float16:
            raise ValueError("the SDXL VAE overflows to inf/NaN in float16: run it in bfloat16 or float32")
        return w

    def encode(self, x, *, denoise: bool = False, sample: bool = False, generator: torch.Generator | None = None,
               tile: int | None = None):
        """Image -> scaled latent.

        denoise: use `denoise_encoder` (SUPIR stage 1: `encode(lq, denoise=True)`).
        sample: return `mean + std * noise` instead of the posterior mean (SUPIR's re-encode of the stage-1
            image: `encode(x_stage1, sample=True, generator=g)`). The noise is drawn in float32 on
            `generator`'s device, or on the CPU from the global RNG when generator is None (exactly as sgm).
        tile: split the image into a grid of tiles of at most tile x tile pixels (H, W multiples of 8)
            and run the full-resolution layers one tile at a time (exact, see `_Tiler`)."""
        w = self._weights()
        if denoise and not hasattr(self, "denoise_encoder"):
            raise ValueError("this AutoencoderKL was built without a denoise_encoder")
        encoder = self.denoise_encoder if denoise else self.encoder
        x = x.to(w)
        if tile is None:
            h = encoder.down_path(x)
        else:
            f = self.cfg.downsample_factor
            if x.shape[2] % f or x.shape[3] % f:
                raise ValueError(f"tiled encode needs H and W divisible by {f}, got {tuple(x.shape[2:])}")
            tiler = _Tiler.grid(x.shape[2] // f, x.shape[3] // f, max(tile // f, 1), w.device)
            h = tiler.encoder_down_path(encoder, x).to(w.device)
        mean, logvar = self.quant_conv(encoder.mid_path(h)).float().chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else "cpu")
            mean = mean + std * noise.to(mean.device)
        return SCALE_FACTOR * mean

    def decode(self, z, *, tile: int | None = None):
        """Scaled latent -> image; `tile` as in `encode` but in latent pixels (tile=64: 512-pixel image tiles)."""
        w = self._weights()
        h = self.decoder.mid_path(self.post_quant_conv((z.float() / SCALE_FACTOR).to(w)))
        if tile is None:
            x = self.decoder.up_path(h)
        else:
            x = _Tiler.grid(h.shape[2], h.shape[3], tile, w.device).decoder_up_path(self.decoder, h).to(w.device)
        return x.float()


class _GroupStats:
    """Per-(batch, group) mean and variance of a feature map, accumulated tile by tile (float64 sums)."""

    def __init__(self):
        self.n, self.sum, self.sum_sq = 0, 0.0, 0.0

    def add(self, t):
        var, mean = torch.var_mean(t.float().reshape(t.shape[0], GROUPS, -1), dim=-1, unbiased=False)
        n = t[0].numel() // GROUPS
        self.n += n
        mean, var = mean.cpu().double(), var.cpu().double()
        self.sum = self.sum + n * mean
        self.sum_sq = self.sum_sq + n * (var + mean ** 2)
        return self

    def result(self):
        mean = self.sum / self.n
        return mean.float(), (self.sum_sq / self.n - mean ** 2).float()


class _Tiler:
    """Exact tiled execution of the full-resolution parts of the VAE (`down_path`, `up_path`).

    A GroupNorm couples all pixels of its input, so a network run tile by tile from image to output gives
    different colours per tile (per-tile statistics) or needs the statistics of activations that do not
    exist yet. Instead this runs the network layer by layer: each step (a ResnetBlock half, a resampler,
    conv_in / the output head) reads whole feature maps kept in host memory, computes one tile at a time
    on `device` with a `halo` of neighbouring pixels as context for its 3x3 convolutions, writes the tile
    back and accumulates the GroupNorm statistics of what it wrote, which the next step normalises with.
    The result equals the untiled network up to float rounding; accelerator memory is bounded by one tile,
    host memory holds about three whole feature maps; every map crosses the bus once per step. The
    latent-resolution `mid_path`s, with their global attention, always run whole on `device`.

    The tile grid is fixed in latent pixels (`rows`, `cols`: cut positions) and scaled to each feature map.
    """

    def __init__(self, rows: list[int], cols: list[int], device: torch.device):
        self.rows, self.cols, self.device = rows, cols, device

    @classmethod
    def grid(cls, latent_height: int, latent_width: int, tile: int, device: torch.device) -> "_Tiler":
        def cuts(size):
            n = math.ceil(size / tile)
            return [round(size * i / n) for i in range(n + 1)]
        return cls(cuts(latent_height), cuts(latent_width), device)

    def map(self, fn, *maps, scale: int | float = 1, halo: int = 1, stats: bool = True):
        """Apply the local function `fn` to `maps` (same size) tile by tile; returns (output, its GroupNorm stats)."""
        B, _, H, W = maps[0].shape
        r = H // self.rows[-1]  # this map's pixels per latent pixel
        out, acc = None, _GroupStats()
        for y0, y1 in zip(self.rows[:-1], self.rows[1:]):
            y0, y1 = y0 * r, y1 * r
            for x0, x1 in zip(self.cols[:-1], self.cols[1:]):
                x0, x1 = x0 * r, x1 * r
                # No halo past the map's edge: there the ops' own zero padding is what the untiled run sees.
                ty0, ty1, tx0, tx1 = max(y0 - halo, 0), min(y1 + halo, H), max(x0 - halo, 0), min(x1 + halo, W)
                y = fn(*(m[:, :, ty0:ty1, tx0:tx1].to(self.device) for m in maps))
                y = y[:, :, int((y0 - ty0) * scale):int((y1 - ty0) * scale), int((x0 - tx0) * scale):int((x1 - tx0) * scale)]
                if out is None:
                    out = torch.empty(B, y.shape[1], int(H * scale), int(W * scale), dtype=y.dtype)
                out[:, :, int(y0 * scale):int(y1 * scale), int(x0 * scale):int(x1 * scale)] = y.cpu()
                if stats:
                    acc.add(y)
        return out, acc.result() if stats else None

    def resnet_block(self, block: ResnetBlock, x, x_stats):
        h, h_stats = self.map(lambda t: block.first_half(t, x_stats), x)
        return self.map(lambda t, s: block.second_half(t, s, h_stats), h, x)

    @torch.no_grad()
    def encoder_down_path(self, encoder: Encoder, x):
        h, stats = self.map(encoder.conv_in, x.cpu())
        for level in encoder.down:
            for block in level.block:
                h, stats = self.resnet_block(block, h, stats)
            if hasattr(level, "downsample"):
                # the last output row of a tile reads one input pixel past it; a halo of 2 keeps tiles even-aligned
                h, stats = self.map(level.downsample, h, scale=0.5, halo=2)
        return h

    @torch.no_grad()
    def decoder_up_path(self, decoder: Decoder, h):
        stats = _GroupStats().add(h).result()
        h = h.cpu()
        for level in reversed(decoder.up):
            for block in level.block:
                h, stats = self.resnet_block(block, h, stats)
            if hasattr(level, "upsample"):
                h, stats = self.map(level.upsample, h, scale=2)
        return self.map(lambda t: decoder.out(t, stats), h, stats=False)[0]
