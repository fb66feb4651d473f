"""Parity of the SDXL UNet (`unet_sdxl`) and SUPIR's control path (`supir_unet_control`) with the reference."""
import pytest
import torch

from fixtures import Fixture, checks
from reference_configs import unet_config
from mini_supir.control import ControlledUNet, LightGLVUNet, ZeroCrossAttn, ZeroSFT
from mini_supir.unet import SDXL_BASE, UNet


def record(outputs: dict, name: str):
    """Forward hook storing a module's output under `name`."""
    return lambda module, args, out: outputs.__setitem__(name, out)


@checks("unet_sdxl")
def check_unet_sdxl(fx: Fixture):
    cfg = unet_config(fx.config["constructor"])
    model = UNet(cfg).eval()
    model.load_state_dict(fx.weights, strict=True)
    outs = {}
    model.time_embed.register_forward_hook(record(outs, "t_mlp"))
    model.label_emb.register_forward_hook(record(outs, "label_mlp"))
    model.middle_block.register_forward_hook(record(outs, "mid"))
    for k, block in enumerate(model.input_blocks):
        block.register_forward_hook(record(outs, f"hs.{k}"))
    for k, block in enumerate(model.output_blocks):
        block.register_forward_hook(record(outs, f"dec.{k}"))
    i = fx.inputs
    with torch.no_grad():
        outs["eps"] = model(i["x"], i["timesteps"], i["context"], i["y"])
    fx.check_all(outs)


def connector_widths(module) -> tuple:
    if isinstance(module, ZeroSFT):  # (control, skip, concatenated running h) channels
        norm = module.zero_conv.out_channels
        return "ZeroSFT", module.zero_conv.in_channels, norm, module.param_free_norm.num_channels - norm
    assert isinstance(module, ZeroCrossAttn)
    return "ZeroCrossAttn", module.norm2.num_channels, module.norm1.num_channels  # (control, query)


@checks("supir_unet_control")
def check_supir_unet_control(fx: Fixture):
    con = fx.config["constructor"]
    cfg = unet_config(con["diffusion_model"])
    assert unet_config(con["control_model"]) == cfg, "GLVControl must mirror the UNet's encoder"
    model = ControlledUNet(cfg).eval()
    model.load_state_dict(fx.weights, strict=True)

    # The reference remapped LightGLVUNet's hard-coded SDXL connector widths; our connectors follow from the
    # config. Both must give the same layout: SDXL's connectors, widths mapped, are ours.
    width_map = {int(k): v for k, v in fx.config["xl_base_channel_map"].items()}
    assert [width_map[w] for w in SDXL_BASE.widths] == cfg.widths
    with torch.device("meta"):
        sdxl = LightGLVUNet(SDXL_BASE).project_modules
    expected = [tuple(width_map.get(w, w) if isinstance(w, int) else w for w in connector_widths(m)) for m in sdxl]
    assert [connector_widths(m) for m in model.diffusion_model.project_modules] == expected

    i = fx.inputs
    outs = {}
    with torch.no_grad():
        control = model.control_model(i["control_latent"], i["timesteps"], i["xt"], i["context"], i["y"])
        outs.update({f"control.{k}": c for k, c in enumerate(control)})
        unet = model.diffusion_model
        hooks = [m.register_forward_hook(record(outs, f"adapter.{k}")) for k, m in enumerate(unet.project_modules)]
        outs["eps_cs1"] = unet(i["xt"], i["timesteps"], i["context"], i["y"], control=control, control_scale=1.0)
        for h in hooks:
            h.remove()
        outs["eps_cs0.5"] = unet(i["xt"], i["timesteps"], i["context"], i["y"], control=control, control_scale=0.5)
        outs["wrapper_cs0.5"] = model(i["xt"], i["timesteps"], i["context"], i["y"], i["control_latent"], 0.5)
    names = [n for n in fx.outputs if not n.startswith("den.")]
    missing = [n for n in names if n not in outs]
    assert not missing, f"outputs not produced: {missing}"
    for n in names:
        fx.check(n, outs[n])
    check_denoiser(fx, model)


def check_denoiser(fx: Fixture, model: ControlledUNet):
    """`den.*`: the discrete eps denoiser (mini_supir.sampler) wrapped around the same network."""
    try:
        from mini_supir.sampler import Denoiser
    except ImportError as e:
        pytest.fail(f"den.* outputs need mini_supir.sampler.Denoiser ({e})")
    i = fx.inputs
    den = Denoiser(model)
    cond = {k: i[f"den.c.{k}"] for k in ("crossattn", "vector", "control")}
    with torch.no_grad():
        idx, sigma_q = den.quantize(i["den.sigma"])
        outs = {"den.idx": idx, "den.sigma_q": sigma_q, "den.sigmas_table": den.sigma_table(),
                "den.denoised": den(i["den.input"], i["den.sigma"], cond, control_scale=fx.config["den_control_scale"])}
    fx.check_all(outs, prefix="den.")
