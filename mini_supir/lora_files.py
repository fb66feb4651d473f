"""LoRA files: the kohya / diffusers (PEFT) formats that ComfyUI, A1111 and diffusers exchange adapters in,
read into and written from the adapters of lora.py.

Files are kohya's: `lora_unet_<sgm module path, '.' -> '_'>.lora_down.weight` (A), `.lora_up.weight` (B),
`.alpha`, for the text towers `lora_te1_` (CLIP-L) / `lora_te2_` (bigG, in Hugging Face CLIP names), for
SUPIR's control encoder `lora_control_`, for a stage-1 restorer `lora_stage1_`. Loading also takes kohya files
spelled with diffusers paths, diffusers / PEFT files (`unet.down_blocks.1.attentions.0...to_q.lora_A.weight`,
text encoders in transformers 4 and 5 names, older `lora_linear_layer` spellings) with their PEFT scaling
(lora_alpha, alpha_pattern, use_rslora) and PeftModel folders (adapter_config.json); the names themselves
are lora_names.py's.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .lora import (LoRAConv2d, LoRAFileError, _adaptable, _few, _leaves, _wrapped, lora_layers,
                   merge_lora)
from .lora_names import PARTS, describe_keys, layer_names, model_parts, split_key


# ---------------------------------------------------------------------------------------------------------
# saving and loading files


def _part_of(model: nn.Module, parts: dict[str, str], layer_path: str) -> tuple[str | None, str]:
    part = next((p for p, root in parts.items() if root == "" or layer_path.startswith(root + ".")), None)
    rel = layer_path[len(parts[part]) + 1:] if part and parts[part] else layer_path
    return part, rel


def lora_state_dict(model: nn.Module, name: str = "default", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name` as a kohya state dict (lora_down = A, lora_up = B, alpha), keyed by model part;
    an adapter on bigG's fused in_proj is written as kohya's te2 q_proj / k_proj / v_proj keys."""
    out = {}
    parts = model_parts(model)
    for layer_path, layer in lora_layers(model).items():
        if name not in layer.lora:
            continue
        part, rel = _part_of(model, parts, layer_path)
        stems = {sl: own for sl, own, _ in layer_names(part, model.get_submodule(parts[part]), rel, layer)} if part else {}
        for sl, a in _leaves(layer.lora[name]):
            stem = stems.get(sl)
            if stem is None:
                raise LoRAFileError(f"{layer_path} has no name in kohya's format (it is not under "
                                    f"{', '.join(p.paths[0] for p in PARTS.values())} or has no Hugging Face name)")
            out[stem + ".lora_down.weight"] = a.down.detach().to("cpu", dtype or a.down.dtype).contiguous()
            out[stem + ".lora_up.weight"] = a.up.detach().to("cpu", dtype or a.up.dtype).contiguous()
            out[stem + ".alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
    if not out:
        raise KeyError(f"no LoRA adapter named {name!r}")
    return out


def _addnet_hashes(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's sshs_model_hash / sshs_legacy_hash (sd-scripts library/train_util.py
    precalculate_safetensors_hashes): sha256 of the tensor bytes of the file written with only the ss_*
    metadata, and sha256 of its 64 KiB at offset 1 MiB, first 8 hex digits."""
    import hashlib

    from safetensors.torch import save

    blob = save(sd, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[header:]).hexdigest(), hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


_SDXL_SPEC = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
              "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
              "modelspec.resolution": "1024x1024", "modelspec.prediction_type": "epsilon"}


def _stage1_spec(base_model: str) -> dict[str, str]:
    # no resolution / prediction type: a pixel restorer is fully convolutional and predicts pixels
    return {"modelspec.architecture": f"{base_model}/lora", "ss_base_model": base_model,
            "modelspec.implementation": "https://github.com/xinntao/Real-ESRGAN"}


def lora_parts(path: str | Path) -> set[str]:
    """The model parts ('unet', 'te1', 'stage1', ...) a LoRA file is for: our files name them in their
    metadata; other files are SDXL ones (their keys never start with lora_stage1_)."""
    tensors, metadata = read_lora(path)
    if "mini_supir.parts" in metadata:
        return set(json.loads(metadata["mini_supir.parts"]))
    return {"stage1"} if all(k.startswith(PARTS["stage1"].kohya) for k in tensors) else {"unet"}


def save_lora(model: nn.Module, path: str | Path, name: str = "default", metadata: dict | None = None,
              dtype: torch.dtype | None = None, base_model: str = "sdxl_base_v1-0") -> dict[str, str]:
    """Write adapter `name` as a kohya safetensors file that ComfyUI / A1111 load; returns the metadata.

    `metadata`: training settings etc. (values are stored as strings, non-strings as JSON); kohya's own
    keys (`ss_network_dim`, `ss_network_alpha`, ...) and ModelSpec's (`modelspec.*`) are filled in.
    """
    import datetime

    from safetensors.torch import save_file

    sd = lora_state_dict(model, name, dtype)
    layers = [layer for layer in lora_layers(model).values() if name in layer.lora]
    leaves = [(isinstance(layer, LoRAConv2d) and layer.kernel_size != (1, 1), a)
              for layer in layers for _, a in _leaves(layer.lora[name])]
    # kohya: ss_network_dim / alpha are the Linear (and 1x1 conv) adapters', conv_dim / conv_alpha in
    # ss_network_args the 3x3 convs' (networks/lora.py LoRANetwork); "Dynamic" where they differ.
    def one(values, fmt):
        values = set(values)
        return fmt(values.pop()) if len(values) == 1 else "Dynamic"
    linear = [a for conv, a in leaves if not conv] or [a for _, a in leaves]
    conv = [a for is_conv, a in leaves if is_conv]
    info = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": one((a.rank for a in linear), str),
        "ss_network_alpha": one((a.alpha for a in linear), "{:g}".format),
        "ss_network_dropout": f"{leaves[0][1].dropout.p:g}",
        "ss_base_model_version": base_model,
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": name,
        **(_stage1_spec(base_model) if "stage1" in model_parts(model) else _SDXL_SPEC),
        "modelspec.date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mini_supir.adapter": name,
        "mini_supir.targets": json.dumps(sorted({layer.lora[name].target for layer in layers if layer.lora[name].target})),
        "mini_supir.parts": json.dumps(sorted({k.split("_")[1] for k in sd})),
    }
    if conv:
        info["ss_network_args"] = json.dumps({"conv_dim": one((a.rank for a in conv), str),
                                              "conv_alpha": one((a.alpha for a in conv), "{:g}".format)})
    for key, value in (metadata or {}).items():
        info[key] = value if isinstance(value, str) else json.dumps(value)
    info["sshs_model_hash"], info["sshs_legacy_hash"] = _addnet_hashes(sd, info)
    info["modelspec.hash_sha256"] = "0x" + info["sshs_model_hash"]
    save_file(sd, str(path), metadata=info)
    return info


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file (.safetensors, or an old .pt / .ckpt: no metadata) or of a
    PeftModel.save_pretrained folder. A PEFT adapter_model.* beside an adapter_config.json (given as the
    folder or as the file) gets that config as metadata["adapter_config"] (JSON): it holds lora_alpha."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        found = [path / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (path / f).exists()]
        if not found:
            raise LoRAFileError(f"{path} is a folder without adapter_model.safetensors / .bin (a PEFT adapter folder)")
        path = found[0]
    if path.suffix != ".safetensors":
        sd = torch.load(path, map_location="cpu", weights_only=True)
        tensors, metadata = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}
    else:
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    config = path.parent / "adapter_config.json"
    if path.stem == "adapter_model" and config.exists():
        metadata["adapter_config"] = config.read_text()
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # merged, they would turn every restoration into NaN, blamed on the image
        raise LoRAFileError(f"{path.name}: {len(broken)} tensors hold NaN or inf values: {_few(broken, 2)}")
    return tensors, metadata


def _peft_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """Part -> PEFT LoraConfig fields: from diffusers' `lora_adapter_metadata` (keys prefixed 'unet.',
    'text_encoder.', ...; unprefixed ones apply to every part) or a PEFT folder's adapter_config.json."""
    flat = json.loads(metadata.get("lora_adapter_metadata") or metadata.get("adapter_config") or "{}")
    prefixes = {part: spec.peft for part, spec in PARTS.items() if spec.peft}
    shared = {k: v for k, v in flat.items() if not any(k.startswith(p) for p in prefixes.values())}
    return {part: {**shared, **{k[len(p):]: v for k, v in flat.items() if k.startswith(p)}}
            for part, p in prefixes.items()}


def _peft_alpha(config: dict, module: str, rank: int) -> float | None:
    """The alpha that makes our alpha / rank equal PEFT's scaling for `module` (its name in the peer's
    model): lora_alpha, or the first alpha_pattern entry matching as peft's get_pattern_key does
    (peft/utils/other.py); rsLoRA scales by alpha / sqrt(r), i.e. our alpha is alpha * sqrt(r). The rank
    is the tensors' (rank_pattern's per-module r is what they were made with)."""
    if config.get("lora_alpha") is None:
        return None
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha



def _lookup(model: nn.Module, parts: dict[str, str]) -> tuple[dict[str, list[tuple[str, str, str | None]]], str]:
    """(key stem in any naming -> candidate (part, layer path under model, slice)s, an example stem)."""
    lookup: dict[str, list[tuple[str, str, str | None]]] = {}
    example = ""
    for part, root in parts.items():
        part_module = model.get_submodule(root)
        for rel, layer in part_module.named_modules():
            if not rel or not _adaptable(layer):
                continue
            for sl, own, stems in layer_names(part, part_module, rel, layer):
                example = example or own or ""
                for stem in stems:
                    candidates = lookup.setdefault(stem, [])
                    if (part, f"{root}.{rel}" if root else rel, sl) not in candidates:
                        candidates.append((part, f"{root}.{rel}" if root else rel, sl))
    return lookup, example


def _base_shape(model: nn.Module, layer_path: str, sl: str | None) -> tuple[int, ...]:
    layer = model.get_submodule(layer_path)
    if sl is not None:
        return (layer.in_proj_weight.shape[1],) * 2  # one third of the fused (3C, C)
    return tuple(layer.weight.shape)


def _fit(down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...]):
    """(down, up) reshaped to fit a base weight of `shape`, or None with the shapes wanted."""
    if len(shape) == 2 and down.dim() == 4 and down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
        down, up = down.flatten(1), up.flatten(1)  # 1x1-conv LoRA (SD 1.x proj_in) on a Linear
    rank = down.shape[0]
    want_down, want_up = (rank, *shape[1:]), (shape[0], rank, *[1] * (len(shape) - 2))
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        return None, (want_down, want_up)
    return (down, up), None


_PEFT_PREFIXES = ("unet.", "text_encoder_2.", "text_encoder.")  # longest first


def _plan(model, groups, lookup, configs, wrapped) -> tuple[list, list[str], int]:
    """(layer path, slice, down, up, alpha) per group that fits; what does not; how many of the stems in
    `wrapped` (PeftModel keys) found no alpha."""
    plan, bad, no_alpha = [], [], 0
    for stem, g in groups.items():
        if "down" not in g or "up" not in g:
            bad.append(f"{stem}: has {sorted(g)}, needs both down and up")
            continue
        fitted = want = None
        for part, layer_path, sl in lookup[stem]:  # several only for prefix-less PEFT names: te1 or te2
            fitted, want_here = _fit(g["down"], g["up"], _base_shape(model, layer_path, sl))
            want = want or want_here
            if fitted:
                break
        if not fitted:
            part, layer_path, sl = lookup[stem][0]
            bad.append(f"{stem}: down {tuple(g['down'].shape)} / up {tuple(g['up'].shape)} do not fit "
                       f"{layer_path}{'.' + sl if sl else ''} {_base_shape(model, layer_path, sl)} "
                       f"(want {want[0]} / {want[1]})")
            continue
        down, up = fitted
        module = next((stem[len(p):] for p in _PEFT_PREFIXES if stem.startswith(p)), stem)
        alpha = g["alpha"].item() if "alpha" in g else _peft_alpha(configs.get(part, {}), module, down.shape[0])
        if alpha is None:
            no_alpha += stem in wrapped
            alpha = down.shape[0]  # kohya's and diffusers' convention without one: alpha = rank, scale 1
        plan.append((layer_path, sl, down, up, alpha))
    return plan, bad, no_alpha


def load_lora(model: nn.Module, path: str | Path | dict, name: str = "default", scale: float = 1.0,
              merge: bool = False, strict: bool = True) -> list[str]:
    """Add adapter `name` to `model` from a kohya or diffusers / PEFT LoRA file, a PEFT adapter folder
    (or a state dict). See docs/lora.md, "File formats", for every spelling read.

    `model` is a SUPIR / SDXL tree, a ControlledUNet or a bare UNet (see model_parts). Stack LoRAs by
    loading each under its own name, each with its own `scale`. `merge=True` folds it into the weights.
    `strict=False` applies what fits and skips the rest (keys of kinds we do not load, keys for layers or
    parts the model lacks, layers whose shapes do not fit) with one warning that lists them, instead of
    raising. Returns the adapted module paths.
    """
    tensors, metadata = read_lora(path) if not isinstance(path, dict) else (path, {})
    parts = model_parts(model)
    lookup, example = _lookup(model, parts)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown, unmatched, wrapped = [], [], set()
    for key, value in tensors.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
        elif split[0] in lookup:
            groups.setdefault(split[0], {})[split[1]] = value
            if key.startswith("base_model.model."):  # a PeftModel's own file: its alpha is in adapter_config.json
                wrapped.add(split[0])
        else:
            unmatched.append(key)
    plan, bad, no_alpha = _plan(model, groups, lookup, _peft_configs(metadata), wrapped)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys of a kind we do not load (only plain LoRA down/up/alpha): "
                        f"{describe_keys(unknown)}: {_few(unknown, 3)}")
    if unmatched:
        problems.append(f"{len(unmatched)} keys match no layer of this model (parts present: {sorted(parts)}; "
                        f"expected names like {example}): {_few(unmatched)}")
    if bad:
        problems.append(f"{len(bad)} LoRA layers have wrong shapes or missing tensors: {_few(bad, 3)}")
    source = "state dict" if isinstance(path, dict) else str(path)
    if problems and strict:
        raise LoRAFileError(f"LoRA {source} does not fit the model: " + "; ".join(problems))
    if problems:
        warnings.warn(f"LoRA {source}: applied {len(plan)} layers, skipped " + "; ".join(problems))
    if no_alpha:
        warnings.warn(f"LoRA {source}: {no_alpha} layers of a PeftModel file come without lora_alpha (no "
                      f"adapter_config.json beside it): alpha = rank assumed, the strength may be wrong")
    return _apply(model, plan, name, scale, merge)


def _apply(model: nn.Module, plan: list, name: str, scale: float, merge: bool) -> list[str]:
    taken = sorted({p for p, *_ in plan if name in getattr(model.get_submodule(p), "lora", {})})
    if taken:
        raise ValueError(f"adapter {name!r} already exists on {_few(taken, 3)}; remove_lora it or pick another name")
    paths = []
    with torch.no_grad():
        for layer_path, sl, down, up, alpha in plan:
            layer = _wrapped(model, layer_path)
            if sl is None:
                adapter = layer.add_adapter(name, down.shape[0], alpha)
            else:  # one slice of bigG's fused in_proj: the layer's adapter holds up to three
                fused = layer.lora[name] if name in layer.lora else layer.add_adapter(name, 0, 0, slices="")
                adapter = fused.add(sl, down.shape[0], alpha, device=layer.weight.device, dtype=layer.weight.dtype)
                fused.scale = float(scale)
            adapter.down.copy_(down)
            adapter.up.copy_(up)
            adapter.scale = float(scale) if sl is None else 1.0
            if layer_path not in paths:
                paths.append(layer_path)
    if merge:
        merge_lora(model, name)
    return paths
