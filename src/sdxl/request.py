"""`GenerationRequest`: the one description of a generation (Python API, CLI, both HTTP APIs, web UI).

Every field has a default, so `GenerationRequest(prompt="a cat")` is a complete request. `None` means "what
the model says": the model's native size, the file's prediction type and noise schedule, a random seed.
`resolve(config)` fills all of those against the loaded model once, in one pure step, and returns a new
request in which every name is canonical ("DPM++ 2M" -> "dpmpp_2m", "Automatic" -> "trailing" on a
zero-terminal-SNR model); the pipeline runs only resolved requests, and the PNG stores the resolved one, so
`sdxl generate --from IMAGE` repeats it exactly.

Each field's help text lives in its metadata: the CLI builds its options from it (`cli_options`), and the
HTTP API's schema from the fields themselves. What is not about the image (which files, device, dtype,
threads, compilation) is in `RunOptions`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import dataclass, field
from typing import Any

from . import control_names
from .errors import RequestError
from .models.pag_layers import parse_layer, split_layers
from .prompts import PromptError, compose_prompts
from .sampling.names import RUNNABLE_SCHEDULES, is_automatic, resolve_sampler, resolve_schedule


def _f(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (), cli: bool = True, **kw: Any):
    """A field with its help text and CLI flags (first flag = the option's name, default `--field-name`)."""
    meta = {"help": help, "flags": flags, "cli": cli}
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LoraSpec:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class ControlUnit:
    """One control unit: a ControlNet (plain, union/ProMax or Control-LoRA) or a T2I-Adapter file, which
    kind read off its tensors, with its control image. Control applies to the base model only."""

    model: str  # a file or folder in the control models folder, or a path
    image: Any = None  # the control image (a path or an image): the map itself, or the preprocessor's input
    weight: float = 1.0  # scale of what the unit adds
    start: float = 0.0  # fraction of the steps where the unit starts to apply
    end: float = 1.0  # ... and stops
    control_type: str | None = None  # union models: which control the image is (canny, depth, openpose, ...)
    control_mode: str = "balanced"  # balanced | prompt | control (A1111's three control modes)
    # resize (A1111 "Just Resize") | crop ("Crop and Resize") | fill ("Resize and Fill")
    resize_mode: str = "crop"
    # none (the image is the map) | canny | threshold | scribble | invert | tile | blur
    preprocessor: str = "none"
    threshold_a: float | None = None  # the preprocessor's first parameter (canny: low threshold)
    threshold_b: float | None = None  # the preprocessor's second parameter (canny: high threshold)


@dataclass(frozen=True)
class IPAdapterUnit:
    """One IP-Adapter: its file, its reference images (or FaceID's face embeddings) and when it applies."""

    model: str  # a file in the IP-Adapter models folder, or a path
    images: tuple[Any, ...] = ()  # reference images (paths or images)
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps
    end: float = 1.0
    image_encoder: str | None = None  # the CLIP vision tower (None: the one found for this adapter)
    face_embeddings: tuple[Any, ...] = ()  # FaceID: face-recognition embeddings (512 numbers each)


UNIT_TYPES = {"controls": ControlUnit, "ip_adapters": IPAdapterUnit}


@dataclass(frozen=True)
class GenerationRequest:
    # --- text ---
    prompt: str = _f("", "What to draw (A1111 prompt syntax).", cli=False)  # the CLI's positional argument
    negative_prompt: str | None = _f(
        None, "What to avoid (none: a zero embedding on the base model, as the official pipeline).",
        flags=("--negative-prompt", "-N"))
    prompt_2: str | None = _f(None, "Separate prompt for the bigG encoder (default: the prompt).")
    negative_prompt_2: str | None = _f(None, "Separate negative prompt for the bigG encoder.")
    clip_skip: int = _f(1, "1 = the penultimate layer SDXL was trained with; 2 = one layer earlier, ...")
    emphasis: str = _f("original", "A1111 emphasis: original (mean-restoring), no_norm, none (no syntax).")
    # --- size and micro-conditioning ---
    width: int | None = _f(None, "Image width in pixels, a multiple of 8 (default: the model's native size).",
                           flags=("--width", "-W"))
    height: int | None = _f(None, "Image height in pixels (default: the model's native size).",
                            flags=("--height", "-H"))
    original_width: int | None = _f(None, "Micro-conditioning original width (default: the width).")
    original_height: int | None = _f(None, "Micro-conditioning original height (default: the height).")
    target_width: int | None = _f(None, "Micro-conditioning target width (default: the width).")
    target_height: int | None = _f(None, "Micro-conditioning target height (default: the height).")
    crop_top: int = _f(0, "Micro-conditioning crop top (pixels).")
    crop_left: int = _f(0, "Micro-conditioning crop left (pixels).")
    negative_original_width: int | None = _f(None, "Negative branch: original width.")
    negative_original_height: int | None = _f(None, "Negative branch: original height.")
    negative_target_width: int | None = _f(None, "Negative branch: target width.")
    negative_target_height: int | None = _f(None, "Negative branch: target height.")
    negative_crop_top: int | None = _f(None, "Negative branch: crop top (default: crop top).")
    negative_crop_left: int | None = _f(None, "Negative branch: crop left (default: crop left).")
    # --- sampling ---
    steps: int = _f(30, "Sampler steps.")
    cfg: float = _f(5.0, "Classifier-free guidance scale.")
    guidance_rescale: float = _f(0.0, "CFG rescale phi, 0..1 (Lin et al.; 0.7 for zero-terminal-SNR models).")
    cfg_start: float = _f(0.0, "Apply CFG from this fraction of the steps (before: the prompt alone).")
    cfg_end: float = _f(1.0, "Apply CFG until this fraction of the steps.")
    sampler: str = _f("dpmpp_2m", "euler, euler_a, dpmpp_2m, ... or an A1111/ComfyUI name (DPM++ 2M Karras).")
    schedule: str = _f("automatic", "automatic (the sampler's own; trailing on a zero-terminal-SNR model), "
                       + ", ".join(RUNNABLE_SCHEDULES) + ", or an A1111 label (Karras, Align Your Steps).")
    eta: float | None = _f(None, "Noise multiplier for ancestral/SDE samplers (default: each sampler's); "
                           "for tcd its gamma, 0..1 (default 0.3).")
    seed: int | None = _f(None, "Seed (random if omitted or -1; printed and saved in the PNG).")
    batch: int = _f(1, "Images per forward pass; image i uses seed + i.")
    prediction: str | None = _f(None, "Force eps, v or x0 prediction (x0: SDXL-Lightning 1-step; default: "
                                      "what the checkpoint says).")
    zero_terminal_snr: bool | None = _f(
        None, "Force the zero-terminal-SNR schedule on or off (default: the checkpoint's).", flags=("--zsnr",)
    )
    # --- img2img / inpaint ---
    init_image: Any = _f(None, "img2img: start from this image.")  # a path or a PIL image
    strength: float = _f(0.75, "img2img/inpaint: how much to change (0..1].")
    mask_image: Any = _f(None, "Inpaint: mask image, white = repaint (needs --init-image).",
                         flags=("--mask",))
    mask_blur: int = _f(4, "Inpaint: Gaussian blur radius of the mask in pixels (A1111's default 4).")
    # --- refiner (paper section 2.5) ---
    refiner_mode: str = _f("ensemble", "ensemble (the refiner finishes the base schedule) or sdedit.")
    refiner_switch: float = _f(0.8, "ensemble: fraction of the schedule the base runs.")
    refiner_strength: float = _f(0.3, "sdedit: fraction re-noised.")
    refiner_steps: int | None = _f(None, "sdedit: steps of the refiner schedule (default: --steps).")
    aesthetic_score: float = _f(6.0, "Refiner aesthetic score.")
    negative_aesthetic_score: float = _f(2.5, "Refiner negative aesthetic score.")
    # --- which files (the server's per-request choice; the CLI and Python API take them as RunOptions) ---
    refiner: str | None = _f(None, "Refiner checkpoint name.", cli=False)
    model: str | None = _f(None, "Model name.", cli=False)
    # --- extras ---
    loras: tuple[LoraSpec, ...] = _f(help="LoRAs (CLI: --lora NAME:WEIGHT, repeatable).", cli=False,
                                     default_factory=tuple)
    vae_tiling: bool | None = _f(None, "Tiled VAE decode (default: automatic, for large images).")
    watermark: bool = _f(False, "Add the official invisible watermark.")
    # --- guidance variants (the base model; a refiner runs without them) ---
    pag_scale: float = _f(0.0, "Perturbed-attention guidance scale (Ahn et al.; 0 = off, 3 is common).")
    pag_layers: str = _f("mid", "PAG layers, comma-separated diffusers names: mid, down.2, up.0, up.0.1.")
    freeu: bool = _f(False, "FreeU (Si et al.): scale the up path's backbone (b1, b2) and skips (s1, s2).")
    freeu_b1: float = _f(1.3, "FreeU backbone scale of the first up stage (SDXL's 1.3).")
    freeu_b2: float = _f(1.4, "FreeU backbone scale of the second up stage (SDXL's 1.4).")
    freeu_s1: float = _f(0.9, "FreeU skip low-frequency scale of the first up stage (SDXL's 0.9).")
    freeu_s2: float = _f(0.2, "FreeU skip low-frequency scale of the second up stage (SDXL's 0.2).")
    # --- composable prompts ("a cat AND a dog :0.7", A1111's AND) ---
    region_masks: tuple[Any, ...] = _f(
        help="One mask per AND sub-prompt (paths or images; white = that sub-prompt applies there; where "
        "no mask covers a pixel the first sub-prompt applies; overlaps share). CLI: repeat --region-mask.",
        flags=("--region-mask",), default_factory=tuple)
    # --- hires fix (A1111's two passes: txt2img at the size, upscale, img2img at the larger size) ---
    hires_scale: float = _f(0.0, "Hires fix: upscale the first pass by this factor, then run a second "
                            "img2img pass (0 = off; A1111's hr_scale).")
    hires_width: int = _f(0, "Hires fix: upscale to this width instead of by a scale (A1111's hr_resize_x; "
                          "0 = from the height's ratio).")
    hires_height: int = _f(0, "Hires fix: upscale to this height (A1111's hr_resize_y; 0 = from the width).")
    hires_upscaler: str = _f("Latent", "Hires fix upscaler: Latent, Latent (antialiased), Latent (bicubic), "
                             "Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), "
                             "None, Lanczos, Nearest, or a model upscaler file (ESRGAN, SwinIR, ...: its "
                             "path, or its name in the server's upscalers folder; the upscale extra).")
    hires_steps: int = _f(0, "Hires fix: steps the second pass runs (0 = --steps), as A1111: the last ones "
                          "of a schedule of steps / strength.")
    hires_strength: float = _f(0.7, "Hires fix: the second pass's denoising strength (0..1].")
    hires_sampler: str | None = _f(None, "Hires fix: the second pass's sampler (default: --sampler).")
    hires_schedule: str | None = _f(None, "Hires fix: the second pass's schedule (default: --schedule).")
    hires_prompt: str | None = _f(None, "Hires fix: the second pass's prompt (default: the prompt).")
    hires_negative_prompt: str | None = _f(None, "Hires fix: the second pass's negative prompt (default: the "
                                           "negative prompt).")
    # --- control (the base model; see ControlUnit and IPAdapterUnit) ---
    controls: tuple[ControlUnit, ...] = _f(
        help="ControlNet / T2I-Adapter units (CLI: --controlnet FILE[:WEIGHT[:START:END]] with "
        "--control-image IMG, repeatable).", cli=False, default_factory=tuple)
    ip_adapters: tuple[IPAdapterUnit, ...] = _f(
        help="IP-Adapters (CLI: --ip-adapter FILE[:SCALE] with --ip-image IMG, repeatable).", cli=False,
        default_factory=tuple)

    def __post_init__(self):
        # lists and dicts (JSON, pydantic's model_dump, callers) become a tuple of LoraSpec: the request is
        # immutable and every reader sees one type
        if not (isinstance(self.loras, tuple) and all(isinstance(x, LoraSpec) for x in self.loras)):
            object.__setattr__(self, "loras", tuple(_lora(x) for x in self.loras or ()))
        if isinstance(self.region_masks, list):
            object.__setattr__(self, "region_masks", tuple(self.region_masks))
        for name, unit_type in UNIT_TYPES.items():
            units = getattr(self, name)
            if not (isinstance(units, tuple) and all(isinstance(u, unit_type) for u in units)):
                if not isinstance(units, (list, tuple)):
                    raise RequestError(f"{name}: {show_value(units)} is not a list of units")
                units = tuple(_unit(name, i, u, unit_type) for i, u in enumerate(units))
                object.__setattr__(self, name, units)

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------
    def micro_conditioning(self, negative: bool = False) -> dict[str, tuple[int, int]]:
        """(h, w) tuples as the model sees them: original size, crop (top, left), target size. Needs a
        resolved request (width and height set)."""
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

    @property
    def hires(self) -> bool:
        """Whether the hires fix runs: a scale, or a target width or height, that changes the size (as in
        A1111, an upscale to the first pass's own size does nothing)."""
        if not (self.hires_scale > 0 or self.hires_width > 0 or self.hires_height > 0):
            return False
        if self.width is None or self.height is None:  # not resolved yet
            return True
        return self.hires_size()[:2] != (self.width, self.height)

    def hires_size(self) -> tuple[int, int, int, int]:
        """(width, height) the first pass is upscaled to, then the (width, height) of the final image, for a
        request with width and height set. As A1111's `calculate_target_resolution`: by a scale, int(side *
        scale); to one given side, the other from the aspect ratio (floor division); to both, the upscale
        covers the box keeping the aspect ratio and the excess is cropped (centred). Sides are cut to whole
        latents (multiples of 8) as A1111 does: side // 8, less the crop's (up - box) // 8."""
        w, h, rx, ry = self.width, self.height, self.hires_width, self.hires_height
        if not rx and not ry:
            up = (int(w * self.hires_scale), int(h * self.hires_scale))
            box = up
        elif not ry:
            up = box = (rx, rx * h // w)
        elif not rx:
            up = box = (ry * w // h, ry)
        else:
            up = (rx, rx * h // w) if w / h < rx / ry else (ry * w // h, ry)
            box = (rx, ry)
        # in latent units, A1111 crops (up - box) // 8 from up // 8
        final = [(u // 8 - (u - b) // 8) * 8 for u, b in zip(up, box)]
        return up[0], up[1], final[0], final[1]

    def validate(self, limits: Limits | None = None) -> GenerationRequest:
        """Raise RequestError naming the first bad field. Changes nothing; returns self for chaining.

        This is the one check every entry point runs (Python API, CLI, native HTTP, A1111 routes, web UI):
        strict types (a bool is not a number, a float is not an int), finite numbers inside documented
        ranges, text that is valid Unicode (no lone surrogates: they cannot be written to a PNG or JSON
        as UTF-8) and within its length limit, names the sampler tables know."""
        lim = limits or Limits()
        _check_types(self)
        for name in TEXT_FIELDS:
            _text(name, getattr(self, name), lim.max_prompt_chars)
        for name in NAME_FIELDS:
            _text(name, getattr(self, name), MAX_NAME_CHARS)
            if getattr(self, name) == "":
                raise RequestError(f"{name}: an empty name" + (" (leave it out, or null, for none)"
                                                               if name in ("model", "refiner") else ""))
        for key in ("init_image", "mask_image"):  # a path (CLI, Python API) or a decoded image
            v = getattr(self, key)
            if isinstance(v, str):
                _text(key, v, MAX_NAME_CHARS)
        if len(self.loras) > MAX_LORAS:
            raise RequestError(f"loras: {len(self.loras)} LoRAs, the limit is {MAX_LORAS}")
        for i, spec in enumerate(self.loras):
            if not isinstance(spec.name, str) or not spec.name:
                raise RequestError(f"loras[{i}].name: {show_value(spec.name)} is not a LoRA name")
            _text(f"loras[{i}].name", spec.name, MAX_NAME_CHARS)
            if not _is_number(spec.weight):
                raise RequestError(f"loras[{i}].weight: {show_value(spec.weight)} is not a number")
            _range(f"loras[{i}].weight", spec.weight, -100.0, 100.0)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise RequestError(f"{name}: {v} is not a positive multiple of 8")
        if self.width is not None and self.height is not None and self.width * self.height > lim.max_pixels:
            raise RequestError(
                f"size: {self.width}x{self.height} = {self.width * self.height} pixels, "
                f"the limit is {lim.max_pixels}"
            )
        for name in MICRO_SIZE_FIELDS:
            v = getattr(self, name)
            if v is not None and not 1 <= v <= MAX_MICRO_SIZE:
                raise RequestError(f"{name}: {v} is outside 1..{MAX_MICRO_SIZE}")
        for name in MICRO_CROP_FIELDS:
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_MICRO_SIZE:
                raise RequestError(f"{name}: {v} is outside 0..{MAX_MICRO_SIZE}")
        if not 1 <= self.steps <= lim.max_steps:
            raise RequestError(f"steps: {self.steps} is outside 1..{lim.max_steps}")
        if not 1 <= self.batch <= lim.max_batch:
            raise RequestError(f"batch: {self.batch} is outside 1..{lim.max_batch}")
        _range("cfg", self.cfg, 0.0, 100.0)
        _range("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _range("cfg_start", self.cfg_start, 0.0, 1.0)
        _range("cfg_end", self.cfg_end, 0.0, 1.0)
        if not self.cfg_start <= self.cfg_end:
            raise RequestError(f"cfg_start/cfg_end: {self.cfg_start:g} > {self.cfg_end:g}; need cfg_start <= "
                               "cfg_end")
        if not 0.0 < self.strength <= 1.0:
            raise RequestError(f"strength: {self.strength:g} is outside (0, 1]")
        if not 0.0 < self.refiner_switch < 1.0:
            raise RequestError(f"refiner_switch: {self.refiner_switch:g} is outside (0, 1)")
        if not 0.0 < self.refiner_strength <= 1.0:
            raise RequestError(f"refiner_strength: {self.refiner_strength:g} is outside (0, 1]")
        if self.refiner_steps is not None and not 1 <= self.refiner_steps <= lim.max_steps:
            raise RequestError(f"refiner_steps: {self.refiner_steps} is outside 1..{lim.max_steps}")
        _range("aesthetic_score", self.aesthetic_score, -100.0, 100.0)
        _range("negative_aesthetic_score", self.negative_aesthetic_score, -100.0, 100.0)
        if self.eta is not None:
            _range("eta", self.eta, 0.0, 100.0)
            if self.eta > 1.0 and resolve_sampler(self.sampler)[0] == "tcd":  # the name is checked below
                raise RequestError(f"eta: {self.eta:g} is outside 0..1 (the TCD sampler's gamma)")
        if not 0 <= self.mask_blur <= MAX_MASK_BLUR:
            raise RequestError(f"mask_blur: {self.mask_blur} is outside 0..{MAX_MASK_BLUR}")
        if self.refiner_mode not in ("ensemble", "sdedit"):
            raise RequestError(f"refiner_mode: {show_value(self.refiner_mode)} is not 'ensemble' or 'sdedit'")
        if self.emphasis not in ("original", "no_norm", "none"):
            raise RequestError(f"emphasis: {show_value(self.emphasis)} is not original, no_norm or none")
        if not 1 <= self.clip_skip <= MAX_CLIP_SKIP:
            raise RequestError(f"clip_skip: {self.clip_skip} is outside 1..{MAX_CLIP_SKIP}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestError(f"seed: {self.seed} is outside 0..2^64-1")
        if self.prediction not in (None, "eps", "v", "x0"):
            raise RequestError(f"prediction: {show_value(self.prediction)} is not 'eps', 'v' or 'x0'")
        if self.mask_image is not None and self.init_image is None:
            raise RequestError("mask_image: inpainting needs init_image too")
        _range("pag_scale", self.pag_scale, 0.0, 100.0)
        for name in split_layers(self.pag_layers):
            if parse_layer(name) is None:
                raise RequestError(f"pag_layers: {show_value(name)} is not a layer name (mid, down.N, up.N, "
                                   "down.N.M or up.N.M)")
        if self.pag_scale > 0 and not split_layers(self.pag_layers):
            raise RequestError("pag_layers: empty; PAG needs at least one layer (e.g. mid)")
        for name in ("freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2"):
            _range(name, getattr(self, name), -10.0, 10.0)
        _check_subprompts(self)
        _sampler_and_schedule(self.sampler, self.schedule, False)
        _check_hires(self, lim)
        _check_controls(self)
        _check_ip_adapters(self)
        return self

    def resolve(self, config: Any = None, limits: Limits | None = None) -> GenerationRequest:
        """This request against a loaded model (`config`: its `ModelConfig`; None = SDXL's defaults): a new
        request with the native size for each side not given, the checkpoint's prediction type and noise
        schedule, canonical sampler and schedule names ("automatic" -> the sampler's own schedule, or
        "trailing" on a zero-terminal-SNR model), and a seed (drawn at random when none is given).
        Resolving a resolved request changes nothing. Raises RequestError naming the bad field."""
        self.validate(limits)
        towers = [t.layers for t in (getattr(config, "text_l", None), getattr(config, "text_g", None)) if t]
        if towers and self.clip_skip > min(towers):
            raise RequestError(f"clip_skip: {self.clip_skip} is more than this model's text encoders have "
                               f"layers ({min(towers)})")
        native = getattr(config, "sample_size", 1024)
        zsnr = self.zero_terminal_snr
        if zsnr is None:
            zsnr = bool(getattr(config, "zero_terminal_snr", False))
        sampler, schedule = _sampler_and_schedule(self.sampler, self.schedule, zsnr,
                                                  getattr(config, "edm", None) is not None)
        hires = {}
        if self.hires_sampler is not None or self.hires_schedule is not None:
            hires["hires_sampler"], hires["hires_schedule"] = _sampler_and_schedule(
                self.hires_sampler or self.sampler, self.hires_schedule or self.schedule, zsnr,
                getattr(config, "edm", None) is not None)
        out = dataclasses.replace(
            self,
            **hires,
            width=self.width or native,
            height=self.height or native,
            sampler=sampler,
            schedule=schedule,
            seed=random.randrange(2**32) if self.seed is None else int(self.seed),
            prediction=self.prediction or getattr(config, "prediction", "eps"),
            zero_terminal_snr=zsnr,
        )
        return out.validate(limits)

    # ---- serialisation (PNG metadata, HTTP, --from) ----
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loras"] = [dict(x) for x in d["loras"]]
        for k in ("init_image", "mask_image"):
            if d[k] is not None and not isinstance(d[k], str):
                d[k] = "<image>"
        d["region_masks"] = [m if isinstance(m, str) else "<image>" for m in d["region_masks"]]
        for c in d["controls"]:
            if c["image"] is not None and not isinstance(c["image"], str):
                c["image"] = "<image>"
        for u in d["ip_adapters"]:
            u["images"] = [m if isinstance(m, str) else "<image>" for m in u["images"]]
            u["face_embeddings"] = [[float(v) for v in e] for e in u["face_embeddings"]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RequestError(f"unknown request fields: {', '.join(unknown)}")
        d = dict(d)
        for k in ("init_image", "mask_image"):
            if d.get(k) == "<image>":
                d[k] = None
        if "<image>" in (d.get("region_masks") or ()):  # images that were not saved: no regions
            d["region_masks"] = ()
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise RequestError(f"loras: {e}") from None


def _unit(field_name: str, i: int, x: Any, unit_type: type) -> Any:
    """A ControlUnit / IPAdapterUnit from a dict (JSON, pydantic's model_dump) or the unit itself."""
    if isinstance(x, unit_type):
        return x
    if not isinstance(x, dict):
        raise RequestError(f"{field_name}[{i}]: {show_value(x)} is not an object with the unit's fields")
    known = {f.name for f in dataclasses.fields(unit_type)}
    unknown = sorted(set(x) - known)
    if unknown:
        raise RequestError(f"{field_name}[{i}]: unknown fields: {', '.join(map(str, unknown))} (known: "
                           f"{', '.join(sorted(known))})")
    if "model" not in x:
        raise RequestError(f"{field_name}[{i}].model: missing (the unit's model file)")
    x = dict(x)
    for key in ("images", "face_embeddings"):
        if isinstance(x.get(key), list):
            x[key] = tuple(tuple(v) if key == "face_embeddings" and isinstance(v, list) else v
                           for v in x[key])
    return unit_type(**x)


def _lora(x: Any) -> LoraSpec:
    if isinstance(x, LoraSpec):
        return x
    if isinstance(x, dict) and set(x) <= {"name", "weight"} and "name" in x:
        return LoraSpec(**x)
    if isinstance(x, (list, tuple)) and 1 <= len(x) <= 2:
        return LoraSpec(*x)
    raise RequestError(f"loras: {show_value(x)} is not a LoRA name with a weight (name, weight)")


# The limits of what a request may hold besides `Limits` (which a server configures).
TEXT_FIELDS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "hires_prompt",
               "hires_negative_prompt")  # each up to max_prompt_chars
NAME_FIELDS = ("sampler", "schedule", "emphasis", "refiner_mode", "prediction", "model", "refiner",
               "pag_layers", "hires_upscaler", "hires_sampler", "hires_schedule")
MAX_HIRES_SCALE = 8.0
MAX_NAME_CHARS = 1024  # names and paths
MAX_LORAS = 64
MAX_SUBPROMPTS = 32  # AND parts of one prompt
MAX_MASK_BLUR = 256  # pixels
MAX_CLIP_SKIP = 12  # CLIP ViT-L's layer count; `resolve` also checks the model's own towers
MAX_MICRO_SIZE = 65536  # micro-conditioning sizes and crops, in pixels
MICRO_SIZE_FIELDS = ("original_width", "original_height", "target_width", "target_height",
                     "negative_original_width", "negative_original_height", "negative_target_width",
                     "negative_target_height")
MICRO_CROP_FIELDS = ("crop_top", "crop_left", "negative_crop_top", "negative_crop_left")


def show_value(v: Any) -> str:
    """A value for an error message: short, one line, never an object's memory address."""
    if isinstance(v, (bool, int, float)) or v is None:
        return repr(v)
    if isinstance(v, str):
        text = v.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        return repr(text if len(text) <= 40 else text[:37] + "...")
    return f"a {type(v).__name__}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(name: str, v: Any, limit: int) -> None:
    if v is None:
        return
    if len(v) > limit:
        raise RequestError(f"{name}: {len(v)} characters, the limit is {limit}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name}: not valid Unicode text (it holds a lone surrogate escape such as "
                           "\\ud800)") from None


def _check_types(req: GenerationRequest) -> None:
    """Each field holds its annotated type: int fields an int (not a bool, not a float), float fields an
    int or a float that is finite, bool fields a bool, text fields a str; None only where allowed."""
    for name, (kind, optional) in _field_kinds().items():
        v = getattr(req, name)
        if v is None:
            if optional:
                continue
            raise RequestError(f"{name}: must not be null")
        if kind == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind == "float":
            ok = _is_number(v) and math.isfinite(v)
        elif kind == "bool":
            ok = isinstance(v, bool)
        else:
            ok = isinstance(v, str)
        if not ok:
            what = {"int": "a whole number", "float": "a finite number", "bool": "true or false",
                    "str": "text"}[kind]
            raise RequestError(f"{name}: {show_value(v)} is not {what}")


@functools.cache
def _field_kinds() -> dict[str, tuple[str, bool]]:
    """field name -> (int | float | bool | str, None allowed) for the request's scalar fields."""
    out = {}
    for f in dataclasses.fields(GenerationRequest):
        parts = [p.strip() for p in str(f.type).split("|")]
        optional = "None" in parts
        kinds = [p for p in parts if p != "None"]
        if len(kinds) == 1 and kinds[0] in ("int", "float", "bool", "str"):
            out[f.name] = (kinds[0], optional)
    return out


def _check_subprompts(req: GenerationRequest) -> None:
    """AND sub-prompts: at most MAX_SUBPROMPTS (each is a UNet branch), prompt_2's count equal to the
    prompt's when it has AND, and one region mask per sub-prompt when masks are given."""
    try:
        parts = compose_prompts(req.prompt, req.prompt_2)
    except PromptError as e:
        raise RequestError(f"prompt_2: {e}") from None
    count = len(parts) if parts else 1
    if count > MAX_SUBPROMPTS:
        raise RequestError(f"prompt: {count} sub-prompts (split by AND), the limit is {MAX_SUBPROMPTS}")
    masks = req.region_masks
    if not isinstance(masks, tuple):
        raise RequestError(f"region_masks: {show_value(masks)} is not a list of masks")
    if masks and parts is None:
        raise RequestError("region_masks: the prompt has no AND; region masks need one mask per sub-prompt "
                           "(e.g. 'a forest AND a deer')")
    if masks and len(masks) != count:
        raise RequestError(f"region_masks: {len(masks)} masks for {count} sub-prompts (split by AND); give "
                           "one per sub-prompt")
    for i, m in enumerate(masks):
        if isinstance(m, str):
            _text(f"region_masks[{i}]", m, MAX_NAME_CHARS)
        elif m is None or isinstance(m, (bool, int, float, dict, list, tuple)):
            raise RequestError(f"region_masks[{i}]: {show_value(m)} is not an image or a path")


CONTROL_MODES = ("balanced", "prompt", "control")
RESIZE_MODES = ("resize", "crop", "fill")
MAX_CONTROL_UNITS = 8
MAX_IP_IMAGES = 16


def _finite_in(name: str, v: Any, lo: float, hi: float) -> None:
    """A unit's number: finite (else "is not a finite number"), then inside lo..hi."""
    if not _is_number(v) or not math.isfinite(v):
        raise RequestError(f"{name}: {show_value(v)} is not a finite number")
    _range(name, v, lo, hi)


def _check_unit_common(where: str, model: Any, start: Any, end: Any) -> None:
    if not isinstance(model, str) or not model:
        raise RequestError(f"{where}.model: {show_value(model)} is not a file name")
    _text(f"{where}.model", model, MAX_NAME_CHARS)
    for name, v in (("start", start), ("end", end)):
        _finite_in(f"{where}.{name}", v, 0.0, 1.0)
    if start > end:
        raise RequestError(f"{where}.start/end: {start:g} > {end:g}; need start <= end")


def _check_controls(req: GenerationRequest) -> None:
    """The control units' fields: types, ranges and names (which files exist is the pipeline's to check)."""
    if len(req.controls) > MAX_CONTROL_UNITS:
        raise RequestError(f"controls: {len(req.controls)} units, the limit is {MAX_CONTROL_UNITS}")
    for i, u in enumerate(req.controls):
        where = f"controls[{i}]"
        _check_unit_common(where, u.model, u.start, u.end)
        _finite_in(f"{where}.weight", u.weight, 0.0, 10.0)
        if u.image is None:
            raise RequestError(f"{where}.image: missing (each control unit needs its control image)")
        if isinstance(u.image, str):
            _text(f"{where}.image", u.image, MAX_NAME_CHARS)
        for name, allowed in (("control_mode", CONTROL_MODES), ("resize_mode", RESIZE_MODES)):
            v = getattr(u, name)
            if v not in allowed:
                raise RequestError(f"{where}.{name}: {show_value(v)} is not one of {', '.join(allowed)}")
        for name in ("control_type", "preprocessor"):
            v = getattr(u, name)
            if v is not None and not isinstance(v, str):
                raise RequestError(f"{where}.{name}: {show_value(v)} is not a name")
            _text(f"{where}.{name}", v, MAX_NAME_CHARS)
        for name in ("threshold_a", "threshold_b"):
            v = getattr(u, name)
            if v is not None and (not _is_number(v) or not math.isfinite(v)):
                raise RequestError(f"{where}.{name}: {show_value(v)} is not a finite number")
        if u.control_type is not None and control_names.union_type_id(u.control_type) is None:
            known = ", ".join(control_names.UNION_TYPE_NAMES)
            raise RequestError(f"{where}.control_type: {show_value(u.control_type)} is not a control type "
                               f"(known: {known})")
        pre = control_names.check_preprocessor(u.preprocessor or "none", f"{where}.preprocessor")
        control_names.thresholds(pre, u.threshold_a, u.threshold_b, f"{where}.")


def _check_ip_adapters(req: GenerationRequest) -> None:
    """The IP-Adapter units' fields: types, ranges, at least one image or face embedding each."""
    if len(req.ip_adapters) > MAX_CONTROL_UNITS:
        raise RequestError(f"ip_adapters: {len(req.ip_adapters)} units, the limit is {MAX_CONTROL_UNITS}")
    for i, u in enumerate(req.ip_adapters):
        where = f"ip_adapters[{i}]"
        _check_unit_common(where, u.model, u.start, u.end)
        _finite_in(f"{where}.scale", u.scale, -10.0, 10.0)
        if u.image_encoder is not None:
            if not isinstance(u.image_encoder, str) or not u.image_encoder:
                raise RequestError(f"{where}.image_encoder: {show_value(u.image_encoder)} is not a path")
            _text(f"{where}.image_encoder", u.image_encoder, MAX_NAME_CHARS)
        if not isinstance(u.images, tuple) or not isinstance(u.face_embeddings, tuple):
            raise RequestError(f"{where}.images: not a list of images")
        if not u.images and not u.face_embeddings:
            raise RequestError(f"{where}.images: none given (an IP-Adapter needs a reference image, or "
                               "face_embeddings for FaceID)")
        if len(u.images) + len(u.face_embeddings) > MAX_IP_IMAGES:
            raise RequestError(f"{where}.images: {len(u.images) + len(u.face_embeddings)} images, the limit "
                               f"is {MAX_IP_IMAGES}")
        for k, m in enumerate(u.images):
            if isinstance(m, str):
                _text(f"{where}.images[{k}]", m, MAX_NAME_CHARS)
            elif not (hasattr(m, "__fspath__") or (hasattr(m, "convert") and hasattr(m, "size"))):  # PIL
                raise RequestError(f"{where}.images[{k}]: {show_value(m)} is not an image or a path")
        for k, e in enumerate(u.face_embeddings):
            if not isinstance(e, tuple) or not 1 <= len(e) <= 4096 or not all(
                    _is_number(v) and math.isfinite(v) for v in e):
                raise RequestError(f"{where}.face_embeddings[{k}]: not a list of finite numbers (a face "
                                   "embedding has 512)")


def _check_hires(req: GenerationRequest, lim: Limits) -> None:
    """The hires-fix fields: ranges, a known upscaler and sampler, and the upscaled size within the pixel
    limit (once the first pass's size is known)."""
    _range("hires_scale", req.hires_scale, 0.0, MAX_HIRES_SCALE)
    for name in ("hires_width", "hires_height"):
        v = getattr(req, name)
        if v != 0 and not 8 <= v <= MAX_MICRO_SIZE:
            raise RequestError(f"{name}: {v} is outside 8..{MAX_MICRO_SIZE} (or 0 for none)")
    if not 0 <= req.hires_steps <= lim.max_steps:
        raise RequestError(f"hires_steps: {req.hires_steps} is outside 0..{lim.max_steps} (0 = steps)")
    _range("hires_strength", req.hires_strength, 0.01, 1.0)
    # a name that is not a latent mode or a resampler is a model upscaler file, looked up where the model is
    # loaded (the upscalers folder; a path where paths are allowed): `upscale.resolve_model_upscaler`
    if req.hires_sampler is not None or req.hires_schedule is not None:
        _sampler_and_schedule(req.hires_sampler or req.sampler, req.hires_schedule or req.schedule, False)
    if not req.hires:
        return
    if req.init_image is not None:
        raise RequestError("hires_scale: the hires fix is a txt2img pass; leave out init_image (or the hires "
                           "fields)")
    if req.width is None or req.height is None:
        return  # checked again by `resolve` with the model's size
    uw, uh, fw, fh = req.hires_size()
    which = "hires_width/hires_height" if req.hires_width or req.hires_height else "hires_scale"
    if min(fw, fh) < 8:
        raise RequestError(f"{which}: the upscaled size {uw}x{uh} is under 8 pixels a side")
    if max(uw * uh, fw * fh) > lim.max_pixels:
        raise RequestError(f"{which}: the upscaled size {uw}x{uh} = {uw * uh} pixels, the limit is "
                           f"{lim.max_pixels}")


def _range(name: str, v: float, lo: float, hi: float) -> None:
    if not (_is_number(v) and lo <= v <= hi):  # NaN fails both comparisons
        raise RequestError(f"{name}: {show_value(v)} is outside {lo:g}..{hi:g}")


def _sampler_and_schedule(sampler: str, schedule: str, zero_terminal_snr: bool,
                          edm: bool = False) -> tuple[str, str]:
    """Canonical (sampler, schedule). An old A1111 name ("DPM++ 2M Karras") carries its schedule; otherwise
    "automatic" gives the sampler's own, or "trailing" on a zero-terminal-SNR model (Lin et al. 2024: the
    Karras ramp from sigma_max = 4096 would spend half the steps on pure noise)."""
    try:
        name, implied = resolve_sampler(sampler)
        automatic = is_automatic(schedule)
        if implied is not None and automatic:
            schedule = implied
        elif automatic and zero_terminal_snr:
            schedule = "trailing"
        elif automatic and edm:  # continuous EDM models (Playground v2.5): Karras, as ComfyUI and diffusers
            schedule = "karras"
        return name, resolve_schedule(schedule, sampler=name)
    except ValueError as e:
        raise RequestError(str(e)) from None


def iteration_seeds(seed: int, batch: int, n_iter: int) -> list[int]:
    """The first seed of each of `n_iter` runs of a `batch`-image request (A1111's n_iter): seed + k * batch,
    so every image of every run has its own consecutive seed."""
    return [seed + k * batch for k in range(n_iter)]


@dataclass(frozen=True)
class RunOptions:
    """How to run, not what to draw: which files, where and how fast. The CLI's and the server's flags."""

    model: str | None = None  # a file, a folder, a name in models_dir, or "default" (the shipped model)
    unet: str | None = None  # a UNet-only file (Lightning, Turbo, DMD2) replacing the model's UNet
    refiner: str | None = None
    device: str | None = None  # None: cuda if available
    dtype: str = "fp32"
    vae_dtype: str | None = None  # None: the same as dtype
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    fast: bool = True  # the exact speed switches (fused projections, channels_last, oneDNN, SDPA)
    compile: bool = False  # torch.compile with an on-disk Inductor cache
    allow_pickle: bool = False
    controlnet_dir: str | None = None  # control models (ControlNet, T2I-Adapter): A1111's models/ControlNet
    ip_adapter_dir: str | None = None  # IP-Adapter files (names are looked up there; image encoders in its
    # image_encoder/ and clip_vision/ sub-folders)
    image_encoder: str | None = None  # the CLIP vision tower for IP-Adapters whose unit names none


@dataclass
class Limits:
    """Request limits (the server makes them configurable)."""

    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_batch: int = 8
    max_prompt_chars: int = 4000
