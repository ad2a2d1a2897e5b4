"""Child process of the benchmark's product-path section (`python bench/bench.py --cpu --components product`):
load one single-file SDXL checkpoint and make one txt2img image, timing the load and the generate call.

    python bench/product_child.py diffusers MODEL.safetensors CONFIG_DIR OUT.png [--size 256 --steps 4 ...]
    python bench/product_child.py ours MODEL.safetensors - OUT.png [...]

`diffusers`: `StableDiffusionXLPipeline.from_single_file(MODEL, config=CONFIG_DIR)` (a diffusers folder with
configs and tokenizers only, so nothing is downloaded), float32, its default Euler scheduler ("leading"),
`pipe(prompt, ...)`. This branch imports nothing of ours. `ours`: `sdxl.load(MODEL)` and
`pipe.generate(GenerationRequest(...))` with the same sampler, schedule, guidance and seed.
Prints one JSON line: {"load_s": ..., "generate_s": ..., "peak_gib": ...} (the generate call includes text
encoding, the sampling steps and the VAE decode, as each library runs them; peak_gib is the process's peak
resident memory, which counts the pages of a memory-mapped file it touched).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch


def run_diffusers(args: argparse.Namespace) -> tuple[float, float]:
    from diffusers import StableDiffusionXLPipeline  # lazy: only this branch needs it

    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_single_file(
        args.model, config=args.config, local_files_only=True, torch_dtype=torch.float32,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    t1 = time.perf_counter()
    image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.cfg, width=args.size,
                 height=args.size, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    t2 = time.perf_counter()
    image.save(args.out)
    return t1 - t0, t2 - t1


def run_ours(args: argparse.Namespace) -> tuple[float, float]:
    import sdxl  # lazy: only this branch needs it
    from sdxl.request import GenerationRequest

    t0 = time.perf_counter()
    pipe = sdxl.load(args.model, fast=not args.no_fast)
    t1 = time.perf_counter()
    req = GenerationRequest(prompt=args.prompt, seed=args.seed, steps=args.steps, width=args.size,
                            height=args.size, cfg=args.cfg, sampler="euler", schedule="leading")
    image = pipe.generate(req).images[0]
    t2 = time.perf_counter()
    image.save(args.out)
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("impl", choices=["ours", "diffusers"])
    p.add_argument("model")
    p.add_argument("config", help="diffusers config folder (diffusers only; '-' for ours)")
    p.add_argument("out")
    p.add_argument("--prompt", default="a photo of a red cube on a blue table, studio light")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-fast", action="store_true", help="ours: the literal modules (sdxl.load fast=False)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_s, generate_s = (run_diffusers if args.impl == "diffusers" else run_ours)(args)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(json.dumps({"load_s": round(load_s, 3), "generate_s": round(generate_s, 3),
                      "peak_gib": round(peak_gib, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
