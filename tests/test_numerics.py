"""NaN/Inf anywhere in generation is caught where it appears and reported with the component and the step.

A non-finite value that slips through becomes a black or noise image with no error at all (NaN -> 0 when
cast to uint8), so every stage checks its output: the text encoders (context and pooled vector), the VAE
encoder (img2img), each sampler step of the base and refiner UNets, the final latents and the VAE decoder.
An fp16 VAE that overflows is decoded again in float32 and that fallback is logged. Faults are injected
into the tiny random-weight models of `tiny_files` (64x64 images, a handful of steps: seconds on a CPU).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.pipeline import SDXL, NumericsError
from sdxl.request import GenerationRequest

PROMPT = "a red circle above a blue square"


def request(**kw) -> GenerationRequest:
    base = dict(prompt=PROMPT, width=64, height=64, steps=5, seed=1, sampler="euler", cfg=5.0)
    return GenerationRequest(**{**base, **kw})


@pytest.fixture()
def pipe(tiny_files) -> SDXL:
    """A fresh base model per test: the tests poison its weights."""
    return SDXL.load(tiny_files["base"])


def poison_unet_from_call(unet: torch.nn.Module, first_bad_call: int, value: float, monkeypatch) -> list[int]:
    """Make the UNet return `value` everywhere from its `first_bad_call`-th call (1-based) on."""
    calls = []
    forward = unet.forward

    def bad_forward(*args, **kwargs):
        calls.append(1)
        out = forward(*args, **kwargs)
        return torch.full_like(out, value) if len(calls) >= first_bad_call else out

    monkeypatch.setattr(unet, "forward", bad_forward)
    return calls


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_unet_nan_or_inf_from_step_3_names_the_unet_and_the_step(pipe, monkeypatch, value):
    # Euler calls the UNet once per step (both CFG branches in one batch), so call 3 is step 3.
    calls = poison_unet_from_call(pipe.unet, 3, value, monkeypatch)
    seen_steps = []
    with pytest.raises(NumericsError) as info:
        pipe.generate(request(), callback=lambda p: seen_steps.append(p.step))
    message = str(info.value)
    assert "UNet" in message and "step 3/5" in message and "base" in message
    assert seen_steps == [1, 2]  # steps 1-2 completed normally, nothing reported after the fault
    assert len(calls) == 3  # generation stopped at the bad step instead of running on NaN


def test_unet_nan_in_the_unconditional_branch_only_is_caught(pipe, monkeypatch):
    """CFG mixes both branches: NaN in the uncond half alone must still stop generation at that step."""
    forward = pipe.unet.forward

    def bad_forward(x, t, context, y):
        out = forward(x, t, context, y)
        out[: out.shape[0] // 2] = float("nan")  # first half of the CFG batch = unconditional
        return out

    monkeypatch.setattr(pipe.unet, "forward", bad_forward)
    with pytest.raises(NumericsError, match=r"UNet output at step 1/5"):
        pipe.generate(request())


def test_refiner_unet_nan_names_the_refiner_stage(pipe, tiny_files, monkeypatch):
    refiner = SDXL.load(tiny_files["refiner"])
    poison_unet_from_call(refiner.unet, 2, float("nan"), monkeypatch)
    req = request(steps=10, refiner=str(tiny_files["refiner"]), refiner_switch=0.6)
    with pytest.raises(NumericsError) as info:
        pipe.generate(req, refiner=refiner)
    message = str(info.value)
    assert "refiner UNet" in message and "step 2/" in message


def test_nan_weights_in_clip_l_name_the_text_encoders(pipe):
    with torch.no_grad():
        pipe.text.clip_l.encoder.layers[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(NumericsError, match="text encoders"):
        pipe.generate(request())


def test_nan_weights_in_bigg_name_the_text_encoders(pipe):
    with torch.no_grad():
        # layer 0: SDXL's context is the penultimate layer's output, which the 2-layer tiny tower's last
        # layer does not feed
        pipe.text.clip_g.encoder.layers[0].self_attn.q_proj.bias[0] = float("inf")
    with pytest.raises(NumericsError, match="text encoders"):
        pipe.generate(request(negative_prompt="blurry"))


def test_nan_only_in_the_pooled_projection_names_the_text_encoders(pipe):
    """bigG's projection feeds only the pooled vector (the UNet's `y`), not the context. NaN there must be
    blamed on the text encoders, not on the UNet whose output it poisons one stage later."""
    with torch.no_grad():
        pipe.text.clip_g.text_projection.weight[0, 0] = float("nan")
    with pytest.raises(NumericsError) as info:
        pipe.generate(request())
    assert "text encoder" in str(info.value), str(info.value)


def test_vae_decoder_nan_in_float32_names_the_vae(pipe):
    with torch.no_grad():
        pipe.vae.decoder.conv_in.bias[0] = float("nan")
    with pytest.raises(NumericsError) as info:
        pipe.generate(request(steps=2))
    assert "VAE decoder" in str(info.value) and "float32" in str(info.value)


def test_fp16_vae_nan_that_float32_cannot_fix_is_reported(tiny_files, caplog):
    """The fp16 decode fails, the float32 retry fails too (the weights themselves are NaN): that must be
    an error naming the VAE, not a silently black image."""
    pipe = SDXL.load(tiny_files["base"], vae_dtype=torch.float16)
    with torch.no_grad():
        pipe.vae.decoder.conv_in.bias[0] = float("nan")
    with caplog.at_level(logging.WARNING), pytest.raises(NumericsError) as info:
        pipe.generate(request(steps=2))
    assert "VAE decoder" in str(info.value)


def test_vae_encoder_nan_in_img2img_names_the_vae_encoder(pipe, tmp_path):
    """img2img encodes the init image first; NaN there must not be blamed on the UNet at step 1."""
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(init)
    with torch.no_grad():
        pipe.vae.encoder.conv_in.bias[0] = float("nan")
    with pytest.raises(NumericsError) as info:
        pipe.generate(request(init_image=str(init), strength=0.5))
    assert "VAE encoder" in str(info.value), str(info.value)


def test_fp16_vae_overflow_falls_back_to_float32_and_logs_it(tiny_files, caplog, monkeypatch):
    """A whole generation with an fp16 VAE whose decoder overflows (as the official SDXL VAE does in fp16:
    activations past 65504 -> Inf). The overflow is simulated: the decoder returns Inf whenever it runs in
    fp16, and works in float32. The image must come out finite and not black (the float32 retry ran), the
    fallback must be logged as a warning naming the VAE and both dtypes, and the VAE must be fp16 again."""
    pipe = SDXL.load(tiny_files["base"], vae_dtype=torch.float16)
    decoder_forward = pipe.vae.decoder.forward
    dtypes = []

    def overflowing(h):
        out = decoder_forward(h)
        dtypes.append(out.dtype)
        return torch.full_like(out, float("inf")) if out.dtype == torch.float16 else out

    monkeypatch.setattr(pipe.vae.decoder, "forward", overflowing)
    with caplog.at_level(logging.WARNING):
        result = pipe.generate(request(steps=2))
    assert dtypes == [torch.float16, torch.float32]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("VAE" in m and "float16" in m and "float32" in m for m in warnings), warnings
    pixels = np.asarray(result.images[0], dtype=np.float32)
    assert pixels.std() > 0  # a real picture, not a constant (black) one
    assert next(pipe.vae.parameters()).dtype == torch.float16  # the VAE is back in fp16 afterwards


def test_a_clean_generation_passes_every_check(pipe, caplog):
    """The checks must not fire on healthy models (no false alarms, no fallback warning)."""
    with caplog.at_level(logging.WARNING):
        result = pipe.generate(request(steps=3))
    assert torch.isfinite(result.latents).all()
    assert not [r for r in caplog.records if "overflow" in r.getMessage()]
