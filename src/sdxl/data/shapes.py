"""The procedural "shapes" dataset: small scenes of coloured shapes with exact captions.

It exists to train and evaluate a small SDXL from scratch on a CPU-sized budget with something that can
be checked automatically: every image comes from a scene graph (objects with shape, colour, size,
position; relations between them; a background), the caption is written from the graph, and
`sdxl.data.evaluate` reads shapes, colours and relations back out of a generated image.

The data also exercises SDXL's micro-conditioning:
  - images come in many aspect ratios (the scaled bucket table at base 256), so target-size
    conditioning and bucketing matter;
  - a fraction is rendered small (shorter side 64-128 px) and upscaled to the stored size, which makes
    them soft; their TRUE original size is written to `metadata.jsonl` (a PNG cannot say it was
    upscaled), and `ImageCaptionDataset` records it as the size conditioning;
  - a fraction is "cropped": the view is zoomed in so objects are cut by the image border.

A scene is a plain JSON-able dict:
    {"aspect": h / w it was laid out for,
     "background": {"color": name, "texture": "plain"|"stripes"|"checker"|"noise"|"gradient",
                    "period": stripe/checker period (fraction of the shorter side), "angle": degrees,
                    "noise_seed": int},
     "objects": [{"shape", "color", "size": "small"|"large", "x", "y" (centre, fractions of width /
                  height), "r" (radius, fraction of the shorter side), "rotation" (degrees)}, ...],
     "relations": [[i, "left of"|"right of"|"above"|"below", j], ...]   # object i is <rel> object j
     "cropped": bool}
Relations are true in pixel space at the scene's aspect ratio with a margin (the centre offset along
the named axis is at least 1.5 times the offset along the other axis), so a detector can check them.
Objects in one scene have different colours, none equal to the background colour.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sdxl.data.buckets import scaled_buckets

# Named colours, chosen far apart in RGB so the nearest-colour rule of the detector is reliable.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (245, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "diamond")
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.08, 0.11),
    "large": (0.16, 0.21),
}  # radius / shorter side
TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "noise")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# (colour, shape) pairs never generated for training when hold_out=True: the "novel" evaluation prompts
# test whether a model composes a colour and a shape it has only seen separately.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("green", "star"),
    ("purple", "triangle"),
    ("orange", "ring"),
    ("blue", "cross"),
)
NOISE_SIGMA = 8.0  # std of the "noise" background texture, in 8-bit levels
RELATION_MARGIN = 1.5  # stated axis offset >= this x the other axis offset


def _shade(name: str) -> tuple[int, int, int]:
    """Second colour of a textured background: the colour moved 22% towards white or black.

    Of the two, the one that changes the colour more (so the texture is visible) is used, unless it
    would then be nearer to another palette colour (the detector must still read it as `name`).
    """
    base = np.array(PALETTE[name], dtype=np.float64)
    best: np.ndarray | None = None
    for target in (255.0, 0.0):
        cand = base + 0.22 * (target - base)
        nearest = min(PALETTE, key=lambda n: float(np.linalg.norm(cand - np.array(PALETTE[n]))))
        if nearest != name:
            continue
        if best is None or np.linalg.norm(cand - base) > np.linalg.norm(best - base):
            best = cand
    assert best is not None, f"no usable shade for {name}"
    return tuple(int(round(v)) for v in best)  # type: ignore[return-value]


SHADES: dict[str, tuple[int, int, int]] = {name: _shade(name) for name in PALETTE}


# ---------------------------------------------------------------------------------------------- geometry
def _star(cx: float, cy: float, r_out: float, r_in: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r_out if k % 2 == 0 else r_in
        a = math.radians(rot) - math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _regular(
    cx: float, cy: float, radius: float, n: int, rot: float, start: float
) -> list[tuple[float, float]]:
    """n-gon with circumradius `radius`, first vertex at angle `start` (degrees, 0 = +x, y down)."""
    return [
        (
            cx + radius * math.cos(math.radians(start + rot + 360.0 * k / n)),
            cy + radius * math.sin(math.radians(start + rot + 360.0 * k / n)),
        )
        for k in range(n)
    ]


def _cross(cx: float, cy: float, arm: float, half_w: float, rot: float) -> list[tuple[float, float]]:
    a, b = arm, half_w
    pts = [
        (b, -a),
        (b, -b),
        (a, -b),
        (a, b),
        (b, b),
        (b, a),
        (-b, a),
        (-b, b),
        (-a, b),
        (-a, -b),
        (-b, -b),
        (-b, -a),
    ]
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _outlines(obj: dict[str, Any], cx: float, cy: float, R: float) -> list[tuple[str, Any, int]]:
    """One object's silhouette as drawing parts, in order: ("circle", radius, fill) or ("polygon", points,
    fill); fill 255 adds to the silhouette, 0 cuts a hole (the ring's). R is the radius in pixels."""
    shape, rot = obj["shape"], float(obj.get("rotation", 0.0))
    if shape == "circle":
        return [("circle", R, 255)]
    if shape == "ring":
        return [("circle", R, 255), ("circle", 0.55 * R, 0)]
    if shape == "square":  # half-side 0.82 R, corners at 45 degrees
        return [("polygon", _regular(cx, cy, 0.82 * R * math.sqrt(2), 4, rot, 45.0), 255)]
    if shape == "diamond":  # a square standing on a corner, half-diagonal 1.1 R
        return [("polygon", _regular(cx, cy, 1.1 * R, 4, rot, 0.0), 255)]
    if shape == "triangle":  # equilateral, pointing up, circumradius 1.15 R (centroid at the centre)
        return [("polygon", _regular(cx, cy, 1.15 * R, 3, rot, -90.0), 255)]
    if shape == "star":
        return [("polygon", _star(cx, cy, 1.15 * R, 0.45 * 1.15 * R, rot), 255)]
    if shape == "cross":
        return [("polygon", _cross(cx, cy, R, 0.36 * R, rot), 255)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, Any], cx: float, cy: float, R: float) -> None:
    """Draw one object's silhouette (fill 255) on a mask. R is the radius in pixels."""
    for kind, geom, fill in _outlines(obj, cx, cy, R):
        if kind == "circle":
            draw.ellipse((cx - geom, cy - geom, cx + geom, cy + geom), fill=fill)
        else:
            draw.polygon(geom, fill=fill)


def _draw_outline(draw: ImageDraw.ImageDraw, obj: dict[str, Any], cx: float, cy: float, R: float,
                  width: float) -> None:
    """Draw a band `width` pixels wide centred on every edge of one object's silhouette (fill 255)."""
    wd = max(1, int(round(width)))
    for kind, geom, _ in _outlines(obj, cx, cy, R):
        if kind == "circle":
            r = geom + wd / 2
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=wd)
        else:
            draw.line(list(geom) + [geom[0], geom[1]], fill=255, width=wd, joint="curve")


def _background(bg: dict[str, Any], H: int, W: int, short: int) -> np.ndarray:
    """Background as uint8 [H, W, 3] at the (supersampled) drawing resolution."""
    base = np.array(PALETTE[bg["color"]], dtype=np.uint8)
    shade = np.array(SHADES[bg["color"]], dtype=np.uint8)
    out = np.empty((H, W, 3), dtype=np.uint8)
    out[:] = base
    texture = bg.get("texture", "plain")
    if texture in ("stripes", "checker"):
        period = max(2.0, float(bg.get("period", 0.1)) * short)
        yy, xx = np.arange(H, dtype=np.float64)[:, None], np.arange(W, dtype=np.float64)[None, :]
        if texture == "stripes":
            a = math.radians(float(bg.get("angle", 0.0)))
            t = (xx * math.cos(a) + yy * math.sin(a)) / period
            odd = (np.floor(t).astype(np.int64) % 2) == 1
        else:
            odd = ((np.floor(xx / period) + np.floor(yy / period)).astype(np.int64) % 2) == 1
        out[odd] = shade
    elif texture == "gradient":  # a linear ramp from the colour (t = 0) to its shade (t = 1) along `angle`
        a = math.radians(float(bg.get("angle", 0.0)))
        yy, xx = np.arange(H, dtype=np.float64)[:, None], np.arange(W, dtype=np.float64)[None, :]
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-9)
        ramp = base[None, None, :] * (1.0 - t[..., None]) + shade[None, None, :] * t[..., None]
        out[:] = np.round(ramp).astype(np.uint8)
    return out


def render_scene(scene: dict[str, Any], h: int, w: int, supersample: int = 4) -> Image.Image:
    """Draw a scene at h x w pixels.

    Anti-aliasing: everything is drawn at `supersample` times the size and reduced with a box filter
    (each output pixel is the mean of its supersample x supersample block). The "noise" texture is added
    after the reduction, per output pixel, from the scene's `noise_seed`.
    """
    S = int(supersample)
    H, W = h * S, w * S
    short = min(H, W)
    canvas = Image.fromarray(_background(scene["background"], H, W, short), mode="RGB")
    for obj in scene["objects"]:
        mask = Image.new("L", (W, H), 0)
        _draw_object(ImageDraw.Draw(mask), obj, obj["x"] * W, obj["y"] * H, obj["r"] * short)
        canvas.paste(PALETTE[obj["color"]], (0, 0, W, H), mask)
    img = canvas.resize((w, h), Image.Resampling.BOX) if S > 1 else canvas
    bg = scene["background"]
    if bg.get("texture") == "noise":
        rng = np.random.default_rng(int(bg.get("noise_seed", 0)))
        arr = np.asarray(img, dtype=np.float64) + rng.normal(0.0, NOISE_SIGMA, size=(h, w, 1))
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="RGB")
    return img


MASK_STYLES = ("disc", "outline")
OUTLINE_BODY = 96  # "outline" masks: the grey level of the disc around an object, under its outline band
OUTLINE_WIDTH = 0.5  # "outline" masks: the band's width, as a fraction of the object's radius


def render_mask(
    scene: dict[str, Any], h: int, w: int, supersample: int = 4, margin: float = 1.25, style: str = "disc"
) -> Image.Image:
    """Where the objects are, as a greyscale h x w image: the training loss mask of `generate_shapes_dataset`
    (see `loss.masked`).

    style "disc": a disc of `margin` times each object's radius around its centre, at 255, so a mask also
    covers the outline's both sides and a ring's hole. style "outline": the same disc at OUTLINE_BODY, with
    a band of OUTLINE_WIDTH times the radius centred on the object's edges at 255: the pixels in which one
    shape differs from another weigh most, the object's flat inside less, the background least."""
    if style not in MASK_STYLES:
        raise ValueError(f"mask style must be one of {MASK_STYLES}, got {style!r}")
    S = int(supersample)
    H, W = h * S, w * S
    short = min(H, W)
    mask = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(mask)
    disc = 255 if style == "disc" else OUTLINE_BODY
    for obj in scene["objects"]:
        cx, cy, R = obj["x"] * W, obj["y"] * H, margin * obj["r"] * short
        draw.ellipse((cx - R, cy - R, cx + R, cy + R), fill=disc)
    if style == "outline":
        for obj in scene["objects"]:
            r = obj["r"] * short
            _draw_outline(draw, obj, obj["x"] * W, obj["y"] * H, r, OUTLINE_WIDTH * r)
    return mask.resize((w, h), Image.Resampling.BOX) if S > 1 else mask


# ---------------------------------------------------------------------------------------------- scenes
def relation_between(a: dict[str, Any], b: dict[str, Any], aspect: float) -> str:
    """Where object a is relative to object b, by the larger centre offset in pixel units."""
    W_u, H_u = _frame(aspect)
    dx = (a["x"] - b["x"]) * W_u
    dy = (a["y"] - b["y"]) * H_u
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _frame(aspect: float) -> tuple[float, float]:
    """(width, height) of the image in units of its shorter side."""
    return (1.0, aspect) if aspect >= 1.0 else (1.0 / aspect, 1.0)


def _clear(a: dict[str, Any], b: dict[str, Any], rel: str, aspect: float) -> bool:
    W_u, H_u = _frame(aspect)
    dx = (a["x"] - b["x"]) * W_u
    dy = (a["y"] - b["y"]) * H_u
    major, minor = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
    return relation_between(a, b, aspect) == rel and abs(major) >= RELATION_MARGIN * abs(minor)


def _apart(a: dict[str, Any], b: dict[str, Any], aspect: float) -> bool:
    """Objects do not overlap (1.2 x radius covers the pointy shapes) with a small gap."""
    W_u, H_u = _frame(aspect)
    d = math.hypot((a["x"] - b["x"]) * W_u, (a["y"] - b["y"]) * H_u)
    return d >= 1.2 * (a["r"] + b["r"]) + 0.04


def _pick_combo(rng: np.random.Generator, used_colors: set[str], bg: str, hold_out: bool) -> tuple[str, str]:
    while True:
        color = COLORS[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if color == bg or color in used_colors:
            continue
        if hold_out and (color, shape) in HELD_OUT:
            continue
        return color, shape


def _background_and_kinds(rng: np.random.Generator, combos: list[tuple[str, str]] | None, n: int,
                          hold_out: bool, texture: Callable[[], str]
                          ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A scene's background (a colour none of the forced objects has, the texture `texture()` draws, stripe
    period and angle, noise seed) and its objects' (colour, shape) pairs, drawn from `rng` in this order."""
    forced = {c for c, _ in combos} if combos else set()
    bg_choices = [c for c in COLORS if c not in forced]
    bg_color = bg_choices[int(rng.integers(len(bg_choices)))]
    background = {
        "color": bg_color,
        "texture": texture(),
        "period": round(float(rng.uniform(0.06, 0.16)), 4),
        "angle": float(rng.choice([0.0, 45.0, 90.0, 135.0])),
        "noise_seed": int(rng.integers(2**31)),
    }
    used: set[str] = set()
    kinds: list[tuple[str, str]] = []
    for k in range(n):
        color, shape = combos[k] if combos else _pick_combo(rng, used, bg_color, hold_out)
        used.add(color)
        kinds.append((color, shape))
    return background, kinds


def random_scene(
    rng: np.random.Generator,
    aspect: float = 1.0,
    n_objects: int | None = None,
    hold_out: bool = True,
    cropped: bool = False,
    texture: str | None = None,
    combos: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """A random scene laid out for an image of aspect ratio h / w = `aspect`.

    n_objects: 1-3 (default: uniform). hold_out: never use the HELD_OUT colour-shape pairs.
    cropped: zoom in so that objects are cut by the border (every object centre stays inside).
    texture: force a background texture. combos: force the (colour, shape) of the objects, in order
    (used by the evaluation prompts).
    """
    if n_objects is None:
        n_objects = int(rng.integers(1, 4))
    if combos is not None:
        n_objects = len(combos)
    if not 1 <= n_objects <= 3:
        raise ValueError("scenes have 1 to 3 objects")
    background, kinds = _background_and_kinds(
        rng, combos, n_objects, hold_out,
        lambda: texture if texture is not None else TEXTURES[int(rng.integers(len(TEXTURES)))])
    W_u, H_u = _frame(aspect)
    objects: list[dict[str, Any]] = []
    relations: list[list[Any]] = []
    ok = False
    # Rejection sampling. Some relation sets are hard to place in a narrow frame (two objects both
    # "left of" a third in a tall image), so the relations are redrawn every 100 tries, and after half
    # of the rounds all objects are made small, which always fits.
    for attempt in range(4000):
        if attempt % 100 == 0:
            wanted = [str(rng.choice(RELATIONS)) for _ in range(n_objects - 1)]
            relations = [[0, wanted[0], 1]] if n_objects >= 2 else []
            if n_objects == 3:
                relations.append([2, wanted[1], 1])
        objects = []
        for color, shape in kinds:
            size = "small" if attempt >= 2000 or rng.random() < 0.5 else "large"
            r = float(rng.uniform(*SIZES[size]))
            m = 1.2 * r + 0.02  # keep the whole silhouette inside the frame
            x = float(rng.uniform(m, W_u - m)) / W_u if W_u > 2 * m else 0.5
            y = float(rng.uniform(m, H_u - m)) / H_u if H_u > 2 * m else 0.5
            rot = float(rng.uniform(-12.0, 12.0)) if shape not in ("circle", "ring") else 0.0
            objects.append(
                {
                    "shape": shape,
                    "color": color,
                    "size": size,
                    "x": x,
                    "y": y,
                    "r": r,
                    "rotation": round(rot, 2),
                }
            )
        ok = all(_apart(objects[i], objects[j], aspect) for i in range(n_objects) for j in range(i))
        ok = ok and all(_clear(objects[i], objects[j], rel, aspect) for i, rel, j in relations)
        if ok:
            break
    if not ok:
        raise RuntimeError(f"could not lay out {n_objects} objects at aspect {aspect}")
    scene = {
        "aspect": float(aspect),
        "background": background,
        "objects": objects,
        "relations": relations,
        "cropped": False,
    }
    if cropped:
        scene = _zoom_crop(scene, rng)
    for obj in scene["objects"]:
        obj["x"], obj["y"], obj["r"] = round(obj["x"], 5), round(obj["y"], 5), round(obj["r"], 5)
    return scene


def _zoom_crop(scene: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Zoom into the scene by 1.3-1.7x at a random place so that at least one object is cut by the border
    while every object centre stays inside (a similarity transform: relations are unchanged)."""
    aspect = scene["aspect"]
    W_u, H_u = _frame(aspect)
    for _ in range(200):
        z = float(rng.uniform(1.3, 1.7))
        fw, fh = W_u / z, H_u / z  # the new view, in old units
        ox = float(rng.uniform(0.0, W_u - fw))
        oy = float(rng.uniform(0.0, H_u - fh))
        new = []
        cut = False
        inside = True
        for obj in scene["objects"]:
            x = (obj["x"] * W_u - ox) / fw
            y = (obj["y"] * H_u - oy) / fh
            r = obj["r"] * z
            # centre comfortably inside, in units of the new shorter side
            mx, my = 0.3 * r * min(fw, fh) / fw, 0.3 * r * min(fw, fh) / fh
            if not (mx <= x <= 1 - mx and my <= y <= 1 - my):
                inside = False
                break
            ext_x, ext_y = 1.2 * r * min(fw, fh) / fw, 1.2 * r * min(fw, fh) / fh
            if x - ext_x < 0 or x + ext_x > 1 or y - ext_y < 0 or y + ext_y > 1:
                cut = True
            new.append({**obj, "x": x, "y": y, "r": r})
        if inside and cut:
            return {**scene, "objects": new, "cropped": True}
    return scene


def _object_phrase(obj: dict[str, Any]) -> str:
    return f"a {obj['size']} {obj['color']} {obj['shape']}"


def _background_phrase(bg: dict[str, Any]) -> str:
    adjective = {"plain": "", "stripes": "striped ", "checker": "checkered ", "noise": "noisy ",
                 "gradient": "gradient "}[
        bg["texture"]
    ]
    return f"a {adjective}{bg['color']} background"


def caption(scene: dict[str, Any]) -> str:
    """The caption of a scene, e.g. "a large red circle above a small blue square on a striped green
    background". A third object is attached with its relation to the second one:
    "..., and a small yellow star left of the blue square, on a plain ...".
    """
    objs = scene["objects"]
    rels = {(i, j): rel for i, rel, j in scene.get("relations", [])}
    if len(objs) >= 2 and not rels:  # a curriculum scene without stated relations: "a X, a Y and a Z on ..."
        phrases = [_object_phrase(o) for o in objs]
        text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"{text} on {_background_phrase(scene['background'])}"
    text = _object_phrase(objs[0])
    if len(objs) >= 2:
        text += f" {rels[(0, 1)]} {_object_phrase(objs[1])}"
    if len(objs) == 3:
        text += f", and {_object_phrase(objs[2])} {rels[(2, 1)]} the {objs[1]['color']} {objs[1]['shape']},"
    return f"{text} on {_background_phrase(scene['background'])}"


# ---------------------------------------------------------------------------------------------- curriculum
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "stripes", "checker", "noise")
LATENT_FACTOR = 8  # the VAE's downscale factor: an object's size in latent pixels is its size in pixels / 8


@dataclass
class Curriculum:
    """What the data of one training stage holds: `sdxl data shapes --level NAME` and the options that
    override a level's fields (see LEVELS and docs/CURRICULUM.md).

    objects: share of scenes per object count (1 to 3), e.g. {1: 0.5, 2: 0.5}.
    sizes: per size word of the caption ("small", "large"), the range of an object's diameter 2 r (a circle's
        diameter; the other shapes are drawn within about 1.2 r of the centre) in latent pixels (f = 8) when
        the image's shorter side is `at_res` pixels. Each object picks a word uniformly. None: the fixed
        SIZES table (fractions of the shorter side, the "full" level's).
    at_res: the shorter side, in pixels, at which `sizes` holds (0, every level's choice: `base`). With
        `at_res` = the training resolution the latent sizes are what the diffusion model sees.
    backgrounds: share of scenes per background kind (BACKGROUND_KINDS).
    soft_upscales: share of images rendered with the shorter side at a quarter to half of `base` and
        upscaled (bicubic, hence soft) to their size; their true size goes to the metadata.
    crops: share of scenes zoomed in so that objects are cut by the border.
    relations: share of the 2- and 3-object scenes whose caption states where the objects are ("a X above
        a Y"); the others read "a X and a Y" and need no relation margin.
    square: every image is base x base; else each image draws a size from the aspect buckets of `base`.
    base: the image side (square) or the bucket table's base resolution.
    legacy: drawn exactly as `generate_shapes_dataset` drew before levels existed (the "full" level: the
        shipped model's data); any override makes a level non-legacy.
    """

    name: str = "custom"
    objects: dict = field(default_factory=lambda: {1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    sizes: dict | None = None
    at_res: int = 0
    backgrounds: dict = field(
        default_factory=lambda: {"plain": 0.25, "stripes": 0.25, "checker": 0.25, "noise": 0.25}
    )
    soft_upscales: float = 0.3
    crops: float = 0.15
    relations: float = 1.0
    square: bool = False
    base: int = 256
    legacy: bool = False

    def check(self) -> Curriculum:
        """Raise ValueError naming the field at fault; return self."""
        if not self.objects or any(k not in (1, 2, 3) for k in self.objects):
            raise ValueError(f"objects: counts must be 1, 2 or 3, got {sorted(self.objects)}")
        for name, shares in (("objects", self.objects), ("backgrounds", self.backgrounds)):
            if any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
                raise ValueError(f"{name}: shares must be >= 0 and not all 0, got {shares}")
        if bad := [k for k in self.backgrounds if k not in BACKGROUND_KINDS]:
            raise ValueError(f"backgrounds: unknown kind {bad[0]!r} (known: {', '.join(BACKGROUND_KINDS)})")
        if self.sizes is not None:
            for word, (lo, hi) in self.sizes.items():
                if word not in SIZES:
                    raise ValueError(f"sizes: the word must be small or large, got {word!r}")
                if not 0 < lo <= hi:
                    raise ValueError(f"sizes: need 0 < MIN <= MAX latent px, got {lo}:{hi} for {word}")
                if self.radius_range(word)[1] > 0.45:
                    raise ValueError(f"sizes: {word} {lo}:{hi} latent px does not fit a "
                                     f"{self.reference_side} px image (at most 0.9 of its shorter side)")
        smallest = self.radius_range(self.size_words()[0])[0]
        for count, limit in ((2, 0.19), (3, 0.15)):  # the layout rules' room: r <= 0.19 for two side by side
            if self.objects.get(count, 0) > 0 and smallest > limit:
                px = 2 * smallest * self.reference_side / LATENT_FACTOR
                raise ValueError(f"objects: {count} objects of the smallest size ({px:.1f} latent px) do "
                                 f"not fit side by side in a {self.reference_side} px frame")
        for name in ("soft_upscales", "crops", "relations"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: a share in [0, 1], got {getattr(self, name)}")
        if self.base < 32 or self.base % 8:
            raise ValueError(f"base: a multiple of 8, at least 32, got {self.base}")
        return self

    @property
    def reference_side(self) -> int:
        return self.at_res or self.base

    def radius_range(self, word: str) -> tuple[float, float]:
        """The radius range of a size word as a fraction of the shorter side."""
        if self.sizes is None:
            return SIZES[word]
        lo, hi = self.sizes[word]
        k = LATENT_FACTOR / (2.0 * self.reference_side)
        return (lo * k, hi * k)

    def size_words(self) -> list[str]:
        """The size words in use, smallest first."""
        words = list(SIZES) if self.sizes is None else list(self.sizes)
        return sorted(words, key=lambda w: self.radius_range(w)[0])

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objects"] = {str(k): v for k, v in self.objects.items()}
        if self.sizes is None:
            d["sizes"] = {w: [round(2 * r * self.reference_side / LATENT_FACTOR, 2) for r in SIZES[w]]
                          for w in SIZES}
        d["at_res"] = self.reference_side
        return d


LEVELS: dict[str, Curriculum] = {
    # stage 1: the easy-shapes experiment's data (one large object, plain background, 128 px square)
    "easy": Curriculum("easy", objects={1: 1.0}, sizes={"large": (8.6, 11.5)},
                       backgrounds={"plain": 1.0}, soft_upscales=0.0, crops=0.0, square=True, base=128),
    # stage 2: 128 px, one and two objects at their 256 px latent sizes, every background kind
    "mid": Curriculum("mid", objects={1: 0.5, 2: 0.5}, sizes={"small": (4.5, 6.5), "large": (9.0, 11.5)},
                      backgrounds={"plain": 0.4, "gradient": 0.2, "stripes": 0.15, "checker": 0.1,
                                               "noise": 0.15},
                      soft_upscales=0.1, crops=0.1, square=True, base=128),
    # stage 3: 256 px multi-aspect buckets, 1-3 objects, size / crop conditioning data
    "multi": Curriculum("multi", objects={1: 0.4, 2: 0.45, 3: 0.15},
                        sizes={"small": (5.0, 7.0), "large": (10.0, 13.4)},
                        backgrounds={"plain": 0.3, "gradient": 0.15, "stripes": 0.2, "checker": 0.15,
                                     "noise": 0.2},
                        soft_upscales=0.15, crops=0.15, base=256),
    # the VAE's data: more and smaller objects and every texture
    "vae": Curriculum("vae", objects={1: 0.3, 2: 0.4, 3: 0.3},
                      sizes={"small": (3.0, 6.0), "large": (8.0, 13.4)},
                      backgrounds={k: 0.2 for k in BACKGROUND_KINDS},
                      soft_upscales=0.2, crops=0.15, base=256),
    # the shipped model's data, drawn exactly as before levels existed
    "full": Curriculum("full", legacy=True),
}


def parse_counts(text: str) -> dict[int, float]:
    """`--objects`: "2", "1-3" (uniform), "1,2" or "1=0.3,2=0.7" -> {count: share}."""
    text = text.strip()
    try:
        if "=" in text:
            return {int(k): float(v) for k, v in (part.split("=") for part in text.split(","))}
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            counts = list(range(lo, hi + 1))
        else:
            counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"objects: expected N, MIN-MAX, N,M or N=SHARE,..., got {text!r}") from None
    if not counts:
        raise ValueError(f"objects: no counts in {text!r}")
    return {c: 1.0 / len(counts) for c in counts}


def parse_shares(text: str) -> dict[str, float]:
    """`--backgrounds`: "plain=0.5,gradient=0.2,stripes=0.3"; "textured=X" splits X over checker and noise."""
    out: dict[str, float] = {}
    try:
        for part in text.split(","):
            k, v = part.split("=")
            k, share = k.strip(), float(v)
            if k == "textured":
                for kk in ("checker", "noise"):
                    out[kk] = out.get(kk, 0.0) + share / 2
            else:
                out[k] = out.get(k, 0.0) + share
    except ValueError:
        raise ValueError(f"backgrounds: expected KIND=SHARE,..., got {text!r}") from None
    return out


def parse_sizes(text: str) -> dict[str, tuple[float, float]]:
    """`--object-latent-px`: "MIN:MAX" (every object "large") or "small=MIN:MAX,large=MIN:MAX"."""
    out = {}
    try:
        for part in text.split(","):
            word, _, rng_text = part.rpartition("=")
            lo, hi = (float(x) for x in rng_text.split(":"))
            out[word.strip() or "large"] = (lo, hi)
    except ValueError:
        raise ValueError(
            f"object-latent-px: expected MIN:MAX or small=MIN:MAX,large=MIN:MAX, got {text!r}"
        ) from None
    return out


def make_level(name: str, **overrides: Any) -> Curriculum:
    """A named level with some fields replaced (None values are ignored); checked."""
    if name not in LEVELS:
        raise ValueError(f"level: unknown {name!r} (known: {', '.join(LEVELS)})")
    level = LEVELS[name]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        level = dataclasses.replace(level, **changes, name=f"{name}+custom", legacy=False)
    return level.check()


def _draw(rng: np.random.Generator, shares: dict) -> Any:
    keys = list(shares)
    p = np.array([float(shares[k]) for k in keys])
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def curriculum_scene(
    rng: np.random.Generator,
    level: Curriculum,
    aspect: float = 1.0,
    hold_out: bool = True,
    n_objects: int | None = None,
    state_relations: bool | None = None,
    combos: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """A random uncropped scene drawn from a level, laid out for aspect ratio h / w = `aspect`.

    n_objects / state_relations / combos force the object count, whether relations are stated, and the
    objects' (colour, shape) (the evaluation prompts use them). The layout rules are `random_scene`'s
    (objects apart, relations true with a margin, silhouettes inside the frame); where the drawn sizes
    cannot be laid out (two large objects side by side in a small frame) the objects take the smallest
    size word after 300 tries.
    """
    n = len(combos) if combos else (n_objects or int(_draw(rng, level.objects)))
    stated = n >= 2 and (bool(rng.random() < level.relations) if state_relations is None else state_relations)
    background, kinds = _background_and_kinds(rng, combos, n, hold_out,
                                              lambda: str(_draw(rng, level.backgrounds)))
    words = level.size_words()
    W_u, H_u = _frame(aspect)
    objects: list[dict[str, Any]] = []
    relations: list[list[Any]] = []
    ok = False
    for attempt in range(2000):
        if attempt % 100 == 0 and stated:
            wanted = [str(rng.choice(RELATIONS)) for _ in range(n - 1)]
            relations = [[0, wanted[0], 1]] + ([[2, wanted[1], 1]] if n == 3 else [])
        objects = []
        for color, shape in kinds:
            word = words[0] if attempt >= 300 else words[int(rng.integers(len(words)))]
            r = float(rng.uniform(*level.radius_range(word)))
            m = 1.2 * r + 0.02
            x = float(rng.uniform(m, W_u - m)) / W_u if W_u > 2 * m else 0.5
            y = float(rng.uniform(m, H_u - m)) / H_u if H_u > 2 * m else 0.5
            rot = float(rng.uniform(-12.0, 12.0)) if shape not in ("circle", "ring") else 0.0
            objects.append({"shape": shape, "color": color, "size": word, "x": x, "y": y, "r": r,
                            "rotation": round(rot, 2)})
        ok = all(_apart(objects[i], objects[j], aspect) for i in range(n) for j in range(i))
        ok = ok and all(_clear(objects[i], objects[j], rel, aspect) for i, rel, j in relations)
        if ok:
            break
    if not ok:
        raise RuntimeError(f"level {level.name}: could not lay out {n} objects at aspect {aspect}")
    return {"aspect": float(aspect), "background": background, "objects": objects,
            "relations": relations if stated else [], "cropped": False}


def _round_scene(scene: dict[str, Any]) -> dict[str, Any]:
    for obj in scene["objects"]:
        obj["x"], obj["y"], obj["r"] = round(obj["x"], 5), round(obj["y"], 5), round(obj["r"], 5)
    return scene


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = np.asarray(values)
    return {"n": len(values), "min": round(float(v.min()), 2), "p05": round(float(np.percentile(v, 5)), 2),
            "median": round(float(np.median(v)), 2), "p95": round(float(np.percentile(v, 95)), 2),
            "max": round(float(v.max()), 2)}


def dataset_summary(rows: list[dict[str, Any]], level: Curriculum) -> dict[str, Any]:
    """What a dataset holds, measured from its metadata rows: shares of object counts, background kinds,
    soft upscales, crops and stated relations; object diameters (2 r) in latent pixels per size word, at
    the stored image size and at the level's reference side; distinct captions."""
    n = max(len(rows), 1)
    counts: dict[str, int] = {}
    kinds: dict[str, int] = {}
    stored: dict[str, list[float]] = {}
    at_ref: dict[str, list[float]] = {}
    multi = stated = 0
    for row in rows:
        sc = row["scene"]
        counts[str(len(sc["objects"]))] = counts.get(str(len(sc["objects"])), 0) + 1
        tex = sc["background"]["texture"]
        kinds[tex] = kinds.get(tex, 0) + 1
        if len(sc["objects"]) >= 2:
            multi += 1
            stated += bool(sc["relations"])
        short = min(row["size"])
        for obj in sc["objects"]:
            stored.setdefault(obj["size"], []).append(2 * obj["r"] * short / LATENT_FACTOR)
            at_ref.setdefault(obj["size"], []).append(2 * obj["r"] * level.reference_side / LATENT_FACTOR)
    return {
        "level": level.name,
        "spec": level.as_dict(),
        "shares": {
            "objects": {k: round(v / n, 4) for k, v in sorted(counts.items())},
            "backgrounds": {k: round(v / n, 4) for k, v in sorted(kinds.items())},
            "soft_upscales": round(sum(bool(r["small"]) for r in rows) / n, 4),
            "crops": round(sum(bool(r["scene"]["cropped"]) for r in rows) / n, 4),
            "relations_stated_of_multi": round(stated / multi, 4) if multi else None,
        },
        "object_latent_px": {w: _stats(v) for w, v in sorted(stored.items())},
        "object_latent_px_at_res": {w: _stats(v) for w, v in sorted(at_ref.items())},
        "at_res": level.reference_side,
        "distinct_captions": len({r["caption"] for r in rows}),
    }



# ---------------------------------------------------------------------------------------------- files
def plan_dataset(
    n: int,
    seed: int = 0,
    level: Curriculum | None = None,
    base: int = 256,
    step: int = 32,
    small_fraction: float = 0.3,
    small_range: tuple[int, int] = (64, 128),
    crop_fraction: float = 0.15,
    hold_out: bool = True,
) -> tuple[Curriculum, list[dict[str, Any]]]:
    """Everything `generate_shapes_dataset` draws, without rendering: (the level used, one dict per image with
    caption, size [h, w], original_size [h, w] (the size rendered before an upscale), small, scene).
    Item i depends only on (seed, i). Arguments as `generate_shapes_dataset`'s."""
    legacy = level is None or level.legacy
    if level is None:
        level = dataclasses.replace(LEVELS["full"], base=base)
    elif level.legacy:
        level = dataclasses.replace(level, base=base)
    if not legacy:
        base = level.base
        small_fraction, crop_fraction = level.soft_upscales, level.crops
        small_range = (base // 4, base // 2)
    sizes = [(base, base)] if level.square and not legacy else scaled_buckets(base, step)
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        h, w = sizes[int(rng.integers(len(sizes)))] if len(sizes) > 1 else sizes[0]
        is_small = bool(rng.random() < small_fraction)
        is_cropped = bool(rng.random() < crop_fraction)
        if legacy:
            scene = random_scene(rng, aspect=h / w, hold_out=hold_out, cropped=is_cropped)
        else:
            scene = curriculum_scene(rng, level, aspect=h / w, hold_out=hold_out)
            scene = _round_scene(_zoom_crop(scene, rng) if is_cropped else scene)
        original = (h, w)
        if is_small:
            short = int(rng.integers(small_range[0], small_range[1] + 1))
            scale = short / min(h, w)
            original = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
        items.append({"caption": caption(scene), "original_size": list(original), "size": [h, w],
                      "small": is_small, "scene": scene})
    return level, items


def generate_shapes_dataset(
    n: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    base: int = 256,
    step: int = 32,
    small_fraction: float = 0.3,
    small_range: tuple[int, int] = (64, 128),
    crop_fraction: float = 0.15,
    hold_out: bool = True,
    supersample: int = 4,
    mask_style: str = "disc",
    level: Curriculum | None = None,
) -> dict[str, Any]:
    """Write n images with captions and metadata to out_dir (the `sdxl data shapes` command).

    Files: `NNNNNN.png`, `NNNNNN.txt` (caption), `NNNNNN.mask.png` (where the objects are, `render_mask`
    in `mask_style`: the loss mask for `loss.masked`), `metadata.jsonl` (one line per image: path, mask,
    caption, original_size [h, w] = the TRUE size before the upscale, size [h, w] of the file, scene),
    `scenes.jsonl` (path, scene) and `summary.json` (`dataset_summary`: what the data holds). Image i depends
    only on (seed, i), so the output is identical for the same seed whatever n is.

    Without `level` (or with a legacy one, the "full" level) image sizes are drawn from
    `scaled_buckets(base, step)`, `small_fraction` of the images are rendered with their shorter side in
    `small_range` and upscaled (bicubic, hence soft) to the bucket size, and `crop_fraction` of the scenes
    are zoomed so objects are cut by the border: the shipped model's data. With a `level` its own fields
    decide all of that (`base`, `square`, `soft_upscales` with the shorter side at a quarter to half of
    `base`, `crops`), and the scenes come from `curriculum_scene`.
    Returns the summary: count, number of small and cropped images, the sizes used, and `dataset_summary`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    level, items = plan_dataset(n, seed, level, base, step, small_fraction, small_range, crop_fraction,
                                hold_out)
    n_small = n_cropped = 0
    used: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    with (
        open(out / "metadata.jsonl", "w", encoding="utf-8") as meta,
        open(out / "scenes.jsonl", "w", encoding="utf-8") as scenes,
    ):
        for i, item in enumerate(items):
            scene, (h, w) = item["scene"], item["size"]
            if item["small"]:
                sh, sw = item["original_size"]
                img = render_scene(scene, sh, sw, supersample).resize((w, h), Image.Resampling.BICUBIC)
                mask = render_mask(scene, sh, sw, supersample, style=mask_style)
                mask = mask.resize((w, h), Image.Resampling.BILINEAR)
                n_small += 1
            else:
                img = render_scene(scene, h, w, supersample)
                mask = render_mask(scene, h, w, supersample, style=mask_style)
            n_cropped += int(scene["cropped"])
            name = f"{i:06d}"
            img.save(out / f"{name}.png", optimize=False)
            mask.save(out / f"{name}.mask.png", optimize=False)
            (out / f"{name}.txt").write_text(item["caption"] + "\n", encoding="utf-8")
            row = {"path": f"{name}.png", "mask": f"{name}.mask.png", **item}
            rows.append(row)
            meta.write(json.dumps(row, sort_keys=True) + "\n")
            scenes.write(json.dumps({"path": f"{name}.png", "scene": scene}, sort_keys=True) + "\n")
            used[f"{h}x{w}"] = used.get(f"{h}x{w}", 0) + 1
    summary = {"count": n, "small": n_small, "cropped": n_cropped, "sizes": used, "out_dir": str(out),
               "seed": seed, **dataset_summary(rows, level)}
    if level.legacy:  # what the legacy draw used, whatever the level's own fields say
        summary["spec"].update(base=level.base, at_res=level.base, soft_upscales=small_fraction,
                               crops=crop_fraction)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------- evaluation
EVAL_KINDS = ("single", "pair", "single_novel", "pair_novel")


def eval_prompts(
    kind: str, n: int, seed: int = 0, level: Curriculum | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Prompts for evaluating a model trained on this dataset, as (prompt, scene spec) pairs.

    kind: "single" (one object), "pair" (two objects and their relation), "single_novel" / "pair_novel"
    (the same with a HELD_OUT colour-shape pair, never shown in training when hold_out=True).
    Specs are square (aspect 1.0) and never cropped; render them with `render_scene(spec, s, s)` for a
    reference image, and score a generated image with `sdxl.data.evaluate.prompt_accuracy`.
    The generator is seeded separately from the training data (the kind is part of the seed).
    With a non-legacy `level` the specs are drawn from that level (`curriculum_scene`: its object sizes and
    background kinds, relations always stated), e.g. the "easy" level's single large objects on plain
    backgrounds; the level's name is part of the seed.
    """
    if kind not in EVAL_KINDS:
        raise ValueError(f"kind must be one of {EVAL_KINDS}, got {kind!r}")
    if level is not None and not level.legacy:
        return _level_prompts(kind, n, seed, level)
    rng = np.random.default_rng([seed, 1_000_003, EVAL_KINDS.index(kind)])
    out = []
    for _ in range(n):
        combos = _novel_combos(rng, kind)
        n_obj = 1 if kind.startswith("single") else 2
        spec = random_scene(
            rng, aspect=1.0, n_objects=n_obj, hold_out=not kind.endswith("novel"), combos=combos
        )
        out.append((caption(spec), spec))
    return out


def _novel_combos(rng: np.random.Generator, kind: str) -> list[tuple[str, str]] | None:
    """The forced (colour, shape) pairs of a "novel" prompt: a held-out pair, and for pairs a second object
    in either order; None for the other kinds."""
    if kind == "single_novel":
        return [HELD_OUT[int(rng.integers(len(HELD_OUT)))]]
    if kind == "pair_novel":
        first = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
        second = _pick_combo(rng, {first[0]}, "", hold_out=False)
        return [first, second] if rng.random() < 0.5 else [second, first]
    return None


def _level_prompts(kind: str, n: int, seed: int, level: Curriculum) -> list[tuple[str, dict[str, Any]]]:
    if kind.startswith("pair"):
        dataclasses.replace(level, objects={2: 1.0}).check()  # raises where two objects do not fit
    rng = np.random.default_rng([seed, 1_000_003, EVAL_KINDS.index(kind), zlib.crc32(level.name.encode())])
    out = []
    for _ in range(n):
        combos = _novel_combos(rng, kind)
        spec = curriculum_scene(rng, level, aspect=1.0, hold_out=not kind.endswith("novel"),
                                n_objects=1 if kind.startswith("single") else 2, state_relations=True,
                                combos=combos)
        out.append((caption(spec), _round_scene(spec)))
    return out

