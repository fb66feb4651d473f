"""images.py: atomic writes that never follow a planted link, header checks before decoding."""
import os

import pytest
from PIL import Image

from mini_supir import images


def test_atomic_write_never_follows_planted_links(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    # the names the old writers used (.NAME.PID.tmp, .NAME.tmp) as links to a file outside the output
    for name in (f".a.png.{os.getpid()}.tmp", ".a.png.tmp"):
        (out / name).symlink_to(victim)
    images.save_png(Image.new("RGB", (4, 3), "red"), out / "a.png", {"k": 1})
    assert victim.read_text() == "keep me"
    assert not (out / "a.png").is_symlink() and images.read_png_info(out / "a.png") == {"k": 1}
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == ["a.png"]  # no temp file left


def test_failed_write_leaves_nothing(tmp_path):
    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        images.atomic_write(tmp_path / "x.png", broken)
    assert list(tmp_path.iterdir()) == []


def test_size_is_refused_from_the_header(tmp_path):
    Image.new("L", (3000, 2000)).save(tmp_path / "big.png")
    seen = []

    def refuse(w, h):
        seen.append((w, h))
        raise images.ImageError("too large")
    with pytest.raises(images.ImageError, match="too large"):
        images.open_image(tmp_path / "big.png", refuse)
    assert seen == [(3000, 2000)]


def test_every_tool_reads_16_bit_grey(tmp_path):
    """One loader (images.open_image) for all: images.load_tensor (train.py, evaluate.py, the mask and
    degrade CLIs) and painted 16-bit masks: a ramp, not pure white."""
    import numpy as np
    from mini_supir import mask
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    expected = np.round(ramp / 257) / 255
    for x in (images.load_tensor(tmp_path / "g16.png")[0],):
        assert x.shape == (3, 48, 64)
        assert np.abs(x[1].numpy() - expected).max() < 1e-6
    painted = np.zeros((48, 64), np.uint16)
    painted[10:20] = 65535
    painted[30:40] = 20000  # below half intensity: not damage (convert("L") clipped it to white)
    Image.fromarray(painted).save(tmp_path / "m16.png")
    m = mask.load_mask(tmp_path / "m16.png", (48, 64))
    assert m[10:20].all() and m.sum() == 10 * 64
