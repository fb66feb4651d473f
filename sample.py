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
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from mini_supir import mask as masks
from mini_supir import images, lora_files, pipeline, repair, stage1, supir
from mini_supir.pipeline import ImageError, RestoreError, RestoreSettings, Restorer
from mini_supir.devices import DTYPES, pick_device
from mini_supir.cli import fail, lora_spec, one_line
from mini_supir.weights import CheckpointError, WeightsError, resolve

OVERRIDES = {  # CLI option -> RestoreSettings field (the rest of the settings come from the preset)
    "upscale": "upscale", "min_size": "min_size", "steps": "steps", "cfg": "cfg", "cfg_start": "cfg_start",
    "control_scale": "control_scale", "control_start": "control_start", "restore_cfg": "restore_cfg",
    "s_churn": "s_churn", "s_noise": "s_noise", "eta": "eta", "positive": "positive", "negative": "negative",
    "color_fix": "color_fix", "num_samples": "num_samples", "tile_vae": "tile_vae", "vae_tile_size": "vae_tile_size",
    "tile_size": "tile_size", "tile_stride": "tile_stride",
}


# The detector parameters with their own option (every other one: --mask-param NAME=VALUE).
DEFAULT_MASK = masks.MaskParams()
MASK_OPTIONS = [
    ("--mask-radius", "radius", "automatic mask: finds lines up to 2 N + 1 px wide"),
    ("--mask-min-length", "min_length", "automatic mask: ignore marks shorter than N px"),
    ("--mask-dilate", "dilate_radius", "automatic mask: grow the detection by N px"),
    ("--mask-feather", "feather_sigma", "blend the repair over N px (Gaussian sigma) around the mask"),
]


def mask_param(s: str) -> tuple[str, object]:
    name, _, value = s.partition("=")
    name = name.strip().replace("-", "_")
    field = next((f for f in fields(masks.MaskParams) if f.name == name), None)
    if field is None or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of "
                                         f"{', '.join(f.name for f in fields(masks.MaskParams))}")
    kind = type(getattr(DEFAULT_MASK, name))
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"{name} is true or false, not {value!r}")
        return name, value.lower() in ("true", "1")
    try:
        return name, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} takes a {kind.__name__}, not {value!r}") from None


def mask_params(args: argparse.Namespace) -> masks.MaskParams:
    given = dict(args.mask_param)
    given.update({field: getattr(args, option[2:].replace("-", "_")) for option, field, _ in MASK_OPTIONS
                  if getattr(args, option[2:].replace("-", "_")) is not None})
    return replace(DEFAULT_MASK, **given)


def optional_float(s: str) -> float | None:
    return None if s.lower() == "none" else float(s)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Restore photos with SUPIR. Sampling options default to the preset.")
    io = p.add_argument_group("input / output")
    io.add_argument("--image", nargs="+", action="extend", required=True, help="image files, folders or glob patterns")
    io.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    io.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    io.add_argument("--compare", action="store_true", help="also write <name>_compare.png: input | result "
                    "(repair: damaged | mask | result), then --clean if given")
    io.add_argument("--upscale", type=float, help="result size = input size x upscale (default: 1; with "
                    "--stage1-only the network's own scale)")
    io.add_argument("--min-size", type=int, help="work at least at this short side, px (default: 1024)")

    m = p.add_argument_group("model")
    m.add_argument("--model", choices=sorted(supir.PRESETS), default="sdxl",
                   help="architecture (default: sdxl); tiny / medium without weight files = random weights: "
                        "a smoke test that restores nothing")
    m.add_argument("--sdxl", help="SDXL single file: path, registry name or repo_id/filename (default: sdxl)")
    m.add_argument("--supir", help="SUPIR file: path, Q, F or repo_id/filename (default: Q, F with --fidelity)")
    m.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="FILE[:SCALE]",
                   help="LoRA file, PEFT adapter folder or hub spec merged into the model, SCALE default 1 (repeatable); "
                        "a stage-1 LoRA (train.py --model realesrgan-x4plus) goes into the --stage1 network")
    m.add_argument("--lora-strict", choices=["on", "off"], default="on",
                   help="on (default): a LoRA with keys we cannot apply is an error; off: apply what fits, "
                        "print one warning line listing what was skipped")
    m.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="UNet / text encoders (auto: fp16 on GPU, fp32 on CPU)")
    m.add_argument("--vae-dtype", choices=["auto", *DTYPES], default="auto",
                   help="VAE (auto: bf16 on CUDA, else fp32; fp16 is refused: it overflows)")
    m.add_argument("--device", default="auto", help="auto (default: cuda, mps, cpu), cuda, cuda:1, mps or cpu")
    m.add_argument("--offload", action="store_true", help="move each part to the GPU only while it runs")

    st = p.add_argument_group("stage 1: a pixel-space restorer first (DiffBIR's two stages; Real-ESRGAN family)")
    st.add_argument("--stage1", metavar="NAME|FILE",
                    help=f"run this network on the input first, then SUPIR on its result: {', '.join(stage1.REGISTRY)}, "
                         "an official .pth or an ncnn .param (default: none, SUPIR's denoise encoder alone)")
    st.add_argument("--stage1-only", action="store_true",
                    help="the stage-1 result is the output: seconds, no SDXL / SUPIR weights (default network: "
                         "realesrgan-x4plus)")
    st.add_argument("--stage1-tile", type=int, default=512, metavar="PX",
                    help="stage 1 in overlapping tiles of this many input px (default: 512; 0 = whole image)")
    st.add_argument("--stage1-tile-pad", type=int, default=16, metavar="PX",
                    help="context around each stage-1 tile, px (default: 16)")

    s = p.add_argument_group("sampling")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--quality", dest="mode", action="store_const", const="quality",
                      help="SUPIR v0Q, cfg 7.5, cfg start 4 (default)")
    mode.add_argument("--fidelity", dest="mode", action="store_const", const="fidelity",
                      help="SUPIR v0F, cfg 4, cfg start 1")
    s.add_argument("--sampler", choices=pipeline.SAMPLERS, default="edm",
                   help="edm (default): SUPIR's restore EDM; dpmpp2m: its Lightning config (8 steps); "
                        "lightning: Euler on trailing steps (SDXL-Lightning)")
    s.add_argument("--steps", type=int, help="edm 50, dpmpp2m 8, lightning 4")
    s.add_argument("--cfg", type=float, help="text guidance at the end of sampling (sigma 0)")
    s.add_argument("--cfg-start", type=optional_float, help="guidance at the start (sigma max); none = constant")
    s.add_argument("--control-scale", type=float, help="strength of the LQ control at the end (default: 1)")
    s.add_argument("--control-start", type=optional_float,
                   help="control strength at the start (default: none = constant)")
    s.add_argument("--restore-cfg", type=float,
                   help="pull towards the stage-1 latent, edm (default: 4; <= 0 off, as SUPIR's demo)")
    s.add_argument("--s-churn", type=float, help="EDM churn (default: 5)")
    s.add_argument("--s-noise", type=float, help="churn / SDE noise scale (default: 1.003)")
    s.add_argument("--eta", type=float, help="DPM++ SDE noise, dpmpp2m (default: 1)")
    s.add_argument("--prompt", default="", help="description used where no <name>.txt caption sits beside an image")
    s.add_argument("--positive", help="quality prompt appended to the description (default: SUPIR's)")
    s.add_argument("--negative", help="negative prompt (default: SUPIR's)")
    s.add_argument("--seed", type=int, default=1234, help="sample k of an image uses seed + k")
    s.add_argument("--num-samples", type=int, help="results per image (default: 1)")
    s.add_argument("--color-fix", choices=pipeline.COLOR_FIXES, help="colours from the stage-1 image (default: wavelet)")

    r = p.add_argument_group("repair (cracks, scratches, missing paint; docs/repair.md)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--repair", action="store_true",
                       help="regenerate only the damage found by the automatic detector (mask.py); every other "
                            "pixel is kept as it is; <name>_mask.png is written beside the result")
    which.add_argument("--mask", type=Path, metavar="FILE|FOLDER",
                       help="repair where this mask is white (alpha, if painted on a transparent layer); a folder "
                            "holds <name>_mask.png or <name>.png per image")
    r.add_argument("--clean", type=Path, metavar="FILE|FOLDER",
                   help="the undamaged image (a folder: <name>.* per image), added to the --compare panel")
    for option, field, help in MASK_OPTIONS:
        r.add_argument(option, type=type(getattr(DEFAULT_MASK, field)), metavar="N",
                       help=f"{help} (default: {getattr(DEFAULT_MASK, field)})")
    r.add_argument("--mask-param", action="append", default=[], type=mask_param, metavar="NAME=VALUE",
                   help="any other detector parameter of mask.MaskParams (repeatable)")

    t = p.add_argument_group("tiling (large images)")
    t.add_argument("--tile-vae", action="store_true", default=None, help="VAE encode / decode in tiles")
    t.add_argument("--vae-tile-size", type=int, help="VAE tile, px (default: 512)")
    t.add_argument("--tile-size", type=int, help="sample in overlapping tiles of this many px (SUPIR: 1024)")
    t.add_argument("--tile-stride", type=int, help="tile stride, px (default: tile size / 2)")
    args = p.parse_args(argv)
    if args.stage1_only:
        args.stage1 = args.stage1 or "realesrgan-x4plus"
        supir_only = [d for d in [*OVERRIDES, "mode", "sdxl", "supir", "prompt", "repair", "mask"]
                      if d != "upscale" and getattr(args, d) not in (None, False, [], "")]
        if supir_only:
            option = {"mode": "quality / --fidelity"}.get(supir_only[0], supir_only[0].replace("_", "-"))
            p.error(f"--{option} is a SUPIR option: it has no effect with --stage1-only")
    args.mode = args.mode or "quality"
    if args.stage1_tile < 0 or args.stage1_tile_pad < 0:
        p.error("--stage1-tile and --stage1-tile-pad must be >= 0")
    args.repairing = args.repair or args.mask is not None
    detector = [o for o, _, _ in MASK_OPTIONS[:-1] if getattr(args, o[2:].replace("-", "_")) is not None]
    if (detector or args.mask_param) and not args.repair:
        p.error(f"{(detector or ['--mask-param'])[0]} sets the automatic detector: it needs --repair")
    if args.mask_feather is not None and not args.repairing:
        p.error("--mask-feather needs --repair or --mask")
    if args.repairing and args.upscale not in (None, 1):
        p.error("--repair / --mask keep the pixels outside the mask, so they work at the input size: upscale "
                "the repaired image in a second run")
    return args


def settings_from(args: argparse.Namespace) -> RestoreSettings:
    settings = pipeline.preset(args.mode, args.sampler)
    given = {field: getattr(args, opt) for opt, field in OVERRIDES.items() if getattr(args, opt) is not None}
    return replace(settings, **given)


def find_images(specs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(sorted unique image files, [(spec, problem)]). Folders give their files with image extensions;
    files named explicitly are all tried (a non-image among them is reported when opened)."""
    extensions = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    found, errors = set(), []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found |= {f for f in path.iterdir() if f.is_file() and f.suffix.lower() in extensions}
        elif path.exists() or not glob.has_magic(spec):
            found.add(path)  # a missing file is reported by open_image, in the image loop
        else:
            matches = [Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file()]
            found |= set(matches)
            if not matches:
                errors.append((spec, "no file matches"))
    return sorted(found, key=str), errors


def output_names(files: list[Path]) -> dict[Path, str]:
    """Output stem per input: its stem, or stem_ext where two inputs share a stem (a.jpg, a.png)."""
    stems = {}
    for f in files:
        stems.setdefault(f.stem, []).append(f)
    return {f: f.stem if len(group) == 1 else f"{f.stem}_{f.suffix.lstrip('.')}" for group in stems.values() for f in group}


def outputs_for(stem: str, out: Path, settings: RestoreSettings, compare: bool, repairing: bool = False
                ) -> list[Path]:
    names = [stem] if settings.num_samples == 1 else [f"{stem}_{k}" for k in range(settings.num_samples)]
    return [out / f"{n}.png" for n in names] + ([out / f"{n}_compare.png" for n in names] if compare else []) \
        + ([out / f"{stem}_mask.png"] if repairing else [])


def caption_for(image: Path) -> str | None:
    caption = image.with_suffix(".txt")
    return caption.read_text(encoding="utf-8").strip() if caption.is_file() else None


def side_by_side(images: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """The images left to right, each bicubic-resized to `size` (the result's)."""
    canvas = Image.new("RGB", (len(images) * size[0], size[1]))
    for i, im in enumerate(images):
        im = im.convert("RGB")
        canvas.paste(im if im.size == size else im.resize(size, Image.BICUBIC), (i * size[0], 0))
    return canvas


def companion(spec: Path, image: Path, stem: str, patterns: tuple[str, ...]) -> Path:
    """`spec` itself, or in the folder `spec` the first image file named by a pattern ({stem}, {name}: the
    input's file stem and output name)."""
    if not spec.is_dir():
        return spec
    extensions = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    for pattern in patterns:
        matches = [m for m in sorted(spec.glob(pattern.format(stem=glob.escape(image.stem), name=glob.escape(stem))))
                   if m.suffix.lower() in extensions]
        if matches:
            return matches[0]
    raise ImageError(f"no {' or '.join(p.format(stem=image.stem, name=stem) for p in patterns)} in {spec}")


def damage_mask(args: argparse.Namespace, path: Path, stem: str, image: Image.Image,
                params: masks.MaskParams) -> tuple[torch.Tensor, str]:
    """(hard damage mask (H, W) bool at the image's size, where it came from)."""
    if args.repair:
        return masks.detect_damage(repair.image_tensor(image), params), "auto"
    source = companion(args.mask, path, stem, ("{name}_mask.png", "{stem}_mask.png", "{stem}.png"))
    try:
        return masks.load_mask(source, (image.height, image.width)), str(source)
    except (OSError, ValueError) as e:
        raise ImageError(f"mask {source}: {one_line(e)}") from None


def check_writable(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
        pass


def build_restorer(args: argparse.Namespace, device: str) -> tuple[Restorer, dict]:
    """The model of --model with --sdxl / --supir / --lora; raises WeightsError naming the file at fault."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restorer, info = Restorer.load(args.model, args.mode, args.sdxl, args.supir, tuple(args.lora),
                                       args.lora_strict == "on", device=device, dtype=args.dtype,
                                       vae_dtype=args.vae_dtype, offload=args.offload)
    for w in caught:  # --lora-strict off: what each LoRA skipped, one line each
        if str(w.message).startswith("LoRA "):
            print(f"warning: {one_line(w.message)}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return restorer, info


def split_loras(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """The --lora files made for a stage-1 network (train.py --model realesrgan-x4plus: their keys and
    metadata say so), taken out of args.lora, which keeps the SUPIR ones; raises WeightsError."""
    ours, supir_loras = [], []
    for spec, scale in args.lora:
        try:
            path = resolve(spec)
            parts = lora_files.lora_parts(path)
        except (CheckpointError, OSError, ValueError) as e:
            raise WeightsError(spec, one_line(e)) from None
        if parts == {"stage1"}:
            if not args.stage1:
                raise WeightsError(spec, "a LoRA for a stage-1 network: give that network with --stage1 NAME or --stage1-only")
            ours.append((path, scale))
        elif "stage1" in parts:
            raise WeightsError(spec, f"mixes stage-1 and SUPIR adapters ({', '.join(sorted(parts))}): not one network's LoRA")
        elif args.stage1_only:
            raise WeightsError(spec, f"a SUPIR LoRA ({', '.join(sorted(parts))}): --stage1-only runs only the stage-1 network")
        else:
            supir_loras.append((spec, scale))
    args.lora = supir_loras
    return ours


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


def upscale_only(up: stage1.Upscaler, f: Path, path: Path, args: argparse.Namespace, info: dict) -> list[Path]:
    """--stage1-only: the network's result at --upscale (default its own scale), as Real-ESRGAN's inference."""
    upscale = args.upscale or up.scale
    image = images.open_image(f, up.check_size)
    size = (max(1, round(image.width * upscale)), max(1, round(image.height * upscale)))
    if size[0] * size[1] > images.MAX_INPUT_PIXELS:
        raise ImageError(f"the result would be {size[0]}x{size[1]}: more than {images.MAX_INPUT_PIXELS / 1e6:.0f} MP")
    with tqdm(desc=f.name, unit="tile", leave=False, disable=None) as bar:
        def on_tile(i, n):
            bar.total = n
            bar.update(1)
        result = up.upscale_image(image, size, on_tile)
    info = {**info, "upscale": upscale, "source": str(f)}
    images.save_png(result, path, info)
    if not args.compare:
        return [path]
    images.save_png(side_by_side([image, result], result.size), path.with_name(f"{path.stem}_compare.png"), info)
    return [path, path.with_name(f"{path.stem}_compare.png")]


def upscale_all(up: stage1.Upscaler, todo: list[Path], names: dict[Path, str], out: Path,
                args: argparse.Namespace, info: dict, failed: int) -> int:
    for f in tqdm(todo, desc="images", unit="img", disable=None):
        t0 = time.time()
        try:
            paths = upscale_only(up, f, out / f"{names[f]}.png", args, info)
            tqdm.write(f"wrote {', '.join(str(p) for p in paths)} ({time.time() - t0:.1f} s)", file=sys.stderr)
        except (ImageError, OSError) as e:
            fail(f, one_line(e))
            failed += 1
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    Image.MAX_IMAGE_PIXELS = pipeline.MAX_INPUT_PIXELS  # we check sizes ourselves, from the header
    try:
        settings = settings_from(args)
        params = mask_params(args)
        pipeline.pick_dtypes(pick_device("cpu"), args.dtype, args.vae_dtype)  # refuse fp16 VAE now
    except ValueError as e:
        fail("settings", one_line(e))
        return 2

    files, errors = find_images(args.image)
    for spec, problem in errors:
        fail(spec, problem)
    # torchrun: every rank sees the same sorted list and takes every world-th file from its rank on
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    names = output_names(files)
    files = files[rank::world]
    device = args.device
    if device == "auto" and world > 1 and pick_device().type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"

    out = Path(args.out)
    try:
        check_writable(out)
    except OSError as e:
        fail(out, f"cannot write there ({e.strerror or type(e).__name__})")
        return 1

    done = lambda f: all(p.exists() for p in outputs_for(names[f], out, settings, args.compare,  # noqa: E731
                                                          args.repairing))
    todo = [f for f in files if args.overwrite or not done(f)]
    for f in files:
        if f not in todo:
            tqdm.write(f"skip {f}: output exists (--overwrite to redo)", file=sys.stderr)
    failed = len(errors)
    prompts = {}  # the caption beside an image wins over --prompt
    for f in list(todo):
        try:
            caption = caption_for(f)
        except (OSError, UnicodeDecodeError) as e:
            fail(f.with_suffix(".txt"), f"unreadable caption ({one_line(e)})")
            todo.remove(f)
            failed += 1
            continue
        prompts[f] = (caption, "caption") if caption is not None else (args.prompt, "--prompt" if args.prompt else None)
    if not todo:
        return 1 if failed else 0

    try:
        stage1_loras = split_loras(args)
        up, stage1_info = build_upscaler(args, device, stage1_loras) if args.stage1 else (None, {})
        if args.stage1_only:
            return upscale_all(up, todo, names, out, args, stage1_info, failed)
        restorer, model_info = build_restorer(args, device)
    except WeightsError as e:  # missing / wrong weights, bad LoRA: nothing can run
        fail(*e.args)
        return 1
    restorer.pixel_restorer = up
    model_info.update(stage1_info)
    restorer.encode_prompts([replace(settings, prompt=p).positive_text for p, _ in prompts.values()] + [settings.negative])
    restorer.free_text_encoders()

    for f in tqdm(todo, desc="images", unit="img", disable=None, position=rank if world > 1 else None):
        t0 = time.time()
        try:
            image = pipeline.open_image(f, settings)
            prompt, source = prompts[f]
            s = replace(settings, prompt=prompt)
            extra, panels, soft = {}, [image], None
            if args.repairing:
                hard, mask_from = damage_mask(args, f, names[f], image, params)
                soft = repair.soft_mask(hard, params)
                extra["repair"] = {"mask": mask_from, "mask_params": asdict(params),
                                   "damaged_fraction": round(hard.float().mean().item(), 6)}
                panels.append(repair.mask_image(hard))
            clean = None
            if args.clean is not None:
                clean = pipeline.open_image(companion(args.clean, f, names[f], ("{stem}.*",)), settings)
            with tqdm(total=s.steps * s.num_samples, desc=f.name, unit="step", leave=False, disable=None) as bar:
                results = restorer.restore_samples(image, s, args.seed, on_step=lambda i, n: bar.update(1), mask=soft)
            paths = outputs_for(names[f], out, s, False)
            for k, (result, path) in enumerate(zip(results, paths)):
                info = {"settings": s.to_dict(), "seed": args.seed + k, "sample": k, "source": str(f),
                        "prompt_from": source, **model_info, **extra}
                images.save_png(result, path, info)
                if args.compare:
                    panel = side_by_side(panels + [result] + ([clean] if clean else []), result.size)
                    images.save_png(panel, path.with_name(f"{path.stem}_compare.png"), info)
            if args.repairing:
                paths.append(out / f"{names[f]}_mask.png")
                images.save_png(panels[1], paths[-1], {"source": str(f), **extra})
            tqdm.write(f"wrote {', '.join(str(p) for p in paths)} ({time.time() - t0:.1f} s)", file=sys.stderr)
        except (ImageError, RestoreError, OSError) as e:
            fail(f, one_line(e))
            failed += 1
        except Exception as e:  # noqa: BLE001 — one bad image must not stop the batch
            if isinstance(e, torch.cuda.OutOfMemoryError):
                fail(f, "out of GPU memory (try --offload, --tile-vae, --tile-size 1024)")
            else:
                fail(f, f"{type(e).__name__}: {one_line(e)}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
