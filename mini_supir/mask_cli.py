"""The damage-mask command line: an automatic mask for a photo, or synthetic damage with its known mask.

    python -m mini_supir.mask --image photo.png --out mask.png                                # automatic mask
    python -m mini_supir.mask --image photo.png --damage damaged.png --out mask.png --seed 0  # synthetic damage

Every detector parameter of mask.MaskParams is an option (--radius, --window, ...), checked against its
range before anything is read. Bad input: one `error:` line and exit 2; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import Field, fields
from pathlib import Path
from typing import Callable

from . import cli, images, outputs
from .mask import MaskParams, detect_damage, feather
from .mask_synth import KINDS, synthesize_damage

# The detector's memory is about 150 bytes per pixel (float maps and the quantile patches): 64 MP ~ 10 GB.
MAX_PIXELS = 2 ** 26


def param_type(f: Field) -> Callable[[str], object]:
    """The argparse type of a MaskParams field: true / false, or a number in the field's range."""
    if f.type in ("bool", bool):
        def parse(s: str) -> bool:
            if s.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"{f.name} is true or false, not {s!r}")
            return s.lower() in ("true", "1")
        return parse
    return cli.number(int if f.type in ("int", int) else float, f.metadata["low"], f.metadata["high"])


def kinds(s: str) -> tuple[str, ...]:
    chosen = tuple(k.strip() for k in s.split(",") if k.strip())
    unknown = sorted(set(chosen) - set(KINDS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(KINDS)} (comma-separated), not {s!r}")
    return chosen


def image_path(s: str) -> Path:
    """An output file with an extension PIL writes."""
    if Path(s).suffix.lower() not in images.extensions():
        raise argparse.ArgumentTypeError(f"{s}: unknown image extension {Path(s).suffix!r}")
    return Path(s)


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m mini_supir.mask", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", required=True, type=Path, help="input photo")
    p.add_argument("--out", required=True, type=image_path, help="mask to write (white = damage)")
    p.add_argument("--soft", action="store_true", help="write the feathered mask instead of the hard one")
    p.add_argument("--damage", metavar="DAMAGED", type=image_path,
                   help="synthetic mode: write a damaged copy of --image here and its known mask to --out")
    p.add_argument("--seed", type=cli.seed, default=0, help="synthetic mode: random seed")
    p.add_argument("--kinds", type=kinds, default=KINDS, help="synthetic mode: comma-separated damage kinds")
    p.add_argument("--amount", type=cli.number(float, 0, 20, low_open=True), default=1.0,
                   help="synthetic mode: how much damage (> 0, at most 20)")
    defaults = MaskParams()
    for f in fields(MaskParams):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name),
                           help=f.metadata["help"])
        else:
            p.add_argument(flag, type=param_type(f), default=getattr(defaults, f.name), help=f.metadata["help"])
    a = p.parse_args(argv)
    synthetic = [o for o, v, default in (("--seed", a.seed, 0), ("--kinds", a.kinds, KINDS), ("--amount", a.amount, 1.0))
                 if v != default]
    if synthetic and not a.damage:
        p.error(f"{synthetic[0]} is for synthetic damage: it needs --damage")
    outputs = [o for o in (a.out, a.damage) if o is not None]
    for out in outputs:  # never write over the photo we read, nor twice to one file
        if out.exists() and a.image.exists() and os.path.samefile(out, a.image):
            p.error(f"{out} is the input image: write the mask / damaged copy to another file")
    if len(outputs) == 2 and outputs[0].absolute() == outputs[1].absolute():
        p.error("--damage and --out name the same file")
    return a


def run(a: argparse.Namespace) -> int:
    for out in (a.out, a.damage):
        try:
            if out is not None:
                outputs.check_writable(out.parent)
        except OSError as e:
            cli.fail(out, f"cannot write there ({e.strerror or type(e).__name__})")
            return 1
    try:
        img = images.load_tensor(a.image, images.pixel_limit(MAX_PIXELS, "the damage detector works on"))[0]
    except images.ImageError as e:
        cli.fail(a.image, cli.one_line(e))
        return 2
    params = MaskParams(**{f.name: getattr(a, f.name) for f in fields(MaskParams)})
    if a.damage:
        damaged, mask = synthesize_damage(img, a.seed, a.kinds, a.amount)
        written = f"{a.damage} and {a.out} ({mask.float().mean().item():.2%} damaged)"
    else:
        mask = detect_damage(img, params)
        written = f"{a.out} ({mask.float().mean().item():.2%} of the image marked)"
    try:
        if a.damage:
            images.save_tensor(damaged, a.damage)
        images.save_tensor(feather(mask, params.feather_sigma) if a.soft else mask.float(), a.out)
    except OSError as e:  # the disk filled up, or the folder went away
        cli.fail(a.out, f"cannot write it ({e.strerror or type(e).__name__})")
        return 1
    print(f"wrote {written}")
    return 0


def main(argv=None) -> int:
    return cli.run(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
