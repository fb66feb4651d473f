"""The tiny base models behind the peer-written LoRA files in tests/data/lora_peers/.

Their weights are not stored: both sides derive them from numpy's legacy RandomState stream (frozen by
NumPy's policy, NEP 19), filled tensor by tensor over our official key names in sorted order. The generator
(make_peer_loras.py, run with diffusers / peft / transformers) converts them to the peers' names; the tests
load them straight into our modules. TINY presets throughout (supir.TINY's UNet and text towers).
"""
import numpy as np
import torch
from torch import nn

from mini_supir.text import TINY_CLIP, TINY_OPENCLIP, CLIPTextModel, OpenCLIPTextModel
from mini_supir.unet import TINY, UNet

SEEDS = {"te1": 1, "te2": 2, "unet": 3}
TIME_IDS = (64, 64, 0, 0, 64, 64)  # SDXL's original size, crop, target size (diffusers' add_time_ids)
SIZE_EMBED = 256  # sgm ConcatTimestepEmbedderND outdim = diffusers' addition_time_embed_dim


def seeded_state_dict(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random float tensors for every float entry of module's state dict: matrices / kernels
    N(0, 1/fan_in), 1-D weights (norm gains) 1 + N(0, 0.01), the rest (biases, scalars) N(0, 0.01)."""
    rs = np.random.RandomState(seed)
    out = {}
    for name, t in sorted(module.state_dict().items()):
        if not t.is_floating_point():
            continue
        n = rs.standard_normal(tuple(t.shape))
        if t.dim() >= 2:
            v = n / np.sqrt(np.prod(t.shape[1:]))
        elif t.dim() == 1 and name.endswith("weight"):
            v = 1 + 0.1 * n
        else:
            v = 0.1 * n
        out[name] = torch.from_numpy(np.asarray(v, dtype=np.float32))
    return out


class Tree(nn.Module):
    """The SDXL checkpoint layout that load_lora finds its parts in: UNet and both text towers."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = UNet(TINY)
        self.conditioner = nn.Module()
        self.conditioner.embedders = nn.ModuleList([nn.Module(), nn.Module()])
        self.conditioner.embedders[0].transformer = CLIPTextModel(TINY_CLIP)
        self.conditioner.embedders[1].model = OpenCLIPTextModel(TINY_OPENCLIP)

    def parts(self) -> dict[str, nn.Module]:
        return {"te1": self.conditioner.embedders[0].transformer, "te2": self.conditioner.embedders[1].model,
                "unet": self.model.diffusion_model}


def base_tree() -> Tree:
    tree = Tree().eval()
    for part, module in tree.parts().items():
        module.load_state_dict(seeded_state_dict(module, SEEDS[part]), strict=False)
    return tree


def inputs() -> dict[str, torch.Tensor]:
    """Fixed inputs: 2 prompts of 8 tokens (<end> = 49407, the largest id, at 5 and 7), one 8x8 latent."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49406, (2, 8), generator=g)
    ids[:, 0] = 49406
    ids[0, 5:] = 49407
    ids[1, 7] = 49407
    return {"ids": ids, "x": torch.randn(1, 4, 8, 8, generator=g), "t": torch.tensor([700.0]),
            "context": torch.randn(1, 4, TINY.context_dim, generator=g),
            "pooled": torch.randn(1, TINY.adm_in_channels - len(TIME_IDS) * SIZE_EMBED, generator=g),
            "time_ids": torch.tensor([TIME_IDS], dtype=torch.float32)}
