"""A request's control units -> the `ControlFn` hook of `sampling.guidance` (ControlNet and union models).

For each unit: its model file (a path, or a name in the control models folders; an A1111 model name's
trailing " [hash]" is dropped), loaded once per file version and kept on the SDXL object; its hint at the
pass's size (`control_maps.prepare_control_image`: preprocessor and resize mode); and how it applies, as
sd-webui-controlnet does (scripts/hook.py, scripts/controlnet.py):

- steps: a unit applies on sampler step i (0-based) of n when start <= i / n <= end. diffusers' rule
  (i / n >= start and (i + 1) / n <= end) leaves out the step whose span ends past `end`;
- weights: "balanced" scales every residual by the weight. "prompt" and "control" use soft injection: output
  k of [skip 0, ..., skip N-1, middle] is scaled by weight * 0.825 ** (12 - k) (on SDXL's 9 skips the middle
  gets 0.825 ** 3, as the extension's table cut to 10 entries gives). "control" also applies to the cond
  rows only (cfg injection; the uncond rows get nothing, and the ControlNet does not run on them);
  in the hires fix's second pass, units with a canny or mlsd preprocessor get soft injection too;
- several units sum; the ControlNet gets the 4 latent channels of an inpainting UNet's 9, and the text
  tokens of the context without the IP-Adapter image tokens the request appended.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .control_maps import prepare_control_image
from .errors import BadName, CheckpointError, NameNotFound, RequestError
from .files import resolve_in_folder
from .models.fast import fuse_qkv, is_fused
from .models.unet import UNetControl
from .request import ControlUnit, GenerationRequest
from .sampling.guidance import ControlFn
from .weights.control import load_control_model

CACHE_SIZE = 2  # control models kept loaded beyond a request's own (sd-webui-controlnet's default cache)
_A1111_HASH = re.compile(r"\s+\[[0-9a-fA-F]{6,}\]$")
CONTROL_SUFFIXES = (".safetensors", ".pth", ".bin")


def model_name(name: str) -> str:
    """A unit's model name without an A1111 model list's trailing " [hash]" ("canny [a1b2c3d4]")."""
    return _A1111_HASH.sub("", name.strip())


def resolve_control_model(name: str, dirs: list[Path], allow_paths: bool = True,
                          where: str = "controls[0].model") -> Path:
    """A control model name -> its file or diffusers folder: an existing path (when `allow_paths`), or a name
    (stem or relative path, with or without .safetensors) inside one of `dirs`. One-line RequestError."""
    name = model_name(name)
    p = Path(name).expanduser()
    if allow_paths and p.exists():
        return p
    roots = [Path(d).resolve() for d in dirs]
    if p.is_absolute() and p.exists() and any(p.resolve().is_relative_to(r) for r in roots):
        return p.resolve()  # a path the server already resolved inside its folder
    for d in dirs:
        try:
            return resolve_in_folder(Path(d), name, "control model", CONTROL_SUFFIXES)
        except NameNotFound:
            continue
        except BadName as e:
            raise RequestError(f"{where}: {e}") from None
    where_looked = f" in {', '.join(map(str, dirs))}" if dirs else " (no control models folder is set)"
    raise RequestError(f"{where}: {name!r} not found{where_looked}")


def _version(path: Path) -> int:
    """A file's (or diffusers folder's newest file's) modification time: a changed file loads again."""
    if path.is_dir():
        return max((f.stat().st_mtime_ns for f in path.iterdir() if f.is_file()), default=0)
    return path.stat().st_mtime_ns


def control_model(pipe, unit: ControlUnit, where: str = "controls[0]", keep: int = CACHE_SIZE
                  ) -> torch.nn.Module:
    """The unit's control model, loaded once per (path, version, UNet) and kept on `pipe` (in its dtype, in
    its offload storage when CPU offload is on, else on its device); the `keep` most recently used stay."""
    dirs = list(getattr(pipe, "control_dirs", []) or [])
    path = resolve_control_model(unit.model, dirs, getattr(pipe, "allow_lora_paths", True), f"{where}.model")
    cache: OrderedDict = pipe.__dict__.setdefault("_control_cache", OrderedDict())
    # the UNet's identity too: a Control-LoRA is built from the base UNet's weights, so another UNet (a
    # --unet override, a swapped model) must build it again
    key = (str(path.resolve()), _version(path), id(pipe.unet))
    if key in cache:
        cache.move_to_end(key)
    else:
        for old in [k for k in cache if k[0] == key[0]]:
            del cache[old]  # an older version of this file, or one built for another UNet
        device = pipe.offload_storage or pipe.device
        allow_pickle = bool(getattr(getattr(pipe, "ip_files", None), "allow_pickle", False))
        try:
            model = load_control_model(path, pipe.unet, dtype=pipe.dtype, device=device,
                                       allow_pickle=allow_pickle)
        except CheckpointError as e:
            raise RequestError(f"{where}.model: {e}") from None
        if pipe.unet is not None and is_fused(pipe.unet):
            fuse_qkv(model)  # the speed switch the UNet has (one q/k/v matmul; rounding only)
        cache[key] = model
        while len(cache) > max(keep, 1):
            cache.popitem(last=False)
    return cache[key]


def prepare_hint(unit: ControlUnit, width: int, height: int, where: str = "controls[0]") -> Tensor:
    """The unit's control image through its preprocessor and resize mode: [1, 3, height, width] in [0, 1]."""
    try:
        return prepare_control_image(unit.image, unit.preprocessor, unit.threshold_a, unit.threshold_b,
                                     unit.resize_mode, width, height)
    except RequestError as e:
        raise RequestError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _text_context(pipe, context: Tensor) -> Tensor:
    """The context without the IP-Adapter image tokens the running request appended at its end."""
    n = getattr(getattr(pipe, "ip_files", None), "image_tokens", 0) or 0
    return context[:, : context.shape[1] - n] if n else context


@dataclass
class ActiveUnit:
    """One unit as sampling uses it."""

    model: torch.nn.Module
    hint: Tensor | None  # [1, 3, H, W] on the device (dropped once encoded)
    type_index: int | None  # union models: the control type id
    weight: float
    start: float
    end: float
    soft: bool  # soft injection ("prompt", "control"; canny / mlsd in the hires pass)
    cond_only: bool  # cfg injection ("control"): the uncond rows get nothing
    features: Tensor | None = None  # the hint's features, computed at the first call

    def residuals(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor) -> UNetControl:
        """The scaled residuals for these rows."""
        model = self.model
        if self.features is None:
            self.features = model.encode_hint(self.hint.to(x.device), self.type_index)
            self.hint = None  # the features are what the pass needs from here on
        x = x[:, : model.in_channels]  # an inpainting UNet's x has 9 channels; the ControlNet reads 4
        out = model(x, t, context, y, control_type=self.type_index, hint_features=self.features)
        return model.scaled(out, self.weight, self.soft)


def _pad_rows(c: UNetControl, rows: int) -> UNetControl:
    """`rows` rows of zeros, then c's, in every entry of c."""
    def pad(r: Tensor | None) -> Tensor | None:
        return None if r is None else torch.cat([r.new_zeros((rows, *r.shape[1:])), r])

    skips = None if c.skips is None else [pad(s) for s in c.skips]
    intra = None if c.intrablock is None else {k: pad(v) for k, v in c.intrablock.items()}
    return UNetControl(skips=skips, middle=pad(c.middle), intrablock=intra)


def make_control_fn(pipe, units: list[ActiveUnit], steps: int) -> ControlFn:
    """The hook summing every unit's residuals on the steps it covers (`steps`: the pass's sampler steps)."""
    n = max(steps, 1)

    def control(x: Tensor, t: Tensor, context: Tensor, y: Tensor, step: int, uncond_rows: int):
        total = None
        context = _text_context(pipe, context)
        for u in units:
            if not u.start <= step / n <= u.end:
                continue
            first = uncond_rows if u.cond_only else 0
            if first >= x.shape[0]:
                continue
            out = u.residuals(x[first:], t[first:], context[first:], y[first:])
            if first:  # cfg injection: zeros for the uncond rows
                out = _pad_rows(out, first)
            total = out if total is None else total + out
        return total

    return control


def active_units(pipe, req: GenerationRequest, width: int, height: int,
                 hires: bool = False) -> list[ActiveUnit]:
    """The request's control units loaded and prepared at (width, height) (pixels)."""
    units = []
    for i, unit in enumerate(req.controls):
        where = f"controls[{i}]"
        model = control_model(pipe, unit, where, keep=max(CACHE_SIZE, len(req.controls)))
        type_index = None
        if getattr(model, "kind", None) == "union":
            # no type given: the preprocessor's, as sd-webui-controlnet reads it off the module (canny, tile)
            preprocessor = unit.preprocessor if unit.preprocessor not in (None, "none") else None
            given = unit.control_type or preprocessor
            type_index = model.type_index(given, f"{where}.control_type")
        hint = prepare_hint(unit, width, height, where).to(pipe.device)
        soft = unit.control_mode != "balanced" or (hires and any(p in (unit.preprocessor or "")
                                                                 for p in ("canny", "mlsd")))
        units.append(ActiveUnit(model, hint, type_index, float(unit.weight), float(unit.start),
                                float(unit.end), soft, unit.control_mode == "control"))
    return units


@contextlib.contextmanager
def request_control(pipe, req: GenerationRequest, width: int, height: int, steps: int,
                    hires: bool = False) -> Iterator[ControlFn | None]:
    """The `ControlFn` of the request's control units for one sampling pass at (width, height) pixels over
    `steps` sampler steps (None without units), with the control models on the execution device."""
    if not req.controls:
        yield None
        return
    units = active_units(pipe, req, width, height, hires)
    with contextlib.ExitStack() as stack:
        for m in {id(u.model): u.model for u in units}.values():
            stack.enter_context(pipe.on_device(m))
        yield make_control_fn(pipe, units, steps)
