"""LoRA files written by the real tools load at the strength they meant: our UNet and both text towers with
each file applied (live and merged, scales 1.0 and 0.5) equal what diffusers / peft / transformers computed
with the same file. Files, recorded outputs and the script that made them: tests/data/lora_peers/ (diffusers
0.42.1, peft 0.21.2, transformers 5.24; the base weights are seeded, tests/peer_base.py). Only the committed
files are read: no peer package is imported here."""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peer_base
from mini_supir.lora import lora_layers, merge_lora, remove_lora, set_lora_scale, unmerge_lora
from mini_supir.lora_files import load_lora, read_lora, save_lora
from mini_supir.text import TINY_CLIP, MultiheadSelfAttention
from mini_supir.unet import timestep_embedding
from mini_supir.weights import check_keys

DATA = Path(__file__).parent / "data" / "lora_peers"
REF = load_file(str(DATA / "outputs.safetensors"))
# float32, the same products summed in another order (outputs |x| <= 17). Measured max abs errors: live
# 1.1e-6 against peft's live outputs, merged 9.5e-7 against peft's merged ones (merged against live differs
# by up to 1e-5 on both sides: W + BA is rounded once more).
ATOL = 2e-6
# case -> what a user passes (PEFT folders once as the folder, once as the file inside it)
FILES = {"diffusers": "diffusers.safetensors", "rslora": "rslora.safetensors",
         "diffusers_old": "diffusers_old.safetensors", "kohya": "kohya.safetensors",
         "peft_te1": "peft_te1", "peft_te2": "peft_te2/adapter_model.safetensors"}


@pytest.fixture(scope="module")
def base():
    return peer_base.base_tree()


def outputs(tree: peer_base.Tree) -> dict[str, torch.Tensor]:
    x = peer_base.inputs()
    te1, te2, unet = tree.parts().values()
    with torch.no_grad():
        hidden = te1(x["ids"]).hidden_states
        big = te2(x["ids"])
        y = torch.cat([x["pooled"], timestep_embedding(x["time_ids"].flatten(), peer_base.SIZE_EMBED).view(1, -1)], 1)
        eps = unet(x["x"], x["t"], x["context"], y)
    return {"te1.hidden": hidden[TINY_CLIP.layer_idx], "te1.last": hidden[-1], "te2.penultimate": big.penultimate,
            "te2.pooled": big.pooled, "unet.eps": eps}


def max_errors(tree, case: str, scale: float, mode: str = "live") -> dict[str, float]:
    prefix = f"{case}.{mode}{scale:g}."
    ours = outputs(tree)
    names = [k[len(prefix):] for k in REF if k.startswith(prefix)]
    assert names, f"no recorded outputs for {prefix}"
    return {n: (ours[n] - REF[prefix + n]).abs().max().item() for n in names}


def test_base_models_equal_the_peers(base):
    errors = max_errors(base, "base", 0)
    assert len(errors) == 5 and max(errors.values()) <= ATOL, errors


@pytest.mark.parametrize("merge", [False, True], ids=["live", "merged"])
@pytest.mark.parametrize("case", FILES)
def test_peer_file_gives_the_peers_outputs(base, case, merge):
    tree = copy.deepcopy(base)
    with torch.no_grad():
        load_lora(tree, DATA / FILES[case], "peer", merge=merge)
    for scale in (1.0, 0.5):
        set_lora_scale(tree, "peer", scale)
        errors = max_errors(tree, case, scale, "merged" if merge else "live")
        assert max(errors.values()) <= ATOL, (scale, errors)
        moved = max_errors(base, case, scale)  # the LoRA changes what it adapts well beyond the tolerance
        assert all(moved[n] > 1e-3 for n in errors), moved
    set_lora_scale(tree, "peer", 0.0)
    assert max(max_errors(tree, "base", 0).values()) <= ATOL


def test_bigG_qkv_adapters_are_slices_of_the_fused_in_proj(base):
    tree = copy.deepcopy(base)
    load_lora(tree, DATA / "kohya.safetensors", "peer", scale=0.5)
    attn = tree.conditioner.embedders[1].model.transformer.resblocks[1].attn
    assert sorted(attn.lora["peer"]) == ["k", "q", "v"]
    # official parameter names unchanged: a bigG checkpoint still loads, strictly, into the adapted tower
    tower = tree.conditioner.embedders[1].model
    official = base.conditioner.embedders[1].model.state_dict()
    assert "transformer.resblocks.1.attn.in_proj_weight" in tower.state_dict()
    tower.load_state_dict(official, strict=True)
    check_keys(tower, official)
    tensors, _ = read_lora(DATA / "kohya.safetensors")
    w0 = attn.in_proj_weight.detach().clone()
    merge_lora(tree, "peer")
    for i, sl in enumerate("qkv"):  # each kohya projection lands on its own third of the rows, nowhere else
        stem = f"lora_te2_text_model_encoder_layers_1_self_attn_{sl}_proj"
        delta = 0.5 * tensors[stem + ".alpha"].item() / 2 * tensors[stem + ".lora_up.weight"] @ tensors[stem + ".lora_down.weight"]
        torch.testing.assert_close(attn.in_proj_weight[64 * i:64 * (i + 1)] - w0[64 * i:64 * (i + 1)], delta,
                                   atol=1e-6, rtol=0)
    unmerge_lora(tree, "peer")
    assert torch.equal(attn.in_proj_weight, w0)
    remove_lora(tree, "peer")  # back to the plain attention, holding the same parameters
    plain = tower.transformer.resblocks[1].attn
    assert type(plain) is MultiheadSelfAttention and plain.in_proj_weight is attn.in_proj_weight
    assert not lora_layers(tree)


def test_peft_folder_alpha_comes_from_adapter_config(base):
    tensors, metadata = read_lora(DATA / "peft_te1")
    assert json.loads(metadata["adapter_config"])["lora_alpha"] == 6
    tree = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="without lora_alpha"):  # the bare tensors: alpha = r, said so
        load_lora(tree, tensors, "bare")
    assert max(max_errors(tree, "peft_te1", 1.0).values()) > 1e-2


@pytest.mark.parametrize("case", FILES)
def test_resaved_as_kohya_keeps_the_strength(base, case, tmp_path):
    tree = copy.deepcopy(base)
    load_lora(tree, DATA / FILES[case], "peer")
    save_lora(tree, tmp_path / "ours.safetensors", "peer")
    fresh = copy.deepcopy(base)
    load_lora(fresh, tmp_path / "ours.safetensors", "peer", scale=0.5)
    assert max(max_errors(fresh, case, 0.5).values()) <= ATOL
    keys = set(read_lora(tmp_path / "ours.safetensors")[0])
    has_te2 = any(k.startswith(f"{case}.live1.te2") for k in REF)
    assert has_te2 == ("lora_te2_text_model_encoder_layers_0_self_attn_v_proj.alpha" in keys)


@pytest.mark.parametrize("case, rename", [
    ("diffusers", {"text_encoder.encoder.": "text_encoder.text_model.encoder.",  # transformers 4 names
                   "text_encoder_2.text_model.encoder.": "text_encoder_2.encoder."}),  # transformers 5 names
    ("kohya", {"lora_te1_text_model_encoder_": "lora_te1_encoder_",  # convert_state_dict_to_kohya on transformers 5
               "lora_te2_text_model_encoder_": "lora_te2_encoder_"}),
], ids=["diffusers-text_model-swapped", "kohya-transformers5"])
def test_other_spellings_of_the_same_file(base, case, rename, tmp_path):
    tensors, metadata = read_lora(DATA / FILES[case])
    renamed = {}
    for key, value in tensors.items():
        for old, new in rename.items():
            key = key.replace(old, new)
        renamed[key] = value
    assert set(renamed) != set(tensors)
    save_file(renamed, tmp_path / "renamed.safetensors", metadata=metadata)  # alpha stays where it was
    tree = copy.deepcopy(base)
    load_lora(tree, tmp_path / "renamed.safetensors", "peer")
    assert max(max_errors(tree, case, 1.0).values()) <= ATOL
