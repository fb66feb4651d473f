"""LoRA adapters (mini_supir/lora.py): math, merge/unmerge, the kohya and diffusers/PEFT file formats."""
import copy
import datetime
import hashlib
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mini_supir.control import ControlledUNet
from mini_supir.lora import ATTENTION, TEXT, TRANSFORMER, LoRAAdapter, LoRAConv2d, LoRAFileError, LoRALinear, inject_lora, lora_layers, lora_parameters, merge_lora, remove_lora, set_lora_scale, unmerge_lora
from mini_supir.lora_files import load_lora, read_lora, save_lora
from mini_supir.lora_names import unet_diffusers_names
from mini_supir.text import TINY_CLIP, TINY_OPENCLIP, Conditioner
from mini_supir.unet import SDXL_BASE, TINY, UNet, UNetConfig
from mini_supir.weights import check_keys


def randomize_up(module, name, std=0.1, seed=1):
    """Trained-looking adapters: B = 0 would make every test below trivially pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(module).values():
            for a in layer.lora[name].modules():  # a fused q/k/v adapter (bigG) holds three
                if isinstance(a, LoRAAdapter):
                    a.up.copy_(torch.randn(a.up.shape, generator=g).to(a.up.dtype) * std)


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([700]),
            torch.randn(1, 4, TINY.context_dim, generator=g), torch.randn(1, TINY.adm_in_channels, generator=g))


@pytest.fixture(scope="module")
def base_unet():
    torch.manual_seed(0)
    return UNet(TINY).eval()


def layers(dtype=torch.float32):
    torch.manual_seed(0)
    return [nn.Linear(24, 40).to(dtype), nn.Conv2d(8, 16, 3, padding=1, stride=2).to(dtype)]


def sample_input(layer, dtype=torch.float32):
    return torch.randn(3, 24, dtype=dtype) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 10, 10, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_adapter_path_and_unmerge_restores_weight_exactly(dtype):
    for base in layers(dtype):
        x = sample_input(base, dtype)
        holder = nn.Sequential(base)
        w0 = base.weight.detach().clone()
        inject_lora(holder, "a", rank=4, alpha=8, targets=("0",))
        inject_lora(holder, "b", rank=2, alpha=2, targets=("0",))
        layer = holder[0]
        assert isinstance(layer, LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d)
        assert layer.weight is base.weight  # the wrapped layer keeps the very same parameter
        randomize_up(holder, "a", seed=1)
        randomize_up(holder, "b", seed=2)
        with torch.no_grad():
            y = layer(x)
            merge_lora(holder)
            assert not torch.equal(layer.weight, w0)
            y_merged = layer(x)
            tol = 1e-5 if dtype == torch.float32 else 0.1
            torch.testing.assert_close(y_merged, y, atol=tol, rtol=tol)
            unmerge_lora(holder, "a")  # not the last merged: b is taken out and put back around it
            assert "b" in layer.merged and "a" not in layer.merged
            torch.testing.assert_close(layer(x), y, atol=tol, rtol=tol)
            unmerge_lora(holder)
        assert torch.equal(layer.weight, w0), "unmerge must restore W bit for bit"

        # Folding b for good while a stays merged: unmerging a later leaves exactly W0 + delta_b.
        reference = copy.deepcopy(holder)
        remove_lora(reference, "b", merge=True)
        merge_lora(holder, "a")
        merge_lora(holder, "b")
        remove_lora(holder, "b", merge=True)
        unmerge_lora(holder, "a")
        assert torch.equal(holder[0].weight, reference[0].weight) and not torch.equal(holder[0].weight, w0)


def test_bf16_merge_needs_and_keeps_the_rounding_fixups():
    # (W + d) - d does not round back to W everywhere in bf16; the merge record covers those entries.
    holder = nn.Sequential(layers(torch.bfloat16)[0])
    inject_lora(holder, "a", rank=8, alpha=8, targets=("0",))
    randomize_up(holder, "a", std=2.0)
    w0 = holder[0].weight.detach().clone()
    merge_lora(holder)
    assert holder[0].merged["a"].index.numel() > 0
    unmerge_lora(holder)
    assert torch.equal(holder[0].weight, w0)


def test_fresh_adapter_is_the_base_model_and_two_adapters_add(base_unet):
    for base in layers():
        x = sample_input(base)
        with torch.no_grad():
            y0 = base(x)
            holder = nn.Sequential(copy.deepcopy(base))
            inject_lora(holder, "a", rank=4, alpha=8, targets=("0",), dropout=0.1)
            holder.eval()
            assert torch.equal(holder(x), y0), "B = 0 at init: output equals the base layer's"
            inject_lora(holder, "b", rank=2, alpha=1, targets=("0",))
            randomize_up(holder, "a", seed=1)
            randomize_up(holder, "b", seed=2)
            layer = holder[0]
            set_lora_scale(holder, "a", 0.7)
            set_lora_scale(holder, "b", -1.5)
            delta = 0.7 * layer.lora["a"].delta(8 / 4) - 1.5 * layer.lora["b"].delta(1 / 2)
            expect = (nn.functional.linear(x, base.weight + delta, base.bias) if isinstance(base, nn.Linear) else
                      nn.functional.conv2d(x, base.weight + delta, base.bias, stride=2, padding=1))
            torch.testing.assert_close(holder(x), expect, atol=1e-5, rtol=1e-5)
            set_lora_scale(holder, "a", 0.0)
            set_lora_scale(holder, "b", 0.0)
            assert torch.equal(holder(x), y0)
    # training sees only the adapters' parameters
    unet = copy.deepcopy(base_unet)
    names = inject_lora(unet, "a", rank=4)
    assert len(lora_parameters(unet, "a")) == 2 * len(names) == 2 * 8 * 11  # 11 transformer blocks in TINY


def test_official_state_dict_still_loads_after_injection(base_unet):
    unet = copy.deepcopy(base_unet)
    official = {k: v.clone() for k, v in base_unet.state_dict().items()}
    inject_lora(unet, "a", rank=4, targets=TRANSFORMER)
    assert "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in unet.state_dict()
    result = unet.load_state_dict(official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    check_keys(unet, official)  # the project's checkpoint loader accepts it too
    # and the adapters' own keys round-trip through an ordinary state dict
    randomize_up(unet, "a")
    fresh = copy.deepcopy(base_unet)
    inject_lora(fresh, "a", rank=4, targets=TRANSFORMER)
    fresh.load_state_dict(unet.state_dict(), strict=True)
    assert all(torch.equal(p, q) for p, q in zip(lora_parameters(fresh), lora_parameters(unet)))


def test_remove_lora_restores_plain_layers_or_bakes_the_delta(base_unet):
    unet = copy.deepcopy(base_unet)
    args = unet_inputs()
    inject_lora(unet, "a", rank=4, targets=ATTENTION + ("in_layers.2",))
    randomize_up(unet, "a")
    with torch.no_grad():
        merge_lora(unet)
        remove_lora(unet, "a", merge=False)  # unmerges first: exactly the base model again
        assert type(unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q) is nn.Linear
        assert type(unet.input_blocks[1][0].in_layers[2]) is nn.Conv2d
        assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), base_unet.state_dict().values()))
        inject_lora(unet, "a", rank=4, targets=ATTENTION + ("in_layers.2",))
        randomize_up(unet, "a")
        y_lora = unet(*args)
        remove_lora(unet, merge=True)
        assert not lora_layers(unet)
        torch.testing.assert_close(unet(*args), y_lora, atol=1e-4, rtol=1e-4)


def test_kohya_round_trip_is_exact_with_metadata(base_unet, tmp_path):
    unet = copy.deepcopy(base_unet)
    targets = TRANSFORMER + ("in_layers.2", "out_layers.3", "op", "output_blocks.*.conv")
    inject_lora(unet, "style", rank=4, alpha=2, targets=targets)
    randomize_up(unet, "style")
    path = tmp_path / "style.safetensors"
    info = save_lora(unet, path, "style", metadata={"ss_learning_rate": "1e-4", "ss_max_train_steps": 500})
    tensors, meta = read_lora(path)

    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    q = unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q
    assert tensors[stem + ".lora_down.weight"].shape == (4, q.in_features)
    assert tensors[stem + ".lora_up.weight"].shape == (q.out_features, 4)
    assert tensors[stem + ".alpha"].shape == () and tensors[stem + ".alpha"].item() == 2
    assert tensors["lora_unet_output_blocks_2_2_conv.lora_down.weight"].shape == (4, 64, 3, 3)
    assert tensors["lora_unet_output_blocks_2_2_conv.lora_up.weight"].shape == (64, 4, 1, 1)
    assert "lora_unet_input_blocks_3_0_op.alpha" in tensors
    assert meta == info
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("4", "2", "networks.lora")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_max_train_steps"] == "500"
    assert "attn1.to_q" in meta["mini_supir.targets"]
    # kohya's ModelSpec / addnet keys, so that A1111, ComfyUI and civitai show the file properly
    assert (meta["modelspec.resolution"], meta["modelspec.prediction_type"]) == ("1024x1024", "epsilon")
    assert datetime.datetime.fromisoformat(meta["modelspec.date"]).year >= 2024
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}  # 3x3 convs adapted
    data = path.read_bytes()
    tensor_bytes = data[8 + int.from_bytes(data[:8], "little"):]  # how A1111 hashes a file (addnet hash)
    assert meta["sshs_model_hash"] == hashlib.sha256(tensor_bytes).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]

    other = copy.deepcopy(base_unet)
    loaded = load_lora(other, path, "style")
    assert sorted(loaded) == sorted(lora_layers(unet))
    for p, layer in lora_layers(unet).items():
        mine, theirs = layer.lora["style"], other.get_submodule(p).lora["style"]
        assert torch.equal(mine.down, theirs.down) and torch.equal(mine.up, theirs.up) and mine.alpha == theirs.alpha
    with torch.no_grad():
        assert torch.equal(other(*unet_inputs()), unet(*unet_inputs()))


def test_diffusers_names_follow_the_config():
    sdxl = unet_diffusers_names(SDXL_BASE)
    known = {  # written out by hand from diffusers' SDXL UNet2DConditionModel
        "input_blocks.0.0": "conv_in",
        "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.1": "down_blocks.1.attentions.0",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.8.1": "down_blocks.2.attentions.1",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks.0.1": "up_blocks.0.attentions.0",
        "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.8.0.out_layers.3": "up_blocks.2.resnets.2.conv2",
        "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1", "out.2": "conv_out",
    }
    assert {k: sdxl[k] for k in known} == known
    assert "output_blocks.8.1" not in sdxl and "input_blocks.1.1" not in sdxl  # no attention at full resolution

    # Another layout: 2 levels, 1 res block, attention only at full resolution.
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                     transformer_depth=(1, 1), num_head_channels=16, context_dim=16, adm_in_channels=8)
    names = unet_diffusers_names(cfg)
    assert {k: names.get(k) for k in ("input_blocks.1.1", "input_blocks.2.0.op", "input_blocks.3.0.in_layers.2",
                                      "output_blocks.1.1.conv", "output_blocks.2.1", "output_blocks.3.1")} == {
        "input_blocks.1.1": "down_blocks.0.attentions.0", "input_blocks.2.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.3.0.in_layers.2": "down_blocks.1.resnets.0.conv1",
        "output_blocks.1.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.2.1": "up_blocks.1.attentions.0", "output_blocks.3.1": "up_blocks.1.attentions.1"}

    # Every Linear / Conv2d of each UNet gets exactly one diffusers name.
    from mini_supir.lora_names import rename
    for c in (SDXL_BASE, TINY, cfg):
        with torch.device("meta"):
            unet = UNet(c)
        table = unet_diffusers_names(c)
        paths = [p for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        renamed = [rename(p, table) for p in paths]
        assert None not in renamed and len(set(renamed)) == len(paths)


def test_peft_and_diffusers_spelled_files_land_on_the_right_modules(base_unet, tmp_path):
    unet = copy.deepcopy(base_unet)
    g = torch.Generator().manual_seed(3)
    r = 2
    peft, peft_old, kohya = (".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"), \
        (".lora_down.weight", ".lora_up.weight")
    expected = {  # file key stem -> (our module, how the file spells down / up)
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", peft),
        "unet.up_blocks.0.upsamplers.0.conv": ("output_blocks.2.2.conv", peft),
        "unet.mid_block.attentions.0.proj_in": ("middle_block.1.proj_in", peft_old),
        "lora_unet_up_blocks_1_resnets_2_conv_shortcut": ("output_blocks.5.0.skip_connection", kohya),
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0":
            ("input_blocks.8.1.transformer_blocks.0.attn2.to_out.0", kohya),
    }
    sd = {}
    for stem, (path, (down_suffix, up_suffix)) in expected.items():
        w = unet.get_submodule(path).weight
        sd[stem + down_suffix] = torch.randn(r, *w.shape[1:], generator=g)
        sd[stem + up_suffix] = torch.randn(w.shape[0], r, *[1] * (w.dim() - 2), generator=g)
    sd["lora_unet_up_blocks_1_resnets_2_conv_shortcut.alpha"] = torch.tensor(0.5)
    file = tmp_path / "peft.safetensors"
    save_file(sd, str(file))
    loaded = load_lora(unet, file, "x", scale=0.5)
    assert sorted(loaded) == sorted(path for path, _ in expected.values())
    for stem, (path, (down_suffix, up_suffix)) in expected.items():
        a = unet.get_submodule(path).lora["x"]
        assert torch.equal(a.down, sd[stem + down_suffix]) and torch.equal(a.up, sd[stem + up_suffix])
        assert a.alpha == (0.5 if stem.startswith("lora_unet_up") else r)  # no alpha in the file: alpha = rank
        assert a.scale == 0.5


def test_mismatched_files_give_clear_errors(base_unet, tmp_path):
    unet = copy.deepcopy(base_unet)
    q = unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q
    good = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    sd = {good + ".lora_down.weight": torch.zeros(2, q.in_features), good + ".lora_up.weight": torch.zeros(q.out_features, 2),
          "lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(2, 4),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)}
    with pytest.raises(LoRAFileError, match=r"2 keys match no layer.*input_blocks_99_1_proj_in"):
        load_lora(unet, sd, "x")
    assert not lora_layers(unet), "a failed load changes nothing"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_lora(unet, sd, "x", strict=False) == ["input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    assert "match no layer" in str(caught[0].message)
    wrong = {good + ".lora_down.weight": torch.zeros(2, q.in_features + 1), good + ".lora_up.weight": torch.zeros(q.out_features, 2)}
    with pytest.raises(LoRAFileError, match=r"wrong shapes.*want \(2, 64\)"):
        load_lora(unet, wrong, "y")
    with pytest.raises(LoRAFileError, match="of a kind we do not load"):
        load_lora(unet, {good + ".lora_mid.weight": torch.zeros(2, 2, 3, 3)}, "z")
    other = {good + s: torch.zeros(2, 2) for s in (".hada_w1_a", ".hada_w2_b", ".lokr_w1", ".dora_scale")}
    with pytest.raises(LoRAFileError, match=r"do not load .*: LoHa \(2\), LoKr \(1\), DoRA \(1\):"):
        load_lora(unet, other, "z")
    # strict=False: what fits is applied, wrong shapes and unknown kinds are skipped, one warning lists them
    mixed = {**other, **{k: v for k, v in sd.items() if k.startswith(good)},
             "lora_unet_input_blocks_5_1_proj_in.lora_down.weight": torch.zeros(2, 3),
             "lora_unet_input_blocks_5_1_proj_in.lora_up.weight": torch.zeros(64, 2)}
    with pytest.warns(UserWarning, match=r"applied 1 layers, skipped 4 keys .*LoHa.*1 LoRA layers have wrong shapes"):
        assert load_lora(unet, mixed, "w", strict=False) == ["input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    with pytest.raises(ValueError, match="already exists"):
        load_lora(unet, {k: v for k, v in sd.items() if k.startswith(good)}, "x")


def test_stacking_two_files_with_scales_and_merge(base_unet, tmp_path):
    files = {}
    for i, name in enumerate(("face", "landscape")):
        unet = copy.deepcopy(base_unet)
        inject_lora(unet, name, rank=4, alpha=4, targets=ATTENTION if i else TRANSFORMER)
        randomize_up(unet, name, seed=10 + i)
        files[name] = tmp_path / f"{name}.safetensors"
        save_lora(unet, files[name], name)
    args = unet_inputs()
    unet = copy.deepcopy(base_unet)
    with torch.no_grad():
        y0 = unet(*args)
        load_lora(unet, files["face"], "face", scale=0.8)
        load_lora(unet, files["landscape"], "landscape", scale=0.5)
        y_both = unet(*args)
        set_lora_scale(unet, "landscape", 0.0)
        y_face = unet(*args)
        set_lora_scale(unet, "face", 0.0)
        assert torch.equal(unet(*args), y0)
        set_lora_scale(unet, "face", 0.8)
        set_lora_scale(unet, "landscape", 0.5)
        assert not torch.allclose(y_both, y_face, atol=1e-3) and not torch.allclose(y_face, y0, atol=1e-3)

        merged = copy.deepcopy(base_unet)
        load_lora(merged, files["face"], "face", scale=0.8, merge=True)
        load_lora(merged, files["landscape"], "landscape", scale=0.5, merge=True)
        torch.testing.assert_close(merged(*args), y_both, atol=1e-4, rtol=1e-4)
        set_lora_scale(merged, "landscape", 0.0)  # merged adapters follow their scale too
        torch.testing.assert_close(merged(*args), y_face, atol=1e-4, rtol=1e-4)


def test_whole_tree_parts_text_towers_and_control(tmp_path):
    torch.manual_seed(0)

    class Tree(nn.Module):  # the SUPIR / SDXL checkpoint layout: model.*, conditioner.*
        def __init__(self):
            super().__init__()
            self.model = ControlledUNet(TINY)
            self.conditioner = Conditioner(TINY_CLIP, TINY_OPENCLIP)

    tree = Tree()
    base = copy.deepcopy(tree)
    inject_lora(tree.model, "all", rank=2, targets=ATTENTION)
    inject_lora(tree.conditioner, "all", rank=2, targets=TEXT)
    randomize_up(tree, "all")
    path = tmp_path / "all.safetensors"
    save_lora(tree, path, "all")
    keys = set(read_lora(path)[0])
    for key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha",
                "lora_control_middle_block_1_transformer_blocks_0_attn2_to_v.alpha",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                "lora_te2_text_model_encoder_layers_2_self_attn_out_proj.alpha",  # bigG in Hugging Face names
                "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha"):
        assert key in keys
    assert not any("project_modules" in k for k in keys), "SUPIR's connectors are not SDXL attention"
    for sl in "qkv":  # bigG's fused in_proj is written as kohya's three projections
        assert f"lora_te2_text_model_encoder_layers_1_self_attn_{sl}_proj.lora_up.weight" in keys
    loaded = load_lora(base, path, "all")
    assert sorted(loaded) == sorted(lora_layers(tree))
    assert {"conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc",
            "conditioner.embedders.1.model.transformer.resblocks.1.attn"} <= set(loaded)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base.conditioner.embedders[1](ids)[0], tree.conditioner.embedders[1](ids)[0])

    # A bare UNet takes the same file's unet part; the other parts are skipped with a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare = load_lora(UNet(TINY), path, "all", strict=False)
    assert sorted(bare) == sorted(p[len("model.diffusion_model."):] for p in loaded if p.startswith("model.diffusion_model."))


def test_bf16_autocast_and_bf16_weights(base_unet):
    unet = copy.deepcopy(base_unet)
    inject_lora(unet, "a", rank=4, targets=TRANSFORMER)
    randomize_up(unet, "a")
    args = unet_inputs()
    with torch.no_grad():
        ref = unet(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = unet(*args)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()

    # bf16 base weights with float32 adapters, trained under autocast: gradients reach the adapters only
    bf16 = copy.deepcopy(base_unet).to(torch.bfloat16).requires_grad_(False)
    inject_lora(bf16, "a", rank=4, targets=TRANSFORMER, dtype=torch.float32)
    bf16.load_state_dict(unet.state_dict())  # the same adapters; the base weights are cast to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bf16(*(t.to(torch.bfloat16) if t.is_floating_point() else t for t in args))
    out.float().square().mean().backward()
    params = lora_parameters(bf16, "a")
    assert all(p.dtype == torch.float32 and p.grad is not None for p in params)
    assert not any(p.requires_grad for n, p in bf16.named_parameters() if ".lora." not in n)
    assert (out.detach().float() - ref).abs().max() < 0.05 * ref.abs().max()
