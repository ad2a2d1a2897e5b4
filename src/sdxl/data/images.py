"""Loading training images robustly, and the paper's resize / crop transform with its conditioning.

`load_image` turns whatever is on disk into an 8-bit RGB PIL image (EXIF rotation applied, alpha
composited on white, 16-bit and CMYK converted) or raises `ImageError`, never anything else, so a
dataset can skip a bad file and go on.

`prepare` implements the data side of SDXL's micro-conditioning (paper §2.2, Algorithm 1):
  - `original_size = (h, w)`: the image size BEFORE any resizing (size conditioning);
  - resize, keeping the aspect ratio, so the image covers the bucket (the side that fits tighter is
    matched exactly, the other one is longer or equal), then crop the excess;
  - `crop_top_left = (top, left)`: pixels cut from the top and the left of the RESIZED image
    (crop conditioning); only one of them is non-zero, on the axis with excess;
  - `target_size = (H, W)`: the bucket (aspect / target-size conditioning).

Horizontal flip. The pixels are flipped after cropping, and the crop coordinate is mirrored so it still
describes the picture the model sees: the flipped crop is the window of the flipped resized image that
starts at `left' = resized_w - W - left` (the amount cut from the right of the unflipped image). kohya's
sd-scripts do the same mirror in their own frame: with `crop_ltrb = (left, top, right, bottom)` they
record `left' = target_w - right` when flipped (their `crop_ltrb` is computed in bucket coordinates by
`get_crop_ltrb`, the window of a fit-inside resize, not the random crop actually taken). sgm's reference
loaders do not flip. Vertical coordinates are unchanged by a horizontal flip.

Loss masks (kohya's `masked_loss`): a greyscale image beside a training image (white = full weight) is
read with `load_mask` and given the image's own resize / crop / flip by `prepare_mask`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# Refuse images above this many pixels before decoding them (about 134 megapixels, e.g. 11585^2).
# A "decompression bomb" is a small file that declares a huge size; decoding it would exhaust memory.
DEFAULT_MAX_PIXELS = 2**27


class ImageError(ValueError):
    """An image that cannot be used; `path` says which file and the message says why."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def image_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) as displayed, read from the file header only (no pixel decoding).

    EXIF orientations 5-8 (rotations by 90 degrees) swap height and width, as `load_image` will.
    Raises ImageError for unreadable files and for sizes above `max_pixels`.
    """
    try:
        with warnings.catch_warnings():  # the size is checked against max_pixels just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(path, f"invalid size {w}x{h}")
            if w * h > max_pixels:  # before anything that might decode (see _header_orientation)
                raise ImageError(
                    path, f"image has {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels}"
                )
            orientation = _header_orientation(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(path, f"cannot read image header ({type(e).__name__}: {e})") from e
    if orientation in (5, 6, 7, 8):
        h, w = w, h
    return h, w


def _header_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable), without decoding any pixels.

    Pillow's `PngImageFile.getexif()` loads the whole image to look for an eXIf chunk after the pixel
    data: on a decompression bomb that is exactly the decoding the header check exists to avoid, and on a
    dataset scan it decodes every PNG. For PNG only an eXIf chunk before the pixels is read here (where
    writers put it); `load_image` still honours a late one, having decoded the image anyway.
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        orientation = exif.get(0x0112, 1)
        return orientation if isinstance(orientation, int) else 1
    except Exception:  # a broken EXIF block is not a reason to reject the image
        return 1


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """Alpha-composite an RGBA image on a white background (transparent areas become white)."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Grey images with more than 8 bits ("I;16*", "I", "F") to 8-bit RGB by scaling, not clipping.

    PIL's own `convert("L")` clips such values at 255, which turns most 16-bit images white.
    16-bit and 32-bit integer images are assumed to use the 16-bit range (what PNG/TIFF hold);
    float images are assumed to be in [0, 1] when their maximum is at most 1, else in [0, 255].
    """
    arr = np.asarray(img)
    if img.mode == "F":
        a = arr.astype(np.float64)
        scale = 255.0 if np.nanmax(a) <= 1.0 else 1.0
        a = np.nan_to_num(a) * scale
    else:
        a = arr.astype(np.float64) / 257.0  # 65535 -> 255
    grey = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparency (alpha channel or palette transparency) is composited on
    white, CMYK/YCbCr/LAB/HSV use PIL's conversion, 16-bit grey is scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    ):
        return _composite_on_white(img.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(img)
    return img.convert("RGB")


def _decode_upright(path: str | os.PathLike, max_pixels: int, what: str) -> Image.Image:
    """Header checks, then the decoded image with its EXIF orientation applied; `ImageError` otherwise."""
    image_size(path, max_pixels)  # header checks (readable, not a bomb) before any decoding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # a malformed orientation tag: keep the stored orientation
                    pass
                return img.copy()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:  # fmt: skip
        raise ImageError(path, f"cannot decode {what} ({type(e).__name__}: {e})") from e


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image, upright (EXIF orientation applied).

    Raises `ImageError` (a ValueError that names the path) for: files PIL cannot identify, sizes above
    `max_pixels` (checked on the header, before decoding, so decompression bombs cost nothing), truncated
    or otherwise corrupt pixel data. PIL's global `LOAD_TRUNCATED_IMAGES` switch is left alone: a truncated
    file is an error, not a half-grey image.
    """
    return to_rgb(_decode_upright(path, max_pixels, "image"))


def load_mask(
    path: str | os.PathLike, size_hw: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode a loss-mask file (any mode; read as 8-bit greyscale, upright) that must have the size
    (h, w) of its image. Raises `ImageError` like `load_image`, and for a size mismatch."""
    mask = _decode_upright(path, max_pixels, "mask").convert("L")
    if mask.size != (size_hw[1], size_hw[0]):
        raise ImageError(
            path, f"mask is {mask.size[1]}x{mask.size[0]}, its image is {size_hw[0]}x{size_hw[1]}"
        )
    return mask


def cover_size(h: int, w: int, bucket_hw: tuple[int, int]) -> tuple[int, int]:
    """Size (rh, rw) of the image resized, aspect kept, to cover the bucket: rh >= H and rw >= W, with
    one of them equal (up to rounding, which never goes below the bucket)."""
    bh, bw = bucket_hw
    scale = max(bh / h, bw / w)
    rh = max(bh, int(round(h * scale)))
    rw = max(bw, int(round(w * scale)))
    return rh, rw


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return t / 127.5 - 1.0


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """Float tensor [3, H, W] in [-1, 1] -> 8-bit RGB PIL image (for previews and tests)."""
    arr = ((t.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def prepare(
    image: Image.Image,
    bucket_hw: tuple[int, int],
    crop: str = "random",
    flip: bool = False,
    rng: np.random.Generator | None = None,
    upscale: bool = True,
    original_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Resize to cover the bucket, crop to it, optionally flip; return pixels and the conditioning.

    image: an RGB PIL image (see `load_image`).
    bucket_hw: (H, W) of the bucket, the size of the returned tensor.
    crop: "random" (offset uniform over the excess along the longer axis, paper Algorithm 1; needs
      `rng`, a fresh default generator is used when it is None) or "center".
    flip: mirror horizontally (the caller draws this; the crop coordinate is mirrored too, see the
      module docstring).
    upscale: when False, an image smaller than the bucket (it would need enlarging to cover it) raises
      ImageError; `ImageCaptionDataset` filters such images at scan time instead, so this is a guard.
    original_size: the true (h, w) to record when the file on disk was already resized (a manifest that
      knows the pre-upscale size); default: the image's own size.

    Returns (pixels [3, H, W] float in [-1, 1], cond) with cond = {"original_size": (h, w),
    "crop_top_left": (top, left), "target_size": (H, W), "resized_size": (rh, rw), "flipped": bool}.
    """
    if crop not in ("random", "center"):
        raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
    bh, bw = int(bucket_hw[0]), int(bucket_hw[1])
    w, h = image.size
    if original_size is None:
        original_size = (h, w)
    if not upscale and max(bh / h, bw / w) > 1.0:
        raise ImageError(None, f"image {h}x{w} is smaller than bucket {bh}x{bw} and upscale=False")
    rh, rw = cover_size(h, w, (bh, bw))
    if (rh, rw) != (h, w):
        image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    excess_h, excess_w = rh - bh, rw - bw
    if crop == "center":
        top, left = excess_h // 2, excess_w // 2
    else:
        if rng is None:
            rng = np.random.default_rng()
        top = int(rng.integers(0, excess_h + 1)) if excess_h > 0 else 0
        left = int(rng.integers(0, excess_w + 1)) if excess_w > 0 else 0
    image = image.crop((left, top, left + bw, top + bh))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = rw - bw - left
    cond = {
        "original_size": (int(original_size[0]), int(original_size[1])),
        "crop_top_left": (int(top), int(left)),
        "target_size": (bh, bw),
        "resized_size": (rh, rw),
        "flipped": bool(flip),
    }
    return pil_to_tensor(image), cond


def prepare_mask(mask: Image.Image, cond: dict[str, Any]) -> torch.Tensor:
    """Apply the resize, crop and flip that `prepare` gave an image (its returned `cond`) to that image's
    loss mask (a greyscale image of the same size). Returns [1, H, W] float in [0, 1]."""
    rh, rw = cond["resized_size"]
    bh, bw = cond["target_size"]
    top, left = cond["crop_top_left"]
    if cond["flipped"]:  # `prepare` records the mirrored crop coordinate; undo that to cut the same box
        left = rw - bw - left
    mask = mask.convert("L")
    if mask.size != (rw, rh):
        mask = mask.resize((rw, rh), Image.Resampling.BILINEAR)
    mask = mask.crop((left, top, left + bw, top + bh))
    if cond["flipped"]:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
