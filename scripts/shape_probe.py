"""Where a shapes model loses the shape: three probes, printed as JSON (docs/ABLATION.md, fourth session).

    python scripts/shape_probe.py MODEL.safetensors [--n 16] [--grid OUT.png] [--probes text,swap,sdedit,x0]

1. text: how much of the text context varies when only the shape word, the object colour or the background
   colour of "a large red circle on a blue background" changes (variance across the words over the mean
   square, per token position, and for the pooled vector). A word the towers do not pass on cannot steer
   the UNet.
2. swap: the same seed with each shape word in turn: how often the detector reads the asked shape, and how
   many different shapes it reads per seed (--grid saves the first four seeds' images).
3. sdedit: prompt accuracy of img2img from a real render of the prompt at strengths 0.3 / 0.5 / 0.7 / 0.9:
   where in the noise range the model stops keeping a shape it is given.
4. x0 (fifth session; not run by default): a real render's latents noised to level t, one UNet call (CFG 5),
   decoded and scored: down to which noise level the UNet recovers the shape it is shown; with the VAE alone
   and the VAE on latents plus noise of std 0.1 / 0.2 / 0.4 for reference.
"""

from __future__ import annotations

import argparse
import json

import torch
from PIL import Image

from sdxl.data.evaluate import detect_objects, prompt_accuracy
from sdxl.data.shapes import COLORS, SHAPES, eval_prompts, render_scene
from sdxl.pipeline import SDXL, from_pil, to_pil
from sdxl.request import GenerationRequest

TEMPLATE = "a large {colour} {shape} on a {background} background"


def text_variation(pipe: SDXL) -> dict[str, dict[str, object]]:
    out = {}
    fmt = TEMPLATE.format
    variants = {
        "shape": [fmt(colour="red", shape=s, background="blue") for s in SHAPES],
        "colour": [fmt(colour=c, shape="circle", background="blue") for c in COLORS if c != "blue"],
        "background": [fmt(colour="red", shape="circle", background=c) for c in COLORS if c != "red"],
    }
    for name, prompts in variants.items():
        ctx, pooled = pipe.encode_prompt(prompts)
        between = (ctx - ctx.mean(0, keepdim=True)).pow(2).mean(0).mean(-1)
        total = ctx.pow(2).mean(0).mean(-1)
        ratio = (between / total)[:12]
        p_between = (pooled - pooled.mean(0, keepdim=True)).pow(2).mean()
        out[name] = {
            "context_by_position": [round(float(r), 3) for r in ratio],
            "pooled": round(float(p_between / pooled.pow(2).mean()), 4),
        }
    return out


def generate(pipe: SDXL, prompt: str, seed: int, **kw) -> Image.Image:
    req = GenerationRequest(prompt=prompt, width=256, height=256, steps=20, cfg=5.0, seed=seed, **kw)
    return pipe.generate(req).images[0]


def shape_swap(pipe: SDXL, seeds: range, grid: str | None) -> dict[str, float]:
    read, asked, rows = [], 0, []
    for seed in seeds:
        row = []
        for s in SHAPES:
            img = generate(pipe, TEMPLATE.format(colour="red", shape=s, background="blue"), seed)
            dets = [d for d in detect_objects(img) if d.color == "red"]
            got = dets[0].shape if dets else None
            read.append((seed, s, got))
            asked += int(got == s)
            row.append(img)
        if len(rows) < 4:
            rows.append(row)
    per_seed = {}
    for seed, _, got in read:
        per_seed.setdefault(seed, []).append(got)
    distinct = [len(set(v)) / len(SHAPES) for v in per_seed.values()]
    if grid:
        side = 128
        canvas = Image.new("RGB", (side * len(SHAPES), side * len(rows)))
        for r, row in enumerate(rows):
            for c, img in enumerate(row):
                canvas.paste(img.resize((side, side)), (c * side, r * side))
        canvas.save(grid)
    return {"asked_shape_read": asked / len(read), "distinct_shapes_per_seed": sum(distinct) / len(distinct)}


def sdedit(pipe: SDXL, n: int) -> dict[str, dict[str, float]]:
    prompts = eval_prompts("single", n, 999)
    out = {}
    for strength in (0.3, 0.5, 0.7, 0.9):
        totals: dict[str, int] = {}
        for i, (prompt, spec) in enumerate(prompts):
            real = render_scene(spec, 256, 256)
            img = generate(pipe, prompt, i, init_image=real, strength=strength)
            for k, v in prompt_accuracy(img, spec).items():
                totals[k] = totals.get(k, 0) + int(v)
        out[str(strength)] = {k: round(v / n, 3) for k, v in totals.items() if k != "relation_ok"}
    return out


def one_step_x0(pipe: SDXL, n: int, levels=(50, 150, 300, 450, 600, 800)) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, int]] = {}

    def score(key: str, latents: torch.Tensor, spec) -> None:
        got = prompt_accuracy(to_pil(pipe.decode(latents))[0], spec)
        row = totals.setdefault(key, {})
        for k in ("colour_ok", "shape_ok", "count_ok"):
            row[k] = row.get(k, 0) + int(got[k])

    for i, (prompt, spec) in enumerate(eval_prompts("single", n, 0)):
        x0 = pipe.encode(from_pil(render_scene(spec, 256, 256), 256, 256))
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
        score("vae", x0, spec)
        for std in (0.1, 0.2, 0.4):
            score(f"vae+noise{std}", x0 + std * eps, spec)
        req = GenerationRequest(prompt=prompt, width=256, height=256, steps=20, cfg=5.0, seed=i,
                                schedule="trailing")
        cond, uncond = pipe.text_conditioning(req, 1)
        denoiser = pipe.make_denoiser(cond, uncond, req, pipe.sigmas_for(req))
        for t in levels:
            sigma = pipe.schedule.t_to_sigma(torch.tensor([t]))  # the sampler's sigma for training level t
            score(f"t{t}", denoiser(x0 + sigma * eps, sigma), spec)
    return {key: {k: round(v / n, 3) for k, v in row.items()} for key, row in totals.items()}


PROBES = {
    "text": lambda pipe, a: text_variation(pipe),
    "swap": lambda pipe, a: shape_swap(pipe, range(a.n), a.grid),
    "sdedit": lambda pipe, a: sdedit(pipe, a.n),
    "x0": lambda pipe, a: one_step_x0(pipe, a.n),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=16, help="prompts for the sdedit probe, seeds for the swap")
    ap.add_argument("--grid", default=None, help="save the shape-swap images here (rows: seeds)")
    ap.add_argument("--probes", default="text,swap,sdedit", help=f"comma-separated, of {', '.join(PROBES)}")
    a = ap.parse_args()
    names = [p.strip() for p in a.probes.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROBES]
    if unknown:
        ap.error(f"unknown probe(s) {unknown}; known: {', '.join(PROBES)}")
    torch.manual_seed(0)
    pipe = SDXL.load(a.model)
    with torch.no_grad():
        result = {name: PROBES[name](pipe, a) for name in names}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
