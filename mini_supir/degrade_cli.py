"""Write a low-quality (LQ) copy of every image in a folder with one of degrade.SETTINGS.

    python -m mini_supir.degrade --in GT_DIR --out LQ_DIR --setting sr4-blur2 [--seed 0]

Each file's seed comes from --seed and its name (degrade.image_seed), so a file's LQ does not depend on the
other files. A bad file is reported in one `error:` line and the others are still written; the exit code
is then 1. Bad option values exit with 2 before anything is read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from . import cli, images, outputs
from .degrade import IMAGE_SUFFIXES, SETTINGS, degrade, image_seed

# The Real-ESRGAN pipeline holds ~170 bytes per GT pixel (float maps, kernels, JPEG buffers): 64 MP ~ 11 GB.
MAX_PIXELS = 2 ** 26


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m mini_supir.degrade", description=__doc__.split("\n\n")[0])
    p.add_argument("--in", dest="input", required=True, type=Path, help="folder of ground-truth images")
    p.add_argument("--out", required=True, type=Path, help="folder for the LQ PNGs (made with the first one)")
    p.add_argument("--setting", default="sr4-blur2", choices=sorted(SETTINGS))
    p.add_argument("--seed", type=cli.seed, default=0, help="base seed; each file's seed also uses its name")
    args = p.parse_args(argv)
    if args.out.resolve() == args.input.resolve():
        p.error("--out must differ from --in (the LQ PNGs would overwrite the ground truth)")
    return args


def gt_files(folder: Path) -> list[Path]:
    """The folder's images, sorted; raises ValueError for a missing or empty folder or a shared name."""
    if not folder.is_dir():
        raise ValueError(f"input folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):  # a.jpg and a.png would both become a.png
        raise ValueError(f"two input images share a name: {sorted(s for s in set(stems) if stems.count(s) > 1)}")
    return files


def run(args: argparse.Namespace) -> int:
    try:
        files = gt_files(args.input)
        outputs.check_writable(args.out)
    except OSError as e:
        cli.fail(args.out, f"cannot write there ({e.strerror or type(e).__name__})")
        return 1
    except ValueError as e:
        cli.fail(None, e)
        return 1
    failed = 0
    check = images.pixel_limit(MAX_PIXELS, "degrade works on")
    for path in tqdm(files, desc=f"degrade {args.setting}", unit="img", disable=None):
        try:
            lq = degrade(images.load_tensor(path, check), args.setting, seed=image_seed(args.seed, path.name))
            images.save_tensor(lq, args.out / f"{path.stem}.png")
        except (OSError, ValueError) as e:  # unreadable, too large or too small (ImageError is a ValueError)
            cli.fail(path, cli.one_line(e))
            failed += 1
    return 1 if failed else 0


def main(argv=None) -> int:
    return cli.run(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
