"""Writes the peer LoRA files in this folder with the real tools, and what the peers compute with them.

Run from the repository root in a separate environment (never the project's own):
    python3 -m venv /tmp/peer && . /tmp/peer/bin/activate && pip install torch==2.13.0 \
        diffusers==0.42.1 peft==0.21.2 "transformers>=5" safetensors accelerate numpy tokenizers
    python tests/data/lora_peers/make_peer_loras.py
    python tests/data/lora_peers/make_peer_loras.py --check-ours   # diffusers reads our re-saved files

Base models: transformers' CLIPTextModel (CLIP-L shape) and CLIPTextModelWithProjection (bigG shape, gelu),
diffusers' UNet2DConditionModel, all sized as supir.TINY, their weights those of tests/peer_base.py
(seeded, renamed from our official keys to the peers' names here, at the edge). Adapters are injected by
peft (`inject_adapter_in_model`, which diffusers' loaders use for text encoders; transformers 5.24's own
`add_adapter` wants peft >= 0.22) and `UNet2DConditionModel.add_adapter`, filled with seeded random A and B,
and saved the ways the tools save them. outputs.safetensors holds the peers' outputs on peer_base.inputs()
at LoRA scale 0 (base), 1.0 and 0.5 (diffusers' scale_lora_layers), adapters live and merged into the
weights, keyed "<case>.<live|merged><scale>.<output>".
"""
import copy
import json
import os
import shutil
import sys
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":  # peft keeps target_modules in a set: a fixed order, same files
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from peft.tuners.tuners_utils import BaseTunerLayer
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import peer_base  # noqa: E402
from mini_supir.lora import unet_diffusers_names  # noqa: E402
from mini_supir.text import TINY_CLIP, TINY_OPENCLIP  # noqa: E402
from mini_supir.unet import TINY  # noqa: E402

TE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# UNet: every kind of layer kohya / diffusers adapt, in a few blocks (keeps the files small); a peft regex
UNET = (r".*(down_blocks\.1|mid_block|up_blocks\.0\.attentions\.0)\..*(to_q|to_k|to_v|to_out\.0|proj_in|ff\.net\.2)"
        r"|.*down_blocks\.0\.resnets\.0\.conv1|.*up_blocks\.0\.upsamplers\.0\.conv")


# -- base models, with our seeded weights under the peers' names ------------------------------------------

def hf_te1(ours: dict) -> CLIPTextModel:
    c = TINY_CLIP
    cfg = CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         max_position_embeddings=c.max_positions, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = CLIPTextModel(cfg)
    # transformers 5 has no text_model. level (4.x and the official SDXL file have it)
    sd = {k.removeprefix("text_model."): v for k, v in ours.items() if not k.endswith("position_ids")}
    model.load_state_dict(sd, strict=False)
    missing = set(model.state_dict()) - set(sd) - {"embeddings.position_ids"}
    assert not missing, missing
    return model.eval()


def hf_te2(ours: dict) -> CLIPTextModelWithProjection:
    c = TINY_OPENCLIP
    cfg = CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=4 * c.width,
                         num_hidden_layers=c.layers, num_attention_heads=c.heads, max_position_embeddings=c.context_length,
                         hidden_act="gelu", projection_dim=c.embed_dim, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0)
    model = CLIPTextModelWithProjection(cfg)
    sd = {"text_model.embeddings.token_embedding.weight": ours["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": ours["positional_embedding"],
          "text_model.final_layer_norm.weight": ours["ln_final.weight"],
          "text_model.final_layer_norm.bias": ours["ln_final.bias"],
          "text_projection.weight": ours["text_projection"].T.contiguous()}
    for i in range(c.layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for p in ("weight", "bias"):
                sd[f"{dst}{b}.{p}"] = ours[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):  # open_clip's fused in_proj = [q; k; v]
            for name, t in zip(("q_proj", "k_proj", "v_proj"), ours[f"{src}attn.in_proj_{p}"].chunk(3)):
                sd[f"{dst}self_attn.{name}.{p}"] = t.contiguous()
    have = set(model.state_dict())
    sd = {(k if k in have else k.removeprefix("text_model.")): v for k, v in sd.items()}
    missing = have - set(sd) - {"text_model.embeddings.position_ids", "embeddings.position_ids"}
    assert not missing and set(sd) <= have, (missing, set(sd) - have)
    model.load_state_dict(sd, strict=False)
    return model.eval()


def diffusers_unet(ours: dict) -> UNet2DConditionModel:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_unet import diffusers_config
    from mini_supir.lora_names import rename
    table = unet_diffusers_names(TINY)
    model = UNet2DConditionModel(**diffusers_config(TINY))
    model.load_state_dict({rename(k.rpartition(".")[0], table) + "." + k.rpartition(".")[2]
                           if rename(k.rpartition(".")[0], table) else k: v for k, v in ours.items()}, strict=True)
    return model.eval()


# -- running the peers ------------------------------------------------------------------------------------

@torch.no_grad()
def outputs(models: dict, x: dict) -> dict[str, torch.Tensor]:
    out = {}
    if "te1" in models:
        h = models["te1"](x["ids"], output_hidden_states=True).hidden_states
        out["te1.hidden"], out["te1.last"] = h[TINY_CLIP.layer_idx], h[-1]  # what SDXL takes, the last layer
    if "te2" in models:
        o = models["te2"](x["ids"], output_hidden_states=True)
        out["te2.penultimate"], out["te2.pooled"] = o.hidden_states[-2], o.text_embeds
    if "unet" in models:
        out["unet.eps"] = models["unet"](x["x"], x["t"], encoder_hidden_states=x["context"], added_cond_kwargs={
            "text_embeds": x["pooled"], "time_ids": x["time_ids"]}).sample
    return {k: v.contiguous() for k, v in out.items()}


def randomize(model, seed: int) -> None:
    """Trained-looking adapters: peft starts B at 0, which would make every comparison trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if ".lora_B." in name else p.shape[-1] ** -0.5))


def with_adapters(base: dict, configs: dict, seed: int) -> dict:
    models = {}
    for i, (part, cfg) in enumerate(configs.items()):
        m = base[part]()
        if part == "unet":
            m.add_adapter(cfg)
        else:
            m = inject_adapter_in_model(cfg, m)
            m.peft_config = {"default": cfg}
        randomize(m, seed + i)
        models[part] = m.eval()
    return models


def record(case: str, models: dict, x: dict, store: dict) -> None:
    """Outputs live and merged (peft's LoraLayer.merge, what diffusers' fuse_lora calls) at each scale;
    each merge on a fresh copy (peft's unmerge does not restore W bit for bit)."""
    for scale in (1.0, 0.5):
        for mode, m in (("live", models), ("merged", copy.deepcopy(models))):
            for model in m.values():
                scale_lora_layers(model, scale)
                if mode == "merged":
                    for layer in model.modules():
                        if isinstance(layer, BaseTunerLayer):
                            layer.merge()
            store.update({f"{case}.{mode}{scale:g}.{k}": v for k, v in outputs(m, x).items()})
            for model in m.values():
                unscale_lora_layers(model, scale)


def peft_sd(models: dict, part: str, text_model: bool = False) -> dict:
    sd = get_peft_model_state_dict(models[part])
    if text_model:  # the names transformers 4.x gives the same layers (what older tools wrote)
        sd = {("text_model." + k if k.startswith("encoder.") else k): v for k, v in sd.items()}
    return sd


def meta(models: dict, part: str) -> dict:
    d = models[part].peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def main():
    x = peer_base.inputs()
    tree = peer_base.base_tree()
    ours = {part: m.state_dict() for part, m in tree.parts().items()}
    base = {"te1": lambda: hf_te1(ours["te1"]), "te2": lambda: hf_te2(ours["te2"]),
            "unet": lambda: diffusers_unet(ours["unet"])}
    store = {f"base.live0.{k}": v for k, v in outputs({p: f() for p, f in base.items()}, x).items()}
    store.update({f"inputs.{k}": v for k, v in x.items()})
    manifest = {}

    # 1. diffusers' SDXL save_lora_weights from peft state dicts (transformers-5 te names, alpha in metadata)
    cfg = {"te1": LoraConfig(r=2, lora_alpha=3, target_modules=TE), "te2": LoraConfig(r=2, lora_alpha=3, target_modules=TE),
           "unet": LoraConfig(r=2, lora_alpha=3, target_modules=UNET)}
    models = with_adapters(base, cfg, 10)
    record("diffusers", models, x, store)
    StableDiffusionXLPipeline.save_lora_weights(
        HERE, weight_name="diffusers.safetensors", unet_lora_layers=peft_sd(models, "unet"),
        text_encoder_lora_layers=peft_sd(models, "te1"), text_encoder_2_lora_layers=peft_sd(models, "te2"),
        unet_lora_adapter_metadata=meta(models, "unet"), text_encoder_lora_adapter_metadata=meta(models, "te1"),
        text_encoder_2_lora_adapter_metadata=meta(models, "te2"))
    manifest["diffusers"] = "StableDiffusionXLPipeline.save_lora_weights, peft names, r=2 alpha=3 in metadata"

    # 2. rsLoRA + per-module rank / alpha, in the same file format
    pat = dict(use_rslora=True, rank_pattern={"layers.1.self_attn.k_proj": 3, "fc2": 1},
               alpha_pattern={"layers.0.self_attn.v_proj": 5, "mlp.fc1": 1.5})
    cfg = {"te1": LoraConfig(r=2, lora_alpha=4, target_modules=TE, **pat),
           "te2": LoraConfig(r=2, lora_alpha=4, target_modules=TE, **pat),
           "unet": LoraConfig(r=2, lora_alpha=4, target_modules=UNET, use_rslora=True,
                              rank_pattern={"attn2.to_k": 3}, alpha_pattern={"down_blocks.1.attentions.0.proj_in": 7})}
    models = with_adapters(base, cfg, 20)
    record("rslora", models, x, store)
    StableDiffusionXLPipeline.save_lora_weights(
        HERE, weight_name="rslora.safetensors", unet_lora_layers=peft_sd(models, "unet"),
        text_encoder_lora_layers=peft_sd(models, "te1"), text_encoder_2_lora_layers=peft_sd(models, "te2"),
        unet_lora_adapter_metadata=meta(models, "unet"), text_encoder_lora_adapter_metadata=meta(models, "te1"),
        text_encoder_2_lora_adapter_metadata=meta(models, "te2"))
    manifest["rslora"] = "as diffusers, use_rslora + rank_pattern + alpha_pattern"

    # 3. text encoders in diffusers' older spelling (convert_state_dict_to_diffusers: q/k/v/out_proj as
    # lora_linear_layer.down/up), transformers-4 names, no alpha anywhere (alpha = r, as those files meant)
    cfg = {"te1": LoraConfig(r=2, lora_alpha=2, target_modules=TE), "te2": LoraConfig(r=2, lora_alpha=2, target_modules=TE)}
    models = with_adapters(base, cfg, 30)
    record("diffusers_old", models, x, store)
    StableDiffusionXLPipeline.save_lora_weights(
        HERE, weight_name="diffusers_old.safetensors",
        text_encoder_lora_layers=convert_state_dict_to_diffusers(peft_sd(models, "te1", text_model=True)),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(peft_sd(models, "te2", text_model=True)))
    manifest["diffusers_old"] = "convert_state_dict_to_diffusers, transformers-4 names (text_model.), no alpha"

    # 4. kohya keys by diffusers' convert_state_dict_to_kohya (it writes alpha = rank) from transformers-4
    # names, as kohya's sd-scripts name SDXL's two encoders: lora_te1_text_model_encoder_layers_0_...
    cfg = {"te1": LoraConfig(r=2, lora_alpha=2, target_modules=TE), "te2": LoraConfig(r=2, lora_alpha=2, target_modules=TE),
           "unet": LoraConfig(r=2, lora_alpha=2, target_modules=UNET)}
    models = with_adapters(base, cfg, 40)
    record("kohya", models, x, store)
    sd = {**{f"unet.{k}": v for k, v in peft_sd(models, "unet").items()},
          **{f"text_encoder.{k}": v for k, v in peft_sd(models, "te1", text_model=True).items()},
          **{f"text_encoder_2.{k}": v for k, v in peft_sd(models, "te2", text_model=True).items()}}
    save_file(convert_state_dict_to_kohya(sd), str(HERE / "kohya.safetensors"))
    manifest["kohya"] = "convert_state_dict_to_kohya of the peft state dict, transformers-4 names"

    # 5. PeftModel.save_pretrained folders, one per text encoder (alpha only in adapter_config.json)
    for part, seed in (("te1", 50), ("te2", 60)):
        folder = HERE / f"peft_{part}"
        shutil.rmtree(folder, ignore_errors=True)
        cfg = LoraConfig(r=2, lora_alpha=6, target_modules=TE, rank_pattern={"layers.2.mlp.fc1": 3},
                         alpha_pattern={"self_attn.q_proj": 1})
        model = get_peft_model(base[part](), cfg)
        randomize(model, seed)
        record(f"peft_{part}", {part: model.eval()}, x, store)
        model.save_pretrained(folder)
        manifest[f"peft_{part}"] = "PeftModel.save_pretrained folder, r=2 alpha=6, rank/alpha patterns"

    save_file(store, str(HERE / "outputs.safetensors"))
    (HERE / "cases.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print({k: round(v.abs().max().item(), 3) for k, v in store.items() if k.endswith(("eps", "pooled"))})


if __name__ == "__main__" and not sys.argv[1:]:
    main()


def check_ours():
    """The other direction: each peer file loaded by us and saved by save_lora (kohya keys, bigG's fused
    q/k/v written as te2 q_proj / k_proj / v_proj) is read back by diffusers' own SDXL loader
    (lora_state_dict + load_lora_into_unet / load_lora_into_text_encoder); prints its max abs error against
    the peer's outputs with the original file. Nothing is written here."""
    import tempfile
    from mini_supir.lora_files import load_lora, save_lora
    x = peer_base.inputs()
    tree = peer_base.base_tree()
    ours = {part: m.state_dict() for part, m in tree.parts().items()}
    base = {"te1": lambda: hf_te1(ours["te1"]), "te2": lambda: hf_te2(ours["te2"]),
            "unet": lambda: diffusers_unet(ours["unet"])}
    ref = __import__("safetensors.torch").torch.load_file(str(HERE / "outputs.safetensors"))
    files = {"diffusers": "diffusers.safetensors", "rslora": "rslora.safetensors", "kohya": "kohya.safetensors",
             "diffusers_old": "diffusers_old.safetensors", "peft_te1": "peft_te1", "peft_te2": "peft_te2"}
    for case, name in files.items():
        mine = peer_base.base_tree()
        load_lora(mine, HERE / name, "peer")
        with tempfile.TemporaryDirectory() as d:
            save_lora(mine, Path(d) / "ours.safetensors", "peer")
            sd, alphas = StableDiffusionXLPipeline.lora_state_dict(  # unet_config: to map sgm block numbers
                str(Path(d) / "ours.safetensors"), unet_config=base["unet"]().config)
        models = {}
        for part, prefix in (("unet", "unet"), ("te1", "text_encoder"), ("te2", "text_encoder_2")):
            if any(k.startswith(prefix + ".") for k in sd):
                m = base[part]()
                if part == "unet":
                    StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, m, adapter_name="ours")
                else:
                    StableDiffusionXLPipeline.load_lora_into_text_encoder(sd, alphas, m, prefix=prefix,
                                                                          adapter_name="ours")
                models[part] = m.eval()
        got = outputs(models, x)
        errors = {k: (v - ref[f"{case}.live1.{k}"]).abs().max().item() for k, v in got.items()}
        print(f"{case}: diffusers reading our re-save: max abs error {max(errors.values()):.2g} over {sorted(errors)}")


if __name__ == "__main__" and sys.argv[1:] == ["--check-ours"]:
    check_ours()
