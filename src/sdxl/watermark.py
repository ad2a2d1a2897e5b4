"""The official SDXL invisible watermark (optional extra: `pip install "sdxl[watermark]"`).

Stability's reference code marks saved images with a fixed 48-bit message, 0xB3EC907BB19E, embedded with the
`invisible-watermark` package's "dwtDct" method; detection counts matching bits (sgm's scripts/demo/detect.py:
<= 27 none, 28-33 partial, 34-35 likely, >= 36 very likely). Off by default here (`--watermark`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MESSAGE = 0xB3EC907BB19E
BITS = [int(b) for b in format(MESSAGE, "048b")]
MIN_SIDE = 256  # dwtDct needs enough blocks; diffusers skips smaller images too


class WatermarkUnavailable(RuntimeError):
    pass


def _lib():
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder  # lazy: the optional watermark extra
    except ImportError:
        raise WatermarkUnavailable(
            "the invisible watermark needs the optional extra: pip install 'sdxl[watermark]'"
        ) from None
    return WatermarkEncoder, WatermarkDecoder


def apply_watermark(image: Image.Image) -> Image.Image:
    """Embed the 48-bit SDXL message (images smaller than 256 px on a side are returned unchanged)."""
    encoder_cls, _ = _lib()
    if min(image.size) < MIN_SIDE:
        return image
    enc = encoder_cls()
    enc.set_watermark("bits", BITS)
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    out = enc.encode(bgr, "dwtDct")
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)[:, :, ::-1])


def detect_watermark(image: Image.Image) -> dict:
    """{"matched_bits": n of 48, "verdict": ...} following sgm's detect.py thresholds."""
    _, decoder_cls = _lib()
    if min(image.size) < MIN_SIDE:
        return {"matched_bits": None, "verdict": "image too small to carry the watermark"}
    dec = decoder_cls("bits", 48)
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    bits = dec.decode(bgr, "dwtDct")
    n = int(sum(int(a) == b for a, b in zip(bits, BITS)))
    verdict = ("no watermark" if n <= 27 else "partial match" if n <= 33 else "likely watermarked" if n <= 35
               else "very likely watermarked")
    return {"matched_bits": n, "verdict": verdict}
