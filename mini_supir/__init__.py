"""mini_supir: SUPIR-style generative image restoration on SDXL, and LoRA fine-tuning, in plain PyTorch."""

__version__ = "0.1.0"
