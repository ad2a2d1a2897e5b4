"""Control images: the preprocessors that need no downloaded model, and the resize modes, as
sd-webui-controlnet computes them.

`prepare_control_image` turns a unit's image into the hint a control model gets ([1, 3, H, W] float in
[0, 1] at the generation size):

1. the image, 8-bit RGB (alpha composited on white, as the extension's HWC3);
2. the preprocessor (none: the image is the map) at a processing resolution: the image is resized so its
   short side is that resolution (bicubic up, area down) and edge-padded to a multiple of 64, the
   preprocessor runs, the padding is cut off. The resolution is the extension's "pixel perfect" one (the
   short side the map will have at the generation size) unless `processor_res` is given;
3. the map is brought to the generation size by the resize mode: resize ("Just Resize": stretched),
   crop ("Crop and Resize": scaled to cover, centre cropped), fill ("Resize and Fill": scaled to fit,
   centred on the median colour of the map's border pixels). The scaling is the extension's
   `high_quality_resize`: nearest for maps of 3..199 colours (segmentation), area when shrinking, bicubic
   when growing, and binary maps (two colours, black and white) averaged over the channels and
   re-binarised with Otsu's threshold (the extension also thins one-pixel edges after that; we do not).

Preprocessors (sd-webui-controlnet's module name in brackets; thresholds as its sliders):
  canny [canny]: OpenCV's Canny, aperture 3, L1 gradient (low 100, high 200 on 0..255 by default);
  threshold [threshold]: white where the darkest channel is above threshold_a (127);
  scribble [scribble_xdog]: difference of Gaussians (sigma 0.5 and 5), white where 2 * (255 - dog) in
    8-bit arithmetic is above threshold_a (32);
  invert [invert]: 255 - the image (white background, black lines -> black background, white lines);
  tile [tile_resample]: area-downsampled by threshold_a (1: unchanged; below 1.1 it does nothing);
  blur [blur_gaussian]: Gaussian blur with sigma threshold_a (9), OpenCV's kernel size and borders.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .control_names import (
    A1111_MODULES,
    PREPROCESSORS,
    check_preprocessor,
    pixel_perfect_resolution,
    thresholds,
)
from .data.images import ImageError, load_image, to_rgb
from .errors import RequestError

__all__ = ["A1111_MODULES", "PREPROCESSORS", "detect", "prepare_control_image", "run_preprocessor"]

RESIZE_MODES = ("resize", "crop", "fill")
DEFAULT_PROCESSOR_RES = 512  # the extension's default processing resolution (API: processor_res -1)


# ---------------------------------------------------------------------------------------------- images
def to_array(image: Any, where: str = "control image") -> np.ndarray:
    """A path, PIL image, [H, W(, C)] uint8 array or [(1,) 3, H, W] tensor in [0, 1] -> uint8 [H, W, 3]."""
    if isinstance(image, (str, os.PathLike)):
        try:
            image = load_image(image)
        except ImageError as e:
            raise RequestError(f"{where}: {e}") from None
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image), dtype=np.uint8).copy()
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise RequestError(f"{where}: a tensor of shape {list(image.shape)}, not [3, H, W]")
        image = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return _hwc3(image)
    raise RequestError(f"{where}: {type(image).__name__} is not an image (give a file path or an image)")


def _hwc3(x: np.ndarray) -> np.ndarray:
    """Grey, RGB or RGBA uint8 -> RGB (alpha composited on white), as the extension's HWC3."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise RequestError(f"control image: an array of shape {list(x.shape)}, not [H, W, 1/3/4]")
    if x.shape[2] == 1:
        return np.repeat(x, 3, axis=2)
    if x.shape[2] == 4:
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        return (x[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return x


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float() / 255.0


def _resize(x: np.ndarray, w: int, h: int, how: str) -> np.ndarray:
    """uint8 [H, W, C] -> [h, w, C]: area (PIL's box filter shrinking; OpenCV's linear weights when an axis
    grows), cubic (OpenCV's a = -0.75, half-pixel centres,
    replicated borders: torch's bicubic) or nearest (source index floor(i * H / h))."""
    H, W = x.shape[:2]
    if (H, W) == (h, w):
        return x
    if how == "nearest":
        rows = np.minimum((np.arange(h) * (H / h)).astype(np.int64), H - 1)
        cols = np.minimum((np.arange(w) * (W / w)).astype(np.int64), W - 1)
        return x[rows][:, cols]
    if how == "area" and (h > H or w > W):
        return _area_growing(x, w, h)
    if how == "area":
        chans = [np.asarray(Image.fromarray(x[:, :, c]).resize((w, h), Image.BOX)) for c in range(x.shape[2])]
        return np.stack(chans, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear weights of OpenCV's INTER_AREA along an axis when the image grows on some
    axis: source floor(i * in / out) and the next one, weight fx = frac((i + 1) - (sx + 1) * out / in)."""
    scale, inv = n_in / n_out, n_out / n_in
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        sx = math.floor(i * scale)
        fx = (i + 1) - (sx + 1) * inv
        fx = 0.0 if fx <= 0 else fx - math.floor(fx)
        m[i, min(sx, n_in - 1)] += 1.0 - fx
        m[i, min(sx + 1, n_in - 1)] += fx
    return m


def _area_growing(x: np.ndarray, w: int, h: int) -> np.ndarray:
    H, W = x.shape[:2]
    y = np.einsum("ih,hwc->iwc", _area_weights(H, h), x.astype(np.float64))
    y = np.einsum("jw,iwc->ijc", _area_weights(W, w), y)
    return np.floor(y + 0.5).clip(0, 255).astype(np.uint8)


def _unique_colours(x: np.ndarray) -> int:
    packed = (x[:, :, 0].astype(np.int32) << 16) | (x[:, :, 1].astype(np.int32) << 8) | x[:, :, 2]
    return len(np.unique(packed))


def _otsu(y: np.ndarray) -> np.ndarray:
    """Otsu's threshold of a uint8 image: 255 above the threshold that maximises the between-class
    variance, 0 elsewhere (OpenCV's THRESH_BINARY + THRESH_OTSU)."""
    hist = np.bincount(y.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    t = int(np.argmax(between))
    return np.where(y > t, 255, 0).astype(np.uint8)


def high_quality_resize(x: np.ndarray, w: int, h: int) -> np.ndarray:
    """The extension's map scaling (see the module docstring)."""
    if x.shape[:2] == (h, w):
        return x
    smaller = w * h < x.shape[0] * x.shape[1]
    colours = _unique_colours(x)
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    if 2 < colours < 200:
        how = "nearest"
    elif smaller:
        how = "area"
    else:
        how = "cubic"
    y = _resize(x, w, h, how)
    if binary:
        y = _otsu(y.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8))
        y = np.stack([y] * 3, axis=2)
    return y


def fit_to_size(x: np.ndarray, resize_mode: str, width: int, height: int) -> np.ndarray:
    """A map brought to width x height by a resize mode (resize / crop / fill)."""
    if resize_mode == "resize":
        return high_quality_resize(x, width, height)
    old_h, old_w = x.shape[:2]
    k0, k1 = height / old_h, width / old_w
    if resize_mode == "fill":
        k = min(k0, k1)
        borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
        colour = np.median(borders, axis=0).astype(x.dtype)
        out = np.tile(colour[None, None], (height, width, 1))
        y = high_quality_resize(x, max(1, round(old_w * k)), max(1, round(old_h * k)))
        nh, nw = y.shape[:2]
        top, left = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
        out[top:top + nh, left:left + nw] = y[:height, :width]
        return out
    if resize_mode == "crop":
        k = max(k0, k1)
        y = high_quality_resize(x, max(width, round(old_w * k)), max(height, round(old_h * k)))
        nh, nw = y.shape[:2]
        top, left = (nh - height) // 2, (nw - width) // 2
        return y[top:top + height, left:left + width]
    raise RequestError(f"resize_mode: {resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")


def _resize_with_pad(x: np.ndarray, res: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Short side to `res` (bicubic up, area down), edge-padded to multiples of 64; (padded, (h, w))."""
    H, W = x.shape[:2]
    k = res / min(H, W)
    h, w = max(1, int(round(H * k))), max(1, int(round(W * k)))
    y = _resize(x, w, h, "cubic" if k > 1 else "area")
    ph, pw = -h % 64, -w % 64
    return np.pad(y, ((0, ph), (0, pw), (0, 0)), mode="edge"), (h, w)


# ---------------------------------------------------------------------------------------------- filters
def _gaussian(x: np.ndarray, sigma: float, eight_bit: bool) -> np.ndarray:
    """OpenCV's GaussianBlur(x, (0, 0), sigma): kernel size round(sigma * (3 for 8-bit, else 4) * 2 + 1),
    odd; reflect-101 borders. x: [H, W, C]; returns float32 (rounded to integers for 8-bit)."""
    ksize = int(round(sigma * (3 if eight_bit else 4) * 2 + 1)) | 1
    r = ksize // 2
    i = np.arange(ksize, dtype=np.float64) - r
    k = np.exp(-(i * i) / (2.0 * sigma * sigma))
    k = torch.from_numpy(k / k.sum()).float()
    t = torch.from_numpy(np.pad(x.astype(np.float32), ((r, r), (r, r), (0, 0)), mode="reflect"))
    t = t.permute(2, 0, 1)[:, None]  # [C, 1, H + 2r, W + 2r]
    t = F.conv2d(t, k.view(1, 1, ksize, 1))
    t = F.conv2d(t, k.view(1, 1, 1, ksize))
    out = t[:, 0].permute(1, 2, 0).numpy()
    if eight_bit:
        out = np.floor(out + 0.5).clip(0, 255)
    return out


def canny_edges(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """OpenCV's Canny(x, low, high) (aperture 3, L1 gradient) on uint8 [H, W, C]: Sobel per channel with
    replicated borders, the channel of largest |dx| + |dy| at each pixel, non-maximum suppression along
    the gradient direction quantised to 0/45/90/135 degrees (tan 22.5 bounds), hysteresis: pixels above
    `low` that are local maxima, kept when 8-connected to one above `high`. uint8 [H, W], 0 or 255."""
    low, high = math.floor(low), math.floor(high)
    if low > high:
        low, high = high, low
    t = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[:, None]  # [C, 1, H, W]
    t = F.pad(t, (1, 1, 1, 1), mode="replicate")
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    dx = F.conv2d(t, sx.view(1, 1, 3, 3))[:, 0]
    dy = F.conv2d(t, sx.t().contiguous().view(1, 1, 3, 3))[:, 0]
    mag = dx.abs() + dy.abs()  # [C, H, W]
    best = mag.argmax(dim=0, keepdim=True)
    mag = mag.gather(0, best)[0]
    dx, dy = dx.gather(0, best)[0], dy.gather(0, best)[0]
    H, W = mag.shape
    m = F.pad(mag, (1, 1, 1, 1))  # zero magnitude outside the image

    def at(oy: int, ox: int) -> torch.Tensor:
        return m[1 + oy:1 + oy + H, 1 + ox:1 + ox + W]

    ax, ay = dx.abs(), dy.abs()
    tg22 = ax * 0.4142135623730950
    tg67 = ax * 2.4142135623730950
    horizontal = ay < tg22
    vertical = ay > tg67
    same_sign = (dx * dy) >= 0  # (xs ^ ys) >= 0: the 45-degree neighbours are up-left and down-right
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep_d1 = (mag > at(-1, -1)) & (mag > at(1, 1))
    keep_d2 = (mag > at(-1, 1)) & (mag > at(1, -1))
    keep = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, torch.where(same_sign, keep_d1,
                                                                                       keep_d2)))
    weak = (keep & (mag > low)).float()[None, None]
    edges = (keep & (mag > high)).float()[None, None]
    while True:  # grow the strong edges along 8-connected weak pixels until nothing changes
        before = edges
        for _ in range(16):
            edges = F.max_pool2d(edges, 3, stride=1, padding=1) * weak
        if torch.equal(edges, before):
            break
    return (edges[0, 0] > 0).numpy().astype(np.uint8) * 255


# ---------------------------------------------------------------------------------------------- preprocessors
def run_preprocessor(name: str, x: np.ndarray, res: int, a: float | None, b: float | None) -> np.ndarray:
    """One preprocessor (canonical name, thresholds already defaulted) on uint8 [H, W, 3] at processing
    resolution `res`; the map, uint8 [h, w, 3]."""
    if name == "none":
        return x
    if name == "invert":
        return 255 - x
    if name == "tile":
        if a < 1.1:
            return x
        H, W = x.shape[:2]
        return _resize(x, max(1, int(W / a)), max(1, int(H / a)), "area")
    padded, (h, w) = _resize_with_pad(x, res)
    if name == "canny":
        out = np.repeat(canny_edges(padded, a, b)[:, :, None], 3, axis=2)
    elif name == "threshold":
        out = np.zeros_like(padded)
        out[padded.min(axis=2) > a] = 255
    elif name == "scribble":
        g1 = _gaussian(padded, 0.5, eight_bit=False)
        g2 = _gaussian(padded, 5.0, eight_bit=False)
        dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
        out = np.zeros_like(padded)
        out[(2 * (255 - dog)).astype(np.uint8) > a] = 255  # 8-bit arithmetic, as the extension
    elif name == "blur":
        return _gaussian(padded[:h, :w], a, eight_bit=True).astype(np.uint8)
    else:  # check_preprocessor lets no other name through
        raise RequestError(f"preprocessor: {name!r} is not a preprocessor")
    return np.ascontiguousarray(out[:h, :w])


def prepare_control_image(
    image: Any,
    preprocessor: str | None = "none",
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    resize_mode: str = "crop",
    width: int = 1024,
    height: int = 1024,
    processor_res: int | None = None,
) -> torch.Tensor:
    """A unit's hint: the image (path, PIL image, uint8 array or [0, 1] tensor) through the preprocessor
    and the resize mode, [1, 3, height, width] float32 in [0, 1]. `processor_res` None: pixel perfect."""
    name = check_preprocessor(preprocessor or "none")
    a, b = thresholds(name, threshold_a, threshold_b)
    if resize_mode not in RESIZE_MODES:
        raise RequestError(f"resize_mode: {resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
    x = to_array(image)
    if name != "none":
        res = processor_res if processor_res and processor_res > 0 else pixel_perfect_resolution(
            x.shape[1], x.shape[0], resize_mode, width, height)
        x = run_preprocessor(name, x, res, a, b)
    return _to_tensor(fit_to_size(x, resize_mode, width, height))


def detect(
    module: str,
    image: Any,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    processor_res: int | None = None,
) -> Image.Image:
    """What /controlnet/detect returns for one image: the preprocessor's map at `processor_res` (None or
    -1: 512, the extension's default), not resized to any generation size."""
    name = check_preprocessor(module, "controlnet_module")
    a, b = thresholds(name, threshold_a, threshold_b, "controlnet_")
    res = processor_res if processor_res and processor_res > 0 else DEFAULT_PROCESSOR_RES
    return Image.fromarray(run_preprocessor(name, to_array(image), int(res), a, b))
