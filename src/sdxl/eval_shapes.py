"""`sdxl eval shapes` and `sdxl eval vae-ceiling`: score a model trained on the shapes dataset, or the ceiling
a VAE puts on any model.

For each held-out prompt list (single objects, two objects with a relation, and the same with colour-shape
pairs never seen in training; optionally drawn from a curriculum level), generate one image per prompt, then
  (a) prompt accuracy: the detector (`sdxl.data.evaluate`) checks colours, shapes, counts and relations;
  (b) a Frechet distance between the evaluator's features of the generated images and of renders of the
      same scene specs (the "real" images).
Every rate comes with its Wilson 95% interval. Claims need n >= 100 per list (DEFAULT_N): at n = 30 an
interval is about +-17 points wide.

`training_eval` is the small-sample version a trainer runs every K steps; `vae_roundtrip` turns a VAE file
into the encode + decode that `render_ceiling` measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.evaluate import (
    frechet_distance,
    image_features,
    prompt_accuracy,
    score_generated,
    tallies_to_log,
    wilson,
)
from .data.shapes import Curriculum, eval_prompts, render_scene
from .errors import CheckpointError
from .metadata import write_png
from .models.vae import AutoencoderKL
from .request import GenerationRequest
from .weights.checkpoint import read_checkpoint

__all__ = ["DEFAULT_N", "KindResult", "evaluate_pipe", "format_table", "training_eval", "vae_roundtrip",
           "wilson"]

DEFAULT_N = 100  # prompts per list for any claim (Wilson 95% interval about +-9 points at 50%)


@dataclass
class KindResult:
    kind: str
    n: int
    scores: dict[str, int] = field(default_factory=dict)  # metric -> number correct
    fd: float = float("nan")

    def rate(self, metric: str) -> float:
        return self.scores.get(metric, 0) / max(self.n, 1)

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "n": self.n,
            "fd": self.fd,
            **{m: self.rate(m) for m in self.scores},
            **{f"{m}_ci95": wilson(k, self.n) for m, k in self.scores.items()},
        }


def evaluate_pipe(
    pipe,
    kinds=("single", "pair"),
    n: int = 50,
    seed: int = 0,
    size: int | None = None,
    steps: int = 20,
    cfg: float = 5.0,
    sampler: str = "dpmpp_2m",
    schedule: str = "automatic",
    refiner=None,
    progress=None,
    original_size: int | None = None,
    guidance_rescale: float = 0.0,
    save_dir=None,
    level: Curriculum | None = None,
    fd: bool = True,
) -> list[KindResult]:
    """Generate one image per prompt of each list and score it; `level` draws the prompts from a curriculum
    level (`eval_prompts`); `fd=False` skips the Frechet distance (and its renders)."""
    size = size or pipe.config.sample_size
    results = []
    for kind in kinds:
        prompts = eval_prompts(kind, n, seed, level)
        res = KindResult(kind, len(prompts))
        gen_feats, real_feats = [], []
        for i, (prompt, spec) in enumerate(prompts):
            req = GenerationRequest(
                prompt=prompt,
                width=size,
                height=size,
                steps=steps,
                cfg=cfg,
                sampler=sampler,
                schedule=schedule,
                seed=seed * 100_003 + i,
                guidance_rescale=guidance_rescale,
            )
            if original_size:
                req = req.replace(original_width=original_size, original_height=original_size)
            result = pipe.generate(req, refiner=refiner)
            img = result.images[0]
            acc = prompt_accuracy(img, spec)
            if save_dir is not None:  # each image carries its request and its scores
                record = {"request": req.to_dict(), "eval": {"kind": kind, "index": i, "scores": acc}}
                write_png(img, Path(save_dir) / f"{kind}_{i:03d}.png", result.infos[0], record)
            for m, ok in acc.items():
                res.scores[m] = res.scores.get(m, 0) + int(bool(ok))
            if fd:
                gen_feats.append(image_features(img))
                real_feats.append(image_features(render_scene(spec, size, size)))
            if progress is not None:
                progress(kind, i + 1, len(prompts))
        if fd and len(gen_feats) >= 2:
            res.fd = frechet_distance(np.stack(gen_feats), np.stack(real_feats))
        results.append(res)
    return results


def training_eval(
    pipe,
    n: int = 16,
    lists: tuple[str, ...] = ("single", "pair"),
    level: Curriculum | None = None,
    size: int | None = None,
    seed: int = 0,
    steps: int = 20,
    cfg: float = 5.0,
) -> dict[str, float]:
    """A small-sample evaluation of a pipeline (no Frechet distance): a flat dict `eval_<list>_<metric>` ->
    rate, plus `_lo` / `_hi` (Wilson 95%), for log.jsonl. The prompts and seeds are the same every time, so
    successive values differ by the model only. A stage stops on the full evaluation (`sdxl eval shapes
    --n 100`), not on this one. (The trainer, a sibling layer, calls `score_generated` itself.)"""
    side = size or pipe.config.sample_size

    def generate(prompt: str, seed_i: int) -> Image.Image:
        req = GenerationRequest(prompt=prompt, width=side, height=side, steps=steps, cfg=cfg, seed=seed_i,
                                sampler="dpmpp_2m", schedule="automatic")
        return pipe.generate(req).images[0]

    return tallies_to_log(score_generated(generate, lists, n, seed, level))


def vae_roundtrip(path: str | Path, device: str | torch.device = "cpu", size: int | None = None):
    """Encode + decode (posterior mean) through the VAE held in a checkpoint file (a whole model or a
    VAE-only export), as a PIL -> PIL function for `render_ceiling`. Raises CheckpointError."""
    ck = read_checkpoint(path)
    if "vae" not in ck.parts or ck.config.vae is None:
        raise CheckpointError(f"{path}: holds no VAE")
    vae = AutoencoderKL(ck.config.vae)
    vae.load_state_dict({k: v.float() for k, v in ck.parts["vae"].items()})
    vae = vae.to(device).eval()

    @torch.no_grad()
    def roundtrip(img: Image.Image) -> Image.Image:
        side_w, side_h = img.size if size is None else (size, size)
        arr = np.asarray(img.convert("RGB").resize((side_w, side_h)), dtype=np.float32) / 127.5 - 1.0
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(device)
        y = vae.decode(vae.encode(x)[0]).float().clamp(-1, 1)
        out = ((y[0].permute(1, 2, 0).cpu().numpy() + 1) / 2 * 255).round().astype(np.uint8)
        return Image.fromarray(out)

    return roundtrip


def _cell(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k / max(n, 1):.0%} ({lo:.0%}-{hi:.0%})"


def format_table(results: list[KindResult]) -> str:
    """A markdown table; every rate with its Wilson 95% interval."""
    lines = [
        "| prompts | n | all correct | colour | shape | count | relation | FD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = {m: _cell(r.scores.get(m, 0), r.n) for m in ("all_ok", "colour_ok", "shape_ok", "count_ok",
                                                               "relation_ok")}
        rel = cells["relation_ok"] if r.kind.startswith("pair") else "-"
        lines.append(
            f"| {r.kind} | {r.n} | {cells['all_ok']} | {cells['colour_ok']} | {cells['shape_ok']} | "
            f"{cells['count_ok']} | {rel} | {r.fd:.2f} |"
        )
    return "\n".join(lines)
