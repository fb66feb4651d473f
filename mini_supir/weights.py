"""Where the official weights live, and how they get into our modules.

Our module tree mirrors the official checkpoint keys, so loading is: read tensors (memory-mapped
safetensors, or a pickle read with `weights_only=True`), keep the prefixes the model owns, cast, and
`load_state_dict(strict=True, assign=True)` into a model built on the meta device. `assign=True` makes the
file's tensors the parameters themselves, so host RAM peaks at about one copy of the weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR = Path(os.environ.get("MINI_SUPIR_WEIGHTS", Path(__file__).resolve().parents[1] / "weights"))


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    note: str = ""


# The files users actually run SUPIR with (see ../shared/WEIGHTS.md). SUPIR itself is only released on
# Google Drive / Baidu as fp32 pickles; Kijai's pruned fp16 safetensors mirror is what ComfyUI users load.
REGISTRY = {
    "sdxl": HubFile("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0_0.9vae.safetensors",
                    "SDXL base 1.0 single file with the 0.9 VAE, as SUPIR uses (6.9 GB)"),
    "sdxl-1.0vae": HubFile("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors"),
    "juggernaut-xl-v9": HubFile("RunDiffusion/Juggernaut-XL-v9", "Juggernaut-XL_v9_RunDiffusionPhoto_v2.safetensors"),
    "Q": HubFile("Kijai/SUPIR_pruned", "SUPIR-v0Q_fp16.safetensors", "SUPIR v0Q (quality), fp16, SUPIR keys only"),
    "F": HubFile("Kijai/SUPIR_pruned", "SUPIR-v0F_fp16.safetensors", "SUPIR v0F (fidelity), fp16, SUPIR keys only"),
    "Q-official": HubFile("camenduru/SUPIR", "SUPIR-v0Q.ckpt", "official fp32 pickle"),
    "F-official": HubFile("camenduru/SUPIR", "SUPIR-v0F.ckpt", "official fp32 pickle"),
    "lightning-4step": HubFile("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_lora.safetensors"),
    "lightning-8step": HubFile("ByteDance/SDXL-Lightning", "sdxl_lightning_8step_lora.safetensors"),
}

# Keys official files carry that no inference module owns: the denoiser's sigma table (we recompute it),
# SUPIR's training-only LQ mask, the VAE training loss, EMA copies, the OpenCLIP visual tower.
IGNORED_PREFIXES = ("denoiser.", "mask_LQ", "first_stage_model.loss.", "model_ema.", "conditioner.embedders.1.model.visual.",
                    "lora_")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or not matching the model (one clear line)."""


class WeightsError(Exception):
    """Weights that cannot be used, as (file or option, problem): the tools print `error: FILE: PROBLEM`."""


def _hub_file(spec: str) -> HubFile | None:
    if spec in REGISTRY:
        return REGISTRY[spec]
    if spec.count("/") >= 2 and not spec.startswith((".", "/", "~")):
        owner, name, filename = spec.split("/", 2)
        return HubFile(f"{owner}/{name}", filename)
    return None


def find_local(spec: str | os.PathLike) -> Path | None:
    """Where `spec` already is on this machine (the path itself, weights/<file>, the hub cache), or None."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    hub = _hub_file(str(spec))
    if hub is None:
        return None
    if (WEIGHTS_DIR / hub.filename).exists():
        return WEIGHTS_DIR / hub.filename
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(hub.repo_id, hub.filename, cache_dir=WEIGHTS_DIR / "hub")
    return Path(cached) if isinstance(cached, str) else None


def offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("MINI_SUPIR_OFFLINE", "HF_HUB_OFFLINE"))


def resolve(spec: str | os.PathLike, download: bool = True) -> Path:
    """A local path, a registry name (`sdxl`, `Q`, `F`, …) or `repo_id/filename` on the Hugging Face hub
    (downloaded into weights/hub unless `download` is off or MINI_SUPIR_OFFLINE / HF_HUB_OFFLINE is set)."""
    local = find_local(spec)
    if local is not None:
        return local
    hub = _hub_file(str(spec))
    if hub is None:
        raise CheckpointError(f"no such file: {spec} (give a local path, a registry name {sorted(REGISTRY)} or repo_id/filename)")
    hint = f"download {hub.filename} from huggingface.co/{hub.repo_id} and put it at {WEIGHTS_DIR / hub.filename}"
    if offline() or not download:
        raise CheckpointError(f"not here{' and downloads are off' if download else ''}: {hint}")
    import logging
    from huggingface_hub import hf_hub_download
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # offline, its retries log a line each; the error below says it all
    try:
        return Path(hf_hub_download(hub.repo_id, hub.filename, cache_dir=WEIGHTS_DIR / "hub"))
    except Exception as e:  # offline, gated, typo: one message that says what to fetch and where to put it
        raise CheckpointError(f"could not download it ({type(e).__name__}): {hint}, or pass its path") from None
    finally:
        hub_log.setLevel(level)


def resolve_all(specs: list[str | os.PathLike]) -> dict[str, Path]:
    """{spec: path} for every spec, or one WeightsError naming every file that is missing. Nothing is
    downloaded while a local file is missing, so a typo is reported before a 6.9 GB download, not after."""
    found = {str(s): find_local(s) for s in specs}
    missing = [s for s, p in found.items() if p is None and _hub_file(s) is None]
    if not missing and offline():
        missing = [s for s, p in found.items() if p is None]
    if missing:
        problems = []
        for s in missing:
            try:
                resolve(s)
            except CheckpointError as e:
                problems.append(str(e))
        raise WeightsError(", ".join(missing), "; ".join(problems))
    paths, failed = {}, {}
    for s, p in found.items():
        try:  # after a failed download (no network?) the other missing files are named without trying
            paths[s] = p if p is not None else resolve(s, download=not failed)
        except CheckpointError as e:
            failed[s] = str(e)
    if failed:
        raise WeightsError(", ".join(failed), "; ".join(failed.values()))
    return paths


def read_state_dict(path: str | os.PathLike, dtype: torch.dtype | dict[str, torch.dtype] | None = None,
                    containers: tuple[str, ...] = ("state_dict",)) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or a (weights-only) pickle, cast tensor by tensor as they are read
    (`dtype` may map key prefixes to dtypes; the longest matching prefix wins). A pickle's state dict may sit
    under the first of `containers` it has (Lightning's "state_dict", BasicSR's "params_ema" / "params")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                sd = {k: _cast(f.get_tensor(k), _dtype_for(k, dtype)) for k in keys}
        except Exception as e:
            raise CheckpointError(f"{path.name} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path.name} is not a readable weights-only checkpoint: {str(e).splitlines()[0]}") from None
        if isinstance(obj, dict):
            obj = next((obj[k] for k in containers if isinstance(obj.get(k), dict)), obj)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path.name} holds no state dict")
        sd = {k: _cast(v, _dtype_for(k, dtype)) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return sd


def _dtype_for(key: str, dtype):
    if not isinstance(dtype, dict):
        return dtype
    matches = [p for p in dtype if key.startswith(p)]
    return dtype[max(matches, key=len)] if matches else None


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with it removed (e.g. a single-file SDXL split into its parts)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def check_keys(model: nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint", partial: bool = False) -> None:
    """Raise one CheckpointError naming missing (unless `partial`: one of several files), unexpected and
    wrongly shaped keys (first few of each)."""
    expected = model.state_dict(keep_vars=True)
    missing = [] if partial else [k for k in expected if k not in sd and not _optional(model, k)]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    problems = [f"{len(v)} {name}: {', '.join(v[:4])}{' …' if len(v) > 4 else ''}"
                for name, v in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", shapes)) if v]
    if problems:
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(problems))


def _optional(model: nn.Module, key: str) -> bool:
    # Modules may declare state-dict keys that files are allowed to omit (CLIP's position_ids buffer).
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return name in getattr(module, "optional_keys", ())


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint") -> nn.Module:
    """Strict load with `assign=True` (meta-built models take the file's tensors as their parameters)."""
    check_keys(model, sd, what)
    model.load_state_dict(sd, strict=False, assign=True)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{what}: {len(still_meta)} tensors were not loaded: {', '.join(still_meta[:4])}")
    return model
