"""Model configs from the reference fixtures' recorded constructor arguments (../shared/reference), so each
parity test builds its model from the fixture's own config. Test-only: users pick a preset of the library."""
from mini_supir.text import CLIPTextConfig, OpenCLIPTextConfig
from mini_supir.unet import UNetConfig
from mini_supir.vae import VAEConfig

# Constructor arguments of sgm's UNetModel (and of SUPIR's GLVControl / LightGLVUNet) whose value we do not
# model: they must have the value SDXL / SUPIR use.
UNET_FIXED = {"num_classes": "sequential", "use_spatial_transformer": True, "use_linear_in_transformer": True,
              "legacy": False, "dims": 2, "conv_resample": True, "dropout": 0.0, "num_heads": -1,
              "num_heads_upsample": -1, "use_scale_shift_norm": False, "resblock_updown": False,
              "use_new_attention_order": False, "n_embed": None, "transformer_depth_middle": None,
              "disable_self_attentions": None, "num_attention_blocks": None, "disable_middle_self_attn": False,
              # SUPIR: control encoder at latent resolution; XL-base connector layout with control features
              # as wide as the UNet's own (project_channel_scale 2 undoes the hard-coded halving).
              "input_upscale": 1, "mode": "XL-base", "project_type": "ZeroSFT", "project_channel_scale": 2}
# Arguments with no numerical effect (activation checkpointing, attention backend, precision flags).
UNET_NO_EFFECT = {"use_checkpoint", "use_fairscale_checkpoint", "offload_to_cpu", "spatial_transformer_attn_type",
                  "use_fp16"}


def unet_config(constructor: dict) -> UNetConfig:
    """sgm `UNetModel` / SUPIR `GLVControl` / `LightGLVUNet` constructor kwargs -> UNetConfig."""
    c = dict(constructor)
    for key, value in UNET_FIXED.items():
        if key in c:
            got = c.pop(key)
            assert got == value, f"unsupported {key}={got!r} (need {value!r})"
    for key in UNET_NO_EFFECT:
        c.pop(key, None)
    mult = tuple(c.pop("channel_mult"))
    depth = c.pop("transformer_depth")
    depth = (depth,) * len(mult) if isinstance(depth, int) else tuple(depth)
    num_res_blocks = c.pop("num_res_blocks")
    assert isinstance(num_res_blocks, int), "per-level num_res_blocks is not used by SDXL"
    cfg = UNetConfig(in_channels=c.pop("in_channels"), out_channels=c.pop("out_channels"),
                     model_channels=c.pop("model_channels"), channel_mult=mult, num_res_blocks=num_res_blocks,
                     attention_resolutions=tuple(c.pop("attention_resolutions")), transformer_depth=depth,
                     num_head_channels=c.pop("num_head_channels"), context_dim=c.pop("context_dim"),
                     adm_in_channels=c.pop("adm_in_channels"))
    assert not c, f"unknown UNet constructor arguments: {sorted(c)}"
    return cfg


def vae_config(constructor: dict) -> VAEConfig:
    dd = constructor["ddconfig"]
    assert dd["attn_resolutions"] == [], "only the mid-block attention of the SDXL VAE is implemented"
    assert dd["double_z"], "the encoder must output mean and log-variance"
    return VAEConfig(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                     z_channels=dd["z_channels"], embed_dim=constructor["embed_dim"],
                     in_channels=dd["in_channels"], out_ch=dd["out_ch"])


def clip_config(constructor: dict, layer_idx: int | None = None) -> CLIPTextConfig:
    """A transformers CLIPTextConfig dict, or {"CLIPTextConfig": ..., "FrozenCLIPEmbedder": ...}."""
    hf = constructor.get("CLIPTextConfig", constructor)
    embedder = constructor.get("FrozenCLIPEmbedder", {})
    assert embedder.get("layer", "hidden") == "hidden", "SDXL uses an intermediate hidden state"
    assert hf.get("hidden_act", "quick_gelu") == "quick_gelu" and hf.get("layer_norm_eps", 1e-5) == 1e-5
    layer_idx = embedder.get("layer_idx", layer_idx)
    return CLIPTextConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                          intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                          num_heads=hf["num_attention_heads"], max_positions=hf["max_position_embeddings"],
                          layer_idx=hf["num_hidden_layers"] - 1 if layer_idx is None else layer_idx)


def openclip_config(constructor: dict) -> OpenCLIPTextConfig:
    """open_clip.CLIP kwargs ({"embed_dim", "text_cfg", ...}), optionally under "open_clip.CLIP"."""
    clip = constructor.get("open_clip.CLIP", constructor)
    text = clip["text_cfg"]
    assert not clip.get("quick_gelu", False) and text.get("mlp_ratio", 4) == 4
    return OpenCLIPTextConfig(vocab_size=text["vocab_size"], width=text["width"], heads=text["heads"],
                              layers=text["layers"], embed_dim=clip["embed_dim"], context_length=text["context_length"])


def conditioner_configs(constructor: dict) -> tuple[CLIPTextConfig, OpenCLIPTextConfig, int]:
    """The `conditioner` fixture's constructor (emb_models + the tiny_text_towers they used) -> the
    arguments of text.Conditioner."""
    emb = constructor["emb_models"]
    towers = constructor["tiny_text_towers"]
    assert [e["input_key"] for e in emb] == ["txt", "txt", "original_size_as_tuple", "crop_coords_top_left",
                                             "target_size_as_tuple"]
    assert emb[1]["params"]["layer"] == "penultimate" and not emb[1]["params"].get("legacy", False)
    size_dims = {e["params"]["outdim"] for e in emb[2:]}
    assert len(size_dims) == 1
    clip = clip_config({"CLIPTextConfig": towers["clip_l"], "FrozenCLIPEmbedder": emb[0]["params"]})
    return clip, openclip_config(towers["openclip"]), size_dims.pop()
