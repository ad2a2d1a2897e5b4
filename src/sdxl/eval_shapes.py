"""`sdxl eval shapes`: score a model trained on the shapes dataset.

For each held-out prompt list (single objects, two objects with a relation, and the same with colour-shape
pairs never seen in training), generate one image per prompt, then
  (a) prompt accuracy: the detector (`sdxl.data.evaluate`) checks colours, shapes, counts and relations;
  (b) a Frechet distance between the evaluator's features of the generated images and of renders of the
      same scene specs (the "real" images).
Accuracies come with Wilson 95% intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.evaluate import frechet_distance, image_features, prompt_accuracy
from .data.shapes import eval_prompts, render_scene
from .metadata import write_png
from .request import GenerationRequest


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


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
) -> list[KindResult]:
    size = size or pipe.config.sample_size
    results = []
    for kind in kinds:
        prompts = eval_prompts(kind, n, seed)
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
            gen_feats.append(image_features(img))
            real_feats.append(image_features(render_scene(spec, size, size)))
            if progress is not None:
                progress(kind, i + 1, len(prompts))
        res.fd = frechet_distance(np.stack(gen_feats), np.stack(real_feats))
        results.append(res)
    return results


def format_table(results: list[KindResult]) -> str:
    lines = [
        "| prompts | n | all correct (95% CI) | colour | shape | count | relation | FD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lo, hi = wilson(r.scores.get("all_ok", 0), r.n)
        rel = f"{r.rate('relation_ok'):.0%}" if r.kind.startswith("pair") else "-"
        lines.append(
            f"| {r.kind} | {r.n} | {r.rate('all_ok'):.0%} ({lo:.0%}-{hi:.0%}) | {r.rate('colour_ok'):.0%} | "
            f"{r.rate('shape_ok'):.0%} | {r.rate('count_ok'):.0%} | {rel} | {r.fd:.2f} |"
        )
    return "\n".join(lines)
