"""Measuring restoration: what one evaluation run is (a `Task`), the scores of one result, the peak memory of
one call, and the run's files (results.csv, one row per (image, method), appended as they are made; run.json,
what the rows were made with, including a hash of every ground-truth file).

evaluate.py is the command line over this; the methods are in eval_methods.py, the summary, charts and grid
in eval_report.py.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import degrade, images
from .devices import PeakMemory
from .cli import fail, one_line
from .metrics import LPIPS, psnr, ssim, ssim_map
from .niqe import niqe
from .pipeline import RestoreError

OLD_COLUMNS = ["image", "method", "setting", "height", "width", "psnr", "ssim", "psnr_y", "ssim_y", "lpips",
               "seconds", "peak_mem_mib", "mem_kind"]
# Older results.csv layouts (before the mask metrics, before NIQE) are upgraded in place (empty cells).
OLDER_COLUMNS = (OLD_COLUMNS, OLD_COLUMNS + ["psnr_mask", "ssim_mask"])
COLUMNS = OLD_COLUMNS + ["psnr_mask", "ssim_mask", "niqe"]
METRICS = ["psnr", "ssim", "psnr_y", "ssim_y", "lpips", "niqe", "psnr_mask", "ssim_mask"]
BASELINE = "bicubic"           # restoration settings: where every restorer starts
REPAIR_BASELINE = "damaged"    # damage settings: the damaged input, unrepaired
REPAIR_METHODS = [REPAIR_BASELINE, "fill", "supir", "supir+lora"]
RUN_KEYS = ("setting", "seed", "crop_border", "gt_crop")  # rows made with other values are never mixed

# A method maps (LQ (1, 3, h, w) in [0, 1], as `degrade` returns it; GT size (H, W)) to the restored image
# (1, 3, H, W) in [0, 1]. For damage settings it gets a third argument, the synthetic damage's known mask
# (1, 1, H, W) bool. Methods that hold a model may also have open() / close() (load before the first timed
# call, free after the last) and a `device` (where its peak memory is measured).
Method = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Task:
    """How ground truth becomes a test input and how a result is scored: the degradation `setting`, the
    `seed` every image's degradation seed derives from (with its file name), a centre crop of the GT to at
    most `gt_crop` px, and the `crop_border` px dropped on each side before scoring."""
    setting: str
    seed: int = 0
    gt_crop: int | None = None
    crop_border: int = 0

    @property
    def repairing(self) -> bool:
        return isinstance(degrade.SETTINGS[self.setting], degrade.Damage)

    def record(self) -> dict:
        return {k: getattr(self, k) for k in RUN_KEYS}

    def load(self, path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(GT centre-cropped to gt_crop and to a multiple of the scale, its LQ, the damage mask (1, 1, H, W)
        bool of a damage setting or None). Raises images.ImageError for a file we do not decode."""
        gt = images.load_tensor(path)
        if self.gt_crop:
            h, w = gt.shape[-2:]
            ch, cw = min(h, self.gt_crop), min(w, self.gt_crop)
            gt = gt[..., (h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
        gt = degrade.modcrop(gt, degrade.SETTINGS[self.setting].scale)
        seed = degrade.image_seed(self.seed, path.name)
        if self.repairing:
            return gt, *degrade.damage(gt, self.setting, seed=seed)
        return gt, degrade.degrade(gt, self.setting, seed=seed), None


def folder_name(method: str) -> str:
    """The method's folder under images/ (a LoRA file stem may hold any character)."""
    return re.sub(r"[^\w+.@-]", "_", method)


# ----------------------------------------------------------------------------------------------------------
# Scores and meters


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
    """Every metric of one result against its GT (PSNR is inf where they are equal)."""
    row = {"psnr": psnr(out, gt, crop).item(), "ssim": ssim(out, gt, crop).item(),
           "psnr_y": psnr(out, gt, crop, y_channel=True).item(), "ssim_y": ssim(out, gt, crop, y_channel=True).item(),
           "lpips": None, "niqe": None, "psnr_mask": None, "ssim_mask": None}
    try:  # NIQE fits a Gaussian to the image's 96x96 blocks: small crops have too few, and get no score
        row["niqe"] = niqe(np.asarray(images.from_tensor(out)), crop_border=crop)
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


@contextmanager
def opened(method: Method):
    if hasattr(method, "open"):
        method.open()
    try:
        yield method
    finally:
        if hasattr(method, "close"):
            method.close()


def run_method(name: str, method: Method, files: list[Path], task: Task, out: Path, lpips: LPIPS | None,
               progress: tqdm) -> tuple[list[dict[str, str]], int]:
    """(rows, failures) of one method on `files`; a failing image is reported in one line and skipped. Each
    row is appended to out/results.csv as soon as it is done (after its PNGs), so an interrupted run loses at
    most the image in progress."""
    rows, failures = [], 0
    with opened(method):
        meter = PeakMemory(getattr(method, "device", torch.device("cpu")))
        for path in files:
            progress.set_postfix_str(f"{name} {path.name}")
            try:
                gt, lq, known = task.load(path)
                meter.reset()
                start = time.perf_counter()
                restored = method(lq, tuple(gt.shape[-2:]), *([] if known is None else [known]))
                peak = meter.peak_mib()  # synchronises the GPU, so the time below covers all its work
                seconds = time.perf_counter() - start
                restored = degrade.quantize(restored.detach().float().cpu().clamp(0, 1))  # the pixels the PNG holds
                row = format_row({"image": path.name, "method": name, "setting": task.setting,
                                  "height": gt.shape[-2], "width": gt.shape[-1],
                                  **scores(restored, gt, task.crop_border, lpips, known),
                                  "seconds": seconds, "peak_mem_mib": peak, "mem_kind": meter.kind})
                info = {"source": str(path), "setting": task.setting, "seed": degrade.image_seed(task.seed, path.name)}
                save(lq, out / "images" / "lq" / f"{path.stem}.png", info)
                save(restored, out / "images" / folder_name(name) / f"{path.stem}.png", {**info, "method": name})
            except torch.cuda.OutOfMemoryError:
                fail(f"{path} ({name})", "out of GPU memory (try --offload, or --gt-crop)")
                failures += 1
                continue
            except (OSError, ValueError, RestoreError) as e:  # images.ImageError is a ValueError
                fail(f"{path} ({name})", one_line(e))
                failures += 1
                continue
            finally:
                progress.update(1)
            with (out / "results.csv").open("a", encoding="utf-8") as f:
                f.write(csv_text([row]))
            rows.append(row)
    return rows, failures


def save(x: torch.Tensor, path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # made with its first image: no empty folders
    images.save_png(images.from_tensor(x), path, info)


# ----------------------------------------------------------------------------------------------------------
# results.csv and run.json


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
        write_text(path, csv_text(rows, header=True))
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


def write_text(path: Path, text: str) -> None:
    images.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fingerprint(path: Path) -> str | None:
    """A hash of the file's bytes (None where it cannot be read: the image loop reports that)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def check_run(path: Path, run: dict) -> tuple[dict, list[str]]:
    """(run.json updated with this run's methods and GT hashes, the images whose GT file changed since their
    rows were made). ValueError where the rows there were made with other settings."""
    if not path.exists():
        return run, []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a run record of evaluate.py: use another --out") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} is not a run record of evaluate.py: use another --out")
    methods, gt = old.get("methods", {}), old.get("gt", {})
    for key in RUN_KEYS:
        if old.get(key) != run[key]:
            raise ValueError(f"{path.parent} holds results for {key}={old.get(key)!r}, not {run[key]!r}: "
                             f"use another --out")
    for name, config in run["methods"].items():
        if name in methods and methods[name] != config:
            changed = sorted(k for k in config if methods[name].get(k) != config[k])
            raise ValueError(f"{path.parent} holds {name} rows made with other {', '.join(changed)}: "
                             f"use another --out")
    # a run.json from before the hashes has none: its rows are kept, and the files' hashes recorded now
    stale = sorted(n for n, h in run["gt"].items() if n in gt and gt[n] != h)
    return {**run, "methods": {**methods, **run["methods"]}, "gt": {**gt, **run["gt"]}}, stale


def start_run(out: Path, task: Task, configs: dict[str, dict], files: list[Path]) -> list[dict[str, str]]:
    """The rows already in out/ that this run may reuse; writes run.json and the header of results.csv.
    Rows of an image whose GT file changed since they were made are dropped (and so recomputed)."""
    hashes = {f.name: h for f in files if (h := fingerprint(f)) is not None}
    run, stale = check_run(out / "run.json", {**task.record(), "methods": configs, "gt": hashes})
    results = out / "results.csv"
    rows = read_results(results)
    if stale:
        files_have = "the file has" if len(stale) == 1 else "the files have"
        tqdm.write(f"note: recomputing the rows of {', '.join(stale)}: {files_have} changed since they were made",
                   file=sys.stderr)
        rows = [r for r in rows if r["image"] not in stale]
        write_text(results, csv_text(rows, header=True))  # before run.json records the new hashes
    write_text(out / "run.json", json.dumps(run, indent=2) + "\n")
    if not results.exists():
        write_text(results, csv_text([], header=True))
    return rows
