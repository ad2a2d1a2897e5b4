"""Tensor-name conversions between the published text-encoder layouts and `sdxl.models.text.CLIPTextTower`.

Our names are transformers' CLIPTextModel names without `text_model.` (SDXL_SPEC sections 4 and 9):
    embeddings.token_embedding.weight, embeddings.position_embedding.weight,
    encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}.{weight,bias},
    final_layer_norm.{weight,bias}, text_projection.weight (nn.Linear weight, [out, in]).

Layouts handled:
- HF / diffusers (`hf_clip_to_ours`, `ours_to_hf_clip`): the official CLIP-L part
  (`conditioner.embedders.0.transformer.` + `text_model.*`), diffusers `text_encoder/` and `text_encoder_2/`
  files (`text_model.*`, plus a top-level `text_projection.weight` in the latter), and transformers >= 5's
  flattened CLIPTextModel (no `text_model.` at all). Only `text_model.` is added or removed, plus the
  `embeddings.position_ids` buffer (int64 arange, dropped on load, written back on save).
- OpenCLIP (`openclip_to_ours`, `ours_to_openclip`): the official bigG part (`conditioner.embedders.1.model.*`
  in the base, `conditioner.embedders.0.model.*` in the refiner). Differences beyond names: q/k/v are one
  packed `attn.in_proj_weight` [3W, W] (rows q, k, v), and `text_projection` is a plain matrix P applied as
  `x @ P`, i.e. the transpose of our Linear weight. `logit_scale` (the CLIP contrastive temperature, unused by
  SDXL) is dropped on load and written on save.

Functions take the state dict of ONE tower with its checkpoint prefix already removed, and return a new dict
(tensors are shared where no reshaping is needed). `text_from_official` / `text_to_official` handle the
prefixes of whole SDXL checkpoints.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # followed by text_model.*
BIGG_PREFIX = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}

# Trained CLIP models end at open_clip's clamp of exp(logit_scale) <= 100, so that is what a trained file
# holds (ComfyUI also defaults to 4.6055 ~ ln 100); open_clip *initialises* it to ln(1 / 0.07) = 2.659.
# SDXL never uses it; we only write it so that exported files have the official key set.
DEFAULT_LOGIT_SCALE = math.log(100.0)

# Keys that may sit next to a text tower in HF files and are not part of it.
_HF_NOT_TEXT = re.compile(r"^(vision_model\.|visual_projection\.|logit_scale$)")

# OpenCLIP resblock sub-names <-> ours (the packed attention input projection is handled separately).
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_BLOCK_BACK = {v: k for k, v in _OPENCLIP_BLOCK.items()}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_RESBLOCK_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_OUR_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def _unknown(keys: list[str], layout: str) -> ValueError:
    shown = ", ".join(sorted(keys)[:8]) + (" ..." if len(keys) > 8 else "")
    return ValueError(f"{len(keys)} tensor name(s) are not part of a {layout} text tower: {shown}")


# ---------------------------------------------------------------- HF / diffusers / official CLIP-L
def hf_clip_to_ours(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel(/WithProjection) names, with or without `text_model.`, -> ours.

    Drops `embeddings.position_ids` (a constant buffer, stored as int64 or even float in some files) and, if
    a full CLIPModel was given, its vision tower, `visual_projection` and `logit_scale`.
    """
    out: dict[str, torch.Tensor] = {}
    for key in sd:
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_ids" or _HF_NOT_TEXT.match(name):
            continue
        if name in out:
            raise ValueError(f"{key!r} appears both with and without the 'text_model.' prefix")
        out[name] = sd[key]
    return out


def ours_to_hf_clip(
    sd: Mapping[str, torch.Tensor], *, text_model_prefix: bool = True, position_ids: bool = True
) -> dict[str, torch.Tensor]:
    """Ours -> HF names.

    text_model_prefix=True gives the diffusers / official layout (`text_model.*`, with
    `text_projection.weight` at the top level as in CLIPTextModelWithProjection); False gives transformers
    >= 5's flattened CLIPTextModel names. position_ids=True adds `text_model.embeddings.position_ids` =
    arange(positions)[None] as int64, like the official SDXL file (transformers itself treats it as a
    non-persistent buffer).
    """
    prefix = "text_model." if text_model_prefix else ""
    out: dict[str, torch.Tensor] = {}
    for name in sd:
        out[name if name.startswith("text_projection.") else prefix + name] = sd[name]
    if position_ids:
        n = sd["embeddings.position_embedding.weight"].shape[0]
        out[prefix + "embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    return out


# ---------------------------------------------------------------- OpenCLIP (bigG)
def openclip_to_ours(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip text-tower names -> ours: split in_proj into q/k/v thirds, transpose text_projection.

    Also accepts `text_projection.weight`, which some converted files carry already in Linear [out, in]
    orientation (ComfyUI reads it that way). Drops `logit_scale` and a stray `attn_mask` buffer.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key in sd:
        t = sd[key]
        if key in ("logit_scale", "attn_mask"):
            continue
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = t
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = t
        elif key.startswith("ln_final."):
            out["final_layer_norm." + key.removeprefix("ln_final.")] = t
        elif key == "text_projection":
            out["text_projection.weight"] = t.t().contiguous()  # x @ P == Linear with weight P.T
        elif key == "text_projection.weight":
            out["text_projection.weight"] = t
        elif m := _RESBLOCK_IN_PROJ.match(key):
            layer, kind = m.groups()
            if t.shape[0] % 3 != 0:
                raise ValueError(f"{key} has {t.shape[0]} rows, not a multiple of 3 (q, k, v)")
            for name, part in zip(_QKV, t.chunk(3, dim=0)):
                # clone: a view into the packed tensor would share storage, which safetensors refuses to save
                out[f"encoder.layers.{layer}.self_attn.{name}.{kind}"] = part.clone()
        elif (m := _RESBLOCK.match(key)) and m.group(2) in _OPENCLIP_BLOCK:
            layer, sub, kind = m.groups()
            out[f"encoder.layers.{layer}.{_OPENCLIP_BLOCK[sub]}.{kind}"] = t
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(unknown, "OpenCLIP")
    return out


def ours_to_openclip(
    sd: Mapping[str, torch.Tensor], *, logit_scale: float | None = DEFAULT_LOGIT_SCALE
) -> dict[str, torch.Tensor]:
    """Ours -> open_clip text-tower names (pack q/k/v into in_proj, transpose the projection).

    logit_scale: value of the 0-d `logit_scale` tensor to add (dtype of the token embedding), None to omit.
    """
    out: dict[str, torch.Tensor] = {}
    packed: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for name in sd:
        t = sd[name]
        if name == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif name == "embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif name.startswith("final_layer_norm."):
            out["ln_final." + name.removeprefix("final_layer_norm.")] = t
        elif name == "text_projection.weight":
            out["text_projection"] = t.t().contiguous()
        elif m := _OUR_LAYER.match(name):
            layer, sub, kind = m.groups()
            if sub.startswith("self_attn.") and sub.removeprefix("self_attn.") in _QKV:
                packed.setdefault((layer, kind), {})[sub.removeprefix("self_attn.")] = t
            elif sub in _OPENCLIP_BLOCK_BACK:
                out[f"transformer.resblocks.{layer}.{_OPENCLIP_BLOCK_BACK[sub]}.{kind}"] = t
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise _unknown(unknown, "sdxl")
    for (layer, kind), parts in packed.items():
        missing = [q for q in _QKV if q not in parts]
        if missing:
            raise ValueError(f"encoder.layers.{layer}: {', '.join(missing)} {kind} missing (cannot pack)")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[q] for q in _QKV], dim=0)
    if logit_scale is not None:
        ref = sd["embeddings.token_embedding.weight"]
        out["logit_scale"] = torch.full((), logit_scale, dtype=ref.dtype, device=ref.device)
    return out


# ---------------------------------------------------------------- whole official checkpoints
def _sub(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: sd[k] for k in sd if k.startswith(prefix)}


def text_from_official(
    sd: Mapping[str, torch.Tensor], kind: str = "base"
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """(CLIP-L, bigG) state dicts in our names from an official SDXL single file; None where absent.

    kind: "base" (also inpaint: CLIP-L at embedders.0, bigG at embedders.1) or "refiner" (bigG at
    embedders.0, no CLIP-L).
    """
    if kind not in ("base", "inpaint", "refiner"):
        raise ValueError(f"kind must be 'base', 'inpaint' or 'refiner', got {kind!r}")
    clip_l = None
    if kind != "refiner":
        sub_l = _sub(sd, CLIP_L_PREFIX)
        clip_l = hf_clip_to_ours(sub_l) if sub_l else None
    sub_g = _sub(sd, BIGG_PREFIX["refiner" if kind == "refiner" else "base"])
    clip_g = openclip_to_ours(sub_g) if sub_g else None
    return clip_l, clip_g


def text_to_official(
    clip_l: Mapping[str, torch.Tensor] | None,
    clip_g: Mapping[str, torch.Tensor] | None,
    kind: str = "base",
    *,
    logit_scale: float | None = DEFAULT_LOGIT_SCALE,
) -> dict[str, torch.Tensor]:
    """Our two towers' state dicts -> the official single-file text keys (with position_ids, logit_scale)."""
    if kind == "refiner" and clip_l is not None:
        raise ValueError("the refiner layout has no CLIP-L tower")
    out: dict[str, torch.Tensor] = {}
    if clip_l is not None:
        out.update({CLIP_L_PREFIX + k: v for k, v in ours_to_hf_clip(clip_l).items()})
    if clip_g is not None:
        prefix = BIGG_PREFIX["refiner" if kind == "refiner" else "base"]
        out.update({prefix + k: v for k, v in ours_to_openclip(clip_g, logit_scale=logit_scale).items()})
    return out
