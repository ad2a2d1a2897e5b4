"""Hires fix (A1111's two passes) on the tiny random-weight model: the pipeline's result equals the same two
passes written out by hand with the Python API, sizes follow A1111's rules, the infotext reads back to what
was written, and a real A1111 client (webuiapi from PyPI) gets the upscaled image with the Hires fields."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import serve_in_thread, tiny_pipeline
from sdxl import upscale
from sdxl.errors import RequestError
from sdxl.metadata import format_a1111, parse_a1111
from sdxl.pipeline import SDXL, from_pil, to_pil
from sdxl.request import GenerationRequest, Limits
from sdxl.sampling import samplers as S
from sdxl.serve.app import create_app
from sdxl.serve.settings import ServeSettings

SMALL = {"prompt": "a red circle", "negative_prompt": "blur", "width": 32, "height": 48, "steps": 3,
         "seed": 7, "cfg": 4.0, "sampler": "Euler a", "schedule": "Karras"}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@torch.no_grad()
def two_passes_by_hand(pipe: SDXL, upscaler: str, size: tuple[int, int], steps: int, strength: float,
                       prompt: str | None = None):
    """txt2img at the small size; the latents upscaled (interpolated in the mode, or decoded, resized with
    PIL and encoded); then img2img at the large size from them: A1111's schedule for a given step count
    (the last `steps` of int(steps / strength)), noise and sampler draws from one CPU generator of the
    same seed."""
    first = pipe.generate(GenerationRequest(**SMALL))
    w, h = size
    f = pipe.config.vae.downscale
    g = torch.Generator("cpu").manual_seed(SMALL["seed"])
    if upscaler.startswith("Latent"):
        mode, antialias = {"Latent": ("bilinear", False), "Latent (bicubic antialiased)": ("bicubic", True),
                           "Latent (nearest-exact)": ("nearest-exact", False)}[upscaler]
        init = F.interpolate(first.latents, size=(h // f, w // f), mode=mode, antialias=antialias)
    else:
        image = to_pil(pipe.decode(first.latents))[0].resize((w, h), Image.LANCZOS)
        init = pipe.encode(from_pil(image, w, h), generator=[g], sample=True)
    req = first.request.replace(width=w, height=h, steps=steps, strength=strength,
                                prompt=prompt or SMALL["prompt"])
    sigmas = pipe.sigmas_for(req, int(steps / strength))[-(steps + 1):]
    noise = torch.randn((1, *init.shape[1:]), generator=g)
    cond, uncond = pipe.text_conditioning(req, 1)
    denoiser = pipe.make_denoiser(cond, uncond, req, sigmas)
    x = S.SAMPLERS[req.sampler](denoiser, init + noise * sigmas[0], sigmas, generator=g)
    return to_pil(pipe.decode(x))[0]


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)",
                                      "Lanczos"])
def test_hires_fix_equals_the_two_passes_by_hand(pipe, upscaler):
    stages = []
    req = GenerationRequest(**SMALL, hires_scale=2.0, hires_upscaler=upscaler, hires_steps=2,
                            hires_strength=0.6)
    result = pipe.generate(req, callback=lambda p: stages.append((p.stage, p.step, p.total)))
    assert result.images[0].size == (64, 96)
    assert stages == [("base", 1, 3), ("base", 2, 3), ("base", 3, 3), ("hires", 1, 2), ("hires", 2, 2)]
    by_hand = two_passes_by_hand(pipe, upscaler, (64, 96), steps=2, strength=0.6)
    # the same operations in the same order on the CPU: bit-equal pixels
    assert np.array_equal(pixels(result.images[0]), pixels(by_hand))
    first = pipe.generate(GenerationRequest(**SMALL)).images[0]  # the second pass changed the image
    assert np.abs(pixels(first.resize((64, 96), Image.LANCZOS)) - pixels(result.images[0])).mean() > 1


def test_hires_defaults_to_the_first_pass_steps_and_takes_its_own_prompt(pipe):
    req = GenerationRequest(**SMALL, hires_scale=2.0, hires_prompt="a blue square")
    result = pipe.generate(req)
    by_hand = two_passes_by_hand(pipe, "Latent", (64, 96), steps=3, strength=0.7, prompt="a blue square")
    assert np.array_equal(pixels(result.images[0]), pixels(by_hand))
    assert "Hires prompt: a blue square" in result.infos[0]


@pytest.mark.parametrize(
    "size, resize, scale, expected",
    [
        ((512, 768), (0, 0), 2.0, (1024, 1536, 1024, 1536)),
        ((512, 768), (0, 0), 1.5, (768, 1152, 768, 1152)),
        ((520, 520), (0, 0), 1.3, (676, 676, 672, 672)),  # int(520 * 1.3) = 676; the latents are 676 // 8
        ((512, 768), (1024, 0), 2.0, (1024, 1536, 1024, 1536)),  # the other side from the aspect ratio
        ((512, 768), (0, 1000), 2.0, (666, 1000, 664, 1000)),  # 1000 * 512 // 768 = 666
        ((512, 768), (1024, 1024), 2.0, (1024, 1536, 1024, 1024)),  # covers the box, crops the height
        ((768, 512), (1024, 1024), 2.0, (1536, 1024, 1024, 1024)),  # crops the width
        ((512, 768), (690, 683), 2.0, (690, 1035, 688, 680)),  # 1035 // 8 - (1035 - 683) // 8 = 85 latents
    ],
)
def test_hires_sizes_as_a1111_computes_them(size, resize, scale, expected):
    req = GenerationRequest(width=size[0], height=size[1], hires_scale=scale, hires_width=resize[0],
                            hires_height=resize[1])
    assert req.hires_size() == expected


def test_an_upscale_to_the_same_size_does_nothing_as_in_a1111(pipe):
    plain = pipe.generate(GenerationRequest(**SMALL))
    same = pipe.generate(GenerationRequest(**SMALL, hires_scale=1.0))
    assert not same.request.hires and "Hires" not in same.infos[0]
    assert np.array_equal(pixels(plain.images[0]), pixels(same.images[0]))


def test_resized_and_cropped_hires_image_has_the_box_size(pipe):
    req = GenerationRequest(**SMALL, hires_width=64, hires_height=64, hires_steps=1)
    result = pipe.generate(req)
    assert result.images[0].size == (64, 64)
    assert "Hires resize: 64x64" in result.infos[0] and "Hires upscale:" not in result.infos[0]


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"hires_scale": 100.0}, "hires_scale: 100.0 is outside 0..8"),
        ({"hires_scale": 3.0}, "hires_scale: the upscaled size 3072x3072 = 9437184 pixels, the limit is"),
        ({"hires_width": 4096, "hires_height": 4096},
         "hires_width/hires_height: the upscaled size 4096x4096"),
        ({"hires_scale": 2.0, "hires_strength": 0.0}, "hires_strength: 0.0 is outside 0.01..1"),
        ({"hires_scale": 2.0, "hires_steps": -1}, "hires_steps: -1 is outside 0..150"),
        ({"hires_scale": 2.0, "hires_sampler": "Magic"}, "unknown sampler"),
        ({"hires_scale": 2.0, "init_image": "x.png"}, "hires_scale: the hires fix is a txt2img pass"),
    ],
)
def test_bad_hires_fields_are_one_line_naming_the_field(fields, words):
    with pytest.raises(RequestError) as e:
        GenerationRequest(prompt="x", width=1024, height=1024, **fields).validate()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_model_upscaler_names_resolve_in_the_upscalers_folder_before_any_work(pipe, tmp_path):
    """A hires_upscaler that is no latent mode or resampler names a model upscaler file: looked up in
    the pipeline's upscalers folders (or taken as a path where paths are allowed) before the first pass;
    a name found nowhere is one line listing every known name, and a file that is no upscaler (or no
    spandrel to read it with) is one line naming the field."""
    from safetensors.torch import save_file

    folder = tmp_path / "upscalers"
    folder.mkdir()
    save_file({"not.an.esrgan": torch.zeros(3)}, str(folder / "4x-Fake.safetensors"))
    req = GenerationRequest(**SMALL, hires_scale=2.0, hires_upscaler="Magic", hires_steps=1)
    calls = []
    real = pipe.text_conditioning
    pipe.text_conditioning = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        pipe.upscaler_dirs = [folder]
        with pytest.raises(RequestError) as e:
            pipe.generate(req)
        msg = str(e.value)
        assert msg.startswith("hires_upscaler: 'Magic' is not an upscaler (known: Latent,")
        assert "\n" not in msg
        assert "4x-Fake" in msg and not calls  # the folder's files are listed; nothing ran
        pipe.allow_lora_paths = False  # as on the server: names only
        with pytest.raises(RequestError) as e:
            pipe.generate(req.replace(hires_upscaler=str(folder / "4x-Fake.safetensors")))
        assert "give a name inside the upscaler folder, not a path" in str(e.value)
        for name in ("4x-Fake", "4x-Fake.safetensors"):  # found by name: then the file is read
            with pytest.raises(RequestError) as e:
                pipe.generate(req.replace(hires_upscaler=name))
            msg = str(e.value)
            assert msg.startswith("hires_upscaler: ") and "\n" not in msg
            assert "spandrel" in msg and "4x-Fake" in msg
    finally:
        pipe.upscaler_dirs, pipe.allow_lora_paths = [], True
        pipe.text_conditioning = real


def test_cli_flags_come_from_the_fields():
    from sdxl.cli import _field_flags, _request_fields

    flags = {flag for f in _request_fields() for flag in _field_flags(f)}
    assert {"--hires-scale", "--hires-upscaler", "--hires-strength", "--hires-steps", "--hires-width",
            "--hires-sampler", "--hires-prompt"} <= flags


def test_infotext_writes_and_reads_the_hires_fields_symmetrically(pipe):
    req = GenerationRequest(**SMALL, hires_scale=2.0, hires_steps=2, hires_strength=0.6,
                            hires_sampler="DPM++ 2M", hires_schedule="Exponential", hires_prompt="a, b: c",
                            hires_negative_prompt="noise")
    text = pipe.generate(req).infos[0]
    assert ("Denoising strength: 0.6, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent, "
            "Hires sampler: DPM++ 2M, Hires schedule type: Exponential") in text
    parsed = parse_a1111(text)
    assert parsed["hires_upscale"] == 2.0 and parsed["hires_steps"] == 2
    assert parsed["hires_upscaler"] == "Latent" and parsed["denoising_strength"] == 0.6
    assert parsed["hires_sampler"] == "dpmpp_2m" and parsed["hires_schedule"] == "exponential"
    assert parsed["hires_prompt"] == "a, b: c" and parsed["hires_negative_prompt"] == "noise"
    assert format_a1111(parsed) == text


def test_stored_request_repeats_the_hires_run(pipe):
    req = GenerationRequest(**SMALL, hires_scale=2.0, hires_upscaler="Nearest", hires_steps=1)
    result = pipe.generate(req)
    again = pipe.generate(GenerationRequest.from_dict(result.request.to_dict()))
    assert result.request.to_dict()["hires_upscaler"] == "Nearest"
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))


def test_upscale_registry():
    assert upscale.pixel_upscaler_names() == ["None", "Lanczos", "Nearest"]
    im = Image.new("RGB", (10, 6), (1, 2, 3))
    assert upscale.upscale_image(im, "Lanczos", 2.5).size == (25, 15)
    assert upscale.upscale_image(im, "None", 2.0).size == (10, 6)
    with pytest.raises(ValueError, match="'Magic' is not an upscaler"):
        upscale.upscale_image(im, "Magic", 2.0)


# ------------------------------------------------------------------------------- the A1111 API, over HTTP
@pytest.fixture(scope="module")
def server_url(pipe, tmp_path_factory):
    """The app served by uvicorn on a free port in a thread (a real HTTP server for the A1111 client)."""
    root = tmp_path_factory.mktemp("hires_serve")
    (root / "models").mkdir()
    limits = Limits(max_pixels=128 * 128, max_steps=20, max_batch=2)
    settings = ServeSettings(data_dir=root / "data", models_dir=root / "models", queue_size=4,
                             shutdown_grace_s=5, limits=limits)
    with serve_in_thread(create_app(settings, pipeline=pipe)) as port:
        yield f"http://127.0.0.1:{port}"


def test_webuiapi_client_gets_the_hires_image_with_its_infotext(server_url, pipe):
    import webuiapi  # lazy: the third-party client is a test dependency only

    port = int(server_url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    result = api.txt2img(prompt="a red circle", negative_prompt="blur", seed=7, steps=3, width=32, height=48,
                         cfg_scale=4, sampler_name="Euler a", scheduler="Karras", enable_hr=True, hr_scale=2,
                         hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=2)
    assert result.image.size == (64, 96)
    info = result.image.info["parameters"]
    assert "Size: 32x48" in info
    assert "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent" in info
    own = pipe.generate(GenerationRequest(**SMALL, hires_scale=2.0, hires_steps=2, hires_strength=0.6))
    assert np.array_equal(pixels(result.image), pixels(own.images[0]))


def test_a1111_lists_upscalers_and_latent_modes(server_url):
    modes = httpx.get(f"{server_url}/sdapi/v1/latent-upscale-modes").json()
    assert [m["name"] for m in modes] == ["Latent", "Latent (antialiased)", "Latent (bicubic)",
                                          "Latent (bicubic antialiased)", "Latent (nearest)",
                                          "Latent (nearest-exact)"]
    ups = httpx.get(f"{server_url}/sdapi/v1/upscalers").json()
    assert [u["name"] for u in ups] == ["None", "Lanczos", "Nearest"]
    assert set(ups[0]) == {"name", "model_name", "model_path", "model_url", "scale"}


@pytest.mark.parametrize(
    "body, words",
    [
        ({"hr_scale": 100}, "hires_scale: 100"),
        ({"hr_scale": 4}, "hires_scale: the upscaled size 128x192 = 24576 pixels, the limit is 16384"),
        ({"hr_upscaler": "Magic"}, "hires_upscaler: 'Magic' is not an upscaler"),
        ({"hr_resize_x": 4}, "hires_width: 4 is outside 8..65536"),
    ],
)
def test_bad_a1111_hires_requests_are_400_naming_the_field(server_url, body, words):
    r = httpx.post(f"{server_url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 32, "height": 48,
                                                           "steps": 2, "enable_hr": True, **body})
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]


# ------------------------------------------------------------------------------------------------ the CLI
def _cli(*args: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "sdxl", "generate", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_hires_flags_and_from_repeat_the_run(tiny_files, tmp_path):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    r = _cli("a red circle", "--model", str(tiny_files["base"]), "-W", "32", "-H", "48", "--steps", "2",
             "--seed", "3", "--hires-scale", "2", "--hires-upscaler", "Latent (bicubic)", "--hires-strength",
             "0.5", "--hires-steps", "1", "-o", str(first))
    assert r.returncode == 0, r.stderr
    image = Image.open(first)
    assert image.size == (64, 96)
    assert "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 1, Hires upscaler: Latent (bicubic)" in (
        image.info["parameters"])
    r = _cli("--from", str(first), "--model", str(tiny_files["base"]), "-o", str(again))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(again)))


def test_cli_bad_hires_flag_is_one_line_naming_the_flag():
    r = _cli("a cat", "--hires-scale", "2", "--hires-upscaler", "Magic")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "error: --hires-upscaler: 'Magic' is not an upscaler (known: Latent, Latent (antialiased), "
        "Latent (bicubic), Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), None, "
        "Lanczos, Nearest) (no upscalers folder is set; give a file's path)"]


def test_native_job_api_runs_the_hires_fix(server_url, pipe):
    fields = {**SMALL, "hires_scale": 2.0, "hires_steps": 1, "hires_upscaler": "Nearest"}
    with httpx.Client(base_url=server_url, timeout=30) as api:
        job = api.post("/jobs", json=fields).json()
        deadline = time.monotonic() + 60
        while job["status"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
            job = api.get(f"/jobs/{job['id']}").json()
        assert job["status"] == "done" and job["progress"] == 1.0, job
        assert "Hires upscale: 2, Hires steps: 1, Hires upscaler: Nearest" in job["images"][0]["info"]
        served = Image.open(io.BytesIO(api.get(job["images"][0]["url"]).content))
    assert served.size == (64, 96)
    own = pipe.generate(GenerationRequest(**fields))
    assert np.array_equal(pixels(served), pixels(own.images[0]))
