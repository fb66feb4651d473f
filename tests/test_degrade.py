"""Degradations: determinism per seed, named settings, measured severity on a real photo, the CLI."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mini_supir.degrade import (SETTINGS, add_gaussian_noise, add_poisson_noise, blur_kernel, degrade, jpeg, modcrop,
                                sinc_kernel, upsample)
from mini_supir.images import load_tensor as load_image
from mini_supir.degrade_cli import main
from mini_supir.metrics import psnr, ssim

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "images"


@pytest.fixture(scope="module")
def astronaut():
    return load_image(IMAGES / "astronaut.png")


@pytest.fixture(scope="module")
def patch(astronaut):
    """A non-square crop whose sides are not multiples of 4 or 8."""
    return astronaut[..., 100:199, 180:310]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_setting_runs_and_is_deterministic(patch, name):
    scale = SETTINGS[name].scale
    lq = degrade(patch, name, seed=3)
    assert lq.shape == (1, 3, 99 // scale, 130 // scale)
    assert lq.min() >= 0 and lq.max() <= 1
    assert torch.equal(lq, (lq * 255).round() / 255)  # on 8-bit levels, like the PNG the CLI writes
    assert torch.equal(lq, degrade(patch, name, seed=3))
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(lq, degrade(patch, name, generator=generator))


@pytest.mark.parametrize("name", ["sr4-blur2-noise", "sr4-blur2-noise20-jpeg50", "realesrgan"])
def test_random_settings_depend_on_the_seed(patch, name):
    assert not torch.equal(degrade(patch, name, seed=0), degrade(patch, name, seed=1))


def test_realesrgan_batch_items_get_their_own_draws(patch):
    lq = degrade(torch.cat([patch, patch]), "realesrgan", seed=0)
    assert lq.shape == (2, 3, 24, 32) and not torch.equal(lq[0], lq[1])


def test_sr4_blur2_severity_on_astronaut(astronaut):
    """Bicubic upsampling of the LQ is the do-nothing baseline: measured 23.73 dB / SSIM 0.758 for
    sr4-blur2, 25.39 dB for plain bicubic x4 (sr4), 22.85 dB with sigma-10 noise."""
    gt = modcrop(astronaut, 4)
    scores = {name: psnr(upsample(degrade(astronaut, name), gt.shape[-2:]), gt).item()
              for name in ("sr4", "sr4-blur2", "sr4-blur2-noise")}
    assert 22.7 < scores["sr4-blur2"] < 24.7
    assert scores["sr4"] > scores["sr4-blur2"] + 1 > scores["sr4-blur2-noise"] + 1.5
    blurred = upsample(degrade(astronaut, "sr4-blur2"), gt.shape[-2:])
    assert 0.72 < ssim(blurred, gt).item() < 0.80


def test_kernels():
    iso = blur_kernel(21, 2.0)
    assert torch.allclose(iso.sum(), torch.tensor(1.0)) and torch.allclose(iso, iso.T)
    assert torch.equal(iso.argmax(), torch.tensor(10 * 21 + 10))
    # sigma_x along columns: an anisotropic kernel at theta 0 is wider horizontally
    aniso = blur_kernel(21, 3.0, 1.0)
    assert aniso[10, 13] > aniso[13, 10]
    assert torch.allclose(blur_kernel(21, 3.0, 1.0, theta=np.pi / 2), aniso.T, atol=1e-7)
    # generalized beta < 1 has heavier tails, the plateau kernel a flatter top than the Gaussian
    assert blur_kernel(21, 2.0, beta=0.5)[10, 0] > iso[10, 0]
    plateau = blur_kernel(21, 2.0, beta=2.0, plateau=True)
    assert plateau[10, 11] / plateau[10, 10] > iso[10, 11] / iso[10, 10]
    sinc = sinc_kernel(21, np.pi / 3)
    assert torch.allclose(sinc.sum(), torch.tensor(1.0)) and sinc.min() < 0  # ringing lobes


def test_noise_statistics():
    generator = torch.Generator().manual_seed(0)
    flat = torch.full((2, 3, 128, 128), 0.5)
    noisy = add_gaussian_noise(flat, torch.tensor([10 / 255, 20 / 255]), generator, gray=[False, True])
    std = (noisy - flat).flatten(1).std(1)
    assert torch.allclose(std, torch.tensor([10 / 255, 20 / 255]), rtol=0.03)
    assert torch.equal(noisy[1, 0], noisy[1, 2]) and not torch.equal(noisy[0, 0], noisy[0, 2])
    # Poisson on a two-level image (0 and 128/255): n = 2 levels, so the noise at v = 128/255 is
    # scale * (Poisson(2 v) / 2 - v), of std scale * sqrt(2 v) / 2
    two_level = flat.clone().index_fill_(3, torch.tensor([0]), 0.0)
    shot = add_poisson_noise(two_level, 0.1, generator, gray=[False, True])
    v = 128 / 255
    assert abs((shot - two_level)[..., 1:].std().item() - 0.1 * (2 * v) ** 0.5 / 2) < 0.002
    assert torch.equal(shot[1, 0], shot[1, 1]) and not torch.equal(shot[0, 0], shot[0, 1])


def test_jpeg_is_pillow(astronaut):
    x = astronaut[..., :64, :96]
    buffer = io.BytesIO()
    Image.fromarray((x[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, "JPEG", quality=40)
    ref = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float() / 255
    assert torch.equal(jpeg(x, 40)[0], ref)


def test_cli_writes_lq_set(tmp_path, patch):
    gt_dir, lq_dir = tmp_path / "gt", tmp_path / "lq"
    gt_dir.mkdir()
    for name, crop in [("a.png", patch), ("b.jpg", patch[..., :64, :80])]:
        Image.fromarray((crop[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(gt_dir / name)
    assert main(["--in", str(gt_dir), "--out", str(lq_dir), "--setting", "sr4-blur2-noise", "--seed", "5"]) == 0
    assert sorted(p.name for p in lq_dir.iterdir()) == ["a.png", "b.png"]  # no temporary files left
    a = load_image(lq_dir / "a.png")
    assert a.shape == (1, 3, 24, 32) and load_image(lq_dir / "b.png").shape == (1, 3, 16, 20)
    first = (lq_dir / "a.png").read_bytes()
    main(["--in", str(gt_dir), "--out", str(lq_dir), "--setting", "sr4-blur2-noise", "--seed", "5"])
    assert (lq_dir / "a.png").read_bytes() == first
    main(["--in", str(gt_dir), "--out", str(lq_dir), "--setting", "sr4-blur2-noise", "--seed", "6"])
    assert (lq_dir / "a.png").read_bytes() != first


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    assert main(["--in", str(tmp_path / "missing"), "--out", str(tmp_path / "lq")]) == 1
    (tmp_path / "gt").mkdir()
    assert main(["--in", str(tmp_path / "gt"), "--out", str(tmp_path / "lq")]) == 1
    (tmp_path / "gt" / "broken.png").write_bytes(b"not a png")
    assert main(["--in", str(tmp_path / "gt"), "--out", str(tmp_path / "lq")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line.startswith("error: ") for line in errors if "error" in line] == [True] * 3
    assert "broken.png" in errors[-1]
    with pytest.raises(SystemExit) as exit_info:
        main(["--in", str(tmp_path / "gt"), "--out", str(tmp_path / "lq"), "--setting", "nope"])
    assert exit_info.value.code != 0
