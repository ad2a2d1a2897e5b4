"""Entry points: `run(TrainConfig)` (Python) and `train_main(options)` (the `sdxl train` command and
`python -m sdxl.train`), which pick the trainer for `train.task` and turn errors into exit statuses."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch.distributed as dist

from .config import ConfigError, TrainConfig, TrainingError, build_config
from .distributed import lost_contact, setup_distributed
from .loop import TrainerBase, TrainResult
from .trainer import Trainer
from .vae_trainer import VAETrainer


def make_trainer(cfg: TrainConfig) -> TrainerBase:
    """The trainer of `train.task`: `Trainer` (diffusion) or `VAETrainer`."""
    if cfg.train.task == "vae":
        return VAETrainer(cfg)
    return Trainer(cfg)


def run(cfg: TrainConfig) -> TrainResult:
    """Train according to `cfg` (single process, or one rank of a torchrun job). Returns what was done."""
    info = setup_distributed(cfg)
    trainer = make_trainer(cfg)
    trainer.info = info
    try:
        trainer.setup()
        return trainer.train()
    except RuntimeError as e:
        if not info.distributed or isinstance(e, TrainingError) or not lost_contact(e):
            raise
        detail = str(e).strip().splitlines()[0].split("] ", 1)[-1].split(". ")[0]
        raise TrainingError(
            f"rank {info.rank} of {info.world_size} lost contact with the other training processes "
            f"({detail}); a process died or hung (see dist.timeout): restart all of them with --resume to "
            "continue from the newest complete checkpoint") from e
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def train_main(options: dict[str, Any]) -> int:
    """The `sdxl train` command: options as `config.build_config` takes them. Returns the exit status.

    0: finished, or stopped by SIGINT/SIGTERM after saving; 1: a training error (printed as one line);
    2: a configuration error.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = build_config(options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        what = f"stopped ({result.stop_reason}; continue with --resume)" if result.interrupted else "finished"
        print(f"{what} at step {result.step}; output in {result.output}"
              + (f"; model: {result.exported}" if result.exported else ""))
    return 0
