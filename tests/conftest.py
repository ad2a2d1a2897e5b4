"""Shared fixtures: tiny random-weight checkpoints in the official single-file layout."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS", "2")))))


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """{"base", "refiner", "inpaint"} -> path of a tiny random official-layout .safetensors file."""
    from sdxl.models.config import tiny_config
    from sdxl.weights.checkpoint import random_checkpoint, write_single_file

    d = tmp_path_factory.mktemp("tiny_models")
    out, vae = {}, None
    for i, kind in enumerate(("base", "refiner", "inpaint")):
        ck = random_checkpoint(tiny_config(kind), seed=10 + i)
        vae = ck.parts["vae"] if vae is None else vae
        ck.parts["vae"] = vae  # one autoencoder for the whole family, as in the official files
        out[kind] = write_single_file(ck, d / f"{kind}.safetensors")
    return out
