"""`python -m sdxl.train` (and `torchrun --nproc_per_node N -m sdxl.train ...`): the trainer's command line.

The flags are the common keys of `sdxl.train.config` (see `CLI_FLAGS`); `--set table.key=value` sets any
other key; `--config FILE.toml` is read first and the flags override it. `sdxl train` takes the same options.
"""

from __future__ import annotations

import argparse
import sys

from .runner import train_main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sdxl.train",
        description="Train SDXL (full fine-tune, LoRA, refiner, text encoders, VAE). "
                    "Multi-GPU: torchrun --nproc_per_node N -m sdxl.train --config run.toml",
    )
    p.add_argument("config_file", nargs="?", help="TOML config (same as --config)")
    p.add_argument("--config", help="TOML config file; flags override its keys")
    p.add_argument("--data", help="image folder with .txt captions, or a .jsonl manifest (data.path)")
    p.add_argument("--init", help="checkpoint to start from (model.init)")
    p.add_argument("--preset", help="from-scratch architecture: tiny, tiny-refiner, base, refiner "
                                    "(model.preset)")
    p.add_argument("--output", help="output folder (train.output)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="images per process per micro-batch (train.batch_size)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (train.grad_accum)")
    p.add_argument("--resolution", type=int, help="bucket base resolution (data.resolution)")
    p.add_argument("--lr", type=float, help="learning rate (optim.lr)")
    p.add_argument("--lora-rank", type=int, help="train a LoRA of this rank (lora.rank)")
    p.add_argument("--seed", type=int, help="seed (train.seed)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="train.mixed_precision")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (train.device)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (checkpoint.every)")
    p.add_argument("--task", choices=["diffusion", "vae"], help="train.task")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest complete checkpoint in the output folder")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="set any config key, e.g. --set loss.offset_noise=0.05 (repeatable)")
    return p


def options_from_args(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    opts = {k: v for k, v in vars(args).items() if k not in ("set", "config_file")}
    if args.config_file and not args.config:
        opts["config"] = args.config_file
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects TABLE.KEY=VALUE, got {item!r}")
        opts[key.strip()] = value
    return opts


def main(argv: list[str] | None = None) -> int:
    return train_main(options_from_args(argv))


if __name__ == "__main__":
    sys.exit(main())
