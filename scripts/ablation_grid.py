"""Sample grid of the Table 2 ablation: one row per variant of scripts/ablation.sh, one column per held-out
prompt, all with the same seeds (original size = training size, as the table is sampled).

    python scripts/ablation_grid.py WORKDIR OUT.png [--seed-dir s0] [--size 128] [--n 6]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from sdxl.data.shapes import eval_prompts, render_scene
from sdxl.pipeline import SDXL
from sdxl.request import GenerationRequest

VARIANTS = [("only-large", "only >= 128 px"), ("nocond", "no size cond."), ("sizecond", "size cond.")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("out")
    ap.add_argument("--seed-dir", default="s0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=6)
    a = ap.parse_args()
    prompts = eval_prompts("single", a.n, 0)
    label_w, s = 110, a.size
    rows = [("renders", [render_scene(spec, s, s) for _, spec in prompts])]
    for v, label in VARIANTS:
        path = Path(a.work) / f"{v}-{a.seed_dir}" / "model.safetensors"
        pipe = SDXL.load(path)
        images = []
        for i, (prompt, _) in enumerate(prompts):
            req = GenerationRequest(prompt=prompt, width=s, height=s, steps=12, cfg=5.0, seed=i,
                                    original_width=s, original_height=s)
            images.append(pipe.generate(req).images[0])
        rows.append((label, images))
    grid = Image.new("RGB", (label_w + s * a.n, s * len(rows)), "white")
    d = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        d.text((4, r * s + s // 2 - 6), label, fill="black")
        for c, im in enumerate(images):
            grid.paste(im, (label_w + c * s, r * s))
    grid.save(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
