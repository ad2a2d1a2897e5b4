"""End to end: `sdxl generate` on a tiny random official-layout file gives diffusers' image.

Reference: StableDiffusionXLPipeline built from the same file through diffusers' own single-file converters,
EulerDiscreteScheduler with the SDXL default config (scaled_linear, leading, steps_offset 1), initial noise
from torch.Generator("cpu").manual_seed(seed) in float32, negative_prompt=None (zero uncond embedding).
Tolerance: PSNR >= 40 dB on the 8-bit PNG.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from reference import diffusers_base_pipeline, psnr, to_uint8


@pytest.mark.parametrize("width,height", [(64, 64), (96, 64)])
def test_generate_matches_diffusers(tiny_files, tmp_path, width, height):
    from sdxl.cli import app

    out = tmp_path / "img.png"
    lat = tmp_path / "lat.safetensors"
    args = [
        "generate",
        "a photo of a red cat",
        "--model",
        str(tiny_files["base"]),
        "--width",
        str(width),
        "--height",
        str(height),
        "--steps",
        "5",
        "--cfg",
        "5",
        "--seed",
        "42",
        "--sampler",
        "euler",
        "--schedule",
        "leading",
        "--out",
        str(out),
        "--save-latents",
        str(lat),
        "--quiet",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ours = np.asarray(Image.open(out).convert("RGB"))
    assert ours.shape == (height, width, 3)

    pipe = diffusers_base_pipeline(tiny_files["base"], tmp_path)
    with torch.no_grad():
        ref = pipe(
            "a photo of a red cat",
            negative_prompt=None,
            num_inference_steps=5,
            guidance_scale=5.0,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(42),
            output_type="np",
        ).images
    ref8 = to_uint8(ref)[0]
    assert ours.std() > 1.0, "random model should give a non-flat image"
    assert psnr(ours, ref8) >= 40.0

    from sdxl.weights.io import open_tensors

    latents = open_tensors(lat)["latents"]
    assert latents.shape == (1, 4, height // 8, width // 8)


def test_python_api_matches_cli_defaults(tiny_files):
    """The Python API and raw UNet access work on the same file (eps prediction shape)."""
    import sdxl
    from sdxl.request import GenerationRequest

    pipe = sdxl.load(tiny_files["base"], device="cpu", dtype=torch.float32)
    r1 = pipe.generate(GenerationRequest(prompt="x", width=64, height=64, steps=3, seed=7))
    r2 = pipe.generate(GenerationRequest(prompt="x", width=64, height=64, steps=3, seed=7))
    assert torch.equal(r1.latents, r2.latents)
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, pipe.config.unet.context_dim)
    y = torch.randn(1, pipe.config.unet.adm_in_channels)
    eps = pipe.unet(x, torch.tensor([500]), ctx, y)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
