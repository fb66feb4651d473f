"""Device and precision policy, shared by every model family."""
from __future__ import annotations

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
