"""Reading shapes back out of an image, scoring prompts, and a Frechet distance, all in numpy.

Detector (`detect_objects`), step by step:
  1. colour segmentation: every pixel gets the nearest palette colour (RGB distance);
  2. background: the most common colour on the image border. Textured backgrounds are drawn with a
     shade of their colour that maps to the same palette entry, so stripes/checkers/noise vanish here;
     and since an autoencoder or a model may move that shade across a palette boundary (light red
     stripes come back orange), the background's own one or two colours are also measured on a ring
     just inside the border (`background_colours`), and every pixel nearer to one of them than to any
     palette colour is background too;
  3. every other colour is cleaned with a 3 x 3 morphological opening, which removes the one-pixel
     fringes that anti-aliased edges leave in "in-between" colours;
  4. 8-connected components; components smaller than `min_area` (a fraction of the shorter side
     squared) are dropped;
  5. each component is described by scale- and rotation-tolerant geometric features (`shape_features`):
     extent (area / bounding-box area), solidity (area / convex-hull area), hole fraction, and the
     spread, max/min ratio and 3rd/4th/5th Fourier harmonics of the boundary's distance-to-centroid
     over the angle;
  6. the shape is the nearest class centroid (features standardised by the within-class spread),
     the centroids being fitted on renders of `sdxl.data.shapes` with known shapes (`fit_shape_classifier`,
     cached; a few seconds, deterministic).

`detector_accuracy_on_renders` reports how often this reads a fresh render correctly; that is the ceiling
for scoring a model's samples with `prompt_accuracy`.

`frechet_distance` is the FID formula over any feature vectors; `image_features` gives a small,
hand-made feature vector for shapes images (no Inception network is involved, so the numbers are only
comparable with each other).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sdxl.data.shapes import (
    COLORS,
    PALETTE,
    SHAPES,
    Curriculum,
    eval_prompts,
    random_scene,
    render_scene,
)

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


# ---------------------------------------------------------------------------------------------- basics
def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    return arr


def _palette_distances(arr: np.ndarray) -> np.ndarray:
    """Squared RGB distance of every pixel to every palette colour, [H * W, len(COLORS)]."""
    flat = arr.reshape(-1, 3).astype(np.float32)
    return ((flat[:, None, :] - _PALETTE_RGB[None, :, :]) ** 2).sum(-1)


def nearest_palette(arr: np.ndarray) -> np.ndarray:
    """Index into COLORS of the nearest palette colour of every pixel, [H, W] int."""
    return _palette_distances(arr).argmin(1).reshape(arr.shape[:2])


def border_mode(labels: np.ndarray) -> int:
    """Most common label on the outermost rows and columns."""
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return int(np.bincount(border, minlength=len(COLORS)).argmax())


def _border_band(a: np.ndarray, inset: int) -> np.ndarray:
    """The ring of pixels `inset` rows/columns inside the image's edge (the edge itself where too small)."""
    h, w = a.shape[:2]
    i = inset if min(h, w) > 4 * inset else 0
    rows = [a[i, i : w - i], a[h - 1 - i, i : w - i]]
    return np.concatenate(rows + [a[i : h - i, i], a[i : h - i, w - 1 - i]])


def background_colours(
    arr: np.ndarray, min_share: float = 0.12, inset: int = 4, pure: float = 20.0
) -> np.ndarray:
    """The background's own colours, measured near the image border: [k, 3] RGB, k = 1 or 2.

    The pixels of a ring `inset` pixels inside the edge (autoencoders draw a frame on the outermost ones)
    are split in two by k-means, started from a split across their principal axis; a cluster holding at
    least `min_share` of the ring is a background colour, unless it lies within `pure` of a palette
    colour other than the background's (then it is an object touching the border). A textured
    background's second shade is one of them even where an autoencoder or a model has shifted it across
    a palette boundary (the light shade of red stripes read as orange, a grey checker read as green).
    """
    ring = _border_band(arr, inset).astype(np.float32)
    centred = ring - ring.mean(0)
    axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]
    assign = (centred @ axis > 0).astype(np.int64)
    centres = np.zeros((2, 3), dtype=np.float32)
    for _ in range(10):
        for k in range(2):
            centres[k] = ring[assign == k].mean(0) if (assign == k).any() else ring.mean(0)
        assign = ((ring[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    share = np.bincount(assign, minlength=2) / len(assign)
    major = int(share.argmax())
    d = ((centres[:, None, :] - _PALETTE_RGB[None]) ** 2).sum(-1)
    d[:, d[major].argmin()] = np.inf  # the background's own palette colour
    # the minor cluster counts if it is large, and is not simply a palette colour (an object on the border)
    keep = (share >= min_share) & (d.min(1) >= pure**2)
    keep[major] = True
    return centres[keep]


def _shift_all(mask: np.ndarray, fill: bool, combine) -> np.ndarray:
    """Combine the 3 x 3 neighbourhood of every pixel with `combine` (np.logical_and / or)."""
    h, w = mask.shape
    padded = np.pad(mask, 1, constant_values=fill)
    out = padded[1 : h + 1, 1 : w + 1].copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out = combine(out, padded[dy : dy + h, dx : dx + w])
    return out


def opening(mask: np.ndarray) -> np.ndarray:
    """3 x 3 erosion then dilation: removes structures thinner than 3 pixels, keeps the rest."""
    return _shift_all(_shift_all(mask, True, np.logical_and), False, np.logical_or)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels [H, W] with 0 = off and 1..n, n).

    Works on horizontal runs: each row's runs are joined (union-find) to the runs of the previous row
    they touch, including diagonally. Fast for the few large blobs of a shapes image.
    """
    h, w = mask.shape
    parent: list[int] = []

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    runs: list[tuple[int, int, int, int]] = []  # (row, start, end exclusive, run id)
    prev: list[tuple[int, int, int]] = []
    for y in range(h):
        d = np.diff(np.concatenate(([0], mask[y].astype(np.int8), [0])))
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        cur = []
        for s, e in zip(starts.tolist(), ends.tolist()):
            rid = len(parent)
            parent.append(rid)
            for ps, pe, pid in prev:
                if ps <= e and pe >= s:  # touching, diagonals included (ends are exclusive)
                    ra, rb = find(rid), find(pid)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
            cur.append((s, e, rid))
            runs.append((y, s, e, rid))
        prev = cur
    labels = np.zeros((h, w), dtype=np.int32)
    root_to_label: dict[int, int] = {}
    for y, s, e, rid in runs:
        root = find(rid)
        if root not in root_to_label:
            root_to_label[root] = len(root_to_label) + 1
        labels[y, s:e] = root_to_label[root]
    return labels, len(root_to_label)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every enclosed hole filled (off-pixels not connected to the border)."""
    padded = np.pad(~mask, 1, constant_values=True)
    labels, _ = connected_components(padded)
    outside = labels == labels[0, 0]
    return ~outside[1:-1, 1:-1]


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, then the shoelace formula)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def cross(o, a, b) -> float:
        return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))

    lower: list[np.ndarray] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[np.ndarray] = []
    for p in pts[::-1]:
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# ---------------------------------------------------------------------------------------------- shapes
FEATURE_NAMES = (
    "extent",
    "solidity",
    "hole_fraction",
    "radial_cv",
    "radial_ratio",
    "harmonic3",
    "harmonic4",
    "harmonic5",
)
_ANGLE_BINS = 48


def shape_features(mask: np.ndarray) -> np.ndarray:
    """Geometric features of one blob (boolean mask cropped to or containing it), see FEATURE_NAMES.

    extent: area / bounding-box area (square ~1, circle 0.79, diamond / triangle ~0.5).
    solidity: filled area / convex-hull area (convex shapes ~1, cross ~0.8, star ~0.55).
    hole_fraction: hole area / filled area (ring ~0.3, others 0).
    radial_*: the largest boundary distance from the centroid in each of 48 angle bins, divided by its
      mean: coefficient of variation (circle ~0) and max / min (triangle ~2, square ~1.4).
    harmonic3/4/5: magnitudes of the 3rd, 4th and 5th Fourier coefficients of that radial profile: a
      k-fold symmetric outline has a strong k-th harmonic (triangle 3; square, diamond, cross 4; star 5).
      Unlike a corner count this does not depend on the rotation or on tips blunted at small sizes.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros(len(FEATURE_NAMES))
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = mask[y0:y1, x0:x1]
    area = float(m.sum())
    filled = _fill_holes(m)
    filled_area = float(filled.sum())
    extent = filled_area / float(m.shape[0] * m.shape[1])
    hole = (filled_area - area) / filled_area
    # boundary pixels of the filled blob: on, with at least one 4-neighbour off
    p = np.pad(filled, 1)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    by, bx = np.nonzero(filled & ~interior)
    corners = np.concatenate([np.stack([by + dy, bx + dx], 1) for dy in (0, 1) for dx in (0, 1)])
    hull = _hull_area(corners.astype(np.float64))
    solidity = filled_area / hull if hull > 0 else 1.0
    fy, fx = np.nonzero(filled)
    cy, cx = fy.mean() + 0.5, fx.mean() + 0.5
    ang = np.arctan2(by + 0.5 - cy, bx + 0.5 - cx)
    dist = np.hypot(by + 0.5 - cy, bx + 0.5 - cx) + 0.5
    bins = ((ang + math.pi) / (2 * math.pi) * _ANGLE_BINS).astype(int) % _ANGLE_BINS
    prof = np.zeros(_ANGLE_BINS)
    np.maximum.at(prof, bins, dist)
    if (prof == 0).any():  # tiny blobs: fill empty bins from their neighbours
        idx = np.flatnonzero(prof > 0)
        prof = np.interp(np.arange(_ANGLE_BINS), idx, prof[idx], period=_ANGLE_BINS)
    prof = prof / prof.mean()
    harmonics = np.abs(np.fft.rfft(prof)) / _ANGLE_BINS
    cv = float(prof.std())
    ratio = float(min(prof.max() / max(prof.min(), 1e-6), 4.0))
    return np.array([extent, solidity, hole, cv, ratio, harmonics[3], harmonics[4], harmonics[5]])


@dataclass(frozen=True)
class ShapeClassifier:
    """Nearest class centroid after dividing each feature by its pooled within-class std."""

    centroids: np.ndarray  # [n_shapes, n_features], in SHAPES order
    scale: np.ndarray  # [n_features]

    def predict(self, features: np.ndarray) -> str:
        d = (((features[None, :] - self.centroids) / self.scale) ** 2).sum(1)
        return SHAPES[int(d.argmin())]


@functools.lru_cache(maxsize=4)
def fit_shape_classifier(n_per_shape: int = 16, seed: int = 1234) -> ShapeClassifier:
    """Fit the centroids on renders of single objects of every shape (random colour, size, rotation,
    background; square images of side 128-256, the range the features see in use, since small shapes
    lose their sharp tips). Deterministic for given arguments; cached."""
    feats: dict[str, list[np.ndarray]] = {s: [] for s in SHAPES}
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        while len(feats[shape]) < n_per_shape:
            color = COLORS[int(rng.integers(len(COLORS)))]
            scene = random_scene(rng, aspect=1.0, combos=[(color, shape)], hold_out=False)
            side = int(rng.integers(128, 257))
            dets = _components(_as_array(render_scene(scene, side, side)))
            if len(dets) == 1:
                feats[shape].append(dets[0][1])
    centroids = np.stack([np.mean(feats[s], 0) for s in SHAPES])
    within = np.concatenate([np.asarray(feats[s]) - centroids[k] for k, s in enumerate(SHAPES)])
    scale = np.maximum(within.std(0), 0.02)  # no feature is trusted to better than 0.02
    return ShapeClassifier(centroids=centroids, scale=scale)


# ---------------------------------------------------------------------------------------------- detection
@dataclass
class Detection:
    color: str
    shape: str
    centroid: tuple[float, float]  # (y, x) in pixels
    area: int  # pixels
    bbox: tuple[int, int, int, int]  # (top, left, bottom, right), exclusive bottom/right
    features: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        return {
            "color": self.color,
            "shape": self.shape,
            "centroid": [round(self.centroid[0], 2), round(self.centroid[1], 2)],
            "area": self.area,
            "bbox": list(self.bbox),
        }


def _components(arr: np.ndarray, min_area: float = 0.003) -> list[tuple[dict[str, Any], np.ndarray]]:
    """Foreground blobs of an RGB array: (info, features) each, steps 1-5 of the module docstring."""
    d_palette = _palette_distances(arr)
    labels = d_palette.argmin(1).reshape(arr.shape[:2])
    bg = border_mode(labels)
    # pixels nearer to one of the background's measured colours than to any palette colour are background
    flat = arr.reshape(-1, 3).astype(np.float32)
    centres = background_colours(arr)
    d_bg = ((flat[:, None, :] - centres[None]) ** 2).sum(-1).min(1)
    d_palette = d_palette.min(1)
    labels = np.where((d_bg < d_palette).reshape(labels.shape), bg, labels)
    short = min(arr.shape[:2])
    min_px = max(4, int(min_area * short * short))
    found = []
    for k in range(len(COLORS)):
        if k == bg:
            continue
        mask = labels == k
        if mask.sum() < min_px:
            continue
        mask = opening(mask)
        comp, n = connected_components(mask)
        for c in range(1, n + 1):
            blob = comp == c
            area = int(blob.sum())
            if area < min_px:
                continue
            ys, xs = np.nonzero(blob)
            info = {
                "color": COLORS[k],
                "centroid": (float(ys.mean()), float(xs.mean())),
                "area": area,
                "bbox": (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1),
            }
            found.append(
                (
                    info,
                    shape_features(
                        blob[info["bbox"][0] : info["bbox"][2], info["bbox"][1] : info["bbox"][3]]
                    ),
                )
            )
    return found


def detect_objects(image: Image.Image | np.ndarray, min_area: float = 0.003) -> list[Detection]:
    """Objects in a shapes image, largest first. `min_area`: smallest blob kept, as a fraction of the
    shorter side squared (the smallest object of the dataset, a small triangle, is about 0.011)."""
    clf = fit_shape_classifier()
    out = [
        Detection(shape=clf.predict(f), features=f, **info)
        for info, f in _components(_as_array(image), min_area)
    ]
    return sorted(out, key=lambda d: -d.area)


def _relation(a: Detection, b: Detection) -> str:
    """Where a is relative to b, by the larger centroid offset (same rule as the generator)."""
    dy = a.centroid[0] - b.centroid[0]
    dx = a.centroid[1] - b.centroid[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def prompt_accuracy(image: Image.Image | np.ndarray, spec: dict[str, Any]) -> dict[str, bool]:
    """Score an image against a scene spec (from `eval_prompts`).

    colour_ok: every object colour of the spec is found; shape_ok: for every object some detection has
    its colour AND its shape (attribute binding); count_ok: exactly as many objects as the spec;
    relation_ok: every stated relation holds between the detections matched to its two objects (the one
    of the right colour, preferring the right shape, then the largest); vacuously true with no relation;
    all_ok: all four.
    """
    dets = detect_objects(image)
    objs = spec["objects"]

    def match(obj: dict[str, Any]) -> Detection | None:
        same_colour = [d for d in dets if d.color == obj["color"]]
        same_shape = [d for d in same_colour if d.shape == obj["shape"]]
        pool = same_shape or same_colour
        return pool[0] if pool else None  # dets are sorted largest first

    colour_ok = all(any(d.color == o["color"] for d in dets) for o in objs)
    shape_ok = all(any(d.color == o["color"] and d.shape == o["shape"] for d in dets) for o in objs)
    count_ok = len(dets) == len(objs)
    relation_ok = True
    for i, rel, j in spec.get("relations", []):
        a, b = match(objs[i]), match(objs[j])
        if a is None or b is None or a is b or _relation(a, b) != rel:
            relation_ok = False
    return {
        "colour_ok": colour_ok,
        "shape_ok": shape_ok,
        "count_ok": count_ok,
        "relation_ok": relation_ok,
        "all_ok": colour_ok and shape_ok and count_ok and relation_ok,
    }


def detector_accuracy_on_renders(
    n: int = 100,
    seed: int = 0,
    size: int = 256,
    roundtrip: Callable[[Image.Image], Image.Image] | None = None,
) -> dict[str, float]:
    """Accuracy of the detector on fresh renders of the evaluation specs (the best a model can score).

    Renders `eval_prompts("single", n, seed)` and `eval_prompts("pair", n, seed)` at size x size and
    returns the mean of every `prompt_accuracy` field, prefixed "single_" / "pair_". With `roundtrip`
    (e.g. a VAE's encode + decode) each render passes through it first: the ceiling that the model's
    autoencoder puts on any diffusion model using it.
    """
    out: dict[str, float] = {}
    through = roundtrip or (lambda im: im)
    for kind in ("single", "pair"):
        specs = [spec for _, spec in eval_prompts(kind, n, seed)]
        scores = [prompt_accuracy(through(render_scene(spec, size, size)), spec) for spec in specs]
        for key in scores[0]:
            out[f"{kind}_{key}"] = float(np.mean([s[key] for s in scores]))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n ((0, 1) for n = 0)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@dataclass
class Tally:
    """Counts of correct answers per metric over n scored images, with Wilson intervals."""

    n: int = 0
    correct: dict[str, int] | None = None

    def add(self, scores: dict[str, bool]) -> None:
        self.correct = self.correct or {}
        self.n += 1
        for key, ok in scores.items():
            self.correct[key] = self.correct.get(key, 0) + int(bool(ok))

    def rate(self, key: str) -> float:
        return (self.correct or {}).get(key, 0) / max(self.n, 1)

    def interval(self, key: str) -> tuple[float, float]:
        return wilson((self.correct or {}).get(key, 0), self.n)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        for key, k in (self.correct or {}).items():
            out[key] = k / max(self.n, 1)
            out[f"{key}_ci95"] = list(wilson(k, self.n))
        return out


def score_generated(
    generate: Callable[[str, int], Image.Image],
    lists: tuple[str, ...] = ("single", "pair"),
    n: int = 16,
    seed: int = 0,
    level: Curriculum | None = None,
) -> dict[str, Tally]:
    """Score `generate(prompt, seed) -> image` on `eval_prompts(kind, n, seed, level)` of each list (image i
    of a list gets seed `seed * 100_003 + i`, as `sdxl eval shapes`): the evaluation a trainer can run every
    K steps with a closure over its current weights (this layer knows no pipeline)."""
    out: dict[str, Tally] = {}
    for kind in lists:
        tally = out.setdefault(kind, Tally())
        for i, (prompt, spec) in enumerate(eval_prompts(kind, n, seed, level)):
            tally.add(prompt_accuracy(generate(prompt, seed * 100_003 + i), spec))
    return out


def tallies_to_log(tallies: dict[str, Tally], prefix: str = "eval_") -> dict[str, float]:
    """Flat `<prefix><list>_<metric>` -> rate, with `_lo` / `_hi` Wilson 95% bounds (for log.jsonl)."""
    out: dict[str, float] = {}
    for name, t in tallies.items():
        for key in t.correct or {}:
            out[f"{prefix}{name}_{key}"] = t.rate(key)
            out[f"{prefix}{name}_{key}_lo"], out[f"{prefix}{name}_{key}_hi"] = t.interval(key)
    return out


CEILING_GATE = {"single": 0.95, "pair": 0.85}  # issue 16's gate on a VAE: shape read after encode + decode


def render_ceiling(
    n: int = 100,
    seed: int = 999,
    size: int = 256,
    roundtrip: Callable[[Image.Image], Image.Image] | None = None,
    lists: tuple[str, ...] = ("single", "pair"),
    level: Curriculum | None = None,
) -> dict[str, Tally]:
    """The detector's scores on fresh renders of `eval_prompts(kind, n, seed, level)` at size x size, each
    passed through `roundtrip` first (e.g. a VAE's encode + decode): the ceiling that the roundtrip puts on
    any model. Per list, and per list split by object size: "<list>_small" (scenes with a small object) and
    "<list>_large" (only large objects)."""
    through = roundtrip or (lambda im: im)
    out: dict[str, Tally] = {}
    for kind in lists:
        for key in (kind, f"{kind}_small", f"{kind}_large"):
            out[key] = Tally()
        for _, spec in eval_prompts(kind, n, seed, level):
            scores = prompt_accuracy(through(render_scene(spec, size, size)), spec)
            group = "small" if any(o["size"] == "small" for o in spec["objects"]) else "large"
            for key in (kind, f"{kind}_{group}"):
                out[key].add(scores)
    return {k: t for k, t in out.items() if t.n}


def ceiling_table(tallies: dict[str, Tally]) -> str:
    """A markdown table of `render_ceiling`'s tallies, every rate with its Wilson 95% interval, and the
    gate."""
    lines = ["| renders | n | shape | all correct | colour | count | relation | gate (shape) |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(t: Tally, key: str) -> str:
        lo, hi = t.interval(key)
        return f"{t.rate(key):.0%} ({lo:.0%}-{hi:.0%})"

    for name, t in tallies.items():
        base = name.split("_")[0]
        rel = cell(t, "relation_ok") if base.startswith("pair") else "-"
        gate = CEILING_GATE.get(name)
        verdict = "-"
        if gate is not None:
            verdict = f">= {gate:.0%}: {'met' if t.rate('shape_ok') >= gate else 'not met'}"
        lines.append(f"| {name} | {t.n} | {cell(t, 'shape_ok')} | {cell(t, 'all_ok')} | "
                     f"{cell(t, 'colour_ok')} | {cell(t, 'count_ok')} | {rel} | {verdict} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- FD
_GREY_SIDE = 16
_PROJ_DIM = 32


@functools.lru_cache(maxsize=1)
def _projection() -> np.ndarray:
    """Fixed random projection of the 16 x 16 grey thumbnail to 32 numbers (seed 0, N(0, 1/256))."""
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 1.0 / _GREY_SIDE, size=(_GREY_SIDE * _GREY_SIDE, _PROJ_DIM))


def image_features(image: Image.Image | np.ndarray) -> np.ndarray:
    """A 123-number description of a shapes image for `frechet_distance`.

    - palette histogram: fraction of pixels nearest to each of the 8 palette colours (8);
    - coarse colour histogram: 4 x 4 x 4 RGB cube, fractions (64);
    - objects: number detected / 5, mean shape features of the detected blobs (8), histogram of the
      detected shapes / 5 (7), mean blob area / image area, mean centroid (y, x) / size (1 + 2);
    - layout: a 16 x 16 grey thumbnail (squashed to a square) through a fixed random projection (32).
    Every part is in [0, 1]-ish units so none dominates; the projection keeps the thumbnail's coarse
    structure in few dimensions (random projections roughly preserve distances).
    """
    arr = _as_array(image)
    h, w = arr.shape[:2]
    labels = nearest_palette(arr)
    pal_hist = np.bincount(labels.ravel(), minlength=len(COLORS)) / labels.size
    q = (arr // 64).astype(np.int64)
    cube = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64) / labels.size
    dets = detect_objects(arr)
    if dets:
        mean_feat = np.mean([d.features for d in dets], 0)
        shape_hist = np.array([sum(d.shape == s for d in dets) for s in SHAPES], dtype=np.float64) / 5.0
        mean_area = np.mean([d.area for d in dets]) / (h * w)
        mean_c = np.array(
            [np.mean([d.centroid[0] for d in dets]) / h, np.mean([d.centroid[1] for d in dets]) / w]
        )
    else:
        mean_feat = np.zeros(len(FEATURE_NAMES))
        shape_hist, mean_area, mean_c = np.zeros(len(SHAPES)), 0.0, np.full(2, 0.5)
    count = np.array([min(len(dets), 5) / 5.0])
    grey = np.asarray(
        Image.fromarray(arr).convert("L").resize((_GREY_SIDE, _GREY_SIDE), Image.Resampling.BOX),
        dtype=np.float64,
    )
    layout = (grey.ravel() / 255.0) @ _projection()
    return np.concatenate([pal_hist, cube, count, mean_feat, shape_hist, [mean_area], mean_c, layout])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (the FID formula):

        |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)).

    tr((C_a C_b)^(1/2)) is computed as tr((S C_b S)^(1/2)) with S = C_a^(1/2): S C_b S is symmetric
    positive semi-definite and similar to C_a C_b, so its eigenvalues (from `eigh`, negatives from
    rounding clipped to 0) are those of C_a C_b and their square roots sum to the wanted trace. This needs
    only numpy and stays real where scipy's general `sqrtm` can return complex noise. Covariances are
    unbiased (N - 1). The result is clipped at 0 (rounding can give -1e-12 for identical sets).
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] arrays with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    s = _sqrtm_psd(cov_a)
    eig = np.linalg.eigvalsh(s @ cov_b @ s)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(fd, 0.0)
