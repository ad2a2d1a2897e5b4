"""The crop-conditioning demonstration of docs/ABLATION.md: the same prompt and seed sampled at crop
(top, left) = (0, 0) and at large crops, plus the size-conditioning counterpart (original size small vs
native), one row per prompt.

    python scripts/crop_demo.py [MODEL] [OUT.png]
"""

from __future__ import annotations

import sys

from PIL import Image, ImageDraw

from sdxl.cli import default_model_path
from sdxl.pipeline import load
from sdxl.request import GenerationRequest

PROMPTS = ("a large red circle on a blue background", "a large yellow star on a purple background",
           "a large white square left of a small green circle on a black background")
CROPS = ((0, 0), (0, 96), (96, 0), (96, 96))
ORIGINAL = (64, 256)  # size conditioning: small (upscaled, soft) vs native


def main(model: str | None = None, out: str = "docs/crop_demo.png") -> None:
    pipe = load(model or default_model_path("base"))
    side = pipe.config.sample_size
    cols = [f"crop {c}" for c in CROPS] + [f"orig {o}" for o in ORIGINAL]
    grid = Image.new("RGB", (side * len(cols), (side + 16) * len(PROMPTS) + 16), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(cols):
        draw.text((j * side + 4, 2), name, fill="black")
    for i, prompt in enumerate(PROMPTS):
        variants = [dict(crop_top=t, crop_left=left) for t, left in CROPS]
        variants += [dict(original_width=o, original_height=o) for o in ORIGINAL]
        for j, kw in enumerate(variants):
            req = GenerationRequest(prompt=prompt, width=side, height=side, steps=20, seed=7,
                                    schedule="trailing", **kw)
            grid.paste(pipe.generate(req).images[0], (j * side, 16 + i * (side + 16)))
        draw.text((4, 16 + i * (side + 16) + side + 2), prompt, fill="black")
    grid.save(out)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
