"""evaluate.py end to end on the shared photos: bicubic and a tiny random SUPIR, artefacts, resuming."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
from mini_supir import charts, eval_methods  # noqa: E402
from mini_supir.degrade import damage, degrade, image_seed, modcrop, quantize, upsample  # noqa: E402
from mini_supir.images import load_tensor as load_image  # noqa: E402
from mini_supir.metrics import psnr, ssim  # noqa: E402

IMAGES = ROOT.parent / "shared" / "images"
TINY = ["--gt", str(IMAGES), "--limit", "2", "--gt-crop", "64", "--model", "tiny", "--steps", "2",
        "--min-size", "0", "--grid-crop", "48"]
ARTEFACTS = ["results.csv", "summary.md", "bars.png", "gain.png", "grid.png", "run.json"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert evaluate.main([*TINY, "--out", str(out), "--method", "bicubic", "supir"]) == 0
    return out


def read(out: Path) -> list[dict]:
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_writes_every_artefact(first_run):
    for name in ARTEFACTS:
        assert (first_run / name).stat().st_size > 0, name
    rows = read(first_run)
    assert [(r["image"], r["method"]) for r in rows] == [
        ("astronaut.png", "bicubic"), ("coffee.png", "bicubic"), ("astronaut.png", "supir"), ("coffee.png", "supir")]
    for r in rows:
        assert (r["height"], r["width"]) == ("64", "64") and r["lpips"] == "" and r["mem_kind"] == "rss"
        assert float(r["seconds"]) > 0 and float(r["peak_mem_mib"]) > 50
        assert 5 < float(r["psnr"]) < 60 and 0 < float(r["ssim_y"]) <= 1
        assert Image.open(first_run / "images" / r["method"] / f"{Path(r['image']).stem}.png").size == (64, 64)
    summary = (first_run / "summary.md").read_text()
    assert "| bicubic |" in summary and "| supir |" in summary
    grid = Image.open(first_run / "grid.png")
    assert grid.width > 4 * 48 and grid.height > 2 * 48  # GT | LQ | bicubic | supir, two rows
    assert Image.open(first_run / "bars.png").width > 500


def test_bicubic_rows_equal_metrics_computed_directly(first_run):
    rows = {r["image"]: r for r in read(first_run) if r["method"] == "bicubic"}
    for name, row in rows.items():
        gt = load_image(IMAGES / name)
        h, w = gt.shape[-2:]
        gt = modcrop(gt[..., (h - 64) // 2:(h - 64) // 2 + 64, (w - 64) // 2:(w - 64) // 2 + 64], 4)
        out = quantize(upsample(degrade(gt, "sr4-blur2", seed=image_seed(0, name)), (64, 64)))
        assert float(row["psnr"]) == pytest.approx(psnr(out, gt, crop_border=4).item(), abs=1e-6)
        assert float(row["ssim"]) == pytest.approx(ssim(out, gt, crop_border=4).item(), abs=1e-6)
        assert float(row["psnr_y"]) == pytest.approx(psnr(out, gt, 4, y_channel=True).item(), abs=1e-6)
        assert float(row["ssim_y"]) == pytest.approx(ssim(out, gt, 4, y_channel=True).item(), abs=1e-6)
        # and independently, by scikit-image on the saved 8-bit PNG
        saved = np.asarray(Image.open(first_run / "images" / "bicubic" / f"{Path(name).stem}.png"))[4:-4, 4:-4]
        ref = (gt[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)[4:-4, 4:-4]
        assert float(row["psnr"]) == pytest.approx(peak_signal_noise_ratio(ref, saved), abs=1e-5)
        assert float(row["ssim"]) == pytest.approx(structural_similarity(
            ref, saved, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False), abs=1e-5)


def test_resume_computes_only_missing_rows(first_run, tmp_path, monkeypatch, style_lora):
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ["results.csv", "run.json"]:
        (out / name).write_bytes((first_run / name).read_bytes())
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    # a run killed while writing the last row: that row is dropped and recomputed
    (out / "results.csv").write_text("".join(lines[:-1]) + lines[-1][:20])
    calls = []
    monkeypatch.setattr(eval_methods, "bicubic", lambda lq, size: calls.append("bicubic") or upsample(lq, size))
    build = eval_methods.two_stage_restorer
    monkeypatch.setattr(eval_methods, "two_stage_restorer", lambda spec, loras, first, *a, **k:
                        calls.append(f"load {list(loras)}") or build(spec, loras, first, *a, **k))
    assert evaluate.main([*TINY, "--out", str(out), "--method", "bicubic", "supir", "supir+lora",
                          "--lora", str(style_lora)]) == 0
    assert calls == ["load []", f"load [({str(style_lora)!r}, 1.0)]"]
    rows = read(out)
    assert [(r["image"], r["method"]) for r in rows[3:]] == [
        ("coffee.png", "supir"), ("astronaut.png", "supir+lora:style"), ("coffee.png", "supir+lora:style")]
    old = read(first_run)
    assert rows[:3] == old[:3]  # untouched
    # the recomputed row has the same pixels: SUPIR is seeded
    for key in ("psnr", "ssim", "psnr_y", "ssim_y"):
        assert rows[3][key] == old[3][key]
    assert rows[4]["psnr"] != old[2]["psnr"]  # the LoRA changes the result
    assert "supir+lora:style" in (out / "summary.md").read_text()

    calls.clear()
    before = (out / "results.csv").read_text()
    assert evaluate.main([*TINY, "--out", str(out), "--method", "bicubic", "supir", "supir+lora",
                          "--lora", str(style_lora)]) == 0
    assert calls == [] and (out / "results.csv").read_text() == before


def test_changed_settings_are_refused(first_run, tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "run.json").write_bytes((first_run / "run.json").read_bytes())
    assert evaluate.main([*TINY, "--out", str(out), "--method", "supir", "--steps", "3"]) == 1
    assert "supir rows made with other settings" in capsys.readouterr().err
    assert evaluate.main([*TINY, "--out", str(out), "--setting", "sr4"]) == 1
    assert "setting='sr4-blur2'" in capsys.readouterr().err


@pytest.mark.parametrize("problem, argv", [
    ("does not exist", ["--gt", "/nonexistent/photos"]),
    ("no images", ["--gt", "EMPTY"]),
    ("is not a folder", ["--gt", str(IMAGES / "coffee.png")]),
])
def test_bad_input_one_line_error(tmp_path, capsys, problem, argv):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    argv = [str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    assert evaluate.main([*argv, "--out", str(tmp_path / "new" / "out")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0]
    assert not (tmp_path / "new").exists()  # checked before the output folder is made


def test_nice_ticks():
    assert charts.nice_ticks(0, 27.3) == [0, 10, 20, 30]
    assert charts.nice_ticks(0, 0.83) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert charts.tick_labels(charts.nice_ticks(-0.4, 1.1)) == ["-0.5", "0.0", "0.5", "1.0", "1.5"]


def test_restoration_rows_leave_the_mask_cells_empty(first_run):
    assert all(r["psnr_mask"] == r["ssim_mask"] == "" for r in read(first_run))
    assert "PSNR-mask" not in (first_run / "summary.md").read_text()


def test_cracks_setting_scores_inside_the_damage_mask(tmp_path):
    out = tmp_path / "cracks"
    assert evaluate.main([*TINY, "--out", str(out), "--setting", "cracks", "--gt-crop", "96"]) == 0
    rows = read(out)
    assert [(r["image"], r["method"]) for r in rows] == [
        (i, m) for m in ("damaged", "fill", "supir") for i in ("astronaut.png", "coffee.png")]
    for r in rows:
        assert r["setting"] == "cracks" and 0 < float(r["ssim_mask"]) < 1 and 3 < float(r["psnr_mask"]) < 40
    assert "PSNR-mask" in (out / "summary.md").read_text() and "minus damaged's" in (out / "summary.md").read_text()
    for name in ARTEFACTS:
        assert (out / name).stat().st_size > 0, name

    # the damaged rows, recomputed here; SSIM inside the mask against scikit-image's full SSIM map
    row = next(r for r in rows if r["method"] == "damaged" and r["image"] == "coffee.png")
    gt = load_image(IMAGES / "coffee.png")
    h, w = gt.shape[-2:]
    gt = gt[..., (h - 96) // 2:(h - 96) // 2 + 96, (w - 96) // 2:(w - 96) // 2 + 96]
    damaged, known = damage(gt, "cracks", seed=image_seed(0, "coffee.png"))
    assert np.array_equal(np.asarray(Image.open(out / "images" / "damaged" / "coffee.png")),
                          (damaged[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    m = known[0, 0].numpy()
    ref = gt[0].permute(1, 2, 0).double().numpy()
    bad = damaged[0].permute(1, 2, 0).double().numpy()
    assert float(row["psnr_mask"]) == pytest.approx(10 * np.log10(1 / ((bad - ref)[m] ** 2).mean()), abs=1e-5)
    _, full = structural_similarity(ref, bad, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, full=True)
    inner = m[5:-5, 5:-5]
    assert float(row["ssim_mask"]) == pytest.approx(full[5:-5, 5:-5].mean(-1)[inner].mean(), abs=1e-5)


def test_known_mask_fill_repairs_and_old_csv_is_upgraded(tmp_path):
    out = tmp_path / "known"
    assert evaluate.main([*TINY, "--out", str(out), "--setting", "cracks-paint", "--known-mask", "--method", "fill",
                          "--gt-crop", "128"]) == 0
    rows = {(r["image"], r["method"]): r for r in read(out)}
    for image in ("astronaut.png", "coffee.png"):  # classical inpainting with the true mask beats leaving the damage
        assert float(rows[image, "fill"]["psnr_mask"]) > float(rows[image, "damaged"]["psnr_mask"]) + 3
        assert float(rows[image, "fill"]["psnr"]) > float(rows[image, "damaged"]["psnr"])
    assert json.loads((out / "run.json").read_text())["methods"]["fill"] == {"method": "fill", "mask": "known"}

    # a results.csv from before the mask and NIQE columns existed is read, upgraded, and its rows kept
    old = tmp_path / "old"
    old.mkdir()
    lines = (out / "results.csv").read_text().splitlines()
    (old / "results.csv").write_text("\n".join(",".join(line.split(",")[:-3]) for line in lines) + "\n")
    (old / "run.json").write_bytes((out / "run.json").read_bytes())
    assert evaluate.main([*TINY, "--out", str(old), "--setting", "cracks-paint", "--known-mask", "--method", "fill",
                          "--gt-crop", "128"]) == 0
    upgraded = read(old)
    assert len(upgraded) == 4 and all(r["psnr_mask"] == "" and r["niqe"] == "" for r in upgraded)
    assert (old / "results.csv").read_text().splitlines()[0].endswith(",psnr_mask,ssim_mask,niqe")


@pytest.mark.parametrize("argv, problem", [
    (["--method", "supir+lora"], "supir+lora needs --lora"),
    (["--setting", "cracks", "--method", "bicubic"], "bicubic is for restoration settings"),
    (["--method", "fill"], "fill is for damage settings"),
    (["--known-mask"], "--known-mask is for damage settings"),
])
def test_methods_must_fit_the_setting(tmp_path, capsys, argv, problem):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--gt", str(IMAGES), "--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and problem in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_stage1_methods_with_niqe(tmp_path):
    """A real stage-1 network alone and in front of the tiny SUPIR; NIQE on 256 px crops (2 x 2 blocks)."""
    out = tmp_path / "s1"
    argv = [*TINY, "--gt-crop", "256", "--out", str(out), "--method", "realesr-animevideov3",
            "realesr-animevideov3+supir"]
    assert evaluate.main(argv) == 0
    rows = {(r["image"], r["method"]): r for r in read(out)}
    for image in ("astronaut.png", "coffee.png"):
        net, base = rows[image, "realesr-animevideov3"], rows[image, "bicubic"]
        assert 2 < float(net["niqe"]) < 30 and float(base["niqe"]) > 0
        assert abs(float(net["psnr"]) - float(base["psnr"])) < 6  # a real restorer, not noise
        assert (image, "realesr-animevideov3+supir") in rows
    config = json.loads((out / "run.json").read_text())["methods"]
    assert config["realesr-animevideov3"] == {"method": "stage1", "model": "realesr-animevideov3"}
    assert config["realesr-animevideov3+supir"]["stage1"] == "realesr-animevideov3"
    assert "NIQE" in (out / "summary.md").read_text()
