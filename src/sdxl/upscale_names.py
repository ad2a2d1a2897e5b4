"""The hires fix's upscaler names, by A1111's names, without torch: the request checks them, and the CLI's
`--help` must not pay for importing torch. `sdxl.upscale` runs them.
"""

from __future__ import annotations

# A1111's latent modes -> (torch interpolate mode, antialias), as modules/shared_items.py lists them.
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}

# Pixel-space upscalers with no model, as A1111's "None", "Lanczos" and "Nearest".
PIXEL_UPSCALERS: tuple[str, ...] = ("None", "Lanczos", "Nearest")


def upscaler_names() -> list[str]:
    """Every name a request's hires_upscaler may hold: the latent modes, then the pixel upscalers."""
    return [*LATENT_MODES, *PIXEL_UPSCALERS]


def is_latent(name: str) -> bool:
    return name in LATENT_MODES


def is_upscaler(name: str) -> bool:
    return name in LATENT_MODES or name in PIXEL_UPSCALERS
