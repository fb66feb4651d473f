"""What every command-line tool here shares: option types that refuse bad values up front (argparse turns
their errors into one `error:` line and exit 2), the one-line error report, and Ctrl-C as exit 130.

The tools (sample.py, train.py, evaluate.py, python -m mini_supir.mask / .degrade, the web app) are thin
layers over the library; this is the only place that knows how a problem is shown to a person.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from tqdm import tqdm


def one_line(e: BaseException | str) -> str:
    """The first line of an exception's message (its type where it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def fail(what, problem) -> None:
    """`error: WHAT: PROBLEM` on stderr, without breaking a progress bar."""
    tqdm.write(f"error: {what}: {problem}" if what is not None else f"error: {problem}", file=sys.stderr)


def run(main: Callable[[], int]) -> int:
    """A tool's exit code; Ctrl-C stops it with one line and 130 (128 + SIGINT), as shells expect."""
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


# -- option types ----------------------------------------------------------------------------------------
# float("nan"), float("inf") and int("1e20") are the values users actually type by mistake; each type below
# says what it accepts, so that the error names the option and the rule.

def number(kind: type = float, low: float | None = None, high: float | None = None, low_open: bool = False,
           none: bool = False) -> Callable[[str], float | int | None]:
    """An argparse type: a finite `kind` in [low, high] (low excluded with `low_open`); "none" with `none`."""
    def parse(s: str):
        if none and s.strip().lower() == "none":
            return None
        try:
            value = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"{s} must be {'>' if low_open else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{s} must be <= {high:g}")
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
