"""SDXL text/size conditioning: CLIP BPE tokenizer, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers,
the size embedders, and the conditioner that turns prompts into the UNet's `context` and `y`.

Module names mirror the checkpoint keys under `conditioner.` (sgm's GeneralConditioner):
  embedders.0.transformer.text_model.*   CLIP-L (transformers 4.x CLIPTextModel layout)
  embedders.1.model.*                    OpenCLIP bigG text tower (open_clip layout, visual tower deleted)
  embedders.2..4                         ConcatTimestepEmbedderND for original size, crop, target size (no weights)
"""
import functools
import gzip
import html
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

from mini_supir.unet import timestep_embedding

# -----------------------------------------------------------------------------
# tokenizer

VOCAB_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 48894  # CLIP keeps merges[1 : 49152 - 256 - 2 + 1]: vocab = 256 bytes x2 + merges + 2 specials = 49408
SOT, EOT = 49406, 49407
CONTEXT_LENGTH = 77
# CLIP's pre-tokenisation: specials, English contractions, letter runs, single digits, punctuation runs.
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

DEFAULT_POSITIVE = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - "
    "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing, "
    "hyper sharpness, perfect without deformations."
)
DEFAULT_NEGATIVE = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
    "jpeg artifacts, deformed, lowres, over-smooth"
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (= GPT-2's) reversible byte -> printable character map; its order defines token ids 0..255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in bs]  # controls, space, ...: shifted to chr(256), chr(257), ...
    return dict(zip(bs + others, map(chr, bs + [256 + i for i in range(len(others))])))


# The deterministic parts of ftfy.fix_text (which CLIP runs first; ftfy is not a dependency here).
# Not reproduced: ftfy's mojibake detection/repair (fix_encoding and friends), so text that was decoded with
# the wrong codec ("cafÃ©") stays as it is instead of becoming "café".
_ANSI_ESCAPE = re.compile("\x1b\\[((?:\\d|;)*)([a-zA-Z])")
_LIGATURES = {ord(c): unicodedata.normalize("NFKC", c) for c in "ĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳﬀﬁﬂﬃﬄﬆ"} | {ord("ﬅ"): "ſt"}
_WIDTH = {0x3000: " "} | {i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(i)) != chr(i)}
_QUOTES = {ord(c): "'" for c in "\u02bc\u2018\u2019\u201a\u201b"} | {ord(c): '"' for c in "\u201c\u201d\u201e\u201f"}
_CONTROL = {i: None for i in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                              0xFEFF, *range(0xFFF9, 0xFFFD)]}


def clean_text(text: str) -> str:
    """CLIP's text clean-up: ftfy.fix_text (approximated, see above), html.unescape twice, collapse
    whitespace, strip, lower-case."""
    # ftfy's unescape_html="auto": entities are decoded (to a fixed point) unless the text looks like HTML.
    if "<" not in text:
        while (unescaped := html.unescape(text)) != text:
            text = unescaped
    text = _ANSI_ESCAPE.sub("", text)
    # Joins UTF-16 surrogate pairs, lone surrogates become U+FFFD (ftfy.fix_surrogates).
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = text.translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES).translate(_CONTROL)
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


@functools.lru_cache(maxsize=None)
def clip_tokenizer() -> Tokenizer:
    """The CLIP BPE as a `tokenizers.Tokenizer` (built once, on first use: reading 48k merges takes ~0.3 s)."""
    lines = gzip.open(VOCAB_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),  # keep matches, drop spaces
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # UTF-8 bytes -> bytes_to_unicode chars
    ])
    # Literal specials in a prompt map to their ids, as with the original CLIP and HF tokenizers.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[-2:]])
    return tokenizer


def tokenize(texts: str | list[str], pad: str = "eos", context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """(B, 77) int64: <start>, at most 75 BPE ids, <end>, padding. pad="eos" pads with <end> (the HF
    tokenizer that feeds CLIP-L), pad="zero" with 0 (open_clip.tokenize, which feeds OpenCLIP bigG)."""
    if isinstance(texts, str):
        texts = [texts]
    pad_id = {"eos": EOT, "zero": 0}[pad]
    encodings = clip_tokenizer().encode_batch([clean_text(t) for t in texts])
    out = torch.full((len(texts), context_length), pad_id, dtype=torch.long)
    for row, enc in zip(out, encodings):
        ids = [SOT, *enc.ids[:context_length - 2], EOT]
        row[:len(ids)] = torch.tensor(ids)
    return out


# -----------------------------------------------------------------------------
# shared transformer pieces

def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, C) each -> (B, L, C); both text towers use plain causal softmax attention, scale head_dim**-0.5."""
    B, L, C = q.shape
    q, k, v = (t.view(B, L, heads, C // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(B, L, C)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU, which CLIP-L was trained with.
    return x * torch.sigmoid(1.702 * x)


# -----------------------------------------------------------------------------
# CLIP ViT-L/14 text encoder (transformers CLIPTextModel layout)

@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = CONTEXT_LENGTH
    layer_idx: int = 11  # SDXL takes hidden_states[layer_idx] (output of that layer, no final LayerNorm)


CLIP_L = CLIPTextConfig()
TINY_CLIP = CLIPTextConfig(hidden_size=32, intermediate_size=128, num_layers=3, num_heads=2, layer_idx=2)


class CLIPTextEmbeddings(nn.Module):
    optional_keys = ("position_ids",)  # files may omit it (weights.check_keys reads this)

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        # transformers 4.x saved this arange as a persistent buffer, so SDXL checkpoints carry it (some as
        # float, newer transformers drop it). It is kept only so our state_dict has the checkpoint's key set;
        # forward never reads it and the pre-hook rewrites it on every load, whatever (or nothing) was stored.
        self.register_buffer("position_ids", torch.arange(cfg.max_positions).unsqueeze(0))
        self.register_load_state_dict_pre_hook(self._restore_position_ids)

    @staticmethod
    def _restore_position_ids(module, state_dict, prefix, *args):
        like = state_dict.get(prefix + "position_embedding.weight", module.position_ids)
        n = module.position_ids.shape[1]
        state_dict[prefix + "position_ids"] = torch.arange(n, device=like.device).unsqueeze(0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[:ids.shape[1]]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)


@dataclass
class CLIPTextOutput:
    hidden_states: list[torch.Tensor]  # [embeddings, output of layer 1, ..., output of layer N] (no final norm)
    last_hidden_state: torch.Tensor  # final_layer_norm(output of layer N)
    pooled: torch.Tensor  # last_hidden_state at the first <end> token


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids: torch.Tensor) -> CLIPTextOutput:
        tm = self.text_model
        hidden_states = [tm.embeddings(ids)]
        for layer in tm.encoder.layers:
            hidden_states.append(layer(hidden_states[-1]))
        last = tm.final_layer_norm(hidden_states[-1])
        # <end> has the largest id and argmax returns the first maximum, so eos-padding does not matter.
        pooled = last[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return CLIPTextOutput(hidden_states, last, pooled)


# -----------------------------------------------------------------------------
# OpenCLIP ViT-bigG/14 text tower (open_clip layout)

@dataclass(frozen=True)
class OpenCLIPTextConfig:
    vocab_size: int = 49408
    width: int = 1280
    heads: int = 20
    layers: int = 32
    embed_dim: int = 1280  # size of the pooled, projected text embedding
    context_length: int = CONTEXT_LENGTH


OPENCLIP_BIGG = OpenCLIPTextConfig()
TINY_OPENCLIP = OpenCLIPTextConfig(width=64, heads=4, layers=3, embed_dim=48)


class MultiheadSelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (q, k, v stacked in in_proj_*), batch-first, causal."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * width, width) * width ** -0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        """[q | k | v] (B, L, 3C): one matmul (lora.LoRAInProj adds adapters on each third here)."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        return self.out_proj(causal_self_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = MultiheadSelfAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = OpenCLIPMLP(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


@dataclass
class OpenCLIPTextOutput:
    penultimate: torch.Tensor  # input of the last block, no ln_final (what SDXL cross-attends to)
    last: torch.Tensor  # output of the last block, no ln_final
    pooled: torch.Tensor  # ln_final(last) at the first <end>, @ text_projection


class OpenCLIPTextModel(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        # Init as open_clip does, so an untrained model is usable in tests.
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(cfg.width ** -0.5 * torch.randn(cfg.width, cfg.embed_dim))
        # CLIP's contrastive temperature: unused for conditioning, present in every checkpoint.
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))

    def forward(self, ids: torch.Tensor) -> OpenCLIPTextOutput:
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
        *blocks, last_block = self.transformer.resblocks
        for block in blocks:
            x = block(x)
        last = last_block(x)
        # <end> has the largest id (padding is 0), argmax finds it.
        eot = self.ln_final(last)[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return OpenCLIPTextOutput(penultimate=x, last=last, pooled=eot @ self.text_projection)


# -----------------------------------------------------------------------------
# embedders and the conditioner

class CLIPEmbedder(nn.Module):
    """sgm FrozenCLIPEmbedder(layer="hidden"): CLIP-L hidden state `layer_idx`, (B, 77, hidden)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_idx = cfg.layer_idx
        self.transformer = CLIPTextModel(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids).hidden_states[self.layer_idx]


class OpenCLIPEmbedder(nn.Module):
    """sgm FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True, legacy=False)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.model = OpenCLIPTextModel(cfg)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(ids)
        return out.penultimate, out.pooled


class SizeEmbedder(nn.Module):
    """sgm ConcatTimestepEmbedderND: each integer of a (B, N) tuple gets the sinusoidal timestep embedding
    of size `outdim`; the N embeddings are concatenated -> (B, N * outdim) float32. SDXL "micro-conditioning"
    on image size and crop (SDXL paper, section 2.2)."""

    def __init__(self, outdim: int = 256):
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(x.flatten(), self.outdim).view(x.shape[0], -1)


class Conditioner(nn.Module):
    """sgm GeneralConditioner with SUPIR_v0.yaml's five embedders, in that order. 3-D outputs are
    concatenated on channels into `crossattn` (UNet context), 2-D ones into `vector` (UNet y)."""

    def __init__(self, clip_cfg: CLIPTextConfig = CLIP_L, openclip_cfg: OpenCLIPTextConfig = OPENCLIP_BIGG,
                 size_dim: int = 256):
        super().__init__()
        self.embedders = nn.ModuleList([CLIPEmbedder(clip_cfg), OpenCLIPEmbedder(openclip_cfg),
                                        SizeEmbedder(size_dim), SizeEmbedder(size_dim), SizeEmbedder(size_dim)])

    def forward(self, clip_ids: torch.Tensor, openclip_ids: torch.Tensor, original_size: torch.Tensor,
                crop_coords: torch.Tensor, target_size: torch.Tensor) -> dict[str, torch.Tensor]:
        clip, openclip, original, crop, target = self.embedders
        penultimate, pooled = openclip(openclip_ids)
        return {
            "crossattn": torch.cat([clip(clip_ids), penultimate], dim=2),
            # float32 size embeddings promote a half-precision pooled vector, as torch.cat does in sgm.
            "vector": torch.cat([pooled, original(original_size), crop(crop_coords), target(target_size)], dim=1),
        }

    @torch.no_grad()
    def encode(self, texts: list[str], original_size=(1024, 1024), crop=(0, 0), target=(1024, 1024)):
        """Prompts -> {"crossattn", "vector"}. SUPIR always passes 1024x1024, crop (0, 0), whatever the
        image size. Sizes are (height, width) as sgm's `*_as_tuple` keys."""
        device = self.embedders[1].model.positional_embedding.device
        sizes = [torch.tensor([s] * len(texts), device=device) for s in (original_size, crop, target)]
        return self(tokenize(texts, pad="eos").to(device), tokenize(texts, pad="zero").to(device), *sizes)
