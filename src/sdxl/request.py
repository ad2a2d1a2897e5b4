"""`GenerationRequest`: the one typed object behind the Python API, the CLI and the HTTP API.

Every field has a default, so `GenerationRequest(prompt="a cat")` is a complete request. The CLI builds one
from its options, the HTTP API parses one from JSON (FastAPI reads the dataclass directly), and the PNG
metadata stores `to_dict()` so `sdxl generate --from IMAGE` rebuilds the same request.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError


@dataclass
class LoraSpec:
    name: str
    weight: float = 1.0


@dataclass
class GenerationRequest:
    # --- text ---
    prompt: str = ""
    negative_prompt: str | None = None  # None: zero embedding on the base model (the official behaviour)
    prompt_2: str | None = None  # text for the bigG encoder; None = same as prompt
    negative_prompt_2: str | None = None
    clip_skip: int = 1  # 1 = the penultimate layer SDXL was trained with; 2 = one layer earlier, ...
    emphasis: str = "original"  # A1111 emphasis: "original" (mean-restoring), "no_norm", "none" (no syntax)
    # --- size and micro-conditioning (None = the image size; crop defaults to 0, 0) ---
    width: int = 1024
    height: int = 1024
    original_width: int | None = None
    original_height: int | None = None
    target_width: int | None = None
    target_height: int | None = None
    crop_top: int = 0
    crop_left: int = 0
    negative_original_width: int | None = None
    negative_original_height: int | None = None
    negative_target_width: int | None = None
    negative_target_height: int | None = None
    negative_crop_top: int | None = None
    negative_crop_left: int | None = None
    # --- sampling ---
    steps: int = 30
    cfg: float = 5.0
    guidance_rescale: float = 0.0
    cfg_start: float = 0.0  # CFG only on this fraction range of the steps; the rest uses the cond branch only
    cfg_end: float = 1.0
    sampler: str = "dpmpp_2m"
    schedule: str = "automatic"  # the sampler's preferred one (A1111); trailing on a zero-terminal-SNR model
    eta: float | None = None  # noise multiplier for ancestral/SDE samplers (None: each sampler's default)
    seed: int | None = None  # None: a random seed, written back into the result
    batch: int = 1  # images per forward pass; image i uses seed + i
    prediction: str | None = None  # "eps" / "v"; None = what the checkpoint says
    zero_terminal_snr: bool | None = None  # zero-terminal-SNR schedule; None = what the checkpoint says
    # --- img2img / inpaint ---
    init_image: Any = None  # a path or a PIL image
    strength: float = 0.75
    mask_image: Any = None  # white = repaint
    mask_blur: int = 4
    # --- refiner (paper section 2.5) ---
    refiner: str | None = None
    refiner_mode: str = "ensemble"  # "ensemble" (finish the base schedule) or "sdedit" (re-noise the image)
    refiner_switch: float = 0.8  # ensemble: fraction of the schedule the base runs
    refiner_strength: float = 0.3  # sdedit: fraction re-noised
    refiner_steps: int | None = None  # sdedit: steps of the refiner schedule (default: steps)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # --- extras ---
    loras: list[LoraSpec] = field(default_factory=list)
    model: str | None = None
    vae_tiling: bool | None = None  # None: automatic (large images)
    watermark: bool = False

    # ------------------------------------------------------------------------------------------
    def resolved_seed(self) -> int:
        if self.seed is None:
            self.seed = random.randrange(2**32)
        return self.seed

    def micro_conditioning(self, negative: bool = False) -> dict[str, tuple[int, int]]:
        """(h, w) tuples as the model sees them: original size, crop (top, left), target size."""
        oh = self.original_height or self.height
        ow = self.original_width or self.width
        th = self.target_height or self.height
        tw = self.target_width or self.width
        ct, cl = self.crop_top, self.crop_left
        if negative:
            oh = self.negative_original_height or oh
            ow = self.negative_original_width or ow
            th = self.negative_target_height or th
            tw = self.negative_target_width or tw
            ct = ct if self.negative_crop_top is None else self.negative_crop_top
            cl = cl if self.negative_crop_left is None else self.negative_crop_left
        return {"original_size": (oh, ow), "crop_top_left": (ct, cl), "target_size": (th, tw)}

    def validate(self, limits: Limits | None = None, zero_terminal_snr: bool = False) -> GenerationRequest:
        """Raise RequestError naming the first bad field; resolve the sampler and schedule names to ours.
        Returns self for chaining. `zero_terminal_snr`: the model samples on the zero-terminal-SNR schedule,
        so "automatic" means "trailing" (Lin et al. 2024: the Karras ramp from sigma_max = 4096 would spend
        half the steps on pure noise)."""
        lim = limits or Limits()
        if not isinstance(self.prompt, str):
            raise RequestError("prompt: must be a string")
        if len(self.prompt) > lim.max_prompt_chars:
            raise RequestError(f"prompt: {len(self.prompt)} characters, the limit is {lim.max_prompt_chars}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 8 or v % 8:
                raise RequestError(f"{name}: {v!r} is not a positive multiple of 8")
        if self.width * self.height > lim.max_pixels:
            raise RequestError(
                f"size: {self.width}x{self.height} = {self.width * self.height} pixels, "
                f"the limit is {lim.max_pixels}"
            )
        if not 1 <= self.steps <= lim.max_steps:
            raise RequestError(f"steps: {self.steps} is outside 1..{lim.max_steps}")
        if not 1 <= self.batch <= lim.max_batch:
            raise RequestError(f"batch: {self.batch} is outside 1..{lim.max_batch}")
        if not (0.0 <= self.cfg <= 100.0):
            raise RequestError(f"cfg: {self.cfg} is outside 0..100")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise RequestError(f"guidance_rescale: {self.guidance_rescale} is outside 0..1")
        if not 0.0 <= self.cfg_start <= self.cfg_end <= 1.0:
            raise RequestError("cfg_start/cfg_end: need 0 <= cfg_start <= cfg_end <= 1")
        if not 0.0 < self.strength <= 1.0:
            raise RequestError(f"strength: {self.strength} is outside (0, 1]")
        if not 0.0 < self.refiner_switch < 1.0:
            raise RequestError(f"refiner_switch: {self.refiner_switch} is outside (0, 1)")
        if not 0.0 < self.refiner_strength <= 1.0:
            raise RequestError(f"refiner_strength: {self.refiner_strength} is outside (0, 1]")
        if self.refiner_mode not in ("ensemble", "sdedit"):
            raise RequestError(f"refiner_mode: {self.refiner_mode!r} is not 'ensemble' or 'sdedit'")
        if self.emphasis not in ("original", "no_norm", "none"):
            raise RequestError(f"emphasis: {self.emphasis!r} is not 'original', 'no_norm' or 'none'")
        if self.clip_skip < 1:
            raise RequestError(f"clip_skip: {self.clip_skip} must be >= 1")
        if self.seed is not None and not (0 <= int(self.seed) < 2**64):
            raise RequestError(f"seed: {self.seed} is outside 0..2^64-1")
        if self.prediction not in (None, "eps", "v"):
            raise RequestError(f"prediction: {self.prediction!r} is not 'eps' or 'v'")
        if self.zero_terminal_snr is not None and not isinstance(self.zero_terminal_snr, bool):
            raise RequestError(f"zero_terminal_snr: {self.zero_terminal_snr!r} is not true, false or null")
        if self.mask_image is not None and self.init_image is None:
            raise RequestError("mask_image: inpainting needs init_image too")
        from .sampling.samplers import is_automatic, resolve_sampler, resolve_schedule  # local: light import

        try:
            self.sampler, implied = resolve_sampler(self.sampler)
            automatic = is_automatic(self.schedule)
            if implied is not None and automatic:
                self.schedule = implied
            elif automatic and zero_terminal_snr:
                self.schedule = "trailing"
            self.schedule = resolve_schedule(self.schedule, sampler=self.sampler)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return self

    # ---- serialisation (PNG metadata, HTTP, --from) ----
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("init_image", "mask_image"):
            if d[k] is not None and not isinstance(d[k], str):
                d[k] = "<image>"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RequestError(f"unknown request fields: {', '.join(unknown)}")
        d = dict(d)
        if "loras" in d:
            d["loras"] = [
                x if isinstance(x, LoraSpec) else LoraSpec(**x) if isinstance(x, dict) else LoraSpec(*x)
                for x in d["loras"]
            ]
        for k in ("init_image", "mask_image"):
            if d.get(k) == "<image>":
                d[k] = None
        return cls(**d)


@dataclass
class Limits:
    """Request limits (the server makes them configurable)."""

    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_batch: int = 8
    max_prompt_chars: int = 4000
