"""The A1111 "infotext": format it, parse it, and build it for one image of a request.

An infotext is what A1111 stores in a PNG's `parameters` chunk (and Civitai, Forge, SD.Next and image
browsers read):

    <prompt, possibly several lines>
    Negative prompt: <negative prompt>
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 1024x1024, ...

`format_a1111` and `parse_a1111` convert between that text and a dictionary with our request's names
(prompt, steps, sampler, schedule, cfg, ...). Sampler and schedule labels come from `sdxl.sampling.names`.
`request_infotext` is the one place that decides what an image we made says about itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..control_names import (
    A1111_CONTROL_MODES,
    A1111_MODULES,
    A1111_RESIZE_MODES,
    PARAMETERS,
    canonical_preprocessor,
    pixel_perfect_resolution,
)
from ..prompts import PromptError, extract_networks
from ..sampling.names import parse_sampler_label, parse_schedule_label, sampler_label, schedule_label
from .hashes import legacy_hash
from .values import number

# The order A1111's create_infotext writes its fixed fields in; other fields follow in the order given,
# then Version and User.
_HEAD_ORDER = [
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
]
_TAIL_ORDER = ["Version", "User"]

# Fields with a plain conversion: label -> (normalised key, type).
_SIMPLE_FIELDS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int),
    "Seed": ("seed", int),
    "Hires steps": ("hires_steps", int),
    "CFG scale": ("cfg", float),
    "Denoising strength": ("denoising_strength", float),
    "Refiner switch at": ("refiner_switch", float),
    "Hires upscale": ("hires_upscale", float),
    "Model hash": ("model_hash", str),
    "Model": ("model", str),
    "VAE hash": ("vae_hash", str),
    "VAE": ("vae", str),
    "Hires upscaler": ("hires_upscaler", str),
    "Hires prompt": ("hires_prompt", str),
    "Hires negative prompt": ("hires_negative_prompt", str),
    "RNG": ("rng", str),
    "Emphasis": ("emphasis", str),
    "PAG scale": ("pag_scale", float),
    "PAG layers": ("pag_layers", str),
    "Version": ("version", str),
    "User": ("user", str),
}
_SIMPLE_LABELS = {key: label for label, (key, _) in _SIMPLE_FIELDS.items()}
_PAIRED = {"width": "height", "height": "width", "hires_width": "hires_height", "hires_height": "hires_width"}

# One `Key: value` pair of the settings line. A value is either a JSON string (a quoted value may hold
# commas, colons and escaped quotes) or anything up to the next comma. Keys are a word character followed
# by word characters, spaces, '-' or '/', as A1111 writes them.
_PARAM = re.compile(
    r"""
    \s*
    (\w[\w \-/]+)                   # key
    :\s*
    ( "(?:\\.|[^\\"])+"             # a quoted value
    | [^,]*                         # or a bare one
    )
    (?:,|$)
    """,
    re.VERBOSE,
)
# A run of characters a key may consist of; used to find key starts in linear time (see `_settings_pairs`).
_KEY_RUN = re.compile(r"[\w \-/]+")
_WORD = re.compile(r"\w")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_LABEL = re.compile(r"\w[\w \-/]+")
_NEGATIVE = "Negative prompt:"
# "FreeU: b1=1.3 b2=1.4 s1=0.9 s2=0.2" (our label; the values are the request's freeu_b1 .. freeu_s2)
_FREEU_KEYS = ("b1", "b2", "s1", "s2")
_FREEU = re.compile(r"b1=(\S+) b2=(\S+) s1=(\S+) s2=(\S+)")


def _value_text(value: Any) -> str:
    """How a value appears in an infotext: integral floats without '.0' ("CFG scale: 7"), bools as A1111."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _quote(text: str) -> str:
    """JSON-quote a value that would otherwise break the line apart. A1111 quotes on ',', ':' and newlines;
    we also quote a value containing '"' so that it reads back unchanged."""
    if any(c in text for c in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, str) else text
    return text


def _hash_list(value: Any) -> str:
    """{'name': 'hash'} -> 'name: hash, name2: hash2' (A1111 strips ':' and ',' from the names)."""
    if isinstance(value, str):
        return value
    pairs = value.items() if isinstance(value, dict) else value
    return ", ".join(f"{str(n).replace(':', '').replace(',', '')}: {h}" for n, h in pairs)


def _fields(params: dict[str, Any]) -> dict[str, str]:
    """Map normalised keys (and verbatim A1111 labels) to label -> text, in the caller's order."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if key in ("prompt", "negative_prompt") or value is None:
            continue
        if key in _PAIRED:
            if params.get(_PAIRED[key]) is None:
                raise ValueError(f"{key} needs {_PAIRED[key]} too")
            prefix = "hires_" if key.startswith("hires_") else ""
            label = "Hires resize" if prefix else "Size"
            if label not in out:
                width, height = params[prefix + "width"], params[prefix + "height"]
                out[label] = f"{_value_text(width)}x{_value_text(height)}"
            continue
        if key == "sampler":
            out["Sampler"] = sampler_label(str(value))
        elif key == "schedule":
            out["Schedule type"] = schedule_label(str(value))
        elif key == "hires_sampler":
            out["Hires sampler"] = sampler_label(str(value))
        elif key == "hires_schedule":
            out["Hires schedule type"] = schedule_label(str(value))
        elif key == "refiner":
            refiner_hash = params.get("refiner_hash")
            out["Refiner"] = f"{value} [{refiner_hash}]" if refiner_hash else str(value)
        elif key == "refiner_hash":
            if params.get("refiner") is None:
                raise ValueError("refiner_hash needs refiner too")
        elif key == "lora_hashes":
            out["Lora hashes"] = _hash_list(value)
        elif key == "ti_hashes":
            out["TI hashes"] = _hash_list(value)
        elif key == "freeu":  # (b1, b2, s1, s2)
            pairs = zip(_FREEU_KEYS, value, strict=True)
            out["FreeU"] = " ".join(f"{k}={_value_text(float(v))}" for k, v in pairs)
        elif key == "clip_skip":
            if int(value) > 1:  # ours counts from the penultimate layer, A1111's from the last one
                out["Clip skip"] = _value_text(int(value) + 1)
        elif key in _SIMPLE_LABELS:
            out[_SIMPLE_LABELS[key]] = _value_text(value)
        elif _LABEL.fullmatch(key):
            out[key] = _value_text(value)
        else:
            raise ValueError(f"{key!r} cannot be an infotext key (letters, digits, spaces, '-', '/' only)")
    return out


def format_a1111(params: dict[str, Any]) -> str:
    """The A1111 infotext for `params`, laid out exactly as A1111's `create_infotext` does:

        <prompt, possibly several lines>
        Negative prompt: <negative prompt>                      (left out when empty)
        Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 1024x1024, ...

    `params` uses the normalised keys `parse_a1111` returns (prompt, negative_prompt, steps, sampler,
    schedule, cfg, seed, width, height, model_hash, model, vae_hash, vae, clip_skip, denoising_strength,
    hires_*, refiner, refiner_hash, refiner_switch, lora_hashes, ti_hashes, emphasis, rng, version, user);
    any other key is written verbatim as an A1111 label ("Hires upscaler", "Discard penultimate sigma").
    None values are left out. Sampler and schedule names are written as A1111 labels ("dpmpp_2m" ->
    "DPM++ 2M", "karras" -> "Karras"). `clip_skip` counts as GenerationRequest does (1 = SDXL's
    penultimate layer), A1111 from the last layer: ours 2 is written "Clip skip: 3", ours 1 left out.
    A1111's fixed fields come first in its order, then the others in the order given, then Version and
    User. Values containing ',', ':', '"' or a newline are JSON-quoted.
    LoRAs are not a field: A1111 keeps them as `<lora:name:w>` tags in the prompt (see `request_infotext`).
    """
    fields = _fields(params)
    head = [label for label in _HEAD_ORDER if label in fields]
    tail = [label for label in _TAIL_ORDER if label in fields]
    middle = [label for label in fields if label not in head and label not in tail]
    line = ", ".join(f"{label}: {_quote(fields[label])}" for label in head + middle + tail)
    prompt = str(params.get("prompt") or "")
    negative = str(params.get("negative_prompt") or "")
    negative_line = f"\n{_NEGATIVE} {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}".strip()


def _settings_pairs(line: str) -> list[tuple[str, str]]:
    """`_PARAM.findall(line)`, the same pairs, in time linear in the length of the line.

    `findall` retries the pattern at every position, and a key attempt scans to the end of the run of
    key characters before it can fail, so a long line of words without a colon (an ordinary long prompt)
    costs quadratic time: 64 KB took 18 s, enough for one uploaded PNG to stall a server. A key attempt
    from a later start inside the same run meets the same run end, so it succeeds exactly when the first
    attempt in that run does: the pattern only has to be tried at the first word character of each run
    that ends in ':' (and is at least two characters long, as `\\w[..]+` needs).
    """
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(line):
        for run in _KEY_RUN.finditer(line, pos):
            if not line.startswith(":", run.end()):
                continue
            first = _WORD.search(line, run.start(), run.end() - 1)
            if first is None:
                continue
            found = _PARAM.match(line, first.start())
            if found is None:  # cannot happen (the value part always matches); stay safe
                continue
            pairs.append((found.group(1), found.group(2)))
            pos = found.end()
            break
        else:
            break
    return pairs


def _split_refiner(value: str) -> tuple[str, str | None]:
    """'name [abc123]' -> ('name', 'abc123'); no hash -> (value, None).

    Same result as `re.fullmatch(r"(.*?)\\s*\\[([0-9a-fA-F]+)\\]", value)`, without that pattern's
    quadratic backtracking on a value with a long run of spaces.
    """
    start = value.rfind("[")
    if not value.endswith("]") or start < 0:
        return value, None
    digest, name = value[start + 1 : -1], value[:start].rstrip()
    if not re.fullmatch(r"[0-9a-fA-F]+", digest) or "\n" in name:  # '.' does not match a newline
        return value, None
    return name, digest



def _parse_hash_list(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = value.strip()
    return out



def _parse_freeu(text: str) -> dict[str, float] | None:
    """'b1=1.3 b2=1.4 s1=0.9 s2=0.2' -> {'freeu_b1': 1.3, ...}; None when it does not read."""
    m = _FREEU.fullmatch(text.strip())
    values = [number(v, float) for v in m.groups()] if m else []
    if not values or any(v is None for v in values):
        return None
    return {f"freeu_{k}": v for k, v in zip(_FREEU_KEYS, values, strict=True)}


def parse_a1111(text: str) -> dict[str, Any]:
    """Read an A1111 infotext back into the normalised dictionary `format_a1111` takes.

    The last line is the settings line when it holds at least three `Key: value` pairs (A1111's rule);
    lines up to `Negative prompt:` are the prompt, the rest the negative prompt. Known fields get
    normalised keys and types (steps int, cfg float, Size -> width/height, "Refiner: name [hash]" ->
    refiner/refiner_hash, "Lora hashes" -> {name: hash}, "Clip skip: N" -> clip_skip N - 1); older
    combined sampler names ("DPM++ 2M Karras") are split into sampler and schedule. Every other field
    keeps its A1111 label and its text. A value that does not convert (Steps: many) is kept as text under
    its label, never raised.
    """
    lines = text.strip().split("\n")
    pairs = _settings_pairs(lines[-1])
    if len(pairs) >= 3:
        lines.pop()
    else:
        pairs = []
    # Lines are joined the way A1111 does it (a newline only between non-empty accumulations), so that a
    # text A1111 wrote reads back to the same strings A1111 itself would show.
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    out: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}

    for label, raw in pairs:
        value = _unquote(raw.strip())
        size = _SIZE.match(value)
        if label in ("Size", "Hires resize") and size:
            prefix = "" if label == "Size" else "hires_"
            out[prefix + "width"], out[prefix + "height"] = int(size.group(1)), int(size.group(2))
        elif label == "Sampler":
            out["sampler"], schedule = parse_sampler_label(value)
            if schedule is not None:
                out["schedule"] = schedule
        elif label == "Schedule type":
            out.setdefault("schedule", parse_schedule_label(value))
        elif label == "Hires sampler":
            out["hires_sampler"], schedule = parse_sampler_label(value)
            if schedule is not None:
                out["hires_schedule"] = schedule
        elif label == "Hires schedule type":
            out.setdefault("hires_schedule", parse_schedule_label(value))
        elif label == "Refiner":
            out["refiner"], refiner_hash = _split_refiner(value)
            if refiner_hash is not None:
                out["refiner_hash"] = refiner_hash
        elif label in ("Lora hashes", "TI hashes"):
            out["lora_hashes" if label == "Lora hashes" else "ti_hashes"] = _parse_hash_list(value)
        elif label == "FreeU" and (freeu := _parse_freeu(value)) is not None:
            out["freeu"] = True
            out.update(freeu)
        elif label == "Clip skip" and (number(value, int) or 0) >= 2:
            out["clip_skip"] = number(value, int) - 1  # A1111 counts from the last layer, we from SDXL's
        elif label in _SIMPLE_FIELDS:
            key, kind = _SIMPLE_FIELDS[label]
            converted = value if kind is str else number(value, kind)
            if converted is None:
                out[label] = value
            else:
                out[key] = converted
        else:
            out[label] = value
    return out


def prompt_loras(prompt: str) -> list[dict[str, Any]]:
    """The `<lora:name:weight>` tags of a prompt as [{"name", "weight"}] ([] for a malformed prompt)."""
    try:
        return [{"name": lora.name, "weight": lora.weight} for lora in extract_networks(prompt).loras]
    except PromptError:
        return []


def read_a1111(text: str) -> dict[str, Any]:
    """`parse_a1111`, plus the prompt's LoRA tags as "loras" (the reader for A1111's PNGs)."""
    params = parse_a1111(text)
    loras = prompt_loras(params.get("prompt", ""))
    if loras:
        params["loras"] = loras
    return params


# ---------------------------------------------------------------------------------------------------------
# what an image we made says about itself
# ---------------------------------------------------------------------------------------------------------


def _lora_items(loras: Any) -> list[tuple[str, float]]:
    """(name, weight) of each LoRA: LoraSpec objects, {"name", "weight"} dicts or (name, weight) pairs."""
    items = []
    for lora in loras or ():
        if isinstance(lora, Mapping):
            items.append((str(lora["name"]), float(lora.get("weight", 1.0))))
        elif hasattr(lora, "name"):
            items.append((str(lora.name), float(lora.weight)))
        else:
            name, weight = tuple(lora)[:2]
            items.append((str(name), float(weight)))
    return items


def request_infotext(
    request: Any,
    *,
    seed: int | None = None,
    model: str | None = None,
    model_hash: str | None = None,
    refiner: str | None = None,
    refiner_hash: str | None = None,
    lora_hashes: Mapping[str, str] | None = None,
    version: str | None = None,
    control_hashes: Mapping[str, str] | None = None,
) -> str:
    """The A1111 infotext of one image made from `request` (a resolved GenerationRequest or its `to_dict()`).

    The request gives the prompts, steps, sampler, schedule, CFG scale (and CFG rescale phi when set), PAG
    scale and layers and FreeU's b1 b2 s1 s2 (when on), size,
    clip skip, denoising strength (img2img and inpainting; the hires pass's with the hires fix), the hires
    fix's upscale or resize, steps, upscaler, sampler and prompts (A1111's labels) and the refiner switch
    (ensemble mode only).
    Its LoRAs are appended to the prompt as `<lora:name:weight>` tags, named by their file stem, unless the
    prompt already names them, as A1111 keeps LoRAs in the prompt. The rest is what only the caller knows:
    `seed` (this image's; default the request's), the checkpoint's `model` name and `model_hash`
    (`short_hash`), the `refiner` that ran and its hash, `lora_hashes` {name: `lora_hash`} and `version`.
    Control units and IP-Adapters are "ControlNet N" fields as sd-webui-controlnet writes them
    (`control_infotext`); `control_hashes` {unit model: legacy hash} names their files' hashes where the
    unit's model is not a file path.
    """
    get = request.get if isinstance(request, Mapping) else lambda key: getattr(request, key, None)
    prompt = str(get("prompt") or "")
    named = {Path(lora["name"]).stem for lora in prompt_loras(prompt)}
    tags = [
        f"<lora:{Path(name).stem}:{weight:g}>" for name, weight in _lora_items(get("loras"))
        if Path(name).stem not in named
    ]
    if tags:
        prompt = f"{prompt} {' '.join(tags)}".strip()
    params: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": get("negative_prompt") or "",
        "steps": get("steps"),
        "sampler": get("sampler"),
        "schedule": get("schedule"),
        "cfg": get("cfg"),
        "seed": get("seed") if seed is None else seed,
        "width": get("width"),
        "height": get("height"),
        "model_hash": model_hash,
        "model": model,
        "denoising_strength": get("strength") if get("init_image") is not None else None,
        "clip_skip": get("clip_skip"),
        "CFG rescale phi": get("guidance_rescale") or None,
    }
    if get("pag_scale"):
        params["pag_scale"], params["pag_layers"] = get("pag_scale"), get("pag_layers")
    hires = getattr(request, "hires", None)  # a GenerationRequest knows; a dict: any hires field set
    if hires is None:
        hires = bool(get("hires_scale") or get("hires_width") or get("hires_height"))
    if hires:  # A1111's hires-fix fields
        if get("hires_width") or get("hires_height"):
            params["hires_width"], params["hires_height"] = get("hires_width") or 0, get("hires_height") or 0
        else:
            params["hires_upscale"] = get("hires_scale")
        params["hires_steps"] = get("hires_steps") or None
        params["hires_upscaler"] = get("hires_upscaler")
        params["denoising_strength"] = get("hires_strength")
        if get("hires_sampler") and get("hires_sampler") != get("sampler"):
            params["hires_sampler"] = get("hires_sampler")
        if get("hires_schedule") and get("hires_schedule") != get("schedule"):
            params["hires_schedule"] = get("hires_schedule")
        for key, first in (("hires_prompt", "prompt"), ("hires_negative_prompt", "negative_prompt")):
            if get(key) is not None and get(key) != get(first):
                params[key] = get(key)
    if get("freeu"):
        params["freeu"] = tuple(get(f"freeu_{k}") for k in _FREEU_KEYS)
    if refiner:
        params["refiner"], params["refiner_hash"] = refiner, refiner_hash
        if (get("refiner_mode") or "ensemble") == "ensemble":
            params["refiner_switch"] = get("refiner_switch")
    params["lora_hashes"] = dict(lora_hashes) if lora_hashes else None
    params.update(control_infotext(get("controls"), get("ip_adapters"), get("width"), get("height"),
                                   control_hashes))
    params["version"] = version
    return format_a1111(params)


# ---------------------------------------------------------------------------------------------------------
# control units, as sd-webui-controlnet writes them
# ---------------------------------------------------------------------------------------------------------
# sd-webui-controlnet's unit fields in its infotext order ("ControlNet 0: "Module: canny, Model: ..., ..."")
CONTROL_FIELDS = ("Module", "Model", "Weight", "Resize Mode", "Processor Res", "Threshold A", "Threshold B",
                  "Guidance Start", "Guidance End", "Pixel Perfect", "Control Mode")
_HIDDEN_SLIDER = 0.5  # the value the extension writes for a slider its preprocessor does not have


def _unit_get(unit: Any, key: str, default: Any = None) -> Any:
    return unit.get(key, default) if isinstance(unit, Mapping) else getattr(unit, key, default)


def control_model_label(model: str, hashes: Mapping[str, str] | None = None) -> str:
    """'name [hash]' as the extension lists a control model: the file's (or folder's) stem and A1111's
    8-digit legacy hash of the weights (taken from `hashes` {model: hash} when given, else computed for an
    existing file; left out when unknown)."""
    path = Path(str(model))
    digest = (hashes or {}).get(str(model))
    if digest is None:
        digest = control_model_hash(path)
    name = path.name if path.is_dir() else path.stem
    return f"{name} [{digest}]" if digest else name


def control_model_hash(path: str | Path) -> str | None:
    """A1111's 8-digit legacy hash of a control model file (of a diffusers folder's weights file); None
    when there is no such file."""
    weights = Path(path)
    if weights.is_dir():
        found = sorted(weights.glob("*.safetensors")) + sorted(weights.glob("*.bin"))
        weights = found[0] if found else weights
    if not weights.is_file():
        return None
    try:
        return legacy_hash(weights)
    except OSError:
        return None


def _image_size(image: Any) -> tuple[int, int] | None:
    """(width, height) of a control image given as a path or a PIL image (reading the header only);
    None if unknown."""
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:
        return size
    if isinstance(image, str) and image != "<image>":
        try:
            with Image.open(image) as img:
                return img.size
        except (OSError, ValueError):
            return None
    return None


def _slider_text(value: Any, default: Any) -> str:
    if value is None or value == default:
        return str(default)
    return str(float(value))


def ip_adapter_module(model: str) -> str:
    """The extension's preprocessor name for an SDXL IP-Adapter file: FaceID, ViT-H (plus, vit-h) or bigG."""
    stem = Path(str(model)).name.lower()
    if "faceid" in stem or "face_id" in stem:
        return "ip-adapter_face_id_plus" if "plus" in stem else "ip-adapter_face_id"
    if "plus" in stem or "vit-h" in stem or "vith" in stem:
        return "ip-adapter_clip_sdxl_plus_vith"
    return "ip-adapter_clip_sdxl"


def control_infotext(controls: Any, ip_adapters: Any, width: int | None, height: int | None,
                     hashes: Mapping[str, str] | None = None) -> dict[str, str]:
    """{"ControlNet 0": "Module: canny, Model: name [hash], Weight: 1.0, ...", ...}: one entry per control
    unit, then one per IP-Adapter (the extension runs both as ControlNet units), with its field names
    and value spelling (Python's str of each value). Preprocessing runs at the pixel-perfect resolution
    (written as Processor Res, Pixel Perfect: True; left out when the image's size is unknown); a unit
    without a preprocessor writes the extension's default 512 and Pixel Perfect: False."""
    out: dict[str, str] = {}
    for unit in controls or ():
        pre = canonical_preprocessor(_unit_get(unit, "preprocessor") or "none") or "none"
        resize = _unit_get(unit, "resize_mode", "crop")
        values: dict[str, Any] = {"Module": A1111_MODULES[pre],
                                  "Model": control_model_label(_unit_get(unit, "model"), hashes),
                                  "Weight": str(float(_unit_get(unit, "weight", 1.0))),
                                  "Resize Mode": A1111_RESIZE_MODES.get(resize, resize)}
        size = _image_size(_unit_get(unit, "image"))
        if pre == "none":
            values["Processor Res"] = "512"
        elif size is not None and width and height:
            values["Processor Res"] = str(pixel_perfect_resolution(size[0], size[1], resize, width, height))
        for label, key, spec in (("Threshold A", "threshold_a", PARAMETERS[pre][0]),
                                 ("Threshold B", "threshold_b", PARAMETERS[pre][1])):
            values[label] = (_slider_text(_unit_get(unit, key), spec[1]) if spec is not None
                             else str(_HIDDEN_SLIDER))
        values["Guidance Start"] = str(float(_unit_get(unit, "start", 0.0)))
        values["Guidance End"] = str(float(_unit_get(unit, "end", 1.0)))
        values["Pixel Perfect"] = str(pre != "none" and "Processor Res" in values)
        mode = _unit_get(unit, "control_mode", "balanced")
        values["Control Mode"] = A1111_CONTROL_MODES.get(mode, mode)
        out[f"ControlNet {len(out)}"] = _unit_text(values)
    for unit in ip_adapters or ():
        model = str(_unit_get(unit, "model"))
        values = {"Module": ip_adapter_module(model), "Model": control_model_label(model, hashes),
                  "Weight": str(float(_unit_get(unit, "scale", 1.0))), "Resize Mode": "Crop and Resize",
                  "Processor Res": "512", "Threshold A": str(_HIDDEN_SLIDER),
                  "Threshold B": str(_HIDDEN_SLIDER),
                  "Guidance Start": str(float(_unit_get(unit, "start", 0.0))),
                  "Guidance End": str(float(_unit_get(unit, "end", 1.0))), "Pixel Perfect": "False",
                  "Control Mode": "Balanced"}
        out[f"ControlNet {len(out)}"] = _unit_text(values)
    return out


def _unit_text(values: dict[str, Any]) -> str:
    # the extension's serialize(): "Field: value" pairs joined by ", "; it cannot hold ',' or ':' in a value
    return ", ".join(f"{k}: {str(v).replace(',', '').replace(':', '')}" for k, v in values.items())


def parse_control_unit(text: str) -> dict[str, str]:
    """'Module: canny, Model: x [h], Weight: 1.0, ...' (one ControlNet infotext value) -> {label: text}."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition(": ")
        if sep:
            out[key] = value
    return out
