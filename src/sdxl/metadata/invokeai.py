"""InvokeAI: `invokeai_metadata` (3.x-5.x JSON), the 2.x `sd-metadata` JSON and the "dream" command line.

Sampler names are kept in InvokeAI's spelling (the request's resolver accepts them), except the few that
differ from ours.
"""

from __future__ import annotations

import shlex
from typing import Any

from .values import number, put

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


def read_invokeai(data: Any) -> dict[str, Any]:
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
        put(out, key, (value if isinstance(value, str) else None) if kind is str else number(value, kind))
    # SDXL "style" prompts go to the bigG encoder, like our prompt_2; equal to the prompt means no style.
    for key, source, main in (
        ("prompt_2", "positive_style_prompt", "prompt"),
        ("negative_prompt_2", "negative_style_prompt", "negative_prompt"),
    ):
        style = data.get(source)
        if isinstance(style, str) and style and style != out.get(main):
            out[key] = style
    # InvokeAI's clip_skip counts layers skipped beyond the default one; ours (and A1111's) starts at 1.
    clip_skip = number(data.get("clip_skip"), int)
    if clip_skip is not None and clip_skip >= 0:
        out["clip_skip"] = clip_skip + 1
    if isinstance(data.get("scheduler"), str):
        out["sampler"], schedule = _invoke_sampler(data["scheduler"])
        put(out, "schedule", schedule)
    name, model_hash = _model_name(data.get("model"))
    put(out, "model", name)
    put(out, "model_hash", model_hash)
    refiner, _ = _model_name(data.get("refiner_model"))
    put(out, "refiner", refiner)
    vae, _ = _model_name(data.get("vae"))
    put(out, "vae", vae)
    loras = []
    for item in data.get("loras") or []:
        if isinstance(item, dict):
            lora_name, _ = _model_name(item.get("model") or item.get("lora"))
            weight = number(item.get("weight"), float)
            if lora_name and weight is not None:
                loras.append({"name": lora_name, "weight": weight})
    if loras:
        out["loras"] = loras
    put(
        out,
        "generation_mode",
        data.get("generation_mode") if isinstance(data.get("generation_mode"), str) else None,
    )
    return out


def _legacy_sampler(name: str) -> str:
    name = name[2:] if name.startswith("k_") else name
    return _INVOKE_SAMPLERS.get(name, name)


def read_invokeai_legacy(data: Any) -> dict[str, Any]:
    """InvokeAI 2.x `sd-metadata`: {"model_weights", "model_hash", "app_version", "image": {...}}."""
    if not isinstance(data, dict):
        raise ValueError("sd-metadata is not a JSON object")
    image = data.get("image") if isinstance(data.get("image"), dict) else {}
    out: dict[str, Any] = {}
    prompt = image.get("prompt")
    if isinstance(prompt, list):  # [{"prompt": .., "weight": ..}, ...]
        prompt = " ".join(str(p.get("prompt", "")) for p in prompt if isinstance(p, dict))
    put(out, "prompt", prompt if isinstance(prompt, str) else None)
    for key, source, kind in (
        ("steps", "steps", int),
        ("cfg", "cfg_scale", float),
        ("seed", "seed", int),
        ("width", "width", int),
        ("height", "height", int),
        ("denoising_strength", "strength", float),
    ):
        put(out, key, number(image.get(source), kind))
    if isinstance(image.get("sampler"), str):
        out["sampler"] = _legacy_sampler(image["sampler"])
    put(out, "model", data.get("model_weights") if isinstance(data.get("model_weights"), str) else None)
    put(out, "model_hash", data.get("model_hash") if isinstance(data.get("model_hash"), str) else None)
    put(out, "version", data.get("app_version") if isinstance(data.get("app_version"), str) else None)
    return out


def read_dream(text: str) -> dict[str, Any]:
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
            put(out, key, number(words[i + 1], kind))
            i += 2
        elif word == "-A" and i + 1 < len(words):
            out["sampler"] = _legacy_sampler(words[i + 1])
            i += 2
        elif word.startswith("-") and len(word) == 2:
            i += 2
        else:
            prompt.append(word)
            i += 1
    put(out, "prompt", " ".join(prompt))
    return out
