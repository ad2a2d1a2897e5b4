"""LoRA: read the common SDXL LoRA files, apply them exactly, and train / save kohya-format LoRAs.

A LoRA stores, for some Linear / Conv2d layers of the UNet and the text towers, a low-rank update

    W' = W + multiplier * scale * up @ down          scale = alpha / rank

(`down` is [rank, in], `up` is [out, rank]; for a k x k convolution `down` is a k x k conv to `rank`
channels and `up` a 1x1 conv, and LyCORIS' "Tucker" variant puts a k x k `mid` conv between two 1x1s).
The files differ only in how they name the layer and the three tensors:

    kohya / A1111     lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight,
                      .lora_up.weight, .alpha; the UNet part also appears with diffusers names
                      (lora_unet_down_blocks_1_attentions_0_...); text: lora_te1_text_model_encoder_...
                      and lora_te2_... (lora_te_ = SD1's single encoder, mapped to CLIP-L as diffusers does)
    diffusers / PEFT  unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight / lora_B,
                      text_encoder.(text_model.)encoder..., text_encoder_2...; alpha from the
                      `lora_adapter_metadata` JSON in the file header (lora_alpha, alpha_pattern,
                      use_rslora), else alpha = rank (scale 1)
    old diffusers     unet.down_blocks...attn1.processor.to_q_lora.down.weight, ...to_q.lora.down.weight,
                      text_encoder...mlp.fc1.lora_linear_layer.down.weight
    ComfyUI           diffusion_model.input_blocks.4.1...lora_down.weight (sgm names with dots)

Reading (`load_lora`) only sorts the file's keys into per-layer `LoraModule`s. Matching them to our
modules happens in `apply`, against the real models: every Linear / Conv2d gets its sgm name, the diffusers
name (through `sdxl.weights.diffusers_layout`, the one sgm <-> diffusers table of the project) and the
HF text names, each with dots and with underscores. Whatever does not match (unknown layer, wrong shape,
LoHa / LoKr / DoRA, a part the model lacks) is listed in a `LoraReport`, key by key, with the reason.

`apply` adds the update with forward hooks: the stored weights are never touched, a weight of 0 registers
nothing (bit-identical outputs), several LoRAs on one layer add up. `LoraPatch.fuse()` bakes the updates
into the weights for speed and keeps a copy of the originals, so `unfuse()` restores them bit for bit.

Training: `inject_lora` hangs trainable `LoRALayer`s (zero-initialised `lora_up`, so the model starts
unchanged) on the kohya default targets, and `save_kohya` writes them under kohya names with the `ss_*`
metadata A1111 / ComfyUI / kohya tools read.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdxl.models.config import UNetConfig
from sdxl.weights.diffusers_layout import unet_sgm_to_diffusers
from sdxl.weights.io import open_tensors, save_safetensors

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


# ---------------------------------------------------------------------------------------------------------
# Matching file layers to our modules
# ---------------------------------------------------------------------------------------------------------


def lora_models(unet: nn.Module | None = None, text: nn.Module | None = None) -> dict[str, nn.Module | None]:
    """The `models` mapping `apply` takes, from our UNet and `TextEncoders` (clip_l -> te1, clip_g -> te2)."""
    return {
        "unet": unet,
        "te1": getattr(text, "clip_l", None) if text is not None else None,
        "te2": getattr(text, "clip_g", None) if text is not None else None,
    }


_AMBIGUOUS = "\0ambiguous"


def _layer_names(part: str, model: nn.Module) -> dict[str, list[str]]:
    """Our name of every Linear / Conv2d -> all the names a LoRA file may use for it (with dots)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    aliases = {n: [n] for n in names}
    cfg = getattr(model, "cfg", None)
    if part == "unet" and isinstance(cfg, UNetConfig):
        for n in names:
            try:  # the project's one sgm -> diffusers table, applied to a single name
                (converted,) = unet_sgm_to_diffusers({f"{n}.weight": None}, cfg)
            except KeyError:
                continue
            aliases[n].append(converted[: -len(".weight")])
    elif part != "unet":
        for n in names:  # HF keeps the tower under `text_model.` (CLIPTextModelWithProjection, kohya names)
            if not n.startswith("text_model.") and n != "text_projection":
                aliases[n].append("text_model." + n)
    return aliases


def _index(part: str, model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """(dotted alias -> our name, underscore alias -> our name); an underscore alias two layers share is
    marked ambiguous rather than guessed."""
    dotted: dict[str, str] = {}
    under: dict[str, str] = {}
    for ours, names in _layer_names(part, model).items():
        for alias in names:
            dotted[alias] = ours
            u = alias.replace(".", "_")
            under[u] = ours if under.get(u, ours) == ours else _AMBIGUOUS
    return dotted, under


@dataclass
class LoraReport:
    """What one LoRA did to the models: how many layers it patched, which file keys it could not use and why.

    Nothing is dropped silently: the caller logs `summary()` or raises when `unmatched_keys` is not empty.
    """

    name: str
    matched_modules: int = 0
    unmatched_keys: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # unmatched key -> why

    @property
    def ok(self) -> bool:
        return not self.unmatched_keys

    def _miss(self, keys: Iterable[str], reason: str) -> None:
        for k in keys:
            self.unmatched_keys.append(k)
            self.reasons[k] = reason

    def summary(self, max_keys: int = 10) -> str:
        n = len(self.unmatched_keys)
        head = f"LoRA {self.name!r}: {self.matched_modules} layers matched, {n} keys unmatched"
        lines = [head] + [f"  {k}: {self.reasons[k]}" for k in self.unmatched_keys[:max_keys]]
        if len(self.unmatched_keys) > max_keys:
            lines.append(f"  ... and {len(self.unmatched_keys) - max_keys} more")
        return "\n".join(lines)


@dataclass
class MatchedLayer:
    """A file layer tied to one of our modules, with its tensors reshaped for that module."""

    part: str
    module_name: str  # our name (sgm for the UNet, HF-without-text_model for the towers)
    module: nn.Module
    lora: LoraModule
    down: Tensor
    up: Tensor
    mid: Tensor | None


def _fit_shapes(lm: LoraModule, module: nn.Module) -> tuple[Tensor, Tensor, Tensor | None] | str:
    """(down, up, mid) reshaped for `module`, or the reason they do not fit it."""
    down, up, mid = lm.down, lm.up, lm.mid
    got = f"down {tuple(down.shape)}, up {tuple(up.shape)}" + (
        f", mid {tuple(mid.shape)}" if mid is not None else ""
    )
    if isinstance(module, nn.Linear):
        if mid is not None:
            return f"a conv (Tucker) LoRA for a Linear layer ({got})"
        if down.ndim == 4 and down.shape[2:] == (1, 1):
            down = down.reshape(down.shape[:2])
        if up.ndim == 4 and up.shape[2:] == (1, 1):
            up = up.reshape(up.shape[:2])
        if (
            down.ndim == 2
            and up.ndim == 2
            and down.shape[1] == module.in_features
            and up.shape[0] == module.out_features
        ):
            return down, up, None
        return f"shape mismatch: {got} for Linear({module.in_features}, {module.out_features})"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            return "grouped or non-zero-padded convolutions are not supported"
        kernel = tuple(module.kernel_size)
        if down.ndim == 2:
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        want = f"Conv2d({module.in_channels}, {module.out_channels}, kernel {kernel})"
        if (
            up.shape[0] != module.out_channels
            or up.shape[2:] != (1, 1)
            or down.shape[1] != module.in_channels
        ):
            return f"shape mismatch: {got} for {want}"
        if mid is None:
            if tuple(down.shape[2:]) != kernel:
                return f"shape mismatch: {got} for {want}"
        elif down.shape[2:] != (1, 1) or tuple(mid.shape[2:]) != kernel:
            return f"shape mismatch: {got} for {want}"
        return down, up, mid
    return f"layer is a {type(module).__name__}, not a Linear or Conv2d"


def match_lora(lora: Lora, models: Mapping[str, nn.Module | None]) -> tuple[list[MatchedLayer], LoraReport]:
    """Tie each layer of `lora` to one of our modules; everything else goes into the report with a reason."""
    report = LoraReport(lora.name)
    for k, why in lora.problems.items():
        report._miss([k], why)
    indexes: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    matched: list[MatchedLayer] = []
    taken: dict[tuple[str, str], LoraModule] = {}
    for lm in lora.modules:
        model = models.get(lm.part)
        if model is None:
            report._miss(lm.keys, f"no {lm.part} model to apply it to")
            continue
        if lm.part not in indexes:
            indexes[lm.part] = _index(lm.part, model)
        dotted, under = indexes[lm.part]
        ours = (dotted if lm.style == "dotted" else under).get(lm.name)
        if ours is None:
            report._miss(lm.keys, f"no layer named {lm.name!r} in the {lm.part}")
            continue
        if ours == _AMBIGUOUS:
            report._miss(lm.keys, f"{lm.name!r} could name more than one layer of the {lm.part}")
            continue
        if (lm.part, ours) in taken:
            report._miss(
                lm.keys, f"targets {ours!r} again (already set by {taken[(lm.part, ours)].keys[0]!r})"
            )
            continue
        module = model.get_submodule(ours)
        fitted = _fit_shapes(lm, module)
        if isinstance(fitted, str):
            report._miss(lm.keys, fitted)
            continue
        taken[(lm.part, ours)] = lm
        matched.append(MatchedLayer(lm.part, ours, module, lm, *fitted))
    report.matched_modules = len(matched)
    return matched, report


# ---------------------------------------------------------------------------------------------------------
# Applying: forward hooks, fuse / unfuse
# ---------------------------------------------------------------------------------------------------------


class _Delta:
    """One LoRA's update of one layer, ready to run: tensors on the layer's device and dtype, and the factor
    multiplier * scale."""

    def __init__(self, module: nn.Module, down: Tensor, up: Tensor, mid: Tensor | None, factor: float):
        w = module.weight
        self.module = module
        self.down = down.to(device=w.device, dtype=w.dtype)
        self.up = up.to(device=w.device, dtype=w.dtype)
        self.mid = None if mid is None else mid.to(device=w.device, dtype=w.dtype)
        self.factor = factor

    def __call__(self, x: Tensor) -> Tensor:
        """factor * up(mid(down(x))) for the layer's input x (the output of the low-rank branch)."""
        x = x.to(self.down.dtype)
        m = self.module
        if isinstance(m, nn.Linear):
            h = F.linear(F.linear(x, self.down), self.up)
        elif self.mid is None:  # kohya LoCon: k x k conv down with the layer's stride/padding, 1x1 up
            h = F.conv2d(x, self.down, None, m.stride, m.padding, m.dilation)
            h = F.conv2d(h, self.up)
        else:  # LyCORIS Tucker: 1x1 down, k x k mid (stride/padding), 1x1 up
            h = F.conv2d(x, self.down)
            h = F.conv2d(h, self.mid, None, m.stride, m.padding, m.dilation)
            h = F.conv2d(h, self.up)
        return h * self.factor

    def weight(self) -> Tensor:
        """factor * (up @ down) as a tensor shaped like the layer's weight, in float32."""
        down, up = self.down.float(), self.up.float()
        if down.ndim == 2:
            w = up @ down
        elif self.mid is None:
            w = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
        else:
            w = torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], self.mid.float(), down[:, :, 0, 0])
        return w * self.factor


def _make_hook(deltas: list[_Delta]):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        for d in deltas:
            output = output + d(x).to(output.dtype)
        return output

    return hook


def _qkv_parents(model_root: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The attention modules (those with a `fused_qkv` switch) whose to_q / to_k / to_v is in `names`.

    With `fused_qkv` on, our UNet's self-attention runs q/k/v as one F.linear on the concatenated weights,
    which would skip a hook on the three layers; while hooks are attached the switch is held off.
    """
    found: list[nn.Module] = []
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in ("to_q", "to_k", "to_v"):
            continue
        parent = model_root.get_submodule(parent_name)
        if hasattr(parent, "fused_qkv") and all(parent is not f for f in found):
            found.append(parent)
    return found


def _hold_unfused(modules: Iterable[nn.Module]) -> None:
    """Turn `fused_qkv` off, counting holders: stacked patches restore it only when the last one goes."""
    for m in modules:
        holds = getattr(m, "_lora_unfused_holds", 0)
        if holds == 0:
            m._lora_fused_before = m.fused_qkv
            m.fused_qkv = False
        m._lora_unfused_holds = holds + 1


def _release_unfused(modules: Iterable[nn.Module]) -> None:
    for m in modules:
        holds = getattr(m, "_lora_unfused_holds", 0) - 1
        m._lora_unfused_holds = max(holds, 0)
        if holds == 0:
            m.fused_qkv = m._lora_fused_before


@dataclass
class LoraSet:
    """Several LoRAs with their multipliers. `text_weight` (A1111's `<lora:name:te:unet>`, ComfyUI's
    strength_clip) overrides `weight` for the text towers; None = same as `weight`."""

    items: list[tuple[Lora, float, float | None]] = field(default_factory=list)

    def add(
        self, lora: Lora | str | os.PathLike, weight: float = 1.0, text_weight: float | None = None
    ) -> LoraSet:
        if not isinstance(lora, Lora):
            lora = load_lora(lora)
        self.items.append((lora, float(weight), None if text_weight is None else float(text_weight)))
        return self

    def __iter__(self) -> Iterator[tuple[Lora, float, float | None]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class LoraPatch:
    """LoRAs applied to models. Starts hooked (weights untouched); `fuse()` bakes the updates into the
    weights, `unfuse()` restores the exact original weights and goes back to hooks, `remove()` undoes it all.

    Use as a context manager to remove on exit. Several patches may be stacked; unfuse them in reverse order.
    """

    def __init__(
        self,
        plan: list[tuple[nn.Module, list[_Delta]]],
        reports: list[LoraReport],
        qkv_modules: list[nn.Module],
    ):
        self.reports = reports
        self._plan = plan
        self._handles: list = []
        self._originals: list[tuple[nn.Module, Tensor]] = []
        self._qkv = qkv_modules
        self.state = "removed"
        self._hook()

    @property
    def matched_modules(self) -> int:
        return sum(r.matched_modules for r in self.reports)

    @property
    def unmatched_keys(self) -> list[str]:
        return [k for r in self.reports for k in r.unmatched_keys]

    def _hook(self) -> None:
        _hold_unfused(self._qkv)
        self._handles = [m.register_forward_hook(_make_hook(deltas)) for m, deltas in self._plan]
        self.state = "hooked"

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        _release_unfused(self._qkv)

    @torch.no_grad()
    def fuse(self, backup_device: str | torch.device | None = "cpu") -> LoraPatch:
        """W <- W + sum_i factor_i * delta_i (computed in float32, stored in W's dtype). The original weights
        are copied to `backup_device` (None = where they are) so that `unfuse` is bit-exact."""
        if self.state == "fused":
            return self
        if self.state != "hooked":
            raise LoraError("this LoRA patch was removed")
        self._unhook()
        self._originals = []
        for module, deltas in self._plan:
            w = module.weight
            self._originals.append((module, w.detach().to(backup_device or w.device, copy=True)))
            total = sum(d.weight() for d in deltas)
            w.copy_((w.float() + total).to(w.dtype))
        self.state = "fused"
        return self

    @torch.no_grad()
    def unfuse(self) -> LoraPatch:
        """Put the saved original weights back (bit for bit) and apply the LoRAs through hooks again."""
        if self.state != "fused":
            return self
        for module, original in self._originals:
            module.weight.copy_(original)
        self._originals = []
        self._hook()
        return self

    def remove(self) -> None:
        """Leave the models exactly as before `apply`."""
        if self.state == "fused":
            self.unfuse()
        if self.state == "hooked":
            self._unhook()
        self.state = "removed"

    def __enter__(self) -> LoraPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _as_items(loras) -> list[tuple[Lora, float, float | None]]:
    """A LoraSet, a Lora or path, or (lora or path, weight[, text_weight]) tuples -> [(Lora, w, text_w)]."""
    if isinstance(loras, LoraSet):
        return list(loras)
    if isinstance(loras, (Lora, str, os.PathLike)):
        loras = [loras]
    items = []
    for item in loras:
        if not isinstance(item, tuple):
            item = (item, 1.0)
        lora = item[0] if isinstance(item[0], Lora) else load_lora(item[0])
        text_weight = item[2] if len(item) > 2 and item[2] is not None else None
        items.append((lora, float(item[1]), None if text_weight is None else float(text_weight)))
    return items


def apply(
    models: Mapping[str, nn.Module | None], loras: LoraSet | Lora | Iterable, strict: bool = False
) -> LoraPatch:
    """Apply LoRAs to `models` ({"unet": UNet, "te1": CLIP-L tower, "te2": bigG tower}, see `lora_models`).

    Each patched layer computes W x + sum_i w_i * scale_i * up_i(down_i(x)) through a forward hook; the stored
    weights are not modified. A LoRA with multiplier 0 for a part registers nothing there. `loras` is a
    `LoraSet`, one `Lora` (or path), or (lora, weight[, text_weight]) tuples. Returns a `LoraPatch` whose
    `reports` list every unusable key; `strict=True` raises `LoraError` instead, before touching anything.
    """
    items = _as_items(loras)
    matches = [match_lora(lora, models) for lora, _, _ in items]
    reports = [report for _, report in matches]
    if strict and any(not r.ok for r in reports):
        raise LoraError("\n".join(r.summary() for r in reports if not r.ok))
    per_module: dict[int, tuple[nn.Module, list[_Delta]]] = {}
    qkv_names: dict[str, list[str]] = {}
    for (_, weight, text_weight), (matched, _) in zip(items, matches):
        for ml in matched:
            factor = weight if ml.part == "unet" or text_weight is None else text_weight
            if factor == 0.0:
                continue  # exactly no change
            entry = per_module.setdefault(id(ml.module), (ml.module, []))
            entry[1].append(_Delta(ml.module, ml.down, ml.up, ml.mid, factor * ml.lora.scale))
            qkv_names.setdefault(ml.part, []).append(ml.module_name)
    qkv = [m for part, names in qkv_names.items() for m in _qkv_parents(models[part], names)]
    return LoraPatch(list(per_module.values()), reports, qkv)


# ---------------------------------------------------------------------------------------------------------
# Training: inject trainable LoRA layers, save / load them in kohya format
# ---------------------------------------------------------------------------------------------------------


class LoRALayer(nn.Module):
    """A trainable low-rank branch hung on one Linear / Conv2d with a forward hook (kohya `LoRAModule` maths):

        out = layer(x) + multiplier * (alpha / rank) * lora_up(dropout(lora_down(x)))

    lora_down: Linear(in, rank) or Conv2d(in, rank, the layer's kernel / stride / padding); lora_up:
    Linear(rank, out) or a 1x1 Conv2d, zero-initialised so that training starts from the unchanged model. The
    layer itself is not a child of the target, so the base model's state dict keeps its names; collect the
    layers (the dict `inject_lora` returns) for the optimiser, `.to()` and saving.
    """

    def __init__(
        self,
        target: nn.Module,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        device = target.weight.device
        if isinstance(target, nn.Linear):
            self.lora_down = nn.Linear(target.in_features, rank, bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Linear(rank, target.out_features, bias=False, device=device, dtype=dtype)
        elif isinstance(target, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                target.in_channels,
                rank,
                target.kernel_size,
                target.stride,
                target.padding,
                target.dilation,
                bias=False,
                device=device,
                dtype=dtype,
            )
            self.lora_up = nn.Conv2d(rank, target.out_channels, 1, bias=False, device=device, dtype=dtype)
        else:
            raise LoraError(f"LoRA needs a Linear or Conv2d layer, got {type(target).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(rank) if not alpha else float(alpha)  # kohya: alpha 0 / None = rank (scale 1)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = dropout
        self.multiplier = 1.0
        self._target = [target]  # a list, so that the target is not registered as a submodule
        self._held: list[nn.Module] = []  # attention modules kept off their fused-qkv path (see inject_lora)
        self._handle = target.register_forward_hook(self._hook)

    def forward(self, x: Tensor) -> Tensor:
        """The branch's output for the target's input x."""
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout)
        return self.lora_up(h) * (self.multiplier * self.scale)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + self(args[0]).to(output.dtype)

    def remove(self) -> None:
        """Detach from the target layer (it computes its plain output again)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            _release_unfused(self._held)
            self._held = []

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """multiplier * scale * up @ down, shaped like the target's weight (float32)."""
        down, up = self.lora_down.weight.float(), self.lora_up.weight.float()
        if down.ndim == 2:
            w = up @ down
        else:
            w = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
        return w * (self.multiplier * self.scale)


_TARGET_KINDS = ("attn", "ff", "mlp", "proj")


def _lora_targets(root: nn.Module, targets: Iterable[str], conv: bool) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (layer, is_conv_kind) for the kohya targets of our UNet / text tower.

    UNet: inside each SpatialTransformer, attn1/attn2 q/k/v/out ("attn"), ff.net.0.proj / ff.net.2 ("ff"),
    proj_in / proj_out ("proj"); with conv=True also every layer of the ResBlocks, Downsamples and Upsamples
    (as kohya's conv_dim: the 3x3 convs get the conv rank, emb_layers / 1x1 skip the normal rank).
    Text: self_attn q/k/v/out_proj ("attn") and mlp fc1 / fc2 ("ff" or "mlp").
    """
    from sdxl.models.text import CLIPMLP, CLIPAttention
    from sdxl.models.unet import Downsample, ResBlock, SpatialTransformer, Upsample

    targets = set(targets)
    unknown = targets - set(_TARGET_KINDS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {_TARGET_KINDS}")
    want_ff = bool(targets & {"ff", "mlp"})
    found: dict[str, tuple[nn.Module, bool]] = {}
    for cname, container in root.named_modules():
        prefix = cname + "." if cname else ""
        if isinstance(container, SpatialTransformer):
            for child, layer in container.named_modules():
                if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                    continue
                leaf = child.split(".")
                if child in ("proj_in", "proj_out"):
                    kind = "proj"
                elif "attn1" in leaf or "attn2" in leaf:
                    kind = "attn"
                elif "ff" in leaf:
                    kind = "ff"
                else:
                    continue
                if kind in targets or (kind == "ff" and want_ff):
                    found[prefix + child] = (layer, False)
        elif isinstance(container, (CLIPAttention, CLIPMLP)):
            kind = "attn" if isinstance(container, CLIPAttention) else "ff"
            if kind in targets or (kind == "ff" and want_ff):
                for child, layer in container.named_modules():
                    if isinstance(layer, nn.Linear):
                        found[prefix + child] = (layer, False)
        elif conv and isinstance(container, (ResBlock, Downsample, Upsample)):
            for child, layer in container.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    is_kxk = isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)
                    found[prefix + child] = (layer, is_kxk)
    return found


def inject_lora(
    module: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Iterable[str] = ("attn", "ff", "proj"),
    conv: bool = False,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, LoRALayer]:
    """Hang trainable `LoRALayer`s on the kohya default targets of our UNet or of ONE text tower.

    Returns {layer name relative to `module`: LoRALayer}; those names are what `save_kohya` writes, so call it
    on the UNet itself and on each `CLIPTextTower` (not on a wrapper). The base weights are not frozen here.
    Attention modules that fuse q/k/v into one matmul are switched to separate projections, because that
    path would bypass the hooks. conv=True adds the ResBlock / Down- / Upsample layers (LoCon); their k x k
    convs use conv_rank / conv_alpha (default: rank / alpha).
    """
    layers: dict[str, LoRALayer] = {}
    for name, (layer, is_kxk) in _lora_targets(module, targets, conv).items():
        r = (conv_rank or rank) if is_kxk else rank
        a = (alpha if conv_alpha is None else conv_alpha) if is_kxk else alpha
        lora_layer = LoRALayer(layer, r, a, dropout, dtype)
        lora_layer._held = _qkv_parents(module, [name])
        _hold_unfused(lora_layer._held)
        layers[name] = lora_layer
    return layers


def lora_parameters(*layer_dicts: Mapping[str, LoRALayer] | None) -> list[nn.Parameter]:
    """All trainable tensors of the given layer dicts (for the optimiser)."""
    return [p for d in layer_dicts if d for layer in d.values() for p in layer.parameters()]


def kohya_name(part: str, name: str) -> str:
    """Our layer name -> kohya's: lora_unet_<sgm name>, lora_te1_text_model_<tower name>, "." -> "_"."""
    if part == "unet":
        full, prefix = name, "lora_unet"
    elif part in ("te1", "te2"):
        full = name if name.startswith("text_model.") or name == "text_projection" else "text_model." + name
        prefix = "lora_" + part
    else:
        raise ValueError(f"unknown LoRA part {part!r}")
    return prefix + "_" + full.replace(".", "_")


def kohya_state_dict(
    layers_unet: Mapping[str, LoRALayer] | None = None,
    layers_te1: Mapping[str, LoRALayer] | None = None,
    layers_te2: Mapping[str, LoRALayer] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The kohya tensors: <name>.lora_down.weight / .lora_up.weight (in `dtype` if given) and <name>.alpha."""
    out: dict[str, Tensor] = {}
    for part, layers in (("unet", layers_unet), ("te1", layers_te1), ("te2", layers_te2)):
        for name, layer in (layers or {}).items():
            k = kohya_name(part, name)
            down, up = layer.lora_down.weight.detach(), layer.lora_up.weight.detach()
            out[f"{k}.lora_down.weight"] = down.to(dtype) if dtype else down
            out[f"{k}.lora_up.weight"] = up.to(dtype) if dtype else up
            out[f"{k}.alpha"] = layer.alpha.detach().float().cpu()
    return out


def addnet_hash(tensors: Mapping[str, Tensor]) -> str:
    """sha256 of the data section `save_safetensors` writes for `tensors` (keys sorted, raw bytes): the
    "addnet" model hash A1111 and kohya compute over everything after a safetensors header."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lora_file_hash(path: str | os.PathLike) -> str:
    """A1111's LoRA hash of a .safetensors file: sha256 of everything after the header (the "addnet" hash,
    independent of the metadata). PNG infotext's `Lora hashes` shows its first 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_kohya(
    layers_unet: Mapping[str, LoRALayer] | None,
    layers_te1: Mapping[str, LoRALayer] | None,
    layers_te2: Mapping[str, LoRALayer] | None,
    path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the layers as a kohya LoRA .safetensors (atomic), with the `ss_*` and `modelspec.*` metadata.

    `metadata` entries are added last (values turned into strings) and override the defaults.
    """
    tensors = kohya_state_dict(layers_unet, layers_te1, layers_te2, dtype)
    if not tensors:
        raise LoraError("no LoRA layers to save")
    all_layers = [lay for d in (layers_unet, layers_te1, layers_te2) if d for lay in d.values()]
    is_kxk = [
        isinstance(lay.lora_down, nn.Conv2d) and tuple(lay.lora_down.kernel_size) != (1, 1)
        for lay in all_layers
    ]
    linear = [lay for lay, k in zip(all_layers, is_kxk) if not k]
    kxk = [lay for lay, k in zip(all_layers, is_kxk) if k]
    main = linear or kxk
    rank = Counter(lay.rank for lay in main).most_common(1)[0][0]
    alpha = Counter(float(lay.alpha) for lay in main).most_common(1)[0][0]
    path = Path(path)
    meta: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_network_train_unet_only": str(not (layers_te1 or layers_te2)),
        "ss_network_train_text_encoder_only": str(not layers_unet),
        "ss_output_name": path.stem,
        "sshs_model_hash": addnet_hash(tensors),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": path.stem,
        "modelspec.resolution": "1024x1024",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    dropouts = {lay.dropout for lay in all_layers}
    if dropouts != {0.0}:
        meta["ss_network_dropout"] = str(max(dropouts))
    if kxk:
        conv_rank = Counter(lay.rank for lay in kxk).most_common(1)[0][0]
        conv_alpha = Counter(float(lay.alpha) for lay in kxk).most_common(1)[0][0]
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)})
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return save_safetensors(tensors, path, meta)


@torch.no_grad()
def load_lora_layers(
    source: str | os.PathLike | Mapping[str, Tensor],
    layers_unet: Mapping[str, LoRALayer] | None = None,
    layers_te1: Mapping[str, LoRALayer] | None = None,
    layers_te2: Mapping[str, LoRALayer] | None = None,
) -> list[str]:
    """Load a kohya file (or tensors) such as `save_kohya` writes into injected layers, to resume training.

    Returns the kohya names of the layers the source has no tensors for; raises `LoraError` on a shape
    mismatch.
    """
    tensors = source if isinstance(source, Mapping) else open_tensors(source)
    missing = []
    for part, layers in (("unet", layers_unet), ("te1", layers_te1), ("te2", layers_te2)):
        for name, layer in (layers or {}).items():
            k = kohya_name(part, name)
            if f"{k}.lora_down.weight" not in tensors or f"{k}.lora_up.weight" not in tensors:
                missing.append(k)
                continue
            for sub, target in (("lora_down", layer.lora_down.weight), ("lora_up", layer.lora_up.weight)):
                t = tensors[f"{k}.{sub}.weight"]
                if tuple(t.shape) != tuple(target.shape):
                    raise LoraError(
                        f"{k}.{sub}.weight has shape {tuple(t.shape)}, the layer {tuple(target.shape)}"
                    )
                target.copy_(t)
            if f"{k}.alpha" in tensors:
                alpha = float(tensors[f"{k}.alpha"].float().reshape(-1)[0]) or float(layer.rank)
                layer.alpha.fill_(alpha)
                layer.scale = alpha / layer.rank
    return missing


__all__ = [
    "Lora",
    "LoraError",
    "LoraModule",
    "LoraPatch",
    "LoraReport",
    "LoraSet",
    "LoRALayer",
    "MatchedLayer",
    "apply",
    "inject_lora",
    "kohya_name",
    "kohya_state_dict",
    "addnet_hash",
    "load_lora",
    "load_lora_layers",
    "lora_file_hash",
    "lora_models",
    "lora_parameters",
    "match_lora",
    "save_kohya",
]
