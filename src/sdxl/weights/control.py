"""Control model files in, modules out: `load_control_model(path)` reads the kind off the tensors
(`detect_control_kind`), converts diffusers names to ours, reads the sizes off the shapes and builds the
model.

Layouts read:
- diffusers folders: `config.json` + `diffusion_pytorch_model(.fp16).safetensors` (`.bin` only with
  allow_pickle, through `torch.load(weights_only=True)`);
- single `.safetensors` files in the diffusers key layout (how most SDXL ControlNets are published, e.g.
  xinsir's union/ProMax `diffusion_pytorch_model_promax.safetensors`);
- sgm/ldm-layout single files (`input_blocks.*`, `input_hint_block.*`, `zero_convs.*`, bare or under
  `control_model.`), what sd-webui-controlnet and ComfyUI use.

diffusers -> ours (`controlnet_diffusers_to_sgm`), with R = num_res_blocks:

    time_embedding.linear_{1,2}              time_embed.{0,2}
    add_embedding.linear_{1,2}               label_emb.0.{0,2}
    conv_in                                  input_blocks.0.0
    down_blocks.L.resnets.J                  input_blocks.{1 + L*(R+1) + J}.0   (ResBlock names as the UNet's)
    down_blocks.L.attentions.J               input_blocks.{1 + L*(R+1) + J}.1
    down_blocks.L.downsamplers.0.conv        input_blocks.{1 + L*(R+1) + R}.0.op
    mid_block.resnets.{0,1}, .attentions.0   middle_block.{0,2}, .1
    controlnet_cond_embedding.conv_in        input_hint_block.0
    controlnet_cond_embedding.blocks.J       input_hint_block.{2 + 2J}
    controlnet_cond_embedding.conv_out       input_hint_block.{2 + 2 * len(blocks)}
    controlnet_down_blocks.I                 zero_convs.I.0
    controlnet_mid_block                     middle_block_out.0
    transformer_layes.N.attn.in_proj_{weight,bias}   transformer_layes.N.attn.in_proj.{weight,bias}
    task_embedding, control_add_embedding.*, spatial_ch_projs, the rest of transformer_layes: unchanged
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..models.config import UNetConfig
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.t2i_adapter import t2i_adapter_from_tensors
from .checkpoint import build_module
from .control_lora import load_control_lora
from .detect import CONTROL_KIND_NAMES, control_kind, split_components
from .io import CheckpointError, open_tensors

CONTROL_KINDS = ("controlnet", "union", "control-lora", "t2i-adapter")
SGM_PREFIX = "control_model."
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.safetensors")
_PICKLE_FILES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _looks_like(keys: list[str]) -> str:
    """What a file that is not a control model looks like, for the error message."""
    parts = split_components(keys)
    if parts:
        return f"an SDXL checkpoint (official layout: {', '.join(parts)})"
    if "conv_in.weight" in keys and any(k.startswith("up_blocks.") for k in keys):
        return "a UNet (diffusers layout)"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "a VAE"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_down" in k for k in keys):
        return "a LoRA"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return f"an unknown file ({sample} ...)"


def detect_control_kind(keys, name: str = "control model") -> str:
    """"controlnet", "union", "control-lora" or "t2i-adapter", read off the tensor names; anything else is a
    one-line CheckpointError naming the file and what it looks like."""
    keys = list(keys)
    kind = control_kind(keys)
    if kind is None:
        raise CheckpointError(f"{name}: not a ControlNet, Control-LoRA or T2I-Adapter: it looks like "
                              f"{_looks_like(keys)}")
    return kind


# ---------------------------------------------------------------------------------------------- names
def _count(keys, pattern: str) -> int:
    rx = re.compile("^" + re.escape(pattern).replace(r"\{N\}", r"(\d+)") + r"\.")
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def controlnet_diffusers_to_sgm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ControlNetModel / ControlNetUnionModel names -> ours (see the module docstring). A tensor no
    rule covers is a KeyError naming it."""
    keys = list(sd)
    nrb = _count(keys, "down_blocks.0.resnets.{N}")
    hint_blocks = _count(keys, "controlnet_cond_embedding.blocks.{N}")

    def resnet(rest: str, key: str) -> str:
        sub, _, tail = rest.partition(".")
        if sub not in _RESNET:
            raise KeyError(f"unexpected tensor {key!r}")
        return _RESNET[sub] + "." + tail

    def rename(k: str) -> str:
        simple = (("time_embedding.linear_1.", "time_embed.0."),
                  ("time_embedding.linear_2.", "time_embed.2."),
                  ("add_embedding.linear_1.", "label_emb.0.0."),
                  ("add_embedding.linear_2.", "label_emb.0.2."),
                  ("conv_in.", "input_blocks.0.0."), ("controlnet_mid_block.", "middle_block_out.0."),
                  ("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
                  ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 + 2 * hint_blocks}."),
                  ("mid_block.attentions.0.", "middle_block.1."))
        for old, new in simple:
            if k.startswith(old):
                return new + k[len(old):]
        if k == "task_embedding" or k.startswith(("control_add_embedding.", "spatial_ch_projs.")):
            return k
        if k.startswith("transformer_layes."):
            return k.replace(".attn.in_proj_weight", ".attn.in_proj.weight").replace(
                ".attn.in_proj_bias", ".attn.in_proj.bias")
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", k):
            block = 1 + int(m[1]) * (nrb + 1) + int(m[3])
            if m[2] == "attentions":
                return f"input_blocks.{block}.1.{m[4]}"
            return f"input_blocks.{block}.0.{resnet(m[4], k)}"
        if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", k):
            return f"input_blocks.{1 + int(m[1]) * (nrb + 1) + nrb}.0.op.{m[2]}"
        if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)$", k):
            return f"middle_block.{2 * int(m[1])}.{resnet(m[2], k)}"
        if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)$", k):
            return f"input_hint_block.{2 + 2 * int(m[1])}.{m[2]}"
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)$", k):
            return f"zero_convs.{m[1]}.0.{m[2]}"
        raise KeyError(f"unexpected tensor {k!r}")

    out = {}
    for k, v in sd.items():
        new = rename(k)
        if new in out:
            raise KeyError(f"two tensors map to {new!r}")
        out[new] = v
    return out


# ---------------------------------------------------------------------------------------------- sizes
def controlnet_config(sd: Mapping[str, torch.Tensor], name: str = "ControlNet", head_dim: int = 64,
                      norm_groups: int = 32) -> ControlNetConfig:
    """The sizes of a ControlNet in our names, read off its tensors (heads are not stored: `head_dim`)."""
    def shape(k: str) -> tuple[int, ...]:
        if k not in sd:
            raise CheckpointError(f"{name}: missing tensor {k}")
        return tuple(sd[k].shape)

    if "label_emb.0.0.weight" not in sd:
        raise CheckpointError(f"{name}: a ControlNet without the size/pooled-text embedding (label_emb / "
                              "add_embedding): not an SDXL ControlNet (SD 1.x / 2.x ControlNets do not fit "
                              "SDXL)")
    keys = list(sd)
    mc, in_ch = shape("input_blocks.0.0.weight")[:2]
    ted = shape("time_embed.0.weight")[0]
    adm = shape("label_emb.0.0.weight")[1]
    mult, depths, level_blocks, nres, context_dim = [], [], 0, None, None
    for i in range(1, _count(keys, "input_blocks.{N}")):
        p = f"input_blocks.{i}."
        if p + "0.op.weight" in sd:
            if nres is not None and level_blocks != nres:
                raise CheckpointError(f"{name}: levels with different numbers of ResBlocks")
            nres, level_blocks = level_blocks, 0
            continue
        if p + "0.in_layers.0.weight" not in sd:
            raise CheckpointError(f"{name}: input block {i} is neither a ResBlock nor a Downsample")
        if level_blocks == 0:
            mult.append(shape(p + "0.out_layers.3.weight")[0] // mc)
        level_blocks += 1
        d = _count(keys, p + "1.transformer_blocks.{N}")
        if d and len(shape(p + "1.proj_in.weight")) != 2:
            raise CheckpointError(f"{name}: conv proj_in transformers: not an SDXL ControlNet")
        if d and context_dim is None:
            context_dim = shape(p + "1.transformer_blocks.0.attn2.to_k.weight")[1]
        depths.append(d)
    nres = level_blocks if nres is None else nres
    if level_blocks != nres or not mult:
        raise CheckpointError(f"{name}: inconsistent input blocks")
    if "middle_block.1.proj_in.weight" in sd:
        mid = _count(keys, "middle_block.1.transformer_blocks.{N}")
        context_dim = context_dim or shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    else:
        mid = -1
    if context_dim is None:
        raise CheckpointError(f"{name}: no cross-attention at all: not an SDXL ControlNet")
    per_level = [depths[lv * nres] for lv in range(len(mult))]
    unet = UNetConfig(in_channels=in_ch, out_channels=in_ch, model_channels=mc, channel_mult=tuple(mult),
                      num_res_blocks=nres, transformer_depth=tuple(depths),
                      transformer_depth_output=tuple(d for d in reversed(per_level) for _ in range(nres + 1)),
                      transformer_depth_middle=mid, context_dim=context_dim, adm_in_channels=adm,
                      head_dim=head_dim, norm_groups=norm_groups, time_embed_mult=ted // mc)
    n_hint = _count(keys, "input_hint_block.{N}")
    convs = [shape(f"input_hint_block.{2 * i}.weight") for i in range(n_hint)]
    if len(convs) < 2 or len(convs) % 2 or convs[-1][0] != mc:
        raise CheckpointError(f"{name}: the hint encoder (input_hint_block) is not a ControlNet's")
    hint = (convs[0][0],) + tuple(c[0] for c in convs[2:-1:2])
    cfg = ControlNetConfig(unet=unet, hint_channels=hint, hint_in_channels=convs[0][1])
    if "task_embedding" in sd:
        types, width = shape("task_embedding")
        type_in = shape("control_add_embedding.linear_1.weight")[1]
        if type_in % types:
            raise CheckpointError(f"{name}: control_add_embedding does not fit {types} control types")
        cfg = replace(cfg, union_types=types, union_width=width, union_type_dim=type_in // types,
                      union_layers=_count(keys, "transformer_layes.{N}"))
    return cfg


# ---------------------------------------------------------------------------------------------- files
def _read(path: Path, allow_pickle: bool) -> tuple[Mapping[str, torch.Tensor], dict]:
    """The tensors of a control model file or diffusers folder, and the folder's config.json (or {})."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        return open_tensors(path, allow_pickle=allow_pickle), {}
    config = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / 'config.json'}: not a JSON object")
    for weights in _WEIGHT_FILES + (_PICKLE_FILES if allow_pickle else ()):
        if (path / weights).is_file():
            return open_tensors(path / weights, allow_pickle=allow_pickle), config
    if any((path / w).is_file() for w in _PICKLE_FILES):
        raise CheckpointError(f"{path}: only pickle (.bin) weights found; convert them to safetensors, or "
                              "pass --allow-pickle to load them with torch.load(weights_only=True)")
    raise CheckpointError(f"{path}: no diffusion_pytorch_model.safetensors in this folder")


def _head_dim(config: dict, cfg: ControlNetConfig, base_unet: UNetConfig | None) -> int:
    """Channels per attention head: from a diffusers config.json (its attention_head_dim is the number of
    heads per level), else the base UNet's, else SDXL's 64."""
    heads = config.get("num_attention_heads") or config.get("attention_head_dim")
    widths = [cfg.unet.model_channels * m for m in cfg.unet.channel_mult]
    if isinstance(heads, int) and heads > 0:
        heads = [heads] * len(widths)
    if isinstance(heads, list) and len(heads) == len(widths):
        levels = [lv for lv in range(len(widths)) if cfg.unet.transformer_depth[lv * cfg.unet.num_res_blocks]]
        if levels and all(isinstance(heads[lv], int) and heads[lv] > 0 and widths[lv] % heads[lv] == 0
                          for lv in levels):
            dims = {widths[lv] // heads[lv] for lv in levels}
            if len(dims) == 1:
                return dims.pop()
    return base_unet.head_dim if base_unet is not None else 64


def load_control_model(path: str | Path, base_unet: UNetConfig | torch.nn.Module | None = None,
                       dtype=torch.float32, device="cpu", allow_pickle: bool = False) -> torch.nn.Module:
    """A control model from a file or diffusers folder, its kind read off the tensors, on `device` in `dtype`.

    `base_unet`: the UNet the model will control (its config, or the UNet itself: a Control-LoRA is built
    from the UNet's weights and needs it); a ControlNet made for another one (text width, conditioning
    width) is a one-line CheckpointError, as is a file that is not a control model.
    The module has `.kind` and `forward(x, t, context, y, hint, control_type=None) -> UNetControl`."""
    path = Path(path)
    name = str(path)
    unet = base_unet if isinstance(base_unet, torch.nn.Module) else None
    base_unet = unet.cfg if unet is not None else base_unet
    sd, config = _read(path, allow_pickle)
    kind = detect_control_kind(sd.keys(), name)
    if kind == "control-lora":
        return load_control_lora(sd, unet, name, dtype=dtype, device=device)
    if kind == "t2i-adapter":
        return t2i_adapter_from_tensors(sd, config, unet_config=base_unet, name=name, dtype=dtype,
                                        device=device)
    tensors = {k: sd[k] for k in sd.keys()}
    try:
        if "controlnet_cond_embedding.conv_in.weight" in tensors:
            tensors = controlnet_diffusers_to_sgm(tensors)
        elif any(k.startswith(SGM_PREFIX) for k in tensors):
            tensors = {k[len(SGM_PREFIX):]: v for k, v in tensors.items() if k.startswith(SGM_PREFIX)}
        cfg = controlnet_config(tensors, name)
        cfg = replace(cfg, unet=replace(cfg.unet, head_dim=_head_dim(config, cfg, base_unet),
                                        norm_groups=base_unet.norm_groups if base_unet else 32))
    except CheckpointError:
        raise
    except (KeyError, IndexError, ValueError, ZeroDivisionError, TypeError) as e:
        raise CheckpointError(f"{name}: inconsistent {CONTROL_KIND_NAMES[kind]} tensors "
                              f"({str(e).strip(chr(34))[:160]})") from None
    if base_unet is not None:
        u = cfg.unet
        for what, mine, theirs in (("text context width", u.context_dim, base_unet.context_dim),
                                   ("conditioning (y) width", u.adm_in_channels, base_unet.adm_in_channels)):
            if mine != theirs:
                raise CheckpointError(f"{name}: a {CONTROL_KIND_NAMES[kind]} for another model: its {what} "
                                      f"is {mine}, the model's UNet has {theirs}")
        if u.in_channels != base_unet.out_channels:
            raise CheckpointError(f"{name}: takes {u.in_channels} latent channels, the model's latents have "
                                  f"{base_unet.out_channels}")
    model = build_module(ControlNet, cfg, tensors, device, dtype, f"{name} ({CONTROL_KIND_NAMES[kind]})")
    return model
