"""What a LoRA run trains and saves: the adapters with their AdamW state and EMA copies, the checkpoint file
(`--resume` reads it back and refuses one that does not fit), and the kohya-format LoRA at the end.
Shared by train.py (SUPIR's UNet) and stage1_train.py (the Real-ESRGAN networks)."""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import lora, lora_files
from .images import atomic_write
from .weights import CheckpointError

CHECKPOINT_KEYS = ("step", "position", "lora", "optimizer", "ema", "rng", "settings")


class ResumeError(ValueError):
    """A checkpoint that the options of this run contradict (one line: what to pass instead)."""


class Adapters:
    """The LoRA parameters of `model` (made trainable), their AdamW optimiser and, with `ema` > 0, an
    exponential moving average of them."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, ema: float = 0.0):
        self.params = lora.lora_parameters(model)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.decay = ema
        self.ema = [p.detach().clone() for p in self.params] if ema > 0 else None

    def step(self, lr: float, max_grad_norm: float) -> torch.Tensor:
        """Clip (max_grad_norm <= 0: no clipping, the norm is still measured), step at `lr`, clear the
        gradients and move the EMA towards the new weights; returns the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p.detach(), 1 - self.decay)
        return norm

    @contextmanager
    def ema_weights(self):
        """The EMA weights in the model while the block runs (previews, validation, the saved LoRA)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(self.params, self.ema):
                    tmp = p.detach().clone()
                    p.copy_(e)
                    e.copy_(tmp)

    def state_dict(self) -> dict:
        return {"lora": [p.detach().cpu() for p in self.params], "optimizer": self.optimizer.state_dict(),
                "ema": None if self.ema is None else [e.cpu() for e in self.ema]}

    def load_state_dict(self, state: dict, what: str) -> None:
        saved = [tuple(t.shape) for t in state["lora"]]
        if saved != [tuple(p.shape) for p in self.params]:
            raise CheckpointError(f"{what}: its {len(saved)} adapter tensors do not fit the {len(self.params)} of "
                                  "this model")
        with torch.no_grad():
            for p, v in zip(self.params, state["lora"]):
                p.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:  # a checkpoint without EMA: the average starts from its weights
            with torch.no_grad():
                for e, p, v in zip(self.ema, self.params, state["ema"] or self.params):
                    e.copy_(v)


# ----------------------------------------------------------------------------------------------------------
# The checkpoint file


def settings(args) -> dict:
    """The options of a run as plain values (paths as strings), as checkpoints and LoRA metadata keep them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by save_checkpoint, or one CheckpointError naming the file and the problem."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises many kinds, with long texts, for truncated / foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, or not from train.py: "
                              f"{type(e).__name__})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (no {', '.join(missing)})")
    return state


def check_resume(path: Path, saved: dict, current: dict, fixed: tuple[str, ...], free: tuple[str, ...]) -> dict:
    """Refuse (ResumeError) when an option in `fixed` (those that shape the adapters) differs from the
    checkpoint's; warn about the others that changed, except the `free` ones. Returns the changed ones."""
    wrong = [k for k in fixed if saved.get(k) != current.get(k)]
    if wrong:
        was = " ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in wrong)
        raise ResumeError(f"{path} was trained with {was}: resume with the same, or start afresh in another --out")
    changed = {k: (v, current.get(k)) for k, v in saved.items() if k not in free and current.get(k) != v}
    if changed:
        warnings.warn(f"resuming with changed settings (old, new): {changed}")
    return changed


# ----------------------------------------------------------------------------------------------------------
# The LoRA file


def kohya_metadata(args, steps: int, images: int, comment: str, **training) -> dict[str, str]:
    """kohya's `ss_*` training fields, and every option plus `training` as JSON under mini_supir.training."""
    return {"ss_learning_rate": str(args.lr), "ss_max_train_steps": str(args.max_steps), "ss_steps": str(steps),
            "ss_num_train_images": str(images), "ss_resolution": f"({args.resolution}, {args.resolution})",
            "ss_batch_size_per_device": str(args.batch_size), "ss_gradient_accumulation_steps": str(args.grad_accum),
            "ss_seed": str(args.seed), "ss_training_comment": comment,
            "mini_supir.training": json.dumps({**settings(args), **training, "steps_done": steps})}


def write_lora(path: Path, model: nn.Module, adapters: Adapters, metadata: dict, dtype: torch.dtype, **kw) -> None:
    """The adapters (their EMA weights with --ema) as a kohya LoRA file, written atomically."""
    with adapters.ema_weights():
        atomic_write(path, lambda tmp: lora_files.save_lora(model, tmp, "default", metadata, dtype, **kw))
