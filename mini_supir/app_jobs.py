"""The web page's work, without the page: which weights are here, the settings of a mode, and one job
(stage 1 alone, SUPIR, the two stages, or a repair) run with progress, cancel and a live latent preview.

app.py lays this out as a gradio page. Everything a job reads comes from the server: the photo is a file
gradio accepted as an upload, LoRAs are names in the server's LoRA folder, results go to a temp folder.
"""
from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from . import images, lora_files, pipeline, presets, repair, stage1, weights
from . import mask as masks
from .cli import one_line
from .images import ImageError
from .pipeline import RestoreError, Restorer
from .presets import RestoreSettings
from .weights import CheckpointError, WeightsError

MODES = {  # value -> label; the value is what the HTTP API takes
    "fast": "Fast: Real-ESRGAN only",
    "quality": "SUPIR Quality",
    "fidelity": "SUPIR Fidelity",
    "lightning": "SUPIR Lightning",
    "two-stage": "Two-stage: Real-ESRGAN, then SUPIR",
    "repair": "Crack repair",
}
PRESETS = {"quality": ("quality", "edm"), "fidelity": ("fidelity", "edm"), "lightning": ("quality", "dpmpp2m")}
STAGE1_MODES = ("fast", "two-stage")
SEED = inspect.signature(Restorer.restore_samples).parameters["seed"].default
TILED = {"tile_vae": True, "tile_size": 1024}  # SUPIR_v0_tiled.yaml: 1024 px windows, VAE in 512 px tiles
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
KEEP_RESULTS = 16  # job folders kept in out_dir: jobs run one at a time, and gradio copies each result away


class Cancelled(Exception):
    """The person pressed Cancel: the job stopped at its next step or tile."""


@dataclass(frozen=True)
class Job:
    """One restoration as the page asks for it. `given`: the RestoreSettings fields typed on the page; every
    other field is the preset's (presets.preset: the CLI's defaults)."""
    mode: str = "fast"
    preset: str = "quality"             # SUPIR settings of two-stage and repair (the SUPIR modes are their own)
    stage1: str = "realesrgan-x4plus"
    upscale: float | None = None        # None: fast mode the network's scale, SUPIR the preset's (1)
    prompt: str = ""
    seed: int = SEED
    given: tuple[tuple[str, object], ...] = ()
    loras: tuple[tuple[str, float], ...] = ()  # names in the server's LoRA folder, scale each
    painted: tuple[str, ...] = ()       # repair: layers painted on the photo (white / opaque = damage); () = automatic

    @property
    def supir_preset(self) -> str | None:
        if self.mode in PRESETS:
            return self.mode
        return None if self.mode == "fast" else self.preset

    def settings(self) -> RestoreSettings:
        """The preset's settings with what the page set; raises ValueError naming a bad value."""
        if self.mode not in MODES or self.preset not in PRESETS:
            raise ValueError(f"mode must be one of {', '.join(MODES)} and preset one of {', '.join(PRESETS)}")
        base = presets.preset(*PRESETS[self.supir_preset or "quality"])
        given = {**dict(self.given), **({} if self.upscale is None else {"upscale": self.upscale})}
        if self.mode == "repair" and given.get("upscale", 1) != 1:
            raise ValueError("crack repair keeps the pixels outside the mask, so it works at the input size: "
                             "upscale the repaired image in a second run")
        return replace(base, **given, prompt=self.prompt)


@dataclass
class Hooks:
    """How a running job reports and is stopped: progress(done, total, what), preview(latent image)."""
    progress: Callable[[int, int, str], None] = lambda done, total, what: None
    preview: Callable[[Image.Image], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    preview_every: int = 5  # steps; a preview costs a quantile over the latent, nothing like a VAE decode

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled")


@dataclass
class Result:
    image: Image.Image      # the restoration, as saved
    before: Image.Image     # the input at the result's size, for the before / after slider
    path: Path              # the PNG with every setting in its metadata
    info: dict
    seconds: float


# ----------------------------------------------------------------------------------------------------------
# What is on this server


@contextmanager
def _no_downloads():
    """Resolve as the CLI does offline: a missing file gives the CLI's one-line 'put it here' message."""
    before = os.environ.get("MINI_SUPIR_OFFLINE")
    os.environ["MINI_SUPIR_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MINI_SUPIR_OFFLINE"]
        else:
            os.environ["MINI_SUPIR_OFFLINE"] = before


def weights_status(model: str = "sdxl", sdxl: str | None = None) -> dict[str, str | None]:
    """{weights name: None where present, else the one line saying what to fetch and where to put it}.
    Looks only (never downloads); call it before the server answers requests (it sets the offline switch)."""
    status = {}
    with _no_downloads():
        for name in stage1.REGISTRY:
            try:
                stage1.resolve(name)
                status[name] = None
            except CheckpointError as e:
                status[name] = one_line(e)
        if model == "sdxl" or sdxl is not None:
            for spec in (sdxl or "sdxl", "Q", "F"):
                try:
                    weights.resolve(spec)
                    status[spec] = None
                except CheckpointError as e:
                    status[spec] = one_line(e)
    return status


def missing_for(job_mode: str, stage1_name: str, status: dict[str, str | None], sdxl: str | None = None
                ) -> list[str]:
    """`name: problem` for every file the mode needs that `weights_status` found missing."""
    needs = [stage1_name] if job_mode in STAGE1_MODES else []
    if job_mode != "fast":
        needs += [sdxl or "sdxl", "F" if job_mode == "fidelity" else "Q"]  # two-stage / repair: Q or F by preset
    return [f"{n}: {status[n]}" for n in needs if status.get(n)]


def list_loras(folder: Path) -> dict[str, Path]:
    """{name: path} of the LoRA files and PEFT adapter folders in `folder` (the names the page offers)."""
    if not folder.is_dir():
        return {}
    found = {}
    for p in sorted(folder.iterdir()):
        if (p.is_file() and p.suffix in LORA_SUFFIXES) or (p.is_dir() and any(
                (p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin"))):
            found[p.name] = p
    return found


# ----------------------------------------------------------------------------------------------------------
# The loaded networks


class Models:
    """The networks a job needs, loaded on first use and kept (loading SDXL takes a minute): the last SUPIR
    restorer and the last stage-1 network, each with the LoRAs it was built with."""

    def __init__(self, model: str = "sdxl", sdxl: str | None = None, lora_dir: Path | None = None,
                 device: str = "auto", dtype: str = "auto"):
        self.model, self.sdxl, self.device, self.dtype = model, sdxl, device, dtype
        self.lora_dir = Path(lora_dir) if lora_dir is not None else weights.WEIGHTS_DIR / "loras"
        self._restorer: tuple | None = None
        self._upscaler: tuple | None = None

    def split_loras(self, job: Job) -> tuple[list[tuple[Path, float]], list[tuple[str, float]]]:
        """(stage-1 LoRAs, SUPIR LoRAs) of the job's picks, by what each file says it is for."""
        found = list_loras(self.lora_dir)
        ours, supir_loras = [], []
        for name, scale in job.loras:
            if name not in found:  # only names the folder listing offers, never a path
                raise WeightsError(name, f"not a LoRA in the server's folder (offered: {', '.join(found) or 'none'})")
            try:
                parts = lora_files.lora_parts(found[name])
            except (OSError, ValueError) as e:
                raise WeightsError(name, one_line(e)) from None
            if parts == {"stage1"} and job.mode in STAGE1_MODES:
                ours.append((found[name], scale))
            elif parts == {"stage1"}:
                raise WeightsError(name, "a LoRA for a stage-1 network: use it in fast or two-stage mode")
            elif "stage1" in parts:
                raise WeightsError(name, f"mixes stage-1 and SUPIR adapters ({', '.join(sorted(parts))})")
            elif job.mode == "fast":
                raise WeightsError(name, "a SUPIR LoRA: fast mode runs only the stage-1 network")
            else:
                supir_loras.append((str(found[name]), scale))
        return ours, supir_loras

    def upscaler(self, name: str, loras: list[tuple[Path, float]]) -> tuple[stage1.Upscaler, dict]:
        key = (name, tuple(loras))
        if self._upscaler is None or self._upscaler[0] != key:
            self._upscaler = None  # drop the old network before loading the next
            try:
                up = stage1.Upscaler.load(name, tuple(loras), device=self.device, dtype=self.dtype)
            except (CheckpointError, ValueError, OSError) as e:
                raise WeightsError(name, one_line(e)) from None
            info = {"stage1": {"model": name, "file": str(up.file), "scale": up.scale, "tile": up.tile,
                               "tile_pad": up.tile_pad, "dtype": str(up.dtype).removeprefix("torch."),
                               "loras": [[str(f), s] for f, s in loras]}}
            self._upscaler = (key, up, info)
        return self._upscaler[1], self._upscaler[2]

    def restorer(self, mode: str, loras: list[tuple[str, float]]) -> tuple[Restorer, dict]:
        key = (mode, tuple(loras))
        if self._restorer is None or self._restorer[0] != key:
            self._restorer = None
            restorer, info = Restorer.load(self.model, mode, self.sdxl, None, tuple(loras), True,
                                           device=self.device, dtype=self.dtype)
            self._restorer = (key, restorer, info)
        return self._restorer[1], self._restorer[2]


# ----------------------------------------------------------------------------------------------------------
# One job


class _Tiles:
    """The stage-1 network with per-tile progress and cancel: pipeline.prepare calls upscale_image without
    a tile callback."""

    def __init__(self, up: stage1.Upscaler, hooks: Hooks):
        self.up, self.hooks = up, hooks

    def on_tile(self, i: int, n: int) -> None:
        self.hooks.check()
        self.hooks.progress(i, n, "stage 1 tiles")

    def upscale_image(self, image, size=None, on_tile=None):
        return self.up.upscale_image(image, size, self.on_tile)


class _Recorder:
    """The denoiser, keeping its latest estimate of the clean latent (the conditional half of a CFG batch)."""

    def __init__(self, denoiser):
        self.denoiser, self.latest = denoiser, None

    def __call__(self, x, sigma, cond, control_scale=1.0):
        out = self.denoiser(x, sigma, cond, control_scale)
        self.latest = out[-1:]
        return out


def latent_preview(z: torch.Tensor) -> Image.Image:
    """A latent's first 3 channels as RGB, each stretched between its 1st and 99th percentile."""
    x = z[0, :3].float().cpu().flatten(1)
    lo, hi = x.quantile(0.01, dim=1, keepdim=True), x.quantile(0.99, dim=1, keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return images.from_tensor(x.view(1, 3, *z.shape[-2:]))


@contextmanager
def cancel_points(hooks: Hooks, *networks: torch.nn.Module):
    """Check for Cancel before every layer of the networks: a job stops within one layer, not at the end
    of a VAE pass or a 512 px stage-1 tile (each takes a minute on a CPU)."""
    handles = [m.register_forward_pre_hook(lambda module, args: hooks.check())
               for net in networks for m in net.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _source_name(photo: Path) -> str:
    """The upload's file name as metadata and output name: letters, digits, . _ - only (never a path)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(photo).name)[-80:] or "photo"


def run_fast(models: Models, job: Job, photo: Path, hooks: Hooks) -> tuple[Image.Image, Image.Image, dict]:
    """Stage 1 alone, as sample.py --stage1-only: the network's result at `upscale` (default its scale)."""
    loras, _ = models.split_loras(job)
    up, info = models.upscaler(job.stage1, loras)
    image = images.open_image(photo, up.check_size)
    upscale = job.upscale or up.scale
    if not upscale > 0:
        raise ValueError(f"upscale must be > 0, not {upscale}")
    size = (max(1, round(image.width * upscale)), max(1, round(image.height * upscale)))
    if size[0] * size[1] > images.MAX_INPUT_PIXELS:
        raise ImageError(f"the result would be {size[0]}x{size[1]}: more than {images.MAX_INPUT_PIXELS / 1e6:.0f} MP")
    with cancel_points(hooks, up.net):
        result = up.upscale_image(image, size, _Tiles(up, hooks).on_tile)
    return image, result, {**info, "upscale": upscale, "source": _source_name(photo), "mode": job.mode}


def _damage(job: Job, image: Image.Image) -> tuple[torch.Tensor, dict]:
    """(soft damage weight at the image's size, what the metadata records of it)."""
    params = masks.MaskParams()
    if job.painted:
        hard = torch.zeros(image.height, image.width, dtype=torch.bool)
        for layer in job.painted:
            hard |= masks.load_mask(layer, (image.height, image.width))
        source = "painted"
    else:
        hard, source = masks.detect_damage(repair.image_tensor(image), params), "auto"
    if not hard.any():
        raise ImageError("no damage to repair: " + ("paint over the cracks first" if job.painted else
                         "the automatic detector found none (paint a mask instead)"))
    return repair.soft_mask(hard, params), {"repair": {"mask": source, "mask_params": asdict(params),
                                                       "damaged_fraction": round(hard.float().mean().item(), 6)}}


def run_supir(models: Models, job: Job, photo: Path, hooks: Hooks) -> tuple[Image.Image, Image.Image, dict]:
    """SUPIR (after the stage-1 network in two-stage mode; inside a mask in repair mode), as sample.py."""
    settings = job.settings()
    stage1_loras, supir_loras = models.split_loras(job)
    up, extra = models.upscaler(job.stage1, stage1_loras) if job.mode == "two-stage" else (None, {})
    restorer, model_info = models.restorer(PRESETS[job.supir_preset][0], supir_loras)
    restorer.pixel_restorer = None if up is None else _Tiles(up, hooks)
    image = pipeline.open_image(photo, settings)
    soft = None
    if job.mode == "repair":
        soft, repair_info = _damage(job, image)
        extra = {**extra, **repair_info}
    recorder = restorer.denoiser = _Recorder(restorer.denoiser)

    def on_step(i, n):
        hooks.check()
        hooks.progress(i, n, "sampling steps")
        if hooks.preview is not None and recorder.latest is not None and (i % hooks.preview_every == 0 or i == n):
            hooks.preview(latent_preview(recorder.latest))

    try:
        with cancel_points(hooks, restorer.unet, restorer.vae, *([] if up is None else [up.net])):
            result = restorer.restore_samples(image, replace(settings, num_samples=1), job.seed, on_step, soft)[0]
    finally:
        restorer.denoiser, restorer.pixel_restorer = recorder.denoiser, None
    info = {"settings": settings.to_dict(), "seed": job.seed, "sample": 0, "source": _source_name(photo),
            "prompt_from": "page" if job.prompt else None, "mode": job.mode, **model_info, **extra}
    return image, result, info


def run(models: Models, job: Job, photo: Path, out_dir: Path, hooks: Hooks | None = None) -> Result:
    """One job: the result image, its PNG (every setting in the metadata) in a fresh folder under out_dir.
    Raises ImageError, RestoreError, WeightsError, ValueError (bad settings) or Cancelled."""
    hooks = hooks or Hooks()
    t0 = time.time()
    work = run_fast if job.mode == "fast" else run_supir
    image, result, info = work(models, job, Path(photo), hooks)
    before = images.split_alpha(image)[0]
    before = before if before.size == result.size else before.resize(result.size, Image.BICUBIC)
    for old in sorted(out_dir.iterdir(), key=lambda p: p.stat().st_mtime)[:-KEEP_RESULTS or None]:
        shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(dir=out_dir)) / f"{Path(_source_name(photo)).stem}_{job.mode}.png"
    images.save_png(result, path, info)
    return Result(result, before, path, info, time.time() - t0)


def error_line(e: BaseException) -> str:
    """The page's one line for a failed job (`error: FILE: PROBLEM` as the CLI prints it)."""
    if isinstance(e, WeightsError):
        return f"error: {e.args[0]}: {e.args[1]}"
    if isinstance(e, Cancelled):
        return "cancelled"
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "error: out of GPU memory (turn on tiling for large photos)"
    what = {ImageError: "photo", ValueError: "settings", RestoreError: "restore"}
    return f"error: {next((w for t, w in what.items() if isinstance(e, t)), type(e).__name__)}: {one_line(e)}"
