"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net") as removable hooks on the UNet's up path.

In each block of the first two up stages (the two lowest resolutions; diffusers' up_blocks 0 and 1, our
`output_blocks[0 : 2 * (num_res_blocks + 1)]`), before the ResBlock sees [h | skip]:

    h[:, :C/2] *= b           the first half of the backbone channels is amplified
    skip = lowpass(skip, s)   the lowest frequencies of the skip features are scaled by s: in the centred
                              2-D spectrum, the 2x2 window around the centre (threshold 1) is multiplied by s

with (b, s) = (b1, s1) on the first stage and (b2, s2) on the second, as diffusers' `enable_freeu` applies
it. The UNet module stays literal: `apply_freeu` registers forward pre-hooks on those blocks and returns a
handle whose `remove()` takes them off again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .unet import UNet

# SDXL's published values (the FreeU authors' recommendation for SDXL)
SDXL_FREEU = (1.3, 1.4, 0.9, 0.2)  # b1, b2, s1, s2


def fourier_filter(x: Tensor, scale: float, threshold: int = 1) -> Tensor:
    """Scale the (2 threshold)^2 lowest frequencies of each channel of x [B, C, H, W] by `scale`.

    The FFT runs in float32 (half-precision FFTs are unsupported or unstable); the result has x's dtype."""
    h, w = x.shape[-2:]
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(h, w, device=x.device)
    ch, cw = h // 2, w // 2
    mask[max(ch - threshold, 0) : ch + threshold, max(cw - threshold, 0) : cw + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


@dataclass
class FreeUHandle:
    """The hooks `apply_freeu` placed; `remove()` restores the plain UNet (idempotent)."""

    handles: list[RemovableHandle] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _out_channels(block: torch.nn.Module) -> int:
    """Channels a TimestepEmbedSequential output block produces (its ResBlock's output width)."""
    return block[0].out_layers[-1].out_channels


def apply_freeu(unet: UNet, b1: float, b2: float, s1: float, s2: float) -> FreeUHandle:
    """Hook FreeU onto `unet`'s first two up stages; returns the handle that removes it."""
    cfg = unet.cfg
    per_stage = cfg.num_res_blocks + 1
    backbone = cfg.model_channels * cfg.channel_mult[-1]  # what the middle block hands the first up block
    out = FreeUHandle()
    for index, block in enumerate(unet.output_blocks):
        stage = index // per_stage
        if stage < 2:
            b, s = (b1, s1) if stage == 0 else (b2, s2)
            out.handles.append(block.register_forward_pre_hook(_hook(backbone, b, s)))
        backbone = _out_channels(block)
    return out


def _hook(backbone: int, b: float, s: float):
    """A pre-hook on an output block: its first argument is torch.cat([h, skip]) with h `backbone` wide."""

    def hook(module, args):
        x, *rest = args
        h, skip = x[:, :backbone], x[:, backbone:]
        half = backbone // 2
        h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
        return (torch.cat([h, fourier_filter(skip, s)], dim=1), *rest)

    return hook
