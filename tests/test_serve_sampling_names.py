"""Align Your Steps, KL-optimal, polyexponential and TCD through the HTTP server (in-process, tiny model):
the A1111 listings name them, the web UI's /info lists them, and an A1111 txt2img asking for them by A1111's
names runs and writes them into the image's infotext."""

from __future__ import annotations

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import tiny_pipeline
from sdxl.request import Limits
from sdxl.serve.app import create_app
from sdxl.serve.settings import ServeSettings

NEW_SCHEDULES = {"align_your_steps": "Align Your Steps", "kl_optimal": "KL Optimal",
                 "polyexponential": "Polyexponential"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    pipe = tiny_pipeline()
    root = tmp_path_factory.mktemp("serve_names")
    (root / "models").mkdir()
    limits = Limits(max_pixels=128 * 128, max_steps=20, max_batch=2)
    settings = ServeSettings(data_dir=root / "data", models_dir=root / "models", queue_size=4,
                             shutdown_grace_s=5, limits=limits)
    with TestClient(create_app(settings, pipeline=pipe), base_url="http://127.0.0.1") as c:
        yield c


def test_listings_name_the_new_schedules_and_tcd(client):
    schedulers = {s["name"]: s["label"] for s in client.get("/sdapi/v1/schedulers").json()}
    assert NEW_SCHEDULES.items() <= schedulers.items()
    samplers = {s["name"]: s["aliases"] for s in client.get("/sdapi/v1/samplers").json()}
    assert samplers["TCD"] == ["tcd"]
    info = client.get("/info").json()  # what the web UI's lists are built from
    assert {"id": "tcd", "label": "TCD"} in info["samplers"]
    for name, label in NEW_SCHEDULES.items():
        assert {"id": name, "label": label} in info["schedules"]


def test_a1111_txt2img_with_align_your_steps_and_tcd(client):
    body = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 3, "cfg_scale": 4,
            "sampler_name": "TCD", "scheduler": "Align Your Steps"}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    assert info["sampler_name"] == "TCD"
    assert "Sampler: TCD, Schedule type: Align Your Steps," in info["infotexts"][0]
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert "Schedule type: Align Your Steps" in image.info["parameters"]
    for label in ("KL Optimal", "Polyexponential"):
        r = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler", "scheduler": label})
        assert r.status_code == 200, r.text
        assert f"Schedule type: {label}," in json.loads(r.json()["info"])["infotexts"][0]
