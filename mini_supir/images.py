"""Image files in and out, for every tool: finding inputs, header-checked opening, mode handling, tensors,
8-bit levels, atomic writes (PNGs with settings metadata), side-by-side panels."""
from __future__ import annotations

import glob
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


def extensions() -> set[str]:
    """The file extensions PIL can open ('.png', '.jpg', ...)."""
    return {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}


def find_images(specs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(sorted unique image files, [(spec, problem)]). Folders give their files with image extensions;
    files named explicitly are all kept (a missing or non-image one is reported when it is opened)."""
    found, errors = set(), []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = {f for f in path.iterdir() if f.is_file() and f.suffix.lower() in extensions()}
            if not files:
                errors.append((spec, "no image files in this folder"))
            found |= files
        elif path.exists() or not glob.has_magic(spec):
            found.add(path)
        else:
            matches = {Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file()}
            if not matches:
                errors.append((spec, "no file matches"))
            found |= matches
    return sorted(found, key=str), errors


def companion(spec: Path, image: Path, stem: str, patterns: tuple[str, ...]) -> Path:
    """`spec` itself, or in the folder `spec` the first image file named by a pattern ({stem}, {name}: the
    input's file stem and output name): the mask or clean original that goes with an input."""
    if not spec.is_dir():
        return spec
    for pattern in patterns:
        matches = [m for m in sorted(spec.glob(pattern.format(stem=glob.escape(image.stem), name=glob.escape(stem))))
                   if m.suffix.lower() in extensions()]
        if matches:
            return matches[0]
    raise ImageError(f"no {' or '.join(p.format(stem=image.stem, name=stem) for p in patterns)} in {spec}")


def caption_for(image: Path) -> str | None:
    """The text of `<name>.txt` beside an image (its description), or None; raises OSError / UnicodeError."""
    caption = image.with_suffix(".txt")
    return caption.read_text(encoding="utf-8").strip() if caption.is_file() else None


# -- opening -----------------------------------------------------------------------------------------------

def pixel_limit(max_pixels: int, what: str) -> Callable[[int, int], None]:
    """A `check_size` for open_image refusing images over `max_pixels`: "WxH is N MP, more than the M MP {what}"."""
    def check(w: int, h: int) -> None:
        if w * h > max_pixels:
            raise ImageError(f"{w}x{h} is {w * h / 1e6:.0f} MP, more than the {max_pixels / 1e6:.0f} MP {what}")
    return check


def _open_header(path: Path) -> tuple[Image.Image, int, int]:
    """(the file opened with only its header read, width, height after EXIF rotation)."""
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
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (no format PIL reads)") from None
    except OSError as e:  # permission denied, I/O error, or a header PIL gives up on
        raise ImageError(f"cannot read: {e.strerror}" if e.strerror else f"not an image ({type(e).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    w, h = im.size
    try:
        pixel_limit(MAX_INPUT_PIXELS, "this tool decodes")(w, h)
        if _header_orientation(im) in _TRANSPOSED:
            w, h = h, w
    except BaseException:
        im.close()
        raise
    return im, w, h


def _header_orientation(im: Image.Image) -> int | None:
    # A PNG's eXIf chunk may follow the pixel data, and PIL's PngImageFile.getexif() decodes the whole image
    # to reach it: a 4 MB PNG bomb costs gigabytes there, before any size check. Read only what the header
    # chunks hold (the orientation changes no pixel count, so a size check needs nothing more).
    if im.format == "PNG" and "exif" not in im.info:
        return None
    try:
        return im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 — broken metadata is common; a broken image fails in load()
        return None


def image_size(path: str | Path, check_size: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """(width, height) as open_image would return it, from the header alone; refuses what open_image
    refuses without decoding (no such file, not an image, too large, `check_size`)."""
    im, w, h = _open_header(Path(path))
    with im:
        if check_size is not None:
            check_size(w, h)
    return w, h


def open_image(path: str | Path, check_size: Callable[[int, int], None] | None = None) -> Image.Image:
    """Open, size-check from the header (`check_size(width, height)` after EXIF rotation may refuse with
    ImageError), then decode fully and apply the EXIF orientation. Multi-frame files (animated GIF, APNG,
    WebP, TIFF) give their first frame, with a warning saying so."""
    im, w, h = _open_header(Path(path))
    with im:
        if check_size is not None:
            check_size(w, h)
        try:
            frames = getattr(im, "n_frames", 1)
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # PIL raises any of them for broken data
            raise ImageError(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if frames > 1 and im.format != "MPO":  # MPO: a camera JPEG with extra views; frame 1 is the photo
            warnings.warn(f"{path}: {frames} frames (an animation?): only frame 1 is used", stacklevel=2)
        return ImageOps.exif_transpose(im)


# -- modes and tensors -------------------------------------------------------------------------------------

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


def load_tensor(path: str | Path, check_size: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1] from an image file (open_image; 8- or 16-bit grey to RGB, alpha dropped)."""
    return to_tensor(split_alpha(open_image(path, check_size), background=None)[0])


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] values to 8-bit levels, as saving and re-reading a PNG does."""
    return (x * 255).round().clamp(0, 255) / 255


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded."""
    return (x.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_tensor(x: torch.Tensor, path: str | Path) -> None:
    """(1, 3, H, W), (3, H, W) or a mask (H, W) in [0, 1] -> an 8-bit file in the format of its extension
    (ValueError for an unknown one), written atomically."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image extension {path.suffix!r} for {path}")
    image = from_tensor(x.reshape(1, -1, *x.shape[-2:]) if x.ndim != 4 else x)
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def side_by_side(images: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """The images left to right, each bicubic-resized to `size` (the result's)."""
    canvas = Image.new("RGB", (len(images) * size[0], size[1]))
    for i, im in enumerate(images):
        im = im.convert("RGB")
        canvas.paste(im if im.size == size else im.resize(size, Image.BICUBIC), (i * size[0], 0))
    return canvas


# -- writing -----------------------------------------------------------------------------------------------

def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a fresh temp file in the target folder (made now if missing: a run that fails
    before its first output leaves no empty folder), then rename it over `path`: a crash never leaves half
    a file. The temp file is created exclusively (mkstemp: O_EXCL, a random name), so a link planted in
    the folder is never followed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
