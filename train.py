"""Train a LoRA on SUPIR's UNet for restoration.

    python train.py --data photos/ --lora-rank 16 --out runs/faces           # SDXL + SUPIR v0Q, 512 px crops
    python train.py --data photos/ --model tiny --resolution 64 --max-steps 50 --out /tmp/smoke   # CPU, seconds
    python -m torch.distributed.run --nproc_per_node 8 train.py --data photos/ ...   # multi-GPU (or gloo on CPU)
    python train.py --data photos/ --task repair --out runs/repair    # cracks / scratches / missing paint
    python train.py --model realesrgan-x4plus --data photos/ --val-data held_out/   # LoRA on a stage-1 net

Each step: random HQ crops from the folder, degraded online (degrade.py, seeded), and SUPIR's training loss
(sgm StandardDiffusionLoss with SUPIR's control input):

    x0 = 0.13025 * sample(encoder(HQ))                        the HQ latent (VAE posterior sample)
    _z = 0.13025 * mode(denoise_encoder(up(LQ)))               the control latent, LQ upsampled to the HQ size
    sigma ~ DiscreteSampling (uniform over the 1000 LegacyDDPM sigmas) or EDM lognormal
    D = Denoiser(x0 + sigma n, sigma, {crossattn, vector, control=_z})     eps network, EpsScaling
    loss = mean(w(sigma) (D - x0)^2),  w = sigma^-2 (EpsWeighting: the eps MSE)  [+ lambda sum ||A||^2 + ||B||^2]

--task repair trains for mask-guided repair (sample.py --repair): the LQ is synthetic damage with the damaged
pixels prefilled as the repair pipeline does, and the loss is weighted 1 + --mask-weight * mask per pixel
(pooled to the latent grid).

Only the UNet's LoRA adapters train; the UNet, control model, VAE and text encoders stay frozen. Everything a
run writes goes to --out: train_log.csv, loss_curve.png, previews/, checkpoint.pt (--resume continues it
bit for bit) and, at the end, lora.safetensors in kohya's format. See docs/training.md.

This file is the run: options, the step and the loop. The pieces are in mini_supir/: train_data.py (images,
crops, order), train_utils.py (objective, log files), train_state.py (adapters, checkpoint, LoRA file),
train_run.py (errors, --out, progress, stopping), train_preview.py; the model comes from pipeline.Restorer.
A --model naming a stage-1 restorer (mini_supir/stage1.py) is handed to mini_supir/stage1_train.py instead.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mini_supir import cli, degrade, lora, stage1_train, supir
from mini_supir.devices import DTYPES, parse_dtype
from mini_supir.pipeline import Restorer
from mini_supir.train_data import (DEGRADATIONS, MASK_WEIGHT, MAX_TRAIN_PIXELS, REPAIR_DEGRADATIONS, Crops, Order,
                                   collate, mix, read_caption, scan_folder)
from mini_supir.train_model import TARGETS, Captions, encode_batch
from mini_supir.train_preview import Preview, preview_pair
from mini_supir.train_run import (Processes, Progress, RunFolder, StopSignal, TrainingError,
                                  ignore_stop_signals, option_problems, run, start_processes)
from mini_supir.train_state import (Adapters, ResumeError, check_resume, kohya_metadata, read_checkpoint,
                                    save_checkpoint, settings, write_lora)
from mini_supir.train_utils import (frobenius, learning_rate, plot_loss, read_log, rng_state, sample_sigmas,
                                    set_rng_state, training_loss, write_log)

MAX_RESOLUTION = int(MAX_TRAIN_PIXELS ** 0.5)  # crops come from images capped at that many pixels
# Options that shape the adapters: a checkpoint made with other values cannot be resumed. Of the rest, a
# change is warned about, except for these, which a resume is for.
FIXED = ("model", "lora_rank", "lora_targets")
FREE = ("resume", "max_steps", "save_every", "preview_every", "out")
FRACTION = cli.number(float, 0, 1)  # chances, dropout, EMA decay


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="train.py", description="Train a restoration LoRA for SUPIR.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, type=Path, help="folder of HQ images, optional <name>.txt captions")
    d.add_argument("--resolution", type=cli.number(int, 1, MAX_RESOLUTION), default=512,
                   help="square random crop, px (SUPIR: 512)")
    d.add_argument("--task", choices=["restore", "repair"], default="restore",
                   help="restore: degraded photos (SUPIR); repair: synthetic damage, loss weighted to the mask")
    d.add_argument("--degradation", choices=sorted(DEGRADATIONS),
                   help="online degradation (degrade.SETTINGS); restore: sr4-blur2 (default) = the paper's blur 2 "
                        "+ x4, realesrgan, ...; repair: cracks-paint (default), cracks")
    d.add_argument("--mask-weight", type=cli.non_negative, default=MASK_WEIGHT,
                   help="repair: loss weight 1 + K * mask (the feathered damage mask)")
    d.add_argument("--caption-dropout", type=FRACTION, default=0.05, help="chance a caption is replaced by ''")
    d.add_argument("--default-caption", default="", help="caption of images without a <name>.txt")
    d.add_argument("--workers", type=cli.number(int, 0), default=2, help="data loader processes (0: load in the main one)")
    d.add_argument("--cache-latents", action="store_true",
                   help="crop, degrade and VAE-encode each image once, up front (fast; no fresh crops/degradations)")
    d.add_argument("--cache-text", action="store_true",
                   help="encode every caption once, up front, then free the text encoders")

    m = p.add_argument_group("model")
    m.add_argument("--model", choices=sorted(supir.PRESETS), default="sdxl",
                   help="architecture; tiny / medium without weight files = seeded random weights (smoke test); "
                        "a stage-1 restorer name (realesrgan-x4plus, ...) trains a LoRA on it instead "
                        "(its options: train.py --model realesrgan-x4plus --help)")
    m.add_argument("--sdxl", help="SDXL single file: path, registry name or repo_id/filename; --model sdxl: 'sdxl'")
    m.add_argument("--supir", help="SUPIR file: path, Q, F or repo_id/filename; --model sdxl: 'Q'")
    m.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="frozen weights and autocast (auto: bf16 on CUDA, fp32 elsewhere); LoRA stays fp32")
    m.add_argument("--device", type=cli.device, default="auto", help="auto, cuda, cuda:1, mps or cpu (torchrun: cuda:LOCAL_RANK)")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in backward")

    a = p.add_argument_group("LoRA")
    a.add_argument("--lora-rank", type=cli.count, default=16)
    a.add_argument("--lora-alpha", type=cli.positive, help="default: the rank (adapter multiplier 1)")
    a.add_argument("--lora-targets", choices=sorted(TARGETS), default="transformer",
                   help="attention: attn1/attn2 q,k,v,out; transformer: + feed-forward and proj_in/out (kohya); "
                        "conv: + the ResBlock convolutions (LoCon)")
    a.add_argument("--lora-dropout", type=FRACTION, default=0.0)
    a.add_argument("--frobenius", type=cli.non_negative, default=0.0, help="lambda of the penalty lambda sum(|A|^2 + |B|^2)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=cli.positive, default=1e-4)
    o.add_argument("--min-lr", type=cli.non_negative, default=0.0, help="cosine schedule floor")
    o.add_argument("--warmup-steps", type=cli.number(int, 0), default=100)
    o.add_argument("--weight-decay", type=cli.non_negative, default=1e-2)
    o.add_argument("--max-grad-norm", type=cli.non_negative, default=1.0, help="0: no clipping")
    o.add_argument("--batch-size", type=cli.count, default=1, help="per process")
    o.add_argument("--grad-accum", type=cli.count, default=1, help="micro-batches per optimiser step")
    o.add_argument("--max-steps", type=cli.count, default=2000, help="optimiser steps")
    o.add_argument("--sigma-sampling", choices=["discrete", "edm"], default="discrete",
                   help="discrete: uniform LegacyDDPM index (sgm DiscreteSampling); edm: lognormal")
    o.add_argument("--timestep-range", type=cli.number(int, 0, 999), nargs=2, default=(0, 999), metavar=("MIN", "MAX"),
                   help="discrete sampling: index range, inclusive")
    o.add_argument("--p-mean", type=cli.finite, default=-1.2, help="edm: mean of log sigma")
    o.add_argument("--p-std", type=cli.positive, default=1.2, help="edm: std of log sigma")
    o.add_argument("--ema", type=FRACTION, default=0.0, help="EMA decay of the LoRA weights (e.g. 0.999); 0: off")
    o.add_argument("--seed", type=cli.seed, default=0)

    w = p.add_argument_group("output")
    w.add_argument("--out", type=Path, default=Path("runs/lora"))
    w.add_argument("--save-every", type=cli.count, default=500, help="checkpoint every N steps (and at the end)")
    w.add_argument("--preview-every", type=cli.number(int, 0), default=0, help="restore the preview image every N steps; 0: off")
    w.add_argument("--preview-image", type=Path, help="HQ image to degrade and restore (default: first of --data)")
    w.add_argument("--preview-steps", type=cli.count, default=8, help="sampler steps of a preview")
    w.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], default="fp16", help="of lora.safetensors")
    w.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: <out>/checkpoint.pt)")
    return p


def parse_args(argv=None):
    """The options, every value checked (one line, exit 2) before anything is read or loaded."""
    p = build_parser()
    args = p.parse_args(argv)
    args.lora_alpha = args.lora_rank if args.lora_alpha is None else args.lora_alpha
    args.degradation = args.degradation or ("cracks-paint" if args.task == "repair" else "sr4-blur2")
    cfg = supir.PRESETS[args.model]
    multiple = cfg.vae.downsample_factor * 2 ** (len(cfg.unet.channel_mult) - 1)  # latent must halve per level
    scale = getattr(degrade.SETTINGS[args.degradation], "scale", 1)
    problems = option_problems([
        ("degradation", (args.task == "repair") == (args.degradation in REPAIR_DEGRADATIONS),
         f"one of {', '.join(REPAIR_DEGRADATIONS)} for --task repair, and none of them for --task restore"),
        ("resolution", args.resolution % multiple == 0 and args.resolution % scale == 0,
         f"a multiple of {multiple} (--model {args.model}) and of the degradation's scale {scale}"),
        ("min-lr", args.min_lr <= args.lr, "at most --lr"),
        ("lora-dropout", args.lora_dropout < 1, "below 1"), ("ema", args.ema < 1, "below 1"),
        ("timestep-range", args.timestep_range[0] <= args.timestep_range[1], "MIN MAX with MIN <= MAX"),
        ("preview-image", args.preview_image is None or args.preview_every > 0, "given with --preview-every N"),
        ("out", args.out.resolve() != args.data.resolve(), "another folder than --data (its PNGs would be trained on)"),
        ("sdxl", args.model == "sdxl" or (args.sdxl is None) == (args.supir is None),
         "given with --supir for --model tiny / medium (or neither: seeded random weights)")])
    if problems:
        p.error("; ".join(problems))
    return args


# ----------------------------------------------------------------------------------------------------------
# Set-up


def read_resume(args, world: int) -> dict:
    """The checkpoint to resume, checked against this run's options before anything heavy is loaded."""
    path = Path(args.resume) if args.resume else args.out / "checkpoint.pt"
    state = read_checkpoint(path)
    if state.get("world", 1) != world:
        raise ResumeError(f"{path} was written by {state.get('world', 1)} processes, this run has {world}")
    check_resume(path, state["settings"], settings(args), FIXED, FREE)
    return {**state, "path": str(path)}


# ----------------------------------------------------------------------------------------------------------
# Training


class Trainer:
    """One run: SUPIR's loss on micro-batches, the optimiser step over every process, the loop and its files."""

    def __init__(self, args, procs: Processes, restorer: Restorer, data: Crops, order: Order, captions: Captions,
                 preview: Preview | None):
        self.args, self.procs, self.data, self.order, self.captions, self.preview = args, procs, data, order, captions, preview
        self.model, self.vae, self.denoiser = restorer.model, restorer.vae, restorer.denoiser
        self.device, self.dtype = procs.device, restorer.dtype
        torch.manual_seed(args.seed)  # the same initial A on every rank
        lora.inject_lora(self.model.model.diffusion_model, "default", args.lora_rank, args.lora_alpha,
                         TARGETS[args.lora_targets], args.lora_dropout, dtype=torch.float32)
        self.adapters = Adapters(self.model, args.lr, args.weight_decay, args.ema)
        self.model.model.gradient_checkpointing = args.gradient_checkpointing
        self.latents = self.cache_latents() if args.cache_latents else None
        torch.manual_seed(mix(args.seed, 4, procs.rank))  # LoRA dropout differs per rank
        self.noise = torch.Generator().manual_seed(mix(args.seed, 5, procs.rank))  # posterior, sigma, noise draws
        self.step, self.position, self.log = 0, 0, []

    def resume(self, state: dict) -> None:
        self.adapters.load_state_dict(state, state["path"])
        set_rng_state(state["rng"][self.procs.rank], self.noise)
        self.step, self.position = state["step"], state["position"]
        if self.procs.main:  # rows logged after the checkpoint by the interrupted run are redone
            self.log = read_log(self.args.out / "train_log.csv", upto=self.step)
            write_log(self.args.out / "train_log.csv", self.log)

    def cache_latents(self) -> dict[int, tuple[torch.Tensor, ...]]:
        """One crop + degradation + encoding per image (seed fixed per image), one image at a time so the
        numbers do not depend on batching; kept on the device."""
        cache = {}
        for index in tqdm(range(len(self.data)), desc="caching latents", disable=not self.procs.main or None):
            seed = mix(self.args.seed, 2, index)
            cache[index] = encode_batch(self.vae, collate([self.data[index, seed]]), self.device,
                                         torch.Generator().manual_seed(seed))
        return cache

    def micro_batches(self):
        keys = self.order.batches(self.position, self.args.batch_size)
        if self.latents is None:
            yield from torch.utils.data.DataLoader(self.data, batch_sampler=keys, num_workers=self.args.workers,
                                                   collate_fn=collate, worker_init_fn=ignore_stop_signals)
            return
        for batch in keys:
            drop = [torch.rand((), generator=torch.Generator().manual_seed(s)).item() < self.args.caption_dropout
                    for _, s in batch]
            x0, z, w = (torch.cat(t) for t in zip(*(self.latents[i] for i, _ in batch)))
            yield {"latents": (x0, z, w), "caption": ["" if d else self.data.captions[i] for d, (i, _) in zip(drop, batch)]}

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean training loss of one micro-batch (all draws from the run's noise generator, on the CPU)."""
        x0, z_lq, weight = batch["latents"] if "latents" in batch else encode_batch(self.vae, batch, self.device, self.noise)
        cond = {**self.captions.encode(batch["caption"]), "control": z_lq}
        a = self.args
        sigmas = sample_sigmas(x0.shape[0], self.noise, a.sigma_sampling, a.timestep_range, a.p_mean, a.p_std)
        noise = torch.randn(x0.shape, generator=self.noise).to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == torch.bfloat16 else nullcontext()
        with autocast:
            return training_loss(self.denoiser, x0, cond, sigmas.to(self.device), noise, weight).mean()

    def train_step(self, batches) -> dict:
        a, params = self.args, self.adapters.params
        total = torch.zeros((), device=self.device)
        for _ in range(a.grad_accum):
            loss = self.forward(next(batches))
            self.position += a.batch_size
            (loss / a.grad_accum).backward()
            total += loss.detach() / a.grad_accum
        penalty = torch.zeros(())
        if a.frobenius > 0:
            penalty = a.frobenius * frobenius(params)
            penalty.backward()
        if self.procs.world > 1:
            # Only the LoRA gradients (a few MB) need averaging: one all-reduce of them all, no DDP wrapper
            # (which would also broadcast the frozen 3.8 B weights and hook every one of them).
            flat = self.procs.mean(torch.cat([p.grad.flatten() for p in params]))
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        lr = learning_rate(self.step, a.lr, a.max_steps, a.warmup_steps, a.min_lr)
        norm = self.adapters.step(lr, a.max_grad_norm)
        self.step += 1
        return {"loss": self.procs.mean(total).item(), "penalty": penalty.item(), "lr": lr, "grad_norm": norm.item()}

    def train(self) -> int:
        """The loop from the current step to --max-steps: 0 when done, 130 when stopped by a signal (after
        saving a checkpoint)."""
        a, main = self.args, self.procs.main
        self.model.train()
        if self.preview is not None and self.step == 0:
            self.preview.write(0, self.adapters)
        batches, t0 = self.micro_batches(), time.time()
        progress = Progress(a.max_steps, self.step, enabled=main)
        with StopSignal() as stop:
            while self.step < a.max_steps:
                info = self.train_step(batches)
                progress.update(self.step, info["loss"], info["lr"])
                if main:
                    self.log.append({"step": self.step, "epoch": self.order[self.position - 1][2],
                                     **{k: f"{v:.6g}" for k, v in info.items()}, "seconds": f"{time.time() - t0:.2f}"})
                if not math.isfinite(info["loss"]):
                    raise TrainingError(f"the loss is {info['loss']} at step {self.step} (try a lower --lr)")
                stopping = self.procs.any(stop.requested)
                last = self.step == a.max_steps or stopping
                if self.step % a.save_every == 0 or last:
                    self.write_outputs()
                if self.preview is not None and (self.step % a.preview_every == 0 or last):
                    self.preview.write(self.step, self.adapters)
                if stopping:
                    progress.close()
                    print(f"stopped at step {self.step}: checkpoint saved, continue with --resume", file=sys.stderr)
                    return 130
        progress.close()
        if main:
            meta = kohya_metadata(a, self.step, len(self.data), f"mini_supir train.py, {a.task} ({a.degradation})",
                                  world_size=self.procs.world, ema_weights=self.adapters.ema is not None)
            write_lora(a.out / "lora.safetensors", self.model, self.adapters, meta, DTYPES[a.save_precision])
        return 0

    def write_outputs(self) -> None:
        rng = self.procs.gather(rng_state(self.noise))  # every rank's generators, for an exact resume
        if not self.procs.main:
            return
        out = self.args.out
        save_checkpoint(out / "checkpoint.pt", {"step": self.step, "position": self.position, "world": self.procs.world,
                                                **self.adapters.state_dict(), "rng": rng, "settings": settings(self.args)})
        write_log(out / "train_log.csv", self.log)
        plot_loss(out / "loss_curve.png", [int(r["step"]) for r in self.log], [float(r["loss"]) for r in self.log])


def train(args, procs: Processes) -> int:
    """Everything that can be refused is checked before the model loads: data, preview image, --out, the
    checkpoint to resume; then the weights (every missing file named at once)."""
    files, captions, sizes = scan_folder(args.data, args.default_caption, warn=procs.main)
    degradation = DEGRADATIONS[args.degradation]
    if args.task == "repair":
        degradation = partial(degradation, mask_weight=args.mask_weight)
    data = Crops(files, captions, args.resolution, degradation, args.caption_dropout, sizes=sizes)
    order = Order(len(files), args.seed, procs.rank, procs.world)
    pair = None
    if args.preview_every > 0 and procs.main:
        path = args.preview_image or files[0]
        pair = preview_pair(path, read_caption(path, args.default_caption), args.resolution, args.degradation, args.seed)
    state = read_resume(args, procs.world) if args.resume is not None else None
    folder = RunFolder(args.out, args.resume is not None) if procs.main else None
    try:
        default = torch.bfloat16 if procs.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        dtype = parse_dtype(args.dtype, default)  # cast while reading: host RAM holds one copy at this precision
        restorer = Restorer.load(args.model, sdxl=args.sdxl, supir_file=args.supir, device=procs.device, dtype=dtype,
                                 vae_dtype=dtype)[0]
        preview = Preview(pair, restorer, args.preview_steps, args.seed, args.out / "previews") if pair else None
        trainer = Trainer(args, procs, restorer, data, order, Captions(restorer, captions, procs.device, args.cache_text),
                          preview)
        if state is not None:
            trainer.resume(state)
        return trainer.train()
    finally:
        if folder is not None:
            folder.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if stage1_train.wants(argv):  # a stage-1 restorer: its own, much smaller trainer and options
        return stage1_train.main(argv)

    def start() -> int:
        args = parse_args(argv)
        procs = start_processes(args.device)
        try:
            return train(args, procs)
        finally:
            if procs.world > 1:
                dist.destroy_process_group()
    return run(start)


if __name__ == "__main__":
    sys.exit(main())
