"""Applying LoRAs to our models: match each file layer to a module (sgm, diffusers and HF text names, with
dots or underscores), then add the update with forward hooks (`apply`), or bake it in (`LoraPatch.fuse`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models.config import UNetConfig
from ..diffusers_layout import unet_sgm_to_diffusers
from .read import Lora, LoraError, LoraModule, load_lora

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
    down: Tensor | None
    up: Tensor | None
    mid: Tensor | None
    dense: Tensor | None = None  # LoHa / LoKr / DoRA: scale * dW shaped like the weight, float32


def _fit_dense(lm: LoraModule, module: nn.Module) -> Tensor | str:
    """scale * dW of a LoHa / LoKr layer (or of a LoRA carrying DoRA) shaped like `module.weight`, or the
    reason it does not fit. A conv update stored flat ([out, in * kh * kw]) is reshaped; a Linear accepts a
    [out, in, 1, 1] update."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"layer is a {type(module).__name__}, not a Linear or Conv2d"
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return "grouped or non-zero-padded convolutions are not supported"
    if lm.kind == "lora":
        fitted = _fit_shapes(lm, module)
        if isinstance(fitted, str):
            return fitted
        lm = LoraModule(lm.part, lm.name, lm.style, *fitted, lm.alpha, lm.scale, lm.keys)
    dw = lm.dense()
    shape = tuple(module.weight.shape)
    fits = dw.shape[:2] == shape[:2] and (dw.ndim == 2 or tuple(dw.shape[2:]) == shape[2:])
    if dw.ndim == 2 and len(shape) == 4:
        fits = dw.shape[0] == shape[0] and dw.shape[1] == math.prod(shape[1:])
    if dw.ndim == 4 and len(shape) == 2:
        fits = dw.shape[2:] == (1, 1) and dw.shape[:2] == shape
    if not fits:
        return f"shape mismatch: the {lm.kind} update is {tuple(dw.shape)}, the layer's weight {shape}"
    return dw.reshape(shape) * lm.scale


def _dora_delta(lm: LoraModule, weight: Tensor, update: Tensor, multiplier: float) -> Tensor:
    """multiplier * (m * (W + dW) / ||W + dW|| - W), float32: the DoRA weight as a change of W.

    The norm is per output channel over the input dimension(s) for PEFT's `lora_magnitude_vector` (any
    shape with `out` elements) and for a kohya / LyCORIS `dora_scale` shaped [out, 1, ...]; per input
    channel over the output dimension for a `dora_scale` shaped [1, in, ...] (older LyCORIS, A1111). LyCORIS
    adds float32 eps to the norm, PEFT does not; each file gets its own trainer's. The multiplier blends W and
    the DoRA weight linearly (ComfyUI's strength), so 0 is no change; at 1 it is the trainer's merged weight.
    """
    w = weight.detach().float()
    merged = w + update
    out, inn, rest = w.shape[0], w.shape[1], [1] * (w.ndim - 2)
    if _dora_axis(lm, tuple(w.shape)) == "out":
        norm = merged.flatten(1).norm(dim=1).reshape(out, 1, *rest)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, inn, *rest)
    if not _is_peft_dora(lm):
        norm = norm + torch.finfo(torch.float32).eps
    return multiplier * (lm.dora.float().reshape(norm.shape) * merged / norm - w)


def _is_peft_dora(lm: LoraModule) -> bool:
    return lm.dora_key.endswith(("lora_magnitude_vector", "lora_magnitude_vector.weight"))


def _dora_axis(lm: LoraModule, shape: tuple[int, ...]) -> str | None:
    """"out" (norm per output channel), "in" (per input channel) or None when the magnitude fits neither."""
    m = lm.dora
    if m.numel() == shape[0] and (_is_peft_dora(lm) or m.shape[0] == shape[0]):
        return "out"
    if not _is_peft_dora(lm) and m.numel() == shape[1] and m.shape[0] == 1:
        return "in"
    return None


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
        if lm.kind != "lora" or lm.dora is not None:
            dense = _fit_dense(lm, module)
            if isinstance(dense, str):
                report._miss(lm.keys, dense)
                continue
            axis = _dora_axis(lm, tuple(module.weight.shape)) if lm.dora is not None else "out"
            if axis is None:  # the DoRA weight itself is built in `apply`, from the weight of that moment
                got, shape = tuple(lm.dora.shape), tuple(module.weight.shape)
                report._miss(lm.keys, f"DoRA magnitude {got} fits no axis of the weight {shape}")
                continue
            taken[(lm.part, ours)] = lm
            matched.append(MatchedLayer(lm.part, ours, module, lm, None, None, None, dense))
            continue
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


class _DenseDelta:
    """A whole-weight update (LoHa, LoKr, DoRA): the layer run again with `factor * delta` as its weight."""

    def __init__(self, module: nn.Module, delta: Tensor, factor: float):
        w = module.weight
        self.module = module
        self.delta = delta.to(device=w.device, dtype=w.dtype)
        self.full = delta if w.dtype == torch.float32 else None  # exact float32 copy for `fuse`
        self.factor = factor

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.delta.dtype)
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(x, self.delta) * self.factor
        return F.conv2d(x, self.delta, None, m.stride, m.padding, m.dilation) * self.factor

    def weight(self) -> Tensor:
        full = self.full if self.full is not None else self.delta
        return full.float() * self.factor


def _make_hook(deltas: list[_Delta]):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        for d in deltas:
            output = output + d(x).to(output.dtype)
        return output

    return hook


def qkv_parents(model_root: nn.Module, names: Iterable[str]) -> list[nn.Module]:
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


def hold_unfused(modules: Iterable[nn.Module]) -> None:
    """Turn `fused_qkv` off, counting holders: stacked patches restore it only when the last one goes."""
    for m in modules:
        holds = getattr(m, "_lora_unfused_holds", 0)
        if holds == 0:
            m._lora_fused_before = m.fused_qkv
            m.fused_qkv = False
        m._lora_unfused_holds = holds + 1


def release_unfused(modules: Iterable[nn.Module]) -> None:
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
        hold_unfused(self._qkv)
        self._handles = [m.register_forward_hook(_make_hook(deltas)) for m, deltas in self._plan]
        self.state = "hooked"

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        release_unfused(self._qkv)

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
            if ml.lora.dora is not None:
                delta = _dora_delta(ml.lora, ml.module.weight, ml.dense, factor)
                entry[1].append(_DenseDelta(ml.module, delta, 1.0))
            elif ml.dense is not None:
                entry[1].append(_DenseDelta(ml.module, ml.dense, factor))
            else:
                entry[1].append(_Delta(ml.module, ml.down, ml.up, ml.mid, factor * ml.lora.scale))
            qkv_names.setdefault(ml.part, []).append(ml.module_name)
    qkv = [m for part, names in qkv_names.items() for m in qkv_parents(models[part], names)]
    return LoraPatch(list(per_module.values()), reports, qkv)


