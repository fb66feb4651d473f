"""Previews of a SUPIR training run (train.py --preview-every): one fixed validation pair, restored with the
current LoRA through the restoration pipeline on the training model itself (no second copy of the weights)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from . import degrade, images, pipeline, presets, repair
from .train_data import DEGRADATIONS, REPAIR_DEGRADATIONS, DataError, centre_crop, cover, load_image
from .train_state import Adapters


@dataclass
class PreviewPair:
    hq: Image.Image
    lq: Image.Image
    mask: torch.Tensor | None  # repair: the damage weight (H, W), repaired as sample.py --mask does
    caption: str


def preview_pair(path: Path, caption: str, resolution: int, degradation: str, seed: int) -> PreviewPair:
    """The centre crop of the image (scaled up if smaller) and its degradation with `seed`, the LQ at the HQ
    size as in training; raises DataError for a file that cannot be used."""
    try:
        hq = centre_crop(cover(load_image(path), resolution), resolution)
    except images.ImageError as e:
        raise DataError(f"--preview-image {path}: {e}") from None
    generator = torch.Generator().manual_seed(seed)
    mask = None
    if degradation in REPAIR_DEGRADATIONS:
        lq, hole = degrade.damage(hq, degradation, generator=generator)
        mask = repair.soft_mask(hole[0, 0])
    else:
        lq, _ = DEGRADATIONS[degradation](hq, generator)
    return PreviewPair(images.from_tensor(hq), images.from_tensor(lq), mask, caption)


class Preview:
    """Writes <out>/previews/step_NNNNNN.png: LQ | restored with the current (EMA) LoRA | HQ. Its prompts are
    encoded now, so the text encoders may be freed afterwards (--cache-text)."""

    def __init__(self, pair: PreviewPair, restorer: pipeline.Restorer, steps: int, seed: int, folder: Path):
        self.pair, self.restorer, self.seed, self.folder = pair, restorer, seed, folder
        # SUPIR's Quality settings with few steps; the LQ is given at the HQ size, as in training
        self.settings = replace(presets.QUALITY, steps=steps, min_size=0, prompt=pair.caption)
        restorer.encode_prompts([self.settings.positive_text, self.settings.negative])

    @torch.no_grad()
    def write(self, step: int, adapters: Adapters) -> None:
        model = self.restorer.model
        with adapters.ema_weights():
            model.eval()
            try:
                restored = self.restorer.restore(self.pair.lq, self.settings, seed=self.seed, mask=self.pair.mask)
            finally:
                model.train()
        panel = Image.new("RGB", (3 * restored.width, restored.height))
        for i, im in enumerate((self.pair.lq, restored, self.pair.hq)):
            panel.paste(im.resize(restored.size), (i * restored.width, 0))
        self.folder.mkdir(exist_ok=True)
        images.atomic_write(self.folder / f"step_{step:06d}.png", lambda tmp: panel.save(tmp, format="PNG"))
