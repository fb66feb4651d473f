"""LoRA (Hu et al. 2021): low-rank adapters for the UNet, the control model and the text towers, and the
kohya / diffusers (PEFT) file formats that ComfyUI, A1111 and diffusers exchange them in.

An adapted layer computes  y = W x + b + sum_k  s_k (alpha_k / r_k) B_k A_k x  with A_k (r_k, in) random and
B_k (out, r_k) zero, so a fresh adapter starts as the base model. `LoRALinear` / `LoRAConv2d` are the
nn.Linear / nn.Conv2d they replace, with the same `weight` / `bias` parameters (official checkpoints still
load with a plain `load_state_dict`) and a `lora` ModuleDict of named adapters. Adapters can be folded into
W for inference (`merge_lora`) and taken out again bit-exactly (`unmerge_lora`).

Files are kohya's: `lora_unet_<sgm module path, '.' -> '_'>.lora_down.weight` (A), `.lora_up.weight` (B),
`.alpha`, for the text towers `lora_te1_` (CLIP-L) / `lora_te2_` (bigG, in Hugging Face CLIP names), for
SUPIR's control encoder `lora_control_`. Loading also takes kohya files spelled with diffusers paths and
diffusers / PEFT files (`unet.down_blocks.1.attentions.0...to_q.lora_A.weight`), mapped to our module
names by `unet_diffusers_names`, which derives the diffusers layout from the UNetConfig.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNetConfig

# Module-name patterns for `inject_lora`. A pattern matches a module whose dotted path equals it or ends
# with "." + pattern (fnmatch wildcards allowed). attn1/attn2 are the UNet transformer blocks' self- and
# cross-attention, which leaves the `attn` of SUPIR's ZeroCrossAttn connectors alone.
ATTENTION = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
PROJECTIONS = ("proj_in", "proj_out")
# kohya's SDXL default: every Linear in the transformers.
TRANSFORMER = ATTENTION + FEED_FORWARD + PROJECTIONS
# CLIP-L (HF names) and the linear layers of bigG (open_clip names).
TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
        "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = nn.ModuleDict()
        self.merged: dict[str, _Merge] = {}  # adapters folded into weight, in merge order

    @classmethod
    def wrap(cls, layer: nn.Module) -> "LoRALayer":
        """The adapted layer around `layer`'s own weight / bias parameters (nothing is copied)."""
        new = cls(**cls.config(layer), device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        return new.train(layer.training)

    def unwrap(self) -> nn.Module:
        plain = self.plain(**self.config(self), device="meta")
        plain.weight, plain.bias = self.weight, self.bias
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


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, LoRALayer) or type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)


def _wrapped(root: nn.Module, path: str) -> LoRALayer:
    """The LoRA layer at `path`, replacing a plain Linear / Conv2d there on first use."""
    layer = root.get_submodule(path)
    if isinstance(layer, LoRALayer):
        return layer
    if not _adaptable(layer):
        raise TypeError(f"{path} is a {type(layer).__name__}: LoRA adapts nn.Linear and (groups=1) nn.Conv2d")
    new = (LoRALinear if isinstance(layer, nn.Linear) else LoRAConv2d).wrap(layer)
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent), child, new)
    return new


def lora_layers(module: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoRALayer)}


def _matches(path: str, pattern: str) -> bool:
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
        hit = [t for t in targets if _matches(path, t)]
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


# ---------------------------------------------------------------------------------------------------------
# diffusers <-> sgm module names

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def unet_diffusers_names(cfg: UNetConfig) -> dict[str, str]:
    """sgm module path -> diffusers UNet2DConditionModel path, for the UNet that `cfg` builds.

    Entries are whole modules or block prefixes (transformer internals are named alike in both). diffusers
    groups by level: down_blocks.L.{resnets,attentions}.j and downsamplers.0 (sgm input_blocks, counted
    through), mid_block, up_blocks.i with the levels reversed (sgm output_blocks, num_res_blocks + 1 per level).
    """
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.1": "mid_block.attentions.0"}

    def resnet(sgm: str, diffusers: str):
        names.update({f"{sgm}.{a}": f"{diffusers}.{b}" for a, b in _RESNET.items()})

    levels = len(cfg.channel_mult)
    block = 1
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}")
            if cfg.has_attention(level):
                names[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
            block += 1
        if level < levels - 1:
            names[f"input_blocks.{block}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            block += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    block = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}")
            if cfg.has_attention(level):
                names[f"output_blocks.{block}.1"] = f"up_blocks.{i}.attentions.{j}"
            if level > 0 and j == cfg.num_res_blocks:
                names[f"output_blocks.{block}.{2 if cfg.has_attention(level) else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
            block += 1
    return names


_diffusers_table = lru_cache(maxsize=8)(unet_diffusers_names)  # looked up once per layer while loading


def _rename(path: str, table: dict[str, str]) -> str | None:
    """`path` with its longest prefix (whole dotted components) found in `table` replaced; None if none is."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in table:
            return ".".join([table[head], *parts[i:]])
    return None


# bigG is stored with open_clip names; kohya and diffusers name its layers as Hugging Face's CLIPTextModel.
_OPENCLIP_TO_HF = ((r"^transformer\.resblocks\.(\d+)\.attn\.out_proj$", r"text_model.encoder.layers.\1.self_attn.out_proj"),
                   (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc$", r"text_model.encoder.layers.\1.mlp.fc1"),
                   (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj$", r"text_model.encoder.layers.\1.mlp.fc2"))


def _openclip_hf_name(path: str) -> str | None:
    for pattern, repl in _OPENCLIP_TO_HF:
        if re.match(pattern, path):
            return re.sub(pattern, repl, path)
    return None


# ---------------------------------------------------------------------------------------------------------
# model parts and their names in files


@dataclass(frozen=True)
class _Part:
    kohya: str  # key prefix in kohya files
    peft: str | None  # key prefix in diffusers / PEFT files
    paths: tuple[str, ...]  # where the part sits in a SUPIR / SDXL module tree (checked in order)


PARTS = {
    "unet": _Part("lora_unet_", "unet.", ("model.diffusion_model", "diffusion_model")),
    "control": _Part("lora_control_", None, ("model.control_model", "control_model")),
    "te1": _Part("lora_te1_", "text_encoder.", ("conditioner.embedders.0.transformer",)),
    "te2": _Part("lora_te2_", "text_encoder_2.", ("conditioner.embedders.1.model",)),
}


def model_parts(root: nn.Module) -> dict[str, str]:
    """Part name -> module path under `root` ('' = root itself) of the parts LoRA files address.

    `root` may be a whole SUPIR / SDXL tree, a ControlledUNet, or a bare UNet / GLVControl / any module
    (a bare module other than the control encoder counts as the UNet).
    """
    found = {}
    for part, spec in PARTS.items():
        for path in spec.paths:
            try:
                root.get_submodule(path)
            except AttributeError:
                continue
            found[part] = path
            break
    if not found:
        found["control" if hasattr(root, "input_hint_block") else "unet"] = ""
    return found


def _file_names(part: str, part_module: nn.Module, path: str) -> tuple[str | None, list[str]]:
    """(the kohya key stem we save under, every key stem a file may use) for layer `path` of a part."""
    spec = PARTS[part]
    own = None  # the path in the naming kohya uses for this part
    other = []  # the same layer in the diffusers naming, if it differs
    if part == "unet":
        own = path
        cfg = getattr(part_module, "cfg", None)
        diffusers = _rename(path, _diffusers_table(cfg)) if isinstance(cfg, UNetConfig) else None
        if diffusers:
            other = [spec.kohya + diffusers.replace(".", "_"), spec.peft + diffusers, diffusers]
    elif part == "te2":
        own = _openclip_hf_name(path)
    else:
        own = path
    names = list(other)
    if own is not None:
        names += [spec.kohya + own.replace(".", "_")] + ([spec.peft + own] if spec.peft else [])
        if part == "te1":
            names.append("lora_te_" + own.replace(".", "_"))  # single-text-encoder kohya files (SD 1.x)
    return (spec.kohya + own.replace(".", "_") if own is not None else None), names


# (suffix, role) of every tensor key we understand; the rest of the key names the module.
_ROLES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
          (".lora_A.weight", "down"), (".lora_B.weight", "up"),
          (".lora.down.weight", "down"), (".lora.up.weight", "up"),
          # diffusers' attention-processor files: ...attn1.processor.to_q_lora.down.weight
          ("_lora.down.weight", "down"), ("_lora.up.weight", "up"))


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            if stem.startswith("base_model.model."):  # PEFT's wrapper
                stem = stem[len("base_model.model."):]
            if suffix.startswith("_lora"):
                stem = stem.replace(".processor.", ".")
                stem = stem + ".0" if stem.endswith(".to_out") else stem
            return stem, role
    return None


# ---------------------------------------------------------------------------------------------------------
# saving and loading files


def lora_state_dict(model: nn.Module, name: str = "default", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name` as a kohya state dict (lora_down = A, lora_up = B, alpha), keyed by model part."""
    out = {}
    parts = model_parts(model)
    for layer_path, layer in lora_layers(model).items():
        if name not in layer.lora:
            continue
        a = layer.lora[name]
        part = next((p for p, root in parts.items() if root == "" or layer_path.startswith(root + ".")), None)
        rel = layer_path[len(parts[part]) + 1:] if part and parts[part] else layer_path
        stem = _file_names(part, model.get_submodule(parts[part]), rel)[0] if part else None
        if stem is None:
            raise LoRAFileError(f"{layer_path} has no name in kohya's format (it is not under "
                                f"{', '.join(p.paths[0] for p in PARTS.values())} or has no Hugging Face name)")
        out[stem + ".lora_down.weight"] = a.down.detach().to("cpu", dtype or a.down.dtype).contiguous()
        out[stem + ".lora_up.weight"] = a.up.detach().to("cpu", dtype or a.up.dtype).contiguous()
        out[stem + ".alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
    if not out:
        raise KeyError(f"no LoRA adapter named {name!r}")
    return out


def save_lora(model: nn.Module, path: str | Path, name: str = "default", metadata: dict | None = None,
              dtype: torch.dtype | None = None, base_model: str = "sdxl_base_v1-0") -> dict[str, str]:
    """Write adapter `name` as a kohya safetensors file that ComfyUI / A1111 load; returns the metadata.

    `metadata`: training settings etc. (values are stored as strings, non-strings as JSON); kohya's own
    keys (`ss_network_dim`, `ss_network_alpha`, ...) are filled in from the adapter.
    """
    from safetensors.torch import save_file

    sd = lora_state_dict(model, name, dtype)
    adapters = [layer.lora[name] for layer in lora_layers(model).values() if name in layer.lora]
    ranks, alphas = {a.rank for a in adapters}, {a.alpha for a in adapters}
    info = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic",
        "ss_network_dropout": f"{adapters[0].dropout.p:g}",
        "ss_base_model_version": base_model,
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        "mini_supir.adapter": name,
        "mini_supir.targets": json.dumps(sorted({a.target for a in adapters if a.target})),
        "mini_supir.parts": json.dumps(sorted({k.split("_")[1] for k in sd})),
    }
    for key, value in (metadata or {}).items():
        info[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(sd, str(path), metadata=info)
    return info


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file (.safetensors, or an old .pt / .ckpt: no metadata)."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _peft_alpha(metadata: dict[str, str], part: str) -> float | None:
    """lora_alpha from the PEFT config diffusers stores in the file's metadata (files carry no .alpha)."""
    blob = metadata.get("lora_adapter_metadata")
    if not blob:
        return None
    config = json.loads(blob)
    prefix = (PARTS[part].peft or "").rstrip(".")
    alpha = config.get(f"{prefix}.lora_alpha", config.get("lora_alpha"))
    return float(alpha) if alpha is not None else None


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_lora(model: nn.Module, path: str | Path | dict, name: str = "default", scale: float = 1.0,
              merge: bool = False, strict: bool = True) -> list[str]:
    """Add adapter `name` to `model` from a kohya or diffusers / PEFT LoRA file (or a state dict).

    `model` is a SUPIR / SDXL tree, a ControlledUNet or a bare UNet (see model_parts). Stack LoRAs by
    loading each under its own name, each with its own `scale`. `merge=True` folds it into the weights.
    `strict=False` skips keys for parts the model lacks (e.g. text-encoder keys on a bare UNet) with a
    warning instead of raising. Returns the adapted module paths.
    """
    tensors, metadata = read_lora(path) if not isinstance(path, dict) else (path, {})
    parts = model_parts(model)
    lookup: dict[str, tuple[str, str]] = {}  # key stem in any naming -> (part, layer path under model)
    example = ""
    for part, root in parts.items():
        part_module = model.get_submodule(root)
        for rel, layer in part_module.named_modules():
            if rel and _adaptable(layer):
                own, stems = _file_names(part, part_module, rel)
                example = example or own or ""
                for stem in stems:
                    lookup[stem] = (part, f"{root}.{rel}" if root else rel)

    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown, fused, unmatched = [], [], []
    for key, value in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
        elif split[0] in lookup:
            groups.setdefault(split[0], {})[split[1]] = value
        elif "te2" in parts and re.search(r"^(lora_te2_|text_encoder_2\.).*self_attn[._][qkv]_proj$", split[0]):
            fused.append(key)
        else:
            unmatched.append(key)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys of a kind we do not load (only plain LoRA down/up/alpha; no LoCon "
                        f"mid, LoHa, LoKr, DoRA, bias diffs): {_few(unknown)}")
    if fused:
        problems.append(f"{len(fused)} keys adapt bigG's q/k/v projections, which live in one fused in_proj_weight "
                        f"with no Linear layer to wrap: {_few(fused)}")
    if unmatched:
        problems.append(f"{len(unmatched)} keys match no layer of this model (parts present: {sorted(parts)}; "
                        f"expected names like {example}): {_few(unmatched)}")
    if problems and strict:
        source = "state dict" if isinstance(path, dict) else str(path)
        raise LoRAFileError(f"LoRA {source} does not fit the model: " + "; ".join(problems))
    if problems:
        warnings.warn("skipping LoRA keys: " + "; ".join(problems))

    plan, bad = [], []
    for stem, g in groups.items():
        part, layer_path = lookup[stem]
        weight = model.get_submodule(layer_path).weight
        if "down" not in g or "up" not in g:
            bad.append(f"{stem}: has {sorted(g)}, needs both down and up")
            continue
        down, up = g["down"], g["up"]
        if weight.dim() == 2 and down.dim() == 4 and down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
            down, up = down.flatten(1), up.flatten(1)  # 1x1-conv LoRA (SD 1.x proj_in) on a Linear
        rank = down.shape[0]
        want_down = (rank, *weight.shape[1:])
        want_up = (weight.shape[0], rank, *[1] * (weight.dim() - 2))
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            bad.append(f"{stem}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit {layer_path} "
                       f"{tuple(weight.shape)} (want {want_down} / {want_up})")
            continue
        alpha = g["alpha"].item() if "alpha" in g else _peft_alpha(metadata, part) or rank
        plan.append((layer_path, down, up, alpha))
    if bad:
        raise LoRAFileError(f"{len(bad)} LoRA layers have wrong shapes or missing tensors: {_few(bad, 3)}")
    taken = [p for p, *_ in plan if name in getattr(model.get_submodule(p), "lora", {})]
    if taken:
        raise ValueError(f"adapter {name!r} already exists on {_few(taken, 3)}; remove_lora it or pick another name")

    with torch.no_grad():
        for layer_path, down, up, alpha in plan:
            adapter = _wrapped(model, layer_path).add_adapter(name, down.shape[0], alpha)
            adapter.down.copy_(down)
            adapter.up.copy_(up)
            adapter.scale = float(scale)
    if merge:
        merge_lora(model, name)
    return [p for p, *_ in plan]
