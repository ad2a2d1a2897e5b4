"""PAG, FreeU and eta through the A1111 API as Forge clients send them (its built-in "FreeU Integrated" and
"Perturbed Attention Guidance Integrated" always-on scripts), in-process on the tiny random-weight model:
the image equals the Python API's for the same request fields, and the infotext records them."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import tiny_pipeline
from sdxl.request import GenerationRequest, Limits
from sdxl.serve.app import create_app
from sdxl.serve.settings import ServeSettings

BODY = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 5, "cfg_scale": 4.0,
        "sampler_name": "Euler a", "scheduler": "Karras", "eta": 0.5}
FREEU = {"args": [True, 1.1, 1.2, 0.8, 0.3]}
PAG = {"args": [True, 2.0]}


@pytest.fixture(scope="module")
def pipe():
    model = tiny_pipeline()
    with torch.no_grad():  # weights large enough that PAG and FreeU move the image (std 0.02 barely reacts)
        for p in model.unet.parameters():
            p.mul_(5.0)
    return model


@pytest.fixture(scope="module")
def client(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_guidance")
    (root / "models").mkdir()
    limits = Limits(max_pixels=128 * 128, max_steps=20, max_batch=2)
    settings = ServeSettings(data_dir=root / "data", models_dir=root / "models", queue_size=4,
                             shutdown_grace_s=5, limits=limits)
    with TestClient(create_app(settings, pipeline=pipe), base_url="http://127.0.0.1") as c:
        yield c


def txt2img(client, **scripts):
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": scripts})
    assert r.status_code == 200, r.text
    data = r.json()
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    return np.asarray(image.convert("RGB")), image.info["parameters"]


def python_api(pipe, **fields):
    req = GenerationRequest(prompt="a red circle", steps=3, width=64, height=64, seed=5, cfg=4.0,
                            sampler="Euler a", schedule="Karras", eta=0.5, **fields)
    return np.asarray(pipe.generate(req).images[0].convert("RGB"))


def test_forge_freeu_and_pag_scripts_give_the_python_apis_image(client, pipe):
    scripts = {"FreeU Integrated": FREEU, "Perturbed Attention Guidance Integrated": PAG}
    served, info = txt2img(client, **scripts)
    expected = python_api(pipe, freeu=True, freeu_b1=1.1, freeu_b2=1.2, freeu_s1=0.8, freeu_s2=0.3,
                          pag_scale=2.0, pag_layers="mid")
    assert np.array_equal(served, expected)
    assert "PAG scale: 2" in info and "PAG layers: mid" in info
    assert "FreeU: b1=1.1 b2=1.2 s1=0.8 s2=0.3" in info
    plain, plain_info = txt2img(client)
    assert np.array_equal(plain, python_api(pipe))
    assert not np.array_equal(plain, served)  # the scripts did something
    assert "PAG" not in plain_info and "FreeU" not in plain_info


def test_disabled_scripts_change_nothing(client, pipe):
    off, info = txt2img(client, **{"freeu integrated": {"args": [False, 1.1, 1.2, 0.8, 0.3]},
                                   "Perturbed Attention Guidance Integrated": {"args": [False, 2.0]}})
    assert np.array_equal(off, python_api(pipe)) and "PAG" not in info and "FreeU" not in info


@pytest.mark.parametrize("scripts, named", [
    ({"FreeU Integrated": {"args": [True, 1.1]}}, "alwayson_scripts.FreeU Integrated.args"),
    ({"FreeU Integrated": {"args": ["yes", 1.1, 1.2, 0.8, 0.3]}}, "FreeU Integrated.args[0]"),
    ({"Perturbed Attention Guidance Integrated": {"args": [True, -1.0]}}, "pag_scale"),
    ({"FreeU Integrated": {"args": [True, 99.0, 1.2, 0.8, 0.3]}}, "freeu_b1"),
    ({"controlnet": {"args": [{"model": "x"}]}}, "controlnet.args[0].image"),
    ({"roop": {"args": []}}, "roop"),
])  # fmt: skip
def test_bad_script_args_are_400_naming_them(client, scripts, named):
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": scripts})
    assert r.status_code == 400 and named in r.json()["detail"], r.text


def test_scripts_listing_names_the_built_in_ones(client):
    assert client.get("/sdapi/v1/scripts").json()["txt2img"] == [
        "controlnet", "freeu integrated", "perturbed attention guidance integrated"]
