"""train.py as a user meets it: a bad input is refused with one line and its exit code (2: the command line,
1: weight or checkpoint files, 130: interrupted) before any work, and nothing outside --out changes; progress
lines off a terminal; Ctrl-C and SIGKILL; huge images decoded once."""
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from mini_supir import train_data  # noqa: E402
from fixtures import png_header  # noqa: E402

IMAGES = ROOT.parent / "shared" / "images"


def cli(*argv, env=None, timeout=300) -> tuple[int, list[str]]:
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, argv)], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return run.returncode, run.stderr.strip().splitlines()


def tree(folder: Path) -> dict:
    """Every file and folder below `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def data(tmp_path) -> Path:
    """Two small photos (128 px crops: the scan and the steps stay fast)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("coffee.png", "rocket.jpg"):
        Image.open(IMAGES / name).convert("RGB").crop((0, 0, 128, 128)).save(folder / f"{Path(name).stem}.png")
    return folder


def tiny(data, out, *extra) -> list[str]:
    return [str(a) for a in ("--data", data, "--out", out, "--model", "tiny", "--resolution", 64, "--workers", 0,
                             "--warmup-steps", 1, *extra)]


def test_missing_weights_are_named_at_once_in_one_line(tmp_path, data):
    # the README's training command, no weights anywhere, downloads off
    before = tree(tmp_path)
    code, err = cli("--data", data, "--out", tmp_path / "run", env={"MINI_SUPIR_WEIGHTS": str(tmp_path / "w")})
    assert code == 1 and len(err) == 1, err
    assert "sd_xl_base_1.0_0.9vae.safetensors" in err[0] and "SUPIR-v0Q_fp16.safetensors" in err[0]
    assert f"put it at {tmp_path / 'w' / 'SUPIR-v0Q_fp16.safetensors'}" in err[0]
    assert tree(tmp_path) == before  # not even an empty --out


def test_without_network_one_download_is_tried_and_every_file_named(tmp_path, data, monkeypatch, capsys):
    import huggingface_hub
    from mini_supir import weights
    tried = []

    def no_network(repo_id, filename, **kwargs):
        tried.append(filename)
        raise OSError("Name or service not known")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "w")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MINI_SUPIR_OFFLINE", raising=False)
    assert train.main(["--data", str(data), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert tried == ["sd_xl_base_1.0_0.9vae.safetensors"] and len(err) == 1, (tried, err)
    assert err[0].startswith("error: sdxl, Q: could not download it (OSError)") and "SUPIR-v0Q_fp16.safetensors" in err[0]
    assert not (tmp_path / "run").exists()


def test_truncated_weight_files_are_named(tmp_path, data):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((IMAGES / "coffee.png").read_bytes()[:1000])
    before = tree(tmp_path)
    code, err = cli(*tiny(data, tmp_path / "run", "--sdxl", cut, "--supir", cut))
    assert code == 1 and len(err) == 1 and "cut.safetensors is not a readable safetensors file" in err[0], err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("content, problem", [
    (b"", "not a readable checkpoint (truncated, or not from train.py: EOFError)"),
    ((IMAGES / "coffee.png").read_bytes()[:1000], "not a readable checkpoint (truncated, or not from train.py: "
                                                  "UnpicklingError)"),
    ("tensor", "not a train.py checkpoint (no step, position, lora, optimizer, ema, rng, settings)"),
    ("half", "not a readable checkpoint (truncated, or not from train.py: RuntimeError)")])
def test_wrong_checkpoint_files_are_refused(tmp_path, data, capsys, content, problem):
    assert train.main(tiny(data, tmp_path / "run", "--max-steps", 1)) == 0
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), bad)
    else:
        bad.write_bytes(good[:len(good) // 2] if content == "half" else content)
    capsys.readouterr()
    assert train.main(tiny(data, tmp_path / "run", "--max-steps", 2, "--resume", bad)) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {bad} is {problem}"]
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


def test_resuming_with_another_adapter_shape_is_refused_naming_the_checkpoints_values(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert train.main(tiny(data, out, "--max-steps", 1, "--lora-rank", 8)) == 0
    before = tree(tmp_path)
    code, err = cli(*tiny(data, out, "--max-steps", 2, "--resume", "--lora-rank", 4))
    assert code == 2 and err == [f"error: {out / 'checkpoint.pt'} was trained with --lora-rank 8: resume with the "
                                 "same, or start afresh in another --out"], err
    assert train.main(tiny(data, out, "--max-steps", 2, "--resume", "--lora-rank", 8, "--lora-targets", "conv")) == 2
    assert "was trained with --lora-targets transformer:" in capsys.readouterr().err
    assert tree(tmp_path) == before
    # other changes are a warning, and the run goes on
    assert train.main(tiny(data, out, "--max-steps", 2, "--resume", "--lora-rank", 8, "--lr", 2e-4)) == 0
    assert capsys.readouterr().err.startswith("warning: resuming with changed settings (old, new): "
                                              "{'lr': (0.0001, 0.0002)}\n")


@pytest.mark.parametrize("extra, message", [
    (("--resolution", 0), "argument --resolution: 0 must be >= 1"),
    (("--resolution", 48), "--resolution must be a multiple of 32 (--model tiny) and of the degradation's scale 4"),
    (("--resolution", 8192), "argument --resolution: 8192 must be <= 4096"),
    (("--lr", "nan"), "argument --lr: 'nan' is not a finite number"),
    (("--lr", 0), "argument --lr: 0 must be > 0"),
    (("--min-lr", 1), "--min-lr must be at most --lr"),
    (("--max-steps", 0), "argument --max-steps: 0 must be >= 1"),
    (("--batch-size", -1), "argument --batch-size: -1 must be >= 1"),
    (("--grad-accum", "1e3"), "argument --grad-accum: '1e3' is not an integer"),
    (("--lora-rank", 0), "argument --lora-rank: 0 must be >= 1"),
    (("--lora-alpha=-inf",), "argument --lora-alpha: '-inf' is not a finite number"),
    (("--lora-dropout", 1), "--lora-dropout must be below 1"),
    (("--ema", 1), "--ema must be below 1"),
    (("--caption-dropout", 2), "argument --caption-dropout: 2 must be <= 1"),
    (("--p-std", 0), "argument --p-std: 0 must be > 0"),
    (("--timestep-range", 500, 100), "--timestep-range must be MIN MAX with MIN <= MAX"),
    (("--seed", -1), "argument --seed: -1 must be >= 0"),
    (("--save-every", 0), "argument --save-every: 0 must be >= 1"),
    (("--workers", -1), "argument --workers: -1 must be >= 0"),
    (("--preview-image", "x.png"), "--preview-image must be given with --preview-every N"),
    (("--sdxl", "x.safetensors"), "--sdxl must be given with --supir for --model tiny / medium"),
    (("--task", "repair", "--degradation", "sr4"), "--degradation must be one of cracks, cracks-paint for --task repair"),
    (("--device", "foo"), "argument --device: 'foo' is not a device: auto, cpu, cuda, cuda:N or mps"),
    (("--device", "cuda:7"), "argument --device: cuda:7: this machine has")])
def test_bad_option_values_exit_2_in_one_line_before_anything_runs(tmp_path, data, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        code = train.main(tiny(data, tmp_path / "run", *extra))
        raise SystemExit(code)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(f"train.py: error: {message}"), err
    assert not (tmp_path / "run").exists()


def test_a_nan_option_as_the_user_sees_it(tmp_path, data):
    assert cli(*tiny(data, tmp_path / "run", "--lr", "nan")) == (
        2, ["train.py: error: argument --lr: 'nan' is not a finite number (--help lists the options)"])
    assert not (tmp_path / "run").exists()


def test_bad_preview_images_are_refused_before_training(tmp_path, data, capsys):
    png_header(tmp_path / "bomb.png", 30000, 30000)
    (tmp_path / "text.png").write_text("not an image")
    before = tree(tmp_path)
    code, err = cli(*tiny(data, tmp_path / "run", "--preview-every", 1, "--preview-image", tmp_path / "bomb.png"))
    assert code == 2 and err == [f"error: --preview-image {tmp_path / 'bomb.png'}: 30000x30000 is 900 MP, more than "
                                 "the 537 MP this tool decodes"], err
    for name, problem in (("missing.png", "no such file"), ("text.png", "not an image (no format PIL reads)")):
        assert train.main(tiny(data, tmp_path / "run", "--preview-every", 1, "--preview-image", tmp_path / name)) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: --preview-image {tmp_path / name}: {problem}"]
    assert tree(tmp_path) == before


def test_an_out_that_is_a_file_or_cannot_be_written_is_refused_before_training(tmp_path, data, capsys):
    (tmp_path / "file").write_text("mine")
    before = tree(tmp_path)
    code, err = cli(*tiny(data, tmp_path / "file"))
    assert code == 2 and err == [f"error: --out {tmp_path / 'file'} is a file, not a folder"], err
    if os.geteuid() == 0:  # root writes anywhere a mode allows none; sysfs refuses even root
        unwritable = Path("/sys/mini_supir_run")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        unwritable, before = tmp_path / "locked" / "run", tree(tmp_path)
    assert train.main(tiny(data, unwritable)) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {unwritable}: cannot write there (")
    assert train.main(tiny(data, tmp_path / "file" / "run")) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'file' / 'run'}: cannot write there (Not a directory)"
    assert tree(tmp_path) == before


def test_a_finished_or_running_run_is_not_overwritten(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert train.main(tiny(data, out, "--max-steps", 1)) == 0
    before, _ = tree(tmp_path), capsys.readouterr()
    assert train.main(tiny(data, out, "--max-steps", 1)) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {out} holds a run (checkpoint.pt): continue it with "
                                               "--resume, or choose another --out")
    fd = os.open(out, os.O_RDONLY)  # what a run in progress holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert train.main(tiny(data, out, "--max-steps", 2, "--resume")) == 2
        assert capsys.readouterr().err.strip() == f"error: --out {out}: another training run is writing there"
    finally:
        os.close(fd)
    assert tree(tmp_path) == before
    with pytest.raises(SystemExit, match="2"):  # --out = --data: refused
        train.main(tiny(out, out, "--max-steps", 2, "--resume"))
    assert capsys.readouterr().err.startswith("train.py: error: --out must be another folder than --data")


def test_an_empty_data_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, err = cli("--data", tmp_path / "empty", "--out", tmp_path / "run", "--model", "tiny", "--resolution", 64)
    assert code == 2 and err == [f"error: no readable image in {tmp_path / 'empty'}"], err
    assert not (tmp_path / "run").exists()


def test_progress_lines_off_a_terminal_and_no_stale_temp_files(tmp_path, data):
    out = tmp_path / "run"
    (out / "previews").mkdir(parents=True)
    stale = [out / ".checkpoint.pt.4242.tmp", out / ".lora.safetensors.k2x_9q.tmp", out / "previews" / ".step_000002.png.a1.tmp"]
    for path in stale:  # what killed runs leave: older versions named them by PID, atomic_write randomly
        path.write_bytes(b"")
    (out / ".notes.tmp").write_text("not ours")
    code, err = cli(*tiny(data, out, "--max-steps", 3))
    assert code == 0, err
    assert [line.split("  ")[0] for line in err] == ["step 1/3", "step 3/3"], err  # first, last (and every 10 s)
    step, loss, lr, rate = err[-1].split("  ")
    assert float(loss.split()[1]) > 0 and lr == "lr 5.00e-05" and rate.endswith(" it/s")  # cosine, halfway
    assert sorted(str(p.relative_to(out)) for p in out.rglob(".*")) == [".notes.tmp"]


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, data):
    cmd = [sys.executable, str(ROOT / "train.py"), *tiny(data, tmp_path / "run", "--max-steps", 10000, "--workers", 2,
                                                         "--save-every", 10000)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    err = [proc.stderr.readline()]  # the first progress line: training runs
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the loader workers get it too
    err += proc.stderr.read().splitlines()
    assert proc.wait(timeout=120) == 130, err
    assert err[0].startswith("step 1/10000") and all(line.startswith("step ") for line in err[:-1]), err
    step = int(err[-1].split()[3].rstrip(":"))
    assert err[-1] == f"stopped at step {step}: checkpoint saved, continue with --resume"
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == step


def test_ctrl_c_before_training_is_one_line(tmp_path, data, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "scan_folder", interrupted)
    assert train.main(tiny(data, tmp_path / "run")) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_after_sigkill_the_checkpoint_is_whole_and_no_temp_file_stays(tmp_path, data):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *tiny(data, out, "--max-steps", 10000, "--save-every", 1)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    deadline = time.time() + 5
    while not list(out.glob(".checkpoint.pt.*.tmp")) and time.time() < deadline:
        time.sleep(0.001)  # killed while writing the next checkpoint, most times
    proc.kill()
    proc.wait()
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]  # whole: written beside it, then renamed
    assert train.main(tiny(data, out, "--max-steps", step + 1, "--resume")) == 0
    assert list(out.glob(".*")) == []
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step + 1


def test_a_huge_image_is_decoded_once_and_capped(tmp_path, data, monkeypatch):
    monkeypatch.setattr(train_data, "MAX_TRAIN_PIXELS", 150 * 150)  # the 13000^2 case, scaled down
    Image.open(IMAGES / "astronaut.png").convert("RGB").save(data / "huge.png")  # 512^2 > the cap
    decoded = []
    real = train_data.images.open_image

    def counting(path, check_size=None):
        image = real(path, check_size)  # the scan's header check raises before this returns
        decoded.append(Path(path).name)
        return image
    monkeypatch.setattr(train_data.images, "open_image", counting)
    out = tmp_path / "run"
    assert train.main(tiny(data, out, "--max-steps", 6, "--batch-size", 2)) == 0
    assert decoded.count("huge.png") == 1  # capped once, at the start
    assert decoded.count("coffee.png") + decoded.count("rocket.png") == 12 - 4  # the others at every draw
    crops = train_data.Crops([data / "huge.png"], [""], 64, lambda hq, g: (hq, None), 0.0, sizes=[(512, 512)])
    assert tuple(crops.capped[0].shape) == (1, 3, 150, 150) and crops.capped[0].dtype == torch.uint8
