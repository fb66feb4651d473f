"""Damage masks: the automatic detector on synthetic damage over real photos, the generator, feathering,
morphology / connected components, mask files and the CLI."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.measure import label as sk_label

from mini_supir.images import ImageError, load_tensor
from mini_supir.mask import (MaskParams, auto_mask, check_aspect, closing, damage_response, detect_damage, dilate,
                             erode, feather, label_components, load_mask, opening)
from mini_supir.mask_cli import main
from mini_supir.mask_synth import KINDS, PAPER, synthesize_damage

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "images"
PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png", "rocket.jpg")
SEEDS = (0, 1, 2)
VISIBLE = 0.1   # luma-independent: largest per-channel change that counts as clearly visible damage
TOLERANCE = 2   # px


@pytest.fixture(scope="module")
def photos():
    return {name: load_tensor(IMAGES / name)[0] for name in PHOTOS}


@pytest.fixture(scope="module")
def scores(photos):
    """Detector scores per photo, averaged over SEEDS.

    Protocol: `synthesize_damage(photo, seed, kinds=("cracks", "scratches"))` with the default amount;
    `detect_damage` with the default MaskParams on the damaged image.
      recall    = |pred & V| / |V|, V = pixels whose value the damage changed by more than 0.1 (25/255) in some
                  channel: clearly visible damage. A dark crack over a dark area that changed a pixel by 0.04 is
                  counted neither way (it needs no repair and no detector can see it).
      precision = |pred & dilate(K, 2)| / |pred|, K = the generator's mask (change > 0.03). The 2-px tolerance
                  accepts the detector's own 1-px dilation that covers the anti-aliased crack border, plus one
                  pixel of localisation slack.
    Pixel-wise, no other tolerance.
    """
    out = {}
    for name, img in photos.items():
        rec = prec = 0.0
        for seed in SEEDS:
            damaged, known = synthesize_damage(img, seed, ("cracks", "scratches"))
            visible = (damaged - img).abs().amax(0) > VISIBLE
            pred = detect_damage(damaged)
            rec += ((pred & visible).sum() / visible.sum()).item() / len(SEEDS)
            prec += ((pred & dilate(known, TOLERANCE)).sum() / pred.sum()).item() / len(SEEDS)
        out[name] = (rec, prec, detect_damage(img).float().mean().item())
    return out


def test_detector_finds_synthetic_cracks_and_scratches(scores):
    # Measured (default MaskParams): recall / precision astronaut 0.71 / 0.56, coffee 0.57 / 0.43,
    # motorcycle 0.46 / 0.41, rocket 0.81 / 0.55; mean 0.64 / 0.49. Textured photos (machinery, wood grain,
    # specular rims) contain real thin lines the detector cannot tell from damage: see docs/repair.md.
    for name, (rec, prec, _) in scores.items():
        assert rec >= 0.42 and prec >= 0.38, (name, rec, prec)
    assert np.mean([s[0] for s in scores.values()]) >= 0.6
    assert np.mean([s[1] for s in scores.values()]) >= 0.45


def test_clean_photo_gives_small_mask(scores):
    # Measured 2.1-2.5 % of the pixels on the undamaged photos (vs 1.3-2.2 % visible synthetic damage).
    for name, (_, _, area) in scores.items():
        assert area <= 0.03, (name, area)


def test_flat_image_gives_empty_mask():
    flat = torch.full((3, 64, 80), 0.5) + 0.01 * torch.randn(3, 64, 80, generator=torch.Generator().manual_seed(0))
    assert not detect_damage(flat).any()


def test_single_line_is_found_exactly():
    img = torch.full((3, 60, 90), 0.6)
    img[:, 30, 10:80] = 0.1                          # 1-px dark crack
    img[:, 10:50, 45] = 0.95                         # 1-px bright scratch crossing it
    mask = detect_damage(img, MaskParams(dilate_radius=0))
    truth = torch.zeros(60, 90, dtype=torch.bool)
    truth[30, 10:80] = True
    truth[10:50, 45] = True
    assert torch.equal(mask, truth)
    assert not detect_damage(img, MaskParams(dark=False, bright=False)).any()
    only_dark = detect_damage(img, MaskParams(bright=False, dilate_radius=0))
    assert only_dark[30, 10:80].all() and not only_dark[10:29, 45].any()


def test_feather_is_bounded_smooth_and_keeps_the_mask():
    mask = torch.zeros(80, 80, dtype=torch.bool)
    mask[40, 10:70] = True
    mask[20:30, 20:30] = True
    sigma = 1.5
    soft = feather(mask, sigma)
    assert soft.dtype == torch.float32 and soft.min() >= 0 and soft.max() <= 1
    assert (soft[mask] == 1).all()
    assert (soft[~dilate(mask, 3 + 5 * 2)] < 1e-3).all()     # falls off within ~ 2 sigma (growth) + 3 sigma
    # Lipschitz: the hard mask jumps by 1, the feathered one by at most ~ the Gaussian's peak slope 0.27.
    jumps = max((soft[1:] - soft[:-1]).abs().max(), (soft[:, 1:] - soft[:, :-1]).abs().max())
    assert jumps <= 0.3, jumps
    assert torch.equal(feather(mask, 0), mask.float())
    img = torch.full((3, 40, 90), 0.6)
    img[:, 20, 5:85] = 0.1
    soft = auto_mask(img)
    assert soft[20, 5:85].eq(1).all() and 0 < soft[23, 40] < 1 and soft[30, 40] == 0


def test_synthesis_is_deterministic_per_seed(photos):
    img = photos["coffee.png"][:, :200, :300]
    a, ma = synthesize_damage(img, 7)
    b, mb = synthesize_damage(img, torch.Generator().manual_seed(7))
    c, mc = synthesize_damage(img, 8)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)
    assert torch.equal(detect_damage(a), detect_damage(b))


def test_synthesis_kinds_and_known_mask(photos):
    img = photos["astronaut.png"][:, 100:356, 100:356]
    fractions = {}
    for kind in KINDS:
        damaged, mask = synthesize_damage(img, 3, (kind,))
        assert damaged.shape == img.shape and damaged.min() >= 0 and damaged.max() <= 1
        change = (damaged - img).abs().amax(0)
        assert torch.equal(mask, change > 0.03)           # the mask is exactly the visibly changed pixels
        fractions[kind] = mask.float().mean().item()
    assert all(0.001 < f < 0.15 for f in fractions.values()), fractions
    # paint loss is flat paper colour inside the patch
    damaged, mask = synthesize_damage(img, 3, ("missing",))
    inside = erode(mask, 2)
    colour = damaged[:, inside].mean(1)
    assert torch.allclose(colour, torch.tensor(PAPER), atol=0.03), colour
    # more damage with a larger amount, none with amount 0
    assert synthesize_damage(img, 3, amount=3)[1].sum() > synthesize_damage(img, 3)[1].sum()
    assert not synthesize_damage(img, 3, amount=0)[1].any()
    with pytest.raises(ValueError, match="unknown damage kinds"):
        synthesize_damage(img, 0, ("cracks", "mould"))


def test_morphology_and_components_match_skimage():
    g = torch.Generator().manual_seed(0)
    for radius in (1, 2, 3, 4):
        point = torch.zeros(15, 15, dtype=torch.bool)
        point[7, 7] = True
        yy, xx = torch.meshgrid(torch.arange(15) - 7, torch.arange(15) - 7, indexing="ij")
        octagon = (yy.abs() <= radius) & (xx.abs() <= radius) & (yy.abs() + xx.abs() <= radius + (radius + 1) // 2)
        assert torch.equal(dilate(point, radius), octagon), radius
    x = torch.rand(40, 50, generator=g)
    assert (closing(x, 2) >= x).all() and (opening(x, 2) <= x).all()
    assert torch.equal(erode(x, 2), -dilate(-x, 2))
    assert damage_response(x).min() >= 0
    for density in (0.3, 0.55, 0.7):
        m = torch.rand(120, 170, generator=g) < density
        labels, n = label_components(m)
        ref = sk_label(m.numpy(), connectivity=2)
        assert n == ref.max()
        # same partition: the pairs (ours, theirs) are one-to-one
        pairs = np.unique(np.stack([labels.numpy().ravel(), ref.ravel()]), axis=1)
        assert pairs.shape[1] == n + 1


def test_load_mask_binarises_resizes_and_reads_alpha(tmp_path):
    a = np.zeros((50, 80), np.uint8)
    a[20:22, 5:75] = 200            # a 2-px stroke
    a[40, 10:20] = 100              # below half: not damage
    Image.fromarray(a).save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png", (50, 80))
    assert m.dtype == torch.bool and m.sum() == 2 * 70
    small = load_mask(tmp_path / "m.png", (25, 40))     # the thin stroke survives a 2x downscale
    assert small.shape == (25, 40) and small[10, 5:35].all() and not small[20].any()
    assert load_mask(tmp_path / "m.png", (100, 160))[40:44, 12:148].all()
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[3:5, 2:9, 3] = 255          # painted on a transparent layer
    Image.fromarray(rgba, "RGBA").save(tmp_path / "layer.png")
    assert load_mask(tmp_path / "layer.png", (10, 12)).sum() == 14
    with pytest.raises(ImageError, match="the mask is 80x50, the image 50x50: another shape"):
        load_mask(tmp_path / "m.png", (50, 50))  # it used to be stretched silently


def test_mask_shape_is_checked_up_to_rounding():
    check_aspect((1000, 750), (4000, 3000))     # painted on a resized copy
    check_aspect((10, 7), (100, 72))            # 7.2 px rounded to 7
    check_aspect((4000, 3001), (1000, 750))     # a larger mask, one px off
    for mask, image in (((64, 64), (64, 48)), ((4000, 3010), (1000, 750)), ((48, 64), (64, 48))):
        with pytest.raises(ImageError, match="another shape"):
            check_aspect(mask, image)


def test_cli_writes_masks_atomically_and_fails_in_one_line(tmp_path, capsys, photos):
    src = tmp_path / "in.png"
    Image.fromarray((photos["rocket.jpg"][:, :160, 200:440].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(src)
    assert main(["--image", str(src), "--damage", str(tmp_path / "dmg.png"), "--out", str(tmp_path / "known.png"),
                 "--seed", "1", "--kinds", "cracks,scratches"]) == 0
    known = load_mask(tmp_path / "known.png", (160, 240))
    assert 0 < known.float().mean() < 0.2
    assert main(["--image", str(tmp_path / "dmg.png"), "--out", str(tmp_path / "auto.png"), "--soft",
                 "--min-length", "30", "--no-bright"]) == 0
    soft = np.asarray(Image.open(tmp_path / "auto.png"))
    assert soft.shape == (160, 240) and len(np.unique(soft)) > 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.png", "dmg.png", "in.png", "known.png"]
    capsys.readouterr()
    (tmp_path / "notes.txt").write_text("not an image")
    before = {f: f.read_bytes() for f in tmp_path.iterdir()}
    damage = ["--damage", str(tmp_path / "d.png"), "--out", str(tmp_path / "x.png")]
    for argv, problem in ((["--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")], "no such file"),
                          (["--image", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "x.png")], "not an image"),
                          (["--image", str(src), "--out", str(tmp_path / "x.unknown")], "unknown image extension"),
                          (["--image", str(src), *damage, "--kinds", "mould"], "choose from cracks"),
                          (["--image", str(src), *damage, "--amount", "-1"], "must be > 0"),
                          (["--image", str(src), "--out", str(tmp_path / "x.png"), "--amount", "2"], "needs --damage"),
                          (["--image", str(src), "--out", str(tmp_path / "x.png"), "--radius", "-1"], "must be >= 1"),
                          (["--image", str(src), "--out", str(tmp_path / "x.png"), "--window", "0"], "must be >= 3"),
                          (["--image", str(src), "--out", str(tmp_path / "x.png"), "--weak-k", "nan"], "not a finite"),
                          (["--image", str(src), "--out", str(src)], "is the input image"),
                          (["--image", str(src), "--damage", str(src), "--out", str(tmp_path / "x.png")], "is the input")):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: a bad option value
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "error: " in err and problem in err, (argv, err)
    assert {f: f.read_bytes() for f in tmp_path.iterdir()} == before  # nothing written, nothing changed
