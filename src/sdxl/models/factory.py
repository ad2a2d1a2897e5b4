"""Build the modules of a `ModelConfig` with fresh weights (training from scratch, tests, benchmarks)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


def build_modules(config: ModelConfig, device="cpu", dtype=torch.float32) -> dict[str, nn.Module]:
    """{"unet", "vae", "text_l", "text_g"} modules for the parts the config has (default PyTorch init)."""
    from .text import CLIPTextTower
    from .unet import UNet
    from .vae import AutoencoderKL

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


def random_checkpoint(config: ModelConfig, seed: int = 0, std: float = 0.02):
    """A `Checkpoint` with random weights in our naming; write it with `write_single_file`."""
    from ..weights.checkpoint import Checkpoint

    mods = build_modules(config)
    parts = {}
    for i, (name, m) in enumerate(mods.items()):
        randomize_(m, seed * 100 + i, std)
        parts[name] = m.state_dict()
    return Checkpoint(path=None, config=config, parts=parts)
