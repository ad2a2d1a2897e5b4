"""Upscalers for the hires fix, by A1111's names.

Two kinds:

- latent modes ("Latent", "Latent (bicubic antialiased)", ...): the first pass's latents are interpolated
  with `torch.nn.functional.interpolate` in the mode and antialias setting A1111's `latent_upscale_modes`
  gives each name (`upscale_latents`);
- pixel upscalers ("Lanczos", "Nearest"): the first pass is decoded, the image resized (`upscale_image`),
  and encoded again. Model upscalers (ESRGAN and kin) plug in here: `upscale_image` dispatches on the name,
  and `pixel_upscaler_names` lists what it knows.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from PIL import Image

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
