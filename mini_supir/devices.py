"""Device and precision policy, shared by every model family, and the peak-memory meter every tool reports."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The named device, or for None / "auto" the best present: cuda, then mps, then cpu."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """A dtype from its short name (fp32, fp16, bf16); None or "auto" give `default`."""
    if dtype in (None, "auto"):
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, not {dtype!r}")
    return DTYPES[dtype]


class PeakMemory:
    """Peak memory of one call. On a GPU: the CUDA allocator's max_memory_allocated (weights included). On
    the CPU: the process's peak resident set (VmHWM), reset before each call through /proc/self/clear_refs;
    where that is not possible (not Linux), the peak since the process started ("rss-lifetime")."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else "rss"

    def reset(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "rss-lifetime"

    def peak_mib(self) -> float:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        if self.kind == "rss":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
