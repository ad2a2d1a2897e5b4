"""Training: `run(TrainConfig)` in Python, `train_main(options)` for the `sdxl train` command.

See docs/TRAINING.md for every configuration key and the recipes.
"""

from .config import ConfigError, TrainConfig, build_config
from .trainer import TrainingError, TrainResult, run, train_main

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainingError", "build_config", "run", "train_main"]
