"""What evaluate.py makes of results.csv: the per-method summary (summary.md), its charts (bars.png, gain.png)
and the picture grid (grid.png). Everything here is redrawn from the rows, so a resumed run reports on all of
them; an image without rows (its file failed to load) is left out.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import charts, images, repair
from .evaluation import BASELINE, METRICS, REPAIR_BASELINE, Task, folder_name, write_text

MEMORY_KINDS = {"cuda": "GPU max_memory_allocated", "rss": "process peak RSS",
                "rss-lifetime": "process peak RSS since start"}
MarkdownColumns = list[tuple[str, str, int]]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std; with an infinite value (the PSNR of an exact result) the mean is that
    infinity (nan for +inf and -inf together) and the std nan."""
    a = np.asarray(values, dtype=np.float64)
    if np.isfinite(a).all():
        return float(a.mean()), float(a.std())
    with np.errstate(invalid="ignore"):
        return float(a.sum()), math.nan


def summarise(rows: list[dict[str, str]], methods: list[str]) -> dict[str, dict]:
    """Per method: (mean, std) of every metric, seconds and PSNR gain over the baseline (the first method)
    or None where no row has it; max peak memory."""
    gain = gains(rows, methods, "psnr")
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        stats = {"n": len(mine), "mem_kind": mine[0]["mem_kind"],
                 "peak_mem_mib": max(float(r["peak_mem_mib"]) for r in mine)}
        columns = {k: [float(r[k]) for r in mine if r[k] != ""] for k in [*METRICS, "seconds"]}
        columns["gain"] = gain.get(m, []) if m != methods[0] else []
        stats.update({k: mean_std(v) if v else None for k, v in columns.items()})
        out[m] = stats
    return out


def cell(stat: tuple[float, float] | None, digits: int) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(mean) else f"{mean}"


def markdown(summary: dict[str, dict], setting: str, crop_border: int, n_images: int, known_mask: bool) -> str:
    """summary.md: a sentence on what the numbers are, then one table row per method."""
    baseline = next(iter(summary))
    kinds = ", ".join(f"{k}: {MEMORY_KINDS[k]}" for k in sorted({s["mem_kind"] for s in summary.values()}))
    masked = any(s["psnr_mask"] for s in summary.values())
    head = (f"`{setting}`, {n_images} images, {crop_border} px border cropped. Mean ± std (population) "
            f"over the images. PSNR / SSIM on RGB, -Y on BT.601 luma; gain: PSNR minus {baseline}'s on the "
            f"same image. "
            + ("-mask: inside the synthetic damage's mask (PSNR over its pixels, SSIM map averaged over them; "
               f"repairs used the {'known' if known_mask else 'automatic'} mask). " if masked else "")
            + f"Peak memory: the largest over the images ({kinds}).")
    if any(s["psnr"] and not math.isfinite(s["psnr"][0]) for s in summary.values()):
        head += " inf: a result equal to its ground truth on some image."
    cols: MarkdownColumns = [("PSNR (dB)", "psnr", 2), ("SSIM", "ssim", 4), ("PSNR-Y (dB)", "psnr_y", 2),
                             ("SSIM-Y", "ssim_y", 4), ("LPIPS", "lpips", 4), ("NIQE", "niqe", 3)] \
        + ([("PSNR-mask (dB)", "psnr_mask", 2), ("SSIM-mask", "ssim_mask", 4)] if masked else []) \
        + [("gain (dB)", "gain", 2), ("s / image", "seconds", 3)]
    lines = [head, "", "| method | " + " | ".join(c for c, _, _ in cols) + " | peak MiB |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for m, s in summary.items():
        lines.append(f"| {m} | " + " | ".join(cell(s[k], d) for _, k, d in cols) + f" | {s['peak_mem_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def bar_panels(summary: dict[str, dict], y_channel: bool) -> list[charts.Panel]:
    y = "_y" if y_channel else ""
    panels = [(f"psnr{y}", f"PSNR{'-Y' if y else ''} (higher is better)", "dB", 2),
              (f"ssim{y}", f"SSIM{'-Y' if y else ''} (higher is better)", "SSIM", 3),
              ("lpips", "LPIPS (lower is better)", "LPIPS", 3),
              ("niqe", "NIQE (lower is better)", "NIQE", 2),
              ("psnr_mask", "PSNR in the damage mask", "dB", 2),
              ("seconds", "time per image", "seconds", 2)]
    return [charts.Panel(title, unit, digits, {m: s[key] for m, s in summary.items()})
            for key, title, unit, digits in panels]


def gains(rows: list[dict[str, str]], methods: list[str], key: str) -> dict[str, list[float]]:
    """Per method, its `key` minus the baseline's (the first method) on the same image; the baseline itself
    (zero by definition) only when it is the only method."""
    base = {r["image"]: float(r[key]) for r in rows if r["method"] == methods[0]}
    out = {m: [float(r[key]) - base[r["image"]] for r in rows if r["method"] == m and r["image"] in base]
           for m in methods}
    out = {m: g for m, g in out.items() if g}
    if len(out) > 1:
        del out[methods[0]]
    return out


def grid(files: list[Path], methods: list[str], task: Task, out: Path, cell: int, path: Path) -> None:
    """Rows: `files`. Columns: GT | LQ (nearest-neighbour, to show its pixels) | methods; for damage settings
    GT | damage mask | methods (the damaged input is the first method). Each cell is the same centre crop of
    `cell` GT pixels, at 1:1. A GT that no longer loads is left out; a missing result is a grey cell."""
    label_w, head_h = 34, 34
    columns = ["GT", "mask" if task.repairing else "LQ", *methods]
    rows = []
    for f in files:
        try:
            rows.append((f, *task.load(f)))
        except (OSError, ValueError):  # images.ImageError: reported by the image loop already
            continue
    canvas = Image.new("RGB", (label_w + cell * len(columns), head_h + cell * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((label_w + cell * c + cell // 2, head_h // 2), charts.fit(name, cell - 8, charts.font(14)),
                  font=charts.font(14), fill=charts.INK, anchor="mm")
    for r, (f, gt, lq, known) in enumerate(rows):
        h, w = gt.shape[-2:]
        second = images.from_tensor(lq) if known is None else repair.mask_image(known[0, 0])
        crops = [images.from_tensor(gt), second.convert("RGB").resize((w, h), Image.NEAREST)]
        crops += [restored(out / "images" / folder_name(m) / f"{f.stem}.png") for m in methods]
        s = min(cell, h, w)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        y = head_h + r * cell
        for c, im in enumerate(crops):
            x = label_w + c * cell
            if im is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=charts.GRID)
                draw.text((x + cell // 2, y + cell // 2), "missing", font=charts.font(14), fill=charts.INK,
                          anchor="mm")
                continue
            canvas.paste(im.crop(box).resize((cell, cell), Image.NEAREST), (x, y))
        charts.vertical_text(canvas, (label_w // 2, y + cell // 2), charts.fit(f.stem, cell - 8, charts.font(14)), 14)
    charts.save(canvas, path)


def restored(path: Path) -> Image.Image | None:
    try:
        return images.open_image(path).convert("RGB")
    except images.ImageError:
        return None


def write_reports(rows: list[dict[str, str]], files: list[Path], methods: list[str], task: Task, out: Path, *,
                  known_mask: bool = False, y_channel: bool = False, grid_rows: int = 4, grid_crop: int = 256
                  ) -> str | None:
    """summary.md, bars.png, gain.png, grid.png over `files` and `methods` (resumed rows included); returns
    the summary table (None where there are no rows)."""
    names = {f.name for f in files}
    current = [r for r in rows if r["image"] in names and r["method"] in methods]
    summary = summarise(current, methods)
    if not summary:
        return None
    measured = [f for f in files if f.name in {r["image"] for r in current}]
    title = f"{task.setting}, {len(measured)} images"
    table = markdown(summary, task.setting, task.crop_border, len(measured), known_mask)
    write_text(out / "summary.md", table)
    colour = charts.colours(list(summary), grey=(BASELINE, REPAIR_BASELINE))
    charts.bars(out / "bars.png", bar_panels(summary, y_channel), colour, f"{title}: mean ± std")
    key = "psnr_y" if y_channel else "psnr"
    g = gains(current, methods, key)
    charts.dots(out / "gain.png", g, {m: colour.get(m, charts.GREY) for m in g},
                f"{title}: PSNR gain over {methods[0]}", "one dot per image; bar: mean",
                f"PSNR{'-Y' if y_channel else ''} gain (dB)")
    grid(measured[:grid_rows], methods, task, out, grid_crop, out / "grid.png")
    return table
