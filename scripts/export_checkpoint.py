"""Export a training checkpoint (its EMA weights, or the raw ones) as a single model file, without stopping
the run that wrote it; to evaluate a run while it trains.

    python scripts/export_checkpoint.py CHECKPOINT_DIR BASE_MODEL.safetensors OUT.safetensors [--raw]

BASE_MODEL supplies the architecture and the parts that did not train (the VAE; the text towers when they were
frozen): use the run's `init` file with its `model.vae` swapped in, or an earlier export of the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from sdxl.weights.checkpoint import read_checkpoint, write_single_file

PREFIXES = {"unet": "unet.", "text_l": "text.clip_l.", "text_g": "text.clip_g."}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--raw", action="store_true", help="the trained weights instead of their EMA")
    a = ap.parse_args()
    folder = Path(a.checkpoint)
    trained = load_file(folder / "model.safetensors")
    if not a.raw and (folder / "ema.safetensors").is_file():
        trained.update(load_file(folder / "ema.safetensors"))
    ck = read_checkpoint(a.base)
    replaced = 0
    for part, prefix in PREFIXES.items():
        if part not in ck.parts:
            continue
        sd = ck.parts[part]
        for k in sd:
            if prefix + k in trained:
                sd[k] = trained[prefix + k]
                replaced += 1
    if not replaced:
        raise SystemExit(f"{folder}: no tensor matches {a.base} (is it a diffusion run's checkpoint?)")
    ck.parts = dict(ck.parts)
    write_single_file(ck, a.out)
    print(f"{a.out}: {replaced} tensors from {folder}")


if __name__ == "__main__":
    main()
