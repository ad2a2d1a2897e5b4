"""Reading LoRA files: every naming scheme's keys sorted into per-layer `LoraModule`s (see the package
docstring for the schemes). Nothing here touches a model; `patch.py` matches and applies."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..io import open_tensors

PARTS = ("unet", "te1", "te2")  # the models a LoRA can touch: UNet, CLIP-L, OpenCLIP bigG


class LoraError(ValueError):
    """A LoRA that cannot be used as asked (strict mode, unreadable file, wrong layer shapes in training)."""


# ---------------------------------------------------------------------------------------------------------
# Reading files: keys -> per-layer LoraModules
# ---------------------------------------------------------------------------------------------------------

# prefix -> (part, naming style). "underscore": kohya names (dots turned into underscores, then one
# dot before the tensor suffix); "dotted": module paths with dots (PEFT, old diffusers, ComfyUI).
_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("lora_unet_", "unet", "underscore"),
    ("lora_te1_", "te1", "underscore"),
    ("lora_te2_", "te2", "underscore"),
    ("lora_te_", "te1", "underscore"),  # SD1-style single text encoder: CLIP-L, as diffusers maps it
    ("unet.", "unet", "dotted"),
    ("text_encoder_2.", "te2", "dotted"),
    ("text_encoder.", "te1", "dotted"),
    ("model.diffusion_model.", "unet", "dotted"),
    ("diffusion_model.", "unet", "dotted"),
    ("text_encoders.clip_l.transformer.", "te1", "dotted"),  # ComfyUI text keys
    ("text_encoders.clip_g.transformer.", "te2", "dotted"),
    ("lora_unet.", "unet", "dotted"),
)
# old diffusers attention-processor files carry no prefix at all
_BARE_UNET_STARTS = ("down_blocks.", "mid_block.", "up_blocks.")

# tensor suffix -> role, longest first so that "lora.down.weight" is not read as "down.weight"
_ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("lora_linear_layer.down.weight", "down"),
    ("lora_linear_layer.up.weight", "up"),
    ("lora_down.weight", "down"),
    ("lora_up.weight", "up"),
    ("lora_mid.weight", "mid"),
    ("lora.down.weight", "down"),
    ("lora.up.weight", "up"),
    ("lora_A.weight", "down"),
    ("lora_B.weight", "up"),
    ("alpha", "alpha"),
)
# old diffusers attention processors: `...attn1.processor.to_q_lora.down.weight`,
# `...self_attn.to_out_lora.up.weight`
_OLD_ATTN = re.compile(r"^(?P<base>.*)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
_OLD_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

# tensor suffixes of network types we recognise but do not apply; the whole layer is reported with the name
_UNSUPPORTED: dict[str, str] = {
    **{
        s: "LoHa (LyCORIS Hadamard product)"
        for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    },
    **{
        s: "LoKr (LyCORIS Kronecker product)"
        for s in (
            "lokr_w1",
            "lokr_w2",
            "lokr_w1_a",
            "lokr_w1_b",
            "lokr_w2_a",
            "lokr_w2_b",
            "lokr_t1",
            "lokr_t2",
        )
    },
    "dora_scale": "DoRA (weight-decomposed LoRA)",
    "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    "diff": "LyCORIS 'full' weight difference",
    "diff_b": "LyCORIS 'full' weight difference",
    "w_norm": "LyCORIS norm-layer update",
    "b_norm": "LyCORIS norm-layer update",
    "on_input": "IA3",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "lora_B.bias": "LoRA with a bias on lora_B",
    "lora_up.bias": "LoRA with a bias on lora_up",
}


@dataclass
class LoraModule:
    """The update of one layer as stored in the file (not yet tied to a module).

    down [rank, in] or [rank, in, kh, kw]; up [out, rank] or [out, rank, 1, 1]; mid (LyCORIS Tucker conv)
    [rank, rank, kh, kw] between a 1x1 down and a 1x1 up, else None. scale = alpha / rank (alpha / sqrt(rank)
    for PEFT's rsLoRA).
    """

    part: str  # "unet", "te1", "te2"
    name: str  # the layer as the file names it, no prefix ("input_blocks_4_1_..._to_q", "down_blocks.1...")
    style: str  # "underscore" or "dotted"
    down: Tensor
    up: Tensor
    mid: Tensor | None
    alpha: float
    scale: float
    keys: tuple[str, ...]  # the file keys it was built from

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Lora:
    """A LoRA file, sorted into per-layer updates. `problems` maps keys that can never be applied to why."""

    name: str
    modules: list[LoraModule]
    problems: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_state_dict(
        cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, name: str = "lora"
    ) -> Lora:
        return _parse(tensors, dict(metadata or {}), name)

    @property
    def format(self) -> str:
        """The naming family: kohya, diffusers (PEFT, old diffusers, ComfyUI dotted names), mixed, empty."""
        styles = {m.style for m in self.modules}
        if not styles:
            return "empty"
        if len(styles) == 2:
            return "mixed"
        return "kohya" if styles == {"underscore"} else "diffusers"

    def __repr__(self) -> str:
        n, bad = len(self.modules), len(self.problems)
        return f"Lora({self.name!r}, {n} layers, format={self.format}, {bad} problems)"


def load_lora(path: str | os.PathLike, name: str | None = None) -> Lora:
    """Read a LoRA .safetensors file (pickles are refused) into a `Lora`. Tensors stay memory-mapped."""
    path = Path(path)
    f = open_tensors(path)
    metadata = dict(getattr(f, "metadata", {}) or {})
    return _parse(f, metadata, name or path.stem)


def _split_prefix(key: str) -> tuple[str, str, str] | None:
    """key -> (part, rest, style), or None when the prefix is not one of a LoRA's."""
    for prefix, part, style in _PREFIXES:
        if key.startswith(prefix):
            return part, key[len(prefix) :], style
    if key.startswith(_BARE_UNET_STARTS):
        return "unet", key, "dotted"
    return None


def _split_suffix(part: str, rest: str, style: str) -> tuple[str, str] | tuple[None, str]:
    """rest of a key -> (layer name, role) with role in down/up/mid/alpha, or (None, reason)."""
    if style == "underscore":
        layer, _, suffix = rest.partition(".")
        for s, role in _ROLE_SUFFIXES:
            if suffix == s:
                return layer, role
        if suffix in _UNSUPPORTED:
            return layer, "unsupported:" + _UNSUPPORTED[suffix]
        return None, f"unrecognised tensor suffix {suffix!r}"
    m = _OLD_ATTN.match(rest)
    if m:
        proj = m["proj"]
        if part == "unet":
            proj = "to_out.0" if proj == "to_out" else proj
        else:
            proj = _OLD_TEXT_PROJ[proj]
        return _clean_dotted(m["base"]) + "." + proj, m["role"]
    for s, role in _ROLE_SUFFIXES:
        if rest.endswith("." + s):
            return _clean_dotted(rest[: -len(s) - 1]), role
    for s, algo in _UNSUPPORTED.items():
        if rest.endswith("." + s):
            return _clean_dotted(rest[: -len(s) - 1]), "unsupported:" + algo
    return None, "unrecognised tensor suffix"


def _clean_dotted(name: str) -> str:
    """Drop the `processor` component old diffusers files put between the attention and its projection."""
    return ".".join(p for p in name.split(".") if p != "processor")


def _peft_settings(metadata: Mapping[str, str]) -> dict[str, dict]:
    """The per-part LoraConfig that diffusers stores as JSON under `lora_adapter_metadata` (if any)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    if not isinstance(flat, dict):
        return {}
    out: dict[str, dict] = {}
    for prefix, part in (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1")):
        for k, v in flat.items():
            if k.startswith(prefix):  # "text_encoder_2.x" does not start with "text_encoder."
                out.setdefault(part, {})[k[len(prefix) :]] = v
    return out


def _pattern_value(patterns: Mapping[str, float], name: str) -> float | None:
    """PEFT's rank/alpha_pattern lookup: a pattern matches a module path when it matches its tail."""
    for pattern, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", name) is not None
        except re.error:  # not a valid regex: a plain module name
            hit = name == pattern or name.endswith("." + pattern)
        if hit:
            return value
    return None


def _parse(tensors: Mapping[str, Tensor], metadata: dict[str, str], name: str) -> Lora:
    groups: dict[tuple[str, str, str], dict[str, tuple[str, Tensor]]] = {}
    unsupported: dict[tuple[str, str, str], str] = {}
    problems: dict[str, str] = {}
    for key in tensors:
        split = _split_prefix(key)
        if split is None:
            problems[key] = "not a LoRA key (unknown prefix)"
            continue
        part, rest, style = split
        layer, role = _split_suffix(part, rest, style)
        if layer is None:
            problems[key] = role
            continue
        gkey = (part, layer, style)
        if role.startswith("unsupported:"):
            unsupported[gkey] = role.split(":", 1)[1]
            groups.setdefault(gkey, {})[key] = ("unsupported", tensors[key])
            continue
        groups.setdefault(gkey, {})[key] = (role, tensors[key])

    peft = _peft_settings(metadata)
    modules: list[LoraModule] = []
    for (part, layer, style), entries in groups.items():
        keys = tuple(entries)
        if (part, layer, style) in unsupported:
            for k in keys:
                problems[k] = f"{unsupported[(part, layer, style)]} is not supported"
            continue
        by_role: dict[str, Tensor] = {}
        duplicate = False
        for role, t in entries.values():
            duplicate |= role in by_role
            by_role[role] = t
        if duplicate:
            for k in keys:
                problems[k] = "the same layer is stored twice under different key spellings"
            continue
        if "down" not in by_role or "up" not in by_role:
            missing = "down (lora_down / lora_A)" if "down" not in by_role else "up (lora_up / lora_B)"
            for k in keys:
                problems[k] = f"incomplete layer: no {missing} tensor"
            continue
        down, up, mid = by_role["down"], by_role["up"], by_role.get("mid")
        rank = down.shape[0]
        inner = mid.shape[0] if mid is not None else rank
        if (
            down.ndim not in (2, 4)
            or up.ndim not in (2, 4)
            or up.shape[1] != inner
            or (mid is not None and (mid.ndim != 4 or mid.shape[1] != rank))
        ):
            for k in keys:
                problems[k] = f"inconsistent LoRA shapes: down {tuple(down.shape)}, up {tuple(up.shape)}" + (
                    f", mid {tuple(mid.shape)}" if mid is not None else ""
                )
            continue
        settings = peft.get(part, {}) if style == "dotted" else {}
        if "alpha" in by_role:
            alpha = float(by_role["alpha"].float().reshape(-1)[0])
        elif settings:
            alpha = _pattern_value(settings.get("alpha_pattern") or {}, layer)
            alpha = float(settings.get("lora_alpha", rank) if alpha is None else alpha)
        else:
            alpha = float(rank)  # no alpha stored: kohya and PEFT both mean scale 1
        if alpha == 0:
            alpha = float(rank)  # kohya: alpha 0 / None means "no scaling"
        rslora = bool(settings.get("use_rslora", False)) and "alpha" not in by_role
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules.append(LoraModule(part, layer, style, down, up, mid, alpha, scale, keys))
    return Lora(name, modules, problems, metadata)


