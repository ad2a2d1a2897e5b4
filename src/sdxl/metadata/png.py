"""Our PNGs: write them with both text chunks; read any tool's PNG (or JPEG/WebP) back into one dictionary.

Each PNG we write carries two text chunks:
- `parameters`: the A1111 infotext (`infotext.py`), what A1111's PNG Info, Civitai and image browsers read.
- `sdxl`: a JSON record of the whole request, so `sdxl generate --from IMAGE` can rebuild it exactly.

`read_info` finds out which tool wrote an image from its chunks and hands them to that tool's reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..files import atomic_write
from .comfyui import is_comfy_graph, read_comfy_graph
from .fooocus import read_fooocus
from .infotext import read_a1111
from .invokeai import read_dream, read_invokeai, read_invokeai_legacy
from .values import loads

RECORD_CHUNK = "sdxl"  # the PNG text chunk holding our JSON record
PARAMETERS_CHUNK = "parameters"  # A1111's chunk


def write_png(image: Image.Image, path: str | os.PathLike, parameters: str, record: dict[str, Any]) -> Path:
    """Save `image` as a PNG with the A1111 `parameters` chunk and our JSON `sdxl` chunk, atomically.

    The file is written through `sdxl.files.atomic_write` (a temporary name, fsync, rename), so a reader
    never sees half a file, even if the process dies mid-write; if anything fails, an existing file at
    `path` is left untouched. The file gets ordinary permissions.
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
    atomic_write(path, lambda f: image.save(f, **save_args))
    return path


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




def info_from_chunks(chunks: dict[str, str]) -> dict[str, Any]:
    """`read_info` on text chunks already extracted (e.g. from an upload's PNG chunks)."""
    result: dict[str, Any] = {"source": "unknown", "parameters": {}, "raw": dict(chunks)}
    parameters = chunks.get(PARAMETERS_CHUNK)
    parameters_json = loads(parameters) if parameters and parameters.lstrip().startswith("{") else None
    comfy_graph = loads(chunks.get("prompt"))

    if RECORD_CHUNK in chunks:
        source, parse = "sdxl", lambda: _from_record(loads(chunks[RECORD_CHUNK]))
    elif "invokeai_metadata" in chunks:
        source, parse = "invokeai", lambda: read_invokeai(loads(chunks["invokeai_metadata"]))
    elif "sd-metadata" in chunks:
        source, parse = "invokeai", lambda: read_invokeai_legacy(loads(chunks["sd-metadata"]))
    elif "Dream" in chunks:
        source, parse = "invokeai", lambda: read_dream(chunks["Dream"])
    elif "fooocus_scheme" in chunks or isinstance(parameters_json, dict):
        source, parse = "fooocus", lambda: read_fooocus(parameters_json, parameters)
    elif is_comfy_graph(comfy_graph):
        source, parse = "comfyui", lambda: read_comfy_graph(comfy_graph)
    elif parameters:
        source, parse = "a1111", lambda: read_a1111(parameters)
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
                result["parameters"] = read_a1111(parameters)
            except Exception:
                pass
    return result



def _from_record(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError("the sdxl chunk is not a JSON object")
    request = record.get("request")
    params = dict(request) if isinstance(request, dict) else {}
    for key, value in record.items():
        if key != "request" and key not in params:
            params[key] = value
    return params

