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
    run.json            what the rows were computed with (a resumed run must match it) and a hash of each GT file

Damage settings (`--setting cracks`) repair instead: the methods are `damaged` (the input as it is, the
baseline), `fill` (classical inpainting, repair.prefill) and `supir` (mask-guided SUPIR repair), each with the
automatic damage mask or, with --known-mask, the synthetic damage's own mask.

Rows already in results.csv are not recomputed. An interrupted run resumes where it stopped, and adding a
method or images computes only the new rows; the rows of a GT file that changed since are recomputed.

This file is the command line only: the run and its files are mini_supir/evaluation.py, the methods
eval_methods.py, the summary, charts and grid eval_report.py (drawn with charts.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from mini_supir import cli, outputs, stage1, supir
from mini_supir.degrade import IMAGE_SUFFIXES, SETTINGS, Damage
from mini_supir.devices import DTYPES, pick_device
from mini_supir.eval_methods import SUPIRSpec, build_methods, lora_method_name
from mini_supir.eval_report import write_reports
from mini_supir.evaluation import BASELINE, REPAIR_BASELINE, REPAIR_METHODS, Task, run_method, start_run
from mini_supir.metrics import LPIPS
from mini_supir.pipeline import SAMPLERS
from mini_supir.weights import WeightsError


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description="Degrade ground-truth images, restore them with each method, and "
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
    p.add_argument("--lora", action="append", default=[], type=cli.lora_spec, metavar="FILE[:SCALE]",
                   help="LoRA for supir+lora, merged at SCALE (default 1); repeatable")
    p.add_argument("--limit", type=cli.count, help="only the first N images (sorted by name)")
    p.add_argument("--gt-crop", type=cli.count, help="centre-crop each GT to at most N x N px first")
    p.add_argument("--seed", type=cli.seed, default=0, help="degradation seeds derive from it and the file name; "
                                                            "SUPIR samples with it")
    p.add_argument("--crop-border", type=cli.size_px, help="pixels dropped on each side before scoring "
                                                           "(default: the setting's scale; 0 for scale 1)")
    p.add_argument("--y-channel", action="store_true", help="charts show PSNR-Y / SSIM-Y (the CSV and summary "
                                                            "always have both)")
    p.add_argument("--lpips-download", action="store_true", help="fetch the LPIPS weights if they are missing")
    p.add_argument("--grid", type=cli.count, default=4, help="images in grid.png (default: 4)")
    p.add_argument("--grid-crop", type=cli.count, default=256, help="crop size in grid.png, GT px (default: 256)")
    m = p.add_argument_group("SUPIR (passed to the pipeline, see sample.py)")
    m.add_argument("--model", choices=sorted(supir.PRESETS), default="sdxl",
                   help="sdxl (default); tiny / medium without weight files: random weights (smoke test)")
    m.add_argument("--sdxl", help="SDXL single file (default: sdxl)")
    m.add_argument("--supir", help="SUPIR file (default: Q, F with --fidelity)")
    m.add_argument("--fidelity", dest="mode", action="store_const", const="fidelity", default="quality",
                   help="v0F with the Fidelity preset (default: v0Q, Quality)")
    m.add_argument("--sampler", choices=SAMPLERS, default="edm")
    m.add_argument("--steps", type=cli.count, help="sampling steps (default: the preset's)")
    m.add_argument("--min-size", type=cli.size_px, help="short side SUPIR works at, at least (default: 1024)")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    m.add_argument("--vae-dtype", choices=["auto", *DTYPES], default="auto")
    m.add_argument("--offload", action="store_true", help="each part on the GPU only while it runs")
    args = p.parse_args(argv)
    check_options(p, args)
    return args


def check_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Option combinations argparse cannot check (exit 2); fills in the defaults that depend on the setting."""
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
    if ("supir+lora" in args.method) != bool(args.lora):
        p.error("supir+lora needs --lora FILE, and --lora needs --method supir+lora")
    names = [lora_method_name(f, s) for f, s in args.lora]
    if len(set(names)) != len(names):
        p.error(f"two --lora give the same method name: {names}")
    if args.out.resolve() == args.gt.resolve():  # bars.png, grid.png, ... would land among (and over) the photos
        p.error("--out must be another folder than --gt")
    try:
        pick_device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device}: {cli.one_line(e)}")
    if args.crop_border is None:
        scale = SETTINGS[args.setting].scale
        args.crop_border = scale if scale > 1 else 0


def find_images(folder: Path, limit: int | None) -> list[Path]:
    """The first `limit` images of `folder`, sorted by name; ValueError naming what is wrong."""
    if not folder.is_dir():
        raise ValueError(f"ground-truth folder {folder} {'is not a folder' if folder.exists() else 'does not exist'}")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        raise ValueError(f"two images share a name: {sorted({s for s in stems if stems.count(s) > 1})}")
    return files[:limit]


def make_out(out: Path) -> list[Path]:
    """Create `out` and its missing parents, and check that a file can be written there, before any work.
    Returns the folders it made, innermost first; OSError (nothing made) where `out` is not writable."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    made = [p for p in [out, *out.parents] if not p.exists()]
    try:
        outputs.check_writable(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty(made)
        raise OSError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None
    return made


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone: keep what is there
            pass


def tidy(out: Path, ours: list[Path], made: list[Path]) -> None:
    """Where nothing was measured, remove the files (`ours`) and folders (`made`) this run created: an early
    failure leaves no empty results folder behind."""
    try:
        if len((out / "results.csv").read_text(encoding="utf-8").splitlines()) > 1:
            return
    except FileNotFoundError:
        pass
    for f in ours:
        f.unlink(missing_ok=True)
    remove_empty(made)


def load_lpips(download: bool, device: str) -> LPIPS | None:
    try:
        return LPIPS.from_pretrained(download=download).to(pick_device(device))
    except (FileNotFoundError, RuntimeError) as e:
        tqdm.write(f"note: LPIPS is left empty: {cli.one_line(e)}"
                   + ("" if download else " (--lpips-download fetches it)"), file=sys.stderr)
        return None


def evaluate(args: argparse.Namespace, files: list[Path], task: Task) -> int:
    """Every missing (image, method) row of this run, then the reports; the exit code."""
    spec = SUPIRSpec(args.model, args.mode, args.sdxl, args.supir, args.sampler, args.steps, args.min_size)
    methods, configs = build_methods(args.method, spec, args.lora, args.seed, task.repairing, args.known_mask,
                                     args.device, dtype=args.dtype, vae_dtype=args.vae_dtype, offload=args.offload)
    rows = start_run(args.out, task, configs, files)
    done = {(r["image"], r["method"]) for r in rows}
    todo = {m: [f for f in files if (f.name, m) not in done] for m in methods}
    remaining = sum(map(len, todo.values()))
    lpips = load_lpips(args.lpips_download, args.device) if remaining else None
    failures = 0
    with tqdm(total=len(files) * len(methods), initial=len(files) * len(methods) - remaining, desc="evaluate",
              unit="run", disable=None) as progress:
        for name, method in methods.items():
            if not todo[name]:
                continue
            try:
                new, failed = run_method(name, method, todo[name], task, args.out, lpips, progress)
            except WeightsError as e:  # from open(), before any image of this method
                cli.fail(name, ": ".join(map(str, e.args)))
                progress.update(len(todo[name]))
                new, failed = [], len(todo[name])
            rows += new
            failures += failed
    table = write_reports(rows, files, list(methods), task, args.out, known_mask=args.known_mask,
                          y_channel=args.y_channel, grid_rows=args.grid, grid_crop=args.grid_crop)
    if table:
        print(table)
    return 1 if failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        files = find_images(args.gt, args.limit)
        made = make_out(args.out)
    except (ValueError, OSError) as e:
        cli.fail(None, cli.one_line(e))
        return 1
    task = Task(args.setting, args.seed, args.gt_crop, args.crop_border)
    ours = [f for f in (args.out / "run.json", args.out / "results.csv") if not f.exists()]
    try:
        return evaluate(args, files, task)
    except (ValueError, OSError) as e:  # a results folder made otherwise, a full disk
        cli.fail(None, cli.one_line(e))
        return 1
    finally:
        tidy(args.out, ours, made)


if __name__ == "__main__":
    sys.exit(cli.run(main))
