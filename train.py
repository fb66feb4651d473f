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

Data set, order, objective and file helpers live in mini_supir/train_utils.py; this file is the run itself.
A --model naming a stage-1 restorer (mini_supir/stage1.py) is handed to mini_supir/stage1_train.py instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from mini_supir import degrade, lora, lora_files, presets, repair, stage1_train, supir
from mini_supir.sampler import Denoiser
from mini_supir.train_utils import (DEGRADATIONS, MASK_WEIGHT, REPAIR_DEGRADATIONS, Crops, DataError, Order, atomic,
                                    collate, frobenius, learning_rate, mix, optimizer_step, plot_loss, read_log, rng_state,
                                    sample_sigmas, scan_folder, set_rng_state, training_loss, write_log)

try:  # previews only; training never needs the restoration pipeline
    from mini_supir import pipeline
except ImportError as e:
    pipeline, PIPELINE_ERROR = None, e

# "conv" adds the ResBlock convolutions (kohya's LoCon): the only adapters at the full latent resolution,
# where SDXL's UNet has no transformers.
TARGETS = {"attention": lora.ATTENTION, "transformer": lora.TRANSFORMER,
           "conv": lora.TRANSFORMER + ("in_layers.2", "out_layers.3", "skip_connection")}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a restoration LoRA for SUPIR.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, type=Path, help="folder of HQ images, optional <name>.txt captions")
    d.add_argument("--resolution", type=int, default=512, help="square random crop, px (SUPIR: 512)")
    d.add_argument("--task", choices=["restore", "repair"], default="restore",
                   help="restore: degraded photos (SUPIR); repair: synthetic damage, loss weighted to the mask")
    d.add_argument("--degradation", choices=sorted(DEGRADATIONS),
                   help="online degradation (degrade.SETTINGS); restore: sr4-blur2 (default) = the paper's blur 2 "
                        "+ x4, realesrgan, ...; repair: cracks-paint (default), cracks")
    d.add_argument("--mask-weight", type=float, default=MASK_WEIGHT,
                   help="repair: loss weight 1 + K * mask (the feathered damage mask)")
    d.add_argument("--caption-dropout", type=float, default=0.05, help="chance a caption is replaced by ''")
    d.add_argument("--default-caption", default="", help="caption of images without a <name>.txt")
    d.add_argument("--workers", type=int, default=2, help="data loader processes (0: load in the main one)")
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
    m.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="frozen weights and autocast (auto: bf16 on CUDA, fp32 elsewhere); LoRA stays fp32")
    m.add_argument("--device", default="auto", help="auto, cuda, cuda:1 or cpu (torchrun: cuda:LOCAL_RANK)")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in backward")

    a = p.add_argument_group("LoRA")
    a.add_argument("--lora-rank", type=int, default=16)
    a.add_argument("--lora-alpha", type=float, help="default: the rank (adapter multiplier 1)")
    a.add_argument("--lora-targets", choices=sorted(TARGETS), default="transformer",
                   help="attention: attn1/attn2 q,k,v,out; transformer: + feed-forward and proj_in/out (kohya); "
                        "conv: + the ResBlock convolutions (LoCon)")
    a.add_argument("--lora-dropout", type=float, default=0.0)
    a.add_argument("--frobenius", type=float, default=0.0, help="lambda of the penalty lambda sum(|A|^2 + |B|^2)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--min-lr", type=float, default=0.0, help="cosine schedule floor")
    o.add_argument("--warmup-steps", type=int, default=100)
    o.add_argument("--weight-decay", type=float, default=1e-2)
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    o.add_argument("--batch-size", type=int, default=1, help="per process")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    o.add_argument("--max-steps", type=int, default=2000, help="optimiser steps")
    o.add_argument("--sigma-sampling", choices=["discrete", "edm"], default="discrete",
                   help="discrete: uniform LegacyDDPM index (sgm DiscreteSampling); edm: lognormal")
    o.add_argument("--timestep-range", type=int, nargs=2, default=(0, 999), metavar=("MIN", "MAX"),
                   help="discrete sampling: index range, inclusive")
    o.add_argument("--p-mean", type=float, default=-1.2, help="edm: mean of log sigma")
    o.add_argument("--p-std", type=float, default=1.2, help="edm: std of log sigma")
    o.add_argument("--ema", type=float, default=0.0, help="EMA decay of the LoRA weights (e.g. 0.999); 0: off")
    o.add_argument("--seed", type=int, default=0)

    w = p.add_argument_group("output")
    w.add_argument("--out", type=Path, default=Path("runs/lora"))
    w.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    w.add_argument("--preview-every", type=int, default=0, help="restore the preview image every N steps; 0: off")
    w.add_argument("--preview-image", type=Path, help="HQ image to degrade and restore (default: first of --data)")
    w.add_argument("--preview-steps", type=int, default=8, help="sampler steps of a preview")
    w.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], default="fp16", help="of lora.safetensors")
    w.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: <out>/checkpoint.pt)")
    args = p.parse_args(argv)
    args.lora_alpha = args.lora_rank if args.lora_alpha is None else args.lora_alpha
    if args.degradation is None:
        args.degradation = "cracks-paint" if args.task == "repair" else "sr4-blur2"
    if (args.task == "repair") != (args.degradation in REPAIR_DEGRADATIONS):
        p.error(f"--task {args.task} does not go with --degradation {args.degradation}: damage settings "
                f"({', '.join(REPAIR_DEGRADATIONS)}) are for --task repair, the others for --task restore")
    problems = [f"--{name} must be {what}" for name, ok, what in (
        ("batch-size", args.batch_size >= 1, ">= 1"), ("grad-accum", args.grad_accum >= 1, ">= 1"),
        ("max-steps", args.max_steps >= 1, ">= 1"), ("save-every", args.save_every >= 1, ">= 1"),
        ("lora-rank", args.lora_rank >= 1, ">= 1"), ("ema", 0 <= args.ema < 1, "in [0, 1)"),
        ("caption-dropout", 0 <= args.caption_dropout <= 1, "in [0, 1]"), ("mask-weight", args.mask_weight >= 0, ">= 0"),
        ("timestep-range", 0 <= args.timestep_range[0] <= args.timestep_range[1] <= 999, "0 <= MIN <= MAX <= 999"))
        if not ok]
    if problems:
        p.error("; ".join(problems))
    return args


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------
# Training


class Trainer:
    """The frozen SUPIR model with a trainable UNet LoRA, its optimiser, data stream and run directory."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = self.pick_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0
        self.dtype = DTYPES[args.dtype] if args.dtype != "auto" else \
            torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.out = args.out
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)

        files, captions = scan_folder(args.data, args.default_caption, warn=self.main)
        degradation = DEGRADATIONS[args.degradation]
        if args.task == "repair":
            degradation = partial(degradation, mask_weight=args.mask_weight)
        self.check_resolution()
        self.data = Crops(files, captions, args.resolution, degradation, args.caption_dropout)
        self.order = Order(len(files), args.seed, self.rank, self.world)

        self.model = self.build_model()
        self.vae = self.model.first_stage_model
        self.preview = self.preview_setup() if args.preview_every > 0 and self.main else None
        self.text_cache = self.setup_text(captions)
        torch.manual_seed(args.seed)  # the same initial A on every rank
        lora.inject_lora(self.model.model.diffusion_model, "default", args.lora_rank, args.lora_alpha,
                         TARGETS[args.lora_targets], args.lora_dropout, dtype=torch.float32)
        self.params = lora.lora_parameters(self.model)
        for p in self.params:
            p.requires_grad_(True)
        self.model.model.gradient_checkpointing = args.gradient_checkpointing
        self.denoiser = Denoiser(self.model.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)
        self.ema = [p.detach().clone() for p in self.params] if args.ema > 0 else None
        self.latent_cache = self.cache_latents() if args.cache_latents else None

        torch.manual_seed(mix(args.seed, 4, self.rank))  # LoRA dropout differs per rank
        self.noise = torch.Generator().manual_seed(mix(args.seed, 5, self.rank))  # posterior, sigma, noise draws
        self.step, self.position, self.log = 0, 0, []
        if args.resume is not None:
            self.load_checkpoint(Path(args.resume) if args.resume else self.out / "checkpoint.pt")
        self.stop = False

    # -- setup -------------------------------------------------------------------------------------------

    def pick_device(self) -> torch.device:
        if self.args.device != "auto":
            return torch.device(self.args.device)
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if self.world > 1 else "cuda")

    def check_resolution(self):
        cfg = supir.PRESETS[self.args.model]
        multiple = cfg.vae.downsample_factor * 2 ** (len(cfg.unet.channel_mult) - 1)  # latent must halve per level
        scale = getattr(degrade.SETTINGS.get(self.args.degradation), "scale", 1)
        if self.args.resolution % multiple or self.args.resolution % scale:
            raise SystemExit(f"error: --resolution must be a multiple of {multiple} and of the degradation's scale {scale}")

    def build_model(self) -> supir.SUPIR:
        a = self.args
        cfg = supir.PRESETS[a.model]
        if a.model != "sdxl" and a.sdxl is None and a.supir is None:
            # the seeded random model of `sample.py --model tiny` (pipeline.Restorer.random): built on the
            # CPU, so every rank and device starts from the same weights
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = supir.build(cfg, "cpu")
        elif a.model != "sdxl" and (a.sdxl is None or a.supir is None):
            raise SystemExit("error: --model tiny / medium with weight files needs both --sdxl and --supir")
        else:  # cast while reading: host RAM holds one copy at the training precision
            model = supir.load(cfg, a.sdxl or "sdxl", a.supir or "Q",
                               {p: self.dtype for p in ("model.", "conditioner.", "first_stage_model.")})
        return model.to(self.device, self.dtype).eval().requires_grad_(False)

    def setup_text(self, captions: list[str]) -> dict | None:
        """Text encoders on the device for the run, or (--cache-text) every caption encoded once and the
        encoders dropped."""
        conditioner = self.model.conditioner.to(self.device)
        if not self.args.cache_text:
            return None
        texts = sorted(set(captions) | {""})
        cache = {}
        for i in range(0, len(texts), 16):
            out = conditioner.encode(texts[i:i + 16])
            cache.update({t: {k: v[j:j + 1] for k, v in out.items()} for j, t in enumerate(texts[i:i + 16])})
        if self.preview is not None:  # the preview prompts are cached in its restorer
            self.preview["restorer"].free_text_encoders()
        self.model.conditioner = None  # 0.8 B parameters for SDXL
        return cache

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict:
        if self.text_cache is not None:
            return {k: torch.cat([self.text_cache[c][k] for c in captions]) for k in ("crossattn", "vector")}
        return self.model.conditioner.encode(captions)

    @torch.no_grad()
    def encode_images(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 = HQ posterior sample, _z = denoise-encoder mode of the LQ, weight pooled to the latent grid)."""
        hq, lq = (batch[k].to(self.device) * 2 - 1 for k in ("hq", "lq"))
        x0 = self.vae.encode(hq, sample=True, generator=generator).float()
        z_lq = self.vae.encode(lq, denoise=True).float()
        weight = F.adaptive_avg_pool2d(batch["weight"].to(self.device).float(), x0.shape[-2:])
        return x0, z_lq, weight

    def cache_latents(self) -> dict[int, tuple[torch.Tensor, ...]]:
        """One crop + degradation + encoding per image (seed fixed per image), one image at a time so the
        numbers do not depend on batching; kept on the device."""
        cache = {}
        for index in tqdm(range(len(self.data)), desc="caching latents", disable=not self.main or None):
            seed = mix(self.args.seed, 2, index)
            item = collate([self.data[index, seed]])
            cache[index] = self.encode_images(item, torch.Generator().manual_seed(seed))
        return cache

    def preview_setup(self) -> dict | None:
        """The fixed validation pair (centre crop of the image, degraded with seed --seed), its prompts
        encoded, and a restorer over the training model (made before the LoRA is injected: it casts the
        model to one dtype, which must not touch the float32 adapters)."""
        if pipeline is None:
            warnings.warn(f"previews off: the restoration pipeline does not import ({PIPELINE_ERROR})")
            return None
        path = self.args.preview_image or self.data.files[0]
        img = degrade.load_image(path)
        r = self.args.resolution
        if min(img.shape[-2:]) < r:
            s = r / min(img.shape[-2:])
            img = degrade.resize(img, (max(r, round(img.shape[-2] * s)), max(r, round(img.shape[-1] * s)))).clamp(0, 1)
        top, left = (img.shape[-2] - r) // 2, (img.shape[-1] - r) // 2
        hq = img[..., top:top + r, left:left + r]
        generator = torch.Generator().manual_seed(self.args.seed)
        mask = None
        if self.args.task == "repair":  # the damaged crop and its known mask, repaired as sample.py --mask does
            lq, hole = degrade.damage(hq, self.args.degradation, generator=generator)
            mask = repair.soft_mask(hole[0, 0])
        else:
            lq, _ = DEGRADATIONS[self.args.degradation](hq, generator)
        caption = path.with_suffix(".txt").read_text().strip() if path.with_suffix(".txt").exists() else self.args.default_caption
        # the LQ is given at the HQ size, as in training; SUPIR's Quality settings with few steps
        settings = replace(presets.QUALITY, steps=self.args.preview_steps, min_size=0, prompt=caption)
        restorer = pipeline.Restorer(self.model, self.device, self.dtype, self.dtype)
        restorer.encode_prompts([settings.positive_text, settings.negative])
        to_pil = lambda x: Image.fromarray(degrade.to_uint8(x)[0])  # noqa: E731
        (self.out / "previews").mkdir(exist_ok=True)
        return {"hq": to_pil(hq), "lq": to_pil(lq), "mask": mask, "settings": settings, "restorer": restorer}

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self):
        rng = gather(rng_state(self.noise), self.world)  # every rank's generators, for an exact resume
        if not self.main:
            return
        state = {"step": self.step, "position": self.position, "world": self.world,
                 "lora": [p.detach().cpu() for p in self.params], "optimizer": self.optimizer.state_dict(),
                 "ema": None if self.ema is None else [e.cpu() for e in self.ema], "rng": rng,
                 "settings": self.settings()}
        atomic(self.out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, path: Path):
        if not path.exists():
            raise SystemExit(f"error: no checkpoint to resume at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["world"] != self.world:
            raise SystemExit(f"error: {path} was written by {state['world']} processes, this run has {self.world}")
        changed = {k: (v, self.settings()[k]) for k, v in state["settings"].items()
                   if k not in ("resume", "max_steps", "save_every", "preview_every", "out") and self.settings().get(k) != v}
        if changed and self.main:
            warnings.warn(f"resuming with changed settings (old, new): {changed}")
        with torch.no_grad():
            for p, v in zip(self.params, state["lora"], strict=True):
                p.copy_(v)
            if self.ema is not None and state["ema"] is not None:
                for e, v in zip(self.ema, state["ema"], strict=True):
                    e.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][self.rank], self.noise)
        self.step, self.position = state["step"], state["position"]
        if self.main:  # rows logged after the checkpoint by the interrupted run are redone
            self.log = read_log(self.out / "train_log.csv", upto=self.step)
            write_log(self.out / "train_log.csv", self.log)

    def settings(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()}

    def swap_ema(self):
        """Exchange the live LoRA weights with the EMA ones (twice restores)."""
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(self.params, self.ema):
                    tmp = p.detach().clone()
                    p.copy_(e)
                    e.copy_(tmp)

    def save_lora(self):
        a = self.args
        meta = {"ss_learning_rate": str(a.lr), "ss_max_train_steps": str(a.max_steps), "ss_steps": str(self.step),
                "ss_num_train_images": str(len(self.data)), "ss_resolution": f"({a.resolution}, {a.resolution})",
                "ss_batch_size_per_device": str(a.batch_size), "ss_gradient_accumulation_steps": str(a.grad_accum),
                "ss_seed": str(a.seed), "ss_training_comment": f"mini_supir train.py, {a.task} ({a.degradation})",
                "mini_supir.training": json.dumps({**self.settings(), "world_size": self.world, "steps_done": self.step,
                                                   "ema_weights": self.ema is not None})}
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.save_precision]
        self.swap_ema()
        atomic(self.out / "lora.safetensors", lambda tmp: lora_files.save_lora(self.model, tmp, "default", meta, dtype))
        self.swap_ema()

    @torch.no_grad()
    def write_preview(self):
        self.swap_ema()
        self.model.eval()
        try:
            p = self.preview
            restored = p["restorer"].restore(p["lq"], p["settings"], seed=self.args.seed, mask=p["mask"])
        finally:
            self.model.train()
            self.swap_ema()
        panel = Image.new("RGB", (3 * restored.width, restored.height))
        for i, im in enumerate((self.preview["lq"], restored, self.preview["hq"])):
            panel.paste(im.resize(restored.size), (i * restored.width, 0))
        atomic(self.out / "previews" / f"step_{self.step:06d}.png", lambda tmp: panel.save(tmp, format="PNG"))

    # -- the loop --------------------------------------------------------------------------------------------

    def micro_batches(self):
        keys = self.order.batches(self.position, self.args.batch_size)
        if self.latent_cache is not None:
            for batch in keys:
                items = [self.data.captions[i] for i, _ in batch]
                drop = [torch.rand((), generator=torch.Generator().manual_seed(s)).item() < self.args.caption_dropout
                        for _, s in batch]
                x0, z, w = (torch.cat(t) for t in zip(*(self.latent_cache[i] for i, _ in batch)))
                yield {"latents": (x0, z, w), "caption": ["" if d else c for d, c in zip(drop, items)]}
            return
        yield from torch.utils.data.DataLoader(self.data, batch_sampler=keys, num_workers=self.args.workers,
                                               collate_fn=collate)

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean training loss of one micro-batch (all draws from the run's noise generator, on the CPU)."""
        if "latents" in batch:
            x0, z_lq, weight = batch["latents"]
        else:
            x0, z_lq, weight = self.encode_images(batch, self.noise)
        cond = {**self.encode_text(batch["caption"]), "control": z_lq}
        sigmas = sample_sigmas(x0.shape[0], self.args, self.noise).to(self.device)
        noise = torch.randn(x0.shape, generator=self.noise).to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == torch.bfloat16 else nullcontext()
        with autocast:
            return training_loss(self.denoiser, x0, cond, sigmas, noise, weight).mean()

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def train_step(self, batches) -> dict:
        a = self.args
        lr = learning_rate(self.step, a)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for _ in range(a.grad_accum):
            loss = self.forward(next(batches))
            self.position += a.batch_size
            (loss / a.grad_accum).backward()
            total += loss.detach() / a.grad_accum
        penalty = torch.zeros(())
        if a.frobenius > 0:
            penalty = a.frobenius * frobenius(self.params)
            penalty.backward()
        if self.world > 1:
            # Only the LoRA gradients (a few MB) need averaging: one all-reduce of them all, no DDP wrapper
            # (which would also broadcast the frozen 3.8 B weights and hook every one of them).
            flat = self.all_mean(torch.cat([p.grad.flatten() for p in self.params]))
            for p, g in zip(self.params, flat.split([p.numel() for p in self.params])):
                p.grad.copy_(g.view_as(p))
        norm = optimizer_step(self.params, self.optimizer, self.ema, a.max_grad_norm, a.ema)
        self.step += 1
        return {"loss": self.all_mean(total).item(), "penalty": penalty.item(), "lr": lr, "grad_norm": norm.item()}

    def request_stop(self, signum, frame):
        self.stop = True  # finish the step, save, exit; a second signal kills as usual
        signal.signal(signum, signal.SIG_DFL)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self.loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def loop(self) -> int:
        a = self.args
        self.model.train()
        if self.preview is not None and self.step == 0:
            self.write_preview()
        batches = self.micro_batches()
        t0 = time.time()
        bar = tqdm(total=a.max_steps, initial=self.step, desc="train", unit="step", disable=not self.main or None,
                   dynamic_ncols=True)
        while self.step < a.max_steps:
            info = self.train_step(batches)
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}")
            if self.main:
                self.log.append({"step": self.step, "epoch": self.order[self.position - 1][2],
                                 **{k: f"{v:.6g}" for k, v in info.items()}, "seconds": f"{time.time() - t0:.2f}"})
            if not math.isfinite(info["loss"]):
                raise SystemExit(f"error: loss is {info['loss']} at step {self.step}")
            stop = torch.tensor(float(self.stop), device=self.device)
            if self.world > 1:
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # one rank interrupted: all save and stop together
            last = self.step == a.max_steps or stop.item() > 0
            if self.step % a.save_every == 0 or last:
                self.write_outputs()
            if self.preview is not None and (self.step % a.preview_every == 0 or last):
                self.write_preview()
            if stop.item() > 0:
                bar.close()
                print(f"stopped at step {self.step}: checkpoint saved, continue with --resume", file=sys.stderr)
                return 130
        bar.close()
        if self.main:
            self.save_lora()
        return 0

    def write_outputs(self):
        self.save_checkpoint()
        if self.main:
            write_log(self.out / "train_log.csv", self.log)
            plot_loss(self.out / "loss_curve.png", [int(r["step"]) for r in self.log], [float(r["loss"]) for r in self.log])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if stage1_train.wants(argv):  # a stage-1 restorer: its own, much smaller trainer and options
        return stage1_train.main(argv)
    args = parse_args(argv)
    try:
        trainer = Trainer(args)
    except DataError as e:
        print(f"error: --data: {e}", file=sys.stderr)
        return 2
    try:
        return trainer.run()
    finally:
        if trainer.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
