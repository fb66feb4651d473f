"""What both trainers (train.py and stage1_train.py) are built from: SUPIR's training objective, the
optimiser step and learning-rate schedule, and the run's files (CSV log, loss-curve PNG, RNG states).
The data set and its order are in train_data.py.
"""
from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import torch

from . import charts
from .images import atomic_write
from .sampler import Denoiser, denoiser_sigmas


# ----------------------------------------------------------------------------------------------------------
# The objective


def sample_sigmas(n: int, generator: torch.Generator, sampling: str = "discrete",
                  timestep_range: tuple[int, int] = (0, 999), p_mean: float = -1.2, p_std: float = 1.2
                  ) -> torch.Tensor:
    """sgm's DiscreteSampling (uniform index in `timestep_range`, inclusive, into the 1000 training sigmas)
    or, for sampling "edm", EDMSampling (log sigma ~ N(p_mean, p_std^2))."""
    if sampling == "discrete":
        lo, hi = timestep_range
        return denoiser_sigmas()[torch.randint(lo, hi + 1, (n,), generator=generator)]
    return (p_mean + p_std * torch.randn(n, generator=generator)).exp()


def training_loss(denoiser: Denoiser, x0: torch.Tensor, cond: dict, sigmas: torch.Tensor, noise: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """Per-sample sgm StandardDiffusionLoss (l2) with EpsWeighting w = sigma^-2, optionally pixel-weighted."""
    s = sigmas.view(-1, 1, 1, 1)
    D = denoiser(x0 + noise * s, sigmas, cond)
    return (weight * s ** -2 * (D - x0) ** 2).flatten(1).mean(1)


def frobenius(params: list[torch.Tensor]) -> torch.Tensor:
    """sum ||A||_F^2 + ||B||_F^2 over the adapters: the paper's eq. 16 penalty, keeping the update small."""
    return sum(p.float().pow(2).sum() for p in params)


def learning_rate(step: int, lr: float, max_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine down to `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------------------------------------
# Outputs: log, loss curve, RNG states


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
    atomic_write(path, write)


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
