"""Upscalers for the hires fix, by A1111's names.

Two kinds:

- latent modes ("Latent", "Latent (bicubic antialiased)", ...): the first pass's latents are interpolated
  with `torch.nn.functional.interpolate` in the mode and antialias setting A1111's `latent_upscale_modes`
  gives each name (`upscale_latents`);
- pixel upscalers ("Lanczos", "Nearest"): the first pass is decoded, the image resized (`upscale_image`),
  and encoded again;
- model upscalers (ESRGAN, Real-ESRGAN, SwinIR, ... through spandrel, `upscale_models`): a file named by
  its stem in an upscalers folder, or by its path where paths are allowed (`resolve_model_upscaler`); they
  run like the pixel upscalers, tiled.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from PIL import Image

from .errors import BadName, NameNotFound, RequestError
from .files import resolve_in_folder
from .upscale_models import UPSCALER_SUFFIXES, Upscaler, list_upscaler_files, load_upscaler
from .upscale_names import LATENT_MODES, PIXEL_UPSCALERS, is_latent, is_upscaler, upscaler_names  # noqa: F401

# Pixel-space resamplers with no model, as A1111's "Lanczos" and "Nearest" upscalers (PIL's filters), and
# its "None" (the image as it is; the hires fix then resizes it to the upscaled size with Lanczos).
_RESAMPLERS = {"None": None, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
assert tuple(_RESAMPLERS) == PIXEL_UPSCALERS


def pixel_upscaler_names() -> list[str]:
    """The names `upscale_image` accepts."""
    return list(PIXEL_UPSCALERS)


def upscale_latents(latents: torch.Tensor, name: str, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, C, *size] by the latent mode `name` (A1111's hires fix)."""
    mode, antialias = LATENT_MODES[name]
    return torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)


def upscale_image(image: Image.Image, name: str, scale: float, *, upscalers_dir: str | Path | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Image.Image:
    """`image` made `scale` times larger (each side rounded down) by the pixel upscaler `name`, or, with
    `upscalers_dir`, by the model upscaler file of that folder `name` names (stem or relative path; see
    `upscale_models`; the last one loaded is kept for the next call)."""
    if name not in _RESAMPLERS and upscalers_dir is not None:
        return _model_upscaler(Path(upscalers_dir), name, torch.device(device), dtype).upscale(image, scale)
    if name not in _RESAMPLERS:
        raise ValueError(f"{name!r} is not an upscaler (known: {', '.join(upscaler_names())})")
    if _RESAMPLERS[name] is None:
        return image
    w, h = image.size
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))), _RESAMPLERS[name])


def resolve_model_upscaler(name: str, dirs: list[Path], allow_paths: bool = True,
                           field: str = "hires_upscaler") -> Path:
    """A model upscaler named by a request -> its file: an existing file (when `allow_paths`), or a name
    (file stem or relative path, with or without its suffix) inside one of `dirs`. One-line RequestError
    listing every name known, when it is neither."""
    p = Path(name).expanduser()
    if allow_paths and p.is_file():
        return p
    for d in dirs:
        for rel in list_upscaler_files(d):
            if name in (rel.stem, rel.with_suffix("").as_posix(), rel.as_posix()):
                return Path(d) / rel
        try:
            return resolve_in_folder(Path(d), name, "upscaler", UPSCALER_SUFFIXES, files_only=True)
        except NameNotFound:
            continue
        except BadName as e:
            raise RequestError(f"{field}: {e}") from None
    files = [r.stem for d in dirs for r in list_upscaler_files(d)]
    where = "" if dirs else " (no upscalers folder is set; give a file's path" + (
        ")" if allow_paths else ", or start the server with --upscalers-dir)")
    raise RequestError(f"{field}: {name!r} is not an upscaler (known: {', '.join(upscaler_names() + files)})"
                       f"{where}")


def upscale_with_model(image: Image.Image, path: Path, scale: float, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> Image.Image:
    """`image` made `scale` times larger by the model upscaler file `path` (loaded once and kept; tiled)."""
    return _model_upscaler(path.parent, path.name, torch.device(device), dtype).upscale(image, scale)


_last_model: tuple[tuple[Path, int, torch.device, torch.dtype], Upscaler] | None = None
_model_lock = threading.Lock()


def _model_upscaler(folder: Path, name: str, device: torch.device, dtype: torch.dtype) -> Upscaler:
    """The model upscaler `name` of `folder`, loaded (or the one loaded last, if the same file)."""
    global _last_model
    stems = {p.with_suffix("").as_posix(): p for p in list_upscaler_files(folder)}
    stems.update({p.stem: p for p in stems.values()})
    rel = stems.get(name, name)
    path = resolve_in_folder(folder, str(rel), "upscaler", UPSCALER_SUFFIXES, files_only=True)
    key = (path, path.stat().st_mtime_ns, device, dtype)
    with _model_lock:
        if _last_model is None or _last_model[0] != key:
            _last_model = None  # the previous model's memory goes before the next one loads
            _last_model = (key, load_upscaler(path, device, dtype, name=path.stem))
        return _last_model[1]
