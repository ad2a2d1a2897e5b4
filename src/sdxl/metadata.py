"""PNG metadata: write our images so every tool can read them, and read back what other tools wrote.

Each PNG we write carries two text chunks:
- `parameters`: the A1111 "infotext" (prompt, `Negative prompt:` line, `Steps: .., Sampler: ..` line). This
  is what Civitai, A1111's PNG Info, Forge, SD.Next and many image browsers read.
- `sdxl`: a JSON record of the whole request (every field, micro-conditioning, refiner, LoRAs with their
  hashes, the library version), so `sdxl generate --from IMAGE` can rebuild the request exactly.

`read_info` recognises our own files and those of AUTOMATIC1111 (and its forks), ComfyUI, Fooocus and
InvokeAI, and maps each tool's fields onto one normalised dictionary with our request's names (prompt,
negative_prompt, steps, sampler, schedule, cfg, seed, width, height, model, model_hash, loras, ...). A1111
sampler and schedule labels become the names `GenerationRequest` uses ("DPM++ 2M" -> "dpmpp_2m", "Euler a"
-> "euler_a", "Karras" -> "karras"); ComfyUI, Fooocus and InvokeAI names are kept as written (the
request's resolver accepts them), and a name we do not know is passed through unchanged.

Metadata is untrusted input: every reader here returns what it could understand and never raises on a
malformed chunk (it reports the problem under "error" instead).

The A1111 model hash is the first 10 hex digits of the SHA-256 of the whole file (`short_hash`); LoRA
hashes in infotexts are 12 hex digits of the SHA-256 of the safetensors tensor data ("addnet" hash,
`lora_hash`); textual-inversion hashes are 12 hex digits of the whole-file SHA-256 (`embedding_hash`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .prompts import PromptError, extract_networks

RECORD_CHUNK = "sdxl"  # the PNG text chunk holding our JSON record
PARAMETERS_CHUNK = "parameters"  # A1111's chunk

# A1111 schedule types (1.9+) under the names GenerationRequest uses -> the label infotexts show.
SCHEDULE_LABELS = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
}
_SCHEDULE_ALIASES = {"SGMUniform": "sgm_uniform", "ddim": "ddim_uniform"}

# Sampler names as GenerationRequest / sdxl.sampling spell them -> A1111 labels.
SAMPLER_LABELS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "lms": "LMS",
    "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive",
    "dpmpp_2s_a": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ddim": "DDIM",
    "ddim_cfgpp": "DDIM CFG++",
    "plms": "PLMS",
    "unipc": "UniPC",
    "lcm": "LCM",
    "restart": "Restart",
}
_SAMPLER_NAMES = {label: name for name, label in SAMPLER_LABELS.items()}
# ComfyUI's spellings of the same samplers, accepted when writing an infotext.
_COMFY_SAMPLERS = {
    "euler_ancestral": "euler_a",
    "dpm_2_ancestral": "dpm_2_a",
    "dpmpp_2s_ancestral": "dpmpp_2s_a",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",
}


def a1111_sampler_label(name: str) -> str:
    """'dpmpp_2m' (ours or ComfyUI's, '_gpu' variants included) -> 'DPM++ 2M'; unknown names unchanged."""
    base = name[:-4] if name.endswith("_gpu") else name
    base = _COMFY_SAMPLERS.get(base, base)
    return SAMPLER_LABELS.get(base, name)


# ---------------------------------------------------------------------------------------------------------
# A1111 infotext
# ---------------------------------------------------------------------------------------------------------

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
    "RNG": ("rng", str),
    "Emphasis": ("emphasis", str),
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
            out["Sampler"] = a1111_sampler_label(str(value))
        elif key == "schedule":
            out["Schedule type"] = SCHEDULE_LABELS.get(value, str(value))
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
    LoRAs are not a field: A1111 keeps them as `<lora:name:w>` tags in the prompt (see `request_to_a1111`).
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


def _split_sampler(label: str) -> tuple[str, str | None]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'karras'): before A1111 1.9 the schedule was part of the name."""
    options = [(name, name) for name in SCHEDULE_LABELS]
    options += [(label_, name) for name, label_ in SCHEDULE_LABELS.items()]
    options += list(_SCHEDULE_ALIASES.items())
    for option, name in options:
        if label.endswith(" " + option):
            return label[: -len(option) - 1], name
    return label, None


def _schedule_name(label: str) -> str:
    for name, known in SCHEDULE_LABELS.items():
        if label in (known, name):
            return name
    return _SCHEDULE_ALIASES.get(label, label)


def _parse_hash_list(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = value.strip()
    return out


def _number(value: Any, kind: type) -> Any:
    """int/float from a str or a number; None when it is not one (or is not finite)."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return None
    try:
        number = float(value) if kind is float else int(str(value).strip())
    except (TypeError, ValueError, OverflowError):
        if kind is int:
            try:
                as_float = float(value)
            except (TypeError, ValueError):
                return None
            return int(as_float) if as_float.is_integer() else None
        return None
    if isinstance(number, float) and not math.isfinite(number):
        return None
    return number


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
            name, schedule = _split_sampler(value)
            out["sampler"] = _SAMPLER_NAMES.get(name, name)
            if schedule is not None:
                out["schedule"] = schedule
        elif label == "Schedule type":
            out.setdefault("schedule", _schedule_name(value))
        elif label == "Refiner":
            out["refiner"], refiner_hash = _split_refiner(value)
            if refiner_hash is not None:
                out["refiner_hash"] = refiner_hash
        elif label in ("Lora hashes", "TI hashes"):
            out["lora_hashes" if label == "Lora hashes" else "ti_hashes"] = _parse_hash_list(value)
        elif label == "Clip skip" and (_number(value, int) or 0) >= 2:
            out["clip_skip"] = _number(value, int) - 1  # A1111 counts from the last layer, we from SDXL's
        elif label in _SIMPLE_FIELDS:
            key, kind = _SIMPLE_FIELDS[label]
            converted = value if kind is str else _number(value, kind)
            if converted is None:
                out[label] = value
            else:
                out[key] = converted
        else:
            out[label] = value
    return out


def request_to_a1111(request: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The infotext fields for a `GenerationRequest.to_dict()`, ready for `format_a1111`.

    LoRAs in `request["loras"]` that the prompt does not already name are appended to the prompt as
    `<lora:name:weight>` tags, so A1111 and Civitai see them. `extra` adds fields only the caller knows
    (model, model_hash, vae, lora_hashes, version, ...); they are placed as format_a1111 orders them.
    """
    prompt = str(request.get("prompt") or "")
    try:
        named = {lora.name for lora in extract_networks(prompt).loras}
    except PromptError:
        named = set()
    tags = []
    for lora in request.get("loras") or []:
        if isinstance(lora, dict):
            name, weight = lora["name"], lora.get("weight", 1.0)
        else:  # a LoraSpec or a (name, weight) pair
            name, weight = (lora.name, lora.weight) if hasattr(lora, "name") else tuple(lora)[:2]
        if name not in named:
            tags.append(f"<lora:{name}:{_value_text(float(weight))}>")
    if tags:
        prompt = f"{prompt} {' '.join(tags)}".strip()
    params: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": request.get("negative_prompt") or "",
        "steps": request.get("steps"),
        "sampler": request.get("sampler"),
        "schedule": request.get("schedule"),
        "cfg": request.get("cfg"),
        "seed": request.get("seed"),
        "width": request.get("width"),
        "height": request.get("height"),
        "clip_skip": request.get("clip_skip"),
        "denoising_strength": request.get("strength") if request.get("init_image") is not None else None,
    }
    if request.get("refiner"):
        params["refiner"] = request["refiner"]
        if request.get("refiner_mode", "ensemble") == "ensemble":
            params["refiner_switch"] = request.get("refiner_switch")
    params.update(extra)
    return params


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------


def write_png(image: Image.Image, path: str | os.PathLike, parameters: str, record: dict[str, Any]) -> Path:
    """Save `image` as a PNG with the A1111 `parameters` chunk and our JSON `sdxl` chunk, atomically.

    The file is written next to its destination under a temporary name, flushed to disk, then renamed
    over `path` (os.replace), so a reader never sees half a file, even if the process dies mid-write; if
    anything fails, an existing file at `path` is left untouched.
    `parameters` goes in a tEXt chunk (iTXt when it is not Latin-1, which Pillow decides). `record` is
    stored as compressed UTF-8 JSON; we suggest {"request": request.to_dict(), "model": .., "model_hash":
    .., "loras": [{name, weight, hash}], "version": ..} - `read_info` returns "request" merged with the
    other top-level keys. Values JSON cannot hold are written with str(); NaN or infinity raise ValueError.
    """
    path = Path(path)
    info = PngInfo()
    if parameters:
        info.add_text(PARAMETERS_CHUNK, parameters)
    info.add_itxt(
        RECORD_CHUNK, json.dumps(record, ensure_ascii=False, allow_nan=False, default=str), zip=True
    )
    save_args: dict[str, Any] = {"format": "PNG", "pnginfo": info}
    if image.info.get("icc_profile"):
        save_args["icc_profile"] = image.info["icc_profile"]
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: image.save(f, **save_args))
    return path


def _atomic_write(target: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same folder, fsync it, then os.replace it over `target`.

    The temporary file is opened normally (not with mkstemp, whose 0600 mode would stick to the result),
    so the file gets the usual permissions; a failure removes it and leaves `target` as it was.
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------


def read_info(source: str | os.PathLike | Image.Image) -> dict[str, Any]:
    """What made this image: {"source", "parameters", "raw"} (plus "error" when a chunk was malformed).

    - source: "sdxl" (our JSON record), "a1111" (a `parameters` infotext: A1111, Forge, SD.Next, Civitai),
      "comfyui" (`prompt` API graph and/or `workflow`), "fooocus" (`fooocus_scheme`, or `parameters`
      holding JSON), "invokeai" (`invokeai_metadata`, older `sd-metadata` or `Dream`), or "unknown".
    - parameters: the normalised dictionary (our request's keys where they exist, e.g. prompt,
      negative_prompt, steps, sampler, schedule, cfg, seed, width, height, model, model_hash, loras as
      [{"name", "weight"}], refiner, refiner_switch, ...; tool-specific extras keep their own names).
    - raw: every text chunk as stored (JSON left as text).

    JPEG and WebP images written by A1111 carry the infotext in EXIF UserComment; that is read too.
    Opening something that is not an image raises Pillow's error; a bad chunk never raises.
    """
    if isinstance(source, Image.Image):
        return info_from_chunks(_text_chunks(source))
    with Image.open(source) as image:
        return info_from_chunks(_text_chunks(image))


def _text_chunks(image: Image.Image) -> dict[str, str]:
    found: Any = None
    try:
        found = getattr(image, "text", None)  # PNG: every tEXt/zTXt/iTXt chunk, also those after the pixels
    except (ValueError, OSError, SyntaxError, EOFError):  # a damaged or oversized chunk
        found = None
    items = found if isinstance(found, dict) else image.info
    chunks = {str(k): v for k, v in items.items() if isinstance(v, str)}
    if PARAMETERS_CHUNK not in chunks:
        try:
            exif = image.getexif().get_ifd(0x8769)  # the Exif sub-IFD
            comment, maker = exif.get(0x9286), exif.get(0x927C)  # UserComment, MakerNote
        except Exception:  # EXIF is untrusted too
            comment = maker = None
        text = _exif_text(comment)
        if text:
            chunks[PARAMETERS_CHUNK] = text
            scheme = _exif_text(maker)
            if scheme in ("fooocus", "a1111"):
                chunks["fooocus_scheme"] = scheme
    return chunks


def _exif_text(value: Any) -> str | None:
    """Decode an EXIF UNDEFINED text: 8-byte charset prefix ("UNICODE\\0", "ASCII\\0\\0\\0") + data."""
    if isinstance(value, str):
        return value.strip("\x00") or None
    if not isinstance(value, bytes) or not value:
        return None
    prefix, data = value[:8], value[8:]
    if prefix == b"UNICODE\x00":
        big_endian = len(data) >= 2 and data[0] == 0 and data[1] != 0
        text = data.decode("utf-16-be" if big_endian else "utf-16-le", errors="replace")
    elif prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        text = data.decode("utf-8", errors="replace")
    else:
        text = value.decode("utf-8", errors="replace")
    return text.strip("\x00") or None


def _loads(text: Any) -> Any:
    """json.loads that returns None for anything that is not JSON (including absurdly deep nesting)."""
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _is_comfy_graph(value: Any) -> bool:
    return isinstance(value, dict) and any(isinstance(v, dict) and "class_type" in v for v in value.values())


def info_from_chunks(chunks: dict[str, str]) -> dict[str, Any]:
    """`read_info` on text chunks already extracted (e.g. from an upload's PNG chunks)."""
    result: dict[str, Any] = {"source": "unknown", "parameters": {}, "raw": dict(chunks)}
    parameters = chunks.get(PARAMETERS_CHUNK)
    parameters_json = _loads(parameters) if parameters and parameters.lstrip().startswith("{") else None
    comfy_graph = _loads(chunks.get("prompt"))

    if RECORD_CHUNK in chunks:
        source, parse = "sdxl", lambda: _from_record(_loads(chunks[RECORD_CHUNK]))
    elif "invokeai_metadata" in chunks:
        source, parse = "invokeai", lambda: _from_invokeai(_loads(chunks["invokeai_metadata"]))
    elif "sd-metadata" in chunks:
        source, parse = "invokeai", lambda: _from_invokeai_legacy(_loads(chunks["sd-metadata"]))
    elif "Dream" in chunks:
        source, parse = "invokeai", lambda: _from_dream(chunks["Dream"])
    elif "fooocus_scheme" in chunks or isinstance(parameters_json, dict):
        source, parse = "fooocus", lambda: _from_fooocus(parameters_json, parameters)
    elif _is_comfy_graph(comfy_graph):
        source, parse = "comfyui", lambda: _from_comfy(comfy_graph)
    elif parameters:
        source, parse = "a1111", lambda: _from_a1111(parameters)
    elif "workflow" in chunks:  # a UI graph only: positions and widgets, no reliable field names
        source, parse = "comfyui", dict
    else:
        return result

    result["source"] = source
    try:
        result["parameters"] = parse()
    except Exception as e:  # untrusted metadata: report, never raise
        result["error"] = f"{type(e).__name__}: {e}"
        if source == "sdxl" and parameters:
            try:
                result["parameters"] = _from_a1111(parameters)
            except Exception:
                pass
    return result


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None and value != "":
        out[key] = value


def _prompt_loras(prompt: str) -> list[dict[str, Any]]:
    try:
        return [{"name": lora.name, "weight": lora.weight} for lora in extract_networks(prompt).loras]
    except PromptError:
        return []


def _from_record(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError("the sdxl chunk is not a JSON object")
    request = record.get("request")
    params = dict(request) if isinstance(request, dict) else {}
    for key, value in record.items():
        if key != "request" and key not in params:
            params[key] = value
    return params


def _from_a1111(text: str) -> dict[str, Any]:
    params = parse_a1111(text)
    loras = _prompt_loras(params.get("prompt", ""))
    if loras:
        params["loras"] = loras
    return params


# -- Fooocus ---------------------------------------------------------------------------------------------

_FOOOCUS_STEPS = {"Speed": 30, "Quality": 60, "Extreme Speed": 8, "Lightning": 4, "Hyper-SD": 4}


def _from_fooocus(data: Any, text: str | None) -> dict[str, Any]:
    """Fooocus writes `parameters` as its own JSON (scheme "fooocus") or as an A1111 infotext ("a1111")."""
    if not isinstance(data, dict):
        params = _from_a1111(text or "")
        if "schedule" not in params and isinstance(params.get("Scheduler"), str):
            params["schedule"] = params.pop("Scheduler")
        return params
    out: dict[str, Any] = {}
    _put(out, "prompt", data.get("prompt") if isinstance(data.get("prompt"), str) else None)
    _put(
        out,
        "negative_prompt",
        data.get("negative_prompt") if isinstance(data.get("negative_prompt"), str) else None,
    )
    steps = _number(data.get("steps"), int)
    _put(out, "steps", steps if steps is not None else _FOOOCUS_STEPS.get(str(data.get("performance"))))
    size = re.fullmatch(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", str(data.get("resolution", "")).strip())
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    _put(out, "cfg", _number(data.get("guidance_scale"), float))
    _put(out, "sampler", data.get("sampler") if isinstance(data.get("sampler"), str) else None)
    _put(out, "schedule", data.get("scheduler") if isinstance(data.get("scheduler"), str) else None)
    _put(out, "seed", _number(data.get("seed"), int))
    base = data.get("base_model")
    if isinstance(base, str) and base:
        out["model"] = Path(base).stem if base.endswith((".safetensors", ".ckpt")) else base
    _put(
        out,
        "model_hash",
        data.get("base_model_hash") if isinstance(data.get("base_model_hash"), str) else None,
    )
    refiner = data.get("refiner_model")
    if isinstance(refiner, str) and refiner not in ("", "None"):
        out["refiner"] = Path(refiner).stem if refiner.endswith((".safetensors", ".ckpt")) else refiner
        _put(out, "refiner_switch", _number(data.get("refiner_switch"), float))
    loras = []
    for item in data.get("loras") or []:  # [name, weight, hash] (2.3+)
        if isinstance(item, (list, tuple)) and len(item) >= 2 and _number(item[1], float) is not None:
            loras.append({"name": str(item[0]), "weight": _number(item[1], float)})
    for key in sorted(k for k in data if k.startswith("lora_combined_")):  # "name : weight" (older)
        name, sep, weight = str(data[key]).rpartition(" : ")
        if sep and _number(weight, float) is not None and name not in ("", "None"):
            loras.append({"name": Path(name).stem, "weight": _number(weight, float)})
    if loras:
        out["loras"] = loras
    for key in ("styles", "performance", "sharpness", "adm_guidance", "vae", "version"):
        _put(out, key, data.get(key))
    return out


# -- InvokeAI --------------------------------------------------------------------------------------------

_INVOKE_SAMPLERS = {"kdpm_2": "dpm_2", "kdpm_2_a": "dpm_2_a"}  # the others already use our names


def _invoke_sampler(name: str) -> tuple[str, str | None]:
    """InvokeAI scheduler names: a '_k' suffix means Karras sigmas ("dpmpp_2m_k")."""
    schedule = None
    if name.endswith("_k"):
        name, schedule = name[:-2], "karras"
    return _INVOKE_SAMPLERS.get(name, name), schedule


def _model_name(value: Any) -> tuple[str | None, str | None]:
    """InvokeAI model fields: {"name"/"model_name", "hash"} (v3-v5) or a plain string."""
    if isinstance(value, dict):
        name = value.get("name") or value.get("model_name")
        model_hash = value.get("hash")
        return (str(name) if name else None), (str(model_hash) if isinstance(model_hash, str) else None)
    if isinstance(value, str) and value:
        return value, None
    return None, None


def _from_invokeai(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError("invokeai_metadata is not a JSON object")
    out: dict[str, Any] = {}
    for key, source, kind in (
        ("prompt", "positive_prompt", str),
        ("negative_prompt", "negative_prompt", str),
        ("width", "width", int),
        ("height", "height", int),
        ("seed", "seed", int),
        ("steps", "steps", int),
        ("cfg", "cfg_scale", float),
        ("guidance_rescale", "cfg_rescale_multiplier", float),
        ("denoising_strength", "strength", float),
        ("refiner_switch", "refiner_start", float),
        ("refiner_steps", "refiner_steps", int),
        ("aesthetic_score", "refiner_positive_aesthetic_score", float),
        ("negative_aesthetic_score", "refiner_negative_aesthetic_score", float),
        ("version", "app_version", str),
    ):
        value = data.get(source)
        _put(out, key, (value if isinstance(value, str) else None) if kind is str else _number(value, kind))
    # SDXL "style" prompts go to the bigG encoder, like our prompt_2; equal to the prompt means no style.
    for key, source, main in (
        ("prompt_2", "positive_style_prompt", "prompt"),
        ("negative_prompt_2", "negative_style_prompt", "negative_prompt"),
    ):
        style = data.get(source)
        if isinstance(style, str) and style and style != out.get(main):
            out[key] = style
    # InvokeAI's clip_skip counts layers skipped beyond the default one; ours (and A1111's) starts at 1.
    clip_skip = _number(data.get("clip_skip"), int)
    if clip_skip is not None and clip_skip >= 0:
        out["clip_skip"] = clip_skip + 1
    if isinstance(data.get("scheduler"), str):
        out["sampler"], schedule = _invoke_sampler(data["scheduler"])
        _put(out, "schedule", schedule)
    name, model_hash = _model_name(data.get("model"))
    _put(out, "model", name)
    _put(out, "model_hash", model_hash)
    refiner, _ = _model_name(data.get("refiner_model"))
    _put(out, "refiner", refiner)
    vae, _ = _model_name(data.get("vae"))
    _put(out, "vae", vae)
    loras = []
    for item in data.get("loras") or []:
        if isinstance(item, dict):
            lora_name, _ = _model_name(item.get("model") or item.get("lora"))
            weight = _number(item.get("weight"), float)
            if lora_name and weight is not None:
                loras.append({"name": lora_name, "weight": weight})
    if loras:
        out["loras"] = loras
    _put(
        out,
        "generation_mode",
        data.get("generation_mode") if isinstance(data.get("generation_mode"), str) else None,
    )
    return out


def _legacy_sampler(name: str) -> str:
    name = name[2:] if name.startswith("k_") else name
    return _INVOKE_SAMPLERS.get(name, name)


def _from_invokeai_legacy(data: Any) -> dict[str, Any]:
    """InvokeAI 2.x `sd-metadata`: {"model_weights", "model_hash", "app_version", "image": {...}}."""
    if not isinstance(data, dict):
        raise ValueError("sd-metadata is not a JSON object")
    image = data.get("image") if isinstance(data.get("image"), dict) else {}
    out: dict[str, Any] = {}
    prompt = image.get("prompt")
    if isinstance(prompt, list):  # [{"prompt": .., "weight": ..}, ...]
        prompt = " ".join(str(p.get("prompt", "")) for p in prompt if isinstance(p, dict))
    _put(out, "prompt", prompt if isinstance(prompt, str) else None)
    for key, source, kind in (
        ("steps", "steps", int),
        ("cfg", "cfg_scale", float),
        ("seed", "seed", int),
        ("width", "width", int),
        ("height", "height", int),
        ("denoising_strength", "strength", float),
    ):
        _put(out, key, _number(image.get(source), kind))
    if isinstance(image.get("sampler"), str):
        out["sampler"] = _legacy_sampler(image["sampler"])
    _put(out, "model", data.get("model_weights") if isinstance(data.get("model_weights"), str) else None)
    _put(out, "model_hash", data.get("model_hash") if isinstance(data.get("model_hash"), str) else None)
    _put(out, "version", data.get("app_version") if isinstance(data.get("app_version"), str) else None)
    return out


def _from_dream(text: str) -> dict[str, Any]:
    """The first InvokeAI format, a command line: `"a prompt" -s 50 -S 42 -W 512 -H 512 -C 7.5 -A k_lms`."""
    words = shlex.split(text)
    out: dict[str, Any] = {}
    flags = {
        "-s": ("steps", int),
        "-S": ("seed", int),
        "-W": ("width", int),
        "-H": ("height", int),
        "-C": ("cfg", float),
        "-f": ("denoising_strength", float),
    }
    prompt: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in flags and i + 1 < len(words):
            key, kind = flags[word]
            _put(out, key, _number(words[i + 1], kind))
            i += 2
        elif word == "-A" and i + 1 < len(words):
            out["sampler"] = _legacy_sampler(words[i + 1])
            i += 2
        elif word.startswith("-") and len(word) == 2:
            i += 2
        else:
            prompt.append(word)
            i += 1
    _put(out, "prompt", " ".join(prompt))
    return out


# -- ComfyUI ---------------------------------------------------------------------------------------------

_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
_TEXT_INPUTS = ("text", "string", "value", "prompt", "text_g", "text_l")
_MAX_HOPS = 200
# CLIPTextEncodeSDXL's micro-conditioning inputs -> our request's names
_SDXL_ENCODER_SIZES = {
    "original_width": "width",
    "original_height": "height",
    "target_width": "target_width",
    "target_height": "target_height",
    "crop_left": "crop_w",
    "crop_top": "crop_h",
}


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))


def _upstream(
    nodes: dict[str, dict[str, Any]], link: Any, accept: Callable[[dict[str, Any]], bool], via: Iterable[str]
) -> tuple[str, dict[str, Any]] | None:
    """Breadth-first search from a link towards the inputs, following only inputs named in `via`, for the
    first node `accept` likes. Cycles and absurdly large graphs are cut off."""
    via = tuple(via)
    queue = [link] if _is_link(link) else []
    seen: set[str] = set()
    while queue and len(seen) < _MAX_HOPS:
        node_id = str(queue.pop(0)[0])
        if node_id in seen or node_id not in nodes:
            continue
        seen.add(node_id)
        node = nodes[node_id]
        if accept(node):
            return node_id, node
        queue.extend(node["inputs"][name] for name in via if _is_link(node["inputs"].get(name)))
    return None


def _resolve_text(
    nodes: dict[str, dict[str, Any]], value: Any, hops: int = 0, seen: set[str] | None = None
) -> str | None:
    """A text input, or the text of a string node it is linked to (primitive and custom text nodes).

    Depth-first over the text-like inputs; each node is entered at most once (`seen`). Without that, a
    node whose six text inputs all link onward (to itself, or to a chain of such nodes) made the search
    visit 6**20 paths: a few hundred bytes of `prompt` chunk could hang `read_info`.
    """
    if isinstance(value, str):
        return value
    if not _is_link(value) or hops > 20:
        return None
    seen = set() if seen is None else seen
    node_id = str(value[0])
    node = nodes.get(node_id)
    if node is None or node_id in seen:
        return None
    seen.add(node_id)
    for name in _TEXT_INPUTS:
        if name in node["inputs"]:
            text = _resolve_text(nodes, node["inputs"][name], hops + 1, seen)
            if text is not None:
                return text
    return None


def _comfy_conditioning(nodes: dict[str, dict[str, Any]], link: Any, role: str) -> dict[str, Any]:
    def has_text(node: dict[str, Any]) -> bool:
        return any(name in node["inputs"] for name in ("text", "text_g", "text_l"))

    via = (role, "conditioning", "conditioning_1", "conditioning_2", "conditioning_to", "conditioning_from")
    found = _upstream(nodes, link, has_text, via)
    if found is None:
        return {}
    inputs = found[1]["inputs"]
    if "text" in inputs:
        return {"text": _resolve_text(nodes, inputs["text"])}
    out = {
        "text_l": _resolve_text(nodes, inputs.get("text_l")),
        "text_g": _resolve_text(nodes, inputs.get("text_g")),
    }
    for key, name in _SDXL_ENCODER_SIZES.items():
        out[key] = _number(inputs.get(name), int)
    return out


def _comfy_model(nodes: dict[str, dict[str, Any]], link: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """Walk the `model` inputs up to the checkpoint loader, collecting LoRA loaders on the way."""
    loras: list[dict[str, Any]] = []
    seen: set[str] = set()
    while _is_link(link) and str(link[0]) in nodes and str(link[0]) not in seen and len(seen) < _MAX_HOPS:
        seen.add(str(link[0]))
        inputs = nodes[str(link[0])]["inputs"]
        if isinstance(inputs.get("ckpt_name"), str):
            return inputs["ckpt_name"], loras[::-1]
        if isinstance(inputs.get("unet_name"), str):
            return inputs["unet_name"], loras[::-1]
        if isinstance(inputs.get("lora_name"), str):
            weight = _number(inputs.get("strength_model", 1.0), float)
            loras.append(
                {"name": Path(inputs["lora_name"]).stem, "weight": 1.0 if weight is None else weight}
            )
        link = inputs.get("model")
    return None, loras[::-1]


def _latent_origin(
    nodes: dict[str, dict[str, Any]], node: dict[str, Any]
) -> tuple[str, dict[str, Any]] | None:
    def is_origin(candidate: dict[str, Any]) -> bool:
        return candidate["class_type"] in _SAMPLER_NODES or (
            "width" in candidate["inputs"]
            and "height" in candidate["inputs"]
            and "batch_size" in candidate["inputs"]
        )

    return _upstream(
        nodes, node["inputs"].get("latent_image"), is_origin, ("samples", "latent_image", "latent")
    )


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 60, node_id)


def _from_comfy(graph: dict[str, Any]) -> dict[str, Any]:
    """Parameters from a ComfyUI API-format graph: the first-pass KSampler(Advanced), its prompts, checkpoint,
    LoRA loaders and latent size; a second sampler fed by the first is reported as the refiner."""
    nodes = {
        str(k): v
        for k, v in graph.items()
        if isinstance(v, dict) and isinstance(v.get("class_type"), str) and isinstance(v.get("inputs"), dict)
    }
    samplers = sorted((k for k, v in nodes.items() if v["class_type"] in _SAMPLER_NODES), key=_node_order)
    if not samplers:
        return {}
    origins = {k: _latent_origin(nodes, nodes[k]) for k in samplers}
    first = next((k for k in samplers if origins[k] is None or origins[k][0] not in samplers), samplers[0])
    inputs = nodes[first]["inputs"]

    out: dict[str, Any] = {}
    positive = _comfy_conditioning(nodes, inputs.get("positive"), "positive")
    negative = _comfy_conditioning(nodes, inputs.get("negative"), "negative")
    if "text" in positive:
        _put(out, "prompt", positive["text"])
    elif positive:
        _put(out, "prompt", positive["text_l"] if positive["text_l"] is not None else positive["text_g"])
        if positive["text_g"] is not None and positive["text_g"] != out.get("prompt"):
            out["prompt_2"] = positive["text_g"]
        for key in (
            "original_width",
            "original_height",
            "target_width",
            "target_height",
            "crop_left",
            "crop_top",
        ):
            _put(out, key, positive[key])
    if "text" in negative:
        _put(out, "negative_prompt", negative["text"])
    elif negative:
        _put(
            out,
            "negative_prompt",
            negative["text_l"] if negative["text_l"] is not None else negative["text_g"],
        )
        if negative["text_g"] is not None and negative["text_g"] != out.get("negative_prompt"):
            out["negative_prompt_2"] = negative["text_g"]

    _put(out, "seed", _number(inputs.get("seed", inputs.get("noise_seed")), int))
    _put(out, "steps", _number(inputs.get("steps"), int))
    _put(out, "cfg", _number(inputs.get("cfg"), float))
    _put(out, "sampler", inputs.get("sampler_name") if isinstance(inputs.get("sampler_name"), str) else None)
    _put(out, "schedule", inputs.get("scheduler") if isinstance(inputs.get("scheduler"), str) else None)
    denoise = _number(inputs.get("denoise"), float)
    if denoise is not None and denoise < 1.0:
        out["denoising_strength"] = denoise

    checkpoint, loras = _comfy_model(nodes, inputs.get("model"))
    if checkpoint:
        out["model"], out["model_file"] = Path(checkpoint).stem, checkpoint
    if loras:
        out["loras"] = loras
    origin = origins[first]
    if origin is not None and origin[1]["class_type"] not in _SAMPLER_NODES:
        _put(out, "width", _number(origin[1]["inputs"].get("width"), int))
        _put(out, "height", _number(origin[1]["inputs"].get("height"), int))

    second = next((k for k in samplers if origins[k] is not None and origins[k][0] == first), None)
    if second is not None:
        refiner, _ = _comfy_model(nodes, nodes[second]["inputs"].get("model"))
        if refiner and refiner != checkpoint:
            out["refiner"] = Path(refiner).stem
            end, steps = _number(inputs.get("end_at_step"), int), out.get("steps")
            if end is not None and steps and 0 < end < steps:
                out["refiner_switch"] = end / steps
    return out


# ---------------------------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, int, int, str], str] = {}
_BLOCK = 1 << 20


def _digest(path: Path, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            block = f.read(_BLOCK if remaining is None else min(_BLOCK, remaining))
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return h.hexdigest()


def _cached(
    path: str | os.PathLike, kind: str, compute: Callable[[Path], str], cache_file: Path | None
) -> str:
    """Hash once per (file, size, mtime): in memory always, and in `cache_file` (JSON) when given.

    SDXL checkpoints are ~7 GB, so hashing takes seconds; a CLI passes a cache file in the user's cache
    directory so it is done once per file version. A broken or unwritable cache file is ignored.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, kind)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    entry_key = f"{kind}:{p}"
    stored: dict[str, Any] = {}
    if cache_file is not None:
        loaded = _loads(Path(cache_file).read_text("utf-8")) if Path(cache_file).is_file() else None
        stored = loaded if isinstance(loaded, dict) else {}
        entry = stored.get(entry_key)
        if (
            isinstance(entry, dict)
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
        ):
            if isinstance(entry.get("sha256"), str):
                _HASH_CACHE[key] = entry["sha256"]
                return entry["sha256"]
    digest = compute(p)
    _HASH_CACHE[key] = digest
    if cache_file is not None:
        stored[entry_key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        try:
            target = Path(cache_file)
            target.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(target, lambda f: f.write(json.dumps(stored).encode("utf-8")))
        except OSError:
            pass
    return digest


def sha256_file(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """SHA-256 (hex) of the whole file, read in 1 MiB blocks."""
    return _cached(path, "sha256", _digest, Path(cache_file) if cache_file else None)


def short_hash(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """A1111's "Model hash" (Civitai's AutoV2): the first 10 hex digits of the file's SHA-256."""
    return sha256_file(path, cache_file=cache_file)[:10]


def legacy_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-digit model hash: SHA-256 of the 64 KiB at offset 1 MiB (still accepted by A1111)."""
    return _digest(Path(path), offset=0x100000, length=0x10000)[:8]


def addnet_hash(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """SHA-256 of a safetensors file's tensor data, header excluded (kohya's `sshs_model_hash`), so
    editing the metadata does not change it. A1111 identifies LoRAs by its first 12 digits."""

    def compute(p: Path) -> str:
        with open(p, "rb") as f:
            header = f.read(8)
        size = p.stat().st_size
        if len(header) != 8 or 8 + int.from_bytes(header, "little") > size:
            raise ValueError(f"{p}: not a safetensors file (bad header length)")
        return _digest(p, offset=8 + int.from_bytes(header, "little"))

    return _cached(path, "addnet", compute, Path(cache_file) if cache_file else None)


def lora_hash(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """The 12-digit hash A1111 writes in "Lora hashes" (addnet hash for safetensors, else whole file)."""
    if Path(path).suffix.lower() == ".safetensors":
        return addnet_hash(path, cache_file=cache_file)[:12]
    return sha256_file(path, cache_file=cache_file)[:12]


def embedding_hash(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """The 12-digit hash A1111 writes in "TI hashes": the whole file's SHA-256."""
    return sha256_file(path, cache_file=cache_file)[:12]
