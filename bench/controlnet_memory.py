"""Memory of one SDXL ControlNet unit: ours (sdxl.models.controlnet) against diffusers' ControlNetModel.

1. Parameters: both models built on the meta device from the real SDXL sizes (diffusers: `from_unet` of the
   SDXL base UNet config; ours: `ControlNetConfig(UNetConfig.base())`, plain and union/ProMax with 8 control
   types), counted, and shown as fp16 bytes.
2. Activations: one forward pass of the full-size model (random bf16 weights, so the activations have fp16's
   2 bytes) at a small latent size on the CPU, CFG batch 2, under a TorchDispatchMode that adds up the bytes
   of every live storage the pass creates (weights and inputs are not counted; the residuals it returns are,
   as the UNet holds them while it runs). The peak, measured at two sizes, is extrapolated to a 1024x1024
   image (128x128 latents) in proportion to the pixels (convolution activations; the attention kernels are
   SDPA in both implementations).

    python bench/controlnet_memory.py [--latents 16 32] [--threads 1]

Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import platform
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdxl.models.conditioning import micro_conditioning  # noqa: E402
from sdxl.models.config import UNetConfig  # noqa: E402
from sdxl.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402
from sdxl.weights.diffusers_layout import unet_diffusers_config  # noqa: E402

MB = 2**20


class PeakTracker(TorchDispatchMode):
    """Live bytes of the storages created under the mode (a storage counts until its last tensor dies)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.refs: dict[int, list[int]] = {}  # data_ptr -> [nbytes, live tensors]

    def _release(self, ptr: int) -> None:
        entry = self.refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if ptr in self.refs:
                self.refs[ptr][1] += 1
            elif ptr in inputs or n == 0:
                continue  # a view of a weight or an input (not ours to count)
            else:
                self.refs[ptr] = [n, 1]
                self.live += n
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, ptr)
        return out


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def diffusers_controlnet(device: str):
    from diffusers import ControlNetModel, UNet2DConditionModel  # lazy: the reference implementation

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_diffusers_config(UNetConfig.base()))
        cn = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return cn if device == "meta" else cn.to_empty(device=device)


def ours_controlnet(device: str, union: int = 0):
    with torch.device("meta"):
        m = ControlNet(ControlNetConfig(unet=UNetConfig.base(), union_types=union))
    return m if device == "meta" else m.to_empty(device=device)


def fill_(m: torch.nn.Module, dtype) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    m.to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02, generator=g)
    return m.eval().requires_grad_(False)


def inputs(latent: int, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent, latent, generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 2048, generator=g).to(dtype)
    pooled = torch.randn(2, 1280, generator=g).to(dtype)
    time_ids = torch.tensor([[1024.0, 1024.0, 0, 0, 1024.0, 1024.0]] * 2).to(dtype)
    hint = torch.rand(2, 3, latent * 8, latent * 8, generator=g).to(dtype)
    return x, t, ctx, pooled, time_ids, hint


def run_once(impl: str, model: torch.nn.Module, x, t, ctx, pooled, time_ids, hint, y):
    """One CFG-batch forward. Ours gets the one-row hint the pipeline passes (its features broadcast over the
    batch); diffusers' pipeline repeats the control image for both CFG halves."""
    if impl == "ours":
        return model(x, t, ctx, y, hint[:1])
    kw = {"text_embeds": pooled, "time_ids": time_ids}
    return model(x, t, ctx, hint, added_cond_kwargs=kw, return_dict=False)


def measure(run) -> tuple[float, float, float]:
    """(peak MiB, MiB still held after the pass, seconds)"""
    gc.collect()
    tracker = PeakTracker()
    t0 = time.perf_counter()
    with torch.no_grad(), tracker:
        out = run()
    seconds = time.perf_counter() - t0
    held = tracker.live
    del out
    gc.collect()
    return tracker.peak / MB, held / MB, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    import diffusers  # lazy: the reference implementation

    rows = [("ours, ControlNet", n_params(ours_controlnet("meta"))),
            ("ours, union/ProMax (8 types)", n_params(ours_controlnet("meta", union=8))),
            ("diffusers ControlNetModel", n_params(diffusers_controlnet("meta")))]
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {cpu}, {args.threads} thread(s), "
          f"activations in {args.dtype}\n")
    print("| model | parameters | fp16 bytes |\n|---|---:|---:|")
    for name, n in rows:
        print(f"| {name} | {n:,} | {n * 2 / MB:,.1f} MiB |")

    results: dict[str, dict[int, tuple[float, float, float]]] = {"ours": {}, "diffusers": {}}
    for impl in ("ours", "diffusers"):
        model = fill_(ours_controlnet("cpu") if impl == "ours" else diffusers_controlnet("cpu"), dtype)
        for lat in args.latents:
            x, t, ctx, pooled, time_ids, hint = inputs(lat, dtype)  # made before measuring: not counted
            y = micro_conditioning(pooled.float(), time_ids.float(), 256).to(dtype)
            results[impl][lat] = measure(functools.partial(run_once, impl, model, x, t, ctx, pooled, time_ids,
                                                           hint, y))
        del model
        gc.collect()

    print("\n| latent (image) | ours peak | ours held after | diffusers peak | diffusers held after "
          "| ours s | diffusers s |\n|---|---:|---:|---:|---:|---:|---:|")
    for lat in args.latents:
        o, d = results["ours"][lat], results["diffusers"][lat]
        print(f"| {lat}x{lat} ({lat * 8}px) | {o[0]:.1f} MiB | {o[1]:.1f} MiB | {d[0]:.1f} MiB "
              f"| {d[1]:.1f} MiB | {o[2]:.1f} | {d[2]:.1f} |")
    big = max(args.latents)
    k = (128 / big) ** 2
    o, d = results["ours"][big], results["diffusers"][big]
    print(f"\nExtrapolated to 128x128 latents (1024x1024), x{k:.0f} from {big}x{big}: "
          f"ours peak {o[0] * k:,.0f} MiB, held {o[1] * k:,.0f} MiB; "
          f"diffusers peak {d[0] * k:,.0f} MiB, held {d[1] * k:,.0f} MiB.")


if __name__ == "__main__":
    main()
