"""LoRA fine-tuning of a stage-1 restorer (esrgan.py: Real-ESRGAN x4plus, ...) on a known degradation;
`python train.py --model realesrgan-x4plus ...` runs it (train.py dispatches here before its own parser).

    python train.py --model realesrgan-x4plus --data photos/ --val-data held_out/ --degradation sr4-blur2 \\
        --lora-rank 16 --max-steps 300 --out runs/x4plus-blur2

Each step: random HR crops (with flips) from --data, degraded online to LR (degrade.py's named setting, seeded
per item), the network with LoRA adapters on its convolutions run on the LR, and L1 between its output and
the HR crop. L1 is what PSNR-oriented fine-tuning of these networks uses (Real-ESRNet, the PSNR stage of
Real-ESRGAN, and ESRGAN's PSNR pre-training): it is less swayed than L2 by the rare large errors at edges and
gives sharper results; --loss charbonnier is its smooth-at-zero variant (as in EDVR / SwinIR's fine-tuning).
The pretrained weights stay frozen; only the adapters train.

Every --val-every steps the held-out --val-data images (centre crops, degraded with fixed seeds; never trained
on) are restored with the adapters (the EMA ones with --ema) and scored against the base network and bicubic:
PSNR / SSIM on the Y channel with 4 px borders cropped (the usual SR convention), NIQE on the whole output.
--out gets train_log.csv, val_log.csv, loss_curve.png, previews/ (bicubic | base | LoRA | HR), checkpoint.pt
(--resume repeats an uninterrupted run bit for bit), lora.safetensors (kohya format, `lora_stage1_` keys,
metadata naming the base model) and summary.json (the numbers of the run).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from . import cli, degrade, esrgan, images, lora, metrics, stage1
from .devices import DTYPES, PeakMemory
from .niqe import niqe
from .train_data import Crops, DataError, Order, centre_crop, collate, load_image, mix, scan_folder
from .train_run import OptionError, Progress, RunFolder, StopSignal, TrainingError, option_problems, run
from .train_state import (Adapters, check_resume, kohya_metadata, read_checkpoint, save_checkpoint, settings,
                          write_lora)
from .train_utils import learning_rate, plot_loss, read_log, write_log
from .weights import CheckpointError

# Adapter targets on RRDBNet (BasicSR names). "dense": the 345 convs of the RRDB trunk's dense blocks, the bulk
# of the network; "upsampler": the four convs after the trunk, which turn features into pixels at 2x / 4x.
TARGETS = {"all": ("conv*",), "dense": ("rdb*.conv*",), "upsampler": ("conv_up1", "conv_up2", "conv_hr", "conv_last")}
SRVGG_TARGETS = {"all": ("body.*",)}  # a plain conv stack: no trunk / upsampler split
SETTINGS = sorted(n for n, s in degrade.SETTINGS.items() if isinstance(s, degrade.Setting) and s.scale > 1)
VAL_FIELDS = ["step", "model", "psnr", "ssim", "niqe"]
CROP_BORDER = 4  # px cropped from each side for PSNR / SSIM (BasicSR's crop_border = scale)
FIXED = ("model", "lora_rank", "lora_targets")  # see train.py
FREE = ("resume", "max_steps", "save_every", "val_every", "out")


def wants(argv: list[str]) -> bool:
    """Whether train.py's arguments ask for a stage-1 model (a registry name after --model)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--model" and i + 1 < len(argv) else arg[8:] if arg.startswith("--model=") else None
        if value is not None:
            return value in stage1.REGISTRY
    return False


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="train.py", description="Train a LoRA on a stage-1 restorer.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(stage1.REGISTRY), help="the pretrained restorer")
    p.add_argument("--data", required=True, type=Path, help="folder of HR training images")
    p.add_argument("--val-data", type=Path, help="folder of held-out HR images (none of them in --data)")
    p.add_argument("--degradation", choices=SETTINGS, default="sr4-blur2", help="online degradation (degrade.py)")
    p.add_argument("--resolution", type=cli.number(int, 1, 2048), default=96,
                   help="HR crop side, px (the LR crop is this / scale)")
    p.add_argument("--val-size", type=cli.number(int, 192, 2048), default=192,
                   help="HR centre crop of each validation image, px (NIQE needs two 96 px blocks)")
    p.add_argument("--lora-rank", type=cli.count, default=16)
    p.add_argument("--lora-alpha", type=cli.positive, help="default: the rank (adapter multiplier 1)")
    p.add_argument("--lora-targets", choices=sorted(TARGETS), default="all",
                   help="all convs, the dense-block convs of the trunk, or the upsampler's convs")
    p.add_argument("--loss", choices=["l1", "charbonnier"], default="l1")
    p.add_argument("--lr", type=cli.positive, default=2e-4)
    p.add_argument("--min-lr", type=cli.non_negative, default=0.0, help="cosine schedule floor")
    p.add_argument("--warmup-steps", type=cli.number(int, 0), default=20)
    p.add_argument("--weight-decay", type=cli.non_negative, default=1e-2)
    p.add_argument("--max-grad-norm", type=cli.non_negative, default=1.0, help="0: no clipping")
    p.add_argument("--batch-size", type=cli.count, default=2)
    p.add_argument("--grad-accum", type=cli.count, default=1, help="micro-batches per optimiser step")
    p.add_argument("--max-steps", type=cli.count, default=300)
    p.add_argument("--ema", type=cli.number(float, 0, 1), default=0.0, help="EMA decay of the adapters (e.g. 0.99); 0: off")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (adapters stay fp32)")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/stage1-lora"))
    p.add_argument("--save-every", type=cli.count, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--val-every", type=cli.count, default=50, help="validate every N steps (and at the start and end)")
    p.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], default="fp16", help="of lora.safetensors")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: <out>/checkpoint.pt)")
    args = p.parse_args(argv)
    args.lora_alpha = args.lora_rank if args.lora_alpha is None else args.lora_alpha
    scale = degrade.SETTINGS[args.degradation].scale
    problems = option_problems([
        ("resolution", args.resolution >= 8 * scale and args.resolution % scale == 0,
         f"a multiple of the degradation's scale {scale}, at least {8 * scale}"),
        ("val-size", args.val_size % scale == 0, f"a multiple of {scale}"),
        ("min-lr", args.min_lr <= args.lr, "at most --lr"), ("ema", args.ema < 1, "below 1"),
        ("out", args.out.resolve() not in {args.data.resolve(), (args.val_data or args.data).resolve()},
         "another folder than --data and --val-data")])
    if problems:
        p.error("; ".join(problems))
    return args


def lr_pair(hq: torch.Tensor, generator: torch.Generator, setting: str) -> tuple[torch.Tensor, None]:
    return degrade.degrade(hq, setting, generator=generator), None  # the LR at its own size: the net upsamples


def pixel_loss(out: torch.Tensor, hq: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "charbonnier":
        return torch.sqrt((out - hq) ** 2 + 1e-6).mean()  # eps 1e-3, as BasicSR's CharbonnierLoss
    return (out - hq).abs().mean()


class Stage1Trainer:
    """A frozen stage-1 network with trainable LoRA adapters, its optimiser, data stream and validation pairs."""

    def __init__(self, args):
        self.args, self.out = args, args.out
        try:
            self.net = stage1.load_network(args.model)[0]
        except CheckpointError as e:
            raise CheckpointError(f"--model {args.model}: {e}") from None
        setting = degrade.SETTINGS[args.degradation]
        if setting.scale != self.net.scale:
            raise OptionError(f"--degradation {args.degradation} is x{setting.scale}, {args.model} upscales x{self.net.scale}")
        targets = (TARGETS if isinstance(self.net, esrgan.RRDBNet) else SRVGG_TARGETS).get(args.lora_targets)
        if targets is None:
            raise OptionError(f"--lora-targets {args.lora_targets} is for RRDBNet; {args.model} takes: all")
        files, _, sizes = scan_folder(args.data, "", warn=True)
        val_files = scan_folder(args.val_data, "", warn=True)[0] if args.val_data else []
        shared = sorted({f.name for f in files} & {f.name for f in val_files})
        if shared:
            raise DataError(f"validation images are also training images: {', '.join(shared)}")
        self.data = Crops(files, [""] * len(files), args.resolution, partial(lr_pair, setting=args.degradation), 0.0,
                          flip=True, sizes=sizes)
        self.order = Order(len(files), args.seed, 0, 1)
        self.val = [self.val_pair(f, i) for i, f in enumerate(val_files)]
        torch.manual_seed(args.seed)  # the adapters' initial A
        self.paths = lora.inject_lora(self.net, "default", args.lora_rank, args.lora_alpha, targets, dtype=torch.float32)
        self.adapters = Adapters(self.net, args.lr, args.weight_decay, args.ema)
        self.step, self.position, self.log, self.val_log, self.seconds = 0, 0, [], [], 0.0

    def val_pair(self, path: Path, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(HR centre crop, its LR) of a validation image; the degradation's seed is fixed per image."""
        try:
            img = load_image(path)
        except images.ImageError as e:
            raise DataError(f"validation image {path.name}: {e}") from None
        r = self.args.val_size
        if min(img.shape[-2:]) < r:
            raise DataError(f"validation image {path.name} is {img.shape[-1]}x{img.shape[-2]}: under --val-size {r}")
        hq = centre_crop(img, r)
        return hq, degrade.degrade(hq, self.args.degradation, generator=torch.Generator().manual_seed(mix(self.args.seed, 6, index)))

    # -- training ----------------------------------------------------------------------------------------

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.args.dtype == "bf16" else nullcontext()

    def train_step(self, batches) -> dict:
        a = self.args
        total = 0.0
        for _ in range(a.grad_accum):
            batch = next(batches)
            with self.autocast():
                out = self.net(batch["lq"])
            loss = pixel_loss(out.float(), batch["hq"], a.loss)
            (loss / a.grad_accum).backward()
            total += loss.item() / a.grad_accum
            self.position += a.batch_size
        lr = learning_rate(self.step, a.lr, a.max_steps, a.warmup_steps, a.min_lr)
        norm = self.adapters.step(lr, a.max_grad_norm)
        self.step += 1
        return {"loss": total, "penalty": 0.0, "lr": lr, "grad_norm": norm.item()}

    def run(self) -> int:
        """Train to --max-steps (0), or until SIGINT / SIGTERM, saving a checkpoint first (130)."""
        a = self.args
        self.net.train()
        self.progress = Progress(a.max_steps, self.step)
        if self.val:
            rows = self.baselines()  # on a resume only for the previews: their rows are in the log
            if not self.val_log:
                self.val_log += rows
                self.validate()
        batches = iter(torch.utils.data.DataLoader(self.data, batch_sampler=self.order.batches(self.position, a.batch_size),
                                                   collate_fn=collate))
        t0 = time.time() - self.seconds
        with StopSignal() as stop:
            while self.step < a.max_steps:
                info = self.train_step(batches)
                self.seconds = time.time() - t0
                self.progress.update(self.step, info["loss"], info["lr"])
                self.log.append({"step": self.step, "epoch": self.order[self.position - 1][2],
                                 **{k: f"{v:.6g}" for k, v in info.items()}, "seconds": f"{self.seconds:.2f}"})
                if not math.isfinite(info["loss"]):
                    raise TrainingError(f"the loss is {info['loss']} at step {self.step} (try a lower --lr)")
                last = self.step == a.max_steps or stop.requested
                if self.val and (self.step % a.val_every == 0 or last):
                    self.validate()
                if self.step % a.save_every == 0 or last:
                    self.write_outputs()
                if stop.requested:
                    self.progress.close()
                    self.progress.write(f"stopped at step {self.step}: checkpoint saved, continue with --resume")
                    return 130
        self.progress.close()
        self.save_lora()
        self.write_summary()
        return 0

    # -- validation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def restore_val(self) -> list[torch.Tensor]:
        was = self.net.training
        self.net.eval()
        try:
            with self.autocast():
                return [images.quantize(self.net(lq).float().clamp(0, 1)) for _, lq in self.val]
        finally:
            self.net.train(was)

    def score(self, outputs: list[torch.Tensor], model: str) -> dict:
        rows = [(metrics.psnr(o, hq, CROP_BORDER, y_channel=True).item(), metrics.ssim(o, hq, CROP_BORDER, y_channel=True).item(),
                 niqe(images.to_uint8(o)[0])) for o, (hq, _) in zip(outputs, self.val)]
        mean = [sum(col) / len(col) for col in zip(*rows)]
        return {"step": self.step, "model": model, **{k: f"{v:.4f}" for k, v in zip(("psnr", "ssim", "niqe"), mean)}}

    def baselines(self) -> list[dict]:
        """Bicubic and the base network (the adapters at scale 0) on the validation pairs: their scores, and
        their outputs kept for the previews."""
        size = self.val[0][0].shape[-2:]
        self.bicubic = [images.quantize(degrade.upsample(lq, size).clamp(0, 1)) for _, lq in self.val]
        lora.set_lora_scale(self.net, "default", 0.0)
        self.base = self.restore_val()
        lora.set_lora_scale(self.net, "default", 1.0)
        return [self.score(self.bicubic, "bicubic"), self.score(self.base, "base")]

    def validate(self) -> None:
        """Score the adapters (the EMA ones with --ema) on the held-out pairs, and a preview."""
        with self.adapters.ema_weights():
            outputs = self.restore_val()
        row = self.score(outputs, "lora")
        self.val_log.append(row)
        self.progress.write(f"step {self.step}: validation PSNR {row['psnr']} SSIM {row['ssim']} NIQE {row['niqe']}")
        self.write_preview(outputs[0])

    def write_preview(self, restored: torch.Tensor) -> None:
        panel = torch.cat([self.bicubic[0], self.base[0], restored, self.val[0][0]], dim=-1)
        (self.out / "previews").mkdir(exist_ok=True)
        image = Image.fromarray(images.to_uint8(panel)[0])
        images.atomic_write(self.out / "previews" / f"step_{self.step:06d}.png", lambda tmp: image.save(tmp, format="PNG"))

    # -- files -------------------------------------------------------------------------------------------

    def write_outputs(self) -> None:
        save_checkpoint(self.out / "checkpoint.pt", {"step": self.step, "position": self.position, "seconds": self.seconds,
                                                     **self.adapters.state_dict(), "rng": torch.get_rng_state(),
                                                     "settings": settings(self.args)})
        write_log(self.out / "train_log.csv", self.log)
        write_log(self.out / "val_log.csv", self.val_log, VAL_FIELDS)
        plot_loss(self.out / "loss_curve.png", [int(r["step"]) for r in self.log], [float(r["loss"]) for r in self.log])

    def resume(self, path: Path) -> None:
        """Continue the run of the checkpoint at `path` (its options checked against these first)."""
        state = read_checkpoint(path)
        check_resume(path, state["settings"], settings(self.args), FIXED, FREE)
        self.adapters.load_state_dict(state, str(path))
        torch.set_rng_state(state["rng"])
        self.step, self.position, self.seconds = state["step"], state["position"], state.get("seconds", 0.0)
        # rows written after the checkpoint by the interrupted run are redone
        self.log = read_log(self.out / "train_log.csv", upto=self.step)
        self.val_log = read_log(self.out / "val_log.csv", upto=self.step)

    def save_lora(self) -> Path:
        a = self.args
        meta = kohya_metadata(a, self.step, len(self.data), f"mini_supir train.py, stage-1 {a.model} ({a.degradation})",
                              ema_weights=self.adapters.ema is not None)
        path = self.out / "lora.safetensors"
        write_lora(path, self.net, self.adapters, meta, DTYPES[a.save_precision], base_model=a.model)
        return path

    def write_summary(self) -> None:
        trainable = sum(p.numel() for p in self.adapters.params)
        base = sum(p.numel() for n, p in self.net.named_parameters() if ".lora." not in n)
        last = {r["model"]: {k: float(r[k]) for k in ("psnr", "ssim", "niqe")} for r in self.val_log}
        summary = {"model": self.args.model, "degradation": self.args.degradation, "steps": self.step,
                   "seconds": round(self.seconds, 1), "steps_per_s": round(self.step / max(self.seconds, 1e-9), 3),
                   "trainable_params": trainable, "base_params": base, "fraction": trainable / base,
                   "lora_file_bytes": (self.out / "lora.safetensors").stat().st_size,
                   "peak_memory_mb": round(PeakMemory(torch.device("cpu")).peak_mib()), "validation": last,
                   "val_images": [], "train_images": [f.name for f in self.data.files]}
        if self.args.val_data:
            summary["val_images"] = [f.name for f in scan_folder(self.args.val_data, "", warn=False)[0]]
        images.atomic_write(self.out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))


def train(args) -> int:
    """Options, data and network are checked before --out is made; the checkpoint before any step."""
    trainer = Stage1Trainer(args)
    folder = RunFolder(args.out, args.resume is not None)
    try:
        if args.resume is not None:
            trainer.resume(Path(args.resume) if args.resume else args.out / "checkpoint.pt")
        return trainer.run()
    finally:
        folder.close()


def main(argv=None) -> int:
    return run(lambda: train(parse_args(argv)))
