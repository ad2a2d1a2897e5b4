"""Tiny captioned image folders (kohya layout) shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def coloured_squares(folder: Path) -> Path:
    """Four 32 px images: a red, green, blue and yellow square (shifted by one pixel each) on light grey."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]):
        a = np.full((32, 32, 3), 235, np.uint8)
        a[8 + i:24, 8:24] = colour
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"square number {i}")
    return folder


def random_boxes(folder: Path) -> Path:
    """Eight 32 px images: one 16 px box of a random colour at a random place (seed 0) on light grey."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        a = np.full((32, 32, 3), 230, np.uint8)
        top, left = rng.integers(0, 16, size=2)
        a[top:top + 16, left:left + 16] = rng.integers(0, 255, size=3)
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture {i}")
    return folder
