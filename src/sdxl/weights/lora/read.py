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

import torch
from torch import Tensor

from ...errors import CheckpointError
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
    ("lycoris_", "unet", "underscore"),  # LyCORIS' own wrapper (create_lycoris) on a diffusers UNet
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

# LyCORIS factor suffixes -> role; their network type follows from the role's prefix (hada_, lokr_)
_LYCORIS_ROLES: tuple[tuple[str, str], ...] = tuple(
    (s, s)
    for s in (
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    )
) + (
    ("dora_scale", "dora_scale"),  # kohya / LyCORIS DoRA magnitude, [out, 1, ...] or [1, in, ...]
    ("lora_magnitude_vector.weight", "magnitude"),  # PEFT / diffusers DoRA magnitude, [out]
    ("lora_magnitude_vector", "magnitude"),
)
_ROLE_SUFFIXES = _ROLE_SUFFIXES + _LYCORIS_ROLES

# tensor suffixes of network types we recognise but do not apply; the whole layer is reported with the name
_UNSUPPORTED: dict[str, str] = {
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

    kind "lora": down [rank, in] or [rank, in, kh, kw]; up [out, rank] or [out, rank, 1, 1]; mid (LyCORIS
    Tucker conv) [rank, rank, kh, kw] between a 1x1 down and a 1x1 up, else None.
    kind "loha" / "lokr": the LyCORIS factors in `factors` (role -> tensor, e.g. "hada_w1_a"); down / up are
    None and `dense()` rebuilds the update. scale = alpha / rank (alpha / sqrt(rank) for PEFT's rsLoRA; 1 for
    a LoKr whose factors are both stored whole). `dora`: the DoRA magnitude (kohya `dora_scale` or PEFT
    `lora_magnitude_vector`, told apart by `dora_key`), else None.
    """

    part: str  # "unet", "te1", "te2"
    name: str  # the layer as the file names it, no prefix ("input_blocks_4_1_..._to_q", "down_blocks.1...")
    style: str  # "underscore" or "dotted"
    down: Tensor | None
    up: Tensor | None
    mid: Tensor | None
    alpha: float
    scale: float
    keys: tuple[str, ...]  # the file keys it was built from
    kind: str = "lora"
    factors: dict[str, Tensor] = field(default_factory=dict)
    dora: Tensor | None = None
    dora_key: str = ""  # the file key of `dora` ("...dora_scale" or "...lora_magnitude_vector")

    @property
    def rank(self) -> int:
        if self.kind == "lora":
            return self.down.shape[0]
        f = self.factors
        for role in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if role in f:
                return f[role].shape[0]
        return 1

    def dense(self) -> Tensor:
        """The unscaled update as one float32 tensor (dW; scale and multiplier not applied): 2-D [out, in] or
        4-D [out, in, kh, kw], or, for LoHa / LoKr conv factors stored flat, [out, in * kh * kw]."""
        return _rebuild(self.kind, self.factors, self.down, self.up, self.mid)


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS' Tucker rebuild: t [r1, r2, kh, kw], wa [r1, out], wb [r2, in] -> [out, in, kh, kw]."""
    return torch.einsum("ijkl,ip,jr->prkl", t, wa, wb)


def _rebuild(kind: str, f: Mapping[str, Tensor], down, up, mid) -> Tensor:
    """The update dW from its factors (already checked by `_check_factors`), in float32."""
    if kind == "lora":
        d, u = down.float(), up.float()
        if mid is None:
            return u.flatten(1) @ d if d.ndim == 2 else torch.einsum("or,rihw->oihw", u.flatten(1), d)
        return torch.einsum("oa,abhw,bi->oihw", u.flatten(1), mid.float(), d.flatten(1))
    g = {role: t.float() for role, t in f.items()}
    if kind == "loha":
        if "hada_t1" in g:
            return _tucker(g["hada_t1"], g["hada_w1_a"], g["hada_w1_b"]) * _tucker(
                g["hada_t2"], g["hada_w2_a"], g["hada_w2_b"]
            )
        return (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
    elif "lokr_t2" in g:
        w2 = _tucker(g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
    else:
        w2 = g["lokr_w2_a"] @ g["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


# The factors each LyCORIS layout needs, and which factors must agree on which dimension:
# (key a, dim a, key b, dim b) pairs; checked before anything is built so that a bad file names the key.
_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, int, str, int], ...]]] = {
    "loha": (
        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
        (("hada_w1_a", 1, "hada_w1_b", 0), ("hada_w2_a", 1, "hada_w2_b", 0),
         ("hada_w1_a", 0, "hada_w2_a", 0), ("hada_w1_b", 1, "hada_w2_b", 1)),
    ),
    "loha_tucker": (
        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
        (("hada_t1", 0, "hada_w1_a", 0), ("hada_t1", 1, "hada_w1_b", 0), ("hada_t2", 0, "hada_w2_a", 0),
         ("hada_t2", 1, "hada_w2_b", 0), ("hada_w1_a", 1, "hada_w2_a", 1), ("hada_w1_b", 1, "hada_w2_b", 1),
         ("hada_t1", 2, "hada_t2", 2), ("hada_t1", 3, "hada_t2", 3)),
    ),
}


def _check_factors(kind: str, f: Mapping[str, tuple[str, Tensor]], where: str) -> None:
    """Raise a one-line CheckpointError naming the key when LyCORIS factors cannot form an update."""

    def bad(role: str, why: str) -> CheckpointError:
        key, t = f[role]
        return CheckpointError(f"{where}: {key}: {why} (shape {tuple(t.shape)})")

    def ndim(role: str, *allowed: int) -> None:
        if f[role][1].ndim not in allowed:
            raise bad(role, f"a {kind} factor must have {' or '.join(map(str, allowed))} dimensions")

    def agree(a: str, da: int, b: str, db: int) -> None:
        if f[a][1].shape[da] != f[b][1].shape[db]:
            raise bad(a, f"dimension {da} does not match dimension {db} of {f[b][0]} {tuple(f[b][1].shape)}")

    if kind == "loha":
        tucker = "hada_t1" in f or "hada_t2" in f
        need, pairs = _LAYOUTS["loha_tucker" if tucker else "loha"]
        missing = [r for r in need if r not in f]
        if missing:
            raise bad(next(iter(f)), f"incomplete LoHa layer: no {', '.join(missing)}")
        for r in need:
            ndim(r, 4 if r.startswith("hada_t") else 2)
        for p in pairs:
            agree(*p)
        return
    roles = set(f)
    for side in ("1", "2"):
        whole, a, b, t = f"lokr_w{side}", f"lokr_w{side}_a", f"lokr_w{side}_b", f"lokr_t{side}"
        if whole in roles:
            ndim(whole, 2, 4) if side == "2" else ndim(whole, 2)
            continue
        if a not in roles or b not in roles:
            raise bad(next(iter(f)), f"incomplete LoKr layer: no {whole} nor both {a} and {b}")
        ndim(a, 2)
        ndim(b, 2)
        if t in roles:
            if side == "1":
                raise bad(t, "a Tucker core on the first LoKr factor is not a LyCORIS layout")
            ndim(t, 4)
            agree(t, 0, a, 0)
            agree(t, 1, b, 0)
        else:
            agree(a, 1, b, 0)


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
        role_key = {role: k for k, (role, _) in entries.items()}
        dora_role = next((r for r in ("dora_scale", "magnitude") if r in by_role), None)
        dora = by_role[dora_role] if dora_role else None
        dora_key = role_key[dora_role] if dora_role else ""
        lyco = {r: (role_key[r], t) for r, t in by_role.items() if r.startswith(("hada_", "lokr_"))}
        families = {r[:4] for r in lyco} | ({"lora"} if {"down", "up", "mid"} & set(by_role) else set())
        if len(families) > 1:
            for k in keys:
                problems[k] = "one layer mixes LoRA, LoHa and LoKr tensors"
            continue
        if lyco:
            kind = "loha" if "hada" in families else "lokr"
            _check_factors(kind, lyco, name)
            factors = {r: t for r, (_, t) in lyco.items()}
            probe = LoraModule(part, layer, style, None, None, None, 0.0, 1.0, keys, kind, factors)
            rank = probe.rank
            decomposed = kind == "loha" or any(r in factors for r in ("lokr_w1_b", "lokr_w2_b"))
            alpha = float(by_role["alpha"].float().reshape(-1)[0]) if "alpha" in by_role else 0.0
            alpha = alpha or float(rank)  # no alpha / alpha 0: no scaling (LyCORIS, as kohya)
            scale = alpha / rank if decomposed else 1.0  # LyCORIS: whole LoKr factors are never scaled
            probe.alpha, probe.scale, probe.dora, probe.dora_key = alpha, scale, dora, dora_key
            modules.append(probe)
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
        modules.append(
            LoraModule(part, layer, style, down, up, mid, alpha, scale, keys, dora=dora, dora_key=dora_key)
        )
    return Lora(name, modules, problems, metadata)


