"""Per-stage time and peak memory of one restoration, on random weights of a model preset.

    python benchmarks/bench_restore.py --model tiny --size 512 --steps 4
    python benchmarks/bench_restore.py --model medium --size 1024 --steps 8 --sampler dpmpp2m --device cuda

Stages: text encode (positive + negative prompt, once), stage 1 (denoise-encode + decode), sampling (re-encode
of the stage-1 image + the sampler loop), decode (+ colour fix). Peak memory: torch.cuda.max_memory_allocated
per stage on a GPU; on the CPU the peak resident set of each stage (devices.PeakMemory: VmHWM, reset before
each stage). Random weights cost exactly what trained ones do. On a GPU one untimed
warm-up run comes first.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mini_supir import pipeline, supir  # noqa: E402
from mini_supir.devices import DTYPES, PeakMemory  # noqa: E402


def timed(device: torch.device, fn):
    """(fn(), seconds, peak MiB of the call: CUDA allocator on a GPU, resident set on the CPU)."""
    meter = PeakMemory(device)
    meter.reset()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0, meter.peak_mib()


def run(restorer: pipeline.Restorer, image: Image.Image, settings: pipeline.RestoreSettings, seed: int = 0):
    restorer._text.clear()  # time the text encoders every run
    lq = pipeline.prepare(image, settings).lq
    d = restorer.device
    _, t_text, m_text = timed(d, lambda: restorer.encode_prompts([settings.positive_text, settings.negative]))
    st1, t_s1, m_s1 = timed(d, lambda: restorer.stage1(lq, settings))
    latent, t_smp, m_smp = timed(d, lambda: restorer.sample(st1, settings, torch.Generator().manual_seed(seed)))
    _, t_dec, m_dec = timed(d, lambda: restorer.decode(latent, st1, settings))
    return [("text encode", t_text, m_text), ("stage 1", t_s1, m_s1), ("sampling", t_smp, m_smp), ("decode", t_dec, m_dec)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "medium"], default="tiny")
    p.add_argument("--size", type=int, default=512, help="square image side, px (multiple of 64)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", choices=pipeline.SAMPLERS, default="edm")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--tile-vae", action="store_true")
    p.add_argument("--tile-size", type=int, help="tiled sampling, px")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = replace(pipeline.preset("quality", args.sampler), steps=args.steps, min_size=0,
                       tile_vae=args.tile_vae, tile_size=args.tile_size)
    restorer = pipeline.Restorer.random(supir.PRESETS[args.model], device=device, dtype=args.dtype)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    params = sum(p.numel() for p in restorer.model.parameters()) / 1e6

    meter = PeakMemory(device)
    before = meter.peak_mib()
    if device.type == "cuda":  # warm-up (kernel selection, allocator); on the CPU it would hide the peaks
        run(restorer, image, replace(settings, steps=1))
    rows = run(restorer, image, settings)
    mem = "peak allocated MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"model {args.model} ({params:.1f} M params, random), {args.size}x{args.size} px, {args.sampler} "
          f"{args.steps} steps, {device} {str(restorer.dtype).removeprefix('torch.')}, torch threads "
          f"{torch.get_num_threads()}; peak before: {before:.0f} MiB")
    print(f"| stage | time (s) | {mem} |")
    print("|---|---:|---:|")
    for name, t, m in rows:
        print(f"| {name} | {t:.3f} | {m:.0f} |")
    print(f"| total | {sum(t for _, t, _ in rows):.3f} | |")


if __name__ == "__main__":
    main()
