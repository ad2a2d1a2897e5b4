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

import torch
from PIL import Image

# A1111's names -> (torch interpolate mode, antialias), as modules/shared_items.py lists them.
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}

# Pixel-space resamplers with no model, as A1111's "Lanczos" and "Nearest" upscalers (PIL's filters), and
# its "None" (the image as it is; the hires fix then resizes it to the upscaled size with Lanczos).
_RESAMPLERS = {"None": None, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


def pixel_upscaler_names() -> list[str]:
    """The names `upscale_image` accepts."""
    return list(_RESAMPLERS)


def upscaler_names() -> list[str]:
    """Every name a request's hires_upscaler may hold: the latent modes, then the pixel upscalers."""
    return [*LATENT_MODES, *pixel_upscaler_names()]


def is_latent(name: str) -> bool:
    return name in LATENT_MODES


def is_upscaler(name: str) -> bool:
    return name in LATENT_MODES or name in pixel_upscaler_names()


def upscale_latents(latents: torch.Tensor, name: str, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, C, *size] by the latent mode `name` (A1111's hires fix)."""
    mode, antialias = LATENT_MODES[name]
    return torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)


def upscale_image(image: Image.Image, name: str, scale: float) -> Image.Image:
    """`image` made `scale` times larger (each side rounded down) by the pixel upscaler `name`."""
    if name not in _RESAMPLERS:
        raise ValueError(f"{name!r} is not an upscaler (known: {', '.join(upscaler_names())})")
    if _RESAMPLERS[name] is None:
        return image
    w, h = image.size
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))), _RESAMPLERS[name])
