"""Text conditioning: checkpoint layout at full size, position_ids loading, tokenizer edge cases, tiny encode."""
import json

import pytest
import torch

from fixtures import REFERENCE
from mini_supir import unet
from mini_supir.text import (CLIP_L, EOT, OPENCLIP_BIGG, SOT, TINY_CLIP, TINY_OPENCLIP, CLIPTextModel,
                             Conditioner, clean_text, tokenize)

MANIFEST = REFERENCE / "manifests" / "sdxl_base.json"


@pytest.mark.skipif(not MANIFEST.exists(), reason="no reference manifests")
def test_full_size_keys_match_sdxl_manifest():
    manifest = json.loads(MANIFEST.read_text())["keys"]
    expected = {k: (v["shape"], v["dtype"]) for k, v in manifest.items() if k.startswith("conditioner.")}
    with torch.device("meta"):
        conditioner = Conditioner(CLIP_L, OPENCLIP_BIGG)
    ours = {"conditioner." + k: (list(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in conditioner.state_dict().items()}
    assert ours == expected
    assert CLIP_L.hidden_size + OPENCLIP_BIGG.width == unet.SDXL_BASE.context_dim
    assert OPENCLIP_BIGG.embed_dim + 3 * 2 * 256 == unet.SDXL_BASE.adm_in_channels


def test_tiny_conditioner_feeds_the_tiny_unet():
    torch.manual_seed(0)
    out = Conditioner(TINY_CLIP, TINY_OPENCLIP).encode(["a photo", "x"])
    assert out["crossattn"].shape == (2, 77, unet.TINY.context_dim)
    assert out["vector"].shape == (2, unet.TINY.adm_in_channels)


@pytest.mark.parametrize("stored", ["int", "float", "missing"])
def test_clip_position_ids_are_ignored_on_load(stored):
    torch.manual_seed(0)
    source = CLIPTextModel(TINY_CLIP)
    ids = tokenize(["a photo of a cat", "x"])
    want = source(ids).last_hidden_state
    state = source.state_dict()
    key = "text_model.embeddings.position_ids"
    if stored == "float":
        state[key] = state[key].float() + 0.3  # as some converted checkpoints store it, even slightly off
    elif stored == "missing":
        del state[key]
    with torch.device("meta"):
        model = CLIPTextModel(TINY_CLIP)
    model.load_state_dict(state, strict=True, assign=True)
    assert model.text_model.embeddings.position_ids.dtype == torch.long
    assert torch.equal(model.text_model.embeddings.position_ids, torch.arange(77)[None])
    assert torch.equal(model(ids).last_hidden_state, want)


def test_tokenizer_truncates_long_text_and_pads():
    ids = tokenize(["word " * 200, ""], pad="zero")
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 0] == SOT and ids[0, 76] == EOT and (ids[0, 1:76] != EOT).all() and (ids[0] != 0).all()
    assert ids[1, :2].tolist() == [SOT, EOT] and (ids[1, 2:] == 0).all()
    assert (tokenize("", pad="eos")[0, 1:] == EOT).all()


def test_clean_text_normalises_like_ftfy_and_clip():
    assert clean_text("  ＡＢＣ ﬁne “Curly” ‘x’ &amp;amp; \x1b[31mred\x1b[0m  ") == 'abc fine "curly" \'x\' & red'
    assert tokenize("<|endoftext|>")[0, :3].tolist() == [SOT, EOT, EOT]


def test_tiny_conditioner_encode_shapes_and_batch_independence():
    torch.manual_seed(0)
    conditioner = Conditioner(TINY_CLIP, TINY_OPENCLIP)
    out = conditioner.encode(["a cat", "a dog on a sofa"], original_size=(768, 1344))
    assert out["crossattn"].shape == (2, 77, 96) and out["vector"].shape == (2, 1584)
    single = conditioner.encode(["a dog on a sofa"], original_size=(768, 1344))
    torch.testing.assert_close(single["crossattn"][0], out["crossattn"][1])
    torch.testing.assert_close(single["vector"][0], out["vector"][1])
