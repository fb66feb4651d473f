"""Draw docs/repair_demo.png: damaged | automatic mask | classical fill | clean, labelled.

    python docs/make_repair_demo.py [--image /work/shared/images/astronaut.png] [--out docs/repair_demo.png]

The fill is the classical inpainting that `sample.py --repair` runs before SUPIR (repair.prefill over the
automatic mask, blended in with its feathered weight), not a SUPIR result: that needs the real weights.
"""
import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mini_supir import images, mask_synth  # noqa: E402
from mini_supir import mask as masks  # noqa: E402
from mini_supir import repair  # noqa: E402
from mini_supir.metrics import psnr  # noqa: E402


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=Path, default=Path(__file__).resolve().parents[2] / "shared/images/astronaut.png")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "repair_demo.png")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    clean = images.load_tensor(a.image)[0]
    damaged, known = mask_synth.synthesize_damage(clean, a.seed, kinds=("cracks", "scratches"))
    damaged = (damaged * 255).round() / 255  # what the damaged PNG holds
    hard = masks.detect_damage(damaged)
    m = repair.soft_mask(hard)
    filled = m * repair.prefill(damaged[None], (m >= repair.HOLE)[None, None])[0] + (1 - m) * damaged
    filled = (filled * 255).round() / 255

    def inside(x):  # PSNR over the pixels the synthetic damage changed
        return 10 * torch.log10(1 / (x - clean)[:, known].square().mean()).item()

    score = lambda x: f"PSNR {psnr(x[None], clean[None]).item():.2f} dB, {inside(x):.2f} in the damage"  # noqa: E731
    panels = [(damaged, ["Damaged (synthetic cracks + scratches)", score(damaged)]),
              (hard.float().expand(3, -1, -1), ["Automatic mask (mask.detect_damage)", "default MaskParams"]),
              (filled, ["Classical fill over the auto mask (NOT SUPIR)", score(filled)]),
              (clean, ["Clean original", ""])]
    w, h = clean.shape[-1], clean.shape[-2]
    head, gap = 44, 8
    canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h + head), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)
    for i, (x, lines) in enumerate(panels):
        canvas.paste(to_pil(x), (i * (w + gap), head))
        for k, line in enumerate(lines):
            draw.text((i * (w + gap) + 4, 4 + 19 * k), line, font=font, fill="black")
    canvas.save(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
