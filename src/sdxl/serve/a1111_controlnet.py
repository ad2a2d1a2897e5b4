"""sd-webui-controlnet's API on the A1111 routes: ControlNet units sent in `alwayson_scripts`, and the
extension's own `/controlnet/...` routes.

- `controlnet_units`: `alwayson_scripts.controlnet.args` as the extension takes them -> the request's
  control units and IP-Adapter units (`a1111.A1111.to_request` calls it for txt2img and img2img).
- `make_controlnet_router`: `/controlnet/...` answers the extension's version, model_list, module_list,
  settings and detect (a preprocessor run on uploaded images).

Control models are looked up in the server's control models folder (`control_files.py`); a unit's images
are stored in the inputs folder, so a queued job can run after a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..control_maps import detect as detect_map
from ..control_names import A1111_MODULES, PARAMETERS, canonical_preprocessor
from ..errors import RequestError
from ..request import MAX_CONTROL_UNITS, ControlUnit, IPAdapterUnit, show_value
from .control_files import control_dirs, control_model_files, control_model_title, store_image, strip_title
from .previews import encode_image
from .service import Service

# ------------------------------------------------------------------------------------------------ ControlNet
# sd-webui-controlnet's API (its internal_controlnet/args.py ControlNetUnit and scripts/api.py): units arrive
# as `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`. Field names and value spellings are the
# extension's; unknown fields are ignored as it ignores them; wrong types are a 400 naming the field.
CONTROLNET_SCRIPT = "controlnet"
CONTROLNET_API_VERSION = 3  # what the extension's /controlnet/version answers
_RESIZE_BY_INT = {0: "resize", 1: "crop", 2: "fill", 3: "resize"}  # 3: "Just Resize (Latent upscale)"
_RESIZE_BY_NAME = {
    "just resize": "resize", "crop and resize": "crop", "resize and fill": "fill",
    "inner fit (scale to fit)": "crop", "scale to fit (inner fit)": "crop",
    "outer fit (shrink to fit)": "fill", "envelope (outer fit)": "fill",
    "resize": "resize", "crop": "crop", "fill": "fill",
}  # fmt: skip
_CONTROL_MODE_BY_INT = {0: "balanced", 1: "prompt", 2: "control"}
_CONTROL_MODE_BY_NAME = {"balanced": "balanced", "my prompt is more important": "prompt",
                         "controlnet is more important": "control", "prompt": "prompt", "control": "control"}
# the extension's union control types ("Hard Edge", ...) and what a preprocessor implies when none is sent
_UNION_BY_PREPROCESSOR = {"canny": "canny", "invert": "lineart", "scribble": "scribble", "tile": "tile",
                          "blur": "tile"}
IP_ADAPTER_MODULES = ("ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_h",
                      "ip-adapter_clip_g", "ip-adapter-auto")
_UNIT_TYPES: dict[str, tuple[type, ...]] = {
    "enabled": (bool,), "module": (str,), "model": (str,), "weight": (int, float),
    "guidance_start": (int, float), "guidance_end": (int, float), "threshold_a": (int, float),
    "threshold_b": (int, float), "processor_res": (int, float), "pixel_perfect": (bool,), "low_vram": (bool,),
    "control_mode": (int, str), "resize_mode": (int, str), "hr_option": (str,), "union_control_type": (str,),
}  # fmt: skip
_LEGACY_ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram",
                   "mask_image": "mask"}


def _find_control_model(service: Service, name: str, where: str) -> Path:
    """A model name the extension's lists give ("name [hash]", "name", "name.safetensors") -> its file."""
    stem = strip_title(name)
    key = stem.lower()
    for p in control_model_files(control_dirs(service.settings)):
        names = {p.name.lower(), (p.stem if p.is_file() else p.name).lower()}
        if key in names or key.replace("\\", "/").rsplit("/", 1)[-1] in names:
            return p.resolve()
    raise RequestError(f"{where}: {name!r} is not in the control models folder (see /controlnet/model_list)")


def _unit_images(service: Service, unit: dict[str, Any], where: str, init: Image.Image | None) -> list[Any]:
    """A unit's images as the extension takes them: a base64 string (with or without a data: prefix),
    {"image": b64, "mask": b64}, [image, mask], or a list of {"image": ...}; none: img2img's init image.
    Masks are not used (no control model here takes one)."""
    image = unit.get("image")
    if isinstance(image, list) and image and all(isinstance(x, dict) for x in image):
        items = [x.get("image") for x in image]
    elif isinstance(image, list) and len(image) == 2 and not isinstance(image[0], (dict, list)):
        items = [image[0]]
    elif isinstance(image, dict):
        items = [image.get("image")]
    elif image is None or isinstance(image, str):
        items = [image]
    else:
        raise RequestError(f"{where}.image: {show_value(image)} is not a base64 image")
    out = []
    for k, item in enumerate(items):
        if item in (None, ""):
            if init is None:
                raise RequestError(f"{where}.image: missing (a ControlNet unit needs its control image; "
                                   "img2img units without one use the init image)")
            out.append(init)
        elif not isinstance(item, str):
            raise RequestError(f"{where}.image: {show_value(item)} is not a base64 image")
        else:
            out.append(service.decode_image(item, f"{where}.image" + (f"[{k}]" if len(items) > 1 else "")))
    return out


def _stored_image(service: Service, image: Image.Image) -> str:
    return store_image(service.manager.inputs, image)


def _slider(pre: str, index: int, value: Any) -> float | None:
    """A threshold as the extension bounds it: outside its slider's range (or -1) -> the default (None)."""
    spec = PARAMETERS[pre][index]
    if spec is None or value is None or not spec[2] <= value <= spec[3]:
        return None
    return float(value)


def _mode(value: Any, by_int: dict[int, str], by_name: dict[str, str], where: str,
          names: tuple[str, ...]) -> str:
    """An extension mode given as its int or its name -> ours."""
    if isinstance(value, int) and not isinstance(value, bool) and value in by_int:
        return by_int[value]
    if isinstance(value, str) and value.strip().lower() in by_name:
        return by_name[value.strip().lower()]
    raise RequestError(f"{where}: {show_value(value)} is not one of {', '.join(names)} "
                       f"(or 0..{len(names) - 1})")


def controlnet_units(service: Service, title: str, value: Any, init: Image.Image | None = None,
                     hires: bool = False) -> tuple[list[ControlUnit], list[IPAdapterUnit]]:
    """`alwayson_scripts.controlnet` -> (control units, IP-Adapter units). Disabled units are skipped;
    modules ip-adapter_* make IP-Adapter units (FaceID modules are refused: the face embedding needs a
    face detector this server does not have); the others ControlUnits with the module as preprocessor.
    Accepted and not used: processor_res and pixel_perfect (preprocessors always run at the pixel-perfect
    resolution, which the infotext reports), low_vram, masks; hr_option must be "Both" with the hires fix
    (units apply to both passes). A unit without an image uses img2img's init image."""
    args = value.get("args") if isinstance(value, dict) else value
    if not isinstance(args, list):
        raise RequestError(f"alwayson_scripts.{title}.args: expected a list of ControlNet units")
    controls: list[ControlUnit] = []
    ips: list[IPAdapterUnit] = []
    for i, raw in enumerate(args):
        where = f"alwayson_scripts.{title}.args[{i}]"
        if not isinstance(raw, dict):
            raise RequestError(f"{where}: {show_value(raw)} is not a ControlNet unit (an object)")
        unit = dict(raw)
        for alias, key in _LEGACY_ALIASES.items():
            if alias in unit and key not in unit:
                unit[key] = unit.pop(alias)
        for key, types in _UNIT_TYPES.items():
            v = unit.get(key)
            if v is not None and (not isinstance(v, types) or (bool not in types and isinstance(v, bool))):
                kind = "true or false" if bool in types else "a number" if float in types else "a name"
                raise RequestError(f"{where}.{key}: {show_value(v)} is not {kind}")
            if key == "enabled" and v is False:
                break  # a disabled unit is ignored, whatever else it holds
        if unit.get("enabled") is False:
            continue
        module = str(unit.get("module") or "none")
        model = unit.get("model")
        if model is None or not model.strip() or strip_title(model).lower() == "none":
            raise RequestError(f"{where}.model: missing (a ControlNet unit needs a model; see "
                               "/controlnet/model_list)")
        weight = unit.get("weight", 1.0)
        start, end = unit.get("guidance_start", 0.0), unit.get("guidance_end", 1.0)
        if hires and unit.get("hr_option") not in (None, "Both"):
            raise RequestError(f"{where}.hr_option: {show_value(unit['hr_option'])}; units apply to both "
                               "passes of the hires fix here (send 'Both')")
        images = _unit_images(service, unit, where, init)
        if module.lower().startswith("ip-adapter"):
            if "face_id" in module.lower() or "faceid" in module.lower():
                raise RequestError(f"{where}.module: {module!r}: FaceID needs a face detector this server "
                                   "does not have; use the native API's face_embeddings")
            if module not in IP_ADAPTER_MODULES:
                raise RequestError(f"{where}.module: {module!r} is not an IP-Adapter module here (known: "
                                   f"{', '.join(IP_ADAPTER_MODULES)})")
            ips.append(IPAdapterUnit(model=strip_title(model),
                                     images=tuple(_stored_image(service, im) for im in images),
                                     scale=weight, start=start, end=end))
            continue
        pre = canonical_preprocessor(module)
        if pre is None:
            raise RequestError(f"{where}.module: {module!r} is not a preprocessor here (known: "
                               f"{', '.join(A1111_MODULES.values())}, ip-adapter_*; other maps: send the map "
                               "with module none)")
        control_type = unit.get("union_control_type")
        if control_type in (None, "Unknown"):
            control_type = _UNION_BY_PREPROCESSOR.get(pre)
        path = _find_control_model(service, model, f"{where}.model")
        controls.append(ControlUnit(
            model=str(path), image=_stored_image(service, images[0]), weight=weight, start=start, end=end,
            control_type=control_type,
            control_mode=_mode(unit.get("control_mode", 0), _CONTROL_MODE_BY_INT, _CONTROL_MODE_BY_NAME,
                               f"{where}.control_mode", ("Balanced", "My prompt is more important",
                                                         "ControlNet is more important")),
            resize_mode=_mode(unit.get("resize_mode", 1), _RESIZE_BY_INT, _RESIZE_BY_NAME,
                              f"{where}.resize_mode", ("Just Resize", "Crop and Resize", "Resize and Fill")),
            preprocessor=pre,
            threshold_a=_slider(pre, 0, unit.get("threshold_a")),
            threshold_b=_slider(pre, 1, unit.get("threshold_b"))))
    if len(controls) + len(ips) > MAX_CONTROL_UNITS:
        raise RequestError(f"alwayson_scripts.{title}.args: {len(controls) + len(ips)} units, the limit is "
                           f"{MAX_CONTROL_UNITS}")
    return controls, ips


# ------------------------------------------------------------------------------------------------ /controlnet
class DetectBody(BaseModel):
    """sd-webui-controlnet's /controlnet/detect body (-1: the preprocessor's default)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list, description="older clients' name of the above")
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)
    low_vram: bool = False


def module_detail(name: str) -> dict[str, Any]:
    """The extension's module_detail entry: model_free and its sliders (resolution, then thresholds)."""
    pre = canonical_preprocessor(name)
    sliders: list[dict[str, Any]] = []
    if pre not in (None, "none", "invert", "tile"):
        sliders.append({"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8})
    for spec in PARAMETERS.get(pre or "", (None, None)):
        if spec is not None:
            label, default, lo, hi = spec
            sliders.append({"name": label, "value": default, "min": lo, "max": hi,
                            "step": 1 if isinstance(default, int) else 0.01})
    return {"model_free": pre is not None, "sliders": sliders}


def make_controlnet_router(service: Service) -> APIRouter:
    """sd-webui-controlnet's routes: version, model_list, module_list, settings, detect."""
    r = APIRouter(prefix="/controlnet", tags=["a1111"])

    @r.get("/version")
    def version() -> dict[str, Any]:
        return {"version": CONTROLNET_API_VERSION}

    @r.get("/model_list")
    def model_list(update: bool = Query(True)) -> dict[str, Any]:
        """The control models folder's files as the extension lists them, "name [hash]" (A1111's 8-digit
        legacy hash); units may name a model either way."""
        return {"model_list": [control_model_title(p) for p in control_model_files(control_dirs(
            service.settings))]}

    @r.get("/module_list")
    def module_list(alias_names: bool = Query(False)) -> dict[str, Any]:
        """The preprocessors this server runs (none: the image is the map) and the IP-Adapter modules."""
        names = list(A1111_MODULES.values())
        if alias_names:
            names = [("invert (from white bg & black line)" if n == "invert" else n) for n in names]
        names += [m for m in IP_ADAPTER_MODULES if m != "ip-adapter-auto"]
        detail = {n: module_detail(n) for n in names}
        return {"module_list": names, "module_detail": detail}

    @r.get("/settings")
    def settings() -> dict[str, Any]:
        return {"control_net_unit_count": MAX_CONTROL_UNITS}

    @r.post("/detect")
    def detect(body: DetectBody) -> dict[str, Any]:
        """Run a preprocessor on each image at controlnet_processor_res (-1: 512) and return the maps as
        base64 PNGs, as the extension does. An unknown module or no image is a 400 naming the field (the
        extension answers 422; here every user mistake is a 400 with a one-line detail, as the schema
        says)."""
        pre = canonical_preprocessor(body.controlnet_module)
        if pre is None:
            raise RequestError(f"controlnet_module: {body.controlnet_module!r} is not available "
                               f"(known: {', '.join(A1111_MODULES.values())})")
        inputs = body.controlnet_input_images or body.controlnet_images
        if not inputs:
            raise RequestError("controlnet_input_images: no image selected")
        if len(inputs) > MAX_CONTROL_UNITS:
            raise RequestError(f"controlnet_input_images: {len(inputs)} images, the limit is "
                               f"{MAX_CONTROL_UNITS}")
        res = body.controlnet_processor_res
        if res != -1 and not 64 <= res <= 2048:
            res = -1  # the extension's bound check: out of range -> the default
        images = []
        for i, text in enumerate(inputs):
            image = service.decode_image(text, f"controlnet_input_images[{i}]")
            out = detect_map(pre, image, _slider(pre, 0, body.controlnet_threshold_a),
                             _slider(pre, 1, body.controlnet_threshold_b), res)
            images.append(encode_image(out, "PNG"))
        return {"images": images, "info": "Success"}

    return r
