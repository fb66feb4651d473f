"""Reading the reference fixtures (see ../shared/reference/README.md) and comparing against them."""
import json
import os
import struct
import zlib
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file

REFERENCE = Path(os.environ.get("MINI_SUPIR_REFERENCE", Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"))
IMAGES = REFERENCE.parent / "images"  # the shared real photos beside the fixtures


def png_header(path: Path, w: int, h: int, colour_type: int = 2) -> Path:
    """A PNG whose header claims w x h pixels (RGB; colour_type 6: RGBA) and that holds almost no data: a
    decompression bomb's first bytes, which only a header-first size check survives."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


class Fixture:
    """One fixture directory: its config, weights, inputs (`in.` stripped) and outputs (`out.` stripped)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = json.loads((self.path / "config.json").read_text())
        self.kind = self.config["kind"]
        io = self.path / "io.safetensors"
        tensors = load_file(str(io)) if io.exists() else {}
        self.inputs = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
        self.outputs = {k[4:]: v for k, v in tensors.items() if k.startswith("out.")}
        self.errors: dict[str, float] = {}

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        source = self.path.parent / self.config["weights_from"] if "weights_from" in self.config else self.path
        return load_file(str(source / "weights.safetensors"))

    def tolerance(self, name: str) -> tuple[float, float]:
        tols = self.config.get("tolerances", {})
        tol = tols.get("out." + name) or tols.get(name)
        if tol is None:  # lpips_alex keys its tolerances by output family ("lpips", "layer")
            tol = next((t for k, t in tols.items() if any(part.startswith(k) for part in name.split("."))), None)
        if tol is None:  # the top-level atol/rtol are the loosest of the per-output ones
            assert "atol" in self.config or tols, f"{self.path.name}: no tolerance for {name}"
            return (self.config.get("atol", max(t["atol"] for t in tols.values())),
                    self.config.get("rtol", max(t["rtol"] for t in tols.values())))
        return tol["atol"], tol["rtol"]

    def check(self, name: str, ours: torch.Tensor):
        """Assert `ours` equals output `name` within its tolerance; remember the max abs error."""
        ref = self.outputs[name]
        ours = torch.as_tensor(ours).detach().cpu()
        assert ours.shape == ref.shape, f"{self.path.name}/{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
        atol, rtol = self.tolerance(name)
        if not ref.is_floating_point():
            assert torch.equal(ours.to(ref.dtype), ref), f"{self.path.name}/{name}: integer values differ"
            self.errors[name] = 0.0
            return
        ours, ref = ours.double(), ref.double()
        err = (ours - ref).abs()
        self.errors[name] = err.max().item() if err.numel() else 0.0
        bad = err > atol + rtol * ref.abs()
        assert not bad.any(), (f"{self.path.name}/{name}: {int(bad.sum())}/{bad.numel()} values off, "
                               f"max abs err {self.errors[name]:.3g} (atol {atol:g}, rtol {rtol:g})")

    def check_all(self, outputs: dict[str, torch.Tensor], prefix: str = ""):
        """Check every reference output starting with `prefix` against `outputs` (all must be present)."""
        names = [n for n in self.outputs if n.startswith(prefix)]
        missing = [n for n in names if n not in outputs]
        assert not missing, f"{self.path.name}: outputs not produced: {missing[:8]}"
        for n in names:
            self.check(n, outputs[n])

    def summary(self) -> str:
        if not self.errors:
            return f"{self.path.name}: nothing compared"
        worst = max(self.errors, key=self.errors.get)
        return f"{self.path.name}: {len(self.errors)} outputs, max abs err {self.errors[worst]:.3g} ({worst})"


CHECKS = {}  # fixture kind -> check function(Fixture); filled by the tests/parity_*.py modules
SUMMARIES: list[str] = []


def checks(*kinds: str):
    def register(fn):
        for kind in kinds:
            CHECKS[kind] = fn
        return fn
    return register
