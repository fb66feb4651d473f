"""SDXL's KL autoencoder (sgm `AutoencoderKL`) with SUPIR's denoise encoder and a tiled encode/decode."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

SCALE_FACTOR = 0.13025  # SDXL latent scale: SUPIR multiplies encoded latents by it and divides before decoding


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

    @classmethod
    def from_reference(cls, constructor: dict) -> "VAEConfig":
        dd = constructor["ddconfig"]
        assert dd["attn_resolutions"] == [], "only the mid-block attention of the SDXL VAE is implemented"
        assert dd["double_z"], "the encoder must output mean and log-variance"
        return cls(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                   z_channels=dd["z_channels"], embed_dim=constructor["embed_dim"],
                   in_channels=dd["in_channels"], out_ch=dd["out_ch"])


SDXL_VAE = VAEConfig()
TINY = VAEConfig(ch=32, ch_mult=(1, 1, 1, 2))  # same 8x downsampling as SDXL, 32 groups need ch >= 32


class GroupNorm(nn.GroupNorm):
    """GroupNorm(32, C, eps=1e-6), the VAE's `Normalize`.

    Tiled encode/decode sets `tiling` so that every tile is normalised with the statistics of the whole
    image rather than its own (see `_GroupNormStats`); otherwise this is plain `nn.GroupNorm`.
    """

    def __init__(self, channels: int):
        super().__init__(32, channels, eps=1e-6)
        self.tiling: _GroupNormStats | None = None

    def forward(self, x):
        return super().forward(x) if self.tiling is None else self.tiling.normalize(self, x)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = GroupNorm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (only used at the latent resolution)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = GroupNorm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # default scale C**-0.5, as in sgm
        return x + self.proj_out(rearrange(h, "b 1 (h w) c -> b c h w", h=x.shape[2]))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # sgm pads right/bottom only, so outputs stay aligned to 2x2 cells


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
    """Image (B, 3, H, W) -> moments (B, 2*z_channels, H/f, W/f).

    Split in two for tiling: `down_path` (convolutions only, local) and `mid_path` (latent resolution,
    with global attention)."""

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
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); `mid_path` then `up_path` (see Encoder)."""

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

    def up_path(self, h):
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z):
        return self.up_path(self.mid_path(z))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig, denoise_encoder: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        if denoise_encoder:
            self.denoise_encoder = Encoder(cfg)  # SUPIR's degradation-robust copy; shares quant_conv
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _check_dtype(self):
        if self.dtype == torch.float16:
            raise ValueError("the SDXL VAE overflows to inf/NaN in float16: run it in bfloat16 or float32")

    def encode(self, x, *, denoise=False, sample=False, generator=None, tile=None, margin=32, passes=2, blend=0):
        self._check_dtype()
        encoder = self.denoise_encoder if denoise else self.encoder
        x = x.to(self.dtype)
        if tile is None:
            h = encoder.down_path(x)
        else:
            h = _tiled(encoder.down_path, encoder, x, self.cfg.downsample_factor, tile, margin, passes, blend, down=True)
        mean, logvar = self.quant_conv(encoder.mid_path(h)).float().chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else "cpu")
            mean = mean + std * noise.to(mean.device)
        return SCALE_FACTOR * mean

    def decode(self, z, *, tile=None, margin=8, passes=2, blend=0):
        self._check_dtype()
        h = self.decoder.mid_path(self.post_quant_conv((z.float() / SCALE_FACTOR).to(self.dtype)))
        if tile is None:
            x = self.decoder.up_path(h)
        else:
            x = _tiled(self.decoder.up_path, self.decoder, h, self.cfg.downsample_factor, tile, margin, passes, blend, down=False)
        return x.float()


class _GroupNormStats:
    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, GroupNorm)]
        self.sums = {}
        self.stats = {}
        self.core = None

    @contextmanager
    def attached(self):
        for m in self.layers:
            m.tiling = self
        try:
            yield self
        finally:
            for m in self.layers:
                m.tiling = None

    def normalize(self, layer, x):
        B, C, H, W = x.shape
        G = layer.num_groups
        (y0, y1, x0, x1), (h, w) = self.core
        s = H / h
        core = x[:, :, round(y0 * s):round(y1 * s), round(x0 * s):round(x1 * s)]
        var, mean = torch.var_mean(core.float().reshape(B, G, -1), dim=-1, unbiased=False)
        n = core[0, 0].numel() * (C // G)
        acc = self.sums.setdefault(layer, [0.0, 0.0, 0])
        acc[0] = acc[0] + mean.double() * n
        acc[1] = acc[1] + (var.double() + mean.double() ** 2) * n
        acc[2] += n
        if layer not in self.stats:
            return F.group_norm(x, G, layer.weight, layer.bias, layer.eps)
        mean, var = self.stats[layer]
        xg = (x.float().reshape(B, G, -1) - mean[..., None]) * torch.rsqrt(var[..., None] + layer.eps)
        return (xg.reshape(B, C, H, W) * layer.weight[:, None, None].float() + layer.bias[:, None, None].float()).to(x.dtype)

    def finish_pass(self):
        self.stats = {}
        for layer, (s1, s2, n) in self.sums.items():
            mean = s1 / n
            self.stats[layer] = (mean.float(), (s2 / n - mean ** 2).float())
        self.sums = {}


def _split(size, tile, margin, align):
    """[(tile_start, tile_end, core_start, core_end)]: cores partition [0, size); tiles add `margin` context."""
    if size <= tile:
        return [(0, size, 0, size)]
    n = math.ceil(size / (tile - 2 * margin))
    cuts = [0] + [round(size * i / n / align) * align for i in range(1, n)] + [size]
    return [(max(a - margin, 0), min(b + margin, size), a, b) for a, b in zip(cuts[:-1], cuts[1:])]


@torch.no_grad()
def _tiled(fn, model, x, factor, tile, margin, passes, blend, down):
    B, C, H, W = x.shape
    align = factor if down else 1
    rows, cols = _split(H, tile, margin, align), _split(W, tile, margin, align)
    scale = 1 / factor if down else factor
    norms = _GroupNormStats(model)
    with norms.attached():
        for p in range(passes):
            out = None
            for ty0, ty1, cy0, cy1 in rows:
                for tx0, tx1, cx0, cx1 in cols:
                    norms.core = (cy0 - ty0, cy1 - ty0, cx0 - tx0, cx1 - tx0), (ty1 - ty0, tx1 - tx0)
                    y = fn(x[:, :, ty0:ty1, tx0:tx1])
                    if p < passes - 1:
                        continue
                    if out is None:
                        out = y.new_zeros(B, y.shape[1], round(H * scale), round(W * scale))
                    if blend == 0:
                        out[:, :, round(cy0 * scale):round(cy1 * scale), round(cx0 * scale):round(cx1 * scale)] = \
                            y[:, :, round((cy0 - ty0) * scale):round((cy1 - ty0) * scale), round((cx0 - tx0) * scale):round((cx1 - tx0) * scale)]
                    else:
                        wy = _ramp(ty0, ty1, cy0, cy1, H, blend, scale).to(y)
                        wx = _ramp(tx0, tx1, cx0, cx1, W, blend, scale).to(y)
                        out[:, :, round(ty0 * scale):round(ty1 * scale), round(tx0 * scale):round(tx1 * scale)] += y * wy[:, None] * wx[None, :]
            norms.finish_pass()
    return out


def _ramp(t0, t1, c0, c1, size, r, scale):
    # weight over output pixels of tile [t0, t1): 1 in the core, linear ramps of half-width r around inner core edges
    pos = (torch.arange(round(t0 * scale), round(t1 * scale)) + 0.5) / scale
    w = torch.ones_like(pos)
    if c0 > 0:
        w = torch.minimum(w, ((pos - (c0 - r)) / (2 * r)).clamp(0, 1))
    if c1 < size:
        w = torch.minimum(w, (((c1 + r) - pos) / (2 * r)).clamp(0, 1))
    return w
