"""Parity of mini_supir.text with the reference text towers, conditioner, size embedder and tokenizer."""
import json

import torch

from fixtures import Fixture, checks
from reference_configs import clip_config, conditioner_configs, openclip_config
from mini_supir.text import (CLIPEmbedder, Conditioner, OpenCLIPEmbedder, SizeEmbedder, clean_text, clip_tokenizer,
                             tokenize)

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


@checks("text_clip_l")
def check_text_clip_l(fx: Fixture):
    embedder = CLIPEmbedder(clip_config(fx.config["constructor"]))
    embedder.transformer.load_state_dict(fx.weights, strict=True)
    ids = fx.inputs["input_ids"]
    with torch.no_grad():
        out = embedder.transformer(ids)
        ours = {f"hidden_states.{k}": h for k, h in enumerate(out.hidden_states)}
        ours |= {"last_hidden_state": out.last_hidden_state, "pooled": out.pooled, "embedder_z": embedder(ids)}
    fx.check_all(ours)


@checks("text_openclip_bigg")
def check_text_openclip_bigg(fx: Fixture):
    embedder = OpenCLIPEmbedder(openclip_config(fx.config["constructor"]))
    embedder.model.load_state_dict(fx.weights, strict=True)
    tokens = fx.inputs["tokens"]
    with torch.no_grad():
        out = embedder.model(tokens)
        penultimate, pooled = embedder(tokens)
        ln_final = embedder.model.ln_final
    fx.check_all({"penultimate": out.penultimate, "pooled": out.pooled, "last_pre_ln": out.last,
                  "last_ln": ln_final(out.last), "penultimate_from_dict": penultimate})
    fx.check("pooled", pooled)


@checks("conditioner")
def check_conditioner(fx: Fixture):
    conditioner = Conditioner(*conditioner_configs(fx.config["constructor"]))
    conditioner.load_state_dict(fx.weights, strict=True)
    sizes = [fx.inputs[k] for k in SIZE_KEYS]
    ours = {}
    with torch.no_grad():
        for branch in ("c", "uc"):
            out = conditioner(fx.inputs[f"{branch}.clip_ids"], fx.inputs[f"{branch}.oclip_ids"], *sizes)
            # The control latent rides along in the reference's cond dict untouched.
            ours |= {f"{branch}.{k}": v for k, v in out.items()} | {f"{branch}.control": fx.inputs["control"]}
    fx.check_all(ours)


@checks("vector_cond")
def check_vector_cond(fx: Fixture):
    embedder = SizeEmbedder(fx.config["constructor"]["outdim"])
    emb = {f"emb.{k}": embedder(fx.inputs[k]) for k in SIZE_KEYS}
    fx.check_all(emb | {"y": torch.cat([fx.inputs["pooled_bigg"], *emb.values()], dim=1)})


@checks("tokenizer")
def check_tokenizer(fx: Fixture):
    cases = json.loads((fx.path / fx.config["cases"]).read_text())["cases"]
    texts = [c["text"] for c in cases]
    ours = {"bpe_ids": [clip_tokenizer().encode(clean_text(t)).ids for t in texts], "ids_pad_zero": tokenize(texts, pad="zero").tolist(),
            "ids_pad_eos": tokenize(texts, pad="eos").tolist()}
    for name, rows in ours.items():
        wrong = [c["text"] for c, row in zip(cases, rows) if row != c[name]]
        assert not wrong, f"tokenizer/{name}: {len(wrong)}/{len(cases)} cases differ, e.g. {wrong[0]!r}"
        fx.errors[name] = 0.0  # integer ids: equal (the summary line then counts what was compared)
