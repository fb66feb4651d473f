"""SDXL UNet / SUPIR control path: full-size key layout, and numerical properties on TINY."""
import json

import pytest
import torch

from fixtures import REFERENCE
from reference_configs import unet_config
from mini_supir.control import ControlledUNet, GLVControl, ZeroSFT
from mini_supir.unet import SDXL_BASE, TINY, UNet, timestep_embedding

MANIFESTS = REFERENCE / "manifests"


def manifest(name: str, prefix: str) -> dict[str, list[int]]:
    path = MANIFESTS / name
    if not path.exists():
        pytest.skip(f"no manifest {path} (set MINI_SUPIR_REFERENCE)")
    keys = json.loads(path.read_text())["keys"]
    return {k[len(prefix):]: v["shape"] for k, v in keys.items() if k.startswith(prefix)}


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_unet_matches_checkpoint_layout():
    with torch.device("meta"):
        unet = UNet(SDXL_BASE)
    assert shapes(unet) == manifest("sdxl_base.json", "model.diffusion_model.")
    assert n_params(unet) == 2_567_463_684


def test_supir_control_matches_checkpoint_layout():
    with torch.device("meta"):
        model = ControlledUNet(SDXL_BASE)
    assert shapes(model.control_model) == manifest("supir_v0.json", "model.control_model.")
    assert shapes(model.diffusion_model.project_modules) == manifest("supir_v0.json", "model.diffusion_model.project_modules.")
    assert [type(m).__name__ for m in model.diffusion_model.project_modules] == \
        ["ZeroSFT"] * 3 + ["ZeroCrossAttn"] + ["ZeroSFT"] * 3 + ["ZeroCrossAttn"] + ["ZeroSFT"] * 4
    assert n_params(model.control_model) == 1_243_378_880
    assert n_params(model.diffusion_model.project_modules) == 54_797_440


def test_reference_unet_config_round_trip_and_rejects_unsupported():
    kwargs = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=2,
                  attention_resolutions=[4, 2], transformer_depth=[1, 2, 10], num_head_channels=64, context_dim=2048,
                  adm_in_channels=2816, num_classes="sequential", use_linear_in_transformer=True, legacy=False,
                  use_checkpoint=True, spatial_transformer_attn_type="softmax-xformers")
    assert unet_config(kwargs) == SDXL_BASE
    with pytest.raises(AssertionError):
        unet_config({**kwargs, "legacy": True})


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 999]), 7)
    assert emb.dtype == torch.float32 and emb.shape == (2, 7)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0]))  # [cos | sin | zero pad]
    assert emb[1, 0] == torch.cos(torch.tensor(999.0)) and emb[1, 3] == torch.sin(torch.tensor(999.0))


def tiny_inputs(batch: int, h: int = 16, w: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 4, h, w, generator=g), timesteps=torch.randint(0, 1000, (batch,), generator=g),
                context=torch.randn(batch, 77, TINY.context_dim, generator=g),
                y=torch.randn(batch, TINY.adm_in_channels, generator=g),
                control_latent=torch.randn(batch, 4, h, w, generator=g))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ControlledUNet(TINY).eval()


def test_control_scale_zero_is_plain_sdxl(tiny):
    # ZeroSFT and ZeroCrossAttn return their input exactly at scale 0: the LightGLVUNet becomes the SDXL UNet.
    plain = UNet(TINY).eval()
    plain.load_state_dict({k: v for k, v in tiny.diffusion_model.state_dict().items() if not k.startswith("project_modules.")})
    i = tiny_inputs(2)
    with torch.no_grad():
        ours = tiny(**i, control_scale=0.0)
        ref = plain(i["x"], i["timesteps"], i["context"], i["y"])
        full = tiny(**i, control_scale=1.0)
    assert torch.equal(ours, ref)
    assert (full - ref).abs().max() > 0.1  # and the control does act at scale 1


def test_batch_items_are_independent(tiny):
    i = tiny_inputs(3)
    with torch.no_grad():
        together = tiny(**i, control_scale=0.7)
        alone = torch.cat([tiny(**{k: v[b:b + 1] for k, v in i.items()}, control_scale=0.7) for b in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_keeps_numerics(tiny):
    i = tiny_inputs(1, 8, 8)
    grads = []
    for enabled in (False, True):
        tiny.gradient_checkpointing = enabled
        tiny.zero_grad()
        out = tiny(**i)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in tiny.parameters()]))
    tiny.gradient_checkpointing = False
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bfloat16_close_to_float32(tiny):
    i = tiny_inputs(1)
    low = ControlledUNet(TINY).eval().to(torch.bfloat16)
    low.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        ref = tiny(**i)
        out = low(**i)  # float32 inputs are cast to the model dtype; eps comes back float32
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 0.05


def test_glvcontrol_features_match_unet_skips(tiny):
    i = tiny_inputs(1)
    with torch.no_grad():
        control = tiny.control_model(i["control_latent"], i["timesteps"], i["x"], i["context"], i["y"])
    assert isinstance(tiny.control_model, GLVControl)
    assert [c.shape[1] for c in control] == tiny.diffusion_model.skip_channels + [TINY.widths[-1]]
    assert [c.shape[2:] for c in control[-3:]] == [torch.Size([4, 6])] * 3


def test_fresh_control_path_is_zero_initialised_as_official():
    """SUPIR_v0.py wraps zero_mul / zero_add / zero_conv and the hint conv in zero_module (not ZeroCrossAttn),
    so a freshly built model ignores the LQ latent."""
    torch.manual_seed(0)
    model = ControlledUNet(TINY)
    zeroed = {n: p.abs().max().item() for n, p in model.named_parameters()
              if ".zero_" in n or n.startswith("control_model.input_hint_block.")}
    n_sft = sum(isinstance(m, ZeroSFT) for m in model.diffusion_model.project_modules)
    assert n_sft == 10 and len(zeroed) == n_sft * 3 * 2 + 2 and set(zeroed.values()) == {0.0}  # 3 convs, (w, b)
    attn = [p for n, p in model.named_parameters() if ".attn." in n and "project_modules" in n]
    assert attn and all(p.abs().max() > 0 for p in attn)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    ctx, y = torch.randn(1, 5, TINY.context_dim), torch.randn(1, TINY.adm_in_channels)
    with torch.no_grad():
        a = model(x, t, ctx, y, torch.randn(1, 4, 16, 16))
        b = model(x, t, ctx, y, torch.randn(1, 4, 16, 16))
    assert torch.equal(a, b)
