"""One denoiser call: our SDXL UNet, our UNet + SUPIR control (ControlledUNet), and diffusers' UNet2DConditionModel.

    python benchmarks/bench_unet.py --preset tiny --sizes 32,64 --dtypes fp32,bf16 --device cpu
    python benchmarks/bench_unet.py --preset sdxl --sizes 64,96,128,256 --dtypes fp32,bf16,fp16 --device cuda

Per latent size, batch (2 = classifier-free guidance) and dtype: median milliseconds of one forward call,
peak memory of the call, GFLOP from the analytic count `unet_flops` (convs, linears and attention matmuls, as
torch.utils.flop_counter counts them) and the TFLOP/s it achieves. Next to it the same call through diffusers'
UNet2DConditionModel built from the same config and sharing our weights (renamed with
`mini_supir.lora_names.unet_diffusers_names`), the ratio ours / diffusers, and the max abs difference of the two
outputs on the warm-up call. diffusers is optional (`pip install diffusers`); without it its columns read n/a.

Peak memory is what one call allocates above what was held before it (weights, inputs), measured on an
extra untimed call: torch.cuda.max_memory_allocated on a GPU, on the CPU the peak of the live tensors the call
creates (`TensorPeak`). Weights are random (PyTorch's default init): a trained checkpoint costs the same.
Timed calls of ours and diffusers alternate, so background load hits both alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mini_supir.control import ControlledUNet  # noqa: E402
from mini_supir.lora_names import unet_diffusers_names  # noqa: E402
from mini_supir.unet import MEDIUM, SDXL_BASE, TINY, UNet, UNetConfig, timestep_embedding  # noqa: E402

PRESETS = {"tiny": TINY, "medium": MEDIUM, "sdxl": SDXL_BASE}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONTEXT_TOKENS = 77
SIZE_EMBED = 256  # SDXL embeds each of its 6 size / crop numbers in 256 channels of the vector y
TIME_IDS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)  # original size, crop top-left, target size


# ---------------------------------------------------------------------------------------------------------
# analytic FLOP count


def unet_flops(cfg: UNetConfig, batch: int, height: int, width: int, context_tokens: int = CONTEXT_TOKENS,
               controlled: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one UNet call on a (batch, C, height, width) latent; with `controlled`,
    of ControlledUNet (GLVControl encoder + UNet with its ZeroSFT / ZeroCrossAttn connectors).

    Counts what torch.utils.flop_counter counts: convolutions, linear layers and the two attention matmuls;
    norms, activations, additions and upsampling are free.
    """
    emb = cfg.model_channels * 4

    def conv(cin, cout, hw, k=3):
        return 2 * cin * cout * k * k * hw

    def linear(din, dout, rows):
        return 2 * din * dout * rows

    def attention(dim, inner, n_q, n_kv, kv_dim):
        return linear(dim, inner, n_q) + 2 * linear(kv_dim, inner, n_kv) + 4 * n_q * n_kv * inner + linear(inner, dim, n_q)

    def transformer(c, hw, depth):
        block = (attention(c, c, hw, hw, c) + attention(c, c, hw, context_tokens, cfg.context_dim)
                 + linear(c, 8 * c, hw) + linear(4 * c, c, hw))  # GEGLU projects to 2 x 4c, then 4c -> c
        return 2 * linear(c, c, hw) + depth * block

    def resblock(cin, cout, hw):
        return conv(cin, cout, hw) + linear(emb, cout, 1) + conv(cout, cout, hw) + (conv(cin, cout, hw, 1) if cin != cout else 0)

    def zero_sft(label, concat, hw, hidden=128):
        return conv(label, hidden, hw) + 2 * conv(hidden, label + concat, hw) + conv(label, label, hw, 1)

    def attn_block(level, c, hw):
        return transformer(c, hw, cfg.transformer_depth[level]) if cfg.has_attention(level) else 0

    def encoder():
        """Embeddings, input blocks, middle block; and the (channels, h, w) of every skip connection."""
        f = linear(cfg.model_channels, emb, 1) + linear(cfg.adm_in_channels, emb, 1) + 2 * linear(emb, emb, 1)
        h, w, ch = height, width, cfg.model_channels
        f += conv(cfg.in_channels, ch, h * w)
        skips = [(ch, h, w)]
        for level, c in enumerate(cfg.widths):
            for _ in range(cfg.num_res_blocks):
                f += resblock(ch, c, h * w) + attn_block(level, c, h * w)
                ch = c
                skips.append((ch, h, w))
            if level < len(cfg.widths) - 1:
                h, w = (h + 1) // 2, (w + 1) // 2  # 3x3 conv, stride 2, padding 1
                f += conv(ch, ch, h * w)
                skips.append((ch, h, w))
        f += 2 * resblock(ch, ch, h * w) + transformer(ch, h * w, cfg.transformer_depth[-1])
        return f, skips

    f, skips = encoder()
    ch, h, w = skips[-1]
    if controlled:
        f += encoder()[0] + conv(cfg.in_channels, cfg.model_channels, height * width)  # GLVControl + its hint conv
        f += zero_sft(ch, 0, h * w)  # on the middle block's output
    for level, c in reversed(list(enumerate(cfg.widths))):
        for i in range(cfg.num_res_blocks + 1):
            skip, h, w = skips.pop()
            if controlled:
                f += zero_sft(skip, ch, h * w)
            f += resblock(ch + skip, c, h * w) + attn_block(level, c, h * w)
            ch = c
            if level > 0 and i == cfg.num_res_blocks:
                if controlled:  # ZeroCrossAttn: 64-channel heads, control feature as keys / values
                    f += attention(c, c // 64 * 64, h * w, h * w, skip)
                h, w = 2 * h, 2 * w
                f += conv(c, c, h * w)
    return batch * (f + conv(ch, cfg.out_channels, height * width))


# ---------------------------------------------------------------------------------------------------------
# diffusers' UNet with our weights


def diffusers_config(cfg: UNetConfig) -> dict:
    """UNet2DConditionModel kwargs for the UNet `cfg` builds (SDXL base's config for SDXL_BASE)."""
    attention = [cfg.has_attention(level) for level in range(len(cfg.widths))]
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=tuple(cfg.widths),
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
                layers_per_block=cfg.num_res_blocks, transformer_layers_per_block=tuple(cfg.transformer_depth),
                # diffusers' attention_head_dim is, for SDXL, the number of heads per level
                attention_head_dim=tuple(max(c // cfg.num_head_channels, 1) for c in cfg.widths),
                cross_attention_dim=cfg.context_dim, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=SIZE_EMBED, projection_class_embeddings_input_dim=cfg.adm_in_channels)


def to_diffusers(unet: UNet):
    """diffusers' UNet2DConditionModel sharing `unet`'s weight tensors (renamed), or None without diffusers."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return None
    table = unet_diffusers_names(unet.cfg)

    def rename(key: str) -> str:  # longest module prefix found in the table
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in table:
                return ".".join([table[".".join(parts[:i])], *parts[i:]])
        raise KeyError(key)

    with torch.device("meta"):
        model = UNet2DConditionModel(**diffusers_config(unet.cfg))
    model.load_state_dict({rename(k): v for k, v in unet.state_dict().items()}, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# timing and memory


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensors an eager call creates and holds at once: on the CPU, where PyTorch keeps no
    allocator statistics, the counterpart of torch.cuda.max_memory_allocated. Kernels' private scratch
    memory is not seen; views and in-place results share their input's storage and cost nothing."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key: int):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or not storage.nbytes():
                continue
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


def peak_mib(fn, device: torch.device) -> float:
    """Peak memory of one call of `fn` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - held) / 2 ** 20
    with TensorPeak() as counter:
        fn()
    return counter.peak / 2 ** 20


def timed(fn, device: torch.device):
    """`fn`'s result and its wall time in ms (between CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return out, start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def inputs(cfg: UNetConfig, batch: int, size: int, dtype: torch.dtype, device: torch.device, channels_last: bool):
    """Random latents and conditioning; y is SDXL's vector (pooled text embedding + embedded size / crop ids),
    which diffusers builds itself from `pooled` and `time_ids`."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, control = (torch.randn(batch, cfg.in_channels, size, size, generator=g).to(dtype, memory_format=fmt)
                  for _ in range(2))
    context = torch.randn(batch, CONTEXT_TOKENS, cfg.context_dim, generator=g).to(dtype)
    pooled = torch.randn(batch, cfg.adm_in_channels - len(TIME_IDS) * SIZE_EMBED, generator=g).to(dtype)
    time_ids = torch.tensor([TIME_IDS] * batch)
    y = torch.cat([pooled.float(), timestep_embedding(time_ids.flatten(), SIZE_EMBED).reshape(batch, -1)], dim=1)
    a = dict(x=x, timesteps=torch.linspace(999, 1, batch), context=context, y=y.to(dtype), control_latent=control,
             pooled=pooled, time_ids=time_ids)
    return {k: v.to(device) for k, v in a.items()}


def calls(kind: str, ours, theirs, a: dict):
    """Zero-argument callables running our model and (for the plain UNet) diffusers' on the inputs `a`."""
    if kind == "unet+control":
        return lambda: ours(a["x"], a["timesteps"], a["context"], a["y"], a["control_latent"]), None
    ours_call = lambda: ours(a["x"], a["timesteps"], a["context"], a["y"])  # noqa: E731
    if theirs is None:
        return ours_call, None
    cond = dict(text_embeds=a["pooled"], time_ids=a["time_ids"])
    return ours_call, lambda: theirs(a["x"], a["timesteps"], a["context"], added_cond_kwargs=cond).sample


def build(kind: str, cfg: UNetConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Our model with random weights, created (and initialised) in `dtype` on `device`: no float32 copy."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return (ControlledUNet(cfg) if kind == "unet+control" else UNet(cfg)).eval()
    finally:
        torch.set_default_dtype(default)


def bench(args) -> list[dict]:
    cfg, device = PRESETS[args.preset], torch.device(args.device)
    rows = []
    for kind in args.models:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            model = build(kind, cfg, dtype, device)
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
            theirs = to_diffusers(model) if kind == "unet" else None
            params = sum(p.numel() for p in model.parameters())
            ours_fn, theirs_fn = model, theirs
            if args.compile:
                ours_fn, theirs_fn = torch.compile(model), theirs and torch.compile(theirs)
            for size in args.sizes:
                for batch in args.batches:
                    a = inputs(cfg, batch, size, dtype, device, args.channels_last)
                    run_ours, run_theirs = calls(kind, ours_fn, theirs_fn, a)
                    with torch.inference_mode():
                        out, warm_ms = timed(run_ours, device)  # warm-up (compiles with --compile)
                        diff = float("nan")
                        if run_theirs is not None:
                            diff = (out.float() - run_theirs().float()).abs().max().item()
                        del out
                        ours_t, theirs_t = [], []
                        for _ in range(args.repeats):
                            ours_t.append(timed(run_ours, device)[1])
                            if run_theirs is not None:
                                theirs_t.append(timed(run_theirs, device)[1])
                        # compiled CPU kernels allocate outside the dispatcher TensorPeak watches
                        counted = not (args.compile and device.type == "cpu")
                        mb = peak_mib(run_ours, device) if counted else None
                        d_mb = peak_mib(run_theirs, device) if counted and run_theirs is not None else None
                    flops = unet_flops(cfg, batch, size, size, controlled=kind == "unet+control")
                    ms = statistics.median(ours_t)
                    rows.append(dict(model=kind, size=size, batch=batch, dtype=dtype_name, params=params, gflop=flops / 1e9,
                                     ms=ms, mb=mb, tflops=flops / ms / 1e9, warm_ms=warm_ms,
                                     d_ms=statistics.median(theirs_t) if theirs_t else None, d_mb=d_mb, diff=diff))
            del model, theirs, ours_fn, theirs_fn
    return rows


def fmt(value, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def print_table(rows: list[dict]) -> None:
    print("| model | latent | batch | dtype | GFLOP | ms | TFLOP/s | peak MiB | first call ms | diffusers ms | diffusers MiB "
          "| ours/diffusers | max abs diff |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["ms"] / r["d_ms"] if r["d_ms"] else None
        print(f"| {r['model']} | {r['size']}x{r['size']} | {r['batch']} | {r['dtype']} | {r['gflop']:.2f} | {r['ms']:.1f} | "
              f"{r['tflops']:.3f} | {fmt(r['mb'], '.1f')} | {r['warm_ms']:.0f} | "
              f"{fmt(r['d_ms'], '.1f')} | {fmt(r['d_mb'], '.1f')} | "
              f"{fmt(ratio, '.2f')} | {fmt(r['diff'], '.2e')} |")


def main(argv=None) -> None:
    csv = lambda cast: lambda s: [cast(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--sizes", type=csv(int), default=[64, 96, 128, 256], help="latent sides (image side / 8)")
    p.add_argument("--batches", type=csv(int), default=[1, 2], help="2 = one CFG call (positive + negative)")
    p.add_argument("--dtypes", type=csv(str), default=["fp32", "bf16", "fp16"], help=f"of {sorted(DTYPES)}")
    p.add_argument("--models", type=csv(str), default=["unet", "unet+control"], help="unet and/or unet+control")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (after one warm-up)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (compile time in the warm-up)")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights and latents, both models")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    assert set(args.dtypes) <= set(DTYPES) and set(args.models) <= {"unet", "unet+control"}, "unknown dtype or model"
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import diffusers
        their = f"diffusers {diffusers.__version__}"
    except ImportError:
        their = "diffusers not installed (pip install diffusers): its columns read n/a"
    rows = bench(args)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    params = {r["model"]: r["params"] for r in rows}
    print(f"preset {args.preset} ({', '.join(f'{k} {v / 1e6:.1f} M params' for k, v in params.items())}), {where}, "
          f"torch {torch.__version__}, {their}; context {CONTEXT_TOKENS} tokens; median of {args.repeats}"
          f"{', torch.compile' if args.compile else ''}{', channels-last' if args.channels_last else ''}")
    print_table(rows)


if __name__ == "__main__":
    main()
