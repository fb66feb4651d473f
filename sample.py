"""Restore photos with SUPIR.

    python sample.py --image photo.jpg --out outputs/                 # SUPIR v0Q, Quality settings
    python sample.py --image photos/ --fidelity --upscale 2           # a folder, v0F, 2x
    python sample.py --image 'scans/*.png' --sampler dpmpp2m          # Lightning settings (8 steps)
    python sample.py --model tiny --image photo.jpg --min-size 128 --steps 4   # smoke test, random weights
    python sample.py --image cracked.jpg --repair --compare           # repair cracks / scratches (auto mask)
    python sample.py --image cracked.jpg --mask painted.png           # repair where the mask is white
    python sample.py --image photo.jpg --stage1-only                  # Real-ESRGAN x4plus alone, 4x, offline
    python sample.py --image photo.jpg --stage1 realesrgan-x4plus     # Real-ESRGAN first, then SUPIR (DiffBIR)

Each result is a PNG holding every setting in its metadata (images.read_png_info). Under torchrun each
rank restores its share of the sorted image list. See docs/restore.md for every option.

The order of a run: option values (exit 2), the inputs (every image, mask, clean original and caption,
from their headers), the output folder, then the weights (every missing file named at once, before any
download), then one image after the other (a bad one fails alone: exit 1 at the end).
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mini_supir import batch, cli, devices, images, lora_files, outputs, presets, stage1, supir
from mini_supir import mask as masks
from mini_supir.cli import fail, one_line
from mini_supir.devices import DTYPES, pick_device
from mini_supir.images import ImageError
from mini_supir.mask_cli import param_type
from mini_supir.pipeline import RestoreError, Restorer
from mini_supir.presets import RestoreSettings
from mini_supir.weights import CheckpointError, WeightsError, resolve_all

# The options that override a RestoreSettings field of the same name (the rest come from the preset).
OVERRIDES = ("upscale", "min_size", "steps", "cfg", "cfg_start", "control_scale", "control_start", "restore_cfg",
             "s_churn", "s_noise", "eta", "positive", "negative", "color_fix", "num_samples", "tile_vae",
             "vae_tile_size", "tile_size", "tile_stride")
# The detector parameters with their own option (every other one: --mask-param NAME=VALUE).
MASK_FIELDS = {f.name: f for f in fields(masks.MaskParams)}
MASK_OPTIONS = [
    ("--mask-radius", "radius", "automatic mask: finds lines up to 2 N + 1 px wide"),
    ("--mask-min-length", "min_length", "automatic mask: ignore marks shorter than N px"),
    ("--mask-dilate", "dilate_radius", "automatic mask: grow the detection by N px"),
    ("--mask-feather", "feather_sigma", "blend the repair over N px (Gaussian sigma) around the mask"),
]


def mask_param(s: str) -> tuple[str, object]:
    name, _, value = s.partition("=")
    name = name.strip().replace("-", "_")
    if name not in MASK_FIELDS or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(MASK_FIELDS)}")
    return name, param_type(MASK_FIELDS[name])(value)


def add_io_options(p: argparse.ArgumentParser) -> None:
    """Input / output, model and stage-1 options."""
    io = p.add_argument_group("input / output")
    io.add_argument("--image", nargs="+", action="extend", required=True, help="image files, folders or glob patterns")
    io.add_argument("--out", default="outputs", help="output folder (default: outputs; made with the first result)")
    io.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    io.add_argument("--compare", action="store_true", help="also write <name>_compare.png: input | result "
                    "(repair: damaged | mask | result), then --clean if given")
    io.add_argument("--upscale", type=cli.positive, help="result size = input size x upscale (default: 1; with "
                    "--stage1-only the network's own scale)")
    io.add_argument("--min-size", type=cli.size_px, help="work at least at this short side, px (default: 1024)")

    m = p.add_argument_group("model")
    m.add_argument("--model", choices=sorted(supir.PRESETS), default="sdxl",
                   help="architecture (default: sdxl); tiny / medium without weight files = random weights: "
                        "a smoke test that restores nothing")
    m.add_argument("--sdxl", help="SDXL single file: path, registry name or repo_id/filename (default: sdxl)")
    m.add_argument("--supir", help="SUPIR file: path, Q, F or repo_id/filename (default: Q, F with --fidelity)")
    m.add_argument("--lora", action="append", default=[], type=cli.lora_spec, metavar="FILE[:SCALE]",
                   help="LoRA file, PEFT adapter folder or hub spec merged into the model, SCALE default 1 (repeatable); "
                        "a stage-1 LoRA (train.py --model realesrgan-x4plus) goes into the --stage1 network")
    m.add_argument("--lora-strict", choices=["on", "off"], default="on",
                   help="on (default): a LoRA with keys we cannot apply is an error; off: apply what fits, "
                        "print one warning line listing what was skipped")
    m.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="UNet / text encoders (auto: fp16 on GPU, fp32 on CPU)")
    m.add_argument("--vae-dtype", choices=["auto", *DTYPES], default="auto",
                   help="VAE (auto: bf16 on CUDA, else fp32; fp16 is refused: it overflows)")
    m.add_argument("--device", type=cli.device, default="auto", help="auto (default: cuda, mps, cpu), cuda, cuda:1, mps or cpu")
    m.add_argument("--offload", action="store_true", help="move each part to the GPU only while it runs")

    st = p.add_argument_group("stage 1: a pixel-space restorer first (DiffBIR's two stages; Real-ESRGAN family)")
    st.add_argument("--stage1", metavar="NAME|FILE",
                    help=f"run this network on the input first, then SUPIR on its result: {', '.join(stage1.REGISTRY)}, "
                         "an official .pth or an ncnn .param (default: none, SUPIR's denoise encoder alone)")
    st.add_argument("--stage1-only", action="store_true",
                    help="the stage-1 result is the output: seconds, no SDXL / SUPIR weights (default network: "
                         "realesrgan-x4plus)")
    st.add_argument("--stage1-tile", type=cli.size_px, default=512, metavar="PX",
                    help="stage 1 in overlapping tiles of this many input px (default: 512; 0 = whole image)")
    st.add_argument("--stage1-tile-pad", type=cli.size_px, default=16, metavar="PX",
                    help="context around each stage-1 tile, px (default: 16)")



def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Sampling, repair and tiling options (the rest of RestoreSettings and MaskParams)."""
    s = p.add_argument_group("sampling")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--quality", dest="mode", action="store_const", const="quality",
                      help="SUPIR v0Q, cfg 7.5, cfg start 4 (default)")
    mode.add_argument("--fidelity", dest="mode", action="store_const", const="fidelity",
                      help="SUPIR v0F, cfg 4, cfg start 1")
    s.add_argument("--sampler", choices=presets.SAMPLERS, default="edm",
                   help="edm (default): SUPIR's restore EDM; dpmpp2m: its Lightning config (8 steps; no --restore-cfg, "
                        "--s-churn, --control-start); lightning: Euler on trailing steps (SDXL-Lightning)")
    s.add_argument("--steps", type=cli.count, help="edm 50, dpmpp2m 8, lightning 4 (at most 1000)")
    s.add_argument("--cfg", type=cli.finite, help="text guidance at the end of sampling (sigma 0)")
    s.add_argument("--cfg-start", type=cli.number(float, none=True), help="guidance at the start (sigma max); none = constant")
    s.add_argument("--control-scale", type=cli.finite, help="strength of the LQ control at the end (default: 1)")
    s.add_argument("--control-start", type=cli.number(float, none=True),
                   help="control strength at the start (default: none = constant)")
    s.add_argument("--restore-cfg", type=cli.finite,
                   help="pull towards the stage-1 latent, edm (default: 4; <= 0 off, as SUPIR's demo)")
    s.add_argument("--s-churn", type=cli.non_negative, help="EDM churn (default: 5)")
    s.add_argument("--s-noise", type=cli.non_negative, help="churn / SDE noise scale (default: 1.003)")
    s.add_argument("--eta", type=cli.non_negative, help="DPM++ SDE noise, dpmpp2m (default: 1)")
    s.add_argument("--prompt", default="", help="description used where no <name>.txt caption sits beside an image")
    s.add_argument("--positive", help="quality prompt appended to the description (default: SUPIR's)")
    s.add_argument("--negative", help="negative prompt (default: SUPIR's)")
    s.add_argument("--seed", type=cli.seed, default=1234, help="sample k of an image uses seed + k")
    s.add_argument("--num-samples", type=cli.count, help="results per image (default: 1, at most 1000)")
    s.add_argument("--color-fix", choices=presets.COLOR_FIXES, help="colours from the stage-1 image (default: wavelet)")

    r = p.add_argument_group("repair (cracks, scratches, missing paint; docs/repair.md)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--repair", action="store_true",
                       help="regenerate only the damage found by the automatic detector (mask.py); every other "
                            "pixel is kept as it is; <name>_mask.png is written beside the result")
    which.add_argument("--mask", type=Path, metavar="FILE|FOLDER",
                       help="repair where this mask is white (alpha, if painted on a transparent layer); a folder "
                            "holds <name>_mask.png or <name>.png per image; of the image's shape (any scale)")
    r.add_argument("--clean", type=Path, metavar="FILE|FOLDER",
                   help="the undamaged image (a folder: <name>.* per image), added to the --compare panel")
    for option, name, help in MASK_OPTIONS:
        r.add_argument(option, type=param_type(MASK_FIELDS[name]), metavar="N",
                       help=f"{help} (default: {MASK_FIELDS[name].default})")
    r.add_argument("--mask-param", action="append", default=[], type=mask_param, metavar="NAME=VALUE",
                   help="any other detector parameter of mask.MaskParams (repeatable)")

    t = p.add_argument_group("tiling (large images)")
    t.add_argument("--tile-vae", action="store_true", default=None, help="VAE encode / decode in tiles")
    t.add_argument("--vae-tile-size", type=cli.count, help="VAE tile, px (default: 512)")
    t.add_argument("--tile-size", type=cli.count, help="sample in overlapping tiles of this many px (SUPIR: 1024)")
    t.add_argument("--tile-stride", type=cli.count, help="tile stride, px (default: tile size / 2)")


def given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest)  # (0.0 == False: compare by identity)
    return value is not None and value is not False and value not in ("", [])


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description="Restore photos with SUPIR. Sampling options default to the preset.")
    add_io_options(p)
    add_sampling_options(p)
    args = p.parse_args(argv)
    if args.stage1_only:
        args.stage1 = args.stage1 or "realesrgan-x4plus"
        supir_only = [d for d in [*OVERRIDES, "mode", "sdxl", "supir", "prompt", "repair", "mask"]
                      if d != "upscale" and given(args, d)]
        if supir_only:
            option = {"mode": "quality / --fidelity"}.get(supir_only[0], supir_only[0].replace("_", "-"))
            p.error(f"--{option} is a SUPIR option: it has no effect with --stage1-only")
    unused = [d for d in presets.unused_settings(args.sampler) if given(args, d)]  # the preset has them off
    if unused:
        p.error(f"--{unused[0].replace('_', '-')} is not used by --sampler {args.sampler}: leave it out")
    args.mode = args.mode or "quality"
    args.repairing = args.repair or args.mask is not None
    detector = [o for o, _, _ in MASK_OPTIONS[:-1] if given(args, o[2:].replace("-", "_"))]
    if (detector or args.mask_param) and not args.repair:
        p.error(f"{(detector or ['--mask-param'])[0]} sets the automatic detector: it needs --repair")
    if args.mask_feather is not None and not args.repairing:
        p.error("--mask-feather needs --repair or --mask")
    if args.repairing and args.upscale not in (None, 1):
        p.error("--repair / --mask keep the pixels outside the mask, so they work at the input size: upscale "
                "the repaired image in a second run")
    return args


def settings_from(args: argparse.Namespace) -> RestoreSettings:
    settings = presets.preset(args.mode, args.sampler)
    return replace(settings, **{name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None})


def mask_params(args: argparse.Namespace) -> masks.MaskParams:
    chosen = dict(args.mask_param)
    chosen.update({name: getattr(args, option[2:].replace("-", "_")) for option, name, _ in MASK_OPTIONS
                   if getattr(args, option[2:].replace("-", "_")) is not None})
    return replace(masks.MaskParams(), **chosen)


def plan(f: Path, name: str, args: argparse.Namespace, settings: RestoreSettings) -> batch.Job:
    check = None if args.stage1_only else (lambda w, h: presets.check_size(w, h, settings))
    return batch.plan(f, name, check, args.mask, args.clean, args.prompt)


def outputs_of(job: batch.Job, out: Path, settings: RestoreSettings, args: argparse.Namespace) -> list[Path]:
    return outputs.outputs_for(job.name, out, settings.num_samples, args.compare, args.repairing)


# -- the weights ---------------------------------------------------------------------------------------------

def split_loras(args: argparse.Namespace, files: dict[str, Path]) -> tuple[list, list]:
    """(the --lora files made for a stage-1 network (their keys / metadata say so), the SUPIR ones);
    raises WeightsError for a LoRA that fits neither, or no network here."""
    ours, supir_loras = [], []
    for spec, scale in args.lora:
        try:
            parts = lora_files.lora_parts(files[str(spec)])
        except (CheckpointError, OSError, ValueError) as e:  # LoRAFileError (NaN tensors, ...) is a ValueError
            raise WeightsError(spec, one_line(e)) from None
        if parts == {"stage1"}:
            if not args.stage1:
                raise WeightsError(spec, "a LoRA for a stage-1 network: give that network with --stage1 NAME or --stage1-only")
            ours.append((files[str(spec)], scale))
        elif "stage1" in parts:
            raise WeightsError(spec, f"mixes stage-1 and SUPIR adapters ({', '.join(sorted(parts))}): not one network's LoRA")
        elif args.stage1_only:
            raise WeightsError(spec, f"a SUPIR LoRA ({', '.join(sorted(parts))}): --stage1-only runs only the stage-1 network")
        else:
            supir_loras.append((spec, scale))
    return ours, supir_loras


def build_upscaler(args: argparse.Namespace, device: str, loras=()) -> tuple[stage1.Upscaler, dict]:
    """The --stage1 network with its LoRAs merged, and what the PNG metadata records of it; raises WeightsError."""
    try:
        up = stage1.Upscaler.load(args.stage1, loras, device=device, dtype=args.dtype, tile=args.stage1_tile,
                                  tile_pad=args.stage1_tile_pad)
    except (CheckpointError, ValueError, OSError) as e:  # LoRAFileError is a ValueError
        at_fault = next((str(f) for f, _ in loras if Path(f).name in str(e)), args.stage1)
        raise WeightsError(at_fault, one_line(e)) from None
    return up, {"stage1": {"model": args.stage1, "file": str(up.file), "scale": up.scale, "tile": up.tile,
                           "tile_pad": up.tile_pad, "dtype": str(up.dtype).removeprefix("torch."),
                           "loras": [[str(f), s] for f, s in loras]}}


def load_models(args: argparse.Namespace, device: str) -> tuple[Restorer | None, stage1.Upscaler | None, dict]:
    """(SUPIR restorer or None with --stage1-only, stage-1 upscaler or None, what the metadata records).
    Every file is found first: one WeightsError names every missing one, before any download."""
    if args.stage1 and args.stage1 not in stage1.REGISTRY:
        try:
            stage1.resolve(args.stage1)  # a local path: nothing to download
        except CheckpointError as e:
            raise WeightsError(args.stage1, one_line(e)) from None
    pair = None if args.stage1_only else Restorer.weight_specs(args.model, args.mode, args.sdxl, args.supir)
    files = resolve_all([spec for spec, _ in args.lora] + list(pair or ()))
    stage1_loras, supir_loras = split_loras(args, files)
    up, info = build_upscaler(args, device, stage1_loras) if args.stage1 else (None, {})
    if args.stage1_only:
        return None, up, info
    restorer, model_info = Restorer.load(args.model, args.mode, args.sdxl, args.supir, tuple(supir_loras),
                                         args.lora_strict == "on", device=device, dtype=args.dtype,
                                         vae_dtype=args.vae_dtype, offload=args.offload)
    restorer.pixel_restorer = up
    return restorer, up, {**model_info, **info}


# -- the run ---------------------------------------------------------------------------------------------

def worker(args: argparse.Namespace, out: Path, settings: RestoreSettings, params: masks.MaskParams | None,
           restorer: Restorer | None, up: stage1.Upscaler | None, info: dict):
    """job -> the paths written for it, with a progress bar of its steps (or stage-1 tiles)."""

    def work(job: batch.Job) -> list[Path]:
        with tqdm(desc=job.path.name, unit="tile" if restorer is None else "step", leave=False, disable=None) as bar:
            def on_step(i, n):
                bar.total = n if restorer is None else n * settings.num_samples
                bar.update(1)
            if restorer is None:
                return batch.upscale(up, job, out, args.upscale, args.compare, info, on_step)
            return batch.restore(restorer, job, out, settings, args.seed, params, args.compare, info, on_step)
    return work


def run_one(job: batch.Job, work) -> bool:
    """Run `work(job)` -> written paths, reporting it in one line; False if the image failed."""
    t0 = time.time()
    try:
        paths = work(job)
    except (ImageError, RestoreError, OSError) as e:
        fail(job.path, one_line(e))
        return False
    except Exception as e:  # noqa: BLE001 — one bad image must not stop the batch
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        fail(job.path, "out of GPU memory (try --offload, --tile-vae, --tile-size 1024)" if oom
             else f"{type(e).__name__}: {one_line(e)}")
        return False
    tqdm.write(f"wrote {', '.join(str(p) for p in paths)} ({time.time() - t0:.1f} s)", file=sys.stderr)
    return True


def check_outputs(out: Path, files: list[Path], names: dict[Path, str], jobs: list[batch.Job],
                  settings: RestoreSettings, args: argparse.Namespace) -> int:
    """The exit code refusing the run (reported in one line), or 0: `out` must be writable, and no output
    may land on an input or on another input's output (over every rank's files: names are global)."""
    try:
        outputs.check_writable(out)
    except OSError as e:
        fail(out, f"cannot write there ({e.strerror or type(e).__name__})")
        return 1
    mine = [p for job in jobs for p in outputs_of(job, out, settings, args)]
    clashes = outputs.overwritten_inputs(mine, batch.inputs(jobs))
    if clashes:
        fail(f"--out {out}", f"{clashes[0][0]} would be written over the input {clashes[0][1]}: choose another folder")
        return 2
    every = Counter(p for f in files for p in outputs.outputs_for(names[f], out, settings.num_samples, args.compare,
                                                                  args.repairing))
    twice = [p for p, n in every.items() if n > 1]
    if twice:  # x.png from two folders, or a_1.png beside sample 1 of a.png
        fail(twice[0], "two inputs would both be written here: rename one of them")
        return 2
    return 0


def restore_all(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
        params = mask_params(args) if args.repairing else None
        devices.pick_dtypes(pick_device("cpu"), args.dtype, args.vae_dtype)  # refuse fp16 VAE now
    except ValueError as e:
        fail("settings", one_line(e))
        return 2
    files, errors = images.find_images(args.image)
    for spec, problem in errors:
        fail(spec, problem)
    failed = len(errors)
    # torchrun: every rank sees the same sorted list and takes every world-th file from its rank on
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    names = outputs.output_names(files)
    jobs = []
    for f in files[rank::world]:
        try:
            jobs.append(plan(f, names[f], args, settings))
        except ImageError as e:
            fail(f, one_line(e))
            failed += 1

    out = Path(args.out)
    refused = check_outputs(out, files, names, jobs, settings, args)
    if refused:
        return refused
    todo = []
    for job in jobs:
        if args.overwrite or not all(p.exists() for p in outputs_of(job, out, settings, args)):
            todo.append(job)
        else:
            tqdm.write(f"skip {job.path}: output exists (--overwrite to redo)", file=sys.stderr)
    if not todo:
        return 1 if failed else 0

    device = args.device
    if device == "auto" and world > 1 and pick_device().type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    try:
        restorer, up, info = load_models(args, device)
    except WeightsError as e:  # missing / wrong weights, bad LoRA: nothing can run
        fail(*e.args)
        return 1
    if restorer is not None:
        restorer.encode_prompts([replace(settings, prompt=job.prompt).positive_text for job in todo] + [settings.negative])
        restorer.free_text_encoders()
    work = worker(args, out, settings, params, restorer, up, info)
    for job in tqdm(todo, desc="images", unit="img", disable=None, position=rank if world > 1 else None):
        failed += not run_one(job, work)
    return 1 if failed else 0


def main(argv=None) -> int:
    return cli.run(lambda: restore_all(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
