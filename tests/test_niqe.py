"""NIQE on real photos: degradations score worse, crop_border crops, too-small images are refused."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from fixtures import REFERENCE
from mini_supir.niqe import niqe

IMAGES = REFERENCE.parent / "images"


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """astronaut.png, centre 384x384."""
    path = IMAGES / "astronaut.png"
    if not path.exists():
        pytest.skip(f"{path} missing (set MINI_SUPIR_REFERENCE)")
    return Image.open(path).convert("RGB").crop((64, 64, 448, 448))


def test_degradations_score_worse(photo):
    clean = niqe(np.asarray(photo))
    down_up = niqe(np.asarray(photo.resize((96, 96), Image.BICUBIC).resize((384, 384), Image.BICUBIC)))
    blurred = niqe(np.asarray(photo.filter(ImageFilter.GaussianBlur(2))))
    assert clean == pytest.approx(3.2002, abs=1e-3)  # as the niqe reference fixture (cases 0 and 1)
    assert down_up == pytest.approx(6.9490, abs=1e-3)
    assert blurred > clean + 2, (clean, blurred)


def test_crop_border_crops_and_partial_blocks_are_ignored(photo):
    img = np.asarray(photo)
    assert niqe(img, crop_border=5) == niqe(img[5:-5, 5:-5])
    assert niqe(img[:380, :300]) == niqe(img[:288, :288])  # only whole 96x96 blocks from the top left count


def test_luma_input_and_determinism(photo):
    gray = np.asarray(photo.convert("L"))
    assert np.isfinite(niqe(gray)) and niqe(gray) == niqe(gray.copy())


@pytest.mark.parametrize("shape, crop", [((96, 96), 0), ((95, 400), 0), ((200, 200), 5)])
def test_too_small_is_refused(shape, crop):
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="at least two 96x96 blocks"):
        niqe(img, crop_border=crop)


def test_float_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        niqe(np.zeros((192, 192, 3)))
