"""The methods evaluate.py compares, by name: the baselines (bicubic; for damage settings the damaged input),
classical inpainting, a stage-1 network alone, SUPIR (with LoRAs, with a stage-1 network in front).

Each is a callable (see evaluation.Method); `build_methods` makes them from their names and records what each
one is, for run.json.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from . import images, pipeline, repair, stage1
from . import mask as masks
from .cli import one_line
from .degrade import upsample
from .evaluation import BASELINE, REPAIR_BASELINE, Method
from .weights import CheckpointError, WeightsError


def bicubic(lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The do-nothing baseline: the LQ brought back to the GT size, where every restorer starts."""
    return upsample(lq, size)


def damaged(lq: torch.Tensor, size: tuple[int, int], known: torch.Tensor) -> torch.Tensor:
    """The repair baseline: the damaged image as it is."""
    return lq


def repair_mask(lq: torch.Tensor, known: torch.Tensor, use_known: bool) -> torch.Tensor:
    """The damage weight (H, W) a repair method works with: the automatic detector's on the damaged image
    (what a user gets), or with `use_known` the synthetic damage's own mask (detection taken out)."""
    return repair.soft_mask(known[0, 0] if use_known else masks.detect_damage(lq[0]))


class Fill:
    """Classical inpainting (repair.prefill: pull-push + membrane smoothing), blended in with the weight, as
    the SUPIR repair is."""

    def __init__(self, use_known: bool):
        self.use_known = use_known

    def __call__(self, lq: torch.Tensor, size: tuple[int, int], known: torch.Tensor) -> torch.Tensor:
        m = repair_mask(lq, known, self.use_known)
        return m * repair.prefill(lq, m >= repair.HOLE) + (1 - m) * lq


class SUPIRMethod:
    """SUPIR through pipeline.Restorer. The model is loaded by open() and freed by close(); methods run one
    after the other, so one model is in memory at a time."""

    def __init__(self, load: Callable[[], pipeline.Restorer], settings: pipeline.RestoreSettings, seed: int,
                 use_known: bool = False):
        self.load, self.settings, self.seed, self.use_known = load, settings, seed, use_known
        self.restorer: pipeline.Restorer | None = None

    @property
    def device(self) -> torch.device:
        return self.restorer.device

    def open(self) -> None:
        self.restorer = self.load()
        # prompts are the same for every image: encode them once, outside the timed calls
        self.restorer.encode_prompts([self.settings.positive_text, self.settings.negative])
        self.restorer.free_text_encoders()

    def close(self) -> None:
        self.restorer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __call__(self, lq: torch.Tensor, size: tuple[int, int], known: torch.Tensor | None = None) -> torch.Tensor:
        """Restore, or with the `known` mask of a damage setting, repair (mask-guided, see repair.py)."""
        settings = replace(self.settings, upscale=size[0] / lq.shape[-2])
        weight = None if known is None else repair_mask(lq, known, self.use_known)
        out = self.restorer.restore(images.from_tensor(lq), settings, self.seed, mask=weight)
        if out.size != (size[1], size[0]):  # a setting whose scale differs along H and W
            out = out.resize((size[1], size[0]), Image.LANCZOS)
        return images.to_tensor(out)


class Stage1Method:
    """A pixel restorer alone (stage1.Upscaler), its output resized to the GT size as --stage1-only does."""

    def __init__(self, name: str, device: str):
        self.name, self.device_name, self.upscaler = name, device, None

    @property
    def device(self) -> torch.device:
        return self.upscaler.device

    def load(self) -> stage1.Upscaler:
        try:
            return stage1.Upscaler.load(self.name, device=self.device_name)
        except (CheckpointError, ValueError) as e:  # evaluate reports it as a weights problem of this method
            raise WeightsError(self.name, one_line(e)) from None

    def open(self) -> None:
        self.upscaler = self.load()

    def close(self) -> None:
        self.upscaler = None

    def __call__(self, lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return images.to_tensor(self.upscaler.upscale_image(images.from_tensor(lq), (size[1], size[0])))


@dataclass(frozen=True)
class SUPIRSpec:
    """Which SUPIR and how it samples: sample.py's options of the same names (None: the preset's)."""
    model: str = "sdxl"
    mode: str = "quality"
    sdxl: str | None = None
    supir: str | None = None
    sampler: str = "edm"
    steps: int | None = None
    min_size: int | None = None

    def settings(self) -> pipeline.RestoreSettings:
        given = {"steps": self.steps, "min_size": self.min_size}
        return replace(pipeline.preset(self.mode, self.sampler), **{k: v for k, v in given.items() if v is not None})


def two_stage_restorer(spec: SUPIRSpec, loras: tuple, first: str | None, device: str, **placement
                       ) -> pipeline.Restorer:
    """SUPIR with `loras`, with the stage-1 network `first` in front of it where one is named."""
    restorer = pipeline.Restorer.load(spec.model, spec.mode, spec.sdxl, spec.supir, loras, device=device,
                                      **placement)[0]
    if first:
        restorer.pixel_restorer = Stage1Method(first, device).load()
    return restorer


def lora_method_name(path: str, scale: float) -> str:
    stem = Path(path).stem
    return f"supir+lora:{stem}" if scale == 1.0 else f"supir+lora:{stem}@{scale:g}"


def build_methods(names: list[str], spec: SUPIRSpec, loras: list[tuple[str, float]], seed: int, repairing: bool,
                  known_mask: bool = False, device: str = "auto", **placement
                  ) -> tuple[dict[str, Method], dict[str, dict]]:
    """({name: method}, {name: what it is, for run.json}). `supir+lora` becomes one method per LoRA in
    `loras`; `placement` (dtype, vae_dtype, offload) goes to pipeline.Restorer.load."""
    settings = spec.settings()
    mask = {"mask": "known" if known_mask else "auto"} if repairing else {}
    methods, configs = {}, {}
    for name in names:
        if name in (BASELINE, REPAIR_BASELINE):
            methods[name], configs[name] = bicubic if name == BASELINE else damaged, {"method": name}
        elif name == "fill":
            methods[name], configs[name] = Fill(known_mask), {"method": "fill", **mask}
        elif name in stage1.REGISTRY:
            methods[name], configs[name] = Stage1Method(name, device), {"method": "stage1", "model": name}
        else:
            first = name.removesuffix("+supir") if name.endswith("+supir") else None
            variants = [(name, [])] if name in ("supir", f"{first}+supir") else \
                [(lora_method_name(p, s), [(p, s)]) for p, s in loras]
            for method_name, chosen in variants:
                load = partial(two_stage_restorer, spec, tuple(chosen), first, device, **placement)
                methods[method_name] = SUPIRMethod(load, settings, seed, known_mask)
                configs[method_name] = {"method": "supir", "model": spec.model, "sdxl": spec.sdxl,
                                        "supir": spec.supir, "mode": spec.mode,
                                        "loras": [[str(p), s] for p, s in chosen], "stage1": first,
                                        "settings": settings.to_dict(), "seed": seed, **mask}
    return methods, configs
