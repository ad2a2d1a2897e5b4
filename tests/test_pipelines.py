"""Pipelines end to end on tiny random-weight official-layout files: refiner ensemble and DPM++ 2M Karras
against diffusers (PSNR >= 40 dB on 8-bit images), seeds, img2img, inpainting, tiled and overflowing VAEs,
interruption, CPU offload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reference import (
    diffusers_base_pipeline,
    diffusers_refiner_pipeline,
    dpmpp_2m_karras_scheduler,
    psnr,
    to_uint8,
)
from sdxl.pipeline import SDXL, Interrupted
from sdxl.request import GenerationRequest

PROMPT = "a large red circle above a small blue square"


@pytest.fixture(scope="module")
def base(tiny_files):
    return SDXL.load(tiny_files["base"])


def test_ensemble_of_experts_matches_diffusers(tiny_files, tmp_path, base):
    """Base denoises the high-noise 80%, the refiner finishes (diffusers denoising_end/denoising_start)."""
    refiner = SDXL.load(tiny_files["refiner"])
    req = GenerationRequest(
        prompt=PROMPT,
        width=64,
        height=64,
        steps=10,
        cfg=5.0,
        seed=3,
        sampler="euler",
        schedule="leading",
        refiner=str(tiny_files["refiner"]),
        refiner_switch=0.8,
    )
    ours = np.asarray(base.generate(req, refiner=refiner).images[0])

    dbase = diffusers_base_pipeline(tiny_files["base"], tmp_path / "b")
    dref = diffusers_refiner_pipeline(tiny_files["refiner"], tmp_path / "r")
    with torch.no_grad():
        lat = dbase(
            PROMPT,
            num_inference_steps=10,
            guidance_scale=5.0,
            width=64,
            height=64,
            denoising_end=0.8,
            generator=torch.Generator("cpu").manual_seed(3),
            output_type="latent",
        ).images
        img = dref(
            PROMPT,
            image=lat,
            num_inference_steps=10,
            guidance_scale=5.0,
            denoising_start=0.8,
            generator=torch.Generator("cpu").manual_seed(3),
            output_type="np",
        ).images
    assert ours.std() > 1.0
    assert psnr(ours, to_uint8(img)[0]) >= 40.0


def test_dpmpp_2m_karras_matches_diffusers(tiny_files, tmp_path, base):
    sched = dpmpp_2m_karras_scheduler()
    pipe = diffusers_base_pipeline(tiny_files["base"], tmp_path, scheduler=sched)
    req = GenerationRequest(
        prompt=PROMPT, width=64, height=64, steps=8, cfg=6.0, seed=11, sampler="dpmpp_2m", schedule="karras"
    )
    ours = np.asarray(base.generate(req).images[0])
    with torch.no_grad():
        ref = pipe(
            PROMPT,
            num_inference_steps=8,
            guidance_scale=6.0,
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(11),
            output_type="np",
        ).images
    assert psnr(ours, to_uint8(ref)[0]) >= 40.0


@pytest.mark.parametrize(
    "sampler", ["euler_a", "dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde", "lcm", "dpm_2_a"]
)
def test_stochastic_samplers_are_seeded(base, sampler):
    def run(seed):
        req = GenerationRequest(
            prompt=PROMPT, width=64, height=64, steps=4, seed=seed, sampler=sampler, schedule="karras"
        )
        return base.generate(req).latents

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batch_image_equals_its_seed_alone(base):
    req = GenerationRequest(
        prompt=PROMPT, width=64, height=64, steps=3, seed=20, batch=2, sampler="euler", schedule="karras"
    )
    both = base.generate(req)
    assert both.seeds == [20, 21]
    alone = base.generate(GenerationRequest(**{**req.to_dict(), "batch": 1, "seed": 21}))
    torch.testing.assert_close(both.latents[1:], alone.latents, rtol=1e-4, atol=1e-4)


def test_img2img_and_inpaint_keep_what_they_should(base, tiny_files):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = base.generate(
        GenerationRequest(prompt=PROMPT, width=64, height=64, steps=6, seed=1, init_image=init, strength=0.3)
    ).images[0]
    assert out.size == (64, 64)

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    req = GenerationRequest(
        prompt=PROMPT,
        width=64,
        height=64,
        steps=6,
        seed=1,
        init_image=init,
        mask_image=mask,
        strength=1.0,
        mask_blur=0,
    )
    painted = np.asarray(base.generate(req).images[0]).astype(int)
    src = np.asarray(init).astype(int)
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert np.abs(painted[outside] - src[outside]).max() <= 1  # untouched pixels are kept
    assert np.abs(painted[~outside] - src[~outside]).mean() > 5  # the hole was repainted

    inpaint = SDXL.load(tiny_files["inpaint"])
    assert inpaint.config.unet.in_channels == 9
    p2 = np.asarray(inpaint.generate(req).images[0]).astype(int)
    assert np.abs(p2[outside] - src[outside]).max() <= 1


def test_interrupt_between_steps(base):
    seen = []

    def cb(p):
        seen.append(p.step)
        return "stop" if p.step == 2 else None

    with pytest.raises(Interrupted):
        base.generate(GenerationRequest(prompt=PROMPT, width=64, height=64, steps=6, seed=1), callback=cb)
    assert seen == [1, 2]


def test_tiled_vae_decode_is_seamless(base):
    """A 128x128 latent (1024x1024 image) decoded in 64-latent tiles with 16 of overlap vs in one piece.
    (The untiled reference is the memory problem tiling solves: the VAE's mid-block attention over a 256x256
    latent alone would need a 65536^2 attention matrix, 17 GB in float32.)

    Tolerance: mean abs difference <= 0.06 (images in [-1, 1]); GroupNorm statistics and the mid-block
    attention see one tile instead of the whole image, so tiles are not bit-identical, and the blend
    ramps hide it: the largest jump across any tile border is no larger than the largest jump between
    neighbouring pixels inside the untiled image.
    """
    from sdxl.models import vae_utils

    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, 128, 128, generator=g) * 0.3
    lat = torch.nn.functional.avg_pool2d(lat, 9, 1, 4)  # smooth, image-like latents
    with torch.no_grad():
        full = base.decode(lat, tiled=False)
        tiled = base.decode(lat, tiled=True)
    assert (full - tiled).abs().mean() <= 0.06
    dx = (tiled[..., :, 1:] - tiled[..., :, :-1]).abs().amax(dim=(0, 1, 2))  # per column boundary
    stride = (vae_utils.TILE_LATENT - vae_utils.TILE_OVERLAP) * 8
    side = lat.shape[-1] * 8
    borders = [x for x in range(stride, side, stride)] + [
        x + vae_utils.TILE_OVERLAP * 8 for x in range(0, side, stride)
    ]
    border_jump = max(float(dx[min(b, side - 2)]) for b in borders)
    inside_full = float((full[..., :, 1:] - full[..., :, :-1]).abs().max())
    assert border_jump <= inside_full


def test_fp16_vae_overflow_still_gives_finite_image(base, tiny_files, caplog):
    """Scale the decoder so fp16 activations overflow: decode falls back to float32, logs it, stays finite."""
    pipe = SDXL.load(tiny_files["base"], vae_dtype=torch.float16)
    with torch.no_grad():
        pipe.vae.post_quant_conv.weight.mul_(100.0)  # together: conv_in outputs beyond fp16's 65504 -> inf
        pipe.vae.decoder.conv_in.weight.mul_(1e4)
        pipe.vae.decoder.conv_in.bias.mul_(1e4)
        lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        raw = pipe.vae.decode(lat.half() / pipe.config.vae.scale_factor)
        assert not torch.isfinite(raw).all(), "the test must really overflow in fp16"
        with caplog.at_level("WARNING"):
            img = pipe.decode(lat)
    assert torch.isfinite(img).all()
    assert any("float32" in r.message for r in caplog.records)


def test_cpu_offload_gives_same_result(tiny_files, base):
    req = GenerationRequest(prompt=PROMPT, width=64, height=64, steps=3, seed=2, sampler="euler")
    ref = base.generate(req).latents
    off = SDXL.load(tiny_files["base"])
    off.enable_cpu_offload("cpu")
    got = off.generate(GenerationRequest(**req.to_dict())).latents
    assert torch.equal(ref, got)
    assert all(p.device.type == "cpu" for p in off.unet.parameters())


def test_negative_micro_conditioning_changes_uncond_only(base):
    req = GenerationRequest(
        prompt=PROMPT,
        width=64,
        height=64,
        steps=2,
        seed=2,
        negative_original_width=256,
        negative_original_height=256,
        negative_target_width=64,
        negative_target_height=64,
    )
    cond, uncond = base.text_conditioning(req, 1)
    plain_cond, plain_uncond = base.text_conditioning(
        GenerationRequest(prompt=PROMPT, width=64, height=64), 1
    )
    assert torch.equal(cond[0][2], plain_cond[0][2])
    assert not torch.equal(uncond[0][2], plain_uncond[0][2])
