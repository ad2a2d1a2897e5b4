"""Sampling in sigma space: the noise schedule and UNet wrapper (`denoiser`), schedules (`schedules`),
samplers (`samplers`) and their names in our, A1111's and ComfyUI's spelling (`names`). See each module's
docstring.

The names are imported at once (no torch: request validation and the PNG readers use them); the rest on
first use, so that `from sdxl.sampling import resolve_sampler` does not load torch.
"""

from importlib import import_module

from .names import (
    A1111_SAMPLER_NAMES,
    A1111_SCHEDULE_NAMES,
    automatic_schedule,
    is_automatic,
    resolve_sampler,
    resolve_schedule,
)

_LAZY = {
    "DiscreteSchedule": "denoiser",
    "ModelDenoiser": "denoiser",
    "SAMPLER_INFO": "samplers",
    "SAMPLERS": "samplers",
    "Interrupted": "samplers",
    "img2img_sigmas": "samplers",
    "split_sigmas": "samplers",
    "SCHEDULES": "schedules",
    "get_sigmas": "schedules",
}


def __getattr__(name: str):  # lazy: the torch-based modules load on first use
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "A1111_SAMPLER_NAMES",
    "A1111_SCHEDULE_NAMES",
    "SAMPLERS",
    "SAMPLER_INFO",
    "SCHEDULES",
    "DiscreteSchedule",
    "Interrupted",
    "ModelDenoiser",
    "automatic_schedule",
    "get_sigmas",
    "img2img_sigmas",
    "is_automatic",
    "resolve_sampler",
    "resolve_schedule",
    "split_sigmas",
]
