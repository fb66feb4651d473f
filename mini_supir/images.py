"""Image files in and out: header-checked opening, mode handling, atomic PNG writes with settings metadata."""
from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

# Largest image file we decode at all (PIL's decompression-bomb guard is set to the same).
MAX_INPUT_PIXELS = 2 ** 29  # about 23000 x 23000
METADATA_KEY = "mini_supir"  # PNG tEXt chunk holding the JSON of every setting that made the image
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageError(ValueError):
    """An input image we refuse: unreadable, truncated, or too large (one line, for the CLI)."""


def open_image(path: str | Path, check_size: Callable[[int, int], None] | None = None) -> Image.Image:
    """Open, size-check from the header (`check_size(width, height)` after EXIF rotation may refuse with
    ImageError), then decode fully and apply the EXIF orientation."""
    path = Path(path)
    if not path.exists():
        raise ImageError("no such file")
    if path.is_dir():
        raise ImageError("is a directory")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL's decompression-bomb guard at our limit; the size check below gives the clearer message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
            im = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageError(str(e)) from None
    except (Image.UnidentifiedImageError, OSError) as e:
        raise ImageError(f"not an image ({type(e).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with im:
        w, h = im.size
        if w * h > MAX_INPUT_PIXELS:
            raise ImageError(f"{w}x{h} is {w * h / 1e6:.0f} MP, more than the {MAX_INPUT_PIXELS / 1e6:.0f} MP "
                             "this tool decodes")
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 — broken metadata is common; a broken image fails in load() below
            orientation = None
        if orientation in _TRANSPOSED:
            w, h = h, w
        if check_size is not None:
            check_size(w, h)
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # PIL raises any of them for broken data
            raise ImageError(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return ImageOps.exif_transpose(im)


def split_alpha(image: Image.Image, background: tuple[int, int, int] | None = (255, 255, 255)
                ) -> tuple[Image.Image, Image.Image | None]:
    """(8-bit RGB, the alpha channel or None). 16-bit and float greyscale become 8-bit; with `background`
    the colours are composited over it (SUPIR's HWC3 uses white), else the raw RGB is kept."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(image, dtype=np.float64)
        # 16-bit greyscale (PNG loads it as I / I;16); float images are taken to be in [0, 1]
        a = a * 255.0 if image.mode == "F" else a / 257.0
        image = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if "A" in image.getbands() or "a" in image.getbands():
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if background is None:
            return rgba.convert("RGB"), alpha
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba.convert("RGB"), mask=alpha)
        return canvas, alpha
    return image.convert("RGB"), None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 255.0


def from_tensor(x: torch.Tensor) -> Image.Image:
    """(1, C, H, W) in [0, 1] -> 8-bit RGB (C = 3) or L (C = 1), rounded."""
    a = (x[0].float() * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a fresh temp file in the target folder, then rename it over `path`: a crash never
    leaves half a file. The temp file is created exclusively (mkstemp: O_EXCL, a random name), so a link
    planted in the folder is never followed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes private files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(image: Image.Image, path: str | Path, info: dict) -> None:
    """Write a PNG atomically, with `info` as JSON in its metadata."""
    meta = PngInfo()
    meta.add_text(METADATA_KEY, json.dumps(info, sort_keys=True))
    meta.add_text("Software", "mini_supir")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=meta))


def read_png_info(path: str | Path) -> dict:
    """The JSON `save_png` stored (settings under "settings": `RestoreSettings.from_dict` rebuilds them)."""
    with Image.open(path) as im:
        return json.loads(im.text[METADATA_KEY])
