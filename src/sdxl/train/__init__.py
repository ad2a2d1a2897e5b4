"""Training: `run(TrainConfig)` in Python, `train_main(options)` for the `sdxl train` command.

See docs/TRAINING.md for every configuration key and the recipes.
"""

from .config import ConfigError, TrainConfig, TrainingError, build_config
from .loop import TrainResult
from .runner import run, train_main

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainingError", "build_config", "run", "train_main"]
