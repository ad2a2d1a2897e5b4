"""Shared fixtures: tiny random-weight checkpoints in the official single-file layout."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest
import torch

from sdxl.models.config import tiny_config
from sdxl.models.text import TextEncoders
from sdxl.models.unet import UNet
from sdxl.models.vae import AutoencoderKL
from sdxl.pipeline import SDXL

# One thread unless OMP_NUM_THREADS says otherwise (at most 2), here and in the processes tests start: the
# numbers in the tests' docstrings were measured on one, and the tiny models run no faster on two (nine test
# files: 227 s on 2 threads, 178 s on 1, on the 2-core build machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(max(1, min(2, int(os.environ["OMP_NUM_THREADS"]))))


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


def tiny_pipeline(seed: int = 0):
    """The tiny random-weight SDXL (tiny_config), its weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    cfg = tiny_config()
    return SDXL(cfg, UNet(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval(),
                TextEncoders(cfg.text_l, cfg.text_g).eval())


@contextlib.contextmanager
def serve_in_thread(app):
    """`app` served by uvicorn on a free loopback port in a thread (a real HTTP server, for third-party
    clients); yields the port, and stops the server on exit."""
    import uvicorn  # lazy: the server extra

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
