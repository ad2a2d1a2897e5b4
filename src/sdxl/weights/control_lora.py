"""Stability AI's Control-LoRA files (stabilityai/control-lora: control-lora-canny-rank128.safetensors, ...).

A Control-LoRA is an SDXL ControlNet stored as a difference from the base UNet it was trained on. The file is
in the sgm ControlNet layout (`sdxl.models.controlnet`) and is recognised by a `lora_controlnet` marker
tensor. How its tensors make the ControlNet (ComfyUI's `ControlLora`, which builds the ControlNet on the base
model's own config, copies every base UNet tensor whose name the ControlNet shares, then sets every file
tensor but the marker; its Linear / Conv2d layers add `up @ down` to their weight):

    weight of a layer with `<layer>.up` / `<layer>.down` in the file:
        (file's `<layer>.weight` if present, else the base UNet's) + (up.flatten(1) @ down.flatten(1))
        reshaped to the weight's shape (no alpha, no scale; a conv's up/down are [out, r, 1, 1] /
        [r, in, k, k] or flat)
    any other tensor (biases, GroupNorm / LayerNorm weights, ...):
        the file's where present, else the base UNet's
    input_hint_block, zero_convs, middle_block_out (not in the UNet): the file's, in full

In the published files the weights of time_embed, label_emb, the ResBlocks' convs and emb_layers, the
attention and feed-forward projections, proj_in / proj_out and the downsamplers are low-rank pairs; biases
and norm layers are stored in full. The ControlNet's sizes are the base UNet's (`ControlNetConfig(unet=...)`)
and the hint encoder's widths are read off the file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.unet import UNet

MARKER = "lora_controlnet"


def is_control_lora(keys) -> bool:
    return MARKER in set(keys)


def hint_channels(tensors: Mapping[str, Tensor], name: str) -> tuple[int, tuple[int, ...]]:
    """(image channels, the hint encoder's widths) read off `input_hint_block.{0,2,...}` (sgm's layout: a
    conv to width c0, then per width step a conv c_i -> c_i and a stride-2 conv c_i -> c_{i+1}, then a conv to
    the model width)."""
    convs = []
    i = 0
    while f"input_hint_block.{i}.weight" in tensors:
        convs.append(tensors[f"input_hint_block.{i}.weight"].shape)
        i += 2
    if len(convs) < 2 or (len(convs) - 2) % 2:
        raise CheckpointError(f"{name}: a Control-LoRA file without a complete input_hint_block "
                              f"({len(convs)} convs)")
    widths = (convs[0][0],) + tuple(convs[j][0] for j in range(2, len(convs) - 1, 2))
    return convs[0][1], widths


def control_lora_state_dict(tensors: Mapping[str, Tensor], base: Mapping[str, Tensor],
                            want: Mapping[str, Tensor], name: str = "Control-LoRA") -> dict[str, Tensor]:
    """The ControlNet's full state dict (float32) from a Control-LoRA file's tensors and the base UNet's
    state dict, for the parameter names and shapes of `want` (the ControlNet's own state dict).

    CheckpointError (one line, naming `name`) when a tensor is in neither, an update has the wrong size, or
    the file has tensors for layers the ControlNet does not have (a file for another base model)."""
    used = {MARKER}
    out: dict[str, Tensor] = {}
    for key, ref in want.items():
        if key in tensors:
            value = tensors[key]
            used.add(key)
        elif key in base:
            value = base[key]
        else:
            raise CheckpointError(f"{name}: Control-LoRA has no {key} and the base UNet has none either")
        value = value.detach().to(device="cpu", dtype=torch.float32)
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and f"{layer}.up" in tensors:
            up, down = tensors[f"{layer}.up"], tensors.get(f"{layer}.down")
            if down is None:
                raise CheckpointError(f"{name}: {layer}.up without {layer}.down")
            used.update((f"{layer}.up", f"{layer}.down"))
            up = up.detach().to(device="cpu", dtype=torch.float32).flatten(1)
            down = down.detach().to(device="cpu", dtype=torch.float32).flatten(1)
            if up.shape[1] != down.shape[0] or up.shape[0] * down.shape[1] != value.numel():
                raise CheckpointError(
                    f"{name}: {layer}.up {tuple(up.shape)} @ {layer}.down {tuple(down.shape)} does not make "
                    f"a {tuple(value.shape)} update (a Control-LoRA for another base model?)")
            value = value + (up @ down).reshape(value.shape)
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(f"{name}: {key} is {tuple(value.shape)}, this base model's ControlNet "
                                  f"needs {tuple(ref.shape)} (a Control-LoRA for another base model?)")
        out[key] = value
    left = sorted(set(tensors) - used)
    if left:
        raise CheckpointError(f"{name}: {len(left)} Control-LoRA tensors match no ControlNet layer of this "
                              f"base model (first: {left[0]})")
    return out


def load_control_lora(tensors: Mapping[str, Tensor], base_unet: UNet | None, name: str = "Control-LoRA",
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ControlNet:
    """The ControlNet a Control-LoRA file makes on `base_unet` (see the module docstring)."""
    if base_unet is None:
        raise CheckpointError(f"{name}: a Control-LoRA needs the base model's UNet to build its ControlNet")
    ucfg = base_unet.cfg
    if ucfg.in_channels != 4:
        raise CheckpointError(f"{name}: a Control-LoRA needs a 4-channel base UNet, this one takes "
                              f"{ucfg.in_channels} channels (an inpainting model)")
    in_ch, widths = hint_channels(tensors, name)
    model = ControlNet(ControlNetConfig(unet=ucfg, hint_channels=widths, hint_in_channels=in_ch))
    sd = control_lora_state_dict(tensors, base_unet.state_dict(), model.state_dict(), name)
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
