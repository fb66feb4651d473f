"""Stage-1 pixel restorers: ESRGAN's RRDBNet and Real-ESRGAN's SRVGGNetCompact, and their inference.

DiffBIR (Lin et al. 2023, "DiffBIR: Towards Blind Image Restoration with Generative Diffusion Prior") restores
in two stages: a fast pixel-space network removes most of the degradation, then the generative prior adds the
detail. These are the networks people put first: Real-ESRGAN x4plus / x2plus / anime (Wang et al. 2021),
BSRGAN's BSRNet (DiffBIR v2's stage 1 for blind SR) and the compact realesr-general / animevideov3 models.

Module names are BasicSR's (basicsr/archs/rrdbnet_arch.py, basicsr/archs/srvgg_arch.py), so an official
`.pth` is a strict load; the configs take BasicSR's constructor arguments by their own names. Foreign
layouts are converted at the edge: KAIR's old ESRGAN names (`kair_to_basicsr`) and ncnn files (ncnn.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RRDBConfig:
    """basicsr.archs.rrdbnet_arch.RRDBNet(num_in_ch, num_out_ch, scale, num_feat, num_block, num_grow_ch)."""
    num_in_ch: int = 3
    num_out_ch: int = 3
    scale: int = 4          # 2 and 1 pixel-unshuffle the input first: the trunk always upsamples by 4
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32


@dataclass(frozen=True)
class SRVGGConfig:
    """basicsr.archs.srvgg_arch.SRVGGNetCompact(num_in_ch, num_out_ch, num_feat, num_conv, upscale, act_type)."""
    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = 64
    num_conv: int = 16
    upscale: int = 4
    act_type: str = "prelu"  # prelu, relu or leakyrelu (slope 0.1)


# The official models (../shared/WEIGHTS.md, "Stage-1 pixel restorers").
X4PLUS = RRDBConfig()
X2PLUS = RRDBConfig(scale=2)
X4PLUS_ANIME = RRDBConfig(num_block=6)
GENERAL_X4V3 = SRVGGConfig(num_conv=32)
ANIMEVIDEO_V3 = SRVGGConfig(num_conv=16)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output (ESRGAN, Wang et al. 2018)."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        for i in range(1, 6):
            setattr(self, f"conv{i}", conv3x3(num_feat + (i - 1) * num_grow_ch, num_grow_ch if i < 5 else num_feat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2, inplace=True))
        # residual scaling 0.2 keeps the very deep trunk stable (ESRGAN section 3.2)
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks and a scaled skip around them."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator: conv, RRDB trunk with a long skip, two nearest x2 upsamplings, two convs."""

    def __init__(self, cfg: RRDBConfig = X4PLUS):
        super().__init__()
        self.cfg = cfg
        if cfg.scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet scale is 1, 2 or 4, not {cfg.scale}")
        self.unshuffle = 4 // cfg.scale  # Real-ESRGAN x2plus / x1: pixel-unshuffle so the trunk still works x4
        nf = cfg.num_feat
        self.conv_first = conv3x3(cfg.num_in_ch * self.unshuffle ** 2, nf)
        self.body = nn.Sequential(*(RRDB(nf, cfg.num_grow_ch) for _ in range(cfg.num_block)))
        self.conv_body = conv3x3(nf, nf)
        self.conv_up1 = conv3x3(nf, nf)
        self.conv_up2 = conv3x3(nf, nf)
        self.conv_hr = conv3x3(nf, nf)
        self.conv_last = conv3x3(nf, cfg.num_out_ch)

    @property
    def scale(self) -> int:
        return self.cfg.scale

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (the pixel-unshuffle)."""
        return self.unshuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace=True)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace=True)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2, inplace=True))


def _activation(kind: str, channels: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.1, inplace=True)
    raise ValueError(f"act_type is prelu, relu or leakyrelu, not {kind!r}")


class SRVGGNetCompact(nn.Module):
    """A plain stack of 3x3 convs at the input resolution, a pixel shuffle, plus the nearest-upsampled input:
    all the work happens at low resolution, hence fast (Real-ESRGAN's realesr-* v3 models)."""

    def __init__(self, cfg: SRVGGConfig = ANIMEVIDEO_V3):
        super().__init__()
        self.cfg = cfg
        layers = [conv3x3(cfg.num_in_ch, cfg.num_feat), _activation(cfg.act_type, cfg.num_feat)]
        for _ in range(cfg.num_conv):
            layers += [conv3x3(cfg.num_feat, cfg.num_feat), _activation(cfg.act_type, cfg.num_feat)]
        layers.append(conv3x3(cfg.num_feat, cfg.num_out_ch * cfg.upscale ** 2))
        self.body = nn.Sequential(*layers)
        self.upsampler = nn.PixelShuffle(cfg.upscale)

    @property
    def scale(self) -> int:
        return self.cfg.upscale

    size_multiple = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsampler(self.body(x)) + F.interpolate(x, scale_factor=self.cfg.upscale, mode="nearest")


def build(cfg: RRDBConfig | SRVGGConfig, device: str | torch.device = "cpu") -> RRDBNet | SRVGGNetCompact:
    with torch.device(device):
        return RRDBNet(cfg) if isinstance(cfg, RRDBConfig) else SRVGGNetCompact(cfg)


# ----------------------------------------------------------------------------------------------------------
# State dicts


def kair_to_basicsr(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """KAIR's / the original ESRGAN repo's RRDBNet names (BSRNet.pth) -> BasicSR's."""
    table = (("RRDB_trunk.", "body."), (".RDB1.", ".rdb1."), (".RDB2.", ".rdb2."), (".RDB3.", ".rdb3."),
             ("trunk_conv.", "conv_body."), ("upconv1.", "conv_up1."), ("upconv2.", "conv_up2."), ("HRconv.", "conv_hr."))
    out = {}
    for key, value in sd.items():
        for old, new in table:
            key = key.replace(old, new)
        out[key] = value
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> RRDBConfig | SRVGGConfig:
    """The architecture an official state dict was saved from, read off its key names and shapes."""
    if "RRDB_trunk.0.RDB1.conv1.weight" in sd:
        sd = kair_to_basicsr(sd)
    if "conv_first.weight" in sd and "body.0.rdb1.conv1.weight" in sd:
        nf, cin = sd["conv_first.weight"].shape[:2]
        out_ch = sd["conv_last.weight"].shape[0]
        in_ch = next((c for c in (3, 1, 4) if cin in (c, 4 * c, 16 * c)), None)
        if in_ch is None:
            raise ValueError(f"RRDBNet with {cin} input channels: not 1, 3 or 4 channels at scale 4, 2 or 1")
        scale = {1: 4, 4: 2, 16: 1}[cin // in_ch]
        blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
        return RRDBConfig(in_ch, out_ch, scale, nf, blocks, sd["body.0.rdb1.conv1.weight"].shape[0])
    convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("body.") and k.endswith(".weight")
                   and sd[k].ndim == 4)
    if convs and convs[0] == 0:
        nf, in_ch = sd["body.0.weight"].shape[:2]
        last = sd[f"body.{convs[-1]}.weight"].shape[0]
        out_ch = in_ch
        upscale = math.isqrt(last // out_ch)
        # relu / leakyrelu have no weights: only the PReLU models (every official one) can be told apart
        act = "prelu" if "body.1.weight" in sd else "relu"
        return SRVGGConfig(in_ch, out_ch, nf, len(convs) - 2, upscale, act)
    raise ValueError("not an RRDBNet (conv_first, body.N.rdbK) or SRVGGNetCompact (body.N) state dict")
