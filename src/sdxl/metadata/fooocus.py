"""Fooocus: its `parameters` chunk holds either its own JSON (scheme "fooocus") or an A1111 infotext
("a1111"), and a `fooocus_scheme` chunk (or the EXIF MakerNote) says which."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .infotext import read_a1111
from .values import number, put

_FOOOCUS_STEPS = {"Speed": 30, "Quality": 60, "Extreme Speed": 8, "Lightning": 4, "Hyper-SD": 4}


def read_fooocus(data: Any, text: str | None) -> dict[str, Any]:
    """Fooocus writes `parameters` as its own JSON (scheme "fooocus") or as an A1111 infotext ("a1111")."""
    if not isinstance(data, dict):
        params = read_a1111(text or "")
        if "schedule" not in params and isinstance(params.get("Scheduler"), str):
            params["schedule"] = params.pop("Scheduler")
        return params
    out: dict[str, Any] = {}
    put(out, "prompt", data.get("prompt") if isinstance(data.get("prompt"), str) else None)
    put(
        out,
        "negative_prompt",
        data.get("negative_prompt") if isinstance(data.get("negative_prompt"), str) else None,
    )
    steps = number(data.get("steps"), int)
    put(out, "steps", steps if steps is not None else _FOOOCUS_STEPS.get(str(data.get("performance"))))
    size = re.fullmatch(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", str(data.get("resolution", "")).strip())
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    put(out, "cfg", number(data.get("guidance_scale"), float))
    put(out, "sampler", data.get("sampler") if isinstance(data.get("sampler"), str) else None)
    put(out, "schedule", data.get("scheduler") if isinstance(data.get("scheduler"), str) else None)
    put(out, "seed", number(data.get("seed"), int))
    base = data.get("base_model")
    if isinstance(base, str) and base:
        out["model"] = Path(base).stem if base.endswith((".safetensors", ".ckpt")) else base
    put(
        out,
        "model_hash",
        data.get("base_model_hash") if isinstance(data.get("base_model_hash"), str) else None,
    )
    refiner = data.get("refiner_model")
    if isinstance(refiner, str) and refiner not in ("", "None"):
        out["refiner"] = Path(refiner).stem if refiner.endswith((".safetensors", ".ckpt")) else refiner
        put(out, "refiner_switch", number(data.get("refiner_switch"), float))
    loras = []
    for item in data.get("loras") or []:  # [name, weight, hash] (2.3+)
        if isinstance(item, (list, tuple)) and len(item) >= 2 and number(item[1], float) is not None:
            loras.append({"name": str(item[0]), "weight": number(item[1], float)})
    for key in sorted(k for k in data if k.startswith("lora_combined_")):  # "name : weight" (older)
        name, sep, weight = str(data[key]).rpartition(" : ")
        if sep and number(weight, float) is not None and name not in ("", "None"):
            loras.append({"name": Path(name).stem, "weight": number(weight, float)})
    if loras:
        out["loras"] = loras
    for key in ("styles", "performance", "sharpness", "adm_guidance", "vae", "version"):
        put(out, key, data.get(key))
    return out
