"""Change the GroupNorm group count of a checkpoint's UNet and/or VAE, keeping every weight.

    python scripts/regroup.py IN.safetensors OUT.safetensors [--unet N] [--vae N]

GroupNorm's parameters (one scale and shift per channel) do not depend on the group count, so the weights
carry over and only the config recorded in the file's metadata changes. Used by scripts/train_default.sh: with
32 channels and 32 groups every GroupNorm is an instance norm, which erases each channel's per-image mean; on
flat-coloured images that is the colour itself, so the miniature VAE and UNet were moved to 8 groups
(4 channels per group, the ratio of SDXL's own VAE) and trained on.
"""

from __future__ import annotations

import argparse
import dataclasses

from sdxl.weights.checkpoint import read_checkpoint, write_single_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--unet", type=int, default=0, help="new UNet group count (0: keep)")
    ap.add_argument("--vae", type=int, default=0, help="new VAE group count (0: keep)")
    a = ap.parse_args()
    ck = read_checkpoint(a.src)
    cfg = ck.config
    if a.unet:
        if cfg.unet is None:
            raise SystemExit(f"{a.src}: holds no UNet")
        cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, norm_groups=a.unet))
    if a.vae:
        if cfg.vae is None:
            raise SystemExit(f"{a.src}: holds no VAE")
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, norm_groups=a.vae))
    ck.config = cfg
    write_single_file(ck, a.out)
    print(a.out)


if __name__ == "__main__":
    main()
