"""ComfyUI: walk the `prompt` chunk (the API-format graph) from the sampler node back to its prompts,
checkpoint, LoRA loaders and latent size. Cycles and absurdly large graphs are cut off."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .values import number, put

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
        out[key] = number(inputs.get(name), int)
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
            weight = number(inputs.get("strength_model", 1.0), float)
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


def read_comfy_graph(graph: dict[str, Any]) -> dict[str, Any]:
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
        put(out, "prompt", positive["text"])
    elif positive:
        put(out, "prompt", positive["text_l"] if positive["text_l"] is not None else positive["text_g"])
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
            put(out, key, positive[key])
    if "text" in negative:
        put(out, "negative_prompt", negative["text"])
    elif negative:
        put(
            out,
            "negative_prompt",
            negative["text_l"] if negative["text_l"] is not None else negative["text_g"],
        )
        if negative["text_g"] is not None and negative["text_g"] != out.get("negative_prompt"):
            out["negative_prompt_2"] = negative["text_g"]

    put(out, "seed", number(inputs.get("seed", inputs.get("noise_seed")), int))
    put(out, "steps", number(inputs.get("steps"), int))
    put(out, "cfg", number(inputs.get("cfg"), float))
    put(out, "sampler", inputs.get("sampler_name") if isinstance(inputs.get("sampler_name"), str) else None)
    put(out, "schedule", inputs.get("scheduler") if isinstance(inputs.get("scheduler"), str) else None)
    denoise = number(inputs.get("denoise"), float)
    if denoise is not None and denoise < 1.0:
        out["denoising_strength"] = denoise

    checkpoint, loras = _comfy_model(nodes, inputs.get("model"))
    if checkpoint:
        out["model"], out["model_file"] = Path(checkpoint).stem, checkpoint
    if loras:
        out["loras"] = loras
    origin = origins[first]
    if origin is not None and origin[1]["class_type"] not in _SAMPLER_NODES:
        put(out, "width", number(origin[1]["inputs"].get("width"), int))
        put(out, "height", number(origin[1]["inputs"].get("height"), int))

    second = next((k for k in samplers if origins[k] is not None and origins[k][0] == first), None)
    if second is not None:
        refiner, _ = _comfy_model(nodes, nodes[second]["inputs"].get("model"))
        if refiner and refiner != checkpoint:
            out["refiner"] = Path(refiner).stem
            end, steps = number(inputs.get("end_at_step"), int), out.get("steps")
            if end is not None and steps and 0 < end < steps:
                out["refiner_switch"] = end / steps
    return out


def is_comfy_graph(value: Any) -> bool:
    """Whether a parsed `prompt` chunk looks like a ComfyUI API graph ({id: {"class_type", ...}})."""
    return isinstance(value, dict) and any(isinstance(v, dict) and "class_type" in v for v in value.values())

