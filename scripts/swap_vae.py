"""Replace the VAE of a checkpoint with another one (same latent space), keeping everything else.

    python scripts/swap_vae.py MODEL.safetensors VAE.safetensors OUT.safetensors
"""

from __future__ import annotations

import dataclasses
import sys

from sdxl.weights.checkpoint import read_checkpoint, write_single_file


def main(model: str, vae: str, out: str) -> None:
    ck = read_checkpoint(model)
    v = read_checkpoint(vae)
    if v.config.vae is None or "vae" not in v.parts:
        raise SystemExit(f"{vae}: holds no VAE")
    ck.parts["vae"] = v.parts["vae"]
    ck.config = dataclasses.replace(ck.config, vae=v.config.vae)
    write_single_file(ck, out)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
