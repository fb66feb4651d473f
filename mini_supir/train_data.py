"""Training data: a folder of HQ images, random crops of them degraded online, and the per-rank order.

Every random choice is a pure function of seeds (a data item of its file and item seed, the file order of the
run seed and the epoch), so an item is the same in any loader worker, run or resume.

Files are checked from their header when the folder is scanned (images.image_size); a huge one (more than
MAX_TRAIN_PIXELS) is decoded once, scaled down to fit and kept in memory, instead of being decoded every
time it is drawn.
"""
from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import degrade, images, repair
from .cli import one_line


class DataError(ValueError):
    """A data folder or image we cannot train on (one line, for the CLI)."""


# ----------------------------------------------------------------------------------------------------------
# Degradations: HQ crop (1, 3, R, R) in [0, 1] + a generator -> (LQ at the HQ size, per-pixel loss weight
# (1, 1, R, R) or None)

Degradation = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]


def restoration_pair(hq: torch.Tensor, generator: torch.Generator, setting: str) -> tuple[torch.Tensor, None]:
    # SUPIR feeds the LQ image upsampled back to the HQ size to its denoise encoder.
    return degrade.upsample(degrade.degrade(hq, setting, generator=generator), hq.shape[-2:]), None


# Repair loss weight 1 + k * mask. Outside the mask the repair sampler discards the model's estimate (it keeps
# the input's latent there), so the damaged pixels are what a repair LoRA must learn; k = 9 weighs them 10x,
# which makes them the larger part of the loss at a few percent damaged pixels, while the weight 1 elsewhere
# keeps the LoRA an ordinary restorer of the surroundings it is conditioned on.
MASK_WEIGHT = 9.0


def repair_pair(hq: torch.Tensor, generator: torch.Generator, setting: str,
                mask_weight: float = MASK_WEIGHT) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic damage, prefilled where the repair pipeline prefills (feathered mask >= repair.HOLE), so the
    control sees in training what it sees when repairing; the loss weight is 1 + k * feathered mask."""
    damaged, hole = degrade.damage(hq, setting, generator=generator)
    soft = torch.stack([repair.soft_mask(h[0]) for h in hole])[:, None]
    return repair.prefill(damaged, soft >= repair.HOLE), 1 + mask_weight * soft


REPAIR_DEGRADATIONS = tuple(name for name, s in degrade.SETTINGS.items() if isinstance(s, degrade.Damage))
DEGRADATIONS: dict[str, Degradation] = {
    name: partial(repair_pair if name in REPAIR_DEGRADATIONS else restoration_pair, setting=name)
    for name in degrade.SETTINGS}


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------------------
# Files

# Larger images are scaled down once to this many pixels: drawn as they are, a 13000^2 PNG of 164 KB costs
# 4.9 GB and seconds of decoding at every draw. 16.8 MP keeps every camera's full resolution but the largest.
MAX_TRAIN_PIXELS = 4096 * 4096


def read_caption(image: Path, default: str) -> str:
    caption = images.caption_for(image)
    return default if caption is None else caption


def scan_folder(folder: Path, default_caption: str, warn: bool) -> tuple[list[Path], list[str], list[tuple[int, int]]]:
    """(image files, their captions, their (width, height)), sorted by name; files whose header or caption
    cannot be read are skipped with a warning."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    files, captions, sizes = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in images.extensions()):
        try:
            size, caption = images.image_size(path), read_caption(path, default_caption)
        except (images.ImageError, OSError, UnicodeDecodeError) as e:
            if warn:
                warnings.warn(f"skipping {path.name}: {one_line(e)}")
            continue
        files.append(path)
        captions.append(caption)
        sizes.append(size)
    if not files:
        raise DataError(f"no readable image in {folder}")
    return files, captions, sizes


def load_image(path: Path) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: an image file, scaled down (PIL's Lanczos, in 8 bits) to MAX_TRAIN_PIXELS."""
    image = images.split_alpha(images.open_image(path), background=None)[0]
    w, h = image.size
    if w * h > MAX_TRAIN_PIXELS:
        s = (MAX_TRAIN_PIXELS / (w * h)) ** 0.5
        image = image.resize((max(1, int(w * s)), max(1, int(h * s))), Image.LANCZOS, reducing_gap=3.0)
    return images.to_tensor(image)


def cover(img: torch.Tensor, size: int) -> torch.Tensor:
    """The image, scaled up (bicubic) if needed so that a size x size crop fits in it."""
    h, w = img.shape[-2:]
    if min(h, w) >= size:
        return img
    s = size / min(h, w)
    return degrade.resize(img, (max(size, round(h * s)), max(size, round(w * s)))).clamp(0, 1)


def centre_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
    return img[..., top:top + size, left:left + size]


# ----------------------------------------------------------------------------------------------------------
# The data set


class Crops(torch.utils.data.Dataset):
    """Item (file index, seed) -> random HQ crop, its degraded LQ, loss weight and (possibly dropped) caption.
    Every random choice comes from the item's seed. Files larger than MAX_TRAIN_PIXELS (by `sizes`) are
    decoded once here and kept as 8-bit tensors (loader workers share them)."""

    def __init__(self, files: list[Path], captions: list[str], resolution: int, degradation: Degradation,
                 caption_dropout: float, flip: bool = False, sizes: list[tuple[int, int]] | None = None):
        self.files, self.captions, self.resolution = files, captions, resolution
        self.degradation, self.caption_dropout, self.flip = degradation, caption_dropout, flip
        self.capped = {}
        for i, (w, h) in enumerate(sizes or []):
            if w * h > MAX_TRAIN_PIXELS:
                try:
                    self.capped[i] = (load_image(files[i]) * 255).round().to(torch.uint8)
                except images.ImageError:
                    pass  # load() skips it as it skips any file that stops decoding

    def __len__(self):
        return len(self.files)

    def load(self, index: int) -> tuple[int, torch.Tensor]:
        """The image, or the next one that decodes (files can break after the scan, e.g. truncated JPEGs)."""
        for k in range(len(self.files)):
            i = (index + k) % len(self.files)
            if i in self.capped:
                return i, self.capped[i].float() / 255
            try:
                return i, load_image(self.files[i])
            except (images.ImageError, OSError) as e:
                warnings.warn(f"skipping unreadable {self.files[i].name}: {e}")
        raise DataError("no image in the data folder can be decoded any more")

    def crop(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        r = self.resolution
        img = cover(img, r)
        h, w = img.shape[-2:]
        top = int(torch.randint(h - r + 1, (), generator=g))
        left = int(torch.randint(w - r + 1, (), generator=g))
        crop = img[..., top:top + r, left:left + r]
        if self.flip:  # drawn only when on, so runs without flips keep their crops
            dims = [d for d in (-1, -2) if torch.rand((), generator=g).item() < 0.5]  # horizontal, vertical
            crop = crop.flip(dims) if dims else crop
        return crop

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        g = torch.Generator().manual_seed(seed)
        drop = torch.rand((), generator=g).item() < self.caption_dropout
        index, img = self.load(index)
        hq = self.crop(img, g)
        lq, weight = self.degradation(hq, g)
        ones = torch.ones_like(hq[:, :1])
        return {"hq": hq[0], "lq": lq[0], "weight": (ones if weight is None else weight)[0],
                "caption": "" if drop else self.captions[index]}


def collate(items: list[dict]) -> dict:
    return {k: [it[k] for it in items] if k == "caption" else torch.stack([it[k] for it in items])
            for k in items[0]}


class Order:
    """The per-rank stream of (file index, item seed): every epoch a seeded permutation of the files, dealt
    round-robin to the ranks (each gets len // world files, the same number). Position = samples taken by this
    rank so far, the only state a resume needs."""

    def __init__(self, n: int, seed: int, rank: int, world: int):
        if n < world:
            raise DataError(f"{n} images cannot be shared among {world} processes")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.per_epoch = n // world

    def __getitem__(self, position: int) -> tuple[int, int, int]:
        """(file index, item seed, epoch) of the sample at `position`."""
        epoch, j = divmod(position, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix(self.seed, 1, epoch)))
        index = int(perm[self.rank + j * self.world])
        return index, mix(self.seed, 3, epoch, index), epoch

    def batches(self, start: int, batch_size: int):
        position = start
        while True:
            yield [self[p][:2] for p in range(position, position + batch_size)]
            position += batch_size
