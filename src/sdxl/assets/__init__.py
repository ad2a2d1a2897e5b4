"""Files shipped inside the package: the miniature default model and the CLIP BPE vocabulary."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent
DEFAULT_NAME = "default"  # what `--model default` and `sdxl.load("default")` mean


def default_model_path(kind: str = "base") -> Path:
    """The shipped miniature model: `kind` is "base" or "refiner"."""
    return ROOT / "default" / f"{kind}.safetensors"


def bpe_vocabulary_path() -> Path:
    return ROOT / "clip_bpe_16e6.txt.gz"
