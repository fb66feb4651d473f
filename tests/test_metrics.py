"""PSNR / SSIM against scikit-image on real photos; LPIPS properties and weight loading."""
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mini_supir import metrics
from mini_supir.degrade import degrade
from mini_supir.images import load_tensor as load_image
from mini_supir.metrics import LPIPS, psnr, rgb_to_y, ssim

PHOTOS = sorted((Path(__file__).resolve().parents[2] / "shared" / "images").glob("*.[pj][np]g"))


@pytest.fixture(scope="module", params=PHOTOS, ids=[p.name for p in PHOTOS])
def pair(request):
    """A photo and its JPEG-30 version, both (1, 3, H, W)."""
    gt = load_image(request.param)
    return gt, degrade(gt, "jpeg30")


def _numpy(img: torch.Tensor, y_channel: bool, crop: int) -> np.ndarray:
    x = img[0].permute(1, 2, 0).double().numpy()
    x = rgb2ycbcr(x)[..., 0] / 255 if y_channel else x
    return x[crop:-crop, crop:-crop] if crop else x


@pytest.mark.parametrize("y_channel", [False, True], ids=["rgb", "y"])
@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_ssim_match_skimage(pair, y_channel, crop):
    gt, lq = pair
    a, b = _numpy(gt, y_channel, crop), _numpy(lq, y_channel, crop)
    channel_axis = None if y_channel else -1
    ref_psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
    ref_ssim = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, channel_axis=channel_axis)
    ours_psnr = psnr(gt, lq, crop_border=crop, y_channel=y_channel).item()
    ours_ssim = ssim(gt, lq, crop_border=crop, y_channel=y_channel).item()
    assert abs(ours_psnr - ref_psnr) < 1e-4
    assert abs(ours_ssim - ref_ssim) < 1e-4
    assert 20 < ours_psnr < 40 and 0.5 < ours_ssim < 1  # a real but moderate degradation


def test_y_channel_is_bt601_studio_range():
    rgb = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    ref = rgb2ycbcr(rgb.permute(0, 2, 3, 1).numpy())[..., 0] / 255
    assert np.allclose(rgb_to_y(rgb)[:, 0].numpy(), ref, atol=1e-12)
    assert torch.allclose(rgb_to_y(torch.zeros(1, 3, 1, 1)), torch.tensor(16 / 255))
    assert torch.allclose(rgb_to_y(torch.ones(1, 3, 1, 1)), torch.tensor(235 / 255))


def test_psnr_ssim_batch_and_limits():
    a = torch.rand(3, 3, 32, 40)
    b = (a + 0.05 * torch.randn_like(a)).clamp(0, 1)
    assert torch.allclose(psnr(a, b), torch.cat([psnr(a[i:i + 1], b[i:i + 1]) for i in range(3)]))
    assert torch.allclose(ssim(a, b), torch.cat([ssim(a[i:i + 1], b[i:i + 1]) for i in range(3)]))
    assert torch.isinf(psnr(a, a)).all() and torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    noise = torch.full_like(a, 0.1)
    assert torch.allclose(psnr(a * 0, noise), torch.full((3,), 20.0, dtype=torch.float64))  # MSE 0.01


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    model = LPIPS().eval()
    for k in range(5):  # the real heads are non-negative channel weights
        getattr(model, f"lin{k}").model[1].weight.data.abs_()
    return model


def test_lpips_identity_symmetry_batch(lpips_model):
    torch.manual_seed(1)
    x, y = torch.rand(3, 3, 64, 80) * 2 - 1, torch.rand(3, 3, 64, 80) * 2 - 1
    with torch.no_grad():
        d, layers = lpips_model(x, y, return_layers=True)
        assert d.shape == (3,) and (d > 0).all()
        assert torch.equal(lpips_model(x, x), torch.zeros(3))
        assert torch.allclose(lpips_model(y, x), d, rtol=1e-6)
        assert torch.allclose(torch.stack(layers).sum(0), d)
        single = torch.cat([lpips_model(x[i:i + 1], y[i:i + 1]) for i in range(3)])
        assert torch.allclose(single, d, rtol=1e-5, atol=1e-7)
        assert torch.allclose(lpips_model((x + 1) / 2, (y + 1) / 2, normalize=True), d, rtol=1e-5)


def test_lpips_from_pretrained_files(tmp_path, lpips_model):
    state = lpips_model.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    backbone["classifier.1.weight"] = torch.zeros(4096, 9216)[:2, :2]  # torchvision's file has a classifier
    heads = {k: v for k, v in state.items() if k.startswith("lin")}
    heads.update({f"lins.{k}.model.1.weight": state[f"lin{k}.model.1.weight"] for k in range(5)})
    torch.save(backbone, tmp_path / "alexnet.pth")
    torch.save(heads, tmp_path / "alex.pth")
    model = LPIPS.from_pretrained(tmp_path / "alexnet.pth", tmp_path / "alex.pth")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x, y, normalize=True), lpips_model(x, y, normalize=True))


def test_lpips_download_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub's cache is $TORCH_HOME/hub
    with pytest.raises(FileNotFoundError, match="not found"):
        LPIPS.from_pretrained(download=False)
    monkeypatch.setattr(metrics, "ALEXNET_URL", "http://127.0.0.1:9/alexnet-owt-7be5be79.pth")
    with pytest.raises(RuntimeError, match="could not download") as err:
        LPIPS.from_pretrained()
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())  # nothing half-written
