"""Sinusoidal embeddings and the SDXL micro-conditioning vector `y`.

SDXL embeds two kinds of numbers with the same sinusoidal code (sgm `timestep_embedding`):
  - the diffusion timestep (320 features for the base UNet, `model_channels` in general), and
  - the "micro-conditioning" numbers: original size, crop offsets, target size (base) or
    aesthetic score (refiner), 256 features each.

The layout is the sgm one: for `dim` features and `half = dim // 2` frequencies
`freq_i = exp(-ln(max_period) * i / half)`, the output is `[cos(t * freq) | sin(t * freq)]`,
cosines first, no frequency shift. diffusers reaches the same numbers with
`Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Embed numbers `t` (shape [B], any dtype; a scalar counts as [1]) into [B, dim] float32 features.

    Always computed in float32: timesteps reach 999 and sizes reach 4096, and in half precision
    `t * freq` would lose most of its fractional part, which is exactly what the sin/cos read.
    Callers cast the result to their parameter dtype.
    """
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t[None]
    half = dim // 2
    # same operation order as sgm: with arguments up to ~4096, a last-bit change in a frequency moves
    # the sin/cos by ~1e-4, so the order of these float32 operations is part of the contract
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2 == 1:  # odd sizes: one zero column at the end, as sgm does
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def fourier_features(values: Tensor, dim: int = 256) -> Tensor:
    """Embed a [B, N] table of numbers into [B, N * dim] features.

    Each number gets its own `dim` contiguous features, numbers in column order: this is sgm's
    `ConcatTimestepEmbedderND` (and diffusers' `add_time_proj` on the flattened time ids).
    """
    if values.ndim == 1:
        values = values[None, :]
    b, n = values.shape
    emb = timestep_embedding(values.reshape(b * n), dim)
    return emb.reshape(b, n * dim)


def micro_conditioning(pooled: Tensor, numbers: Tensor, dim: int = 256) -> Tensor:
    """Build the UNet's `y` vector: `[pooled text embedding | fourier(numbers)]`.

    numbers:
      - base / inpaint: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)  -> 1280 + 6*256 = 2816
      - refiner:        (orig_h, orig_w, crop_top, crop_left, aesthetic_score)     -> 1280 + 5*256 = 2560

    The result has the dtype of `pooled` (the Fourier part is computed in float32 and cast).
    `numbers` may be a [N] vector shared by the whole batch or a [B, N] table.
    """
    numbers = torch.as_tensor(numbers, device=pooled.device)
    if numbers.ndim == 1:
        numbers = numbers[None, :].expand(pooled.shape[0], -1)
    if numbers.shape[0] != pooled.shape[0]:
        raise ValueError(f"batch mismatch: pooled {tuple(pooled.shape)} vs numbers {tuple(numbers.shape)}")
    feats = fourier_features(numbers, dim).to(pooled.dtype)
    return torch.cat([pooled, feats], dim=1)


def conditioning_numbers(
    kind: str,
    original_size: tuple[float, float],
    crop_top_left: tuple[float, float],
    target_size: tuple[float, float] | None = None,
    aesthetic_score: float | None = None,
) -> list[float]:
    """The micro-conditioning numbers in the order the UNet was trained on (the one home of this layout).

    Sizes are (height, width). Base and inpaint models: original h, w | crop top, left | target h, w.
    The refiner has the aesthetic score in place of the target size (paper section 2.5).
    """
    nums = [float(original_size[0]), float(original_size[1])]
    nums += [float(crop_top_left[0]), float(crop_top_left[1])]
    if kind == "refiner":
        if aesthetic_score is None:
            raise ValueError("the refiner's conditioning needs an aesthetic score")
        return [*nums, float(aesthetic_score)]
    if target_size is None:
        raise ValueError(f"the {kind} model's conditioning needs a target size")
    return [*nums, float(target_size[0]), float(target_size[1])]


# How many micro-conditioning numbers each kind of UNet takes (the layout of `conditioning_numbers`).
CONDITIONING_NUMBERS = {"base": 6, "inpaint": 6, "refiner": 5}
