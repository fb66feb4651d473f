"""sample.py end to end on a tiny random SUPIR saved in the official two-file layout (SDXL + SUPIR)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sample  # noqa: E402
from mini_supir import lora, lora_files, supir  # noqa: E402
from mini_supir.images import read_png_info  # noqa: E402
from mini_supir.presets import RestoreSettings  # noqa: E402

SUPIR_PREFIXES = ("model.control_model.", "model.diffusion_model.project_modules.", "first_stage_model.denoise_encoder.")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random SDXL + SUPIR files, a SUPIR file with a NaN, and a LoRA for the tiny UNet."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = supir.build(supir.TINY, "cpu")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in sd.items() if not k.startswith(SUPIR_PREFIXES)}, d / "sdxl.safetensors")
    supir_sd = {k: v for k, v in sd.items() if k.startswith(SUPIR_PREFIXES)}
    save_file(supir_sd, d / "supir.safetensors")
    nan = dict(supir_sd)
    key = "model.control_model.input_hint_block.0.weight"
    nan[key] = nan[key].clone().fill_(float("nan"))
    save_file(nan, d / "nan.safetensors")
    lora.inject_lora(model.model.diffusion_model, "style", rank=4, targets=lora.ATTENTION)
    with torch.no_grad():
        for p in lora.lora_parameters(model.model.diffusion_model, "style"):
            p.normal_(0, 0.5)
    lora_files.save_lora(model, d / "style.safetensors", "style")
    return d


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (64, 64)), ("b.jpg", (64, 48)), ("c.png", (48, 64))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / name)
    (d / "b.txt").write_text("a brick wall\n")
    (d / "notes.md").write_text("not an image, and not picked up from a folder")
    return d


def run(capsys, weights, *argv, model=True):
    extra = ["--model", "tiny", "--sdxl", str(weights / "sdxl.safetensors"),
             "--supir", str(weights / "supir.safetensors")] if model else []
    code = sample.main([*map(str, argv), "--min-size", "0", "--steps", "2", *extra])
    return code, capsys.readouterr().err


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_folder_restored_with_settings_in_metadata(capsys, weights, images, tmp_path):
    out = tmp_path / "out"
    code, err = run(capsys, weights, "--image", images, "--out", out, "--cfg", "5", "--seed", "7")
    assert code == 0 and not errors(err)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]  # no temp files left
    for name, size in (("a", (64, 64)), ("b", (64, 48)), ("c", (48, 64))):
        assert Image.open(out / f"{name}.png").size == size
    info = read_png_info(out / "b.png")
    expected = RestoreSettings(min_size=0, steps=2, cfg=5.0, prompt="a brick wall")
    assert RestoreSettings.from_dict(info["settings"]) == expected
    assert (info["seed"], info["prompt_from"], info["model"], info["dtype"]) == (7, "caption", "tiny", "float32")
    assert read_png_info(out / "a.png")["settings"]["prompt"] == ""


def test_same_seed_same_pixels_and_samples(capsys, weights, images, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert run(capsys, weights, "--image", images / "a.png", "--out", one)[0] == 0
    assert run(capsys, weights, "--image", images / "a.png", "--out", two, "--num-samples", "2", "--seed", "1233")[0] == 0
    # sample k uses seed + k: sample 1 of seed 1233 is sample 0 of the default seed 1234
    assert np.array_equal(np.asarray(Image.open(one / "a.png")), np.asarray(Image.open(two / "a_1.png")))
    assert not np.array_equal(np.asarray(Image.open(one / "a.png")), np.asarray(Image.open(two / "a_0.png")))


def test_skip_existing_unless_overwrite_and_compare(capsys, weights, images, tmp_path):
    out = tmp_path / "out"
    assert run(capsys, weights, "--image", images / "a.png", "--out", out)[0] == 0
    first = (out / "a.png").stat().st_mtime_ns
    code, err = run(capsys, weights, "--image", images / "a.png", "--out", out)
    assert code == 0 and "output exists" in err and (out / "a.png").stat().st_mtime_ns == first
    code, err = run(capsys, weights, "--image", images / "a.png", "--out", out, "--compare")  # compare missing
    assert code == 0 and "output exists" not in err
    compare = Image.open(out / "a_compare.png")
    assert compare.size == (128, 64)
    assert np.array_equal(np.asarray(compare)[:, 64:], np.asarray(Image.open(out / "a.png")))
    code, err = run(capsys, weights, "--image", images / "a.png", "--out", out, "--overwrite")
    assert code == 0 and (out / "a.png").stat().st_mtime_ns != first


def test_bad_inputs_fail_alone(capsys, weights, images, tmp_path):
    from fixtures import png_header
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.png").write_text("hello")
    data = (images / "a.png").read_bytes()
    (bad / "cut.png").write_bytes(data[:len(data) // 2])
    png_header(bad / "huge.png", 20000, 20000)
    out = tmp_path / "out"
    code, err = run(capsys, weights, "--image", images / "a.png", bad / "missing.png", str(bad / "*.png"),
                    str(tmp_path / "nothing*.png"), "--out", out)
    assert code == 1
    lines = errors(err)
    assert len(lines) == 5, err
    for line, problem in zip(sorted(lines), ["cannot decode", "needs tiling", "no such file", "not an image",
                                             "no file matches"]):
        assert problem in line
    assert all(str(bad) in line or "nothing" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # the good image, nothing half-written


def test_unwritable_output_folder(capsys, weights, images, tmp_path):
    (tmp_path / "file").write_text("")
    code, err = run(capsys, weights, "--image", images, "--out", tmp_path / "file" / "out")
    assert code == 1 and errors(err) == [f"error: {tmp_path / 'file' / 'out'}: cannot write there (Not a directory)"]


def test_wrong_checkpoint_and_fp16_vae(capsys, weights, images, tmp_path):
    sdxl = weights / "sdxl.safetensors"
    code = sample.main(["--image", str(images), "--out", str(tmp_path), "--model", "tiny",
                        "--sdxl", str(sdxl), "--supir", str(sdxl)])
    [line] = errors(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"error: {sdxl}: ") and "not a SUPIR checkpoint" in line
    code, err = run(capsys, weights, "--image", images, "--out", tmp_path, "--vae-dtype", "fp16")
    assert code == 2 and "fp16" in errors(err)[0]


def test_nan_is_reported_and_nothing_written(capsys, weights, images, tmp_path):
    out = tmp_path / "out"
    code = sample.main(["--image", str(images / "a.png"), "--out", str(out), "--model", "tiny", "--min-size", "0",
                        "--steps", "2", "--sdxl", str(weights / "sdxl.safetensors"),
                        "--supir", str(weights / "nan.safetensors")])
    [line] = errors(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"error: {images / 'a.png'}: NaN")
    assert not out.exists()  # not even the output folder: it is made with the first result


def test_lora_changes_the_result(capsys, weights, images, tmp_path):
    assert run(capsys, weights, "--image", images / "a.png", "--out", tmp_path / "plain")[0] == 0
    code, err = run(capsys, weights, "--image", images / "a.png", "--out", tmp_path / "lora",
                    "--lora", f"{weights / 'style.safetensors'}:0.5")
    assert code == 0, err
    info = read_png_info(tmp_path / "lora" / "a.png")
    assert info["loras"] == [[str(weights / "style.safetensors"), 0.5]]
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "a.png")),
                              np.asarray(Image.open(tmp_path / "lora" / "a.png")))


def test_lora_strict_off_applies_what_fits_and_says_what_it_skipped(capsys, weights, images, tmp_path):
    tensors, _ = lora_files.read_lora(weights / "style.safetensors")
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    tensors[stem + ".hada_w1_a"] = torch.zeros(2, 64)  # a LoHa tensor among plain LoRA ones
    save_file(tensors, tmp_path / "mixed.safetensors")
    argv = ("--image", images / "a.png", "--lora", tmp_path / "mixed.safetensors")
    code, err = run(capsys, weights, *argv, "--out", tmp_path / "strict")
    assert code == 1 and "LoHa (1)" in err and "mixed.safetensors" in err
    code, err = run(capsys, weights, *argv, "--out", tmp_path / "off", "--lora-strict", "off")
    assert code == 0, err
    [line] = [x for x in err.splitlines() if x.startswith("warning: LoRA")]
    assert "skipped 1 keys of a kind we do not load" in line and "LoHa (1)" in line and "applied 88 layers" in line


def test_ranks_share_the_images(capsys, weights, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    written = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        before = set(out.iterdir()) if out.exists() else set()
        assert run(capsys, weights, "--image", images, "--out", out)[0] == 0
        written.append(sorted(p.name for p in set(out.iterdir()) - before))
    assert written == [["a.png", "c.png"], ["b.png"]]  # sorted list a, b, c: rank r takes files[r::2]


def test_random_tiny_model_needs_no_files(capsys, images, tmp_path):
    code = sample.main(["--model", "tiny", "--image", str(images / "c.png"), "--out", str(tmp_path),
                        "--min-size", "0", "--steps", "1", "--sampler", "dpmpp2m"])
    assert code == 0
    info = read_png_info(tmp_path / "c.png")
    assert info["weights"] == "random tiny (seed 0)" and info["settings"]["cfg"] == 2.0  # Lightning preset


@pytest.fixture
def cracked(tmp_path):
    """The astronaut at 128 px with synthetic cracks and scratches (seed 0), and its clean original."""
    from mini_supir.images import load_tensor, save_tensor
    from mini_supir.mask_synth import synthesize_damage
    d = tmp_path / "cracked"
    d.mkdir()
    clean = torch.nn.functional.interpolate(load_tensor(Path(__file__).parents[2] / "shared" / "images" /
                                                        "astronaut.png"), size=(128, 128), mode="area")[0]
    damaged, _ = synthesize_damage(clean, 0, kinds=("cracks", "scratches"))
    save_tensor(damaged, d / "a.png")
    save_tensor(clean, d / "a_clean.png")
    return d


def test_repair_writes_result_mask_and_compare(capsys, weights, cracked, tmp_path):
    out = tmp_path / "out"
    code, err = run(capsys, weights, "--image", cracked / "a.png", "--out", out, "--repair", "--compare",
                    "--clean", cracked / "a_clean.png")
    assert code == 0 and not errors(err)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_compare.png", "a_mask.png"]
    damaged, result = (np.asarray(Image.open(p)).astype(int) for p in (cracked / "a.png", out / "a.png"))
    hard = np.asarray(Image.open(out / "a_mask.png")) > 127
    assert 0.005 < hard.mean() < 0.3  # the detector found the cracks (and not the whole photo)
    from mini_supir import repair
    soft = repair.soft_mask(torch.from_numpy(hard)).numpy()
    assert np.array_equal(result[soft == 0], damaged[soft == 0])  # untouched pixels kept, byte for byte
    assert np.abs(result[hard] - damaged[hard]).mean() > 5
    compare = np.asarray(Image.open(out / "a_compare.png")).astype(int)
    assert compare.shape == (128, 4 * 128, 3)  # damaged | mask | repaired | clean
    assert np.array_equal(compare[:, :128], damaged) and np.array_equal(compare[:, 256:384], result)
    assert np.array_equal(compare[:, 128:256, 0] > 127, hard)
    assert np.array_equal(compare[:, 384:], np.asarray(Image.open(cracked / "a_clean.png")))
    info = read_png_info(out / "a.png")
    assert info["repair"]["mask"] == "auto" and info["repair"]["mask_params"]["feather_sigma"] == 1.5
    assert info["repair"]["damaged_fraction"] == pytest.approx(hard.mean(), abs=1e-6)

    # the saved mask, given back with --mask (a file, or the folder holding <name>_mask.png), repairs the same
    for spec in (out / "a_mask.png", out):
        again = tmp_path / f"again_{spec.name}"
        code, err = run(capsys, weights, "--image", cracked / "a.png", "--out", again, "--mask", spec)
        assert code == 0 and not errors(err)
        assert np.array_equal(np.asarray(Image.open(again / "a.png")), result)
        assert read_png_info(again / "a.png")["repair"]["mask"] == str(out / "a_mask.png")


def test_mask_file_marks_what_is_repaired(capsys, weights, images, tmp_path):
    painted = np.zeros((64, 64), np.uint8)
    painted[20:30, 10:50] = 255
    Image.fromarray(painted).save(tmp_path / "painted.png")
    out = tmp_path / "out"
    code, err = run(capsys, weights, "--image", images / "a.png", "--out", out, "--mask", tmp_path / "painted.png",
                    "--mask-feather", "0")
    assert code == 0 and not errors(err)
    before, after = np.asarray(Image.open(images / "a.png")), np.asarray(Image.open(out / "a.png"))
    changed = (before != after).any(-1)
    assert changed[20:30, 10:50].mean() > 0.9 and not changed[painted == 0].any()  # no feathering: exactly the paint
    assert np.array_equal(np.asarray(Image.open(out / "a_mask.png")), painted)


def test_repair_option_errors(capsys, weights, images, tmp_path):
    for argv, problem in ((["--repair", "--upscale", "2"], "input size"), (["--mask-radius", "3"], "needs --repair"),
                          (["--mask-param", "colour=3", "--repair"], "NAME=VALUE")):
        with pytest.raises(SystemExit) as e:
            run(capsys, weights, "--image", images / "a.png", "--out", tmp_path, *argv)
        assert e.value.code == 2 and problem in capsys.readouterr().err
    code, err = run(capsys, weights, "--image", images / "a.png", "--out", tmp_path / "o",
                    "--mask", tmp_path / "no.png")
    assert code == 1 and errors(err)[0].startswith(f"error: {images / 'a.png'}: mask {tmp_path / 'no.png'}: ")
    assert not (tmp_path / "o" / "a.png").exists()
