"""What every command-line tool here shares: option types that refuse bad values up front (argparse turns
their errors into one `error:` line and exit 2), the one-line error report, and Ctrl-C as exit 130.

The tools (sample.py, train.py, evaluate.py, python -m mini_supir.mask / .degrade, the web app) are thin
layers over the library; this is the only place that knows how a problem is shown to a person.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from typing import Callable

from tqdm import tqdm


def one_line(e: BaseException | str) -> str:
    """The first line of an exception's message (its type where it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def fail(what, problem) -> None:
    """`error: WHAT: PROBLEM` on stderr, without breaking a progress bar."""
    tqdm.write(f"error: {what}: {problem}" if what is not None else f"error: {problem}", file=sys.stderr)


def warn(message) -> None:
    """`warning: MESSAGE` on stderr, one line, without breaking a progress bar."""
    tqdm.write(f"warning: {one_line(message)}", file=sys.stderr)


def run(main: Callable[[], int]) -> int:
    """A tool's exit code; Ctrl-C stops it with one line and 130 (128 + SIGINT), as shells expect. Library
    warnings (an animated GIF read as its first frame, a LoRA applied in part) print as one `warning:` line."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: warn(message)
        try:
            return main()
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (no usage block above it), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


# -- option types ----------------------------------------------------------------------------------------
# float("nan"), float("inf") and int("1e20") are the values users actually type by mistake; each type below
# says what it accepts, so that the error names the option and the rule.

def number(kind: type = float, low: float | None = None, high: float | None = None, low_open: bool = False,
           none: bool = False) -> Callable[[str], float | int | None]:
    """An argparse type: a finite `kind` in [low, high] (low excluded with `low_open`); "none" with `none`."""
    show = (lambda v: f"{v:g}") if kind is float else str  # an int bound in full, not 9.22337e+18

    def parse(s: str):
        if none and s.strip().lower() == "none":
            return None
        try:
            value = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):  # (an int is finite, and math.isfinite(10**400) overflows)
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"{s} must be {'>' if low_open else '>='} {show(low)}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{s} must be <= {show(high)}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


finite = number(float)
positive = number(float, 0, low_open=True)
non_negative = number(float, 0)
count = number(int, 1)        # steps, samples, batch size, rank: at least one
size_px = number(int, 0)      # a size or tile in px where 0 means "off"
seed = number(int, 0, 2 ** 63 - 1)


def lora_spec(s: str) -> tuple[str, float]:
    """FILE[:SCALE] -> (file, scale); a ':' that belongs to the path (C:\\x, a hub spec) stays in it."""
    path, sep, scale = s.rpartition(":")
    if not sep or len(path) <= 1 or "/" in scale or "\\" in scale:  # no ':', or a drive letter / part of a path
        return s, 1.0
    try:
        value = float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: the scale after ':' must be a number, not {scale!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{s!r}: the scale must be a finite number")
    return path, value


def device(s: str) -> str:
    """auto, cpu, cuda, cuda:N or mps, present on this machine (torch would fail later, blaming the model)."""
    import torch
    if s == "auto":
        return s
    try:
        d = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a device: auto, cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s}: this machine has no CUDA GPU (use cpu or auto)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{s}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if d.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{s}: MPS is not available here (use cpu or auto)")
    if d.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{s}: only cpu, cuda and mps devices are supported")
    return s
