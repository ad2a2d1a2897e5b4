"""How long a process takes to start generating with `sdxl.load(..., compile=True)`, cold and warm.

    python bench/compile_start.py MODEL.safetensors [--cache-dir DIR] [--steps 3 --size 64]

Loads the model compiled (`torch.compile` of the UNet over the on-disk Inductor cache of
`sdxl.models.fast.enable_compile_cache`), generates one image twice (the first call compiles, or loads the
kernels from the cache), then the same request eagerly with `fast=False`, and prints the times and the
difference of the two images. Run it twice with the same --cache-dir: the second process finds the cache.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import sdxl
from sdxl.request import GenerationRequest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--cache-dir", default=None, help="Inductor cache (default: $TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir
    torch.set_num_threads(args.threads)
    req = GenerationRequest(prompt="a red cube", seed=7, steps=args.steps, width=args.size, height=args.size,
                            sampler="euler")
    t0 = time.perf_counter()
    pipe = sdxl.load(args.model, compile=True)
    t1 = time.perf_counter()
    compiled = pipe.generate(req)
    t2 = time.perf_counter()
    pipe.generate(req)
    t3 = time.perf_counter()
    eager = sdxl.load(args.model, fast=False).generate(req)
    diff = np.abs(np.asarray(compiled.images[0], dtype=int) - np.asarray(eager.images[0], dtype=int)).max()
    rel = ((compiled.latents - eager.latents).abs().max() / eager.latents.abs().max()).item()
    print(f"load {t1 - t0:.1f} s; first generate (compile or cache) {t2 - t1:.1f} s; second {t3 - t2:.2f} s; "
          f"against eager: 8-bit max diff {diff}, latents max rel diff {rel:.1e}")


if __name__ == "__main__":
    main()
