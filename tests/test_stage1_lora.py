"""LoRA on stage-1 restorers (train.py --model realesrgan-x4plus): no-op start, LoRA-only gradients, learning,
exact resume, the kohya file and its merge, sample.py --stage1 --lora."""
import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from mini_supir import esrgan, lora, lora_files, stage1, stage1_train  # noqa: E402

IMAGES = ROOT.parent / "shared" / "images"
TINY = esrgan.RRDBConfig(num_feat=8, num_block=2, num_grow_ch=4)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return esrgan.build(TINY).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def x4plus():
    return stage1.load_network("realesrgan-x4plus")[0]


@pytest.mark.parametrize("targets, count", [("all", 2 * 15 + 6), ("dense", 2 * 15), ("upsampler", 4)])
def test_targets_pick_the_convs(targets, count):
    assert len(lora.inject_lora(tiny_net(), "default", 4, 4, stage1_train.TARGETS[targets])) == count


def test_fresh_adapters_are_an_exact_no_op_on_the_real_x4plus(x4plus):
    x = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = x4plus(x)
        lora.inject_lora(x4plus, "default", 16, 16, stage1_train.TARGETS["all"])
        try:
            assert len(lora.lora_layers(x4plus)) == 23 * 15 + 6
            assert torch.equal(x4plus(x), base)
        finally:
            lora.remove_lora(x4plus)
    assert not lora.lora_layers(x4plus)


def test_gradients_reach_only_the_adapters():
    net = tiny_net()
    lora.inject_lora(net, "default", 4, 4, stage1_train.TARGETS["all"])
    params = lora.lora_parameters(net)
    for p in params:
        p.requires_grad_(True)
    net(torch.rand(1, 3, 8, 8)).abs().mean().backward()
    named = dict(net.named_parameters())
    assert all(p.grad is None for n, p in named.items() if ".lora." not in n)
    ups = [p for n, p in named.items() if n.endswith(".up")]
    assert len(ups) == 36 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)  # B = 0: A's grads are 0
    assert sum(p.numel() for p in params) == sum(p.numel() for n, p in named.items() if ".lora." in n)


def args_for(out, *extra):
    return ["--model", "realesrgan-x4plus", "--data", str(IMAGES), "--out", str(out), "--resolution", "32",
            "--batch-size", "1", "--warmup-steps", "1", "--lr", "1e-3", *map(str, extra)]


def test_a_few_steps_reduce_the_loss_on_a_batch(tmp_path):
    trainer = stage1_train.Stage1Trainer(stage1_train.parse_args(args_for(tmp_path, "--max-steps", "6")))
    batch = stage1_train.collate([trainer.data[0, 1], trainer.data[1, 2]])
    losses = [trainer.train_step(itertools.repeat(batch))["loss"] for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses


def losses(out):
    with open(out / "train_log.csv") as f:
        return [r["loss"] for r in csv.DictReader(f)]


def test_resume_repeats_the_run_bit_for_bit_and_the_file_merges(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    Image.open(IMAGES / "coffee.png").convert("RGB").crop((100, 100, 300, 300)).save(val / "held_out.png")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("astronaut.png", "rocket.jpg"):
        (data / name).symlink_to(IMAGES / name)
    common = ["--data", str(data), "--ema", "0.9", "--save-every", "2", "--save-precision", "fp32"]
    assert train.main(args_for(tmp_path / "a", "--max-steps", "4", *common, "--val-data", val, "--val-every", "4")) == 0
    assert train.main(args_for(tmp_path / "b", "--max-steps", "2", *common)) == 0
    assert train.main(args_for(tmp_path / "b", "--max-steps", "4", *common, "--resume", "--lora-targets", "dense")) == 2
    assert train.main(args_for(tmp_path / "b", "--max-steps", "4", *common, "--resume")) == 0
    assert len(losses(tmp_path / "a")) == 4 and losses(tmp_path / "a") == losses(tmp_path / "b")
    with open(tmp_path / "a" / "val_log.csv") as f:
        rows = {(r["step"], r["model"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("0", "bicubic"), ("0", "base"), ("0", "lora"), ("4", "lora")}
    assert rows["0", "base"]["psnr"] == rows["0", "lora"]["psnr"]  # the adapters start as the base network
    assert sorted(p.name for p in (tmp_path / "a" / "previews").iterdir()) == ["step_000000.png", "step_000004.png"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["trainable_params"] == 6622688 and summary["val_images"] == ["held_out.png"]
    assert (tmp_path / "a" / "loss_curve.png").exists()
    file = tmp_path / "a" / "lora.safetensors"
    with safe_open(str(file), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model"] == "realesrgan-x4plus" and meta["modelspec.architecture"] == "realesrgan-x4plus/lora"
    assert len(keys) == 3 * 351 and all(k.startswith("lora_stage1_") for k in keys)
    assert "lora_stage1_body_0_rdb1_conv1.lora_down.weight" in keys and lora_files.lora_parts(file) == {"stage1"}
    x = torch.rand(1, 3, 12, 12)
    live, merged = (stage1.load_network("realesrgan-x4plus")[0] for _ in range(2))
    lora_files.load_lora(live, file)
    lora_files.load_lora(merged, file, merge=True)
    with torch.no_grad():
        out, ref = live(x), merged(x)
        base = stage1.load_network("realesrgan-x4plus")[0](x)
    assert (out - ref).abs().max() < 1e-4 and (out - base).abs().max() > 1e-3


def test_saved_file_round_trips_exactly():
    net = tiny_net()
    lora.inject_lora(net, "default", 4, 2, stage1_train.TARGETS["dense"])
    with torch.no_grad():
        for p in lora.lora_parameters(net):
            p.normal_(0, 0.1)
    sd = lora_files.lora_state_dict(net)
    fresh = tiny_net()
    assert len(lora_files.load_lora(fresh, sd)) == 30
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
    unet_lora = {"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": torch.zeros(4, 8, 3, 3)}
    with pytest.raises(lora.LoRAFileError, match=r"match no layer of this model \(parts present: \['stage1'\]"):
        lora_files.load_lora(tiny_net(), unet_lora)


def cli(script, *argv):
    run = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True, cwd=ROOT)
    return run.returncode, run.stderr.strip().splitlines()


def test_sample_applies_a_stage1_lora_and_refuses_a_unet_one(tmp_path, x4plus):
    Image.open(IMAGES / "coffee.png").convert("RGB").crop((200, 150, 232, 174)).save(tmp_path / "p.png")
    torch.manual_seed(0)
    lora.inject_lora(x4plus, "default", 4, 4, stage1_train.TARGETS["upsampler"])
    try:
        with torch.no_grad():
            for p in lora.lora_parameters(x4plus, "default"):
                p.normal_(0, 0.02)
        lora_files.save_lora(x4plus, tmp_path / "s1.safetensors", base_model="realesrgan-x4plus")
    finally:
        lora.remove_lora(x4plus)
    common = ["--image", tmp_path / "p.png", "--stage1-only"]
    assert cli("sample.py", *common, "--out", tmp_path / "base")[0] == 0
    code, err = cli("sample.py", *common, "--lora", f"{tmp_path / 's1.safetensors'}:0.5", "--out", tmp_path / "lora")
    assert code == 0, err
    a, b = (torch.tensor(np.asarray(Image.open(tmp_path / d / "p.png")), dtype=torch.float) for d in ("base", "lora"))
    assert (a - b).abs().mean() > 0.5
    lora_files.save_lora(_unet_with_lora(), tmp_path / "unet.safetensors")
    code, err = cli("sample.py", *common, "--lora", tmp_path / "unet.safetensors", "--out", tmp_path / "x")
    assert code == 1 and err[-1].endswith("a SUPIR LoRA (unet): --stage1-only runs only the stage-1 network"), err
    code, err = cli("sample.py", "--image", tmp_path / "p.png", "--model", "tiny", "--lora", tmp_path / "s1.safetensors")
    assert code == 1 and "give that network with --stage1 NAME or --stage1-only" in err[-1], err


def _unet_with_lora():
    from mini_supir import supir
    model = supir.build(supir.TINY, "cpu")
    lora.inject_lora(model.model.diffusion_model, "default", 2, targets=lora.ATTENTION)
    return model


@pytest.mark.parametrize("extra, message", [(["--lora-rank", "0"], "argument --lora-rank: 0 must be >= 1"),
                                            (["--resolution", "30"], "--resolution must be a multiple"),
                                            (["--degradation", "jpeg30"], "invalid choice: 'jpeg30'")])
def test_bad_options_exit_2(tmp_path, extra, message):
    code, err = cli("train.py", *args_for(tmp_path, *extra))
    assert code == 2 and message in err[-1], err
