"""Time and host memory to build SUPIR on the meta device and to load a checkpoint into it.

    python benchmarks/bench_load.py                    # meta build of every preset + tiny/medium load
    python benchmarks/bench_load.py --load-sdxl --dtype bf16   # also write + load a full-size synthetic file (~10 GB disk)

Each measurement runs in a fresh subprocess so its peak RSS is its own. The synthetic files are in the
official layout (an SDXL single file plus a SUPIR file), written from a model with random weights.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mini_supir.devices import DTYPES  # noqa: E402
from mini_supir.supir import SUPIR_PARTS  # noqa: E402


def peak_rss_mb() -> float:  # the whole child process's peak: a fresh process per measurement
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args):
    import torch
    from safetensors.torch import save_file

    from mini_supir import supir
    cfg = supir.PRESETS[args.preset]
    dtype = DTYPES[args.dtype]
    if args.step == "build":
        t = time.perf_counter()
        model = supir.build(cfg, "meta")
        seconds = time.perf_counter() - t
        params = sum(p.numel() for p in model.parameters())
        return {"seconds": seconds, "params": params}
    if args.step == "write":
        with torch.device("meta"):
            model = supir.SUPIR(cfg)
        sd = {k: torch.randn(v.shape, dtype=dtype) * 0.02 if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype)
              for k, v in model.state_dict().items()}
        save_file({k: v for k, v in sd.items() if not k.startswith(SUPIR_PARTS)}, f"{args.dir}/sdxl.safetensors")
        save_file({k: v for k, v in sd.items() if k.startswith(SUPIR_PARTS)}, f"{args.dir}/supir.safetensors")
        return {"bytes": sum(p.stat().st_size for p in Path(args.dir).glob("*.safetensors"))}
    t = time.perf_counter()
    model = supir.load(cfg, f"{args.dir}/sdxl.safetensors", f"{args.dir}/supir.safetensors")
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "bytes": sum(p.numel() * p.element_size() for p in model.state_dict().values())}


def run(**kw) -> dict:
    argv = [sys.executable, __file__, "--child"] + [f"--{k}={v}" for k, v in kw.items()]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step", default="build", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--load-sdxl", action="store_true", help="also write and load a full-size synthetic checkpoint")
    args = p.parse_args()
    if args.child:
        result = child(args)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    print(f"{'preset':8} {'step':14} {'seconds':>8} {'peak RSS MB':>12} {'weights MB':>11} {'params':>14}")
    for preset in ("tiny", "medium", "sdxl"):
        r = run(step="build", preset=preset, dtype=args.dtype)
        print(f"{preset:8} {'build (meta)':14} {r['seconds']:8.2f} {r['peak_rss_mb']:12.0f} {'':>11} {r['params']:14,}")
    for preset in ("tiny", "medium") + (("sdxl",) if args.load_sdxl else ()):
        with tempfile.TemporaryDirectory() as d:
            run(step="write", preset=preset, dir=d, dtype=args.dtype)
            r = run(step="load", preset=preset, dir=d, dtype=args.dtype)
            print(f"{preset:8} {'load ' + args.dtype:14} {r['seconds']:8.2f} {r['peak_rss_mb']:12.0f} {r['bytes'] / 2**20:11.0f}")


if __name__ == "__main__":
    main()
