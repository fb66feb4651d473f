"""Small charts drawn with pillow: bar panels, a dot plot and line curves, each written atomically as a PNG.

evaluate.py draws bars.png and gain.png with them, training its loss_curve.png. Values that are not finite
(the infinite PSNR of a result equal to its ground truth, a diverged loss) are left out of the drawing and
a note on the chart says so: an axis is always computed from finite numbers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

from PIL import Image, ImageDraw, ImageFont

from .images import atomic_write

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
GREY, INK, GRID = "#8c8c8c", "#222222", "#dddddd"


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def colours(names: Sequence[str], grey: Sequence[str] = ()) -> dict[str, str]:
    """A palette colour per name; the names in `grey` (baselines) are grey."""
    others = iter(PALETTE * len(names))
    return {n: GREY if n in grey else next(others) for n in names}


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi] (finite)."""
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


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks at 1, 2 and 5 times a power of ten inside [lo, hi], in log10 units (at least the two ends)."""
    ticks = [k + math.log10(m) for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo <= t <= hi]
    return ticks if len(ticks) >= 2 else [lo, hi]


def vertical_text(image: Image.Image, xy: tuple[float, float], text: str, size: int) -> None:
    """Text rotated 90 degrees counter-clockwise, centred on xy (a y-axis title)."""
    f = font(size)
    box = f.getbbox(text)
    label = Image.new("L", (box[2] + 4, box[3] + 4), 0)
    ImageDraw.Draw(label).text((2, 2), text, font=f, fill=255)
    label = label.rotate(90, expand=True)
    image.paste(Image.new("RGB", label.size, INK), (int(xy[0]) - label.width // 2, int(xy[1]) - label.height // 2),
                label)


def fit(text: str, width: float, f: ImageFont.FreeTypeFont) -> str:
    """`text` shortened with an ellipsis until it is at most `width` px wide."""
    while f.getlength(text) > width and len(text) > 2:
        text = text[:-2] + "…"
    return text


def save(image: Image.Image, path: str | Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


class Axes:
    """A plot area inside `box` (left, top, right, bottom) with a y axis from `span` (default: the first to
    the last tick) and grid lines at `ticks`, written as `labels` (default: tick_labels)."""

    def __init__(self, image: Image.Image, box: tuple[float, float, float, float], ticks: list[float],
                 ylabel: str, title: str = "", span: tuple[float, float] | None = None,
                 labels: list[str] | None = None):
        self.draw, self.box = ImageDraw.Draw(image), box
        self.span = span or (ticks[0], ticks[-1])
        left, top, right, bottom = box
        if title:
            self.draw.text(((left + right) // 2, top - 14), title, font=font(16), fill=INK, anchor="ms")
        for t, label in zip(ticks, labels or tick_labels(ticks)):
            self.draw.line([(left, self.y(t)), (right, self.y(t))], fill=GRID)
            self.draw.text((left - 6, self.y(t)), label, font=font(12), fill=INK, anchor="rm")
        self.draw.line([(left, top), (left, bottom)], fill=INK)
        vertical_text(image, (left - 48, (top + bottom) // 2), ylabel, 13)

    def y(self, value: float) -> float:
        lo, hi = self.span
        return self.box[3] - (value - lo) / (hi - lo) * (self.box[3] - self.box[1])

    def baseline(self, value: float = 0.0) -> None:
        self.draw.line([(self.box[0], self.y(value)), (self.box[2], self.y(value))], fill=INK, width=1)

    def x_labels(self, labels: list[str], centres: list[float]) -> None:
        for label, x in zip(labels, centres):
            self.draw.text((x, self.box[3] + 8), label, font=font(12), fill=INK, anchor="mt")


def legend_layout(names: list[str], width: float) -> list[tuple[str, float, int]]:
    """(name, x offset, row) of colour swatches with the full names, wrapped to `width`."""
    entries, x, row = [], 0.0, 0
    for n in names:
        w = 18 + font(13).getlength(n) + 24
        if x + w > width and x > 0:
            x, row = 0.0, row + 1
        entries.append((n, x, row))
        x += w
    return entries


class Panel(NamedTuple):
    """One bar panel: a (mean, std) or None per name; `digits` for the value written on each bar."""
    title: str
    unit: str
    digits: int
    values: dict[str, tuple[float, float] | None]


def draw_bar(draw: ImageDraw.ImageDraw, axes: Axes, x0: float, x1: float, mean: float, std: float,
             colour: str, digits: int) -> None:
    """A bar from 0 to `mean` with a ± std whisker (where std is finite) and the mean written on top."""
    draw.rectangle([x0, min(axes.y(mean), axes.y(0)), x1, max(axes.y(mean), axes.y(0))], fill=colour)
    xc, top = (x0 + x1) / 2, mean
    if math.isfinite(std):
        top = mean + std
        draw.line([(xc, axes.y(mean - std)), (xc, axes.y(top))], fill=INK, width=2)
        for v in (mean - std, top):
            draw.line([(xc - 6, axes.y(v)), (xc + 6, axes.y(v))], fill=INK, width=2)
    draw.text((xc, axes.y(max(top, mean, 0)) - 4), f"{mean:.{digits}f}", font=font(12), fill=INK, anchor="mb")


def bars(path: str | Path, panels: list[Panel], colour: dict[str, str], title: str) -> None:
    """One panel per quantity, a bar per name (the keys of `colour`, in order) at its mean with a ± std
    whisker, and a legend. A mean that is not finite gets its value written in place of a bar."""
    panels = [p for p in panels if any(v is not None for v in p.values.values())]
    names = list(colour)
    pw, ph = max(260, 60 * len(names) + 110), 340
    width = pw * max(1, len(panels)) + 20
    entries = legend_layout(names, width - 40)
    unbounded = any(v is not None and not math.isfinite(v[0]) for p in panels for v in p.values.values())
    notes = ([] if panels else ["nothing to show"]) + \
        (["inf / nan: not drawn (e.g. PSNR of a result equal to its ground truth)"] if unbounded else [])
    height = ph + 50 + 22 * (entries[-1][2] + 1 if entries else 0) + 22 * bool(notes)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width // 2, 10), title, font=font(18), fill=INK, anchor="mt")
    for i, panel in enumerate(panels):
        shown = {n: v for n, v in panel.values.items() if v is not None and math.isfinite(v[0])}
        ends = [0.0] + [m + s * k for m, s in shown.values() for k in (-1, 1) if math.isfinite(m + s * k)]
        ends += [m for m, _ in shown.values()]
        ticks = nice_ticks(min(ends), max(ends) * 1.12 or 1.0)
        left = 20 + i * pw + 78
        axes = Axes(image, (left, 80, left + pw - 100, ph + 20), ticks, panel.unit, panel.title)
        slot = (pw - 100) / len(names)
        for j, n in enumerate(names):
            value = panel.values.get(n)
            x0, x1 = left + slot * (j + 0.2), left + slot * (j + 0.8)
            if value is None:
                continue
            if n not in shown:  # inf or nan: no bar, the value itself where the bar would stand
                draw.text(((x0 + x1) / 2, axes.y(0) - 4), f"{value[0]:+}", font=font(12), fill=INK, anchor="mb")
                continue
            draw_bar(draw, axes, x0, x1, *value, colour[n], panel.digits)
        axes.baseline()
    for n, dx, row in entries:
        x, y = 20 + dx, ph + 40 + 22 * row
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=colour[n])
        draw.text((x + 18, y + 8), n, font=font(13), fill=INK, anchor="lm")
    if notes:
        draw.text((20, image.height - 24), "; ".join(notes), font=font(12), fill=INK)
    save(image, path)


def dots(path: str | Path, groups: dict[str, list[float]], colour: dict[str, str], title: str, subtitle: str,
         ylabel: str) -> None:
    """Per group, one dot per value (spread sideways so that equal values stay visible) and a bar at the
    mean, on an axis that includes 0. Values that are not finite are left out and counted in a note."""
    finite = {g: [v for v in vs if math.isfinite(v)] for g, vs in groups.items()}
    left_out = sum(len(vs) - len(finite[g]) for g, vs in groups.items())
    everything = [v for vs in finite.values() for v in vs] + [0.0]
    span = max(everything) - min(everything) or 1.0
    ticks = nice_ticks(min(everything) - 0.08 * span, max(everything) + 0.08 * span)
    slot = max(150, 420 // max(1, len(groups)), *(int(font(12).getlength(g)) + 24 for g in groups))
    image = Image.new("RGB", (110 + slot * max(1, len(groups)) + 30, 460), "white")
    draw = ImageDraw.Draw(image)
    draw.text((image.width // 2, 10), title, font=font(18), fill=INK, anchor="mt")
    note = "" if groups else "; nothing to show"
    note += f"; {left_out} not finite, left out" if left_out else ""
    draw.text((image.width // 2, 36), subtitle + note, font=font(13), fill=INK, anchor="mt")
    axes = Axes(image, (110, 70, image.width - 30, 420), ticks, ylabel)
    axes.baseline(0.0)
    for j, (g, values) in enumerate(groups.items()):
        centre = 110 + slot * (j + 0.5)
        for i, v in enumerate(finite[g]):
            dx = ((i * 0.618034) % 1 - 0.5) * slot * 0.5
            draw.ellipse([centre + dx - 4, axes.y(v) - 4, centre + dx + 4, axes.y(v) + 4], fill=colour[g],
                         outline=INK)
        mean = sum(values) / len(values) if values else math.nan
        if math.isfinite(mean):
            draw.line([(centre - slot * 0.35, axes.y(mean)), (centre + slot * 0.35, axes.y(mean))], fill=INK,
                      width=3)
            draw.text((centre + slot * 0.37, axes.y(mean)), f"{mean:+.2f}", font=font(12), fill=INK, anchor="lm")
        else:  # the mean itself (inf, nan) at the top
            draw.text((centre, axes.y(ticks[-1]) + 4), f"mean {mean:+}", font=font(12), fill=INK, anchor="mt")
    axes.x_labels(list(groups), [110 + slot * (j + 0.5) for j in range(len(groups))])
    save(image, path)


def curve(path: str | Path, x: Sequence[float], series: list[tuple[Sequence[float], str, int]], title: str,
          xlabel: str, ylabel: str, size: tuple[int, int] = (720, 400), log: bool = False) -> None:
    """Lines over `x`: `series` is [(values, colour, width)], drawn in order, on a linear or (`log`) log10 y
    axis. Points that are not finite, or not positive on a log axis, are left out (the line breaks there)."""
    W, H = size
    left, right, top, bottom = 72, 16, 36, 36
    keep = (lambda v: math.isfinite(v) and v > 0) if log else math.isfinite  # noqa: E731
    ys = [[(math.log10(v) if log else v) if keep(v) else None for v in values] for values, _, _ in series]
    shown = [v for y in ys for v in y if v is not None] or [0.0]
    lo, hi = min(shown), max(shown)
    hi = hi if hi > lo else lo + 1
    image = Image.new("RGB", size, "white")
    if log:
        ticks = log_ticks(lo, hi)
        axes = Axes(image, (left, top, W - right, H - bottom), ticks, ylabel, span=(lo, hi),
                    labels=[f"{10 ** t:.3g}" for t in ticks])
    else:
        axes = Axes(image, (left, top, W - right, H - bottom), nice_ticks(lo, hi), ylabel)
    draw = axes.draw
    draw.rectangle([left, top, W - right, H - bottom], outline=INK)
    px = lambda s: left + (s - x[0]) / max(1, x[-1] - x[0]) * (W - left - right)  # noqa: E731
    for y, (_, colour, width) in zip(ys, series):
        run: list[tuple[float, float]] = []
        for s, v in [*zip(x, y), (None, None)]:  # a None closes the current run of finite points
            if v is not None:
                run.append((px(s), axes.y(v)))
                continue
            if len(run) > 1:
                draw.line(run, fill=colour, width=width)
            run = []
    left_out = sum(v is None for v in ys[0]) if ys else 0
    note = f" ({left_out} points left out: not finite{' or not positive' if log else ''})" if left_out else ""
    draw.text((left, 8), title + note, fill=INK, font=font(12))
    draw.text((left, H - bottom + 8), f"{xlabel} {x[0]}", fill=INK, font=font(12))
    draw.text((W - right, H - bottom + 8), f"{xlabel} {x[-1]}", fill=INK, font=font(12), anchor="ra")
    save(image, path)
