"""Control preprocessor names, their parameters' defaults and ranges, and the union models' control types,
without torch or numpy.

`request.py` checks names and thresholds with this module (importing the request loads no torch);
`control_maps.py` runs the preprocessors. Names are ours (`canny`, `scribble`, `tile`, `blur`, ...);
sd-webui-controlnet's module names (`scribble_xdog`, `tile_resample`, `blur_gaussian`, its UI label of
invert) are accepted as aliases and are what the A1111 API lists.
"""

from __future__ import annotations

from .errors import RequestError

# xinsir's control type ids (ControlNetPlus README; sd-webui-controlnet's ControlNetUnionControlType order):
# 0 openpose, 1 depth, 2 soft edges (hed/pidi/scribble/ted), 3 hard edges (canny/lineart/anime_lineart/mlsd),
# 4 normal map, 5 segmentation; ProMax (8 types) adds 6 tile and 7 repaint (inpaint / outpaint).
UNION_CONTROL_TYPES: dict[str, int] = {
    "openpose": 0,
    "depth": 1,
    "hed": 2, "pidi": 2, "scribble": 2, "ted": 2, "softedge": 2, "soft_edge": 2,
    "canny": 3, "lineart": 3, "anime_lineart": 3, "mlsd": 3, "hardedge": 3, "hard_edge": 3,
    "normal": 4, "normalmap": 4, "normal_map": 4,
    "segment": 5, "segmentation": 5, "seg": 5,
    "tile": 6, "blur": 6,
    "repaint": 7, "inpaint": 7, "outpaint": 7,
}
UNION_TYPE_NAMES = ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd",
                    "normal", "segment", "tile", "repaint")


def union_type_id(name: str) -> int | None:
    """A union control type name's id (any case, spaces and dashes as underscores; a number 0..7 as is), or
    None for a name no union model knows. Whether a model has that type is the model's to say (6 or 8)."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key.isdigit():
        return int(key) if int(key) < len(UNION_TYPE_NAMES) else None
    for part in key.split("/"):  # sd-webui-controlnet's labels: "Scribble/Sketch", "Tile/Blur"
        if part in UNION_CONTROL_TYPES:
            return UNION_CONTROL_TYPES[part]
    return None

# our name -> sd-webui-controlnet's module name
A1111_MODULES = {
    "none": "none",
    "canny": "canny",
    "threshold": "threshold",
    "scribble": "scribble_xdog",
    "invert": "invert",
    "tile": "tile_resample",
    "blur": "blur_gaussian",
}
PREPROCESSORS = tuple(A1111_MODULES)

_ALIASES = {
    **{v: k for k, v in A1111_MODULES.items()},
    "invert (from white bg & black line)": "invert",
    "scribble_xdog": "scribble",
    "tile": "tile",
    "blur": "blur",
}

# name -> ((label, default, min, max) for threshold_a, the same for threshold_b), as the extension's sliders
PARAMETERS: dict[str, tuple[tuple[str, float, float, float] | None, ...]] = {
    "none": (None, None),
    "canny": (("Low Threshold", 100, 1, 255), ("High Threshold", 200, 1, 255)),
    "threshold": (("Binarization Threshold", 127, 0, 255), None),
    "scribble": (("XDoG Threshold", 32, 1, 64), None),
    "invert": (None, None),
    "tile": (("Down Sampling Rate", 1.0, 1.0, 8.0), None),
    "blur": (("Sigma", 9.0, 0.01, 64.0), None),
}


def canonical_preprocessor(name: object) -> str | None:
    """Our name for a preprocessor given by our name or sd-webui-controlnet's (any case); None if unknown."""
    if not isinstance(name, str):
        return None
    key = name.strip()
    return _ALIASES.get(key) or _ALIASES.get(key.lower())


def check_preprocessor(name: object, where: str = "preprocessor") -> str:
    """The canonical name, or a one-line RequestError naming the field and the known preprocessors."""
    canon = canonical_preprocessor(name)
    if canon is None:
        raise RequestError(f"{where}: {name!r} is not a preprocessor (known: {', '.join(PREPROCESSORS)}; "
                           "other maps: give the map itself with preprocessor none)")
    return canon


def thresholds(name: str, a: float | None, b: float | None, where: str = "") -> tuple[float | None, ...]:
    """(threshold_a, threshold_b) with None (or A1111's -1) replaced by the default; a value outside the
    slider's range is a RequestError naming the field."""
    out = []
    for field, value, spec in (("threshold_a", a, PARAMETERS[name][0]), ("threshold_b", b,
                                                                         PARAMETERS[name][1])):
        if spec is None:
            out.append(None)
            continue
        label, default, lo, hi = spec
        if value is None or value == -1:
            value = default
        if not lo <= value <= hi:
            raise RequestError(f"{where}{field}: {value} is outside {lo}..{hi} ({name}'s {label.lower()})")
        out.append(float(value))
    return tuple(out)


# A1111 / sd-webui-controlnet names of the request's resize and control modes (in the extension's int order)
A1111_RESIZE_MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
A1111_CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                       "control": "ControlNet is more important"}


def pixel_perfect_resolution(raw_w: int, raw_h: int, resize_mode: str, width: int, height: int) -> int:
    """The extension's "pixel perfect" processing resolution: the short side the image has once scaled to
    width x height by the resize mode (fit inside for fill, cover otherwise), rounded."""
    k0, k1 = height / raw_h, width / raw_w
    k = min(k0, k1) if resize_mode == "fill" else max(k0, k1)
    return max(1, int(round(k * min(raw_h, raw_w))))
