"""Restoring a list of image files (what sample.py runs): one job per input, every file of it found and its
header read before any weights are loaded, then each job restored (or repaired, or upscaled by stage 1
alone) and its results written as PNGs with their settings in the metadata.

A job fails alone with an ImageError / RestoreError / OSError naming the problem in one line.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from . import images, mask as masks, outputs, pipeline, repair
from .cli import one_line
from .images import ImageError
from .pipeline import RestoreSettings, Restorer
from .stage1 import Upscaler

MASK_FILES = ("{name}_mask.png", "{stem}_mask.png", "{stem}.png")  # a --mask folder's file for an input
CLEAN_FILES = ("{stem}.*",)
OnStep = Callable[[int, int], None]


@dataclass
class Job:
    """One input image and what goes with it."""
    path: Path
    name: str                    # output stem (outputs.output_names)
    prompt: str = ""
    prompt_from: str | None = None  # "caption", "--prompt" or None
    mask: Path | None = None     # its painted damage mask
    clean: Path | None = None    # its undamaged original, for the comparison panel


def plan(path: Path, name: str, check_size: Callable[[int, int], None] | None = None, mask: Path | None = None,
         clean: Path | None = None, prompt: str = "") -> Job:
    """The job for input `path` from headers alone (nothing is decoded). `mask` / `clean`: a file, or a
    folder holding one per input (MASK_FILES, CLEAN_FILES). The caption `<name>.txt` beside the image wins
    over `prompt`. Raises ImageError naming what is missing, unreadable, too large or of another shape."""
    size = images.image_size(path, check_size)
    job = Job(path, name, prompt, "--prompt" if prompt else None)
    if mask is not None:
        job.mask = _companion("mask", mask, job, MASK_FILES, size)
    if clean is not None:
        job.clean = _companion("clean", clean, job, CLEAN_FILES)
    try:
        caption = images.caption_for(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError(f"unreadable caption {path.with_suffix('.txt')} ({one_line(e)})") from None
    if caption is not None:
        job.prompt, job.prompt_from = caption, "caption"
    return job


def _companion(what: str, spec: Path, job: Job, patterns: tuple[str, ...], size: tuple[int, int] | None = None
               ) -> Path:
    path = images.companion(spec, job.path, job.name, patterns)  # "no a_mask.png or ... in FOLDER"
    try:
        shape = images.image_size(path)
        if size is not None:
            masks.check_aspect(shape, size)
    except ImageError as e:
        raise ImageError(f"{what} {path}: {one_line(e)}") from None
    return path


def inputs(jobs: list[Job]) -> list[Path]:
    """Every file the jobs read (images, masks, originals): what no output may be written over."""
    return [p for job in jobs for p in (job.path, job.mask, job.clean) if p is not None]


def restore(restorer: Restorer, job: Job, out: Path, settings: RestoreSettings, seed: int,
            repair_params: masks.MaskParams | None = None, compare: bool = False, info: dict | None = None,
            on_step: OnStep | None = None) -> list[Path]:
    """Restore one job into `out`: <name>.png per sample (seed + k) and, with `compare`, the panels. With
    `repair_params` it is repaired instead, where its mask (or, without one, the automatic detector) marks
    damage; <name>_mask.png records the mask used. `info` (the weights) joins each PNG's metadata."""
    image = pipeline.open_image(job.path, settings)
    s = replace(settings, prompt=job.prompt)
    extra, panels, soft = {}, [image], None
    if repair_params is not None:
        hard, mask_from = _damage(job, image, repair_params)
        soft = repair.soft_mask(hard, repair_params)
        extra["repair"] = {"mask": mask_from, "mask_params": asdict(repair_params),
                           "damaged_fraction": round(hard.float().mean().item(), 6)}
        panels.append(repair.mask_image(hard))
    clean = pipeline.open_image(job.clean, settings) if job.clean is not None else None
    results = restorer.restore_samples(image, s, seed, on_step=on_step, mask=soft)
    paths = outputs.outputs_for(job.name, out, s.num_samples)
    for k, (result, path) in enumerate(zip(results, paths)):
        meta = {"settings": s.to_dict(), "seed": seed + k, "sample": k, "source": str(job.path),
                "prompt_from": job.prompt_from, **(info or {}), **extra}
        images.save_png(result, path, meta)
        if compare:
            panel = images.side_by_side(panels + [result] + ([clean] if clean else []), result.size)
            images.save_png(panel, path.with_name(f"{path.stem}_compare.png"), meta)
    if repair_params is not None:
        paths.append(out / f"{job.name}_mask.png")
        images.save_png(panels[1], paths[-1], {"source": str(job.path), **extra})
    return paths


def _damage(job: Job, image, params: masks.MaskParams):
    """(hard damage mask (H, W) bool at the image's size, where it came from)."""
    if job.mask is None:
        return masks.detect_damage(repair.image_tensor(image), params), "auto"
    try:
        return masks.load_mask(job.mask, (image.height, image.width)), str(job.mask)
    except (OSError, ValueError) as e:
        raise ImageError(f"mask {job.mask}: {one_line(e)}") from None


def upscale(up: Upscaler, job: Job, out: Path, scale: float | None = None, compare: bool = False,
            info: dict | None = None, on_tile: OnStep | None = None) -> list[Path]:
    """Stage 1 alone: the network's result at `scale` (default its own), as Real-ESRGAN's inference."""
    scale = scale or up.scale
    image = images.open_image(job.path, up.check_size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size[0] * size[1] > images.MAX_INPUT_PIXELS:
        raise ImageError(f"the result would be {size[0]}x{size[1]}: more than {images.MAX_INPUT_PIXELS / 1e6:.0f} MP")
    result = up.upscale_image(image, size, on_tile)
    meta = {**(info or {}), "upscale": scale, "source": str(job.path)}
    paths = [out / f"{job.name}.png"]
    images.save_png(result, paths[0], meta)
    if compare:
        paths.append(out / f"{job.name}_compare.png")
        images.save_png(images.side_by_side([image, result], result.size), paths[1], meta)
    return paths
