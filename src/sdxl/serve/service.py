"""What the route modules share (`app.py`: native API and web UI; `a1111.py`: the A1111 subset):
settings, models, the job manager, and turning a client's request into a queued job.

Both route modules import this one; neither imports the other's internals, so there is no import cycle.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from ..control import resolve_control_model
from ..data.buckets import scaled_buckets
from ..data.images import load_image, to_rgb
from ..errors import RequestError
from ..prompts import PromptError, extract_loras
from ..request import MAX_CONTROL_UNITS, MAX_IP_IMAGES, MAX_SUBPROMPTS, GenerationRequest
from ..sampling import A1111_SCHEDULE_NAMES, SAMPLER_INFO, SCHEDULES
from ..upscale import is_upscaler, resolve_model_upscaler
from ..version import __version__
from .control_files import control_dirs, store_image
from .jobs import Job, JobManager
from .modelhost import ModelHost
from .settings import ServeSettings

log = logging.getLogger(__name__)

OUTPUT_PREFIX = "output:"  # an init image given as the name of a previous result


class Service:
    """Settings, models and the job manager, with request preparation and the UI's listing."""

    def __init__(self, settings: ServeSettings, models: ModelHost, manager: JobManager):
        self.settings = settings
        self.models = models
        self.manager = manager

    # ---------------------------------------------------------- images from clients
    def decode_image(self, text: str, what: str) -> Image.Image:
        """Base64 (optionally a data: URL) -> upright RGB PIL image. Raises RequestError (400)."""
        if not isinstance(text, str) or not text:
            raise RequestError(f"{what}: expected a base64-encoded image")
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{what}: not valid base64") from None
        max_pixels = self.max_upload_pixels()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                w, h = img.size
                if w * h > max_pixels:
                    raise RequestError(f"{what}: {w}x{h} pixels, more than the server accepts ({max_pixels})")
                img.load()
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # noqa: BLE001 - a broken orientation tag: keep the stored orientation
                    pass
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
            raise RequestError(f"{what}: cannot decode the image ({type(e).__name__}: {e})") from None
        return to_rgb(img).copy()

    def max_upload_pixels(self) -> int:
        return max(self.settings.limits.max_pixels * 4, 4096 * 4096)

    def image_ref(self, value: str, what: str) -> Image.Image:
        """An init/mask image: base64 data, or 'output:NAME' (a result of this server)."""
        if value.startswith(OUTPUT_PREFIX):
            return load_image(self.manager.output_path(value[len(OUTPUT_PREFIX):]))
        return self.decode_image(value, what)

    # ---------------------------------------------------------- checking and queueing
    def check_names(self, req: GenerationRequest) -> None:
        """Every model / refiner / LoRA / control model name must resolve inside its folder (BadName 400,
        NameNotFound 404), including LoRAs named inline in the prompt (`<lora:name:0.8>`)."""
        if not self.models.is_default(req.model):
            self.models.resolve(req.model)
        if req.refiner:
            self.models.resolve_refiner(req.refiner)
        for spec in req.loras:
            self.models.resolve_lora(spec.name)
        dirs = control_dirs(self.settings, existing=False)
        for i, unit in enumerate(req.controls):  # names inside the control models folder only
            resolve_control_model(unit.model, dirs, allow_paths=False, where=f"controls[{i}].model")
        if req.hires and not is_upscaler(req.hires_upscaler):  # a model upscaler in the upscalers folder
            folder = self.settings.upscalers_dir
            resolve_model_upscaler(req.hires_upscaler, [folder] if folder else [], allow_paths=False)
        for text in (req.prompt, req.prompt_2, req.negative_prompt, req.negative_prompt_2):
            if not text:
                continue
            try:
                _, loras = extract_loras(text)
            except PromptError as e:
                raise RequestError(f"prompt: {e}") from None
            for ref in loras:
                self.models.resolve_lora(ref.name)

    def submit(self, req: GenerationRequest, n_iter: int = 1, source: str = "api",
               idempotency: tuple[str, str] | None = None) -> Job:
        """Validate a request against the limits and the folders, store its images, queue it.
        `req.init_image` / `req.mask_image` are decoded PIL images here (see `request_from_body`).

        Validation checks every field, sampler and schedule names included (400 with the field's name),
        but resolves nothing: "automatic" and A1111 labels stay as the client sent them, and the worker
        resolves them once, against the model it runs (`GenerationRequest.resolve`). `idempotency`: the
        client's key and a digest of its body (`JobManager.submit`: a known key returns its job)."""
        req.validate(self.settings.limits)
        if n_iter < 1:
            raise RequestError(f"n_iter: {n_iter} must be at least 1")
        if req.batch * n_iter > self.settings.max_images_per_job:
            raise RequestError(f"batch_size x n_iter = {req.batch * n_iter} images, the limit per request is "
                               f"{self.settings.max_images_per_job}")
        self.check_names(req)
        job_id = self.manager.new_job_id()
        saved: list[Path] = []
        refs: dict[str, str] = {}
        for key in ("init_image", "mask_image"):
            image = getattr(req, key)
            if image is None:
                continue
            if not isinstance(image, Image.Image):
                raise RequestError(f"{key}: expected a decoded image")  # a server-side path never gets here
            ref = self.manager.save_input(image, job_id, key.replace("_image", ""))
            saved.append(self.manager.inputs / ref.partition(":")[2])
            refs[key] = ref
        region_refs = []
        for i, image in enumerate(req.region_masks):
            if not isinstance(image, Image.Image):
                raise RequestError(f"region_masks[{i}]: expected a decoded image")
            ref = self.manager.save_input(image, job_id, f"region{i}")
            saved.append(self.manager.inputs / ref.partition(":")[2])
            region_refs.append(ref)
        if region_refs:
            refs["region_masks"] = tuple(region_refs)
        try:
            return self.manager.submit(req.replace(**refs), n_iter=n_iter, source=source, job_id=job_id,
                                       idempotency=idempotency)
        except Exception:
            for p in saved:
                p.unlink(missing_ok=True)
            raise

    def request_from_body(self, body: dict[str, Any]) -> GenerationRequest:
        """Native body -> request, with init/mask images decoded to PIL images (never paths)."""
        d = dict(body)
        # pydantic gives a tuple of dicts; the request turns a list of dicts into LoraSpecs
        d["loras"] = list(d.get("loras") or [])
        for key in ("init_image", "mask_image"):
            if d.get(key) is not None:
                d[key] = self.image_ref(d[key], key)
        masks = d.get("region_masks") or []
        if len(masks) > MAX_SUBPROMPTS:  # before decoding any of them
            raise RequestError(f"region_masks: {len(masks)} masks, the limit is {MAX_SUBPROMPTS}")
        d["region_masks"] = [self.image_ref(m, f"region_masks[{i}]") for i, m in enumerate(masks)]
        d["controls"], d["ip_adapters"] = self.unit_images(d.get("controls"), d.get("ip_adapters"))
        return GenerationRequest.from_dict(d)

    def unit_images(self, controls: Any, ip_adapters: Any) -> tuple[list[Any], list[Any]]:
        """Control and IP-Adapter units of a native body with their images (base64 or 'output:NAME', never
        server paths) decoded and kept in the inputs folder; the units then name those files."""
        for name, units in (("controls", controls), ("ip_adapters", ip_adapters)):
            if len(units or ()) > MAX_CONTROL_UNITS:  # before decoding any image
                raise RequestError(f"{name}: {len(units)} units, the limit is {MAX_CONTROL_UNITS}")
        out_c = []
        for i, unit in enumerate(controls or ()):
            unit = dict(unit) if isinstance(unit, dict) else unit
            if isinstance(unit, dict) and isinstance(unit.get("image"), str):
                unit["image"] = store_image(self.manager.inputs,
                                            self.image_ref(unit["image"], f"controls[{i}].image"))
            out_c.append(unit)
        out_ip = []
        for i, unit in enumerate(ip_adapters or ()):
            unit = dict(unit) if isinstance(unit, dict) else unit
            if isinstance(unit, dict) and isinstance(unit.get("images"), (list, tuple)):
                if len(unit["images"]) > MAX_IP_IMAGES:
                    raise RequestError(f"ip_adapters[{i}].images: {len(unit['images'])} images, the limit is "
                                       f"{MAX_IP_IMAGES}")
                unit["images"] = [
                    store_image(self.manager.inputs, self.image_ref(m, f"ip_adapters[{i}].images[{k}]"))
                    if isinstance(m, str) else m for k, m in enumerate(unit["images"])]
            out_ip.append(unit)
        return out_c, out_ip

    # ---------------------------------------------------------- UI info
    def size_presets(self, sample_size: int) -> list[dict[str, int]]:
        """The paper's aspect-ratio buckets (Appendix I) scaled to the model's native area, as W x H."""
        step = max(8, int(round(64 * sample_size / 1024 / 8)) * 8)
        out = []
        for h, w in scaled_buckets(sample_size, step=step):
            if w * h <= self.settings.limits.max_pixels:
                out.append({"width": w, "height": h})
        return out

    def info(self) -> dict[str, Any]:
        defaults = GenerationRequest()
        model: dict[str, Any] | None = None
        sample_size = 1024
        try:
            cfg = self.models.default_config()
            path = self.models.default_path()
            sample_size = cfg.sample_size
            model = {"name": path.stem if path else "default", "kind": cfg.kind, "sample_size": sample_size,
                     "has_refiner_conditioning": cfg.kind == "refiner"}
        except Exception as e:  # noqa: BLE001 - the UI still loads and shows the problem
            log.warning("cannot read the default model's config: %s", e)
        lim = self.settings.limits
        catalog = self.models.catalog()
        return {
            "version": __version__,
            "model": model,
            "models": [e.name for e in catalog if e.kind != "refiner"],  # names a request's `model` takes
            "catalog": [{"name": e.name, "kind": e.kind, "default": e.is_default} for e in catalog],
            "refiners": self.models.refiner_names(),
            "loras": [str(p.with_suffix("")) for p in self.models.list_loras()],
            "samplers": [{"id": n, "label": i.label} for n, i in SAMPLER_INFO.items()],
            "schedules": [{"id": "automatic", "label": "Automatic"}]
            + [{"id": n, "label": A1111_SCHEDULE_NAMES.get(n, n)} for n in SCHEDULES],
            "sizes": self.size_presets(sample_size),
            "limits": {"max_pixels": lim.max_pixels, "max_steps": lim.max_steps, "max_batch": lim.max_batch,
                       "max_prompt_chars": lim.max_prompt_chars, "queue_size": self.settings.queue_size},
            "defaults": {"width": sample_size, "height": sample_size, "steps": defaults.steps,
                         "cfg": defaults.cfg, "sampler": defaults.sampler, "schedule": defaults.schedule,
                         "refiner_switch": defaults.refiner_switch},
            "auth_required": bool(self.settings.api_key),
        }
