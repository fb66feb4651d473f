"""The command-line side of a training run, shared by train.py and stage1_train.py: one-line refusals with
the documented exit codes, option checks, the output folder (checked before any work, locked, cleaned of
a killed run's temporary files), progress on a terminal or in a log, stopping on SIGINT / SIGTERM, and
the processes of a torchrun launch.

Exit codes: 2 for a bad command line (option values, --data, --out, --preview-image, options the checkpoint
contradicts), 1 for weight or checkpoint files that are missing or unreadable and for a failed run,
130 for an interrupt.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import cli
from .cli import fail, one_line
from .devices import pick_device
from .outputs import check_writable
from .train_data import DataError
from .train_state import ResumeError
from .weights import CheckpointError, WeightsError

try:  # POSIX; elsewhere --out is not locked
    import fcntl
except ImportError:
    fcntl = None


class OptionError(ValueError):
    """An option value found wrong after parsing (exit 2)."""


class TrainingError(RuntimeError):
    """The run itself failed, e.g. a non-finite loss (exit 1)."""


def option_problems(rules: list[tuple[str, bool, str]]) -> list[str]:
    """What the types cannot check alone: each rule (option, ok, what it must be) that does not hold."""
    return [f"--{name} must be {what}" for name, ok, what in rules if not ok]


def run(main: Callable[[], int]) -> int:
    """`main()` with every refusal as one line on stderr and its exit code (see the module docstring);
    warnings and Ctrl-C outside the training loop as cli.run shows them."""
    def refusals() -> int:
        try:
            return main()
        except (OptionError, DataError, ResumeError) as e:
            fail(None, one_line(e))
            return 2
        except WeightsError as e:
            fail(*e.args)
            return 1
        except (CheckpointError, TrainingError) as e:
            fail(None, one_line(e))
            return 1
        except torch.cuda.OutOfMemoryError:
            fail(None, "out of GPU memory (try --gradient-checkpointing, --cache-text, a smaller --batch-size)")
            return 1

    return cli.run(refusals)


# ----------------------------------------------------------------------------------------------------------
# The output folder

# What atomic_write leaves behind when a run is killed mid-write: .NAME.RANDOM.tmp beside each output
# (and .NAME.PID.tmp from older versions).
STALE = re.compile(r"\.(checkpoint\.pt|lora\.safetensors|(train|val)_log\.csv|loss_curve\.png|summary\.json"
                   r"|step_\d+\.png)\.\w+\.tmp")


class RunFolder:
    """--out, checked for writing (outputs.check_writable) and made before any work, so a typo fails in a
    second, not at the first checkpoint; locked while the run lasts, so two runs cannot write into one folder; cleared of the
    temporary files a killed run left. Without `resume`, a folder that holds a run is refused (its checkpoint
    would be overwritten). `close` removes the folders it made that stayed empty."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.created, self.lock = path, [], None
        if path.exists() and not path.is_dir():
            raise OptionError(f"--out {path} is a file, not a folder")
        if not resume and (path / "checkpoint.pt").exists():
            raise OptionError(f"--out {path} holds a run (checkpoint.pt): continue it with --resume, or choose "
                              "another --out")
        self.created = [p for p in (path, *path.parents) if not p.exists()][::-1]
        try:
            check_writable(path)
            path.mkdir(parents=True, exist_ok=True)
            self.lock = os.open(path, os.O_RDONLY) if fcntl is not None else None
        except OSError as e:
            self.close()
            raise OptionError(f"--out {path}: cannot write there ({e.strerror or type(e).__name__})") from None
        try:
            if self.lock is not None:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise OptionError(f"--out {path}: another training run is writing there") from None
        for folder in (path, path / "previews"):
            for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
                if STALE.fullmatch(stale.name):
                    stale.unlink(missing_ok=True)

    def close(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote something
                break


# ----------------------------------------------------------------------------------------------------------
# Progress and stopping

PROGRESS_EVERY = 10.0  # seconds between progress lines off a terminal


class Progress:
    """A tqdm bar on a terminal. Elsewhere (a log file, a scheduler) plain lines on stderr instead, at the
    first and last step and every PROGRESS_EVERY seconds: step, loss, lr, it/s."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.total, self.first, self.enabled = total, initial + 1, enabled
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True) \
            if enabled and sys.stderr.isatty() else None
        self.since, self.since_step = time.time(), initial

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            return
        now = time.time()
        if self.enabled and (step in (self.first, self.total) or now - self.since >= PROGRESS_EVERY):
            rate = (step - self.since_step) / max(now - self.since, 1e-9)
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} it/s", file=sys.stderr, flush=True)
            self.since, self.since_step = now, step

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopSignal:
    """While the block runs, SIGINT / SIGTERM (what schedulers send on pre-emption) only set `requested`: the
    loop finishes its step, saves and exits. A second signal kills as usual."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker_init_fn: the terminal's Ctrl-C reaches the workers too, and a worker that dies of it
    would break the step the main process is finishing (the workers end with their parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------------------
# Processes (torchrun)


@dataclass
class Processes:
    """This process's place in a torchrun launch (rank 0 alone writes files) and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        out = [obj] if self.world == 1 else [None] * self.world
        if self.world > 1:
            dist.all_gather_object(out, obj)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def any(self, flag: bool) -> bool:
        t = torch.tensor(float(flag), device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # one rank interrupted: all save and stop together
        return t.item() > 0


def start_processes(device: str) -> Processes:
    """This process under torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or alone; `device` as --device (checked by
    cli.device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = pick_device(device)
    if device == "auto" and world > 1 and dev.type == "cuda":
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Processes(rank, world, dev)
