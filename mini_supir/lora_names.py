"""Where each of our layers sits in the LoRA files others write: kohya's `lora_unet_…` / `lora_te1_…` /
`lora_te2_…` stems in sgm or diffusers paths, diffusers / PEFT keys, transformers 4 and 5 text-encoder names,
PeftModel folders. Foreign names are converted here, at the edge: `unet_diffusers_names` derives the diffusers
UNet layout from the UNetConfig, `layer_names` lists every spelling of each of our layers, `split_key` reads a
tensor key into (module stem, role). lora_files.py reads and writes the files with these names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from .esrgan import RRDBNet, SRVGGNetCompact
from .lora import FusedLoRAAdapter
from .text import MultiheadSelfAttention
from .unet import UNetConfig

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


def rename(path: str, table: dict[str, str]) -> str | None:
    """`path` with its longest prefix (whole dotted components) found in `table` replaced; None if none is."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in table:
            return ".".join([table[head], *parts[i:]])
    return None


# bigG is stored with open_clip names; kohya and diffusers name its layers as Hugging Face's CLIPTextModel,
# where the fused in_proj (addressed as <attn>.q / .k / .v here) is three Linears q_proj / k_proj / v_proj.
_OPENCLIP_TO_HF = ((r"^transformer\.resblocks\.(\d+)\.attn\.out_proj$", r"text_model.encoder.layers.\1.self_attn.out_proj"),
                   (r"^transformer\.resblocks\.(\d+)\.attn\.([qkv])$", r"text_model.encoder.layers.\1.self_attn.\2_proj"),
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
    # a stage-1 pixel restorer (esrgan.py) given as the root: its convs under BasicSR's module names
    "stage1": _Part("lora_stage1_", None, ()),
}
STAGE1_NETS = (RRDBNet, SRVGGNetCompact)


def model_parts(root: nn.Module) -> dict[str, str]:
    """Part name -> module path under `root` ('' = root itself) of the parts LoRA files address.

    `root` may be a whole SUPIR / SDXL tree, a ControlledUNet, or a bare UNet / GLVControl / any module
    (a bare module other than the control encoder counts as the UNet), or a stage-1 network (esrgan.py).
    """
    if isinstance(root, STAGE1_NETS):
        return {"stage1": ""}
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


def _text_stems(part: str, hf: str) -> list[str]:
    """Every key stem a file may spell a text-encoder layer with (Hugging Face name `hf`, 'text_model.…').

    transformers 5 dropped CLIPTextModel's `text_model.` level, so diffusers on it writes
    `text_encoder.encoder.layers.0…` (and its kohya converter `lora_te1_encoder_layers_0…`); a PeftModel
    folder has no part prefix at all (the part is told apart by the tensors' shapes, see _plan)."""
    spec = PARTS[part]
    names = []
    for name in (hf, hf.removeprefix("text_model.")):
        names += [spec.kohya + name.replace(".", "_"), spec.peft + name, name]
    if part == "te1":
        names.append("lora_te_" + hf.replace(".", "_"))  # single-text-encoder kohya files (SD 1.x)
    return names


def layer_names(part: str, part_module: nn.Module, path: str, layer: nn.Module) -> list[tuple[str | None, str | None, list[str]]]:
    """[(slice, the kohya key stem we save under, every key stem a file may use)] for layer `path` of a
    part; bigG's fused attention has one entry per q / k / v slice, every other layer one with slice None."""
    spec = PARTS[part]
    if isinstance(layer, MultiheadSelfAttention):
        return [(sl, spec.kohya + hf.replace(".", "_"), _text_stems(part, hf))
                for sl in FusedLoRAAdapter.SLICES if (hf := _openclip_hf_name(f"{path}.{sl}"))]
    if part in ("te1", "te2"):
        hf = _openclip_hf_name(path) if part == "te2" else path
        return [(None, spec.kohya + hf.replace(".", "_"), _text_stems(part, hf))] if hf else [(None, None, [])]
    names = []
    if part == "unet":  # diffusers' paths for the same layer
        cfg = getattr(part_module, "cfg", None)
        diffusers = rename(path, _diffusers_table(cfg)) if isinstance(cfg, UNetConfig) else None
        if diffusers:
            names = [spec.kohya + diffusers.replace(".", "_"), spec.peft + diffusers, diffusers]
    names += [spec.kohya + path.replace(".", "_")] + ([spec.peft + path] if spec.peft else [])
    return [(None, spec.kohya + path.replace(".", "_"), names)]


# (suffix, role) of every tensor key we understand; the rest of the key names the module.
_ROLES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
          (".lora_A.weight", "down"), (".lora_B.weight", "up"),
          (".lora.down.weight", "down"), (".lora.up.weight", "up"),
          # diffusers' text-encoder LoRAs before PEFT (and convert_state_dict_to_diffusers today):
          # text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight
          (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
          # diffusers' attention-processor files: ...attn1.processor.to_q_lora.down.weight
          ("_lora.down.weight", "down"), ("_lora.up.weight", "up"))

# What the keys we do not load are, for the error (substring -> name); first match wins.
_KINDS = (("hada_", "LoHa"), ("lokr_", "LoKr"), ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"),
          ("lora_mid", "LoCon Tucker (lora_mid)"), ("oft_", "OFT"), ("ia3", "IA3"), ("lora_embedding", "embedding LoRA"),
          (".diff_b", "bias diffs"), (".diff", "full weight diffs"), ("bias", "bias tensors"))


def describe_keys(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for key in keys:
        kind = next((name for sub, name in _KINDS if sub in key), "unknown")
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} ({n})" for kind, n in counts.items())


def split_key(key: str) -> tuple[str, str] | None:
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
