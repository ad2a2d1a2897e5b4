"""A1111's composable diffusion (`a cat AND a dog :0.7`) and region masks: the split against hand-written
cases, the guided prediction against the formula computed from separate UNet calls on the tiny random-weight
model, weight 0 and full-white masks reducing to one prompt, prompts without AND untouched, the request
checks, the A1111 API and the CLI (--region-mask, --from)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import sdxl.pipeline as pipeline_module
from conftest import tiny_pipeline
from sdxl.pipeline import SDXL
from sdxl.prompts import PromptError, SubPrompt, compose_prompts, split_subprompts
from sdxl.request import GenerationRequest, Limits, RequestError
from sdxl.sampling.guidance import Composable, region_coverage
from sdxl.serve.app import create_app
from sdxl.serve.settings import ServeSettings

A, B = "a red circle", " a blue square"  # B as the split leaves it (leading space kept, as in A1111)


# ------------------------------------------------------------------------------------------------ splitting
@pytest.mark.parametrize("text, parts", [
    ("a cat AND a dog :0.7", [("a cat", 1.0), (" a dog", 0.7)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a:0.5 AND b: -1.5 AND c :2.", [("a", 0.5), (" b", -1.5), (" c", 2.0)]),
    ("a AND b:.25  ", [("a", 1.0), (" b", 0.25)]),
    ("a cat and a dog", [("a cat and a dog", 1.0)]),  # lower case: no split
    ("ANDROID AND_X x_AND", [("ANDROID AND_X x_AND", 1.0)]),  # AND inside a word: no split
    ("(a AND b)", [("(a", 1.0), (" b)", 1.0)]),  # brackets do not protect AND (A1111's plain regex split)
    ("[a:b:5] AND c", [("[a:b:5]", 1.0), (" c", 1.0)]),
    ("a (cat:1.2) AND [b:c:0.5]:0.3", [("a (cat:1.2)", 1.0), (" [b:c:0.5]", 0.3)]),
    ("x:1e3 AND y", [("x:1e3", 1.0), (" y", 1.0)]),  # no exponents in a sub-prompt weight
    ("a\nAND\nb : 3", [("a", 1.0), ("\nb", 3.0)]),
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("a cat :0.5", [("a cat", 0.5)]),  # one part (the pipeline does not split a prompt without AND)
])
def test_split_subprompts(text, parts):
    assert split_subprompts(text) == [SubPrompt(t, w) for t, w in parts]


def test_compose_prompts_tags_prompt_2_and_no_and():
    assert compose_prompts("a cat :0.5") is None  # no AND: not composable, the text stays as typed
    # <lora:..> tags are removed before the split (a tag after the weight does not hide it)
    assert compose_prompts("a AND b:0.5 <lora:x:0.8>") == [("a", None, 1.0), (" b", None, 0.5)]
    assert compose_prompts("a AND b", "g") == [("a", "g", 1.0), (" b", "g", 1.0)]
    assert compose_prompts("a AND b:2", "g1 AND g2:7") == [("a", "g1", 1.0), (" b", " g2", 2.0)]
    with pytest.raises(PromptError, match="prompt_2 has 3 sub-prompts"):
        compose_prompts("a AND b", "x AND y AND z")


def test_region_coverage_shares():
    m = torch.tensor([[0.0, 1.0, 0.5, 1.0], [0.0, 0.0, 0.25, 1.0], [0.0, 0.0, 0.0, 1.0]])[:, None, None, :]
    a = region_coverage(m)[:, 0, 0]
    expected = torch.tensor([[1.0, 1.0, 0.75, 1 / 3], [0.0, 0.0, 0.25, 1 / 3], [0.0, 0.0, 0.0, 1 / 3]])
    assert torch.allclose(a, expected, atol=1e-7)
    assert torch.allclose(a.sum(0), torch.ones(4))


# ------------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def pipe():
    model = tiny_pipeline()
    # the initial weights: larger ones (x5, as the PAG tests use) make the UNet amplify float rounding,
    # so one batch size differs from another by 1e-1 and no formula can be checked to 1e-5; here the
    # rounding is ~2e-6 and the prompts move the prediction by ~4e-3
    return model


def request(prompt: str, **kw) -> GenerationRequest:
    fields = dict(prompt=prompt, negative_prompt="ugly", width=64, height=64, steps=4, seed=7, cfg=4.0,
                  sampler="euler")
    return GenerationRequest(**{**fields, **kw})


def prediction(pipe: SDXL, req: GenerationRequest, x: torch.Tensor, step: int = 0, pag: bool = False):
    """The guided model output at sampler step `step` for latents x (the denoiser's model_fn)."""
    req = req.resolve(pipe.config)
    cond, uncond = pipe.text_conditioning(req, x.shape[0])
    sigmas = pipe.sigmas_for(req)
    with pipeline_module.guidance_variants(pipe.unet, req) as pag_state:
        den = pipe.make_denoiser(cond, uncond, req, sigmas, pag_state=pag_state if pag else None)
        t = den.timestep(sigmas[step : step + 1].float())
        with torch.no_grad():
            return den.model_fn(x, t), t


def branch(pipe: SDXL, prompt: str, x: torch.Tensor, t: torch.Tensor, **kw):
    """(cond, uncond) UNet outputs for `prompt` alone, each from its own UNet call."""
    req = request(prompt, **kw).resolve(pipe.config)
    cond, uncond = pipe.text_conditioning(req, x.shape[0])
    with torch.no_grad():
        c = pipe.unet(x, t.expand(x.shape[0]), cond[0][1], cond[0][2]).float()
        u = pipe.unet(x, t.expand(x.shape[0]), uncond[0][1], uncond[0][2]).float()
    return c, u


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 3


def test_composable_prediction_is_the_formula(pipe, x):
    got, t = prediction(pipe, request(f"{A} AND{B} :0.7 AND a green triangle:-0.4"), x)
    ca, u = branch(pipe, A, x, t)
    cb, _ = branch(pipe, B, x, t)
    cc, _ = branch(pipe, " a green triangle", x, t)
    expected = u + 4.0 * (1.0 * (ca - u) + 0.7 * (cb - u) - 0.4 * (cc - u))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, u + 4.0 * (ca - u), atol=1e-4)  # the other parts do change it


def test_cfg_scale_one_still_runs_uncond(pipe, x):
    """A1111 computes the uncond branch at scale 1 too: u + sum w_i (c_i - u), not the conds' sum."""
    got, t = prediction(pipe, request(f"{A} AND{B}:0.5", cfg=1.0), x)
    ca, u = branch(pipe, A, x, t)
    cb, _ = branch(pipe, B, x, t)
    assert torch.allclose(got, u + (ca - u) + 0.5 * (cb - u), atol=1e-5, rtol=0)


def test_steps_without_cfg_use_the_first_subprompt_as_reference(pipe, x):
    got, t = prediction(pipe, request(f"{A} AND{B}:0.5", cfg_start=0.5), x, step=0)
    ca, _ = branch(pipe, A, x, t)
    cb, _ = branch(pipe, B, x, t)
    assert torch.allclose(got, ca + 4.0 * 0.5 * (cb - ca), atol=1e-5, rtol=0)


def test_weight_zero_equals_the_first_prompt_alone(pipe, x):
    got, t = prediction(pipe, request(f"{A} AND{B} :0"), x)
    alone, _ = prediction(pipe, request(A), x)
    assert torch.allclose(got, alone, atol=1e-5, rtol=0)
    # with PAG (it perturbs the base sub-prompt)
    got, _ = prediction(pipe, request(f"{A} AND{B} :0", pag_scale=2.0), x, pag=True)
    alone, _ = prediction(pipe, request(A, pag_scale=2.0), x, pag=True)
    assert torch.allclose(got, alone, atol=1e-5, rtol=0)
    # and end to end
    lat = pipe.generate(request(f"{A} AND{B} :0")).latents
    assert torch.allclose(lat, pipe.generate(request(A)).latents, atol=1e-4, rtol=0)


def test_prompt_without_and_takes_the_unchanged_path(pipe, monkeypatch):
    """A prompt without AND (a trailing ':0.5' included) gives a plain schedule, and its image is bit for bit
    the one the pipeline gives with the composable code switched off."""
    for prompt in (A, "a red circle :0.5", "a cat and a dog"):
        req = request(prompt).resolve(pipe.config)
        cond, _ = pipe.text_conditioning(req, 1)
        assert isinstance(cond, list) and not isinstance(cond, Composable)
        lat = pipe.generate(req).latents
        with monkeypatch.context() as m:
            m.setattr(pipeline_module, "compose_prompts", lambda *a: None)
            assert torch.equal(lat, pipe.generate(req).latents)


def region_mask(left: bool | None, size: int = 64) -> Image.Image:
    """White on the left half (True), the right half (False) or everywhere (None)."""
    a = np.full((size, size), 255 if left is None else 0, np.uint8)
    if left is not None:
        a[:, : size // 2] = 255 if left else 0
        a[:, size // 2 :] = 0 if left else 255
    return Image.fromarray(a)


def test_region_masks(pipe, x):
    black = Image.new("L", (64, 64), 0)
    white = Image.new("L", (64, 64), 255)
    prompt = f"{A} AND{B}"
    only_a, t = prediction(pipe, request(A), x)
    only_b, _ = prediction(pipe, request(B), x)
    # a full-white mask for sub-prompt 2, black for 1: sub-prompt 2 alone
    got, _ = prediction(pipe, request(prompt, region_masks=(black, white)), x)
    assert torch.allclose(got, only_b, atol=1e-5, rtol=0)
    # halves: each half its own prompt's prediction (latent columns 0-3 and 4-7)
    got, _ = prediction(pipe, request(prompt, region_masks=(region_mask(True), region_mask(False))), x)
    assert torch.allclose(got[..., :4], only_a[..., :4], atol=1e-5, rtol=0)
    assert torch.allclose(got[..., 4:], only_b[..., 4:], atol=1e-5, rtol=0)
    # only the right half masked for sub-prompt 2: the uncovered left half goes to the base sub-prompt
    got, _ = prediction(pipe, request(prompt, region_masks=(black, region_mask(False))), x)
    assert torch.allclose(got[..., :4], only_a[..., :4], atol=1e-5, rtol=0)
    assert torch.allclose(got[..., 4:], only_b[..., 4:], atol=1e-5, rtol=0)
    # both white everywhere: they share each pixel, u + cfg * (0.5 (c_a - u) + 0.5 * 0.6 (c_b - u))
    got, _ = prediction(pipe, request(f"{A} AND{B}:0.6", region_masks=(white, white)), x)
    ca, u = branch(pipe, A, x, t)
    cb, _ = branch(pipe, B, x, t)
    assert torch.allclose(got, u + 4.0 * (0.5 * (ca - u) + 0.3 * (cb - u)), atol=1e-5, rtol=0)
    # end to end: the full-white mask for sub-prompt 2 gives prompt 2's image
    lat = pipe.generate(request(prompt, region_masks=(black, white))).latents
    assert torch.allclose(lat, pipe.generate(request(B)).latents, atol=1e-4, rtol=0)


def test_region_masks_from_paths_and_the_png_request(pipe, tmp_path):
    paths = []
    for i, left in enumerate((True, False)):
        region_mask(left).save(tmp_path / f"m{i}.png")
        paths.append(str(tmp_path / f"m{i}.png"))
    req = request(f"{A} AND{B}", region_masks=paths)
    assert req.region_masks == tuple(paths)
    from_images = pipe.generate(request(f"{A} AND{B}", region_masks=(region_mask(True), region_mask(False))))
    assert torch.equal(pipe.generate(req).latents, from_images.latents)
    assert GenerationRequest.from_dict(req.to_dict()) == req
    images = request(f"{A} AND{B}", region_masks=(region_mask(True), region_mask(False))).to_dict()
    assert images["region_masks"] == ["<image>", "<image>"]
    assert GenerationRequest.from_dict(images).region_masks == ()


@pytest.mark.parametrize("fields, message", [
    (dict(prompt=A, region_masks=("m.png",)), "region_masks: the prompt has no AND"),
    (dict(prompt=f"{A} AND{B}", region_masks=("m.png",)), "region_masks: 1 masks for 2 sub-prompts"),
    (dict(prompt=f"{A} AND{B}", region_masks=("m.png", 3)), r"region_masks\[1\]: 3 is not an image"),
    (dict(prompt=" AND ".join(["x"] * 33)), "prompt: 33 sub-prompts"),
    (dict(prompt="a AND b", prompt_2="c AND d AND e"), "prompt_2: prompt_2 has 3 sub-prompts"),
])
def test_request_checks(fields, message):
    with pytest.raises(RequestError, match=message):
        GenerationRequest(**fields).validate()


# ------------------------------------------------------------------------------------------------ A1111 API
@pytest.fixture(scope="module")
def client(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_composable")
    (root / "models").mkdir()
    limits = Limits(max_pixels=128 * 128, max_steps=20, max_batch=2)
    settings = ServeSettings(data_dir=root / "data", models_dir=root / "models", queue_size=4,
                             shutdown_grace_s=5, limits=limits)
    with TestClient(create_app(settings, pipeline=pipe), base_url="http://127.0.0.1") as c:
        yield c


def test_a1111_txt2img_passes_and_through(client, pipe):
    prompt = f"{A} AND{B} :0.5"
    body = {"prompt": prompt, "negative_prompt": "ugly", "steps": 3, "width": 64, "height": 64, "seed": 5,
            "cfg_scale": 4.0, "sampler_name": "Euler"}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    served = np.asarray(image.convert("RGB"))
    req = GenerationRequest(prompt=prompt, negative_prompt="ugly", steps=3, width=64, height=64, seed=5,
                            cfg=4.0, sampler="Euler")
    assert np.array_equal(served, np.asarray(pipe.generate(req).images[0].convert("RGB")))
    assert image.info["parameters"].startswith(prompt + "\n")  # the prompt as typed, for --from
    plain = GenerationRequest(prompt=A, negative_prompt="ugly", steps=3, width=64, height=64, seed=5,
                              cfg=4.0, sampler="Euler")
    assert not np.array_equal(served, np.asarray(pipe.generate(plain).images[0].convert("RGB")))

    # region masks come over HTTP as images only: a server path is refused, naming the mask
    r = client.post("/jobs", json={"prompt": "a AND b", "region_masks": ["/etc/hostname", "x.png"]})
    assert r.status_code == 400 and "region_masks[0]" in r.json()["detail"]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_region_masks_and_from(tiny_files, tmp_path):
    from typer.testing import CliRunner

    from sdxl.cli import app

    runner = CliRunner()
    masks = []
    for i, left in enumerate((True, False)):
        region_mask(left).save(tmp_path / f"m{i}.png")
        masks += ["--region-mask", str(tmp_path / f"m{i}.png")]
    prompt = f"{A} AND{B}:0.8"
    base = ["generate", "--model", str(tiny_files["base"]), "--steps", "2", "-W", "64", "-H", "64", "-q",
            "--seed", "3"]
    r = runner.invoke(app, [*base, prompt, *masks, "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    (png,) = sorted((tmp_path / "one").glob("*.png"))
    first = Image.open(png)
    assert first.info["parameters"].startswith(prompt + "\n")
    r = runner.invoke(app, ["generate", "--from", str(png), "--model", str(tiny_files["base"]), "-q",
                            "--out", str(tmp_path / "two")])
    assert r.exit_code == 0, r.output
    (again,) = sorted((tmp_path / "two").glob("*.png"))
    assert np.array_equal(np.asarray(first.convert("RGB")), np.asarray(Image.open(again).convert("RGB")))
    no_masks = runner.invoke(app, [*base, prompt, "--out", str(tmp_path / "three")])
    assert no_masks.exit_code == 0, no_masks.output
    (plain,) = sorted((tmp_path / "three").glob("*.png"))
    assert not np.array_equal(np.asarray(first.convert("RGB")), np.asarray(Image.open(plain).convert("RGB")))
    r = runner.invoke(app, [*base, prompt, *masks[:2], "--out", str(tmp_path / "four")])
    assert r.exit_code != 0 and "--region-mask: 1 masks for 2 sub-prompts" in r.output


# ------------------------------------------------------------------------------------------ over HTTP
def test_region_masks_through_the_native_api_give_the_python_apis_image(tmp_path):
    """POST /jobs with region masks as base64 PNGs: stored as the job's inputs, the image equals the Python
    API's with the same masks, the PNG record marks them as images, and a server path is refused."""
    pipe = tiny_pipeline()
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    right = Image.new("L", (64, 64), 0)
    right.paste(255, (32, 0, 64, 64))

    def b64(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    fields = dict(prompt="a red circle AND a blue square", width=64, height=64, steps=2, seed=3,
                  sampler="euler", schedule="karras")
    (tmp_path / "models").mkdir()
    settings = ServeSettings(data_dir=tmp_path / "data", models_dir=tmp_path / "models", queue_size=4,
                             limits=Limits(max_pixels=128 * 128, max_steps=10, max_batch=2))
    with TestClient(create_app(settings, pipeline=pipe), base_url="http://127.0.0.1") as c:
        r = c.post("/jobs", json={**fields, "region_masks": [b64(left), b64(right)]})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert c.app.state.manager.wait_idle(60)
        job = c.get(f"/jobs/{job_id}").json()
        assert job["status"] == "done", job
        assert job["request"]["region_masks"] == [f"input:{job_id}-region{i}.png" for i in range(2)]
        served = Image.open(io.BytesIO(c.get(job["images"][0]["url"]).content))
        assert json.loads(served.info["sdxl"])["request"]["region_masks"] == ["<image>", "<image>"]
        bad = c.post("/jobs", json={**fields, "region_masks": ["/etc/passwd", b64(right)]})
        assert bad.status_code == 400 and "region_masks[0]" in bad.json()["detail"]
    expected = pipe.generate(GenerationRequest(**fields, region_masks=(left, right))).images[0]
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(expected.convert("RGB")))
