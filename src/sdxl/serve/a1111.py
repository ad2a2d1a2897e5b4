"""The AUTOMATIC1111 web-UI API subset (`/sdapi/v1/...`), so existing clients and plugins work unchanged.

Field names, defaults and response shapes follow A1111's `modules/api/models.py` and `api.py`
(see ../shared/ECOSYSTEM.md section 1). Generation requests go through the same queue as native jobs,
so they run in order with everything else; the route awaits the job and answers like A1111:
`{"images": [base64 PNG, ...], "parameters": <request echoed>, "info": "<JSON string>"}`, where `info`
holds `seed`, `all_seeds`, `infotexts` (one A1111 parameter text per image) and the other keys of A1111's
`Processed.js()`.

Mapping to `GenerationRequest`:
  prompt, negative_prompt ("" = none) | steps (50) | cfg_scale (7.0) -> cfg | width/height (omitted: the
  model's native size; A1111 would use 512, which SDXL draws badly) | seed (-1 = random) | batch_size ->
  batch | n_iter: the request runs n_iter times, seeds advancing by batch_size, as A1111 does |
  sampler_name ("DPM++ 2M", "Euler a", old "DPM++ 2M Karras" too; absent: sampler_index, default
  "Euler", as A1111's API) | scheduler ("Automatic": the sampler's preferred schedule, as A1111 1.9+, and
  "trailing" on a zero-terminal-SNR model). Sampler and scheduler go into the request as the client named
  them; the one resolve step, against the model that runs the job, makes them canonical (as for the CLI
  and the web UI), and `info` reports what ran |
  eta | refiner_checkpoint + refiner_switch_at | denoising_strength -> strength (img2img) |
  init_images[0], mask, mask_blur, inpainting_mask_invert (img2img) | override_settings:
  sd_model_checkpoint (a model name in the models folder) and CLIP_stop_at_last_layers -> clip_skip |
  enable_hr: hr_scale or hr_resize_x/y, hr_upscaler, hr_second_pass_steps, denoising_strength,
  hr_sampler_name, hr_scheduler, hr_prompt, hr_negative_prompt -> the hires_* fields (`_hires_fields`).

ControlNet: `alwayson_scripts.controlnet.args` units as sd-webui-controlnet takes them become the request's
control units and IP-Adapters, and `/controlnet/...` answers the extension's model_list, module_list,
settings, version and detect (both in `a1111_controlnet.py`); the infotext has its "ControlNet N" fields.

Features this server does not have are refused with 400 and a message rather than silently ignored,
because the client would get a different picture than it asked for: scripts,
`alwayson_scripts` other than ControlNet and Forge's built-in "FreeU Integrated" (args [enabled, b1, b2, s1,
s2]) and "Perturbed Attention Guidance Integrated" (args [enabled, scale]; the middle block), which map onto
the request's freeu* and pag_* fields (other extensions are refused), variation seeds
(`subseed_strength` > 0), tiling and saved styles. Purely cosmetic or server-side fields (restore_faces,
save_images, s_churn, ...) are accepted and ignored.

Control: /progress (with a live preview), /interrupt (the job ends; its answer includes the stopped image,
decoded from where sampling was, as A1111 does) and /skip (the current image stops and is kept, the next
iteration runs). Listings clients call when they connect answer in A1111's shapes with what this server
has: sd-models (each checkpoint once, refiners after base models), samplers, schedulers, loras, embeddings
(the textual inversions of the embeddings folder), options, cmd-flags, memory, upscalers (None, Lanczos,
Nearest and the model upscaler files of the upscalers folder), latent-upscale-modes, and empty lists for
sd-vae, sd-modules, prompt-styles, face-restorers, realesrgan-models, hypernetworks and scripts.
`extra-single-image` upscales one image (the extras tab's upscaler; see `upscalers.py`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
import warnings
from typing import Any

import torch
from fastapi import APIRouter, Header, HTTPException, Query
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from .. import upscale
from ..errors import RequestError
from ..metadata import parse_a1111
from ..request import (
    MAX_CLIP_SKIP,
    MAX_MASK_BLUR,
    GenerationRequest,
    show_value,
)
from ..sampling import SAMPLER_INFO, SCHEDULES
from ..sampling.names import A1111_SAMPLER_NAMES, A1111_SCHEDULE_NAMES, is_automatic
from ..upscale_models import png_bytes
from ..version import __version__
from .a1111_controlnet import CONTROLNET_SCRIPT, controlnet_units
from .control_files import strip_title
from .jobs import JobNotFinished, check_idempotency_key, request_digest
from .previews import encode_image
from .service import Service
from .store import CANCELLED, DONE, TERMINAL, Job
from .upscalers import UpscalerHost

MAX_OPTIONS = 1000  # option keys kept (A1111 clients post back the whole options dict)
MAX_OPTION_TEXT = 1024  # characters of an option this server does not use


def _whole(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


# What each option this server knows may hold. A value outside is refused when it is set (400, nothing
# changes), so no stored option can make a later request fail. `CLIP_stop_at_last_layers` is checked by
# building a request with it (`to_request`); other keys (A1111 has hundreds) are kept as sent, within limits.
OPTION_CHECKS = {
    "sd_vae": (lambda v: v in ("Automatic", "None"), "'Automatic' or 'None' (checkpoints use their own VAE)"),
    "samples_format": (lambda v: v == "png", "'png' (results are PNG files)"),
    "eta_noise_seed_delta": (_whole(0, 2**32 - 1), "a whole number in 0..2^32-1"),
    "live_previews_enable": (lambda v: isinstance(v, bool), "true or false"),
    "show_progress_every_n_steps": (_whole(-1, 1000), "a whole number in -1..1000"),
}


# ------------------------------------------------------------------------------------------------ bodies
class _A1111Body(BaseModel):
    """Fields shared by txt2img and img2img. Unknown fields are accepted (A1111 clients send many). Types
    are strict (no bool for a number, no "5" for 5), as the request's own validation is: pydantic's lax
    mode would turn `"steps": true` into one step before anything could see it."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="default: the model's native size")
    height: int | None = Field(None, description="default: the model's native size")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgBody(_A1111Body):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgBody(_A1111Body):
    init_images: list[str] = Field(default_factory=list, description="base64 images; the first is used")
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="base64 mask, white = repaint")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PngInfoBody(BaseModel):
    model_config = ConfigDict(strict=True)

    image: str = Field(..., description="base64 PNG (a data: URL is fine)")


class ExtrasSingleImageBody(BaseModel):
    """A1111's extras tab for one image: upscaling only (face restoration and a second upscaler are
    refused when their visibility is above 0). resize_mode 0: by `upscaling_resize`; 1: to
    `upscaling_resize_w` x `upscaling_resize_h` (scaled to cover it, cropped to it when `upscaling_crop`)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    image: str = Field(..., description="base64 image (a data: URL is fine)")
    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


# ------------------------------------------------------------------------------------------------ helpers
# Our normalised infotext keys (sdxl.metadata.parse_a1111) -> the labels A1111's png-info returns.
_LABELS = {
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "steps": "Steps", "cfg": "CFG scale",
    "seed": "Seed", "clip_skip": "Clip skip", "denoising_strength": "Denoising strength",
    "refiner_switch": "Refiner switch at", "model_hash": "Model hash", "model": "Model",
    "vae_hash": "VAE hash", "vae": "VAE", "rng": "RNG", "emphasis": "Emphasis", "version": "Version",
    "user": "User",
    "hires_steps": "Hires steps", "hires_upscale": "Hires upscale", "hires_upscaler": "Hires upscaler",
    "hires_prompt": "Hires prompt", "hires_negative_prompt": "Hires negative prompt",
}  # fmt: skip


def a1111_labels(parsed: dict[str, Any]) -> dict[str, Any]:
    """`parse_a1111`'s normalised dict -> the dict A1111's /png-info returns ("Steps", "Sampler",
    "Size-1" (width), "Size-2" (height), ...). Keys without a known label keep the label they were read
    with."""
    out: dict[str, Any] = {}
    for key, value in parsed.items():
        if key == "sampler":
            out["Sampler"] = A1111_SAMPLER_NAMES.get(value, value)
        elif key == "schedule":
            out["Schedule type"] = A1111_SCHEDULE_NAMES.get(value, value)
        elif key == "hires_sampler":
            out["Hires sampler"] = A1111_SAMPLER_NAMES.get(value, value)
        elif key == "hires_schedule":
            out["Hires schedule type"] = A1111_SCHEDULE_NAMES.get(value, value)
        elif key in ("width", "height"):
            out["Size-1" if key == "width" else "Size-2"] = value
        elif key in ("hires_width", "hires_height"):
            out["Hires resize-1" if key == "hires_width" else "Hires resize-2"] = value
        elif key == "refiner":
            h = parsed.get("refiner_hash")
            out["Refiner"] = f"{value} [{h}]" if h else value
        elif key in ("lora_hashes", "ti_hashes") and isinstance(value, dict):
            label = "Lora hashes" if key == "lora_hashes" else "TI hashes"
            out[label] = ", ".join(f"{n}: {h}" for n, h in value.items())
        elif key != "refiner_hash":
            out[_LABELS.get(key, key)] = value
    return out


def _script_args(title: str, value: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """An `alwayson_scripts` entry ({"args": [...]}, as A1111 clients send it) -> {name: arg}."""
    args = value.get("args") if isinstance(value, dict) else value
    if not isinstance(args, list) or len(args) != len(names):
        raise RequestError(f"alwayson_scripts.{title}.args: expected [{', '.join(names)}]")
    if not isinstance(args[0], bool):
        raise RequestError(f"alwayson_scripts.{title}.args[0]: {show_value(args[0])} is not true or false")
    return dict(zip(names, args))


def _forge_freeu(title: str, value: Any) -> dict[str, Any]:
    a = _script_args(title, value, ("enabled", "b1", "b2", "s1", "s2"))
    if not a["enabled"]:
        return {}
    return {"freeu": True, "freeu_b1": a["b1"], "freeu_b2": a["b2"], "freeu_s1": a["s1"], "freeu_s2": a["s2"]}


def _forge_pag(title: str, value: Any) -> dict[str, Any]:
    a = _script_args(title, value, ("enabled", "scale"))
    # Forge perturbs the middle block's self-attention: diffusers' (and our) "mid"
    return {"pag_scale": a["scale"], "pag_layers": "mid"} if a["enabled"] else {}


# Forge's built-in always-on scripts, by title as clients send it (any case) -> the request fields they set.
# Their values are checked by the request's own validation, under the request's field names.
FORGE_SCRIPT_TITLES = ("FreeU Integrated", "Perturbed Attention Guidance Integrated")
FORGE_SCRIPTS = {"freeu integrated": _forge_freeu, "perturbed attention guidance integrated": _forge_pag}


def _hires_fields(body: Txt2ImgBody) -> dict[str, Any]:
    """A1111's hires-fix fields -> the request's: hr_resize_x/y (0 = none) or else hr_scale, hr_upscaler
    (none: "Latent", A1111's default mode), hr_second_pass_steps (0 = the first pass's), denoising_strength
    (none: 0.75, A1111's API default), hr_sampler_name / hr_scheduler ("Use same ..." or none: the first
    pass's), hr_prompt / hr_negative_prompt ("": the first pass's)."""
    out: dict[str, Any] = {"hires_upscaler": body.hr_upscaler or "Latent",
                           "hires_steps": body.hr_second_pass_steps}
    if body.hr_resize_x or body.hr_resize_y:
        out["hires_width"], out["hires_height"] = body.hr_resize_x, body.hr_resize_y
    else:
        out["hires_scale"] = body.hr_scale
    out["hires_strength"] = 0.75 if body.denoising_strength is None else body.denoising_strength
    if body.hr_sampler_name and body.hr_sampler_name != "Use same sampler":
        out["hires_sampler"] = body.hr_sampler_name
    if body.hr_scheduler and body.hr_scheduler != "Use same scheduler":
        out["hires_schedule"] = "automatic" if is_automatic(body.hr_scheduler) else body.hr_scheduler
    if body.hr_prompt:
        out["hires_prompt"] = body.hr_prompt
    if body.hr_negative_prompt:
        out["hires_negative_prompt"] = body.hr_negative_prompt
    return out


def _refuse_unsupported(body: _A1111Body) -> None:
    hr_checkpoint = getattr(body, "hr_checkpoint_name", None)
    if getattr(body, "enable_hr", False) and hr_checkpoint and hr_checkpoint != "Use same checkpoint":
        raise RequestError(f"hr_checkpoint_name: {show_value(hr_checkpoint)}; the hires pass runs on the "
                           "first pass's model here (send 'Use same checkpoint' or leave it out)")
    if body.script_name:
        raise RequestError(f"script_name: scripts are not supported ({body.script_name!r})")
    unknown = sorted(k for k in body.alwayson_scripts
                     if k.strip().lower() not in FORGE_SCRIPTS and k.strip().lower() != CONTROLNET_SCRIPT)
    if unknown:
        raise RequestError(f"alwayson_scripts: extensions are not supported ({', '.join(unknown)}); "
                           f"built in: ControlNet, {', '.join(FORGE_SCRIPT_TITLES)}")
    if body.subseed_strength:
        raise RequestError("subseed_strength: variation seeds are not supported")
    if body.tiling:
        raise RequestError("tiling: seamless tiling is not supported")
    if body.styles:
        raise RequestError("styles: saved styles are not supported; put the text in the prompt")


class A1111:
    """State and conversions for the A1111 routes."""

    def __init__(self, service: Service):
        self.service = service
        self.options: dict[str, Any] = {
            "CLIP_stop_at_last_layers": 1,
            "sd_vae": "Automatic",
            "samples_format": "png",
            "eta_noise_seed_delta": 0,
            "live_previews_enable": service.settings.preview != "off",
            "show_progress_every_n_steps": service.settings.preview_every,
        }

    # ---------------------------------------------------------- models
    def model_name(self, title: str | None) -> str | None:
        """An A1111 checkpoint title or name -> our model name (None = the default model)."""
        if title is None or not str(title).strip() or str(title).strip().lower() == "none":
            return None
        name = strip_title(str(title))
        models = self.service.models
        if models.is_default(name):
            return None
        models.resolve(name)  # BadName / NameNotFound
        return name

    def current_title(self) -> str:
        models = self.service.models
        if models.default_name is not None:
            return models.default_name
        for entry in models.catalog():
            if entry.is_default:
                return entry.name
        path = models.default_path()
        return path.name if path is not None else "default"

    # ---------------------------------------------------------- requests
    def to_request(self, body: _A1111Body, width_height: tuple[int, int] | None = None,
                   options: dict[str, Any] | None = None,
                   init: Image.Image | None = None) -> GenerationRequest:
        """An A1111 body -> a request. Sampler and scheduler go in as the client named them ("DPM++ 2M",
        "DPM++ 2M Karras", "Karras"; "Automatic" or none -> "automatic"): the one resolve step, against the
        model that runs the job, turns them into our names (so "Automatic" is "trailing" on a
        zero-terminal-SNR model, as in the CLI and the web UI). Unknown names fail validation (400) when the
        job is submitted. Width and height left out are the model's native size (`width_height`: img2img's
        default, the init image's size). `options`: the global options to apply (default: the current
        ones; `set_options` passes the candidate ones to test them). `init`: img2img's init image, the
        control image of ControlNet units that send none (as the extension does)."""
        _refuse_unsupported(body)
        overrides = body.override_settings or {}
        opts = {**(self.options if options is None else options), **overrides}
        model = None
        if "sd_model_checkpoint" in overrides:
            model = self.model_name(opts.get("sd_model_checkpoint"))
        default_w, default_h = width_height if width_height is not None else (None, None)
        clip = opts.get("CLIP_stop_at_last_layers", 1)
        where = "override_settings.CLIP_stop_at_last_layers" if "CLIP_stop_at_last_layers" in overrides else (
            "CLIP_stop_at_last_layers")
        if isinstance(clip, bool) or not isinstance(clip, int) or not 1 <= clip <= MAX_CLIP_SKIP + 1:
            raise RequestError(f"{where}: {show_value(clip)} is not a whole number in 1..{MAX_CLIP_SKIP + 1}")
        clip_skip = max(1, clip - 1)  # A1111 on SDXL: 1 and 2 are both the penultimate layer
        changes: dict[str, Any] = {}
        for title, value in body.alwayson_scripts.items():
            if title.strip().lower() == CONTROLNET_SCRIPT:
                controls, ip_adapters = controlnet_units(self.service, title, value, init,
                                                         bool(getattr(body, "enable_hr", False)))
                changes.update(controls=controls, ip_adapters=ip_adapters)
            else:
                changes.update(FORGE_SCRIPTS[title.strip().lower()](title, value))
        if body.eta is not None:
            changes["eta"] = body.eta
        if body.refiner_checkpoint and strip_title(body.refiner_checkpoint).lower() != "none":
            changes["refiner"] = strip_title(body.refiner_checkpoint)
            if body.refiner_switch_at is not None:
                changes["refiner_switch"] = body.refiner_switch_at
        if getattr(body, "enable_hr", False):
            changes.update(_hires_fields(body))
        return GenerationRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt or None,
            width=body.width or default_w,
            height=body.height or default_h,
            steps=body.steps,
            cfg=body.cfg_scale,
            sampler=body.sampler_name or body.sampler_index or "Euler",
            schedule="automatic" if is_automatic(body.scheduler) else body.scheduler,
            seed=None if body.seed == -1 else body.seed,  # A1111: -1 = random; other negatives are refused
            batch=body.batch_size,
            clip_skip=clip_skip,
            model=model,
            **changes,
        )

    def info_json(self, job: Job, body: _A1111Body) -> str:
        """A1111's `Processed.js()` keys (the ones that mean something here), from the request as it ran."""
        req = job.resolved or job.request
        seeds = job.seeds or [req.get("seed")]
        prompts = [req["prompt"]] * len(seeds)
        negatives = [req.get("negative_prompt") or ""] * len(seeds)
        path = self.service.models.default_path() if req.get("model") is None else None
        return json.dumps({
            "prompt": req["prompt"],
            "all_prompts": prompts,
            "negative_prompt": req.get("negative_prompt") or "",
            "all_negative_prompts": negatives,
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(seeds),
            "subseed_strength": 0,
            "width": req["width"],
            "height": req["height"],
            "sampler_name": A1111_SAMPLER_NAMES.get(req["sampler"], req["sampler"]),
            "scheduler": A1111_SCHEDULE_NAMES.get(req["schedule"], req["schedule"]),
            "cfg_scale": req["cfg"],
            "steps": req["steps"],
            "batch_size": req["batch"],
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": req.get("model") or (path.stem if path else None),
            "sd_model_hash": None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": req["strength"] if req.get("init_image") else body.denoising_strength,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": job.infos,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
            "clip_skip": req["clip_skip"] + 1,
            "is_using_inpainting_conditioning": False,
            "version": f"sdxl {__version__}",
        })

    def response(self, job: Job, body: _A1111Body, parameters: dict[str, Any]) -> dict[str, Any]:
        """A finished job as A1111 answers it; an interrupted one (cancelled) returns the images it made,
        the stopped one included. A job that is not finished (the server stopped first) is JobNotFinished:
        503 naming the job, which runs after the restart."""
        if job.status not in TERMINAL:
            raise JobNotFinished(job.id)
        if job.status not in (DONE, CANCELLED):
            raise HTTPException(500, f"generation failed: {job.error}")
        images = []
        if body.send_images:
            for name in job.images:
                images.append(base64.b64encode(self.service.manager.output_path(name).read_bytes()).decode())
        return {"images": images, "parameters": parameters, "info": self.info_json(job, body)}


def memory_report() -> dict[str, Any]:
    """A1111's /memory: `ram` (this process's resident memory as "used", the machine's total, and
    total - used as "free", as A1111 computes it) and `cuda` (the device's free/total and torch's
    allocator counters, or {"error": ...})."""
    try:
        total, used = _ram_total_and_rss()
        ram: dict[str, Any] = {"free": total - used, "used": used, "total": total}
    except (OSError, ValueError) as e:
        ram = {"error": str(e)}
    if torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info()
            s = torch.cuda.memory_stats()

            def pair(key: str) -> dict[str, int]:
                return {"current": int(s.get(f"{key}.all.current", 0)),
                        "peak": int(s.get(f"{key}.all.peak", 0))}

            cuda: dict[str, Any] = {
                "system": {"free": free, "used": total - free, "total": total},
                "active": pair("active_bytes"),
                "allocated": pair("allocated_bytes"),
                "reserved": pair("reserved_bytes"),
                "inactive": pair("inactive_split_bytes"),
                "events": {"retries": int(s.get("num_alloc_retries", 0)), "oom": int(s.get("num_ooms", 0))},
            }
        except RuntimeError as e:
            cuda = {"error": str(e)}
    else:
        cuda = {"error": "unavailable"}
    return {"ram": ram, "cuda": cuda}


def _ram_total_and_rss() -> tuple[int, int]:
    """(physical memory, this process's resident set) in bytes: /proc on Linux, else sysconf and the
    peak resident set from `resource` (the closest number those systems give without psutil)."""
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        return total, rss
    import resource  # lazy: POSIX-only module, needed only off Linux

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return total, peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _read_png_text(data_b64: str, service: Service) -> tuple[str, dict[str, Any]]:
    """(A1111 parameters text, other text chunks) of an uploaded image, without converting its pixels."""
    text = data_b64.partition(",")[2] if data_b64.startswith("data:") else data_b64
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except ValueError:
        raise RequestError("image: not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max(service.settings.limits.max_pixels * 4, 4096 * 4096):
                raise RequestError(f"image: {w}x{h} pixels is larger than the server accepts")
            img.load()  # text chunks after the pixel data are read only on load
    except RequestError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise RequestError(f"image: cannot decode ({type(e).__name__}: {e})") from None
    items = {k: v for k, v in img.info.items() if isinstance(v, str)}
    return items.pop("parameters", ""), items


# ------------------------------------------------------------------------------------------------ routes
def make_router(service: Service) -> APIRouter:
    api = A1111(service)
    manager = service.manager
    upscaler_host = UpscalerHost(service.settings)
    r = APIRouter(prefix="/sdapi/v1", tags=["a1111"])

    def idempotency(route: str, body: _A1111Body, key: str | None) -> tuple[str, str] | None:
        key = check_idempotency_key(key, "Idempotency-Key header")
        return (key, request_digest(route, body.model_dump())) if key is not None else None

    idempotency_header = Header(None, alias="Idempotency-Key", description=(
        "makes retries safe: a request sent again with the same key waits for and returns the first job's "
        "images instead of making new ones, also after a restart (1 to 128 letters, digits, "
        ". _ : ~ + / = -)"))

    @r.post("/txt2img")
    async def txt2img(body: Txt2ImgBody, idempotency_key: str | None = idempotency_header) -> dict[str, Any]:
        """A1111 txt2img: waits for the image(s) and returns them base64-encoded with `info`. When the
        server shuts down before the job finished: 503 with Retry-After and `job` (the job's id)."""
        req = api.to_request(body)
        job = service.submit(req, n_iter=body.n_iter, source="a1111",
                             idempotency=idempotency("txt2img", body, idempotency_key))
        job = await manager.wait(job.id)
        return api.response(job, body, body.model_dump())

    @r.post("/img2img")
    async def img2img(body: Img2ImgBody, idempotency_key: str | None = idempotency_header) -> dict[str, Any]:
        """A1111 img2img / inpainting (`mask`, white = repaint). Shutdown and retries: as txt2img."""
        if not body.init_images:
            raise RequestError("init_images: give at least one base64 image")
        init = service.decode_image(body.init_images[0], "init_images[0]")
        # default size: the init image's, rounded down to a multiple of 8
        size = (max(8, init.width // 8 * 8), max(8, init.height // 8 * 8))
        req = api.to_request(body, size, init=init)
        req = req.replace(strength=0.75 if body.denoising_strength is None else body.denoising_strength,
                          init_image=init)
        if body.mask:
            mask = service.decode_image(body.mask, "mask").convert("L")
            if body.inpainting_mask_invert not in (0, 1):
                raise RequestError(f"inpainting_mask_invert: {body.inpainting_mask_invert} is not 0 or 1")
            if body.mask_blur is not None:
                blur = body.mask_blur
            else:  # A1111 blurs x and y apart; one radius here, so the larger (each checked as mask_blur is)
                for name in ("mask_blur_x", "mask_blur_y"):
                    if not 0 <= getattr(body, name) <= MAX_MASK_BLUR:
                        raise RequestError(f"{name}: {getattr(body, name)} is outside 0..{MAX_MASK_BLUR}")
                blur = max(body.mask_blur_x, body.mask_blur_y)
            req = req.replace(mask_image=ImageOps.invert(mask) if body.inpainting_mask_invert else mask,
                              mask_blur=blur)
        job = service.submit(req, n_iter=body.n_iter, source="a1111",
                             idempotency=idempotency("img2img", body, idempotency_key))
        job = await manager.wait(job.id)
        params = body.model_dump()
        if not body.include_init_images:
            params["init_images"] = None
            params["mask"] = None
        return api.response(job, body, params)

    @r.get("/progress")
    def progress(skip_current_image: bool = Query(False)) -> dict[str, Any]:
        """Progress of the running job (0 when idle), with a live preview as base64 PNG. Previews are
        made while someone polls, so the first poll of a job may have none yet."""
        job = manager.current()
        queued = manager.queued_count()
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False, "stopping_generation": False,
                              "job": "", "job_count": queued, "job_timestamp": "0", "job_no": 0,
                              "sampling_step": 0, "sampling_steps": 0}}
        elapsed = time.time() - (job.started_at or time.time())
        eta = elapsed / job.progress - elapsed if job.progress > 0 else 0.0
        image = None
        if not skip_current_image:
            preview = manager.polled_preview(job)
            image = encode_image(preview, "PNG") if preview is not None else None
        return {
            "progress": job.progress,
            "eta_relative": eta,
            "current_image": image,
            "textinfo": f"{job.stage} step {job.step}/{job.total}" if job.total else "starting",
            "state": {
                "skipped": job.stop_reason == "skip",
                "interrupted": job.stop_reason in ("interrupt", "cancel"),
                "stopping_generation": False,
                "job": f"task({job.id})",
                "job_count": job.n_iter,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
                "job_no": job.iteration,
                "sampling_step": job.step,
                "sampling_steps": job.total,
                "queued": queued,
            },
        }

    @r.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        """Stop the running job after its current step. The answer to its txt2img/img2img call holds the
        images it finished and the stopped one, decoded from where sampling was."""
        manager.interrupt_current()
        return {}

    @r.post("/skip")
    def skip() -> dict[str, Any]:
        """Stop the running job's current image (iteration) after its current step, keep it as it is, and
        go on with the job's next iteration (A1111's Skip)."""
        manager.skip_current()
        return {}

    @r.post("/png-info")
    def png_info(body: PngInfoBody) -> dict[str, Any]:
        """Read generation parameters back from an image (A1111 text, parsed into a dict)."""
        info, items = _read_png_text(body.image, service)
        try:
            parameters = a1111_labels(parse_a1111(info)) if info else {}
        except ValueError:  # text that is not an infotext: return it raw, as A1111 does
            parameters = {}
        return {"info": info, "items": items, "parameters": parameters}

    @r.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        by_label: dict[str, dict[str, Any]] = {}
        for name, info in SAMPLER_INFO.items():
            entry = by_label.setdefault(info.label, {"name": info.label, "aliases": [], "options": {}})
            entry["aliases"].append(name)
        return list(by_label.values())

    @r.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        names = ["automatic", *SCHEDULES]
        return [{"name": n, "label": A1111_SCHEDULE_NAMES.get(n, n), "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for n in names]

    @r.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        """Every checkpoint once: the default model first, then the models folder's, base models before
        refiners (a refiner's title is what `refiner_checkpoint` takes). Titles are the names requests
        use (relative to the models folder)."""
        out = []
        for e in service.models.catalog():
            stem = e.name[: -len(".safetensors")] if e.name.endswith(".safetensors") else e.name
            out.append({"title": e.name, "model_name": stem.rsplit("/", 1)[-1], "hash": None, "sha256": None,
                        "filename": e.name, "config": None})
        return out

    @r.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        """Separate VAE files: none (every checkpoint uses its own VAE; `sd_vae` is "Automatic")."""
        return []

    @r.get("/sd-modules")
    def sd_modules() -> list[dict[str, Any]]:
        """Forge's extra modules (VAE / text encoder files): none."""
        return []

    @r.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        """The pixel upscalers (None, Lanczos, Nearest: what a hires fix may name), then the model upscaler
        files of the upscalers folder (what extra-single-image may name), in A1111's shape."""
        return upscaler_host.listing()

    @r.post("/extra-single-image")
    def extra_single_image(body: ExtrasSingleImageBody) -> dict[str, Any]:
        """Upscale one image (A1111's extras tab). Runs at once in this request on the server's device, one
        upscale at a time (not through the job queue). The answer's PNG keeps the upload's text chunks and
        appends A1111's "Postprocess upscale by / upscaler" fields to its infotext; `html_info` holds them."""
        for field in ("gfpgan_visibility", "codeformer_visibility", "extras_upscaler_2_visibility"):
            if getattr(body, field) > 0:
                raise RequestError(f"{field}: face restoration and a second upscaler are not supported")
        image = service.decode_image(body.image, "image")
        params, chunks = _read_png_text(body.image, service)
        w, h = image.size
        if body.resize_mode == 0:
            by = body.upscaling_resize
        elif body.resize_mode == 1:
            tw, th = body.upscaling_resize_w, body.upscaling_resize_h
            if tw < 1 or th < 1:
                raise RequestError("upscaling_resize_w, upscaling_resize_h: must be at least 1")
            by = max(tw / w, th / h)
        else:
            raise RequestError(f"resize_mode: {body.resize_mode} is not 0 (scale by) or 1 (scale to)")
        out, extras = upscaler_host.upscale(image, body.upscaler_1, by,
                                            max_pixels=service.max_upload_pixels())
        if body.resize_mode == 1 and body.upscaling_crop and out.size != (tw, th):
            left, top = (out.width - tw) // 2, (out.height - th) // 2
            out = out.crop((left, top, left + tw, top + th))
        chunks = {k: v for k, v in chunks.items() if isinstance(v, str) and k != "parameters"}
        chunks["parameters"] = f"{params}, {extras}" if params else extras
        data = png_bytes(out, chunks)
        return {"html_info": extras, "image": base64.b64encode(data).decode("ascii")}

    @r.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        """The hires fix's latent modes ("Latent", "Latent (bicubic antialiased)", ...), in A1111's shape."""
        return [{"name": name} for name in upscale.LATENT_MODES]

    @r.get("/face-restorers")
    def face_restorers() -> list[dict[str, Any]]:
        return []

    @r.get("/realesrgan-models")
    def realesrgan_models() -> list[dict[str, Any]]:
        return []

    @r.get("/hypernetworks")
    def hypernetworks() -> list[dict[str, Any]]:
        return []

    @r.get("/prompt-styles")
    def prompt_styles() -> list[dict[str, Any]]:
        """Saved styles: none (requests naming `styles` are refused)."""
        return []

    @r.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        """Always-on scripts this server runs (ControlNet, Forge's built-in FreeU and PAG), by A1111's
        lowercase name; requests naming others are refused."""
        names = [CONTROLNET_SCRIPT, *(t.lower() for t in FORGE_SCRIPT_TITLES)]
        return {"txt2img": names, "img2img": list(names)}

    @r.get("/embeddings")
    def embeddings() -> dict[str, Any]:
        """Textual-inversion embeddings the default model has loaded, in A1111's shape."""
        return {"loaded": _embeddings(service), "skipped": {}}

    @r.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        """How this server was started, under A1111's flag names where one exists (never the API key)."""
        st = service.settings
        return {
            "api": True,
            "nowebui": False,
            "listen": st.host not in ("127.0.0.1", "localhost", "::1"),
            "server_name": st.host,
            "port": st.port,
            "ckpt": str(service.models.startup_default_path() or ""),
            "ckpt_dir": str(st.models_dir) if st.models_dir else None,
            "lora_dir": str(st.loras_dir) if st.loras_dir else None,
            "data_dir": str(st.data_path),
            "api_auth": bool(st.api_key),
            "cors_allow_origins": ",".join(st.allowed_origins) or None,
            "device": st.device,
            "dtype": st.dtype,
            "threads": torch.get_num_threads(),
            "compile": st.compile,
            "preview": st.preview,
        }

    @r.get("/memory")
    def memory() -> dict[str, Any]:
        """RAM and CUDA memory, in A1111's shape (see `memory_report`)."""
        return memory_report()

    @r.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return [{"name": rel.with_suffix("").name, "alias": rel.with_suffix("").name, "path": str(rel),
                 "metadata": {}} for rel in service.models.list_loras()]

    @r.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict[str, Any]:
        """Listings are read from the folders on every call; nothing to refresh."""
        return {}

    @r.post("/refresh-loras")
    def refresh_loras() -> dict[str, Any]:
        return {}

    @r.post("/refresh-vae")
    def refresh_vae() -> dict[str, Any]:
        return {}

    @r.get("/options")
    def get_options() -> dict[str, Any]:
        return {**api.options, "sd_model_checkpoint": api.current_title()}

    @r.post("/options")
    def set_options(body: dict[str, Any]) -> dict[str, Any]:
        """Change options. `sd_model_checkpoint` switches the default model (a name in the models folder);
        other keys are stored and used as defaults for later A1111 requests where they mean something.
        Options are checked before anything is stored: a value that would make every later request fail
        (say `CLIP_stop_at_last_layers: 1000`) is refused with 400 and nothing changes."""
        candidate = {**api.options, **{k: v for k, v in body.items() if k != "sd_model_checkpoint"}}
        if len(candidate) > MAX_OPTIONS:
            raise RequestError(f"options: more than {MAX_OPTIONS} keys")
        for key, value in body.items():
            check = OPTION_CHECKS.get(key)
            if check is not None and not check[0](value):
                raise RequestError(f"{key}: {show_value(value)} is not {check[1]}; nothing was changed")
            if len(json.dumps(value)) > MAX_OPTION_TEXT:
                raise RequestError(f"{key}: longer than {MAX_OPTION_TEXT} characters; nothing was changed")
        try:
            # a minimal request under the candidate options: what they change is all that can fail
            req = api.to_request(Txt2ImgBody(width=8, height=8, steps=1), options=candidate)
            title = body.get("sd_model_checkpoint")
            if "sd_model_checkpoint" in body:
                if title is not None and not isinstance(title, str):
                    raise RequestError("sd_model_checkpoint: must be a model name")
                api.model_name(title)  # BadName / NameNotFound before anything changes
            try:
                config = service.models.default_config() if title is None else None
            except Exception:  # noqa: BLE001 - no readable default model: the ranges alone are checked
                config = None
            req.resolve(config, service.settings.limits)
        except RequestError as e:
            raise RequestError(f"options: {e}; nothing was changed") from None
        if "sd_model_checkpoint" in body:
            title = body["sd_model_checkpoint"]
            service.models.set_default(strip_title(title) if title else None)
        api.options = candidate
        return {}

    return r


def _embeddings(service: Service) -> dict[str, Any]:
    """A1111's `loaded` embeddings: {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}} for
    the textual inversions of the default model (`shape`: the vector width of its widest tower). Empty when
    no embeddings folder is configured, or before the default model is loaded."""
    pipe = service.models.loaded_default()
    library = getattr(pipe, "embeddings", None)
    if not library:
        return {}
    out: dict[str, Any] = {}
    for name in library.names:
        ti = library[name]
        width = max(int(v.shape[-1]) for v in ti.vectors.values())
        out[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                     "vectors": ti.num_vectors}
    return out
