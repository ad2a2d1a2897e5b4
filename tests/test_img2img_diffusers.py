"""img2img and inpainting reproduce diffusers' stock pipelines seed for seed, on tiny random-weight
official-layout files (tests/conftest.py), PSNR >= 40 dB on the 8-bit images.

References: StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline built from the same file
(tests/reference.py), generator=torch.Generator("cpu").manual_seed(seed), negative_prompt=None. What makes
them match (pipeline.prepare_latents): the init latents are a posterior sample drawn from the seed's
generator BEFORE the noise, the masked image is encoded with the generator after it, the latent mask is the
pixel mask thresholded at 0.5 and sampled nearest, and outside it the latents follow init + noise * sigma.

diffusers does not paste the original pixels back outside the mask; we do (as A1111 does: the VAE round
trip would otherwise change the untouched pixels). The inpainting tests therefore compare our final latents
with diffusers' (before any decode), our image with diffusers' image pasted the same way, and the repainted
region alone, where no paste is involved.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reference import diffusers_base_pipeline, dpmpp_2m_karras_scheduler, euler_scheduler, psnr, to_uint8
from sdxl.pipeline import SDXL, _masked, prepare_latents
from sdxl.request import GenerationRequest

# diffusers 0.42 + numpy 2 warn inside set_timesteps; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

PROMPT = "a large red circle above a small blue square"
W, H = 96, 64
STEPS, STRENGTH, CFG = 10, 0.6, 5.0


def _init_image() -> Image.Image:
    """A smooth random colour field (a VAE on random weights makes noise of anything sharper)."""
    small = np.random.default_rng(0).integers(0, 255, (H // 16, W // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((W, H), Image.BICUBIC)


def _mask() -> Image.Image:
    """A rectangle that does not sit on the 8-pixel latent grid (so the latent mask's sampling matters)."""
    m = Image.new("L", (W, H), 0)
    m.paste(255, (21, 11, 70, 45))
    return m


def _scheduler(sampler: str):
    if sampler == "euler":
        return euler_scheduler()
    if sampler == "euler_a":
        from diffusers import EulerAncestralDiscreteScheduler

        return EulerAncestralDiscreteScheduler.from_config(euler_scheduler().config)
    return dpmpp_2m_karras_scheduler()


SCHEDULE = {"euler": "leading", "euler_a": "leading", "dpmpp_2m": "karras"}


def _diffusers(kind: str, path, tmp_path, sampler: str):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    cls = StableDiffusionXLInpaintPipeline if kind == "inpaint" else StableDiffusionXLImg2ImgPipeline
    return diffusers_base_pipeline(path, tmp_path, scheduler=_scheduler(sampler), cls=cls)


def _decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """diffusers' own decode of its latents: what its pipeline does after the loop (output_type="np")."""
    with torch.no_grad():
        img = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return to_uint8(pipe.image_processor.postprocess(img, output_type="np"))[0]


def _request(sampler: str, seed: int, **kw) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT,
        width=W,
        height=H,
        steps=STEPS,
        cfg=CFG,
        seed=seed,
        sampler=sampler,
        schedule=SCHEDULE[sampler],
        init_image=_init_image(),
        **{"strength": STRENGTH, **kw},
    )


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(tiny_files, tmp_path, sampler):
    ours = np.asarray(SDXL.load(tiny_files["base"]).generate(_request(sampler, 7)).images[0])
    pipe = _diffusers("img2img", tiny_files["base"], tmp_path, sampler)
    with torch.no_grad():
        ref = pipe(
            PROMPT,
            image=_init_image(),
            strength=STRENGTH,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="np",
        ).images
    ref8 = to_uint8(ref)[0]
    assert ours.std() > 1.0
    value = psnr(ours, ref8)
    print(f"img2img {sampler}: PSNR {value:.2f} dB")
    assert value >= 40.0


def _paste(image: np.ndarray, mask: Image.Image) -> np.ndarray:
    """The original pixels outside the mask, as our pipeline's final paste does with mask_blur=0."""
    m = (np.asarray(mask, dtype=np.float32) / 255.0)[..., None]
    src = np.asarray(_init_image(), dtype=np.float32)
    return np.round(image * m + src * (1 - m)).astype(np.uint8)


@pytest.mark.parametrize(
    "model,sampler,strength",
    [
        ("base", "euler", STRENGTH),
        ("base", "euler", 1.0),
        ("base", "dpmpp_2m", STRENGTH),
        ("inpaint", "euler", STRENGTH),
        ("inpaint", "euler", 1.0),
    ],
)
def test_inpaint_matches_diffusers(tiny_files, tmp_path, model, sampler, strength):
    """4-channel base (diffusers blends the re-noised original outside the mask after every step) and the
    9-channel inpainting UNet (mask and masked-image latents as extra input channels)."""
    req = _request(sampler, 9, mask_image=_mask(), mask_blur=0, strength=strength)
    res = SDXL.load(tiny_files[model]).generate(req)
    ours = np.asarray(res.images[0])

    pipe = _diffusers("inpaint", tiny_files[model], tmp_path, sampler)
    with torch.no_grad():
        lat = pipe(
            PROMPT,
            image=_init_image(),
            mask_image=_mask(),
            width=W,
            height=H,
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            generator=torch.Generator("cpu").manual_seed(9),
            output_type="latent",
        ).images
    err = float((res.latents - lat).abs().max() / lat.abs().max())
    ref = _paste(_decode(pipe, lat), _mask())
    inside = np.asarray(_mask()) > 127
    whole, hole = psnr(ours, ref), psnr(ours[inside], ref[inside])
    print(
        f"inpaint {model} {sampler} strength {strength}: latents rel err {err:.1e}, "
        f"PSNR {whole:.2f} dB (inside the mask {hole:.2f} dB)"
    )
    assert err <= 1e-3
    assert hole >= 40.0 and whole >= 40.0
    assert np.abs(ours[inside].astype(int) - np.asarray(_init_image())[inside]).mean() > 5  # repainted


def test_ancestral_img2img_matches_diffusers(tiny_files, tmp_path):
    """Euler ancestral draws its per-step noise from the same generator, after the init latents and the noise
    (one image: diffusers' scheduler.step(..., generator) continues that stream)."""
    ours = np.asarray(SDXL.load(tiny_files["base"]).generate(_request("euler_a", 4)).images[0])
    pipe = _diffusers("img2img", tiny_files["base"], tmp_path, "euler_a")
    with torch.no_grad():
        ref = pipe(
            PROMPT,
            image=_init_image(),
            strength=STRENGTH,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            generator=torch.Generator("cpu").manual_seed(4),
            output_type="np",
        ).images
    value = psnr(ours, to_uint8(ref)[0])
    print(f"img2img euler_a: PSNR {value:.2f} dB")
    assert value >= 40.0


@pytest.fixture(scope="module")
def base(tiny_files):
    return SDXL.load(tiny_files["base"])


def test_init_latents_are_posterior_samples_drawn_before_the_noise(base):
    """Per seed: eps of the posterior sample, then the noise, then (inpainting) the masked image's eps; the
    first seed's generator then goes on to the sampler. The mean alone (two seeds, one init latent) fails."""
    req = _request("euler", 0, mask_image=_mask(), mask_blur=0).resolve(base.config)
    f = base.config.vae.downscale
    shape = (base.config.vae.embed_dim, H // f, W // f)
    start = prepare_latents(base, req, [3, 4], shape, base.sigmas_for(req))
    assert not torch.allclose(start.init[0], start.init[1], atol=1e-3)

    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(_init_image(), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        mean, logvar = base.vae.encode(pixels[None])
    k, std = base.config.vae.scale_factor, torch.exp(0.5 * logvar.clamp(-30, 20))
    for i, seed in enumerate([3, 4]):
        g = torch.Generator("cpu").manual_seed(seed)
        eps = torch.randn((1, *shape), generator=g)
        noise = torch.randn((1, *shape), generator=g)
        torch.randn((1, *shape), generator=g)  # the masked image's posterior sample
        torch.testing.assert_close(start.init[i : i + 1], (mean + std * eps) * k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(start.noise[i : i + 1], noise)
        torch.testing.assert_close(start.x[i : i + 1], (mean + std * eps) * k + noise * start.sigmas[0])
        if i == 0:
            after = torch.randn(4, generator=g)
    assert torch.equal(torch.randn(4, generator=start.generator), after)
    assert len(start.sigmas) == int(STEPS * STRENGTH) + 1


@pytest.mark.parametrize("masked", [False, True])
def test_batch_image_equals_its_seed_alone(base, masked):
    kw = {"mask_image": _mask(), "mask_blur": 4} if masked else {}
    both = base.generate(_request("euler", 30, batch=2, **kw))
    alone = base.generate(_request("euler", 31, **kw))
    torch.testing.assert_close(both.latents[1:], alone.latents, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both.latents[:1], both.latents[1:], atol=1e-2)


def test_masked_denoiser_blends_every_call_but_the_first():
    """diffusers blends after each step, so the UNet's first call sees the unblended start (pure noise at
    strength 1) and every later call sees init + noise * sigma outside the mask; its output there is init."""
    seen = []

    def inner(x, sigma):
        seen.append(x.clone())
        return torch.full_like(x, 7.0)

    init, noise = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2)
    mask = torch.tensor([[[[1.0, 0.0]]]])  # left repainted, right kept
    d = _masked(inner, init, noise, mask, first_sigma=10.0)
    x = torch.tensor([[[[5.0, 5.0]]]])
    out0 = d(x, torch.tensor([10.0]))
    out1 = d(x, torch.tensor([2.0]))
    assert seen[0].flatten().tolist() == [5.0, 5.0]
    assert seen[1].flatten().tolist() == [5.0, 2.0]
    assert out0.flatten().tolist() == out1.flatten().tolist() == [7.0, 0.0]


def test_inpainting_unet_without_a_mask_repaints_everything(tiny_files):
    """txt2img and img2img on a 9-channel inpainting UNet: mask 1 everywhere and the masked image all zeros
    (A1111's conditioning for inpainting models); a 4-channel input used to crash the UNet."""
    pipe = SDXL.load(tiny_files["inpaint"])
    for req in (GenerationRequest(prompt=PROMPT, width=W, height=H, steps=3, seed=2), _request("euler", 2)):
        req = req.resolve(pipe.config)
        start = prepare_latents(pipe, req, [2], (4, H // 8, W // 8), pipe.sigmas_for(req))
        assert start.extra.shape == (1, 5, H // 8, W // 8)
        assert bool((start.extra[:, :1] == 1).all())
        out = np.asarray(pipe.generate(req).images[0])
        assert out.shape == (H, W, 3) and out.std() > 1.0


def test_ancestral_txt2img_matches_diffusers(tiny_files, tmp_path, base):
    """txt2img too: the sampler's noise continues the seed's generator after the initial noise (a fresh
    generator of the same seed would repeat the initial noise as the first ancestral step's noise)."""
    req = GenerationRequest(
        prompt=PROMPT, width=W, height=H, steps=6, cfg=CFG, seed=3, sampler="euler_a", schedule="leading"
    )
    ours = np.asarray(base.generate(req).images[0])
    pipe = diffusers_base_pipeline(tiny_files["base"], tmp_path, scheduler=_scheduler("euler_a"))
    with torch.no_grad():
        ref = pipe(
            PROMPT,
            num_inference_steps=6,
            guidance_scale=CFG,
            width=W,
            height=H,
            generator=torch.Generator("cpu").manual_seed(3),
            output_type="np",
        ).images
    value = psnr(ours, to_uint8(ref)[0])
    print(f"txt2img euler_a: PSNR {value:.2f} dB")
    assert value >= 40.0
