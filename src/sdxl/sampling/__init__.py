"""Sampling in sigma space: the noise schedule and UNet wrapper (`denoiser`), schedules (`schedules`) and
samplers (`samplers`). See each module's docstring."""

from .denoiser import DiscreteSchedule, ModelDenoiser
from .samplers import (
    A1111_SAMPLER_NAMES,
    A1111_SCHEDULE_NAMES,
    SAMPLER_INFO,
    SAMPLERS,
    Interrupted,
    automatic_schedule,
    img2img_sigmas,
    is_automatic,
    resolve_sampler,
    resolve_schedule,
    split_sigmas,
)
from .schedules import SCHEDULES, get_sigmas

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
