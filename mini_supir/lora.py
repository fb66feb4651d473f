"""LoRA (Hu et al. 2021): low-rank adapters for the UNet, the control model, the text towers and the stage-1
restorers; their file formats are in lora_files.py.

An adapted layer computes  y = W x + b + sum_k  s_k (alpha_k / r_k) B_k A_k x  with A_k (r_k, in) random and
B_k (out, r_k) zero, so a fresh adapter starts as the base model. `LoRALinear` / `LoRAConv2d` are the
nn.Linear / nn.Conv2d they replace, with the same `weight` / `bias` parameters (official checkpoints still
load with a plain `load_state_dict`) and a `lora` ModuleDict of named adapters. bigG's attention keeps q, k, v
in one fused `in_proj_weight` (open_clip's layout); `LoRAInProj` adapts it with a `FusedLoRAAdapter` of up to
three adapters, one per third, which is what kohya's and diffusers' te2 q_proj / k_proj / v_proj keys mean.
Adapters can be folded into W for inference (`merge_lora`) and taken out again bit-exactly (`unmerge_lora`).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .text import MultiheadSelfAttention

# Module-name patterns for `inject_lora`. A pattern matches a module whose dotted path equals it or ends
# with "." + pattern (fnmatch wildcards allowed). attn1/attn2 are the UNet transformer blocks' self- and
# cross-attention, which leaves the `attn` of SUPIR's ZeroCrossAttn connectors alone.
ATTENTION = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
PROJECTIONS = ("proj_in", "proj_out")
# kohya's SDXL default: every Linear in the transformers.
TRANSFORMER = ATTENTION + FEED_FORWARD + PROJECTIONS
# CLIP-L (HF names) and bigG (open_clip names; "attn.in_proj" = its fused q/k/v projection): what kohya's
# and diffusers' SDXL trainers adapt in both text encoders.
TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
        "attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


class LoRAFileError(ValueError):
    """A LoRA file that does not fit the model (keys that match nothing, wrong shapes, unknown formats)."""


# ---------------------------------------------------------------------------------------------------------
# the adapter and the adapted layers


class LoRAAdapter(nn.Module):
    """One low-rank update dW = scale * (alpha / rank) * up @ down, with dropout on the adapter's input."""

    optional_keys = ("down", "up")  # weights.check_keys: official checkpoints carry no adapters

    def __init__(self, down_shape: tuple[int, ...], up_shape: tuple[int, ...], alpha: float, dropout: float,
                 device=None, dtype=None):
        super().__init__()
        self.rank = down_shape[0]
        self.alpha = float(alpha)
        self.scale = 1.0
        self.target = ""  # the inject_lora pattern that created it (recorded in saved files)
        self.down = nn.Parameter(torch.empty(down_shape, device=device, dtype=dtype))  # A
        self.up = nn.Parameter(torch.zeros(up_shape, device=device, dtype=dtype))  # B = 0: starts as the base model
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's own init, as kohya and PEFT use
        self.dropout = nn.Dropout(dropout)

    @property
    def multiplier(self) -> float:
        return self.scale * self.alpha / self.rank

    def delta(self, multiplier: float) -> torch.Tensor:
        """multiplier * up @ down in float32 (or wider), shaped like the base weight."""
        dtype = torch.promote_types(self.down.dtype, torch.float32)
        w = self.up.flatten(1).to(dtype) @ self.down.flatten(1).to(dtype)
        return multiplier * w.view(self.up.shape[0], *self.down.shape[1:])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict without this adapter (an official checkpoint) leaves it as it is, so
        # `model.load_state_dict(official, strict=True)` still works after injection.
        if prefix + "down" in state_dict or prefix + "up" in state_dict:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


class FusedLoRAAdapter(nn.ModuleDict):
    """Adapters on the thirds of a fused q/k/v projection: open_clip keeps bigG's as one in_proj_weight
    [W_q; W_k; W_v] (3C, C), where kohya and diffusers adapt Hugging Face's q_proj / k_proj / v_proj one by
    one. Holds up to three LoRAAdapters "q", "k", "v", each with its own rank and alpha, writing rows
    [i*C, (i+1)*C) of the output; `scale` is the strength of all three."""

    SLICES = ("q", "k", "v")

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.scale = 1.0
        self.target = ""

    def add(self, sl: str, rank: int, alpha: float, dropout: float = 0.0, device=None, dtype=None) -> LoRAAdapter:
        self[sl] = LoRAAdapter((rank, self.width), (self.width, rank), alpha, dropout, device, dtype)
        return self[sl]

    def slices(self) -> list[tuple[int, LoRAAdapter]]:
        return [(i, self[sl]) for i, sl in enumerate(self.SLICES) if sl in self]

    @property
    def multiplier(self) -> float:  # each slice's alpha / rank is applied inside delta / live
        return self.scale

    def delta(self, multiplier: float) -> torch.Tensor:
        parts = self.slices()
        dtype = torch.promote_types(parts[0][1].down.dtype, torch.float32)
        out = torch.zeros(3 * self.width, self.width, dtype=dtype, device=parts[0][1].down.device)
        for i, a in parts:
            out[i * self.width:(i + 1) * self.width] = a.delta(multiplier * a.alpha / a.rank)
        return out

    def live(self, x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """proj (..., 3C) with each slice's scale * alpha/rank * B A x added to its third."""
        chunks = list(proj.chunk(3, dim=-1))
        for i, a in self.slices():
            h = F.linear(F.linear(a.dropout(x.to(a.down.dtype)), a.down), a.up)
            chunks[i] = chunks[i] + (self.scale * a.multiplier * h).to(proj.dtype)
        return torch.cat(chunks, dim=-1)


def _leaves(adapter: nn.Module) -> list[tuple[str | None, LoRAAdapter]]:
    """(slice, adapter) pairs: [(None, it)] for a plain adapter, the q / k / v ones of a fused adapter."""
    if isinstance(adapter, FusedLoRAAdapter):
        return [(FusedLoRAAdapter.SLICES[i], a) for i, a in adapter.slices()]
    return [(None, adapter)]


@dataclass
class _Merge:
    """What unmerge needs to restore W bit for bit: fl(fl(W + d) - d) differs from W in a few places."""
    multiplier: float
    dtype: torch.dtype
    index: torch.Tensor  # flat positions where subtracting the delta again does not round back to W
    value: torch.Tensor  # W's values there


class LoRALayer(nn.Module):
    """What LoRALinear and LoRAConv2d share: named adapters on top of the layer's own forward."""

    plain: type[nn.Module]  # the layer class this one stands in for
    own = ("weight", "bias")  # its parameters (and children) that the adapted layer takes over as they are

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = nn.ModuleDict()
        self.merged: dict[str, _Merge] = {}  # adapters folded into weight, in merge order

    @classmethod
    def wrap(cls, layer: nn.Module) -> "LoRALayer":
        """The adapted layer around `layer`'s own weight / bias parameters (nothing is copied)."""
        with torch.device("meta"):
            new = cls(**cls.config(layer))
        for attr in cls.own:
            setattr(new, attr, getattr(layer, attr))
        return new.train(layer.training)

    def unwrap(self) -> nn.Module:
        with torch.device("meta"):
            plain = self.plain(**self.config(self))
        for attr in self.own:
            setattr(plain, attr, getattr(self, attr))
        return plain.train(self.training)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, dtype=None) -> LoRAAdapter:
        if not name or "." in name:
            raise ValueError(f"adapter name must be non-empty without dots, got {name!r}")
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists (remove_lora it first)")
        w = self.weight
        adapter = LoRAAdapter((rank, *w.shape[1:]), (w.shape[0], rank, *[1] * (w.dim() - 2)), alpha, dropout,
                              device=w.device, dtype=dtype or w.dtype)
        self.lora[name] = adapter
        return adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        for name, a in self.lora.items():
            if name in self.merged or a.scale == 0:
                continue
            h = self.lora_up(self.lora_down(a.dropout(x.to(a.down.dtype)), a.down), a.up)
            out = out + (a.multiplier * h).to(out.dtype)
        return out

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        a, w = self.lora[name], self.weight
        delta = a.delta(a.multiplier)
        merged = (w.to(delta.dtype) + delta).to(w.dtype)
        # int32 positions: the record stays a fraction of a weight copy (1-10 % of entries for typical deltas)
        wrong = ((merged.to(delta.dtype) - delta).to(w.dtype) != w).flatten().nonzero().squeeze(1).int()
        self.merged[name] = _Merge(a.multiplier, w.dtype, wrong, w.flatten()[wrong].clone())
        w.copy_(merged)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        # Each record restores the weight as it was right before that merge: undo later merges first.
        later = list(self.merged)[list(self.merged).index(name) + 1:]
        for other in reversed(later):
            self._pop_merge(other)
        self._pop_merge(name)
        for other in later:
            self.merge(other)

    @torch.no_grad()
    def _pop_merge(self, name: str) -> None:
        m, w = self.merged.pop(name), self.weight
        delta = self.lora[name].delta(m.multiplier)
        restored = (w.to(delta.dtype) - delta).to(w.dtype)
        if m.dtype == w.dtype:  # the layer was not cast since the merge: the record applies
            restored.view(-1)[m.index.to(w.device)] = m.value.to(w.device)
        w.copy_(restored)

    def remove_adapter(self, name: str, merge: bool = False) -> None:
        stack = list(self.merged)
        for other in reversed(stack):
            self._pop_merge(other)
        if merge:  # folded for good: the delta becomes part of the base weight the others merge onto
            self.merge(name)
            self.merged.pop(name)
        del self.lora[name]
        for other in stack:
            if other != name:
                self.merge(other)


class LoRALinear(LoRALayer, nn.Linear):
    plain = nn.Linear

    @staticmethod
    def config(layer: nn.Linear) -> dict:
        return dict(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None)

    def lora_down(self, x, down):
        return F.linear(x, down)

    def lora_up(self, h, up):
        return F.linear(h, up)


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """A: a conv with the layer's kernel, stride and padding (r, in, kh, kw); B: a 1x1 conv (out, r, 1, 1)."""
    plain = nn.Conv2d

    @staticmethod
    def config(layer: nn.Conv2d) -> dict:
        return dict(in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
                    stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                    bias=layer.bias is not None, padding_mode=layer.padding_mode)

    def lora_down(self, x, down):
        return self._conv_forward(x, down, None)

    def lora_up(self, h, up):
        return F.conv2d(h, up)


class LoRAInProj(LoRALayer, MultiheadSelfAttention):
    """bigG's attention with FusedLoRAAdapters on its fused q/k/v projection. It keeps the official
    parameters `in_proj_weight` / `in_proj_bias` (open_clip's, from nn.MultiheadAttention) and its `out_proj`
    child, so checkpoints load as before; merging adds each slice's delta to its rows of in_proj_weight."""
    plain = MultiheadSelfAttention
    own = ("in_proj_weight", "in_proj_bias", "out_proj")

    @staticmethod
    def config(layer: MultiheadSelfAttention) -> dict:
        return dict(width=layer.in_proj_weight.shape[1], heads=layer.heads)

    @property
    def weight(self) -> nn.Parameter:  # what LoRALayer merges into
        return self.in_proj_weight

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, dtype=None,
                    slices: str = "qkv") -> FusedLoRAAdapter:
        if not name or "." in name:
            raise ValueError(f"adapter name must be non-empty without dots, got {name!r}")
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists (remove_lora it first)")
        w = self.in_proj_weight
        adapter = FusedLoRAAdapter(w.shape[1])
        for sl in slices:
            adapter.add(sl, rank, alpha, dropout, w.device, dtype or w.dtype)
        self.lora[name] = adapter
        return adapter

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        out = super().in_proj(x)
        for name, a in self.lora.items():
            if name not in self.merged and a.scale != 0:
                out = a.live(x, out)
        return out

    forward = MultiheadSelfAttention.forward


def _adaptable(module: nn.Module) -> bool:
    return (isinstance(module, LoRALayer) or type(module) in (nn.Linear, MultiheadSelfAttention)
            or (type(module) is nn.Conv2d and module.groups == 1))


def _wrapped(root: nn.Module, path: str) -> LoRALayer:
    """The LoRA layer at `path`, replacing a plain Linear / Conv2d there on first use."""
    layer = root.get_submodule(path)
    if isinstance(layer, LoRALayer):
        return layer
    if not _adaptable(layer):
        raise TypeError(f"{path} is a {type(layer).__name__}: LoRA adapts nn.Linear and (groups=1) nn.Conv2d")
    kind = (LoRALinear if isinstance(layer, nn.Linear) else
            LoRAInProj if isinstance(layer, MultiheadSelfAttention) else LoRAConv2d)
    new = kind.wrap(layer)
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent), child, new)
    return new


def lora_layers(module: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoRALayer)}


def _matches(path: str, pattern: str, layer: nn.Module | None = None) -> bool:
    if isinstance(layer, MultiheadSelfAttention):  # its fused projection is addressed as <attn>.in_proj
        path += ".in_proj"
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)


# ---------------------------------------------------------------------------------------------------------
# injecting, scaling, merging, removing


def inject_lora(module: nn.Module, name: str = "default", rank: int = 16, alpha: float = 16,
                targets: tuple[str, ...] = ATTENTION, dropout: float = 0.0, dtype: torch.dtype | None = None) -> list[str]:
    """Add adapter `name` to every nn.Linear / nn.Conv2d whose path matches one of `targets`.

    `dtype`: the adapters' dtype (default: each base weight's), e.g. float32 adapters on a bf16 model.
    Returns the adapted module paths. A pattern that matches no adaptable layer is an error (a typo).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    paths, unused = [], set(targets)
    for path, layer in module.named_modules():
        hit = [t for t in targets if _matches(path, t, layer)]
        if hit and _adaptable(layer):
            paths.append((path, hit[0]))
            unused -= set(hit)
    if unused:
        raise ValueError(f"LoRA targets matched no nn.Linear / nn.Conv2d: {sorted(unused)}")
    taken = [p for p, _ in paths if name in getattr(module.get_submodule(p), "lora", {})]
    if taken:
        raise ValueError(f"adapter {name!r} already exists on {_few(taken, 3)}; remove_lora it or pick another name")
    for path, target in paths:
        _wrapped(module, path).add_adapter(name, rank, alpha, dropout, dtype).target = target
    return [p for p, _ in paths]


def _with_adapter(module: nn.Module, name: str | None) -> list[tuple[LoRALayer, str]]:
    found = [(layer, n) for layer in lora_layers(module).values() for n in layer.lora if name in (None, n)]
    if name is not None and not found:
        raise KeyError(f"no LoRA adapter named {name!r}")
    return found


def lora_parameters(module: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The trainable A / B parameters of adapter `name` (all adapters by default)."""
    return [p for layer, n in _with_adapter(module, name) for p in layer.lora[n].parameters()]


def set_lora_scale(module: nn.Module, name: str, scale: float) -> None:
    """Strength of adapter `name` (1 = as trained, 0 = off); merged adapters are re-merged at the new scale."""
    for layer, n in _with_adapter(module, name):
        merged = n in layer.merged
        layer.unmerge(n)
        layer.lora[n].scale = float(scale)
        if merged:
            layer.merge(n)


def merge_lora(module: nn.Module, name: str | None = None) -> None:
    """Fold adapter `name` (default: all) into the weights: inference at the base model's cost."""
    for layer, n in _with_adapter(module, name):
        layer.merge(n)


def unmerge_lora(module: nn.Module, name: str | None = None) -> None:
    """Take merged adapters out of the weights again, restoring them bit for bit."""
    for layer, n in _with_adapter(module, name):
        layer.unmerge(n)


def remove_lora(module: nn.Module, name: str | None = None, merge: bool = False) -> None:
    """Delete adapter `name` (default: all); `merge=True` bakes it into the weights first, else the weights
    are restored. Layers left without adapters become plain nn.Linear / nn.Conv2d again."""
    for layer, n in _with_adapter(module, name):
        layer.remove_adapter(n, merge)
    for path, layer in lora_layers(module).items():
        if not layer.lora:
            parent, _, child = path.rpartition(".")
            setattr(module.get_submodule(parent), child, layer.unwrap())

def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")
