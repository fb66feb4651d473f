"""SUPIR restoration end to end: a PIL image in, a restored PIL image out.

What `SUPIRModel.batchify_sample` does, in steps a caller can run one by one (mask-guided repair and
evaluation hook in between them):

    prepare   image -> LQ tensor at a multiple of 64 px (upscale, min_size, alpha / greyscale handling);
              repair (a damage mask given): the damaged pixels prefilled, the known latent and latent mask
    stage1    _z = 0.13025 * mode(denoise_encoder(LQ));  x_stage1 = decode(_z)           (deterministic)
    sample    z_stage1 = 0.13025 * sample(encoder(x_stage1));  noise ~ N(0, I);
              sampler(noise, x_center = z_stage1, cond["control"] = _z)                   (seeded)
    decode    decode(latent); colour fix with x_stage1 as the style image
    finish    back to the exact requested size, the input's alpha and mode; repair: composited into the
              input with the pixel mask (see repair.py)

Every random number comes from a CPU `torch.Generator` seeded with `seed + sample_index`, so a result is a
function of (image, settings, seed, weights) and the same on any device (up to its arithmetic).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import colorfix, repair, sampler, supir
from .cli import one_line
from .devices import parse_dtype, pick_device
from .images import GREY_MODES, MAX_INPUT_PIXELS, ImageError, split_alpha
from .images import open_image as _open_image
from .sampler import Denoiser, GuidedModel
from .stage1 import Upscaler
from .text import DEFAULT_NEGATIVE, DEFAULT_POSITIVE
from .tiling import TiledDenoiser
from .weights import WeightsError, resolve_all

SAMPLERS = tuple(sampler.SAMPLERS)  # edm, dpmpp2m, lightning
COLOR_FIXES = ("wavelet", "adain", "none")

# Untiled memory grows with the pixel count as processed (the VAE decoder alone holds several full-size
# 128-channel maps); SUPIR's demo works at 1-2 MP. Above this we ask for tiled VAE and tiled sampling.
UNTILED_MAX_PIXELS = 2048 * 2048


class RestoreError(RuntimeError):
    """A restoration that cannot be done or went wrong (one line, for the CLI)."""


@dataclass(frozen=True)
class RestoreSettings:
    """Everything that decides the output besides the image, the seed and the weights.

    Defaults are SUPIR's "Quality" setting (v0Q weights) with its EDM sampler. Names follow SUPIR's demo:
    cfg = s_cfg (guidance at sigma 0), cfg_start = spt_linear_CFG (guidance at sigma_max; None = constant),
    control_scale = s_stage2, control_start = spt_linear_s_stage2 (None = constant), restore_cfg = s_stage1
    (restoration guidance towards the stage-1 latent; <= 0 turns it off).
    """
    upscale: float = 1.0
    min_size: int = 1024          # short side is scaled up to this before processing (SUPIR)
    sampler: str = "edm"
    steps: int = 50
    cfg: float = 7.5
    cfg_start: float | None = 4.0
    control_scale: float = 1.0
    control_start: float | None = None
    restore_cfg: float = 4.0      # SUPIR_v0.yaml (the demo passes -1: off)
    s_churn: float = 5.0          # SUPIR's demo and test.py (the yaml's 0 is overridden there)
    s_noise: float = 1.003
    eta: float = 1.0              # DPM++ SDE noise (dpmpp2m only)
    prompt: str = ""              # image description (caption), put before `positive`
    positive: str = DEFAULT_POSITIVE
    negative: str = DEFAULT_NEGATIVE
    color_fix: str = "wavelet"
    num_samples: int = 1
    tile_vae: bool = False
    vae_tile_size: int = 512      # px; the decoder works on tiles of vae_tile_size / 8 latent pixels
    tile_size: int | None = None  # px; tiled sampling (SUPIR_v0_tiled.yaml: 1024 px = 128 latent)
    tile_stride: int | None = None  # px; default tile_size / 2

    def __post_init__(self):
        problems = []
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {SAMPLERS}, not {self.sampler!r}")
        if self.color_fix not in COLOR_FIXES:
            problems.append(f"color_fix must be one of {COLOR_FIXES}, not {self.color_fix!r}")
        # NaN would pass every comparison below and fail (or silently give noise) only while sampling
        floats = ("upscale", "cfg", "cfg_start", "control_scale", "control_start", "restore_cfg", "s_churn",
                  "s_noise", "eta")
        problems += [f"{name} must be a finite number, not {getattr(self, name)}" for name in floats
                     if getattr(self, name) is not None and not -float("inf") < getattr(self, name) < float("inf")]
        # 1000 is the DDPM schedule's length (more steps repeat its sigmas); a schedule or a list of output
        # names a typo makes 10^11 long would fill the memory before the first step
        if not (1 <= self.steps <= 1000 and 1 <= self.num_samples <= 1000):
            problems.append(f"steps and num_samples must be in 1..1000, not {self.steps} and {self.num_samples}")
        if not self.upscale > 0 or self.min_size < 0:
            problems.append("upscale must be > 0 and min_size >= 0")
        for name in ("vae_tile_size", "tile_size", "tile_stride"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 64):
                problems.append(f"{name} must be a positive multiple of 64 px, not {v}")
        if self.vae_tile_size < 256:  # the tiled VAE adds 32 px (encoder) / 64 px (decoder) of context per side
            problems.append(f"vae_tile_size must be at least 256 px, not {self.vae_tile_size}")
        if self.tile_stride is not None and (self.tile_size is None or self.tile_stride > self.tile_size):
            problems.append("tile_stride needs tile_size and must not exceed it")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def tiled(self) -> bool:
        return self.tile_vae and self.tile_size is not None

    @property
    def positive_text(self) -> str:
        # SUPIR joins caption and quality prompt with no separator ("a cat." + "Cinematic, ..."). The CLIP
        # tokenizer drops whitespace between a punctuation mark and a word, so a space gives the same tokens
        # there, and keeps a caption ending in a letter from fusing with "Cinematic" into one word.
        return f"{self.prompt} {self.positive}".strip()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RestoreSettings":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown settings: {unknown}")
        return cls(**d)


QUALITY = RestoreSettings()
FIDELITY = replace(QUALITY, cfg=4.0, cfg_start=1.0)
# SUPIR_v0_Juggernautv9_lightning.yaml: DPM++ 2M SDE on Karras sigmas, 8 steps, no restoration guidance.
LIGHTNING = replace(QUALITY, sampler="dpmpp2m", steps=8, cfg=2.0, cfg_start=2.0, s_churn=0.0)
LIGHTNING_FIDELITY = replace(LIGHTNING, cfg=1.5, cfg_start=1.5)
# Euler on trailing timesteps for SDXL-Lightning 2/4/8-step checkpoints or LoRAs, distilled without CFG.
EULER_LIGHTNING = replace(QUALITY, sampler="lightning", steps=4, cfg=1.0, cfg_start=None, restore_cfg=0.0, s_churn=0.0)


def preset(mode: str = "quality", sampler: str = "edm") -> RestoreSettings:
    """SUPIR's Quality / Fidelity settings for a sampler (dpmpp2m: its Lightning config)."""
    table = {("quality", "edm"): QUALITY, ("fidelity", "edm"): FIDELITY,
             ("quality", "dpmpp2m"): LIGHTNING, ("fidelity", "dpmpp2m"): LIGHTNING_FIDELITY,
             ("quality", "lightning"): EULER_LIGHTNING, ("fidelity", "lightning"): EULER_LIGHTNING}
    if (mode, sampler) not in table:
        raise ValueError(f"no preset for mode {mode!r} with sampler {sampler!r}")
    return table[mode, sampler]


# ----------------------------------------------------------------------------------------------------------
# Sizes and image I/O


def processing_size(width: int, height: int, upscale: float = 1.0, min_size: int = 1024
                    ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((W, H) the model works at, (w, h) of the result), as SUPIR's PIL2Tensor computes them.

    The result is the input times `upscale`. The model works at that size, scaled up further if its short
    side is below `min_size` (SDXL degrades far below 1024 px), rounded to multiples of 64.
    """
    w, h = width * upscale, height * upscale
    out = (max(1, round(w)), max(1, round(h)))
    if min(w, h) < min_size:
        s = min_size / min(w, h)
        w, h = w * s, h * s
    return (max(64, int(np.round(w / 64)) * 64), max(64, int(np.round(h / 64)) * 64)), out


def check_size(width: int, height: int, settings: RestoreSettings) -> None:
    """Refuse, before anything is decoded, images we cannot decode or process with these settings."""
    if width * height > MAX_INPUT_PIXELS:
        raise ImageError(f"{width}x{height} is {width * height / 1e6:.0f} MP, more than the "
                         f"{MAX_INPUT_PIXELS / 1e6:.0f} MP this tool decodes")
    (w, h), _ = processing_size(width, height, settings.upscale, settings.min_size)
    if w * h > UNTILED_MAX_PIXELS and not settings.tiled:
        raise ImageError(f"{width}x{height} is processed at {w}x{h} ({w * h / 1e6:.1f} MP): above "
                         f"{UNTILED_MAX_PIXELS / 1e6:.1f} MP this needs tiling (--tile-vae and --tile-size 1024)")


def open_image(path: str | Path, settings: RestoreSettings = QUALITY) -> Image.Image:
    """Open an image, refusing from its header one too large for these settings (see images.open_image)."""
    return _open_image(path, lambda w, h: check_size(w, h, settings))


@dataclass
class Prepared:
    lq: torch.Tensor               # (1, 3, H, W) in [-1, 1], H and W multiples of 64
    out_size: tuple[int, int]      # (width, height) of the result
    alpha: Image.Image | None      # the input's alpha channel, re-attached to the result
    grey: bool                     # greyscale input: greyscale result


def prepare(image: Image.Image, settings: RestoreSettings, pixel_restorer: Upscaler | None = None) -> Prepared:
    """The LQ tensor at the processing size. With a pixel restorer (DiffBIR's two stages), the image goes
    through it at its own resolution first and its result is resized to the processing size instead."""
    grey = image.mode in GREY_MODES
    rgb, alpha = split_alpha(image)
    (w, h), out = processing_size(*rgb.size, settings.upscale, settings.min_size)
    if pixel_restorer is not None:
        rgb = pixel_restorer.upscale_image(rgb)
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), Image.LANCZOS)
    lq = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    return Prepared(lq, out, alpha, grey)


def to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> 8-bit RGB (rounded, as SUPIR's demo)."""
    a = ((x[0].float().permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(a, "RGB")


def finish(x: torch.Tensor, prepared: Prepared) -> Image.Image:
    image = to_image(x)
    if image.size != prepared.out_size:
        image = image.resize(prepared.out_size, Image.LANCZOS)
    return _like_input(image, prepared)


def _like_input(image: Image.Image, prepared: Prepared) -> Image.Image:
    """An 8-bit RGB image at the output size in the input's mode (greyscale, alpha)."""
    if prepared.grey:
        image = image.convert("L")
    if prepared.alpha is not None:
        image.putalpha(prepared.alpha.resize(prepared.out_size, Image.LANCZOS))
    return image


# ----------------------------------------------------------------------------------------------------------
# Devices and precision


def pick_dtypes(device: torch.device, dtype: str | torch.dtype | None = None,
                vae_dtype: str | torch.dtype | None = None) -> tuple[torch.dtype, torch.dtype]:
    """(diffusion + text dtype, VAE dtype). Defaults as SUPIR: fp16 UNet and bf16 VAE on CUDA; fp32 on CPU
    (half-precision matmuls are slow there) and fp32 VAE on MPS."""
    gpu = device.type in ("cuda", "mps")
    unet = parse_dtype(dtype, torch.float16 if gpu else torch.float32)
    vae = parse_dtype(vae_dtype, torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32)
    if vae == torch.float16:
        raise ValueError("the SDXL VAE overflows to NaN in fp16: use --vae-dtype bf16 or fp32")
    return unet, vae


# ----------------------------------------------------------------------------------------------------------
# The restorer


@dataclass
class Stage1:
    z_lq: torch.Tensor      # _z: 0.13025 * mode of the denoise encoder, the control input
    x_stage1: torch.Tensor  # its decoding: the degradation-removed image, colour-fix style and x_center source


class Restorer:
    """A loaded SUPIR model placed on a device, and the restoration steps over it.

    Placement: the UNet + control model and the VAE live on `device` (with `offload`, each moves there only
    while it runs); the text encoders stay on the CPU and visit the device only to encode a prompt, whose
    embedding is cached (`free_text_encoders` drops them once all prompts are encoded).
    """

    def __init__(self, model: supir.SUPIR, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, vae_dtype: str | torch.dtype | None = None,
                 offload: bool = False, pixel_restorer: Upscaler | None = None):
        self.device = pick_device(device)
        self.pixel_restorer = pixel_restorer  # DiffBIR's stage 1, run before SUPIR's own (stage1.py)
        self.dtype, self.vae_dtype = pick_dtypes(self.device, dtype, vae_dtype)
        self.offload = offload and self.device.type != "cpu"
        self.model = model.eval().requires_grad_(False)
        self.unet = model.model.to(dtype=self.dtype)
        self.vae = model.first_stage_model.to(dtype=self.vae_dtype)
        self.conditioner = model.conditioner.to(dtype=self.dtype)
        if not self.offload:
            self.unet.to(self.device)
            self.vae.to(self.device)
        self.denoiser = Denoiser(self.unet)
        self.factor = self.vae.cfg.downsample_factor
        self._text: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_files(cls, sdxl: str | Path, supir_file: str | Path, cfg: supir.SUPIRConfig = supir.SDXL,
                   loras: tuple[tuple[str | Path, float], ...] = (), lora_strict: bool = True,
                   **placement) -> "Restorer":
        """Official single files (local paths or hub specs, see weights.resolve) plus LoRAs merged in
        (`lora_strict=False`: what fits of each, the rest skipped with a warning; see lora_files.load_lora).
        The tensors are cast as they are read, so host RAM holds one copy at the target precision."""
        device = pick_device(placement.pop("device", None))
        dtype, vae_dtype = pick_dtypes(device, placement.pop("dtype", None), placement.pop("vae_dtype", None))
        model = supir.load(cfg, sdxl, supir_file,
                           {"model.": dtype, "conditioner.": dtype, "first_stage_model.": vae_dtype})
        cls._merge_loras(model, loras, lora_strict)
        return cls(model, device, dtype, vae_dtype, **placement)

    @classmethod
    def random(cls, cfg: supir.SUPIRConfig = supir.TINY, seed: int = 0,
               loras: tuple[tuple[str | Path, float], ...] = (), lora_strict: bool = True,
               **placement) -> "Restorer":
        """Random weights (PyTorch's default init, seeded, built on the CPU so it is the same model
        everywhere): a smoke test of the whole pipeline that restores nothing."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = supir.build(cfg, "cpu")
        cls._merge_loras(model, loras, lora_strict)
        return cls(model, **placement)

    @staticmethod
    def weight_specs(model: str = "sdxl", mode: str = "quality", sdxl: str | None = None,
                     supir_file: str | None = None) -> tuple[str, str] | None:
        """The (SDXL, SUPIR) file specs `load` reads for these options, or None for random weights (a tiny /
        medium preset without files), so a tool can find every file of a run before it loads any."""
        if model != "sdxl" and sdxl is None and supir_file is None:
            return None
        if model != "sdxl" and (sdxl is None or supir_file is None):
            raise WeightsError("--sdxl/--supir", f"--model {model} with weight files needs both")
        return sdxl or "sdxl", supir_file or ("F" if mode == "fidelity" else "Q")

    @classmethod
    def load(cls, model: str = "sdxl", mode: str = "quality", sdxl: str | None = None, supir_file: str | None = None,
             loras: tuple[tuple[str, float], ...] = (), lora_strict: bool = True, **placement
             ) -> tuple["Restorer", dict]:
        """(restorer, what a result's metadata records of it) the way every tool names weights: `model` is a
        preset of supir.PRESETS; sdxl / supir_file default to the registry's `sdxl` and `Q` (`F` in fidelity
        mode); a tiny / medium preset without files gets random weights. Every file is found (or named as
        missing, all at once) before any is downloaded or read; raises weights.WeightsError(file, problem)."""
        cfg = supir.PRESETS[model]
        pair = cls.weight_specs(model, mode, sdxl, supir_file)
        random = pair is None
        sdxl, supir_file = pair or (sdxl, supir_file)
        specs = [f for f, _ in loras] + ([] if random else [sdxl, supir_file])
        files = resolve_all(specs)
        found = tuple((files[str(f)], scale) for f, scale in loras)
        try:
            if random:
                restorer = cls.random(cfg, seed=0, loras=found, lora_strict=lora_strict, **placement)
            else:
                restorer = cls.from_files(files[sdxl], files[supir_file], cfg, loras=found, lora_strict=lora_strict,
                                          **placement)
        except (ValueError, OSError) as e:  # CheckpointError, LoRAFileError: name the file the message is about
            message = str(e)
            named = [(message.find(Path(s).name), s) for s in specs if Path(s).name in message]
            raise WeightsError(min(named)[1] if named else " + ".join(specs) or model, one_line(e)) from None
        weights = {"weights": f"random {model} (seed 0)"} if random else {"sdxl": str(sdxl), "supir": str(supir_file)}
        return restorer, {**weights, "model": model, "loras": [[str(f), s] for f, s in loras],
                          "dtype": str(restorer.dtype).removeprefix("torch."),
                          "vae_dtype": str(restorer.vae_dtype).removeprefix("torch.")}

    @staticmethod
    def _merge_loras(model: supir.SUPIR, loras, strict: bool = True) -> None:
        from .lora_files import load_lora
        from .weights import resolve
        for i, (path, scale) in enumerate(loras):
            load_lora(model, resolve(path), name=f"lora{i}", scale=scale, merge=True, strict=strict)

    # -- placement -------------------------------------------------------------------------------------

    @contextmanager
    def _running(self, module: torch.nn.Module, always: bool = False):
        """Module on the device while the block runs (offload mode, or `always` for the text encoders)."""
        move = (self.offload or always) and self.device.type != "cpu"
        if move:
            module.to(self.device)
        try:
            yield module
        finally:
            if move:
                module.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # -- prompts ---------------------------------------------------------------------------------------

    def encode_prompts(self, texts: list[str]) -> None:
        """Run the text encoders once for every text not seen yet (batched) and cache the embeddings."""
        todo = sorted({t for t in texts if t not in self._text})
        if not todo:
            return
        if self.conditioner is None:
            raise RestoreError("the text encoders were freed; encode every prompt before free_text_encoders()")
        with torch.no_grad(), self._running(self.conditioner, always=True):
            for first in range(0, len(todo), 8):
                batch = todo[first:first + 8]
                # SUPIR conditions on a fixed 1024x1024 original/target size and crop (0, 0), whatever the image
                out = self.conditioner.encode(batch)
                for i, t in enumerate(batch):
                    self._text[t] = {k: v[i:i + 1].cpu() for k, v in out.items()}

    def free_text_encoders(self) -> None:
        """Drop the text encoders (about 1.4 B parameters for SDXL); cached prompts still work."""
        self.model.conditioner = self.conditioner = None

    def conditioning(self, settings: RestoreSettings, z_lq: torch.Tensor) -> tuple[dict, dict]:
        """(cond, uncond) for the sampler: text embeddings plus the LQ latent as "control" in both."""
        pos, neg = settings.positive_text, settings.negative
        self.encode_prompts([pos, neg])
        n = z_lq.shape[0]
        c, uc = ({k: v.to(self.device).expand(n, *v.shape[1:]) for k, v in self._text[t].items()} for t in (pos, neg))
        return {**c, "control": z_lq}, {**uc, "control": z_lq}

    # -- the steps ---------------------------------------------------------------------------------------

    def _vae_tiles(self, settings: RestoreSettings, size: tuple[int, int]) -> tuple[int | None, int | None]:
        """(encoder tile in px, decoder tile in latent px), None where the image fits in one tile."""
        if not settings.tile_vae or max(size) <= settings.vae_tile_size:
            return None, None
        return settings.vae_tile_size, settings.vae_tile_size // self.factor

    @torch.no_grad()
    def stage1(self, lq: torch.Tensor, settings: RestoreSettings) -> Stage1:
        enc_tile, dec_tile = self._vae_tiles(settings, lq.shape[-2:])
        with self._running(self.vae):
            z_lq = self.vae.encode(lq.to(self.device), denoise=True, tile=enc_tile)
            x_stage1 = self.vae.decode(z_lq, tile=dec_tile)
        return Stage1(z_lq, x_stage1)

    @torch.no_grad()
    def prepare_repair(self, prepared: Prepared, mask: torch.Tensor, settings: RestoreSettings
                       ) -> tuple[Prepared, repair.Known]:
        """(the LQ with its damaged pixels prefilled, what mask-guided sampling keeps) for a damage weight
        `mask` (H, W) in [0, 1] at the output size (see repair.py)."""
        if settings.upscale != 1:
            raise ValueError("repair keeps the pixels outside the mask, so it works at the input size: use "
                             "upscale 1 (and upscale the repaired image in a second run)")
        if tuple(mask.shape) != prepared.out_size[::-1]:
            raise ValueError(f"the mask is {tuple(mask.shape[::-1])} px, the image {prepared.out_size}")
        m = repair.resize_mask(mask, tuple(prepared.lq.shape[-2:]))
        lq = repair.prefill(prepared.lq, m >= repair.HOLE)
        enc_tile, _ = self._vae_tiles(settings, lq.shape[-2:])
        with self._running(self.vae):
            z = self.vae.encode(lq.to(self.device), tile=enc_tile)
        return replace(prepared, lq=lq), repair.Known(z, repair.latent_mask(m, self.factor).to(z))

    @torch.no_grad()
    def sample(self, st1: Stage1, settings: RestoreSettings, generator: torch.Generator,
               on_step: Callable[[int, int], None] | None = None, known: repair.Known | None = None
               ) -> torch.Tensor:
        """One restored latent. Random draws, in SUPIR's order: the posterior sample of z_stage1, the start
        noise, then the sampler's own (churn / SDE) noise. With `known` (repair) the latent outside its mask
        follows the known latent re-noised to each sigma and ends there."""
        enc_tile, _ = self._vae_tiles(settings, st1.x_stage1.shape[-2:])
        with self._running(self.vae):
            z_stage1 = self.vae.encode(st1.x_stage1, sample=True, generator=generator, tile=enc_tile)
        noise = torch.randn(st1.z_lq.shape, generator=generator, device=generator.device).to(self.device)
        cond, uncond = self.conditioning(settings, st1.z_lq)
        denoiser = self.denoiser
        if known is not None:
            denoiser = repair.MaskedDenoiser(self.denoiser)
            noise, z_stage1 = known.start(noise), known.blend(z_stage1)
            cond, uncond = known.pack(cond), known.pack(uncond)
        if settings.tile_size is not None:
            stride = settings.tile_stride or settings.tile_size // 2
            denoiser = TiledDenoiser(denoiser, settings.tile_size // self.factor, stride // self.factor)
        chosen = sampler.SAMPLERS[settings.sampler]
        sigmas = chosen.sigmas(settings.steps)
        restoration = dict(x_center=z_stage1, restore_cfg=settings.restore_cfg,
                           control_scale_start=settings.control_start) if chosen.restoration else {}
        model = GuidedModel(denoiser, cond, uncond, sigmas, cfg_scale=settings.cfg, cfg_scale_start=settings.cfg_start,
                            control_scale=settings.control_scale, **restoration)

        def callback(i, info):
            if not torch.isfinite(info["x"]).all():
                raise RestoreError(f"NaN/inf in the latent at sampling step {i + 1}"
                                   + (" (fp16 overflow? try --dtype bf16 or fp32)" if self.dtype == torch.float16 else ""))
            if on_step is not None:
                on_step(i + 1, settings.steps)

        with self._running(self.unet):
            return chosen.sample(model, sampler.start_latent(noise), sigmas, generator=generator, callback=callback,
                                 **{name: getattr(settings, name) for name in chosen.options})

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, st1: Stage1, settings: RestoreSettings) -> torch.Tensor:
        _, dec_tile = self._vae_tiles(settings, st1.x_stage1.shape[-2:])
        with self._running(self.vae):
            x = self.vae.decode(latent, tile=dec_tile)
        if not torch.isfinite(x).all():
            raise RestoreError("NaN/inf in the decoded image (VAE overflow? use --vae-dtype bf16 or fp32)")
        if settings.color_fix == "wavelet":
            x = colorfix.wavelet_reconstruction(x, st1.x_stage1)
        elif settings.color_fix == "adain":
            x = colorfix.adaptive_instance_normalization(x, st1.x_stage1)
        return x.clamp(-1.0, 1.0)

    def restore_samples(self, image: Image.Image, settings: RestoreSettings = QUALITY, seed: int = 1234,
                        on_step: Callable[[int, int], None] | None = None, mask: torch.Tensor | None = None
                        ) -> list[Image.Image]:
        """`settings.num_samples` restorations of `image`; sample k uses seed + k (one at a time, so memory
        does not grow with the number of samples; stage 1 is shared).

        mask: repair instead: a damage weight (H, W) in [0, 1] (or bool) at the image's size, 1 where pixels
        are regenerated; pixels where it is 0 come back byte-identical (upscale must be 1)."""
        check_size(*image.size, settings)
        prepared = prepare(image, settings, self.pixel_restorer)
        known = None
        if mask is not None:
            prepared, known = self.prepare_repair(prepared, mask, settings)
            original = _like_input(split_alpha(image)[0], prepared)
        st1 = self.stage1(prepared.lq, settings)
        results = []
        for k in range(settings.num_samples):
            generator = torch.Generator("cpu").manual_seed(seed + k)
            latent = self.sample(st1, settings, generator, on_step, known)
            result = finish(self.decode(latent, st1, settings), prepared)
            results.append(result if mask is None else repair.composite(result, original, mask))
        return results

    def restore(self, image: Image.Image, settings: RestoreSettings = QUALITY, seed: int = 1234,
                on_step: Callable[[int, int], None] | None = None, mask: torch.Tensor | None = None
                ) -> Image.Image:
        """The restoration (or, with `mask`, the repair) of `image` with `seed` (the first of `restore_samples`)."""
        return self.restore_samples(image, replace(settings, num_samples=1), seed, on_step, mask)[0]
