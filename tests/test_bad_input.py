"""What a user sees when sample.py, the mask CLI and the degrade CLI get bad input (issue 12): one line on
stderr, the right exit code, no traceback, and no file outside the output touched. The tools run as
subprocesses where that is the point; option checks run in-process (the same parser, the same stderr)."""
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sample  # noqa: E402
from mini_supir import images, presets  # noqa: E402
from mini_supir.images import read_png_info  # noqa: E402
from fixtures import png_header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--model", "tiny", "--min-size", "0", "--steps", "1")


def tool(*argv, cwd: Path) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of `python ARGV` with this checkout first on the path, offline."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINI_SUPIR_OFFLINE": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr, time.time() - t0


def files(folder: Path) -> dict[Path, bytes]:
    """Every file below `folder` (links as their target text): compare before / after to see what changed."""
    return {p: os.readlink(p).encode() if p.is_symlink() else p.read_bytes() for p in folder.rglob("*")
            if p.is_file() or p.is_symlink()}


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    return lines[0]


def exit_code(argv, main=sample.main) -> int:
    try:
        return main([*map(str, argv)])
    except SystemExit as e:  # argparse: a bad option value
        return e.code


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / name)
    return d


@pytest.mark.parametrize("argv, problem", [
    (["--cfg", "nan"], "argument --cfg: 'nan' is not a finite number"),
    (["--control-scale", "nan"], "argument --control-scale: 'nan' is not a finite number"),
    (["--upscale", "inf"], "argument --upscale: 'inf' is not a finite number"),
    (["--seed", "1e20"], "argument --seed: '1e20' is not an integer"),
    (["--seed", str(2 ** 64)], "must be <= 9223372036854775807"),
    (["--seed", "1" + "0" * 400], "must be <= 9223372036854775807"),
    (["--steps", "1e11"], "argument --steps: '1e11' is not an integer"),
    (["--steps", "100000000000"], "steps and num_samples must be in 1..1000"),
    (["--num-samples", "100000000000"], "steps and num_samples must be in 1..1000"),
    (["--lora", "style.safetensors:nan"], "the scale must be a finite number"),
    (["--lora", "style.safetensors:abc"], "the scale after ':' must be a number, not 'abc'"),
    (["--device", "foo"], "argument --device: 'foo' is not a device"),
    (["--sampler", "dpmpp2m", "--restore-cfg", "2"], "--restore-cfg is not used by --sampler dpmpp2m"),
    (["--sampler", "dpmpp2m", "--s-churn", "0"], "--s-churn is not used by --sampler dpmpp2m"),
    (["--sampler", "dpmpp2m", "--control-start", "0.5"], "--control-start is not used by --sampler dpmpp2m"),
    (["--eta", "0.5"], "--eta is not used by --sampler edm"),
    (["--sampler", "lightning", "--s-noise", "1"], "--s-noise is not used by --sampler lightning"),
    (["--mask-param", "window=0", "--repair"], "argument --mask-param: 0 must be >= 3"),
])
def test_sample_option_values_are_refused_up_front(capsys, photos, tmp_path, argv, problem):
    assert exit_code(["--image", photos, "--out", tmp_path / "out", *TINY, *argv]) == 2
    assert problem in one_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_what_the_user_sees_for_a_nan_option(photos, tmp_path):
    before = files(tmp_path)
    code, err, _ = tool(ROOT / "sample.py", "--image", photos, "--out", tmp_path / "out", *TINY, "--cfg", "nan", cwd=tmp_path)
    assert code == 2 and "sample.py: error: argument --cfg: 'nan' is not a finite number" in one_error(err)
    assert files(tmp_path) == before


def test_lora_with_nan_tensors_is_named(capsys, photos, tmp_path, style_lora):
    tensors = load_file(str(style_lora))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, tmp_path / "nan.safetensors")
    assert exit_code(["--image", photos, "--out", tmp_path / "out", *TINY, "--lora", tmp_path / "nan.safetensors"]) == 1
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {tmp_path / 'nan.safetensors'}: ") and "1 tensors hold NaN or inf values" in line
    assert not (tmp_path / "out").exists()


def test_inputs_are_checked_before_weights_then_every_missing_file_is_named(capsys, photos, tmp_path):
    weights = ["--sdxl", tmp_path / "sdxl.safetensors", "--supir", tmp_path / "supir.safetensors",
               "--lora", tmp_path / "style.safetensors"]
    assert exit_code(["--image", photos / "typo.png", "--out", tmp_path / "out", *TINY, *weights]) == 1
    assert one_error(capsys.readouterr().err) == f"error: {photos / 'typo.png'}: no such file"  # weights not reached
    assert exit_code(["--image", photos, "--out", tmp_path / "out", *TINY, *weights]) == 1
    line = one_error(capsys.readouterr().err)
    assert all(line.count(f"no such file: {tmp_path / n}") == 1 for n in ("style.safetensors", "sdxl.safetensors",
                                                                          "supir.safetensors"))
    assert not (tmp_path / "out").exists()  # no empty output folder after an early failure


def test_device_that_is_not_here(capsys, photos, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert exit_code(["--image", photos, "--out", tmp_path / "out", *TINY, "--device", "cuda:0"]) == 2
    assert "this machine has no CUDA GPU" in one_error(capsys.readouterr().err)


def test_dpmpp2m_metadata_does_not_claim_what_it_ignores(capsys, photos, tmp_path):
    assert sample.main(["--image", str(photos / "a.png"), "--out", str(tmp_path), *TINY, "--sampler", "dpmpp2m"]) == 0
    s = read_png_info(tmp_path / "a.png")["settings"]
    assert (s["sampler"], s["restore_cfg"], s["s_churn"], s["control_start"]) == ("dpmpp2m", 0.0, 0.0, None)
    assert sample.main(["--image", str(photos / "a.png"), "--out", str(tmp_path / "edm"), *TINY]) == 0
    s = read_png_info(tmp_path / "edm" / "a.png")["settings"]
    assert (s["sampler"], s["eta"], s["s_churn"], s["restore_cfg"]) == ("edm", None, 5.0, 4.0)  # no DPM++ eta


def test_settings_refuse_what_their_sampler_ignores():
    """The rule lives in RestoreSettings, so the web page and evaluate.py get it too (derived from sampler.SAMPLERS)."""
    assert presets.unused_settings("edm") == ("eta",)
    assert presets.unused_settings("lightning") == ("eta", "s_churn", "s_noise")
    assert presets.unused_settings("dpmpp2m") == ("s_churn", "restore_cfg", "control_start")
    for name, settings in [("edm", presets.QUALITY), ("dpmpp2m", presets.LIGHTNING), ("lightning", presets.EULER_LIGHTNING)]:
        assert presets.preset("quality", name) == settings
    with pytest.raises(ValueError, match="eta is not used by the edm sampler"):
        replace(presets.QUALITY, eta=1.0)
    with pytest.raises(ValueError, match="restore_cfg is not used by the dpmpp2m sampler"):
        replace(presets.LIGHTNING, restore_cfg=4.0)


def test_ctrl_c_is_one_line_and_130(photos, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINI_SUPIR_OFFLINE": "1"}
    # a.png takes a second; b.png, 1024 px, tens of seconds: SIGINT arrives while b is being restored
    Image.new("RGB", (1024, 1024), "grey").save(photos / "b.png")
    p = subprocess.Popen([sys.executable, ROOT / "sample.py", "--image", photos, "--out", tmp_path / "out", *TINY],
                         cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    started = time.time()
    while time.time() - started < 120 and p.poll() is None and not (tmp_path / "out" / "a.png").exists():
        time.sleep(0.2)  # (stderr is a pipe: no progress bars to watch)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["a.png"]  # no temp file, no half b.png


def test_png_bomb_is_refused_from_its_header_in_every_tool(tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    bomb = png_header(gt / "bomb.png", 32000, 32000)
    assert bomb.stat().st_size < 4096
    before = files(tmp_path)
    for argv, code in (([ROOT / "sample.py", "--image", bomb, "--out", tmp_path / "out", *TINY], 1),
                       (["-m", "mini_supir.mask", "--image", bomb, "--out", tmp_path / "m.png"], 2),
                       (["-m", "mini_supir.degrade", "--in", gt, "--out", tmp_path / "lq"], 1)):
        got, err, seconds = tool(*argv, cwd=tmp_path)
        assert got == code and f"{bomb}: 32000x32000 is 1024 MP, more than the 537 MP" in one_error(err), err
        assert seconds < 60
    assert files(tmp_path) == before


def test_size_check_reads_no_pixels_nor_exif(tmp_path, monkeypatch):
    """PIL's PngImageFile.getexif() decodes the whole image to reach an eXIf chunk after the pixels: a
    20000^2 PNG bomb (under the decode limit) would cost 1.6 GB before the tool's own size check."""
    from PIL import ImageFile
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    bomb = png_header(tmp_path / "bomb.png", 20000, 20000)
    for read in (images.open_image, images.image_size):
        with pytest.raises(images.ImageError, match="too large here"):
            read(bomb, images.pixel_limit(10 ** 6, "too large here"))
    assert decoded == []


def test_out_equal_to_the_input_folder_never_replaces_an_input(capsys, photos, tmp_path):
    before = files(tmp_path)
    assert exit_code(["--image", photos, "--out", photos, "--overwrite", *TINY]) == 2
    line = one_error(capsys.readouterr().err)
    assert line == f"error: --out {photos}: {photos / 'a.png'} would be written over the input {photos / 'a.png'}: " \
                   "choose another folder"
    # a mask folder as --out: <name>_mask.png there is the user's painted mask
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 48)).save(masks / "a_mask.png")
    before = files(tmp_path)
    assert exit_code(["--image", photos / "a.png", "--mask", masks, "--out", masks, "--overwrite", *TINY]) == 2
    assert "a_mask.png would be written over the input" in one_error(capsys.readouterr().err)
    assert files(tmp_path) == before


def test_two_inputs_never_write_one_output(capsys, photos, tmp_path):
    (tmp_path / "other").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "other" / "a.png")
    assert exit_code(["--image", photos, tmp_path / "other", "--out", tmp_path / "out", *TINY]) == 2
    assert one_error(capsys.readouterr().err) == \
        f"error: {tmp_path / 'out' / 'a_png.png'}: two inputs would both be written here: rename one of them"
    assert not (tmp_path / "out").exists()


def test_animated_gif_says_frame_1_is_used(capsys, tmp_path):
    frames = [Image.new("RGB", (64, 48), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert sample.main(["--image", str(tmp_path / "anim.gif"), "--out", str(tmp_path / "out"), *TINY]) == 0
    [notice] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert notice == f"warning: {tmp_path / 'anim.gif'}: 3 frames (an animation?): only frame 1 is used"


def test_folder_without_images_is_an_error(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    assert sample.main(["--image", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), *TINY]) == 1
    assert one_error(capsys.readouterr().err) == f"error: {tmp_path / 'empty'}: no image files in this folder"
    assert not (tmp_path / "out").exists()


def test_mask_of_another_shape_is_refused_before_the_weights(capsys, photos, tmp_path):
    Image.new("L", (100, 100), 255).save(tmp_path / "square.png")
    code = exit_code(["--image", photos / "a.png", "--mask", tmp_path / "square.png", "--out", tmp_path / "out",
                      *TINY, "--sdxl", tmp_path / "missing.safetensors", "--supir", tmp_path / "missing2.safetensors"])
    line = one_error(capsys.readouterr().err)
    assert code == 1 and line == (f"error: {photos / 'a.png'}: mask {tmp_path / 'square.png'}: the mask is 100x100, "
                                  "the image 64x48: another shape (a mask is scaled, never stretched: paint it on "
                                  "the image or a resized copy)")
    assert not (tmp_path / "out").exists()


def test_degrade_reports_each_bad_file_and_goes_on(tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    for name in ("a.png", "c.png"):
        Image.new("RGB", (32, 32), "grey").save(gt / name)
    (gt / "b.png").write_bytes(b"not a png")
    png_header(gt / "d.png", 9000, 9000)  # under the decode limit, over the 67 MP degrade works on
    code, err, _ = tool("-m", "mini_supir.degrade", "--in", gt, "--out", tmp_path / "lq", cwd=tmp_path)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err and len(lines) == 2, err
    assert lines[0].startswith(f"error: {gt / 'b.png'}: not an image")
    assert lines[1] == f"error: {gt / 'd.png'}: 9000x9000 is 81 MP, more than the 67 MP degrade works on"
    assert sorted(p.name for p in (tmp_path / "lq").iterdir()) == ["a.png", "c.png"]


def test_unwritable_out_is_found_first_and_nothing_is_made(tmp_path):
    from mini_supir import outputs
    outputs.check_writable(tmp_path / "new" / "deeper")  # the nearest existing folder is writable
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        outputs.check_writable(tmp_path / "file" / "out")
