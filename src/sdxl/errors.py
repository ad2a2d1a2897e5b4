"""Every error a user can cause, in one place at the bottom of the import graph.

Each carries a one-line message that names what the user typed (a flag, a field, a file); the CLI prints
that line, the HTTP server answers it with a 4xx, and neither shows a traceback.
"""

from __future__ import annotations

from typing import Any


class RequestError(ValueError):
    """A request that cannot be run; the message says which field and why."""


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint. The message is one line and names the file."""


class NumericsError(RuntimeError):
    """NaN or Inf appeared; the message names the component and the step."""


class BadName(ValueError):
    """A client-supplied name that is not a plain name inside its folder (HTTP 400)."""


class NameNotFound(LookupError):
    """A well-formed name that matches nothing in its folder (HTTP 404)."""


class Interrupted(Exception):
    """Generation was stopped (a progress callback returned "stop"). Carries the state at that point:
    `step`, the latents `x` and the current x0 estimate `denoised` (scaled latents), so a caller can still
    decode the partial image, as A1111 does for an interrupted job."""

    def __init__(
        self,
        message: str = "sampling interrupted",
        *,
        step: int | None = None,
        x: Any = None,
        denoised: Any = None,
    ):
        super().__init__(message)
        self.step = step
        self.x = x
        self.denoised = denoised
