"""What train.py is built from: online degradation, the image-folder dataset and its per-rank order, SUPIR's
training objective, and the run's files (atomic writes, CSV log, loss-curve PNG, RNG states).

Every random choice is a pure function of seeds (a data item of its file and item seed, the file order of the
run seed and the epoch) or comes from generators whose states a checkpoint stores, so a resumed run repeats an
uninterrupted one bit for bit.
"""
from __future__ import annotations

import csv
import math
import os
import random
import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import charts
from . import degrade, repair
from .sampler import Denoiser, denoiser_sigmas


class DataError(ValueError):
    """A data folder we cannot train on (one line, for the CLI)."""


# ----------------------------------------------------------------------------------------------------------
# Degradations: HQ crop (1, 3, R, R) in [0, 1] + a generator -> (LQ at the HQ size, per-pixel loss weight
# (1, 1, R, R) or None)

Degradation = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]


def restoration_pair(hq: torch.Tensor, generator: torch.Generator, setting: str) -> tuple[torch.Tensor, None]:
    # SUPIR feeds the LQ image upsampled back to the HQ size to its denoise encoder.
    return degrade.upsample(degrade.degrade(hq, setting, generator=generator), hq.shape[-2:]), None


# Repair loss weight 1 + k * mask. Outside the mask the repair sampler discards the model's estimate (it keeps
# the input's latent there), so the damaged pixels are what a repair LoRA must learn; k = 9 weighs them 10x,
# which makes them the larger part of the loss at a few percent damaged pixels, while the weight 1 elsewhere
# keeps the LoRA an ordinary restorer of the surroundings it is conditioned on.
MASK_WEIGHT = 9.0


def repair_pair(hq: torch.Tensor, generator: torch.Generator, setting: str,
                mask_weight: float = MASK_WEIGHT) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic damage, prefilled where the repair pipeline prefills (feathered mask >= repair.HOLE), so the
    control sees in training what it sees when repairing; the loss weight is 1 + k * feathered mask."""
    damaged, hole = degrade.damage(hq, setting, generator=generator)
    soft = torch.stack([repair.soft_mask(h[0]) for h in hole])[:, None]
    return repair.prefill(damaged, soft >= repair.HOLE), 1 + mask_weight * soft


REPAIR_DEGRADATIONS = tuple(name for name, s in degrade.SETTINGS.items() if isinstance(s, degrade.Damage))
DEGRADATIONS: dict[str, Degradation] = {
    name: partial(repair_pair if name in REPAIR_DEGRADATIONS else restoration_pair, setting=name)
    for name in degrade.SETTINGS}


# ----------------------------------------------------------------------------------------------------------
# Data


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def scan_folder(folder: Path, default_caption: str, warn: bool) -> tuple[list[Path], list[str]]:
    """(image files that open, their captions), sorted by name; the others are skipped with a warning."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    files, captions = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in degrade.IMAGE_SUFFIXES):
        try:
            with Image.open(path) as im:
                im.verify()  # headers and (PNG) checksums, without decoding: cheap for big folders
            text = path.with_suffix(".txt")
            captions.append(text.read_text(encoding="utf-8").strip() if text.exists() else default_caption)
            files.append(path)
        except Exception as e:  # PIL raises many kinds for broken files; one bad file must not end the run
            if warn:
                warnings.warn(f"skipping {path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if not files:
        raise DataError(f"no readable images ({', '.join(degrade.IMAGE_SUFFIXES)}) in {folder}")
    return files, captions


class Crops(torch.utils.data.Dataset):
    """Item (file index, seed) -> random HQ crop, its degraded LQ, loss weight and (possibly dropped) caption.
    Every random choice comes from the item's seed, so an item is the same in any worker, run or resume."""

    def __init__(self, files: list[Path], captions: list[str], resolution: int, degradation: Degradation,
                 caption_dropout: float, flip: bool = False):
        self.files, self.captions, self.resolution = files, captions, resolution
        self.degradation, self.caption_dropout, self.flip = degradation, caption_dropout, flip

    def __len__(self):
        return len(self.files)

    def load(self, index: int) -> tuple[int, torch.Tensor]:
        """The image, or the next one that decodes (files can break after the scan, e.g. truncated JPEGs)."""
        for k in range(len(self.files)):
            i = (index + k) % len(self.files)
            try:
                return i, degrade.load_image(self.files[i])
            except Exception as e:
                warnings.warn(f"skipping unreadable {self.files[i].name}: {type(e).__name__}: {e}")
        raise RuntimeError("no image in the data folder can be decoded any more")

    def crop(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        r = self.resolution
        h, w = img.shape[-2:]
        if min(h, w) < r:  # small images are scaled up to cover the crop
            s = r / min(h, w)
            img = degrade.resize(img, (max(r, round(h * s)), max(r, round(w * s)))).clamp(0, 1)
            h, w = img.shape[-2:]
        top = int(torch.randint(h - r + 1, (), generator=g))
        left = int(torch.randint(w - r + 1, (), generator=g))
        crop = img[..., top:top + r, left:left + r]
        if self.flip:  # drawn only when on, so runs without flips keep their crops
            dims = [d for d in (-1, -2) if torch.rand((), generator=g).item() < 0.5]  # horizontal, vertical
            crop = crop.flip(dims) if dims else crop
        return crop

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        g = torch.Generator().manual_seed(seed)
        drop = torch.rand((), generator=g).item() < self.caption_dropout
        index, img = self.load(index)
        hq = self.crop(img, g)
        lq, weight = self.degradation(hq, g)
        ones = torch.ones_like(hq[:, :1])
        return {"hq": hq[0], "lq": lq[0], "weight": (ones if weight is None else weight)[0],
                "caption": "" if drop else self.captions[index]}


def collate(items: list[dict]) -> dict:
    return {k: [it[k] for it in items] if k == "caption" else torch.stack([it[k] for it in items])
            for k in items[0]}


class Order:
    """The per-rank stream of (file index, item seed): every epoch a seeded permutation of the files, dealt
    round-robin to the ranks (each gets len // world files, the same number). Position = samples taken by this
    rank so far, the only state a resume needs."""

    def __init__(self, n: int, seed: int, rank: int, world: int):
        if n < world:
            raise DataError(f"{n} images cannot be shared among {world} processes")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.per_epoch = n // world

    def __getitem__(self, position: int) -> tuple[int, int, int]:
        """(file index, item seed, epoch) of the sample at `position`."""
        epoch, j = divmod(position, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix(self.seed, 1, epoch)))
        index = int(perm[self.rank + j * self.world])
        return index, mix(self.seed, 3, epoch, index), epoch

    def batches(self, start: int, batch_size: int):
        position = start
        while True:
            yield [self[p][:2] for p in range(position, position + batch_size)]
            position += batch_size


# ----------------------------------------------------------------------------------------------------------
# The objective


def sample_sigmas(n: int, args, generator: torch.Generator) -> torch.Tensor:
    """sgm's DiscreteSampling (uniform index into the 1000 training sigmas) or EDMSampling (lognormal)."""
    if args.sigma_sampling == "discrete":
        lo, hi = args.timestep_range
        return denoiser_sigmas()[torch.randint(lo, hi + 1, (n,), generator=generator)]
    return (args.p_mean + args.p_std * torch.randn(n, generator=generator)).exp()


def training_loss(denoiser: Denoiser, x0: torch.Tensor, cond: dict, sigmas: torch.Tensor, noise: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """Per-sample sgm StandardDiffusionLoss (l2) with EpsWeighting w = sigma^-2, optionally pixel-weighted."""
    s = sigmas.view(-1, 1, 1, 1)
    D = denoiser(x0 + noise * s, sigmas, cond)
    return (weight * s ** -2 * (D - x0) ** 2).flatten(1).mean(1)


def frobenius(params: list[torch.Tensor]) -> torch.Tensor:
    """sum ||A||_F^2 + ||B||_F^2 over the adapters: the paper's eq. 16 penalty, keeping the update small."""
    return sum(p.float().pow(2).sum() for p in params)


def optimizer_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, ema: list[torch.Tensor] | None,
                   max_grad_norm: float, decay: float) -> torch.Tensor:
    """Clip (max_grad_norm <= 0: no clipping, the norm is still measured), step, clear the gradients, and move
    the EMA copies towards the new weights; returns the gradient norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
    return norm


def learning_rate(step: int, args) -> float:
    """Linear warm-up to --lr, then cosine down to --min-lr at --max-steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------------------------------------
# Outputs: atomic files, log, loss curve, checkpoint


def atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create private files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


LOG_FIELDS = ["step", "epoch", "loss", "penalty", "lr", "grad_norm", "seconds"]


def read_log(path: Path, upto: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if upto is None or int(r["step"]) <= upto]


def write_log(path: Path, rows: list[dict], fields: list[str] = LOG_FIELDS) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            out = csv.DictWriter(f, fields)
            out.writeheader()
            out.writerows(rows)
    atomic(path, write)


def plot_loss(path: Path, steps: list[int], losses: list[float], size=(720, 400)) -> None:
    """Loss per step (grey) and its running mean (blue) on a log axis; steps whose loss is not finite are
    left out of both (charts.curve says how many)."""
    if len(losses) < 2:
        return
    smooth, avg = [], None
    for v in losses:
        if math.isfinite(v):
            avg = v if avg is None else 0.9 * avg + 0.1 * v
        smooth.append(avg if math.isfinite(v) else math.nan)
    last = next((v for v in reversed(smooth) if math.isfinite(v)), math.nan)
    charts.curve(path, steps, [(losses, "#aaaaaa", 1), (smooth, "#1e5ac8", 2)],
                 f"training loss (log scale): first {losses[0]:.4g}, last {losses[-1]:.4g}, running mean {last:.4g}",
                 "step", "loss", size, log=True)


def rng_state(noise: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(), "noise": noise.get_state()}


def set_rng_state(state: dict, noise: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    noise.set_state(state["noise"])
