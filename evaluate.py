"""Measure restoration: degrade ground-truth photos, restore them with each method, score the results.

    python evaluate.py --gt photos/ --out eval/                          # bicubic and SUPIR on sr4-blur2
    python evaluate.py --gt photos/ --out eval/ --method supir supir+lora --lora style.safetensors:0.8
    python evaluate.py --gt photos/ --out /tmp/ev --model tiny --steps 2 --min-size 0 --limit 2   # smoke test
    python evaluate.py --gt photos/ --out eval-cracks/ --setting cracks    # repair: damaged, fill, SUPIR repair
    python evaluate.py --gt photos/ --out eval-sr/ --method realesrgan-x4plus realesr-general-x4v3   # stage 1
    python evaluate.py --gt photos/ --out eval-2s/ --method realesrgan-x4plus+supir   # stage 1, then SUPIR

Each image is degraded with `--setting`, seeded from `--seed` and its file name (degrade.image_seed). Then
every method restores it, and the result is compared with the ground truth. Written to --out:

    results.csv         one row per (image, method): PSNR / SSIM on RGB and on Y, LPIPS, NIQE, seconds, peak memory;
                        damage settings also PSNR / SSIM inside the damage mask
    summary.md          mean ± std over the images, per method
    bars.png            the means as bar charts
    gain.png            PSNR gain of each method over the baseline (bicubic; damaged), one dot per image
    grid.png            GT | LQ (damage settings: mask) | each method: centre crops of the first images
    images/<method>/    restored images, 8-bit PNG: the metrics are computed on exactly these pixels
    images/lq/          the degraded inputs
    run.json            what the rows were computed with; a resumed run must match it

Damage settings (`--setting cracks`) repair instead: the methods are `damaged` (the input as it is, the
baseline), `fill` (classical inpainting, repair.prefill) and `supir` (mask-guided SUPIR repair), each with the
automatic damage mask or, with --known-mask, the synthetic damage's own mask.

Rows already in results.csv are not recomputed. An interrupted run resumes where it stopped, and adding a
method or images computes only the new rows.
"""
from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from mini_supir import mask as masks
from mini_supir import pipeline, repair, stage1, supir
from mini_supir.degrade import IMAGE_SUFFIXES, SETTINGS, Damage, damage, degrade, image_seed, load_image, modcrop, \
    quantize, save_image, to_uint8, upsample
from mini_supir.devices import DTYPES, pick_device
from mini_supir.images import atomic_write
from mini_supir.metrics import LPIPS, psnr, ssim, ssim_map
from mini_supir.niqe import niqe
from mini_supir.cli import lora_spec, one_line
from mini_supir.weights import CheckpointError, WeightsError

OLD_COLUMNS = ["image", "method", "setting", "height", "width", "psnr", "ssim", "psnr_y", "ssim_y", "lpips",
               "seconds", "peak_mem_mib", "mem_kind"]
# Older results.csv layouts (before the mask metrics, before NIQE) are upgraded in place (empty cells).
OLDER_COLUMNS = (OLD_COLUMNS, OLD_COLUMNS + ["psnr_mask", "ssim_mask"])
COLUMNS = OLD_COLUMNS + ["psnr_mask", "ssim_mask", "niqe"]
METRICS = ["psnr", "ssim", "psnr_y", "ssim_y", "lpips", "niqe", "psnr_mask", "ssim_mask"]
BASELINE = "bicubic"           # restoration settings: where every restorer starts
REPAIR_BASELINE = "damaged"    # damage settings: the damaged input, unrepaired
REPAIR_METHODS = [REPAIR_BASELINE, "fill", "supir", "supir+lora"]

# A method maps (LQ (1, 3, h, w) in [0, 1], as `degrade` returns it; GT size (H, W)) to the restored image
# (1, 3, H, W) in [0, 1]. For damage settings it gets a third argument, the synthetic damage's known mask
# (1, 1, H, W) bool. Methods that hold a model may also have open() / close() (load before the first timed
# call, free after the last) and a `device` (where its peak memory is measured).
Method = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Methods


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


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255


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
        out = self.restorer.restore(Image.fromarray(to_uint8(lq)[0]), settings, self.seed, mask=weight)
        if out.size != (size[1], size[0]):  # a setting whose scale differs along H and W
            out = out.resize((size[1], size[0]), Image.LANCZOS)
        return pil_to_tensor(out)


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
        except (CheckpointError, ValueError) as e:  # run_method reports it as a weights problem of this method
            raise WeightsError(self.name, one_line(e)) from None

    def open(self) -> None:
        self.upscaler = self.load()

    def close(self) -> None:
        self.upscaler = None

    def __call__(self, lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return pil_to_tensor(self.upscaler.upscale_image(Image.fromarray(to_uint8(lq)[0]), (size[1], size[0])))


def build_methods(args: argparse.Namespace) -> tuple[dict[str, Method], dict[str, dict]]:
    """({name: method}, {name: what it is, for run.json}) for --method / --lora."""
    settings = pipeline.preset(args.mode, args.sampler)
    given = {"steps": args.steps, "min_size": args.min_size}
    settings = replace(settings, **{k: v for k, v in given.items() if v is not None})
    methods, configs = {}, {}
    repairing = isinstance(SETTINGS[args.setting], Damage)
    mask = {"mask": "known" if args.known_mask else "auto"} if repairing else {}
    for name in args.method:
        if name == BASELINE:
            methods[name], configs[name] = bicubic, {"method": BASELINE}
            continue
        if name == REPAIR_BASELINE:
            methods[name], configs[name] = damaged, {"method": REPAIR_BASELINE}
            continue
        if name == "fill":
            methods[name], configs[name] = Fill(args.known_mask), {"method": "fill", **mask}
            continue
        if name in stage1.REGISTRY:
            methods[name], configs[name] = Stage1Method(name, args.device), {"method": "stage1", "model": name}
            continue
        first = name.removesuffix("+supir") if name.endswith("+supir") else None
        variants = [(name, [])] if name in ("supir", f"{first}+supir") else \
            [(lora_method_name(p, s), [(p, s)]) for p, s in args.lora]
        for method_name, loras in variants:
            methods[method_name] = SUPIRMethod(partial(two_stage_restorer, args, tuple(loras), first),
                                               settings, args.seed, args.known_mask)
            configs[method_name] = {"method": "supir", "model": args.model, "sdxl": args.sdxl, "supir": args.supir,
                                    "mode": args.mode, "loras": [[str(p), s] for p, s in loras], "stage1": first,
                                    "settings": settings.to_dict(), "seed": args.seed, **mask}
    return methods, configs


def two_stage_restorer(args: argparse.Namespace, loras: tuple, first: str | None) -> pipeline.Restorer:
    """SUPIR with `loras`, with the stage-1 network `first` in front of it where one is named."""
    restorer = pipeline.Restorer.load(args.model, args.mode, args.sdxl, args.supir, loras, device=args.device,
                                      dtype=args.dtype, vae_dtype=args.vae_dtype, offload=args.offload)[0]
    if first:
        restorer.pixel_restorer = Stage1Method(first, args.device).load()
    return restorer


def lora_method_name(path: str, scale: float) -> str:
    stem = Path(path).stem
    return f"supir+lora:{stem}" if scale == 1.0 else f"supir+lora:{stem}@{scale:g}"


def folder_name(method: str) -> str:
    return re.sub(r"[^\w+.@-]", "_", method)


# ----------------------------------------------------------------------------------------------------------
# Measuring one call


class PeakMemory:
    """Peak memory of one call. On a GPU: the CUDA allocator's max_memory_allocated (weights included). On
    the CPU: the process's peak resident set (VmHWM), reset before each call through /proc/self/clear_refs;
    where that is not possible (not Linux), the peak since the process started ("rss-lifetime")."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else "rss"

    def reset(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "rss-lifetime"

    def peak_mib(self) -> float:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        if self.kind == "rss":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


@contextmanager
def opened(method: Method):
    if hasattr(method, "open"):
        method.open()
    try:
        yield method
    finally:
        if hasattr(method, "close"):
            method.close()


def masked_scores(out: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, crop: int) -> dict[str, float | None]:
    """PSNR over the masked pixels (all channels) and SSIM inside the mask: the mean of the SSIM map (the
    metrics.ssim convention: 11x11 Gaussian window, valid region) over the positions whose centre pixel is
    masked. None where the mask is empty."""
    if crop:
        out, gt, mask = (t[..., crop:-crop, crop:-crop] for t in (out, gt, mask))
    m = mask[0, 0]
    if not bool(m.any()):
        return {"psnr_mask": None, "ssim_mask": None}
    a, b = out.double(), gt.double()
    mse = (a - b)[0][:, m].square().mean()
    smap = ssim_map(a, b)
    r = (m.shape[0] - smap.shape[2]) // 2
    inner = m[r:m.shape[0] - r, r:m.shape[1] - r]
    ssim_mask = smap.mean(1)[0][inner].mean().item() if bool(inner.any()) else None
    return {"psnr_mask": (10.0 * torch.log10(1.0 / mse)).item(), "ssim_mask": ssim_mask}


def scores(out: torch.Tensor, gt: torch.Tensor, crop: int, lpips: LPIPS | None,
           mask: torch.Tensor | None = None) -> dict[str, float | None]:
    row = {"psnr": psnr(out, gt, crop).item(), "ssim": ssim(out, gt, crop).item(),
           "psnr_y": psnr(out, gt, crop, y_channel=True).item(), "ssim_y": ssim(out, gt, crop, y_channel=True).item(),
           "lpips": None, "niqe": None, "psnr_mask": None, "ssim_mask": None}
    try:  # NIQE fits a Gaussian to the image's 96x96 blocks: small crops have too few, and get no score
        row["niqe"] = niqe(to_uint8(out)[0], crop_border=crop)
    except ValueError:
        pass
    if mask is not None:
        row.update(masked_scores(out, gt, mask, crop))
    if lpips is not None:
        if crop:
            out, gt = out[..., crop:-crop, crop:-crop], gt[..., crop:-crop, crop:-crop]
        device = next(lpips.parameters()).device
        with torch.no_grad():
            row["lpips"] = lpips(out.to(device), gt.to(device), normalize=True).item()
    return row


# ----------------------------------------------------------------------------------------------------------
# Inputs, results file, run record


def ground_truth_and_lq(path: Path, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(GT centre-cropped to --gt-crop and to a multiple of the scale, its LQ, the damage mask (1, 1, H, W)
    bool of a damage setting or None)."""
    gt = load_image(path)
    if args.gt_crop:
        h, w = gt.shape[-2:]
        ch, cw = min(h, args.gt_crop), min(w, args.gt_crop)
        gt = gt[..., (h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    gt = modcrop(gt, SETTINGS[args.setting].scale)
    seed = image_seed(args.seed, path.name)
    if isinstance(SETTINGS[args.setting], Damage):
        return gt, *damage(gt, args.setting, seed=seed)
    return gt, degrade(gt, args.setting, seed=seed), None


def read_results(path: Path) -> list[dict[str, str]]:
    """The complete rows of results.csv. A file cut short by a crash is rewritten without its partial row."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames not in (COLUMNS, *OLDER_COLUMNS):
        raise ValueError(f"{path} has columns {reader.fieldnames}, expected {COLUMNS}: use another --out")
    rows = [{c: r.get(c, "") for c in COLUMNS} for r in reader if None not in r.values() and None not in r]
    if reader.fieldnames != COLUMNS or not text.endswith("\n") or len(rows) != len(text.splitlines()) - 1:
        write_atomic(path, csv_text(rows, header=True))
    return rows


def csv_text(rows: list[dict], header: bool = False) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_row(row: dict) -> dict[str, str]:
    digits = {"peak_mem_mib": 1}
    return {k: "" if v is None else f"{v:.{digits.get(k, 6)}f}" if isinstance(v, float) else str(v)
            for k, v in row.items()}


def write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_run(path: Path, run: dict) -> dict:
    """run.json updated with this run's methods; ValueError where the rows there were made differently."""
    if not path.exists():
        return run
    old = json.loads(path.read_text(encoding="utf-8"))
    old.setdefault("methods", {})
    for key in ("setting", "seed", "crop_border", "gt_crop"):
        if old.get(key) != run[key]:
            raise ValueError(f"{path.parent} holds results for {key}={old.get(key)!r}, not {run[key]!r}: "
                             f"use another --out")
    for name, config in run["methods"].items():
        if name in old["methods"] and old["methods"][name] != config:
            changed = sorted(k for k in config if old["methods"][name].get(k) != config[k])
            raise ValueError(f"{path.parent} holds {name} rows made with other {', '.join(changed)}: "
                             f"use another --out")
    return {**run, "methods": {**old["methods"], **run["methods"]}}


# ----------------------------------------------------------------------------------------------------------
# Summary


def as_float(s: str) -> float | None:
    return float(s) if s != "" else None


def summarise(rows: list[dict[str, str]], methods: list[str]) -> dict[str, dict]:
    """Per method: (mean, std) of every metric, seconds and PSNR gain over the baseline (the first method);
    max peak memory."""
    baseline = methods[0]
    base = {r["image"]: float(r["psnr"]) for r in rows if r["method"] == baseline}
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        stats = {"n": len(mine), "mem_kind": mine[0]["mem_kind"],
                 "peak_mem_mib": max(float(r["peak_mem_mib"]) for r in mine)}
        columns = {k: [as_float(r[k]) for r in mine] for k in [*METRICS, "seconds"]}
        columns["gain"] = [float(r["psnr"]) - base[r["image"]] for r in mine if r["image"] in base and m != baseline]
        for k, values in columns.items():
            values = [v for v in values if v is not None]
            stats[k] = (float(np.mean(values)), float(np.std(values))) if values else None
        out[m] = stats
    return out


MEMORY_KINDS = {"cuda": "GPU max_memory_allocated", "rss": "process peak RSS",
                "rss-lifetime": "process peak RSS since start"}


def markdown(summary: dict[str, dict], args: argparse.Namespace, n_images: int) -> str:
    kinds = ", ".join(f"{k}: {MEMORY_KINDS[k]}" for k in sorted({s["mem_kind"] for s in summary.values()}))
    masked = any(s["psnr_mask"] for s in summary.values())
    head = (f"`{args.setting}`, {n_images} images, {args.crop_border} px border cropped. Mean ± std (population) "
            f"over the images. PSNR / SSIM on RGB, -Y on BT.601 luma; gain: PSNR minus {args.method[0]}'s on the "
            f"same image. "
            + ("-mask: inside the synthetic damage's mask (PSNR over its pixels, SSIM map averaged over them; "
               f"repairs used the {'known' if args.known_mask else 'automatic'} mask). " if masked else "")
            + f"Peak memory: the largest over the images ({kinds}).")
    cols = [("PSNR (dB)", "psnr", 2), ("SSIM", "ssim", 4), ("PSNR-Y (dB)", "psnr_y", 2), ("SSIM-Y", "ssim_y", 4),
            ("LPIPS", "lpips", 4), ("NIQE", "niqe", 3)] \
        + ([("PSNR-mask (dB)", "psnr_mask", 2), ("SSIM-mask", "ssim_mask", 4)] if masked else []) \
        + [("gain (dB)", "gain", 2), ("s / image", "seconds", 3)]
    lines = [head, "", "| method | " + " | ".join(c for c, _, _ in cols) + " | peak MiB |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for m, s in summary.items():
        cells = ["–" if s[k] is None else f"{s[k][0]:.{d}f} ± {s[k][1]:.{d}f}" for _, k, d in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {s['peak_mem_mib']:.0f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Charts, drawn with pillow

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
BASELINE_COLOUR = "#8c8c8c"
INK, GRID = "#222222", "#dddddd"


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def colours(methods: list[str]) -> dict[str, str]:
    others = iter(PALETTE * len(methods))
    return {m: BASELINE_COLOUR if m in (BASELINE, REPAIR_BASELINE) else next(others) for m in methods}


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    raw = (hi - lo) / n if hi > lo else abs(hi) / n or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [i * step for i in range(first, max(last, first + 1) + 1)]


def tick_labels(ticks: list[float]) -> list[str]:
    """The ticks with the fewest decimals that still write each of them exactly."""
    step = ticks[1] - ticks[0]
    decimals = next(d for d in range(8) if all(abs(float(f"{t:.{d}f}") - t) < 1e-6 * step for t in ticks))
    return [f"{t:.{decimals}f}" for t in ticks]


def vertical_text(image: Image.Image, xy: tuple[int, int], text: str, size: int) -> None:
    """Text rotated 90 degrees counter-clockwise, centred on xy (a y-axis title)."""
    f = font(size)
    box = f.getbbox(text)
    label = Image.new("L", (box[2] + 4, box[3] + 4), 0)
    ImageDraw.Draw(label).text((2, 2), text, font=f, fill=255)
    label = label.rotate(90, expand=True)
    ink = Image.new("RGB", label.size, INK)
    image.paste(ink, (xy[0] - label.width // 2, xy[1] - label.height // 2), label)


def fit(text: str, width: int, f: ImageFont.FreeTypeFont) -> str:
    while f.getlength(text) > width and len(text) > 2:
        text = text[:-2] + "…"
    return text


class Axes:
    """A plot area inside `box` (left, top, right, bottom) with a y axis over `ticks`."""

    def __init__(self, image: Image.Image, box: tuple[int, int, int, int], ticks: list[float], title: str,
                 ylabel: str):
        self.image, self.draw, self.box, self.ticks = image, ImageDraw.Draw(image), box, ticks
        left, top, right, bottom = box
        if title:
            self.draw.text(((left + right) // 2, top - 14), title, font=font(16), fill=INK, anchor="ms")
        for t, label in zip(ticks, tick_labels(ticks)):
            y = self.y(t)
            self.draw.line([(left, y), (right, y)], fill=GRID)
            self.draw.text((left - 6, y), label, font=font(12), fill=INK, anchor="rm")
        self.draw.line([(left, top), (left, bottom)], fill=INK)
        vertical_text(image, (left - 48, (top + bottom) // 2), ylabel, 13)

    def y(self, value: float) -> float:
        lo, hi = self.ticks[0], self.ticks[-1]
        return self.box[3] - (value - lo) / (hi - lo) * (self.box[3] - self.box[1])

    def baseline(self, value: float = 0.0) -> None:
        self.draw.line([(self.box[0], self.y(value)), (self.box[2], self.y(value))], fill=INK, width=1)

    def x_labels(self, labels: list[str], centres: list[float]) -> None:
        for label, x in zip(labels, centres):
            self.draw.text((x, self.box[3] + 8), label, font=font(12), fill=INK, anchor="mt")


def legend_layout(methods: list[str], width: int) -> list[tuple[str, float, int]]:
    """(method, x offset, row) of colour swatches with the full method names, wrapped to `width`."""
    entries, x, row = [], 0.0, 0
    for m in methods:
        w = 18 + font(13).getlength(m) + 24
        if x + w > width and x > 0:
            x, row = 0.0, row + 1
        entries.append((m, x, row))
        x += w
    return entries


def bar_chart(summary: dict[str, dict], path: Path, title: str, y_channel: bool) -> None:
    """One panel per quantity: a bar per method at its mean, with a ± std whisker and the value on top."""
    y = "_y" if y_channel else ""
    panels = [(f"psnr{y}", f"PSNR{'-Y' if y else ''} (higher is better)", "dB", 2),
              (f"ssim{y}", f"SSIM{'-Y' if y else ''} (higher is better)", "SSIM", 3),
              ("lpips", "LPIPS (lower is better)", "LPIPS", 3),
              ("niqe", "NIQE (lower is better)", "NIQE", 2),
              ("psnr_mask", "PSNR in the damage mask", "dB", 2),
              ("seconds", "time per image", "seconds", 2)]
    panels = [p for p in panels if any(s[p[0]] for s in summary.values())]
    methods = list(summary)
    colour = colours(methods)
    pw, ph = max(260, 60 * len(methods) + 110), 340
    width = pw * len(panels) + 20
    entries = legend_layout(methods, width - 40)
    image = Image.new("RGB", (width, ph + 50 + 22 * (entries[-1][2] + 1)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width // 2, 10), title, font=font(18), fill=INK, anchor="mt")
    for i, (key, name, unit, digits) in enumerate(panels):
        values = {m: summary[m][key] for m in methods if summary[m][key] is not None}
        top = max(mean + std for mean, std in values.values())
        ticks = nice_ticks(0.0, top * 1.12 or 1.0)
        left = 20 + i * pw + 78
        axes = Axes(image, (left, 80, left + pw - 100, ph + 20), ticks, name, unit)
        slot = (pw - 100) / len(methods)
        for j, m in enumerate(methods):
            if m not in values:
                continue
            mean, std = values[m]
            x0, x1 = left + slot * (j + 0.2), left + slot * (j + 0.8)
            draw.rectangle([x0, axes.y(mean), x1, axes.y(0)], fill=colour[m])
            xc = (x0 + x1) / 2
            draw.line([(xc, axes.y(mean - std)), (xc, axes.y(mean + std))], fill=INK, width=2)
            for v in (mean - std, mean + std):
                draw.line([(xc - 6, axes.y(v)), (xc + 6, axes.y(v))], fill=INK, width=2)
            draw.text((xc, axes.y(mean + std) - 4), f"{mean:.{digits}f}", font=font(12), fill=INK, anchor="mb")
        axes.baseline()
    for m, dx, row in entries:
        x, y = 20 + dx, ph + 40 + 22 * row
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=colour[m])
        draw.text((x + 18, y + 8), m, font=font(13), fill=INK, anchor="lm")
    image.save(path)


def gain_plot(rows: list[dict[str, str]], methods: list[str], path: Path, title: str, y_channel: bool) -> None:
    """Per method, one dot per image at its PSNR minus the baseline's (the first method) on the same image; a
    bar at the mean."""
    key = "psnr_y" if y_channel else "psnr"
    base = {r["image"]: float(r[key]) for r in rows if r["method"] == methods[0]}
    gains = {m: [float(r[key]) - base[r["image"]] for r in rows if r["method"] == m and r["image"] in base]
             for m in methods}
    gains = {m: g for m, g in gains.items() if g}
    if len(gains) > 1:
        del gains[methods[0]]  # zero by definition
    everything = [v for g in gains.values() for v in g] + [0.0]
    span = max(everything) - min(everything) or 1.0
    ticks = nice_ticks(min(everything) - 0.08 * span, max(everything) + 0.08 * span)
    colour = colours(list(gains))
    slot = max(150, 420 // len(gains), *(int(font(12).getlength(m)) + 24 for m in gains))
    image = Image.new("RGB", (110 + slot * len(gains) + 30, 460), "white")
    draw = ImageDraw.Draw(image)
    draw.text((image.width // 2, 10), title, font=font(18), fill=INK, anchor="mt")
    draw.text((image.width // 2, 36), "one dot per image; bar: mean", font=font(13), fill=INK, anchor="mt")
    axes = Axes(image, (110, 70, image.width - 30, 420), ticks, "", f"PSNR{'-Y' if y_channel else ''} gain (dB)")
    axes.baseline(0.0)
    for j, (m, g) in enumerate(gains.items()):
        centre = 110 + slot * (j + 0.5)
        for i, v in enumerate(g):
            # spread the dots sideways (deterministically) so that equal gains stay visible
            dx = ((i * 0.618034) % 1 - 0.5) * slot * 0.5
            draw.ellipse([centre + dx - 4, axes.y(v) - 4, centre + dx + 4, axes.y(v) + 4], fill=colour[m],
                         outline=INK)
        mean = float(np.mean(g))
        draw.line([(centre - slot * 0.35, axes.y(mean)), (centre + slot * 0.35, axes.y(mean))], fill=INK, width=3)
        draw.text((centre + slot * 0.37, axes.y(mean)), f"{mean:+.2f}", font=font(12), fill=INK, anchor="lm")
    axes.x_labels(list(gains), [110 + slot * (j + 0.5) for j in range(len(gains))])
    image.save(path)


def grid(images: list[Path], methods: list[str], args: argparse.Namespace, path: Path) -> None:
    """Rows: the first --grid images. Columns: GT | LQ (nearest-neighbour, to show its pixels) | methods; for
    damage settings GT | damage mask | methods (the damaged input is the first method). Each cell is the same
    centre crop of --grid-crop GT pixels, at 1:1."""
    cell, label_w, head_h = args.grid_crop, 34, 34
    columns = ["GT", "LQ" if args.method[0] == BASELINE else "mask", *methods]
    canvas = Image.new("RGB", (label_w + cell * len(columns), head_h + cell * len(images)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((label_w + cell * c + cell // 2, head_h // 2), fit(name, cell - 8, font(14)), font=font(14),
                  fill=INK, anchor="mm")
    for r, image_path in enumerate(images):
        gt, lq, known = ground_truth_and_lq(image_path, args)
        h, w = gt.shape[-2:]
        second = Image.fromarray(to_uint8(lq)[0]) if known is None else repair.mask_image(known[0, 0])
        crops = [Image.fromarray(to_uint8(gt)[0]), second.convert("RGB").resize((w, h), Image.NEAREST)]
        for m in methods:
            restored = args.out / "images" / folder_name(m) / f"{image_path.stem}.png"
            crops.append(Image.open(restored).convert("RGB") if restored.exists() else None)
        s = min(cell, h, w)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        y = head_h + r * cell
        for c, im in enumerate(crops):
            x = label_w + c * cell
            if im is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=GRID)
                draw.text((x + cell // 2, y + cell // 2), "missing", font=font(14), fill=INK, anchor="mm")
                continue
            canvas.paste(im.crop(box).resize((cell, cell), Image.NEAREST), (x, y))
        vertical_text(canvas, (label_w // 2, y + cell // 2), fit(image_path.stem, cell - 8, font(14)), 14)
    canvas.save(path)


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Degrade ground-truth images, restore them with each method, and "
                                            "measure PSNR / SSIM / LPIPS, time and memory.")
    p.add_argument("--gt", type=Path, required=True, help="folder of ground-truth images")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; an existing one is resumed)")
    p.add_argument("--setting", default="sr4-blur2", choices=sorted(SETTINGS), help="degradation (default: sr4-blur2)")
    p.add_argument("--method", nargs="+", metavar="METHOD",
                   choices=[BASELINE, "supir", "supir+lora", REPAIR_BASELINE, "fill", *stage1.REGISTRY,
                            *(f"{n}+supir" for n in stage1.REGISTRY)],
                   help="methods (default: bicubic supir; damage settings: damaged fill supir); supir+lora: one "
                        "method per --lora; damaged, fill: damage settings only; a stage-1 network "
                        f"({', '.join(stage1.REGISTRY)}) alone, or NAME+supir: it, then SUPIR")
    p.add_argument("--known-mask", action="store_true",
                   help="damage settings: repair with the synthetic damage's own mask instead of the automatic one")
    p.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="FILE[:SCALE]",
                   help="LoRA for supir+lora, merged at SCALE (default 1); repeatable")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    p.add_argument("--gt-crop", type=int, help="centre-crop each GT to at most N x N px first")
    p.add_argument("--seed", type=int, default=0, help="degradation seeds derive from it and the file name; "
                                                       "SUPIR samples with it")
    p.add_argument("--crop-border", type=int, help="pixels dropped on each side before scoring "
                                                   "(default: the setting's scale; 0 for scale 1)")
    p.add_argument("--y-channel", action="store_true", help="charts show PSNR-Y / SSIM-Y (the CSV and summary "
                                                            "always have both)")
    p.add_argument("--lpips-download", action="store_true", help="fetch the LPIPS weights if they are missing")
    p.add_argument("--grid", type=int, default=4, help="images in grid.png (default: 4)")
    p.add_argument("--grid-crop", type=int, default=256, help="crop size in grid.png, GT px (default: 256)")
    m = p.add_argument_group("SUPIR (passed to the pipeline, see sample.py)")
    m.add_argument("--model", choices=sorted(supir.PRESETS), default="sdxl",
                   help="sdxl (default); tiny / medium without weight files: random weights (smoke test)")
    m.add_argument("--sdxl", help="SDXL single file (default: sdxl)")
    m.add_argument("--supir", help="SUPIR file (default: Q, F with --fidelity)")
    m.add_argument("--fidelity", dest="mode", action="store_const", const="fidelity", default="quality",
                   help="v0F with the Fidelity preset (default: v0Q, Quality)")
    m.add_argument("--sampler", choices=pipeline.SAMPLERS, default="edm")
    m.add_argument("--steps", type=int, help="sampling steps (default: the preset's)")
    m.add_argument("--min-size", type=int, help="short side SUPIR works at, at least (default: 1024)")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    m.add_argument("--vae-dtype", choices=["auto", *DTYPES], default="auto")
    m.add_argument("--offload", action="store_true", help="each part on the GPU only while it runs")
    args = p.parse_args(argv)
    repairing = isinstance(SETTINGS[args.setting], Damage)
    # the baseline comes first: the reference of every gain
    baseline, default = (REPAIR_BASELINE, ["fill", "supir"]) if repairing else (BASELINE, ["supir"])
    args.method = list(dict.fromkeys([baseline, *(args.method or default)]))
    wrong = [m for m in args.method if (m in REPAIR_METHODS) != repairing and m not in ("supir", "supir+lora")]
    if wrong:
        p.error(f"--method {wrong[0]} is for {'restoration' if repairing else 'damage'} settings, "
                f"not {args.setting}")
    if args.known_mask and not repairing:
        p.error(f"--known-mask is for damage settings, not {args.setting}")
    if args.crop_border is None:
        scale = SETTINGS[args.setting].scale
        args.crop_border = scale if scale > 1 else 0
    return args


def fail(message: str) -> int:
    tqdm.write(f"error: {message}", file=sys.stderr)
    return 1


def check_inputs(args: argparse.Namespace) -> tuple[list[Path] | None, str | None]:
    if not args.gt.is_dir():
        return None, f"ground-truth folder {args.gt} does not exist"
    files = sorted(f for f in args.gt.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        return None, f"no images ({', '.join(IMAGE_SUFFIXES)}) in {args.gt}"
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        return None, f"two images share a name: {sorted({s for s in stems if stems.count(s) > 1})}"
    if ("supir+lora" in args.method) != bool(args.lora):
        return None, "supir+lora needs --lora FILE, and --lora needs --method supir+lora"
    names = [lora_method_name(p, s) for p, s in args.lora]
    if len(set(names)) != len(names):
        return None, f"two --lora give the same method name: {names}"
    for name in ("limit", "gt_crop", "grid", "grid_crop", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return None, f"--{name.replace('_', '-')} must be at least 1"
    if args.crop_border < 0:
        return None, "--crop-border must be >= 0"
    return files[:args.limit], None


def load_lpips(args: argparse.Namespace) -> LPIPS | None:
    try:
        return LPIPS.from_pretrained(download=args.lpips_download).to(pick_device(args.device))
    except (FileNotFoundError, RuntimeError) as e:
        tqdm.write(f"note: LPIPS is left empty: {one_line(e)}"
                   + ("" if args.lpips_download else " (--lpips-download fetches it)"), file=sys.stderr)
        return None


def run_method(name: str, method: Method, files: list[Path], args: argparse.Namespace, lpips: LPIPS | None,
               progress: tqdm) -> tuple[list[dict[str, str]], int]:
    """(rows, failures) of one method on `files`. Each row is appended to results.csv as soon as it is
    done (after its PNG), so an interrupted run loses at most the image in progress."""
    folder = args.out / "images" / folder_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    rows, failures = [], 0
    with opened(method):
        meter = PeakMemory(getattr(method, "device", torch.device("cpu")))
        for path in files:
            progress.set_postfix_str(f"{name} {path.name}")
            try:
                gt, lq, known = ground_truth_and_lq(path, args)
                save_image(lq, args.out / "images" / "lq" / f"{path.stem}.png")
                meter.reset()
                start = time.perf_counter()
                out = method(lq, tuple(gt.shape[-2:])) if known is None else method(lq, tuple(gt.shape[-2:]), known)
                peak = meter.peak_mib()  # synchronises the GPU, so the time below covers all its work
                seconds = time.perf_counter() - start
                out = quantize(out.detach().float().cpu().clamp(0, 1))  # the pixels the PNG holds
                save_image(out, folder / f"{path.stem}.png")
                row = format_row({"image": path.name, "method": name, "setting": args.setting,
                                  "height": gt.shape[-2], "width": gt.shape[-1],
                                  **scores(out, gt, args.crop_border, lpips, known),
                                  "seconds": seconds, "peak_mem_mib": peak, "mem_kind": meter.kind})
            except torch.cuda.OutOfMemoryError:
                fail(f"{path} ({name}): out of GPU memory (try --offload, or --gt-crop)")
                failures += 1
                continue
            except (OSError, ValueError, pipeline.RestoreError) as e:
                fail(f"{path} ({name}): {one_line(e)}")
                failures += 1
                continue
            finally:
                progress.update(1)
            with (args.out / "results.csv").open("a", encoding="utf-8") as f:
                f.write(csv_text([row]))
            rows.append(row)
    return rows, failures


def write_reports(rows: list[dict[str, str]], files: list[Path], methods: list[str], args: argparse.Namespace) -> None:
    """summary.md, bars.png, gain.png, grid.png over this run's images and methods (resumed rows included)."""
    names = {f.name for f in files}
    current = [r for r in rows if r["image"] in names and r["method"] in methods]
    summary = summarise(current, methods)
    if not summary:
        return
    title = f"{args.setting}, {len({r['image'] for r in current})} images"
    table = markdown(summary, args, len({r["image"] for r in current}))
    write_atomic(args.out / "summary.md", table)
    bar_chart(summary, args.out / "bars.png", f"{title}: mean ± std", args.y_channel)
    gain_plot(current, methods, args.out / "gain.png", f"{title}: PSNR gain over {methods[0]}", args.y_channel)
    grid(files[:args.grid], methods, args, args.out / "grid.png")
    print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    files, problem = check_inputs(args)
    if problem:
        return fail(problem)
    results = args.out / "results.csv"
    try:
        methods, configs = build_methods(args)
        args.out.mkdir(parents=True, exist_ok=True)
        run = check_run(args.out / "run.json", {"setting": args.setting, "seed": args.seed,
                                                "crop_border": args.crop_border, "gt_crop": args.gt_crop,
                                                "methods": configs})
        rows = read_results(results)
        write_atomic(args.out / "run.json", json.dumps(run, indent=2) + "\n")
        if not results.exists():
            write_atomic(results, csv_text([], header=True))
        (args.out / "images" / "lq").mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        return fail(one_line(e))

    done = {(r["image"], r["method"]) for r in rows}
    todo = {m: [f for f in files if (f.name, m) not in done] for m in methods}
    remaining = sum(map(len, todo.values()))
    lpips = load_lpips(args) if remaining else None
    failures = 0
    with tqdm(total=len(files) * len(methods), initial=len(files) * len(methods) - remaining, desc="evaluate",
              unit="run", disable=None) as progress:
        for name, method in methods.items():
            if not todo[name]:
                continue
            try:
                new, failed = run_method(name, method, todo[name], args, lpips, progress)
            except WeightsError as e:  # from open(), before any image of this method
                fail(f"{name}: {': '.join(map(str, e.args))}")
                progress.update(len(todo[name]))
                new, failed = [], len(todo[name])
            rows += new
            failures += failed
    write_reports(rows, files, list(methods), args)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
