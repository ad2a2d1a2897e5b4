"""`sdxl bench`: how fast are our SDXL models, and how do they compare with diffusers on the same weights?

Builds the full-size models with random weights (no download) on one device and measures
  - the UNet step: one CFG forward (batch 2) at a 128x128 latent (1024x1024 image), for each precision
    and optimisation mode, with TFLOP/s from a FLOP count (torch.utils.flop_counter, counted once) and peak
    memory;
  - text encoding (CLIP-L + bigG, prompt and negative prompt);
  - VAE decode of one 1024x1024 image;
  - end to end: `SDXL.generate` on one request (text encoding + 30 Euler steps with CFG + VAE decode), what
    the Python API runs; diffusers' `StableDiffusionXLPipeline` on the same request;
  - quality: images of the fast modes against the eager float32 image at the same seed (PSNR, 8-bit), each
    made by `SDXL.generate` with that mode's UNet;
  - the product path (`--components product`, CPU): `sdxl generate` against a script calling diffusers'
    `from_single_file` on the same full-size file, as whole processes (load included), and each library's
    generate call alone;
and, when diffusers (and transformers) are installed, the same for them in the same process: their modules
are built on the meta device and take OUR tensors (`load_state_dict(assign=True)` after the key conversion in
`sdxl.weights.diffusers_layout`), so the weights are identical and held once.

GPU times come from CUDA events (median of the timed calls), CPU times from the wall clock (the minimum
over interleaved rounds: other processes share the CPU, and the minimum is the least disturbed run). The
results are printed as a table and appended to bench/RESULTS.md (date, card or CPU, versions, the command).

Presets: `--cpu` is the CPU comparison (full-size UNet at a 32x32 latent, batch 2, float32 and bfloat16
where the CPU has native bf16). Without it, on a GPU, every mode runs; `--budget-s` skips the optional steps
(compiles) that would not fit in the time left, so one call fits a short GPU lease.

Run: `python bench/bench.py --cpu`, `python -m sdxl.bench`, or `sdxl bench` (all call `main(argv)`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from sdxl.models import fast
from sdxl.models.conditioning import micro_conditioning
from sdxl.models.config import ModelConfig, UNetConfig, VAEConfig, tiny_config
from sdxl.models.factory import build_modules
from sdxl.models.text import CLIPTextTower, TextEncoders
from sdxl.models.unet import BasicTransformerBlock, UNet
from sdxl.models.vae import AutoencoderKL
from sdxl.pipeline import SDXL
from sdxl.request import GenerationRequest
from sdxl.tokenizer import write_hf_tokenizer_files
from sdxl.weights.checkpoint import (
    Checkpoint,
    random_checkpoint,
    text_config_to_hf,
    write_diffusers,
    write_single_file,
)
from sdxl.weights.diffusers_layout import (
    unet_diffusers_config,
    unet_sgm_to_diffusers,
    vae_diffusers_config,
    vae_sgm_to_diffusers,
)
from sdxl.weights.text_layout import ours_to_hf_clip

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENS = 77
SCALE_FACTOR = VAEConfig().scale_factor
DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"
ARTIFACTS = "sdxl-unet.compile-artifacts"  # torch.compiler.save_cache_artifacts output, in --cache-dir

# ---------------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = fields.get("Model name", "").strip()
        cores = fields.get("CPU(s)", "").strip()
        if name:
            return f"{name} ({cores} CPUs)" if cores else name
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


# ---------------------------------------------------------------------------------------------------------
# Timing, memory, FLOPs
# ---------------------------------------------------------------------------------------------------------


class Clock:
    """Per-call times in ms: CUDA events on a GPU (no host sync in the timed loop), wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def samples(self, fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in events]
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
        return times

    def summary(self, samples: list[float]) -> float:
        return statistics.median(samples) if self.cuda else min(samples)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset (None on a CPU: see `process_peak_gib`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def process_peak_gib() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def count_flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call (matmuls, convolutions and attention, as PyTorch counts them)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def profile_summary(fn: Callable[[], object], device: torch.device, top: int = 8) -> str:
    """Where one call's time goes: the `top` operators (CPU) or GPU kernels by their own time, in percent."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        fn()
        with profile(activities=activities) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
    events = prof.key_averages()

    def own(e) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    total = sum(own(e) for e in events) or 1.0
    ranked = sorted(events, key=own, reverse=True)[:top]
    return ", ".join(f"{e.key[:48]} {100 * own(e) / total:.0f}%" for e in ranked)


def psnr(a: Tensor, b: Tensor, peak: float = 255.0) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def to_8bit(image: Tensor) -> Tensor:
    """[-1, 1] float image -> 0..255 integers, as saved in a PNG."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    impl: str  # "ours", "diffusers", "transformers"
    component: str  # "unet", "text", "vae", "e2e", "quality", "compile"
    mode: str
    dtype: str
    ms: float | None = None
    tflops: float | None = None
    peak_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


class Report:
    def __init__(self, json_path: Path | None):
        self.rows: list[Row] = []
        self.json_path = json_path

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        parts = [f"{row.component:8s} {row.impl:12s} {row.dtype:5s} {row.mode:34s}"]
        if row.ms is not None:
            parts.append(f"{row.ms:10.2f} ms")
        if row.tflops is not None:
            parts.append(f"{row.tflops:7.2f} TFLOP/s")
        if row.peak_gib is not None:
            parts.append(f"peak {row.peak_gib:6.2f} GiB")
        if row.note:
            parts.append(row.note)
        print("  ".join(parts), flush=True)
        if self.json_path is not None:  # one line per result as it comes: a run cut short keeps what it had
            with open(self.json_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(row)) + "\n")
        return row

    def find(self, impl: str, component: str, mode: str, dtype: str | None = None) -> Row | None:
        for r in self.rows:
            if (r.impl, r.component, r.mode) == (impl, component, mode) and dtype in (None, r.dtype):
                return r
        return None

    def markdown(self) -> str:
        lines = ["| component | impl | dtype | mode | ms | TFLOP/s | peak GiB | note |",
                 "|---|---|---|---|---:|---:|---:|---|"]

        def f(v, digits):
            return "" if v is None else f"{v:.{digits}f}"

        for r in self.rows:
            ms = f(r.ms, 1 if (r.ms or 0) >= 100 else 2)
            tf = f(r.tflops, 1 if (r.tflops or 0) >= 10 else 2)
            lines.append(f"| {r.component} | {r.impl} | {r.dtype} | {r.mode} | {ms} | {tf} | "
                         f"{f(r.peak_gib, 2)} | {r.note} |")
        return "\n".join(lines)


def ratio_lines(report: Report) -> list[str]:
    """Ours vs diffusers in the same precision and comparable mode (< 1 means ours is faster)."""
    out = []
    pairs = [("eager", "eager"), ("fused+channels_last", "fused+channels_last"),
             ("fused+channels_last+onednn", "fused+channels_last")]
    for r in report.rows:
        if r.impl != "ours" or r.component != "unet" or r.ms is None:
            continue
        for ours_mode, their_mode in pairs:
            if r.mode != ours_mode:
                continue
            t = report.find("diffusers", "unet", their_mode, r.dtype)
            if t is not None and t.ms:
                out.append(f"UNet {r.dtype}: ours [{ours_mode}] / diffusers [{their_mode}] = "
                           f"{r.ms / t.ms:.3f} ({r.ms:.1f} ms vs {t.ms:.1f} ms)")
    best = {}
    for impl in ("ours", "diffusers"):
        for dt in {r.dtype for r in report.rows}:
            cand = [r for r in report.rows
                    if r.impl == impl and r.component == "unet" and r.dtype == dt and r.ms]
            if cand:
                best[(impl, dt)] = min(cand, key=lambda r: r.ms)
    for (impl, dt), r in sorted(best.items()):
        if impl == "ours" and ("diffusers", dt) in best:
            t = best[("diffusers", dt)]
            out.append(f"UNet {dt} best vs best: ours [{r.mode}] {r.ms:.1f} ms / diffusers [{t.mode}] "
                       f"{t.ms:.1f} ms = {r.ms / t.ms:.3f}")
    return out


def append_results(path: Path, report: Report, device: torch.device, command: str, notes: list[str]) -> None:
    v = versions()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = [
        "",
        f"## {stamp} — {device_name(device)}",
        "",
        f"- device: `{device.type}`; torch {v['torch']}, diffusers {v['diffusers']}, "
        f"transformers {v['transformers']}, Python {v['python']}"
        + (f", CUDA {v['cuda']}" if "cuda" in v else ""),
        f"- command: `{command}`",
        "- timing: " + ("CUDA events, median" if device.type == "cuda"
                        else "wall clock, min over interleaved rounds"),
    ]
    text += [f"- {n}" for n in notes]
    text += ["", report.markdown(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(text))


# ---------------------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------------------


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The official SDXL base sizes, or the miniature test model with `--tiny`."""
    return tiny_config() if args.tiny else ModelConfig.base()


def build(cls, cfg, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A full-size module with PyTorch's default random initialisation, built directly on `device`."""
    with torch.device(device):
        m = cls(cfg)
    return m.to(dtype).eval().requires_grad_(False)


def diffusers_unet(ours: nn.Module) -> nn.Module | None:
    """diffusers' UNet2DConditionModel holding our UNet's tensors (no copy), or None without diffusers."""
    try:
        from diffusers import UNet2DConditionModel  # lazy: optional dependency
    except ImportError:
        return None
    with torch.device("meta"):
        theirs = UNet2DConditionModel.from_config(unet_diffusers_config(ours.cfg))
    theirs.load_state_dict(unet_sgm_to_diffusers(ours.state_dict(), ours.cfg), assign=True, strict=True)
    _check_materialised(theirs)
    return theirs.eval().requires_grad_(False)


def diffusers_vae(ours: nn.Module) -> nn.Module | None:
    try:
        from diffusers import AutoencoderKL  # lazy: optional dependency
    except ImportError:
        return None
    with torch.device("meta"):
        theirs = AutoencoderKL.from_config(vae_diffusers_config(ours.cfg))
    theirs.load_state_dict(vae_sgm_to_diffusers(ours.state_dict(), ours.cfg), assign=True, strict=True)
    _check_materialised(theirs)
    return theirs.eval().requires_grad_(False)


def transformers_text(ours: nn.Module, device: torch.device) -> nn.Module | None:
    """transformers' CLIPTextModel(WithProjection) holding our tower's tensors (None without transformers)."""
    try:
        import transformers  # lazy: optional dependency
    except ImportError:
        return None
    projection = ours.cfg.projection_dim is not None
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    config = transformers.CLIPTextConfig(**text_config_to_hf(ours.cfg, projection))
    with torch.device(device):  # small enough to build for real: its constant buffers are then valid
        theirs = cls(config)
    prefixed = any(k.startswith("text_model.") for k in theirs.state_dict())
    sd = ours_to_hf_clip(ours.state_dict(), text_model_prefix=prefixed, position_ids=False)
    theirs.load_state_dict(sd, assign=True, strict=False)
    return theirs.to(ours.dtype).eval().requires_grad_(False)


def _check_materialised(module: nn.Module) -> None:
    meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on the meta device after loading: {meta[:5]}")


@dataclass
class UNetInputs:
    x: Tensor  # [B, 4, L, L]
    t: Tensor  # [B]
    context: Tensor  # [B, 77, 2048]
    y: Tensor  # [B, 2816] = [pooled | fourier(time ids)]
    pooled: Tensor
    time_ids: Tensor  # [B, 6]

    def ours(self, unet) -> Callable[[], Tensor]:
        return lambda: unet(self.x, self.t, self.context, self.y)

    def diffusers(self, unet) -> Callable[[], Tensor]:
        cond = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return lambda: unet(self.x, self.t, self.context, added_cond_kwargs=cond, return_dict=False)[0]


def unet_inputs(cfg: UNetConfig, latent: int, batch: int, device, dtype, seed: int = 0) -> UNetInputs:
    g = torch.Generator("cpu").manual_seed(seed)
    pooled_dim = cfg.adm_in_channels - 6 * 256
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    context = torch.randn(batch, TOKENS, cfg.context_dim, generator=g)
    pooled = torch.randn(batch, pooled_dim, generator=g)
    size = float(latent * 8)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch)
    y = micro_conditioning(pooled, time_ids)
    t = torch.full((batch,), 500.0)
    def put(v: Tensor) -> Tensor:
        return v.to(device=device, dtype=dtype)

    return UNetInputs(put(x), t.to(device), put(context), put(y), put(pooled), put(time_ids))


def token_ids(batch: int, device) -> tuple[Tensor, Tensor]:
    """Token rows like the tokenizer's (BOS, 20 words, EOS, padding): CLIP-L pads with EOS, bigG with 0."""
    g = torch.Generator("cpu").manual_seed(1)
    ids_l = torch.full((batch, TOKENS), 49407, dtype=torch.long)
    ids_l[:, 0] = 49406
    ids_l[:, 1:21] = torch.randint(0, 49406, (batch, 20), generator=g)
    ids_g = ids_l.clone()
    ids_g[:, 22:] = 0
    return ids_l.to(device), ids_g.to(device)


# ---------------------------------------------------------------------------------------------------------
# Measuring groups of variants
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    impl: str
    mode: str
    fn: Callable[[], object]
    prepare: Callable[[], None] | None = None  # switch the shared modules into this variant's state


class Runner:
    def __init__(self, args: argparse.Namespace, device: torch.device, report: Report):
        self.args = args
        self.device = device
        self.clock = Clock(device)
        self.report = report
        self.t_start = time.monotonic()
        self.notes: list[str] = []  # lines for the results section (profiles)

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def fits(self, seconds: float, what: str) -> bool:
        """Whether an optional step estimated at `seconds` fits in the time budget; says so when not."""
        if self.args.budget_s is None or self.elapsed() + seconds <= self.args.budget_s:
            return True
        left = self.args.budget_s - self.elapsed()
        note = f"time budget: ~{seconds:.0f} s needed, {left:.0f} s left"
        self.report.add(Row("-", "skipped", what, "", note=note))
        return False

    def group(self, component: str, dtype: str, variants: list[Variant], flops: float | None,
              warmup: int, iters: int, rounds: int) -> dict[str, Row]:
        """Time the variants interleaved, `rounds` times round-robin (on a CPU shared with other work this
        spreads any disturbance over all of them), and add one row each."""
        samples: dict[int, list[float]] = {i: [] for i in range(len(variants))}
        peaks: dict[int, float | None] = {i: None for i in range(len(variants))}
        failed: dict[int, str] = {}
        for r in range(rounds):
            for i, v in enumerate(variants):
                if i in failed:
                    continue
                try:
                    if v.prepare is not None:
                        v.prepare()
                    reset_peak(self.device)
                    with torch.inference_mode():
                        # later rounds: one warm-up call on a GPU; none on a CPU, where the weights (GBs)
                        # never stay in cache and a repeated warm-up would only double the run time
                        later = 1 if self.clock.cuda else 0
                        samples[i] += self.clock.samples(v.fn, warmup if r == 0 else later, iters)
                except RuntimeError as e:  # e.g. an SDPA kernel that does not support these shapes
                    failed[i] = f"FAILED: {(str(e).splitlines() or [repr(e)])[0][:160]}"
                    print(f"[{component}] {v.impl} {v.mode}: {failed[i]}", flush=True)
                    continue
                peak = peak_gib(self.device)
                peaks[i] = None if peak is None else max(peaks[i] or 0.0, peak)
        rows = {}
        for i, v in enumerate(variants):
            if i in failed:
                rows[v.mode] = self.report.add(Row(v.impl, component, v.mode, dtype, note=failed[i]))
                continue
            ms = self.clock.summary(samples[i])
            tflops = flops / (ms / 1000) / 1e12 if flops else None
            note = f"n={len(samples[i])}"
            rows[v.mode] = self.report.add(Row(v.impl, component, v.mode, dtype, ms, tflops, peaks[i], note))
        return rows


# ---------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------


def set_eager_mode(unet, fused: bool, channels_last: bool, onednn: bool) -> None:
    """Switch our UNet between eager configurations in place (each switch is reversible)."""
    if fused:
        fast.fuse_qkv(unet)  # swaps the plain attention modules left, if any
    else:
        fast.unfuse_qkv(unet)
    if unet._channels_last != channels_last:
        unet.use_channels_last(channels_last)
    fast.use_onednn_linears(unet, enabled=onednn)


def set_diffusers_mode(theirs, fused: bool, channels_last: bool) -> None:
    fused_now = getattr(theirs, "original_attn_processors", None) is not None
    if fused and not fused_now:
        theirs.fuse_qkv_projections()
    elif not fused and fused_now:
        theirs.unfuse_qkv_projections()
    theirs.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def bench_unet_eager(run: Runner, unet, dname: str, inputs: UNetInputs, flops: float) -> None:
    """Ours vs diffusers, eager, in two phases: plain (contiguous weights) and optimised (channels_last +
    fused projections, + oneDNN linears on a CPU). diffusers is rebuilt around our tensors in each phase so
    that no weight is held twice."""
    args, device = run.args, run.device
    cpu = device.type == "cpu"
    use_diffusers = not args.no_diffusers
    rounds = args.rounds
    w, n = args.warmup, args.iters

    # phase 1: plain
    set_eager_mode(unet, fused=False, channels_last=False, onednn=False)
    theirs = diffusers_unet(unet) if use_diffusers else None
    variants = [Variant("ours", "eager", inputs.ours(unet))]
    if theirs is not None:
        variants.append(Variant("diffusers", "eager", inputs.diffusers(theirs)))
    if not cpu:
        variants.append(Variant("ours", "fused", inputs.ours(unet),
                                prepare=lambda: set_eager_mode(unet, True, False, False)))
        variants[0].prepare = lambda: set_eager_mode(unet, False, False, False)
    run.group("unet", dname, variants, flops, w, n, rounds)
    del theirs, variants
    gc.collect()

    # phase 2: channels_last + fused (+ oneDNN on a CPU)
    set_eager_mode(unet, fused=True, channels_last=True, onednn=False)
    theirs = diffusers_unet(unet) if use_diffusers else None
    variants = []
    if cpu and fast.onednn_linear_available():
        variants.append(Variant("ours", "fused+channels_last+onednn", inputs.ours(unet),
                                prepare=lambda: set_eager_mode(unet, True, True, True)))
    variants.append(Variant("ours", "fused+channels_last", inputs.ours(unet),
                            prepare=lambda: set_eager_mode(unet, True, True, False)))
    if theirs is not None:
        set_diffusers_mode(theirs, fused=True, channels_last=True)
        variants.append(Variant("diffusers", "fused+channels_last", inputs.diffusers(theirs)))
    if not cpu:
        for backend in args.sdpa:
            wrapped = fast.WithSDPABackend(unet, backend)
            variants.append(Variant("ours", f"fused+channels_last+sdpa={backend}", inputs.ours(wrapped),
                                    prepare=lambda: set_eager_mode(unet, True, True, False)))
    run.group("unet", dname, variants, flops, w, n, rounds)
    if args.profile:
        for v in variants[:1] + [v for v in variants if v.impl == "diffusers"]:
            if v.prepare is not None:
                v.prepare()
            line = f"profile, UNet {dname} {v.impl} [{v.mode}]: {profile_summary(v.fn, device)}"
            print(line, flush=True)
            run.notes.append(line)
    del theirs, variants
    gc.collect()
    set_eager_mode(unet, fused=False, channels_last=False, onednn=False)


# ---------------------------------------------------------------------------------------------------------
# Our pipeline around the benchmark's modules: end to end and quality run `SDXL.generate`
# ---------------------------------------------------------------------------------------------------------

PROMPT = "a photo of a red cube on a blue table, studio light"


def bench_request(args: argparse.Namespace, seed: int) -> GenerationRequest:
    """One image at the benchmark's latent size: Euler with the "leading" schedule (diffusers' SDXL default),
    guidance 5, no negative prompt (a zero unconditional embedding, as the official base pipeline)."""
    side = args.latent * 8
    return GenerationRequest(prompt=PROMPT, seed=seed, steps=args.steps, width=side, height=side, cfg=5.0,
                             sampler="euler", schedule="leading")


def bench_pipe(run: Runner, state: dict, unet: Callable, dtype: torch.dtype) -> SDXL:
    """The benchmark's modules as the `SDXL` object `sdxl.load` returns, sharing their tensors. `unet` is our
    UNet or a compiled / CUDA-graphed callable around it: `SDXL.generate` only calls it."""
    text, vae = ensure_text(run, state), ensure_vae(run, state)
    return SDXL(model_config(run.args), unet, vae, text, device=run.device, dtype=dtype,
                vae_dtype=next(vae.parameters()).dtype)


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sdxl bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU preset: UNet at a 32x32 latent, fp32 and bf16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 for the eager UNet table")
    p.add_argument("--latent", type=int, default=None, help="latent side (128 = 1024x1024 images)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    p.add_argument("--components", default=None,
                   help="comma list of unet,text,vae,compile,e2e,quality,fp8,second-start,product")
    p.add_argument("--steps", type=int, default=30, help="steps for end to end and quality")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per group")
    p.add_argument("--sdpa", default="cudnn,flash",
                   help="GPU: SDPA backends, each timed eager; compile uses them in this order")
    p.add_argument("--vae-size", type=int, default=None, help="decoded image side (default 1024; CPU 256)")
    p.add_argument("--no-diffusers", action="store_true", help="only our models")
    p.add_argument("--compile-diffusers", action="store_true", help="also torch.compile diffusers' UNet")
    p.add_argument("--budget-s", type=float, default=None, help="skip optional steps past this many seconds")
    p.add_argument("--cache-dir", default=None, help="Inductor cache folder (compile caching)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="markdown file to append to ('-' = none)")
    p.add_argument("--json", default=None, help="also write one JSON line per result here")
    p.add_argument("--note", action="append", default=[], help="a line to add to the results section")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); 1 is steadiest on a CPU shared with other work")
    p.add_argument("--profile", action="store_true",
                   help="also profile the fastest eager/compiled UNet of each implementation (top operators)")
    p.add_argument("--tiny", action="store_true", help="miniature models (smoke tests of this program)")
    p.add_argument("--from-json", default=None,
                   help="only write the results table from the JSON lines of an earlier (cut short) run")
    p.add_argument("--product-dir", default=None,
                   help="product path: where to write the random checkpoint (default: the system temp dir)")
    p.add_argument("--keep-product-files", action="store_true", help="product path: keep the checkpoint")
    p.add_argument("--second-start", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.cpu:
        args.device = "cpu"
    args.device = args.device or ("cuda" if cuda else "cpu")
    on_cpu = args.device == "cpu"
    if args.dtypes is None:
        if on_cpu:
            args.dtypes = "fp32,bf16" if fast.cpu_supports_bf16() else "fp32"
        else:
            args.dtypes = "fp16,bf16"
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}")
    if args.latent is None:
        args.latent = 32 if on_cpu else 128
    if args.components is None:
        args.components = "unet" if on_cpu else "unet,text,vae,compile,e2e,quality,fp8,second-start"
    args.components = {c.strip() for c in args.components.split(",") if c.strip()}
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 3)
    args.iters = args.iters if args.iters is not None else (1 if on_cpu else 20)
    args.rounds = args.rounds if args.rounds is not None else (3 if on_cpu else 1)
    args.vae_size = args.vae_size or (256 if on_cpu else 1024)
    args.sdpa = [s.strip() for s in args.sdpa.split(",") if s.strip()]
    return args


def results_from_json(args: argparse.Namespace, raw: list[str]) -> int:
    """Append a results section built from a JSON-lines file (e.g. of a GPU run stopped at its time limit)."""
    report = Report(None)
    for line in Path(args.from_json).read_text(encoding="utf-8").splitlines():
        if line.strip():
            report.rows.append(Row(**json.loads(line)))
    notes = [f"rebuilt from {args.from_json} (the run did not finish)"] + ratio_lines(report)
    print(report.markdown())
    if args.results != "-":
        command = "python bench/bench.py " + " ".join(shlex.quote(a) for a in raw)
        append_results(Path(args.results), report, torch.device(args.device), command, notes)
    return 0


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw)
    if args.second_start:
        return second_start(args)
    if args.from_json:
        return results_from_json(args, raw)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        args.note.append(f"CPU threads: {torch.get_num_threads()}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32 (the quality reference)
        torch.backends.cudnn.allow_tf32 = False
    if args.cache_dir:
        fast.enable_compile_cache(args.cache_dir)
    command = "python bench/bench.py " + " ".join(shlex.quote(a) for a in raw)
    json_path = Path(args.json) if args.json else None
    report = Report(json_path)
    run = Runner(args, device, report)
    v = versions()
    print(f"sdxl bench on {device_name(device)}; torch {v['torch']}, diffusers {v['diffusers']}, "
          f"transformers {v['transformers']}", flush=True)
    notes = list(args.note)
    state: dict = {}

    # In order of priority: with --budget-s, the optional later steps are skipped when time runs short.
    comps = args.components
    stages = [
        ("UNet eager", bool(comps & {"unet", "quality", "compile", "e2e", "fp8"}), run_unet_stage),
        ("text encoders", bool(comps & {"text", "e2e"}), run_text_stage),
        ("VAE eager", bool(comps & {"vae", "e2e"}), run_vae_stage),
        ("UNet compile", "compile" in comps, run_compile_stage),
        ("end to end (ours)", "e2e" in comps, run_e2e_ours),
        ("fp8", "fp8" in comps, run_fp8_stage),
        ("VAE compile", "compile" in comps and bool(comps & {"vae", "e2e"}), run_vae_compile_stage),
        ("second start", "second-start" in comps, lambda r, st: run_second_start(r, st, raw)),
        ("diffusers compile", args.compile_diffusers and "compile" in comps, run_diffusers_compile_stage),
        ("end to end (diffusers)", "e2e" in comps, run_e2e_diffusers),
        ("product path", "product" in comps, run_product_stage),
    ]
    for title, enabled, stage in stages:
        if not enabled:
            continue
        try:
            notes += stage(run, state) or []
        except KeyboardInterrupt:  # `timeout -s INT`: keep what was measured and write it out
            report.add(Row("ours", "error", title, "", note="interrupted (time limit)"))
            break
        except Exception as e:  # one failing mode must not lose the rest of a GPU lease's measurements
            traceback.print_exc()
            first = (str(e).splitlines() or [repr(e)])[0][:160]
            report.add(Row("ours", "error", title, "", note=f"FAILED: {type(e).__name__}: {first}"))
        gc.collect()

    report_quality(run, state)
    notes += run.notes
    if device.type == "cpu" and "unet" in state:
        notes.append(f"process peak resident memory {process_peak_gib():.1f} GiB (one copy of the weights: "
                     "diffusers' modules hold our tensors)")
    notes += ratio_lines(report)
    for line in ratio_lines(report):
        print(line, flush=True)
    print()
    print(report.markdown())
    if args.results != "-":
        append_results(Path(args.results), report, device, command, notes)
        print(f"\nappended to {args.results}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------


def run_unet_stage(run: Runner, state: dict) -> list[str]:
    """Build the UNet once (float32 first: the quality reference), then the eager table per dtype."""
    args, device = run.args, run.device
    notes = []
    cfg = model_config(args).unet
    t0 = time.monotonic()
    unet = build(UNet, cfg, device, torch.float32)
    print(f"[unet] built {sum(p.numel() for p in unet.parameters()):,} parameters on {device} in "
          f"{time.monotonic() - t0:.1f} s", flush=True)
    state["unet"] = unet

    collect_quality(run, state, "fp32 eager", unet, torch.float32)

    flops = None
    for name in args.dtypes:
        dtype = DTYPES[name]
        unet.to(dtype)
        inputs = unet_inputs(cfg, args.latent, args.batch, device, dtype)
        if flops is None:
            with torch.inference_mode():
                flops = count_flops(inputs.ours(unet))
            state["unet_flops"] = flops
            notes.append(f"UNet forward at a {args.latent}x{args.latent} latent, batch {args.batch}: "
                         f"{flops / 1e12:.3f} TFLOP (FlopCounterMode)")
        if "unet" in args.components:
            bench_unet_eager(run, unet, name, inputs, flops)
        if name != "fp32":
            collect_quality(run, state, f"{name} eager", unet, dtype)
    return notes


def wants_quality(run: Runner) -> bool:
    """The quality check samples whole images: on by default on a GPU only (minutes on a CPU)."""
    return "quality" in run.args.components


def collect_quality(run: Runner, state: dict, label: str, model: Callable, dtype: torch.dtype) -> None:
    """Generate the quality image with `model` as the UNet (`SDXL.generate`, same request and seed every
    time; the text towers and VAE stay the same); `report_quality` compares the latents at the end."""
    if not wants_quality(run):
        return
    t0 = time.monotonic()
    latents = bench_pipe(run, state, model, dtype).generate(bench_request(run.args, seed=42)).latents
    state.setdefault("quality_latents", {})[label] = latents.float()
    print(f"[quality] sampled '{label}' ({run.args.steps} steps, {time.monotonic() - t0:.1f} s)", flush=True)


def report_quality(run: Runner, state: dict) -> None:
    """Each mode's image against the float32 eager image at the same seed: PSNR of the 8-bit images (decoded
    by the same float32 VAE) and the relative error of the latents."""
    latents = state.get("quality_latents", {})
    ref = latents.get("fp32 eager")
    if ref is None or len(latents) < 2:
        return
    vae = state.get("vae")
    with torch.inference_mode():
        ref_img = to_8bit(_decode_fp32(vae, ref / SCALE_FACTOR)) if vae is not None else None
        for label, lat in latents.items():
            if label == "fp32 eager":
                continue
            note = f"latent rel. error {((lat - ref).norm() / ref.norm()).item():.2e}"
            if ref_img is not None:
                img = to_8bit(_decode_fp32(vae, lat / SCALE_FACTOR))
                note += f"; image PSNR {psnr(img, ref_img):.1f} dB"
            run.report.add(Row("ours", "quality", f"{label} vs fp32 eager, {run.args.steps} steps", "",
                               note=note))


def text_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float16


def ensure_text(run: Runner, state: dict):
    """Our two text towers (float16 on a GPU, float32 on a CPU), built once."""
    if "text" not in state:
        cfg, dtype = model_config(run.args), text_dtype(run.device)
        state["text"] = TextEncoders(build(CLIPTextTower, cfg.text_l, run.device, dtype),
                                     build(CLIPTextTower, cfg.text_g, run.device, dtype))
    return state["text"]


def ensure_vae(run: Runner, state: dict):
    """Our VAE (float32, the quality reference's precision), built once."""
    if "vae" not in state:
        state["vae"] = build(AutoencoderKL, model_config(run.args).vae, run.device, torch.float32)
    return state["vae"]


def run_text_stage(run: Runner, state: dict) -> None:
    args, device = run.args, run.device
    dtype = text_dtype(device)
    dname = dtype_name(dtype)
    towers = ensure_text(run, state)
    ids_l, ids_g = token_ids(2, device)
    variants = [Variant("ours", "eager", lambda: towers.encode(ids_l, ids_g))]
    if device.type == "cuda":
        graphed = fast.CUDAGraphRunner(towers.encode)
        variants.append(Variant("ours", "cuda-graph", lambda: graphed(ids_l, ids_g)))
    elif fast.onednn_linear_available():
        variants.append(Variant("ours", "onednn", lambda: towers.encode(ids_l, ids_g),
                                prepare=lambda: fast.use_onednn_linears(towers, True)))
        variants[0].prepare = lambda: fast.use_onednn_linears(towers, False)
    hf_l = transformers_text(towers.clip_l, device) if not args.no_diffusers else None
    hf_g = transformers_text(towers.clip_g, device) if not args.no_diffusers else None
    if hf_l is not None and hf_g is not None:
        def hf_encode(ids_l: Tensor, ids_g: Tensor) -> tuple[Tensor, Tensor]:
            a = hf_l(ids_l, output_hidden_states=True).hidden_states[-2]
            out = hf_g(ids_g, output_hidden_states=True)
            return torch.cat([a, out.hidden_states[-2]], dim=-1), out.text_embeds

        state["hf_text"] = (hf_l, hf_g)
        variants.append(Variant("transformers", "eager", lambda: hf_encode(ids_l, ids_g)))
        with torch.inference_mode():
            mine, theirs = towers.encode(ids_l, ids_g), hf_encode(ids_l, ids_g)
        err = ((mine[0].float() - theirs[0].float()).abs().max() / theirs[0].float().abs().max()).item()
        print(f"[text] ours vs transformers context max rel diff {err:.2e}", flush=True)
    run.group("text", dname, variants, None, args.warmup, max(args.iters // 2, 1), args.rounds)


class _Decode(nn.Module):
    """vae.decode as a module, so it can be compiled as one graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z)


def run_vae_stage(run: Runner, state: dict) -> None:
    args, device = run.args, run.device
    cfg = model_config(args).vae
    vae = ensure_vae(run, state)
    set_vae_mode(vae, torch.float32, channels_last=False)
    side = args.vae_size // cfg.downscale
    g = torch.Generator("cpu").manual_seed(3)
    z32 = torch.randn(1, cfg.z_channels, side, side, generator=g).to(device)
    theirs = diffusers_vae(vae) if not args.no_diffusers else None
    flops = None
    with torch.inference_mode():
        flops = count_flops(lambda: vae.decode(z32))
    iters = max(args.iters // 4, 1)
    variants = [Variant("ours", "eager", lambda: vae.decode(z32))]
    if theirs is not None:
        variants.append(Variant("diffusers", "eager (force_upcast default)",
                                lambda: theirs.decode(z32, return_dict=False)[0]))
    run.group("vae", "fp32", variants, flops, 1, iters, args.rounds)
    if device.type == "cpu" and not fast.cpu_supports_bf16():
        return
    del theirs
    vae.to(torch.bfloat16)
    theirs = diffusers_vae(vae) if not args.no_diffusers else None
    zb = z32.to(torch.bfloat16)
    variants = [Variant("ours", "eager", lambda: vae.decode(zb),
                        prepare=lambda: set_vae_mode(vae, torch.bfloat16, channels_last=False)),
                Variant("ours", "channels_last", lambda: vae.decode(zb),
                        prepare=lambda: set_vae_mode(vae, torch.bfloat16, channels_last=True))]
    if theirs is not None:
        variants.append(Variant("diffusers", "eager", lambda: theirs.decode(zb, return_dict=False)[0]))
    run.group("vae", "bf16", variants, flops, 1, iters, args.rounds)
    set_vae_mode(vae, torch.bfloat16, channels_last=True)
    state["vae_flops"] = flops
    state["vae_z"] = z32
    if wants_quality(run):
        with torch.inference_mode():
            ref = to_8bit(_decode_fp32(vae, z32))
            set_vae_mode(vae, torch.bfloat16, channels_last=True)
            img = to_8bit(vae.decode(zb))
        run.report.add(Row("ours", "quality", "VAE bf16 decode vs fp32 decode", "bf16",
                           note=f"PSNR {psnr(img, ref):.1f} dB (8-bit)"))


def run_vae_compile_stage(run: Runner, state: dict) -> list[str]:
    """torch.compile of the bf16 channels_last decoder (GroupNorm + SiLU fused into single passes)."""
    args, device = run.args, run.device
    vae = state.get("vae")
    if vae is None or "vae_flops" not in state or not run.fits(120, "VAE compile"):
        return []
    set_vae_mode(vae, torch.bfloat16, channels_last=True)
    zb = state["vae_z"].to(torch.bfloat16)
    fast.configure_inductor(device.type)
    t0 = time.monotonic()
    decode = fast.compile_module(_Decode(vae))
    with torch.inference_mode():
        decode(zb)
    run.clock.sync()
    run.report.add(Row("ours", "compile", "vae decode (compile + first call)", "bf16",
                       (time.monotonic() - t0) * 1000))
    state["vae_decode_compiled"] = decode
    variant = Variant("ours", "channels_last+compile", lambda: decode(zb))
    run.group("vae", "bf16", [variant], state["vae_flops"], 1, max(args.iters // 4, 1), 1)
    return []


def set_vae_mode(vae, dtype: torch.dtype, channels_last: bool) -> None:
    vae.to(dtype)
    vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _decode_fp32(vae, z: Tensor) -> Tensor:
    set_vae_mode(vae, torch.float32, channels_last=False)
    return vae.decode(z.float())


def run_compile_stage(run: Runner, state: dict) -> list[str]:
    """torch.compile (fullgraph, static shapes) of our bf16 UNet with fused projections and channels_last,
    then a CUDA graph over the compiled call."""
    args, device = run.args, run.device
    unet = state["unet"]
    if not run.fits(240, "UNet compile"):
        return []
    unet.to(torch.bfloat16)
    inputs = unet_inputs(unet.cfg, args.latent, args.batch, device, torch.bfloat16)
    backends = sdpa_for_compile(args)
    t0 = time.monotonic()
    compiled = fast.optimize(unet, fused_qkv=True, channels_last=True, compile="default",
                             sdpa_backend=backends)
    reset_peak(device)
    with torch.inference_mode():
        inputs.ours(compiled)()
    run.clock.sync()
    compile_s = time.monotonic() - t0
    state["compile_s"] = compile_s
    state["unet_compiled"] = compiled
    run.report.add(Row("ours", "compile", "unet (compile + first call)", "bf16", compile_s * 1000,
                       peak_gib=peak_gib(device)))
    if args.cache_dir:  # the portable form of the cache, for the second start (and for other machines)
        fast.save_compile_artifacts(Path(args.cache_dir) / ARTIFACTS)
    mode = f"fused+channels_last+sdpa={'/'.join(backends or ['default'])}+compile"
    graphed = fast.CUDAGraphRunner(compiled, copy_output=False)
    state["unet_graphed"] = graphed
    run.group("unet", "bf16", [Variant("ours", mode, inputs.ours(compiled)),
                               Variant("ours", mode + "+cuda-graph", inputs.ours(graphed))],
              state["unet_flops"], args.warmup, args.iters, 1)
    if args.profile or device.type == "cuda":
        summary = profile_summary(inputs.ours(compiled), device)
        run.notes.append(f"profile, UNet bf16 ours [{mode}]: {summary}")
    collect_quality(run, state, "bf16 fused+channels_last+compile+cuda-graph", graphed, torch.bfloat16)
    return []


def sdpa_for_compile(args: argparse.Namespace) -> list[str] | None:
    """The SDPA kernels for compiled models, in order of preference (None = PyTorch's choice; a CPU has
    flash and math only)."""
    if args.device == "cpu":
        return None
    return args.sdpa or None


def run_diffusers_compile_stage(run: Runner, state: dict) -> list[str]:
    """diffusers' UNet (our bf16 tensors, fused projections, channels_last) under torch.compile fullgraph."""
    args, device = run.args, run.device
    unet = state["unet"]
    if args.no_diffusers or not run.fits(state.get("compile_s", 200) * 1.2, "diffusers compile"):
        return []
    unet.to(torch.bfloat16)
    theirs = diffusers_unet(unet)
    if theirs is None:
        return []
    set_diffusers_mode(theirs, fused=True, channels_last=True)
    inputs = unet_inputs(unet.cfg, args.latent, args.batch, device, torch.bfloat16)
    t0 = time.monotonic()
    theirs_c = torch.compile(theirs, fullgraph=True)
    with torch.inference_mode():
        inputs.diffusers(theirs_c)()
    run.clock.sync()
    run.report.add(Row("diffusers", "compile", "unet (compile + first call)", "bf16",
                       (time.monotonic() - t0) * 1000))
    variant = Variant("diffusers", "fused+channels_last+compile", inputs.diffusers(theirs_c))
    run.group("unet", "bf16", [variant], state["unet_flops"], args.warmup, args.iters, 1)
    return []


def run_e2e_ours(run: Runner, state: dict) -> list[str]:
    """`SDXL.generate` on one request (text encoding, `steps` Euler CFG steps, VAE decode): what a user of
    the Python API runs, with our fastest UNet available here (compiled + CUDA graph after the compile
    stage, else the exact eager switches of `sdxl.load`)."""
    device = run.device
    if "unet" not in state:
        print("[e2e] needs the unet component", flush=True)
        return []
    unet, towers, vae = state["unet"], ensure_text(run, state), ensure_vae(run, state)
    req = bench_request(run.args, seed=7)
    iters = 3 if device.type == "cuda" else 1
    if "unet_graphed" in state:
        model, dtype, vae_dtype = state["unet_graphed"], torch.bfloat16, torch.bfloat16
        switches = "compile+cuda-graph"

        def prepare() -> None:
            set_vae_mode(vae, vae_dtype, True)
    else:  # fp16 on a GPU (diffusers' usual choice), float32 on a CPU; the switches `sdxl.load` applies
        model = unet
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        switches = "exact switches of sdxl.load"

        def prepare() -> None:
            unet.to(dtype)
            set_vae_mode(vae, vae_dtype, False)
            fast.speed_up(unet, towers, vae)

    pipe = bench_pipe(run, state, model, dtype)
    mode = f"SDXL.generate: {dtype_name(dtype)} UNet [{switches}], {dtype_name(vae_dtype)} VAE"
    variant = Variant("ours", mode, lambda: pipe.generate(req), prepare=prepare)
    run.group("e2e", "mixed", [variant], None, 1, iters, 1)
    return []


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def diffusers_tokenizers(folder: Path):
    """transformers' CLIPTokenizer pair for diffusers' pipeline, written from our vocabulary (no download)."""
    from transformers import CLIPTokenizer  # lazy: optional dependency (the diffusers comparison)

    write_hf_tokenizer_files(folder / "tokenizer", pad="<|endoftext|>")
    write_hf_tokenizer_files(folder / "tokenizer_2", pad="!")
    return (CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))


def run_e2e_diffusers(run: Runner, state: dict) -> list[str]:
    """diffusers' StableDiffusionXLPipeline on the same weights and request, in its default arithmetic:
    half-precision text encoders and UNet on a GPU (float32 on a CPU), eager, the VAE in float32 (its
    force_upcast default), EulerDiscreteScheduler with the SDXL "leading" config.

    Runs last: it converts the shared UNet to that precision, which invalidates compiled graphs."""
    args, device = run.args, run.device
    if args.no_diffusers or "hf_text" not in state or "unet" not in state:
        return []
    from diffusers import (  # lazy: optional dependency
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
    )

    unet, vae = state["unet"], ensure_vae(run, state)
    for key in ("unet_graphed", "unet_compiled"):  # their graphs read weights that are replaced below
        state.pop(key, None)
    half = torch.float16 if device.type == "cuda" else torch.float32
    set_eager_mode(unet, fused=False, channels_last=False, onednn=False)
    unet.to(half)
    set_vae_mode(vae, torch.float32, channels_last=False)
    hf_l, hf_g = state["hf_text"]
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    with tempfile.TemporaryDirectory() as tmp:
        tok_l, tok_g = diffusers_tokenizers(Path(tmp))
    pipe = StableDiffusionXLPipeline(vae=diffusers_vae(vae), text_encoder=hf_l, text_encoder_2=hf_g,
                                     tokenizer=tok_l, tokenizer_2=tok_g, unet=diffusers_unet(unet),
                                     scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    side = args.latent * 8

    def once():
        return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=5.0, width=side, height=side,
                    generator=torch.Generator("cpu").manual_seed(7), output_type="pil").images

    variant = Variant("diffusers", f"StableDiffusionXLPipeline: {dtype_name(half)} text+UNet eager, fp32 VAE",
                      once)
    run.group("e2e", "mixed", [variant], None, 1, 2 if device.type == "cuda" else 1, 1)
    return []


# ---------------------------------------------------------------------------------------------------------
# The product path (CPU): `sdxl generate` against diffusers' from_single_file, as whole processes
# ---------------------------------------------------------------------------------------------------------

CHILD = Path(__file__).resolve().parents[2] / "bench" / "product_child.py"


def write_product_files(folder: Path, tiny: bool) -> tuple[Path, Path]:
    """The SDXL base in the official single-file layout with random weights (PyTorch's default init, seed 0),
    stored in float16 as the official release is (6.9 GB at full size), and a diffusers folder holding only
    configs and tokenizers, for `from_single_file(config=...)` without the network.

    The modules are built directly in float16 (peak memory: one copy). The diffusers folder comes from
    `write_diffusers` on a miniature model of the same kind (index, scheduler, tokenizers), with the
    component configs rewritten for the real sizes and the miniature weights deleted."""
    cfg = tiny_config() if tiny else ModelConfig.base()
    model = folder / ("tiny_base.safetensors" if tiny else "sdxl_base_random.safetensors")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        modules = build_modules(cfg, dtype=torch.float16)
    finally:
        torch.set_default_dtype(default)
    parts = {name: m.state_dict() for name, m in modules.items()}
    write_single_file(Checkpoint(path=None, config=cfg, parts=parts), model)
    del parts, modules
    gc.collect()
    config_dir = write_diffusers(random_checkpoint(tiny_config(cfg.kind)), folder / "diffusers_config")
    for weights in config_dir.rglob("*.safetensors"):
        weights.unlink()
    configs = {"unet": unet_diffusers_config(cfg.unet), "vae": vae_diffusers_config(cfg.vae),
               "text_encoder": text_config_to_hf(cfg.text_l, False),
               "text_encoder_2": text_config_to_hf(cfg.text_g, True)}
    for sub, config in configs.items():
        (config_dir / sub / "config.json").write_text(json.dumps(config, indent=2))
    return model, config_dir


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({out.returncode}): {out.stderr[-1500:]}")
    return wall, out.stdout


def run_product_stage(run: Runner, state: dict) -> list[str]:
    """What a user runs, timed as whole processes on one file: `sdxl generate` (load, text, sampling, VAE,
    PNG with its metadata and the model hash) against a script calling diffusers'
    `StableDiffusionXLPipeline.from_single_file` and `pipe(...)` on the same file, same size, steps,
    sampler (Euler, "leading"), guidance and seed, both float32. Plus each one's load and generate call
    alone and its peak resident memory (`bench/product_child.py`, timed inside the process). Interleaved
    rounds, min taken.

    The checkpoint (random weights, 6.9 GB at full size) is written under --product-dir (default: a new
    folder in the system temp dir) and deleted afterwards unless --keep-product-files."""
    args = run.args
    side, steps, threads = args.latent * 8, args.steps, args.threads or 1
    parent = Path(args.product_dir) if args.product_dir else None
    folder = Path(tempfile.mkdtemp(prefix="sdxl-product-", dir=parent))
    notes: list[str] = []
    try:
        t0 = time.monotonic()
        model, config_dir = write_product_files(folder, args.tiny)
        gb = model.stat().st_size / 1e9
        print(f"[product] wrote {model} ({gb:.1f} GB) in {time.monotonic() - t0:.0f} s", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore",
                   SDXL_CACHE_DIR=str(folder / "cache"))  # the model-hash cache starts cold
        common = ["--size", str(side), "--steps", str(steps), "--seed", "7", "--threads", str(threads)]
        ours_cli = [sys.executable, "-m", "sdxl", "generate", PROMPT, "--model", str(model), "-W", str(side),
                    "-H", str(side), "--steps", str(steps), "--sampler", "euler", "--schedule", "leading",
                    "--cfg", "5", "--seed", "7", "--threads", str(threads), "--dtype", "fp32",
                    "--out", str(folder / "ours_cli.png"), "--quiet"]
        theirs = [sys.executable, str(CHILD), "diffusers", str(model), str(config_dir),
                  str(folder / "diffusers.png"), *common]
        ours_api = [sys.executable, str(CHILD), "ours", str(model), "-", str(folder / "ours_api.png"),
                    *common]
        notes += [f"product path: {gb:.1f} GB float16 official-layout file, float32 compute, {side}x{side}, "
                  f"{steps} Euler steps, guidance 5, {threads} thread(s); min over {args.rounds} interleaved "
                  "rounds; the first `sdxl generate` of round 1 hashes the file (cold hash cache)",
                  f"product command, ours: `{shlex.join(ours_cli[2:]).replace(str(folder), '$DIR')}`",
                  f"product command, diffusers: `python bench/product_child.py diffusers $DIR/"
                  f"{model.name} $DIR/diffusers_config OUT.png {shlex.join(common)}`"]
        times: dict[str, list[float]] = {k: [] for k in ("ours", "diffusers", "ours_gen", "diffusers_gen",
                                                          "ours_load", "diffusers_load")}
        peaks: dict[str, float] = {}
        for r in range(args.rounds):
            wall, _ = _timed(ours_cli, env)
            times["ours"].append(wall)
            print(f"[product] round {r + 1}: sdxl generate {wall:.1f} s", flush=True)
            wall, out = _timed(theirs, env)
            times["diffusers"].append(wall)
            inner = json.loads(out.strip().splitlines()[-1])
            times["diffusers_gen"].append(inner["generate_s"])
            times["diffusers_load"].append(inner["load_s"])
            peaks["diffusers"] = max(peaks.get("diffusers", 0.0), inner.get("peak_gib", 0.0))
            print(f"[product] round {r + 1}: diffusers {wall:.1f} s (load {inner['load_s']:.1f} s, generate "
                  f"{inner['generate_s']:.1f} s)", flush=True)
            _, out = _timed(ours_api, env)
            inner = json.loads(out.strip().splitlines()[-1])
            times["ours_gen"].append(inner["generate_s"])
            times["ours_load"].append(inner["load_s"])
            peaks["ours"] = max(peaks.get("ours", 0.0), inner.get("peak_gib", 0.0))
            print(f"[product] round {r + 1}: ours load {inner['load_s']:.1f} s, generate "
                  f"{inner['generate_s']:.1f} s", flush=True)
        best = {k: min(v) for k, v in times.items()}
        every = "; ".join(f"{k} " + "/".join(f"{x:.1f}" for x in v) for k, v in times.items())
        notes.append(f"product path, every round (s): {every}")
        rep = run.report
        rep.add(Row("ours", "product", "sdxl generate, whole process", "fp32", best["ours"] * 1000,
                    note=f"first run {times['ours'][0]:.1f} s (cold hash cache)"))
        rep.add(Row("diffusers", "product", "from_single_file + pipe(), whole process", "fp32",
                    best["diffusers"] * 1000))
        rep.add(Row("ours", "product", "load (sdxl.load)", "fp32", best["ours_load"] * 1000,
                    peak_gib=peaks.get("ours")))
        rep.add(Row("diffusers", "product", "load (from_single_file)", "fp32", best["diffusers_load"] * 1000,
                    peak_gib=peaks.get("diffusers")))
        rep.add(Row("ours", "product", "generate call (text + sampling + decode)", "fp32",
                    best["ours_gen"] * 1000))
        rep.add(Row("diffusers", "product", "pipe() call (text + sampling + decode)", "fp32",
                    best["diffusers_gen"] * 1000))
        images = [np.asarray(Image.open(folder / f"{n}.png").convert("RGB"), dtype=np.float64)
                  for n in ("ours_cli", "diffusers")]
        notes += [f"product path: ours / diffusers whole process = {best['ours'] / best['diffusers']:.3f} "
                  f"({best['ours']:.1f} s vs {best['diffusers']:.1f} s; target <= 0.7)",
                  f"product path: ours / diffusers generate call alone = "
                  f"{best['ours_gen'] / best['diffusers_gen']:.3f} ({best['ours_gen']:.1f} s vs "
                  f"{best['diffusers_gen']:.1f} s)",
                  f"product path: the two PNGs, 8-bit PSNR "
                  f"{psnr(torch.from_numpy(images[0]), torch.from_numpy(images[1])):.1f} dB"]
        for line in notes[-3:]:
            print(line, flush=True)
    finally:
        if args.keep_product_files:
            print(f"[product] files kept in {folder}", flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return notes


def run_fp8_stage(run: Runner, state: dict) -> list[str]:
    """float8 linears in the transformer blocks: eager, then compiled (whole UNet when the budget allows,
    else the transformer blocks only) with a CUDA graph over the call, and the quality cost."""
    args, device = run.args, run.device
    if not fast.fp8_supported(device):
        print("[fp8] needs a GPU with float8 tensor cores (sm_89+)", flush=True)
        return []
    unet = state["unet"]
    unet.to(torch.bfloat16)
    fast.unfuse_qkv(unet)
    fp8 = copy.deepcopy(unet)
    n = fast.use_fp8_linears(fp8)
    fp8.use_channels_last(True)
    notes = [f"fp8: {n} transformer linears as float8 e4m3 (per-row weight scales, per-token activation "
             "scales, torch._scaled_mm with float32 accumulation)"]
    inputs = unet_inputs(unet.cfg, args.latent, args.batch, device, torch.bfloat16)
    flops = state["unet_flops"]
    run.group("unet", "bf16", [Variant("ours", "fp8 linears+channels_last, eager", inputs.ours(fp8))], flops,
              args.warmup, args.iters, 1)
    full_s = state.get("compile_s", 200) * 1.1
    how = "full" if run.fits(full_s, "fp8 whole-UNet compile") else (
        "regional" if run.fits(full_s * 0.4, "fp8 regional compile") else None)
    model: Callable = fp8
    label = "fp8 eager"
    if how is not None:
        t0 = time.monotonic()
        backends = sdpa_for_compile(args)
        if how == "full":
            model = fast.optimize(fp8, fused_qkv=False, channels_last=True, compile="default",
                                  sdpa_backend=backends)
        else:
            fast.configure_inductor(device.type)
            fast.compile_regions(fp8, (BasicTransformerBlock,))
            model = fast.WithSDPABackend(fp8, backends) if backends else fp8
        with torch.inference_mode():
            inputs.ours(model)()
        run.clock.sync()
        run.report.add(Row("ours", "compile", f"unet fp8, {how} compile (+ first call)", "bf16",
                           (time.monotonic() - t0) * 1000))
        model = fast.CUDAGraphRunner(model, copy_output=False)
        label = f"fp8 linears+channels_last+{how} compile+cuda-graph"
        variant = Variant("ours", label, inputs.ours(model))
        run.group("unet", "bf16", [variant], flops, args.warmup, args.iters, 1)
    collect_quality(run, state, label, model, torch.bfloat16)
    return notes


def run_second_start(run: Runner, state: dict, raw: list[str]) -> list[str]:
    """A new process compiles the same UNet again: with the compile cache warm it should take a fraction."""
    if "compile_s" not in state:
        return []
    est = state["compile_s"] * 0.5 + 30
    if not run.fits(est, "second-start compile"):
        return []
    cmd = [sys.executable, "-m", "sdxl.bench", "--second-start", "--device", run.device.type,
           "--latent", str(run.args.latent), "--batch", str(run.args.batch),
           "--sdpa", ",".join(run.args.sdpa), "--results", "-"]
    if run.args.cache_dir:
        cmd += ["--cache-dir", run.args.cache_dir]
    if run.args.tiny:
        cmd += ["--tiny"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    seconds, artifacts = None, "?"
    for line in out.stdout.splitlines():
        if line.startswith("second-start compile s "):
            seconds = float(line.split()[-1])
        if line.startswith("second-start compile artifacts loaded: "):
            artifacts = line.split()[-1]
    if seconds is None:
        print(f"[second-start] failed: {out.stderr[-2000:]}", flush=True)
        return []
    note = (f"first compile {state['compile_s']:.0f} s; child process {time.monotonic() - t0:.0f} s in all; "
            f"cache artifacts loaded: {artifacts}")
    run.report.add(Row("ours", "compile", "unet, second process (warm compile cache)", "bf16", seconds * 1000,
                       note=note))
    return []


def second_start(args: argparse.Namespace) -> int:
    """Child process of `run_second_start`: build, compile and run the UNet once; print the compile time."""
    device = torch.device(args.device)
    loaded = False
    if args.cache_dir:
        fast.enable_compile_cache(args.cache_dir)
        loaded = fast.load_compile_artifacts(Path(args.cache_dir) / ARTIFACTS)
    print(f"second-start compile artifacts loaded: {loaded}", flush=True)
    unet = build(UNet, model_config(args).unet, device, torch.bfloat16)
    inputs = unet_inputs(unet.cfg, args.latent, args.batch, device, torch.bfloat16)
    t0 = time.monotonic()
    compiled = fast.optimize(unet, fused_qkv=True, channels_last=True, compile="default",
                             sdpa_backend=sdpa_for_compile(args))
    with torch.inference_mode():
        inputs.ours(compiled)()
    Clock(device).sync()
    print(f"second-start compile s {time.monotonic() - t0:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
