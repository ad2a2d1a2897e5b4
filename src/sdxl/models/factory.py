"""Build the modules of a `ModelConfig` with fresh weights (training from scratch, tests, benchmarks)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .text import CLIPTextTower
from .unet import UNet
from .vae import AutoencoderKL


def build_modules(config: ModelConfig, device="cpu", dtype=torch.float32) -> dict[str, nn.Module]:
    """{"unet", "vae", "text_l", "text_g"} modules for the parts the config has (default PyTorch init)."""
    out: dict[str, nn.Module] = {}
    with torch.device(device):
        if config.unet is not None:
            out["unet"] = UNet(config.unet)
        if config.vae is not None:
            out["vae"] = AutoencoderKL(config.vae)
        if config.text_l is not None:
            out["text_l"] = CLIPTextTower(config.text_l)
        if config.text_g is not None:
            out["text_g"] = CLIPTextTower(config.text_g)
    return {k: m.to(dtype) for k, m in out.items()}


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Overwrite every parameter with seeded noise (also the zero-initialised output layers, so random
    models produce non-trivial outputs). Norm weights are set to 1 + noise so activations stay sane."""
    g = torch.Generator("cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        if p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
            noise += 1.0
        p.copy_(noise.to(p.dtype))
    return module
