"""train.py on the tiny random SUPIR: it learns, resumes bit for bit, runs under torchrun, skips bad images."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from mini_supir import images, lora_files, supir  # noqa: E402
from mini_supir.train_data import Order  # noqa: E402

IMAGES = ROOT.parent / "shared" / "images"
PHOTOS = sorted(p for p in IMAGES.glob("*") if p.suffix in (".png", ".jpg"))


def small_args(out, *extra, data=IMAGES):
    return ["--data", str(data), "--out", str(out), "--model", "tiny", "--resolution", "64", "--workers", "0",
            "--warmup-steps", "2", *map(str, extra)]


def losses(out) -> list[float]:
    with open(out / "train_log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_tiny_model_overfits_four_photos(tmp_path):
    # The real loss (all 1000 sigmas, fresh noise every step) on 4 fixed crops. Adapters on the ResBlock convs
    # too: the eps target is per-pixel noise, and only those layers act at the full latent resolution (the
    # UNet has no transformers there), so attention-only adapters cannot get far below the initial loss of ~1.
    assert len(PHOTOS) == 4
    out = tmp_path / "run"
    assert train.main(small_args(out, "--batch-size", 4, "--cache-latents", "--cache-text", "--caption-dropout", 0,
                                 "--lora-targets", "conv", "--lr", 5e-3, "--warmup-steps", 5,
                                 "--max-steps", 40, "--save-every", 1000)) == 0
    loss = losses(out)
    assert len(loss) == 40
    first, last = sum(loss[:5]) / 5, sum(loss[-10:]) / 10  # measured: 1.08 -> 0.35
    assert last < 0.5 * first, (first, last)

    assert (out / "loss_curve.png").stat().st_size > 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["ss_network_dim"] == "16" and meta["ss_steps"] == "40" and meta["ss_num_train_images"] == "4"
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("lora_up.weight"))).dtype == torch.float16
    fresh = supir.build(supir.TINY, "cpu")
    paths = lora_files.load_lora(fresh, out / "lora.safetensors")
    assert any("in_layers" in p for p in paths) and all(p.startswith("model.diffusion_model.") for p in paths)


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    common = ("--batch-size", 2, "--grad-accum", 2, "--max-steps", 4, "--degradation", "realesrgan",
              "--ema", 0.9, "--frobenius", 1e-4, "--caption-dropout", 0.5)
    whole = tmp_path / "whole"
    assert train.main(small_args(whole, *common)) == 0

    broken = tmp_path / "broken"
    real_step = train.Trainer.train_step

    def crash_in_step_4(self, batches):  # step 3 is done but not saved: it must be redone
        if self.step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, batches)

    monkeypatch.setattr(train.Trainer, "train_step", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(small_args(broken, *common, "--save-every", 2))
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    assert len(losses(broken)) == 2  # the log as of the checkpoint at step 2
    assert train.main(small_args(broken, *common, "--save-every", 2, "--resume")) == 0

    assert losses(broken) == losses(whole)
    with safe_open(str(whole / "lora.safetensors"), "pt") as a, safe_open(str(broken / "lora.safetensors"), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    ckpt = torch.load(broken / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["position"] == 4 * 2 * 2


def test_bad_images_are_skipped_with_a_warning(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for p in PHOTOS[:2]:
        shutil.copy(p, data / p.name)
    (data / "broken.png").write_bytes(b"not a png at all")
    from fixtures import png_header
    png_header(data / "bomb.png", 30000, 30000)  # refused from its header, never decoded
    # a JPEG cut short passes the cheap scan (its header is fine) and fails when decoded
    (data / "cut.jpg").write_bytes((IMAGES / "rocket.jpg").read_bytes()[:3000])
    assert train.main(small_args(tmp_path / "run", "--batch-size", 3, "--max-steps", 2, "--preview-every", 2,
                                 "--preview-steps", 2, data=data)) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert "warning: skipping bomb.png: 30000x30000 is 900 MP, more than the 537 MP this tool decodes" in warned
    assert "warning: skipping broken.png: not an image (no format PIL reads)" in warned
    assert any(m.startswith("warning: skipping unreadable cut.jpg: cannot decode") for m in warned), warned
    assert len(losses(tmp_path / "run")) == 2
    # previews restore the first readable image with the current LoRA: before training and at step 2
    assert sorted(p.name for p in (tmp_path / "run" / "previews").iterdir()) == ["step_000000.png", "step_000002.png"]
    assert Image.open(tmp_path / "run" / "previews" / "step_000002.png").size == (3 * 64, 64)  # LQ | restored | HQ


def test_order_shards_each_epoch_across_ranks():
    for world in (1, 2, 3):
        per_rank = [Order(7, seed=1, rank=r, world=world) for r in range(world)]
        for epoch in range(3):
            seen = [o[epoch * (7 // world) + j][0] for o in per_rank for j in range(7 // world)]
            assert len(set(seen)) == len(seen) == 7 // world * world  # disjoint shards, no repeats
    a, b = Order(7, 1, 0, 1), Order(7, 1, 0, 1)
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]
    assert [a[i][0] for i in range(7)] != [a[i][0] for i in range(7, 14)]  # a new order every epoch


def test_torchrun_two_gloo_processes_write_one_lora(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *small_args(out, "--batch-size", 1, "--max-steps", 3, "--device", "cpu")]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora.safetensors"]
    assert len(losses(out)) == 3
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["world"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["noise"], ckpt["rng"][1]["noise"])  # each rank draws its own noise


def test_trains_from_weight_files(tmp_path):
    # the official two-file layout (SDXL single file + SUPIR file), here of the tiny random model
    from safetensors.torch import save_file
    supir_parts = ("model.control_model.", "model.diffusion_model.project_modules.", "first_stage_model.denoise_encoder.")
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in supir.build(supir.TINY, "cpu").state_dict().items()}
    save_file({k: v for k, v in sd.items() if not k.startswith(supir_parts)}, tmp_path / "sdxl.safetensors")
    save_file({k: v for k, v in sd.items() if k.startswith(supir_parts)}, tmp_path / "supir.safetensors")
    from_files, random = tmp_path / "files", tmp_path / "random"
    args = ("--max-steps", 2, "--batch-size", 2)
    assert train.main(small_args(from_files, *args, "--sdxl", tmp_path / "sdxl.safetensors",
                                 "--supir", tmp_path / "supir.safetensors")) == 0
    assert train.main(small_args(random, *args)) == 0
    assert losses(from_files) == losses(random)  # the files hold the seeded random model --model tiny builds


def test_repair_task_trains_with_the_loss_weighted_to_the_mask(tmp_path):
    from mini_supir import degrade, repair
    from mini_supir.train_data import DEGRADATIONS
    hq = images.load_tensor(IMAGES / "coffee.png")[..., :128, :128]
    lq, weight = DEGRADATIONS["cracks-paint"](hq, torch.Generator().manual_seed(0))
    damaged, hole = degrade.damage(hq, "cracks-paint", generator=torch.Generator().manual_seed(0))
    soft = repair.soft_mask(hole[0, 0])
    assert hole.float().mean() > 0.01
    torch.testing.assert_close(weight, 1 + 9 * soft[None, None])  # train_data.MASK_WEIGHT = 9
    filled = (soft >= repair.HOLE).expand_as(lq[0])
    assert torch.equal(lq[0][~filled], damaged[0][~filled])  # the LQ is the damaged crop, prefilled as in repair
    assert (lq[0][filled] - damaged[0][filled]).abs().mean() > 0.05

    runs = {k: tmp_path / f"k{k}" for k in (0, 9)}
    for k, out in runs.items():
        extra = ("--preview-every", 2, "--preview-steps", 2) if k else ()
        assert train.main(small_args(out, "--task", "repair", "--mask-weight", k, "--max-steps", 2, "--batch-size", 2,
                                     *extra)) == 0
    assert len(losses(runs[9])) == 2 and losses(runs[9])[0] > 1.5 * losses(runs[0])[0]  # same draws, heavier weight
    assert sorted(p.name for p in (runs[9] / "previews").iterdir()) == ["step_000000.png", "step_000002.png"]
    with safe_open(str(runs[9] / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_training_comment"] == "mini_supir train.py, repair (cracks-paint)"
    with pytest.raises(SystemExit):
        train.parse_args(small_args(tmp_path / "x", "--task", "repair", "--degradation", "sr4-blur2"))
