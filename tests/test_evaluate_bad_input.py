"""evaluate.py on bad input, run as a user runs it: broken and hostile image files, exact results (infinite
PSNR), ground truth that changed between runs, bad option values, unwritable output, Ctrl-C. Each time: the
exit code, one line saying what is wrong, and no file outside --out touched."""
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fixtures import png_header  # noqa: E402
import evaluate  # noqa: E402
from mini_supir import charts, eval_report  # noqa: E402
from mini_supir.evaluation import Task  # noqa: E402

IMAGES = ROOT.parent / "shared" / "images"
QUICK = ["--method", "bicubic", "--gt-crop", "64", "--grid-crop", "32"]


def cli(*argv, timeout=300) -> tuple[int, list[str]]:
    run = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, argv)], capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT)
    return run.returncode, [line for line in run.stderr.splitlines() if line.strip()]


def errors(err: list[str]) -> list[str]:
    assert not any("Traceback" in line for line in err), err
    return [line for line in err if "error:" in line]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}



@pytest.fixture
def gt(tmp_path):
    """A GT folder: a photo, an image whose bicubic restoration is exact (a flat grey: PSNR inf), a truncated
    PNG, two decompression bombs and a 16-bit greyscale ramp."""
    folder = tmp_path / "gt"
    folder.mkdir()
    Image.open(IMAGES / "coffee.png").crop((200, 100, 264, 164)).save(folder / "coffee.png")
    Image.new("RGB", (64, 64), (120, 130, 140)).save(folder / "flat.png")
    (folder / "broken.png").write_bytes((IMAGES / "motorcycle_left.png").read_bytes()[:3000])
    png_header(folder / "bomb.png", 32000, 32000, colour_type=6)      # under PIL's own guard, over ours
    png_header(folder / "bomb2.png", 50000, 50000, colour_type=6)     # PIL's DecompressionBombError
    ramp = (np.add.outer(np.arange(64), np.arange(64)) * 500).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "grey16.png")
    return folder


def test_broken_files_are_reported_and_the_report_is_drawn(gt, tmp_path):
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    start = time.perf_counter()
    code, err = cli("--gt", gt, "--out", out, *QUICK, "--grid", "8")
    seconds = time.perf_counter() - start
    lines = errors(err)
    assert code == 1 and len(lines) == 3, err
    assert "bomb.png (bicubic): 32000x32000 is 1024 MP, more than the 537 MP this tool decodes" in lines[0]
    assert "bomb2.png (bicubic): " in lines[1] and "decompression bomb" in lines[1]
    assert "broken.png (bicubic): cannot decode" in lines[2]
    assert seconds < 60  # refused from the header: nothing of the 4 GB was decoded
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out/")} == before

    rows = {r.split(",")[0]: r.split(",") for r in (out / "results.csv").read_text().splitlines()[1:]}
    assert sorted(rows) == ["coffee.png", "flat.png", "grey16.png"]
    assert rows["flat.png"][5] == "inf"  # psnr: equal to its GT
    assert 25 < float(rows["grey16.png"][5]) < 100  # a smooth ramp (read as white, it would be inf)
    lq = np.asarray(Image.open(out / "images" / "lq" / "grey16.png"), dtype=np.float64)
    assert abs(lq.mean() - 63 * 500 / 257) < 3  # the ramp's mean in 8 bits, not 255
    summary = (out / "summary.md").read_text()
    assert "| bicubic | inf |" in summary and "inf: a result equal to its ground truth" in summary
    assert Image.open(out / "grid.png").height == 34 + 3 * 32  # the three images that loaded
    for name in ("bars.png", "gain.png"):
        assert Image.open(out / name).width > 200


def test_charts_leave_out_values_that_are_not_finite(tmp_path):
    colour = {"a": "#ff0000", "b": "#00ff00", "c": "#0000ff"}
    charts.bars(tmp_path / "bars.png", [charts.Panel("PSNR", "dB", 2, {"a": (math.inf, math.nan), "b": (20.0, 1.0),
                                                                       "c": None})], colour, "t")
    pixels = {tuple(p) for p in np.asarray(Image.open(tmp_path / "bars.png")).reshape(-1, 3)}
    assert (0, 255, 0) in pixels and (255, 0, 0) in pixels  # b's bar, a's legend swatch only
    assert np.sum(np.all(np.asarray(Image.open(tmp_path / "bars.png")) == (255, 0, 0), -1)) == 13 * 13
    charts.dots(tmp_path / "dots.png", {"a": [math.inf, 1.0], "b": [math.nan]}, colour, "t", "s", "dB")
    charts.dots(tmp_path / "empty.png", {}, {}, "t", "s", "dB")
    charts.curve(tmp_path / "curve.png", [1, 2, 3, 4], [([1.0, math.nan, math.inf, 0.5], "#ff0000", 1)], "t",
                 "step", "loss", log=True)
    for name in ("dots.png", "empty.png", "curve.png"):
        assert Image.open(tmp_path / name).width > 100


def test_grid_leaves_out_a_ground_truth_that_no_longer_loads(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.open(IMAGES / "coffee.png").crop((0, 0, 64, 64)).save(tmp_path / "good.png")
    eval_report.grid([tmp_path / "bad.png", tmp_path / "good.png"], ["bicubic"], Task("sr4"), tmp_path, 32,
                     tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (34 + 3 * 32, 34 + 32)


def test_changed_ground_truth_rows_are_recomputed(tmp_path, capsys):
    gt, out = tmp_path / "gt", tmp_path / "out"
    gt.mkdir()
    for source, name in (("coffee.png", "a.png"), ("motorcycle_left.png", "b.png")):
        Image.open(IMAGES / source).crop((0, 0, 96, 96)).save(gt / name)
    argv = ["--gt", str(gt), "--out", str(out), *QUICK]
    assert evaluate.main(argv) == 0
    first = (out / "results.csv").read_text().splitlines()
    hashes = json.loads((out / "run.json").read_text())["gt"]
    assert sorted(hashes) == ["a.png", "b.png"]

    Image.open(IMAGES / "motorcycle_left.png").crop((96, 96, 192, 192)).save(gt / "b.png")  # another picture
    capsys.readouterr()
    assert evaluate.main(argv) == 0
    assert "note: recomputing the rows of b.png: the file has changed since they were made" in capsys.readouterr().err
    second = (out / "results.csv").read_text().splitlines()
    assert len(second) == 3 and second[1] == first[1]  # a.png kept as it was
    old, new = first[2].split(","), second[2].split(",")
    assert new[0] == "b.png" and new[5] != old[5]  # the psnr of the new picture
    assert json.loads((out / "run.json").read_text())["gt"]["b.png"] != hashes["b.png"]


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "argument --limit: 0 must be >= 1"),
    (["--gt-crop", "nan"], "argument --gt-crop: 'nan' is not an integer"),
    (["--grid-crop", "-3"], "argument --grid-crop: -3 must be >= 1"),
    (["--crop-border", "-1"], "argument --crop-border: -1 must be >= 0"),
    (["--seed", "1e20"], "argument --seed: '1e20' is not an integer"),
    (["--steps", "inf"], "argument --steps: 'inf' is not an integer"),
    (["--min-size", "-8"], "argument --min-size: -8 must be >= 0"),
    (["--method", "supir+lora", "--lora", "style.safetensors:nan"], "the scale must be a finite number"),
    (["--device", "gpu7"], "--device gpu7: "),
    (["--gt", str(IMAGES / ".." / "images"), "--out", str(IMAGES)], "--out must be another folder than --gt"),
])
def test_bad_option_values_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--gt", str(IMAGES), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and message in err[-1] and "error:" in err[-1], err
    assert not (tmp_path / "out").exists()


def test_unwritable_out_is_refused_before_any_work(tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    Image.open(IMAGES / "coffee.png").crop((0, 0, 64, 64)).save(gt / "coffee.png")
    (tmp_path / "file").write_text("keep me")
    before = snapshot(tmp_path)
    code, err = cli("--gt", gt, "--out", tmp_path / "file", *QUICK)
    assert code == 1 and errors(err) == [f"error: --out {tmp_path / 'file'} is a file, not a folder"], err
    code, err = cli("--gt", gt, "--out", tmp_path / "file" / "sub", *QUICK)
    assert code == 1 and errors(err) == [f"error: --out {tmp_path / 'file' / 'sub'}: cannot write there "
                                         "(Not a directory)"], err
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        code, err = cli("--gt", gt, "--out", tmp_path / "ro" / "a" / "b", *QUICK)
        assert code == 1 and "cannot write there (Permission denied)" in errors(err)[0], err
        before["ro"] = None
    assert snapshot(tmp_path) == {k: v for k, v in before.items() if v is not None}


def test_an_early_failure_leaves_no_empty_folder(tmp_path, capsys):
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    assert evaluate.main(["--gt", str(gt), "--out", str(tmp_path / "new" / "out"), *QUICK]) == 1
    assert "broken.jpg (bicubic): " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt"]
    kept = tmp_path / "kept"  # a folder the user made stays, empty as it was
    kept.mkdir()
    assert evaluate.main(["--gt", str(gt), "--out", str(kept), *QUICK]) == 1
    assert list(kept.iterdir()) == []


def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path):
    gt, out = tmp_path / "gt", tmp_path / "out"
    gt.mkdir()
    for name in ("astronaut.png", "coffee.png"):
        Image.open(IMAGES / name).crop((0, 0, 64, 64)).save(gt / name)
    before = snapshot(gt)
    proc = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), "--gt", str(gt), "--out", str(out),
                             "--method", "bicubic", "supir", "--model", "tiny", "--steps", "500", "--min-size", "0",
                             "--gt-crop", "64"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "images" / "bicubic" / "coffee.png").exists():
        time.sleep(0.1)
    time.sleep(1.0)  # into SUPIR's first image
    proc.send_signal(signal.SIGINT)
    err = [line for line in proc.communicate(timeout=60)[1].splitlines() if line.strip()]
    assert proc.returncode == 130 and err[-1] == "interrupted" and not errors(err), err
    lines = (out / "results.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in lines[1:]] == [["astronaut.png", "bicubic"], ["coffee.png", "bicubic"]]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")] and snapshot(gt) == before
