"""The optional invisible watermark: the official 48-bit message, detected by `sdxl info`."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sdxl.cli import app
from sdxl.watermark import BITS, apply_watermark, detect_watermark


def test_message_is_the_official_one():
    assert len(BITS) == 48 and int("".join(map(str, BITS)), 2) == 0xB3EC907BB19E


def test_embed_detect_and_info(tmp_path):
    rng = np.random.default_rng(0)  # a photo-like image: smooth colour gradients plus sensor-like noise
    yy, xx = np.mgrid[0:512, 0:512] / 512
    arr = np.stack([120 + 80 * xx, 100 + 60 * yy, 140 - 50 * xx * yy], -1) + rng.normal(0, 8, (512, 512, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    assert detect_watermark(img)["matched_bits"] <= 33
    marked = apply_watermark(img)
    assert detect_watermark(marked)["matched_bits"] >= 36
    assert np.abs(np.asarray(marked, float) - np.asarray(img, float)).mean() < 3  # invisible-ish
    p = tmp_path / "m.png"
    marked.save(p)
    res = CliRunner().invoke(app, ["info", str(p)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["watermark"]["verdict"] == "very likely watermarked"


def test_small_images_are_left_alone():
    img = Image.new("RGB", (128, 128), (10, 20, 30))
    assert apply_watermark(img) is img
