"""Summarise scripts/ablation.sh: a markdown table (mean over training seeds, Wilson 95% CI of the pooled
accuracy) and a bar plot (docs/ablation.png) drawn with Pillow.

    python scripts/ablation_report.py WORKDIR [--plot docs/ablation.png]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

VARIANTS = [("only-large", "only images >= training size"), ("nocond", "all images, no size cond."),
            ("sizecond", "all images + size cond.")]
PAPER = {"only-large": "43.84 / 110.64", "nocond": "39.76 / 211.50", "sizecond": "36.53 / 215.34"}


def wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def collect(work: Path) -> dict:
    out = {}
    for v, _ in VARIANTS:
        runs = [json.loads(p.read_text()) for p in sorted(work.glob(f"{v}-s*/eval.json"))]
        if not runs:
            continue
        row = {"seeds": len(runs)}
        for kind in ("single", "pair"):
            rs = [r for run in runs for r in run["results"] if r["kind"] == kind]
            if not rs:
                continue
            k = sum(r["all_ok"] * r["n"] for r in rs)
            n = sum(r["n"] for r in rs)
            fds = [r["fd"] for r in rs]
            mean = sum(fds) / len(fds)
            sd = (sum((f - mean) ** 2 for f in fds) / max(len(fds) - 1, 1)) ** 0.5
            kc = sum(r["colour_ok"] * r["n"] for r in rs)
            row[kind] = {"acc": k / n, "ci": wilson(k, n), "fd": mean, "fd_sd": sd, "fds": fds,
                         "colour": kc / n, "colour_ci": wilson(kc, n)}
        out[v] = row
    return out


def table(res: dict) -> str:
    lines = ["| model | seeds | FD single (sd) | all correct single (95% CI) | colour single (95% CI) | "
             "FD pair (sd) | all correct pair (95% CI) | colour pair (95% CI) | "
             "paper FID-5k / IS-5k |", "|---|---|---|---|---|---|---|---|---|"]
    for v, label in VARIANTS:
        if v not in res:
            continue
        r = res[v]
        cells = []
        for kind in ("single", "pair"):
            if kind in r:
                x = r[kind]
                cells += [f"{x['fd']:.2f} ({x['fd_sd']:.2f})",
                          f"{x['acc']:.0%} ({x['ci'][0]:.0%}-{x['ci'][1]:.0%})",
                          f"{x['colour']:.0%} ({x['colour_ci'][0]:.0%}-{x['colour_ci'][1]:.0%})"]
            else:
                cells += ["-", "-", "-"]
        lines.append(f"| {label} | {r['seeds']} | " + " | ".join(cells) + f" | {PAPER[v]} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    W, H, pad = 720, 360, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    names = [v for v, _ in VARIANTS if v in res and "single" in res[v]]
    fds = [res[v]["single"]["fd"] for v in names]
    top = max(fds + [f for v in names for f in res[v]["single"].get("fds", [])] + [1e-9]) * 1.15
    bw = (W - 2 * pad) // max(1, 2 * len(names))
    colours = [(200, 80, 80), (90, 120, 200), (80, 170, 100)]
    d.text((pad, 10), "Frechet distance on held-out single-object prompts (lower is better); bar = mean, "
           "ticks = training seeds", fill="black")
    for i, (v, fd) in enumerate(zip(names, fds)):
        x0 = pad + (2 * i + 0.5) * bw
        h = (H - 2 * pad) * fd / top
        d.rectangle([x0, H - pad - h, x0 + bw, H - pad], fill=colours[i % 3])
        for f in res[v]["single"].get("fds", []):  # one tick per training seed
            y = H - pad - (H - 2 * pad) * f / top
            d.line([x0 + bw * 0.3, y, x0 + bw * 0.7, y], fill="black", width=2)
        d.text((x0, H - pad - h - 14), f"{fd:.2f}", fill="black")
        d.text((x0 - 10, H - pad + 6), v, fill="black")
    d.line([pad, H - pad, W - pad, H - pad], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str]) -> None:
    work = Path(argv[0])
    res = collect(work)
    print(table(res))
    plot_path = Path(argv[argv.index("--plot") + 1]) if "--plot" in argv else work / "ablation.png"
    plot(res, plot_path)
    (work / "ablation.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
