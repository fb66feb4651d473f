"""The settings of one restoration (`RestoreSettings`), SUPIR's named presets, and the sizes they imply.

Every tool takes its defaults from here (sample.py's options, evaluate.py's methods, the web page's fields):
`preset(mode, sampler)` is SUPIR's Quality / Fidelity setting for a sampler, `replace(...)` changes a field,
and a RestoreSettings checks its own values, so a bad one is refused before any work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from . import sampler
from .images import MAX_INPUT_PIXELS, ImageError
from .text import DEFAULT_NEGATIVE, DEFAULT_POSITIVE

SAMPLERS = tuple(sampler.SAMPLERS)  # edm, dpmpp2m, lightning
COLOR_FIXES = ("wavelet", "adain", "none")

# Untiled memory grows with the pixel count as processed (the VAE decoder alone holds several full-size
# 128-channel maps); SUPIR's demo works at 1-2 MP. Above this we ask for tiled VAE and tiled sampling.
UNTILED_MAX_PIXELS = 2048 * 2048


# The value a setting holds where the chosen sampler never reads it, so that a result's metadata never claims
# what did not happen: the sampler options of sampler.SAMPLERS, and the restoration pull and linear control
# schedule that SUPIR's DPM++ sampler accepts and ignores (sampling.py:L422-L427).
UNUSED = {"s_churn": 0.0, "s_noise": None, "eta": None, "restore_cfg": 0.0, "control_start": None}


def unused_settings(name: str) -> tuple[str, ...]:
    """The settings sampler `name` never reads (each must hold its UNUSED value)."""
    entry = sampler.SAMPLERS[name]
    every = {o for s in sampler.SAMPLERS.values() for o in s.options}
    restoration = () if entry.restoration else ("restore_cfg", "control_start")
    return tuple(sorted(every - set(entry.options))) + restoration


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
    s_noise: float | None = 1.003  # churn / SDE noise scale (edm, dpmpp2m)
    eta: float | None = None      # DPM++ SDE noise (dpmpp2m only)
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
        if self.sampler in SAMPLERS:
            problems += [f"{name} is not used by the {self.sampler} sampler (leave it at {UNUSED[name]})"
                         for name in unused_settings(self.sampler) if getattr(self, name) != UNUSED[name]]
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
LIGHTNING = replace(QUALITY, sampler="dpmpp2m", steps=8, cfg=2.0, cfg_start=2.0, s_churn=0.0, restore_cfg=0.0, eta=1.0)
LIGHTNING_FIDELITY = replace(LIGHTNING, cfg=1.5, cfg_start=1.5)
# Euler on trailing timesteps for SDXL-Lightning 2/4/8-step checkpoints or LoRAs, distilled without CFG.
EULER_LIGHTNING = replace(QUALITY, sampler="lightning", steps=4, cfg=1.0, cfg_start=None, restore_cfg=0.0, s_churn=0.0,
                          s_noise=None)


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
