"""The HTTP server in-process (FastAPI TestClient) on a tiny random-weight SDXL.

Covers: A1111 txt2img/img2img/progress/interrupt/png-info/listings/options, the native job API (submit,
status, images, history, cancel, websocket events), queue order under 20 concurrent submissions, 429 when
the queue is full, 4xx answers with messages, path traversal, the API key, cross-origin refusal, the
per-job timeout, a simulated CUDA out-of-memory error failing one job only, and requeueing on shutdown.

Jobs are steered from the test through a forward pre-hook on the UNet, keyed on the latent width:
64 px images run normally, 96 px ones raise torch.cuda.OutOfMemoryError, and 128 px ones wait on a gate
(so a job can be held "running" while others queue up).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect

import sdxl.serve.modelhost as modelhost
from sdxl.assets import default_model_path
from sdxl.errors import Interrupted
from sdxl.models.config import tiny_config
from sdxl.models.text import TextEncoders
from sdxl.models.unet import UNet
from sdxl.models.vae import AutoencoderKL
from sdxl.pipeline import SDXL, to_pil
from sdxl.request import GenerationRequest, Limits
from sdxl.serve.a1111 import A1111, Txt2ImgBody
from sdxl.serve.app import create_app
from sdxl.serve.previews import latent_preview
from sdxl.serve.settings import ServeSettings, SettingsError, check_bind, is_loopback
from sdxl.weights.io import save_safetensors

OOM_LATENT_WIDTH = 12  # 96 px
GATED_LATENT_WIDTH = 16  # 128 px
TERMINAL = ("done", "failed", "cancelled")


class Control:
    """Steers the gated (128 px) jobs; reset for every test.

    While `open` is not set, every UNet call of a gated job waits for a permit (`step()` gives one), so the
    test decides when each sampler step may run; `entered` is set whenever such a call starts waiting."""

    def __init__(self):
        self.open = threading.Event()
        self.permits = threading.Semaphore(0)
        self.entered = threading.Event()

    def step(self) -> None:
        self.entered.clear()
        self.permits.release()


CONTROL = Control()


def _hook(module, args):
    width = args[0].shape[-1]
    if width == OOM_LATENT_WIDTH:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (simulated)")
    if width == GATED_LATENT_WIDTH:
        control = CONTROL
        control.entered.set()
        deadline = time.monotonic() + 60
        while not control.open.is_set() and time.monotonic() < deadline:
            if control.permits.acquire(timeout=0.01):
                break


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SDXL(cfg, UNet(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval(),
                 TextEncoders(cfg.text_l, cfg.text_g).eval())
    model.unet.register_forward_pre_hook(_hook)
    return model


@pytest.fixture(autouse=True)
def control():
    global CONTROL
    CONTROL = Control()
    yield CONTROL
    CONTROL.open.set()  # never leave a worker blocked


@pytest.fixture
def folders(tmp_path):
    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    (models / "other.safetensors").write_bytes(b"not loaded by these tests")
    (models / "loras" / "style.safetensors").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"secret")
    os.symlink(outside / "secret.safetensors", models / "loras" / "escape.safetensors")
    os.symlink(outside / "secret.safetensors", models / "escape.safetensors")
    return tmp_path


def make_settings(folders: Path, **kw) -> ServeSettings:
    d = dict(data_dir=folders / "data", models_dir=folders / "models", queue_size=32, shutdown_grace_s=5,
             limits=Limits(max_pixels=256 * 256, max_steps=50, max_batch=4, max_prompt_chars=200),
             max_body_bytes=2 * 2**20)
    d.update(kw)
    return ServeSettings(**d)


@pytest.fixture
def client(pipe, folders):
    app = create_app(make_settings(folders), pipeline=pipe)
    with local_client(app) as c:
        try:
            yield c
        finally:
            CONTROL.open.set()  # a failed test must not leave the worker gated while the app shuts down


def local_client(app) -> TestClient:
    """Requests addressed to 127.0.0.1 (a server without API key refuses other Host names)."""
    return TestClient(app, base_url="http://127.0.0.1")


def job_body(**kw):
    d = dict(prompt="a red circle", width=64, height=64, steps=2, seed=1, sampler="euler", schedule="karras")
    d.update(kw)
    return d


def wait_job(client, job_id: str, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def start_gated_job(client, control, **kw) -> str:
    """Submit a 128 px job and wait until the worker is inside it (blocked on the gate)."""
    r = client.post("/jobs", json=job_body(width=128, height=128, **kw))
    assert r.status_code == 202, r.text
    assert control.entered.wait(30), "the gated job never started"
    return r.json()["id"]


def png_from_b64(text: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(text)))
    img.load()
    return img


def b64_png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def truncated_png() -> str:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()[: len(buf.getvalue()) // 2]).decode()


# ------------------------------------------------------------------------------------------------ A1111
def test_a1111_txt2img_returns_base64_pngs_with_info(client):
    body = {"prompt": "a blue square", "negative_prompt": "", "steps": 3, "cfg_scale": 5, "width": 64,
            "height": 64, "seed": 123, "batch_size": 2, "n_iter": 2, "sampler_name": "Euler a",
            "scheduler": "Karras", "restore_faces": False, "send_images": True, "save_images": False}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["images"]) == 4  # batch_size x n_iter
    for text in data["images"]:
        img = png_from_b64(text)
        assert img.format == "PNG" and img.size == (64, 64)
        assert "Steps: 3" in img.info["parameters"]
    info = json.loads(data["info"])  # A1111: a JSON *string*
    assert info["all_seeds"] == [123, 124, 125, 126]  # seeds advance across the batch and the iterations
    assert info["seed"] == 123
    assert len(info["infotexts"]) == 4 and "Seed: 125" in info["infotexts"][2]
    assert info["sampler_name"] == "Euler a" and info["width"] == 64
    assert data["parameters"]["prompt"] == "a blue square"
    # seed -1 = random, reported back
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": -1}
    r = client.post("/sdapi/v1/txt2img", json=body)
    seed = json.loads(r.json()["info"])["seed"]
    assert isinstance(seed, int) and seed >= 0


def test_a1111_same_seed_same_image(client):
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7,
            "sampler_name": "DPM++ 2M Karras"}
    a = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
    b = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
    assert png_from_b64(a).tobytes() == png_from_b64(b).tobytes()


def test_a1111_img2img_and_inpaint(client):
    init = Image.new("RGB", (64, 48), (200, 30, 30))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 48))
    r = client.post("/sdapi/v1/img2img", json={"init_images": [b64_png(init)], "denoising_strength": 0.5,
                                                "steps": 4, "seed": 3, "prompt": "x"})
    assert r.status_code == 200, r.text
    assert png_from_b64(r.json()["images"][0]).size == (64, 48)  # default size: the init image's
    assert r.json()["parameters"]["init_images"] is None  # include_init_images defaults to false
    r = client.post("/sdapi/v1/img2img", json={"init_images": ["data:image/png;base64," + b64_png(init)],
                                                "mask": b64_png(mask), "mask_blur": 0, "steps": 4, "seed": 3,
                                                "denoising_strength": 1.0})
    assert r.status_code == 200, r.text
    out = png_from_b64(r.json()["images"][0]).convert("RGB")
    # outside the mask (right half) the original pixels are kept exactly
    assert out.getpixel((60, 20)) == (200, 30, 30)
    r = client.post("/sdapi/v1/img2img", json={"init_images": ["not base64!"], "steps": 2})
    assert r.status_code == 400 and "base64" in r.json()["detail"]


def test_a1111_listings_and_options(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = {s["name"] for s in samplers}
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE"} <= names
    assert all({"name", "aliases", "options"} <= set(s) for s in samplers)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"automatic", "karras", "exponential"} <= {s["name"] for s in schedulers}
    assert {"Karras"} <= {s["label"] for s in schedulers}
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["other.safetensors"]  # not the symlink out of the folder
    loras = client.get("/sdapi/v1/loras").json()
    assert [x["name"] for x in loras] == ["style"]
    opts = client.get("/sdapi/v1/options").json()
    assert opts["CLIP_stop_at_last_layers"] == 1 and "sd_model_checkpoint" in opts
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors [0123456789]"}
                       ).json() == {}
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "other.safetensors"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "default"}).status_code == 200
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing"})
    assert r.status_code == 404 and "missing" in r.json()["detail"]


def test_a1111_progress_and_interrupt(client, control):
    result = {}

    def run():
        result["r"] = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 20, "width": 128,
                                                              "height": 128, "seed": 1})

    t = threading.Thread(target=run)
    t.start()
    assert control.entered.wait(30)
    control.step()  # let the first step finish; the second one waits
    assert control.entered.wait(30)
    p = client.get("/sdapi/v1/progress").json()
    assert p["state"]["sampling_steps"] == 20 and 1 <= p["state"]["sampling_step"] < 20
    assert 0 < p["progress"] < 1 and p["eta_relative"] >= 0
    # previews are made while someone polls: the next step brings one
    control.step()
    assert control.entered.wait(30)
    p = client.get("/sdapi/v1/progress").json()
    preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
    # the tiny model's VAE is not SDXL's, so "auto" decodes with it (the 16x16 latent -> 128 px)
    assert preview.format == "PNG" and preview.size == (128, 128)
    assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    control.open.set()
    t.join(30)
    # A1111 returns the interrupted image: decoded from where sampling stopped, with its infotext
    r = result["r"]
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    stopped = png_from_b64(r.json()["images"][0])
    assert stopped.size == (128, 128) and "Seed: 1," in stopped.info["parameters"]
    assert json.loads(r.json()["info"])["all_seeds"] == [1]
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job"] == ""


def test_a1111_sampler_names_reach_the_one_resolve_step_as_sent(client):
    """The A1111 layer resolves no names: "DPM++ 2M" with "Automatic" is resolved against the model that
    runs the job, so a zero-terminal-SNR model gets "trailing" (not Karras, which gave coloured noise)."""
    api = A1111(client.app.state.service)
    req = api.to_request(Txt2ImgBody(prompt="x", sampler_name="DPM++ 2M", scheduler="Automatic"))
    assert (req.sampler, req.schedule) == ("DPM++ 2M", "automatic")
    assert api.to_request(Txt2ImgBody(prompt="x", sampler_name="DPM++ 2M")).schedule == "automatic"
    assert (req.width, req.height) == (None, None)  # the model's native size, decided by the same step
    zsnr = dataclasses.replace(tiny_config(), zero_terminal_snr=True)
    assert (req.resolve(zsnr).sampler, req.resolve(zsnr).schedule) == ("dpmpp_2m", "trailing")
    assert req.resolve(tiny_config()).schedule == "karras"
    old = api.to_request(Txt2ImgBody(prompt="x", sampler_name="DPM++ 2M Karras"))
    assert old.sampler == "DPM++ 2M Karras" and old.resolve(zsnr).schedule == "karras"
    # what the job ran is reported: info's sampler and scheduler, and the job's resolved request
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                "seed": 3, "sampler_name": "DPM++ 2M"})
    info = json.loads(r.json()["info"])
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "Schedule type: Karras" in info["infotexts"][0]
    job = client.get("/jobs?limit=1").json()["jobs"][0]
    assert job["request"]["sampler"] == "DPM++ 2M" and job["resolved"]["sampler"] == "dpmpp_2m"


def test_a1111_skip_keeps_the_stopped_image_and_goes_on(client, control):
    result = {}

    def run():
        result["r"] = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 4, "width": 128,
                                                              "height": 128, "seed": 5, "n_iter": 2})

    t = threading.Thread(target=run)
    t.start()
    assert control.entered.wait(30)
    control.step()
    assert control.entered.wait(30)  # iteration 1 is inside its second step
    assert client.post("/sdapi/v1/skip").status_code == 200
    assert client.get("/sdapi/v1/progress").json()["state"]["skipped"] is True
    control.open.set()
    t.join(60)
    r = result["r"]
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [5, 6] and len(r.json()["images"]) == 2  # the skipped image, then the next
    job = client.get("/jobs?limit=1").json()["jobs"][0]
    assert job["status"] == "done"
    # the second iteration ran in full: the same as that seed alone
    alone = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 4, "width": 128, "height": 128,
                                                    "seed": 6}).json()["images"][0]
    assert png_from_b64(r.json()["images"][1]).tobytes() == png_from_b64(alone).tobytes()
    assert png_from_b64(r.json()["images"][0]).tobytes() != png_from_b64(alone).tobytes()


def test_cancelled_native_job_keeps_the_stopped_image(client, control, pipe):
    job_id = start_gated_job(client, control, steps=6, seed=21)
    control.step()
    assert control.entered.wait(30)  # step 1 done, step 2 waiting
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    control.open.set()
    job = wait_job(client, job_id)
    assert job["status"] == "cancelled" and len(job["images"]) == 1 and job["images"][0]["seed"] == 21
    served = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content))
    assert "Seed: 21," in served.info["parameters"] and "Steps: 6," in served.info["parameters"]

    # the same request stopped after the same step in-process, its x0 estimate decoded
    def stop_after_two(p):
        return "stop" if p.step == 2 else None

    req = GenerationRequest(**{k: v for k, v in job_body(width=128, height=128, steps=6, seed=21).items()})
    with pytest.raises(Interrupted) as e:
        pipe.generate(req, callback=stop_after_two)
    expected = to_pil(pipe.decode(e.value.denoised))[0]
    assert served.convert("RGB").tobytes() == expected.tobytes()


def test_a1111_connect_time_endpoints(client):
    """What SillyTavern, webuiapi and other clients call on connect, in A1111's shapes."""
    for path in ("sd-vae", "sd-modules", "prompt-styles", "face-restorers", "realesrgan-models",
                 "hypernetworks"):
        r = client.get(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and r.json() == [], path
    for path in ("upscalers", "latent-upscale-modes"):  # the hires fix's (contents: tests/test_hires.py)
        r = client.get(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and r.json() and all("name" in x for x in r.json()), path
    # ControlNet (test_control_interfaces) and Forge's (test_serve_guidance)
    builtin = ["controlnet", "freeu integrated", "perturbed attention guidance integrated"]
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": builtin, "img2img": builtin}
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["listen"] is False and flags["port"] == 7860
    memory = client.get("/sdapi/v1/memory").json()
    ram = memory["ram"]
    assert 0 < ram["used"] < ram["total"] and ram["free"] == ram["total"] - ram["used"]
    if not torch.cuda.is_available():
        assert memory["cuda"] == {"error": "unavailable"}
    assert client.post("/sdapi/v1/skip").status_code == 200  # nothing running: nothing to skip
    assert client.post("/sdapi/v1/refresh-vae").status_code == 200


def test_cmd_flags_never_show_the_api_key(pipe, folders):
    app = create_app(make_settings(folders, api_key="s3cret key"), pipeline=pipe)
    with local_client(app) as c:
        r = c.get("/sdapi/v1/cmd-flags", headers={"X-API-Key": "s3cret key"})
        assert r.status_code == 200 and r.json()["api_auth"] is True and "s3cret" not in r.text


def test_embeddings_lists_the_configured_textual_inversions(folders):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SDXL(cfg, UNet(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval(),
                 TextEncoders(cfg.text_l, cfg.text_g).eval())
    emb = folders / "models" / "embeddings"
    emb.mkdir()
    save_safetensors({"clip_l": torch.randn(2, cfg.text_l.width), "clip_g": torch.randn(2, cfg.text_g.width)},
                     emb / "myStyle.safetensors")
    (emb / "broken.safetensors").write_bytes(b"not a tensor file")
    app = create_app(make_settings(folders), pipeline=model)
    with local_client(app) as c:
        loaded = c.get("/sdapi/v1/embeddings").json()["loaded"]
    assert loaded == {"myStyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                  "shape": cfg.text_g.width, "vectors": 2}}


def test_shipped_folder_as_models_dir_lists_each_model_once(tmp_path):
    shipped = default_model_path("base").parent
    settings = ServeSettings(data_dir=tmp_path / "data", models_dir=shipped)
    with local_client(create_app(settings)) as c:
        models = c.get("/sdapi/v1/sd-models").json()
        assert [m["title"] for m in models] == ["base.safetensors", "refiner.safetensors"]
        assert [m["model_name"] for m in models] == ["base", "refiner"]
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "base.safetensors"
        info = c.get("/info").json()
        assert info["models"] == ["base.safetensors"] and info["refiners"] == ["refiner.safetensors"]
        assert [(e["name"], e["kind"], e["default"]) for e in info["catalog"]] == [
            ("base.safetensors", "base", True), ("refiner.safetensors", "refiner", False)]
        # the UI's refiner choice runs
        r = c.post("/jobs", json=job_body(width=64, height=64, steps=4, refiner="refiner.safetensors",
                                          refiner_switch=0.5))
        job = wait_job(c, r.json()["id"], timeout=300)
        assert job["status"] == "done", job["error"]
        assert "Refiner: refiner" in job["images"][0]["info"]
    # without a models folder, the shipped refiner is offered as "default" next to the shipped base
    with local_client(create_app(ServeSettings(data_dir=tmp_path / "data2"))) as c:
        info = c.get("/info").json()
        assert info["refiners"] == ["default"] and info["model"]["kind"] == "base"
        assert [m["title"] for m in c.get("/sdapi/v1/sd-models").json()] == ["base.safetensors"]
        r = c.post("/jobs", json=job_body(width=64, height=64, steps=4, refiner="default"))
        job = wait_job(c, r.json()["id"], timeout=300)
        assert job["status"] == "done", job["error"]
        assert c.post("/jobs", json=job_body(refiner="refiner")).status_code == 404  # no models folder


def test_previews_of_the_shipped_model_have_the_result_colours(tmp_path):
    """The shipped miniature has its own VAE: "auto" previews decode with it, so the last preview looks
    like the result; SDXL's linear latent->RGB map (the old preview) is far off on this model."""
    settings = ServeSettings(data_dir=tmp_path / "data")
    with local_client(create_app(settings)) as c:
        # a long job holds the worker until the websocket is open, so every step of ours is seen
        blocker = c.post("/jobs", json={"prompt": "x", "steps": 150, "seed": 2}).json()["id"]
        job_id = c.post("/jobs", json={"prompt": "a red circle above a blue square", "steps": 8, "seed": 1,
                                       "sampler": "euler"}).json()["id"]
        with c.websocket_connect(f"ws://127.0.0.1/ws/jobs/{job_id}") as ws:
            events = [ws.receive_json()]
            assert events[0]["job"]["status"] == "queued"
            assert c.post(f"/jobs/{blocker}/cancel").status_code == 200
            while events[-1]["type"] != "finished":
                events.append(ws.receive_json())
        job = events[-1]["job"]
        assert job["status"] == "done"
        result = Image.open(io.BytesIO(c.get(job["images"][0]["url"]).content)).convert("RGB")
    previews = [e for e in events if e["type"] == "progress" and "preview" in e]
    assert previews and previews[-1]["step"] == 8
    last = Image.open(io.BytesIO(base64.b64decode(previews[-1]["preview"].partition(",")[2]))).convert("RGB")

    def mean_abs(a: Image.Image, b: Image.Image) -> float:
        a = torch.tensor(list(a.resize((32, 32), Image.BICUBIC).getdata()), dtype=torch.float32)
        b = torch.tensor(list(b.resize((32, 32), Image.BICUBIC).getdata()), dtype=torch.float32)
        return float((a - b).abs().mean())

    assert mean_abs(last, result) < 15
    model = SDXL.load(default_model_path("base"))
    final = model.generate(GenerationRequest(prompt="a red circle above a blue square", steps=8, seed=1,
                                             sampler="euler")).latents
    assert mean_abs(latent_preview(final), result) > 40  # the SDXL map on this model's latents


def test_compile_loads_compiled_and_warms_up_before_the_first_job(folders, monkeypatch):
    """--compile: models load with SDXL.load(..., compile=True), and the worker runs one small generation
    at the model's native size before taking jobs (so the first request does not pay for compiling)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_config(), sample_size=64)
    model = SDXL(cfg, UNet(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval(),
                 TextEncoders(cfg.text_l, cfg.text_g).eval())
    loads, runs = [], []
    generate = model.generate

    def recording_generate(req, *args, **kw):
        runs.append(req)
        return generate(req, *args, **kw)

    class FakeSDXL:
        @staticmethod
        def load(path, device="cpu", dtype=torch.float32, compile=False, **kw):
            loads.append((Path(path), compile))
            return model

    model.generate = recording_generate
    monkeypatch.setattr(modelhost, "SDXL", FakeSDXL)
    path = folders / "models" / "other.safetensors"
    app = create_app(make_settings(folders, model=str(path), compile=True))
    with local_client(app) as c:
        assert app.state.manager.warmed_up.wait(60)
        assert loads == [(path, True)]
        assert [(r.width, r.height, r.steps) for r in runs] == [(64, 64, 2)]  # native size, before any job
        job = wait_job(c, c.post("/jobs", json=job_body()).json()["id"])
        assert job["status"] == "done" and len(loads) == 1  # the job ran on the warmed-up model
    assert make_settings(folders).warmup is False and make_settings(folders, compile=True).warmup is True


def test_a1111_png_info(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a green triangle", "steps": 2, "width": 64,
                                                "height": 64, "seed": 42})
    image = r.json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert info["info"].startswith("a green triangle") and "Seed: 42" in info["info"]
    params = info["parameters"]  # A1111's labels
    assert params["Seed"] == 42 and params["Steps"] == 2 and (params["Size-1"], params["Size-2"]) == (64, 64)
    assert params["Prompt"] == "a green triangle" and params["Sampler"] == "Euler"
    assert "sdxl" in info["items"]  # our JSON record chunk
    assert client.post("/sdapi/v1/png-info", json={"image": "%%%"}).status_code == 400


# ------------------------------------------------------------------------------------------------ native
def test_native_job_roundtrip_and_history(client):
    r = client.post("/jobs", json=job_body(batch=2, seed=10))
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "done" and job["progress"] == 1.0 and job["error"] is None
    assert [im["seed"] for im in job["images"]] == [10, 11]
    img = client.get(job["images"][0]["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert "Seed: 10" in Image.open(io.BytesIO(img.content)).info["parameters"]
    history = client.get("/jobs").json()["jobs"]
    assert history[0]["id"] == job["id"]
    assert client.get("/jobs?status=done").json()["jobs"][0]["id"] == job["id"]
    assert client.get("/jobs/nope").status_code == 404


def test_queue_keeps_order_under_20_concurrent_submissions(client, control):
    gate_id = start_gated_job(client, control)  # hold the worker so all 20 are queued together
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def submit(i):
        r = client.post("/jobs", json=job_body(seed=i, steps=1))
        with lock:
            (ids if r.status_code == 202 else errors).append(r.json().get("id") or r.text)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 20
    control.open.set()
    jobs = [wait_job(client, i) for i in ids + [gate_id]]
    assert all(j["status"] == "done" and j["attempts"] == 1 for j in jobs)  # every job ran exactly once
    runs = [j["run_number"] for j in sorted(jobs[:20], key=lambda j: j["seq"])]
    assert runs == sorted(runs) and len(set(runs)) == 20  # started in the order they were accepted
    gate = jobs[20]
    assert all(j["run_number"] > gate["run_number"] for j in jobs[:20])


def test_cancel_queued_and_running_jobs(client, control):
    running = start_gated_job(client, control, steps=5)
    queued = client.post("/jobs", json=job_body()).json()["id"]
    assert client.get(f"/jobs/{queued}").json()["queue_position"] == 0
    r = client.post(f"/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.delete(f"/jobs/{running}").status_code == 200  # takes effect after the current step
    control.open.set()
    assert wait_job(client, running)["status"] == "cancelled"
    assert client.post(f"/jobs/{running}/cancel").status_code == 409  # already finished
    assert client.post("/jobs/unknown/cancel").status_code == 404
    # the queue goes on
    assert wait_job(client, client.post("/jobs", json=job_body()).json()["id"])["status"] == "done"


def test_queue_full_answers_429(pipe, folders, control):
    app = create_app(make_settings(folders, queue_size=2), pipeline=pipe)
    with local_client(app) as c:
        start_gated_job(c, control)
        assert c.post("/jobs", json=job_body()).status_code == 202
        assert c.post("/jobs", json=job_body()).status_code == 202
        r = c.post("/jobs", json=job_body())
        assert r.status_code == 429 and "queue is full" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
        assert r.status_code == 429
        control.open.set()
        assert c.app.state.manager.wait_idle(60)


def test_websocket_streams_progress_and_previews(client, control):
    start_gated_job(client, control, steps=1)
    job_id = client.post("/jobs", json=job_body(steps=4)).json()["id"]
    with client.websocket_connect(f"ws://127.0.0.1/ws/jobs/{job_id}") as ws:
        first = ws.receive_json()
        assert first["type"] == "status" and first["job"]["status"] == "queued"
        control.open.set()
        events = [first]
        while events[-1]["type"] != "finished":
            events.append(ws.receive_json())
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    assert progress[-1]["progress"] == pytest.approx(1.0) and progress[0]["progress"] == pytest.approx(0.25)
    assert all(e["preview"].startswith("data:image/jpeg;base64,") for e in progress)
    jpeg = Image.open(io.BytesIO(base64.b64decode(progress[0]["preview"].partition(",")[2])))
    assert jpeg.format == "JPEG" and jpeg.size == (64, 64)  # decoded by the model's own VAE ("auto")
    assert events[-1]["job"]["status"] == "done" and len(events[-1]["job"]["images"]) == 1
    # a finished job: status, then finished
    with client.websocket_connect(f"ws://127.0.0.1/ws/jobs/{job_id}") as ws:
        assert ws.receive_json()["type"] == "status"
        assert ws.receive_json()["type"] == "finished"


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "change, status, words",
    [
        ({"width": 65}, 400, "width"),
        ({"width": 512, "height": 512}, 400, "limit"),
        ({"steps": 1000}, 400, "steps"),
        ({"batch": 9}, 400, "batch"),
        ({"prompt": "x" * 201}, 400, "prompt"),
        ({"sampler": "no-such-sampler"}, 400, "unknown sampler"),
        ({"schedule": "nope"}, 400, "unknown schedule"),
        ({"cfg": -1}, 400, "cfg"),
        ({"colour": "red"}, 422, "colour"),
        ({"steps": "many"}, 422, "steps"),
        ({"init_image": "@@@"}, 400, "base64"),
        ({"init_image": truncated_png()}, 400, "init_image"),
        ({"prompt": "a <lora:style:abc>"}, 400, "LoRA weight"),
    ],
)
def test_bad_native_requests_get_4xx_with_a_message(client, change, status, words):
    r = client.post("/jobs", json=job_body(**change))
    assert r.status_code == status, r.text
    assert words.lower() in json.dumps(r.json()["detail"]).lower()


@pytest.mark.parametrize(
    "body, words",
    [
        ({"enable_hr": True, "hr_upscaler": "Magic"}, "hires_upscaler"),
        ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
        ({"alwayson_scripts": {"controlnet": {"args": [{"model": "x", "image": ""}]}}}, "controlnet"),
        ({"alwayson_scripts": {"roop": {"args": []}}}, "roop"),
        ({"sampler_name": "Magic"}, "unknown sampler"),
        ({"scheduler": "Wobbly"}, "unknown schedule"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 4, "n_iter": 5}, "n_iter"),
        ({"subseed_strength": 0.5}, "variation"),
        ({"override_settings": {"CLIP_stop_at_last_layers": "x"}}, "CLIP_stop_at_last_layers"),
    ],
)
def test_bad_a1111_requests_get_400_with_a_message(client, body, words):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2, **body})
    assert r.status_code == 400, r.text
    assert words.lower() in r.json()["detail"].lower()


def test_body_size_limit(client):
    json_type = {"content-type": "application/json"}
    r = client.post("/jobs", content=b"{" + b" " * (3 * 2**20) + b"}", headers=json_type)
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while reading
        for _ in range(40):
            yield b" " * 2**16

    r = client.post("/jobs", content=chunks(), headers=json_type)
    assert r.status_code == 413


@pytest.mark.parametrize(
    "change, status",
    [
        ({"model": "../models/other"}, 400),
        ({"model": "/etc/passwd"}, 400),
        ({"model": "C:\\Windows\\win.ini"}, 400),
        ({"model": "escape"}, 400),  # a symlink that leads out of the models folder
        ({"model": "nothere"}, 404),
        ({"refiner": "..\\..\\etc\\passwd"}, 400),
        ({"loras": [{"name": "../../outside/secret", "weight": 1}]}, 400),
        ({"loras": [{"name": "escape", "weight": 1}]}, 400),
        ({"loras": [{"name": "missing", "weight": 1}]}, 404),
        ({"prompt": "a cat <lora:../../outside/secret:1>"}, 400),
        ({"init_image": "output:../jobs.sqlite3"}, 400),
        ({"init_image": "output:nothere.png"}, 404),
    ],
)
def test_names_resolve_only_inside_their_folders(client, change, status):
    r = client.post("/jobs", json=job_body(**change))
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_path_traversal_on_images_and_a1111(client):
    assert client.get("/images/..%2Fjobs.sqlite3").status_code in (400, 404)
    assert client.get("/images/..%5Cjobs.sqlite3").status_code == 400
    assert client.get("/images/missing.png").status_code == 404
    assert client.get("/images/.").status_code in (400, 404)  # never the folder itself
    traversal = {"sd_model_checkpoint": "../../etc/passwd"}
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                                "override_settings": traversal})
    assert r.status_code == 400
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                                "refiner_checkpoint": "/etc/passwd [abcdef0123]"})
    assert r.status_code == 400
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../x"}).status_code == 400


# ------------------------------------------------------------------------------------------------ security
def test_api_key_is_enforced_on_every_route(pipe, folders):
    app = create_app(make_settings(folders, api_key="s3cret key"), pipeline=pipe)
    with local_client(app) as c:
        for method, path in [("get", "/jobs"), ("get", "/info"), ("get", "/sdapi/v1/samplers"),
                             ("get", "/sdapi/v1/progress"), ("post", "/sdapi/v1/interrupt"),
                             ("get", "/openapi.json"), ("get", "/images/x.png"), ("get", "/health")]:
            r = getattr(c, method)(path)
            assert r.status_code == 401, path
            assert "API key" in r.json()["detail"]
        assert c.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/jobs", headers={"X-API-Key": "s3cret"}).status_code == 401
        assert c.get("/jobs", headers={"Authorization": "Bearer s3cret key"}).status_code == 200
        assert c.get("/jobs", headers={"X-API-Key": "s3cret key"}).status_code == 200
        assert c.get("/jobs", headers={"Cookie": "sdxl_api_key=s3cret%20key"}).status_code == 200
        # A1111 clients log in with HTTP basic auth: any user name, the key as password
        basic = "Basic " + base64.b64encode(b"sdxl:s3cret key").decode()
        assert c.get("/sdapi/v1/sd-models", headers={"Authorization": basic}).status_code == 200
        wrong = "Basic " + base64.b64encode(b"sdxl:s3cret").decode()
        assert c.get("/sdapi/v1/sd-models", headers={"Authorization": wrong}).status_code == 401
        assert c.get("/jobs", headers={"Authorization": "Basic %%%"}).status_code == 401
        # the web UI's static files load without the key (they hold no data)
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        with pytest.raises(WebSocketDisconnect):
            with c.websocket_connect("/ws/jobs/x") as ws:
                ws.receive_json()
        with c.websocket_connect("/ws/jobs/x", headers={"X-API-Key": "s3cret key"}) as ws:
            assert ws.receive_json()["type"] == "error"
        r = c.post("/jobs", json=job_body(), headers={"X-API-Key": "s3cret key"})
        assert r.status_code == 202


def test_cross_origin_requests_are_refused(client):
    r = client.post("/sdapi/v1/interrupt", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    assert client.post("/sdapi/v1/interrupt", headers={"Origin": "http://127.0.0.1"}).status_code == 200


def test_dns_rebinding_is_refused_without_api_key(pipe, folders):
    # a page on evil.example whose DNS now points at 127.0.0.1 is same-origin for the browser, but its
    # requests carry Host: evil.example
    app = create_app(make_settings(folders), pipeline=pipe)
    with TestClient(app, base_url="http://evil.example:7860") as c:
        r = c.get("/jobs")
        assert r.status_code == 403 and "loopback" in r.json()["detail"]
    app = create_app(make_settings(folders, allowed_hosts=["sdxl.lan"]), pipeline=pipe)
    with TestClient(app, base_url="http://sdxl.lan") as c:
        assert c.get("/jobs").status_code == 200
    with TestClient(app, base_url="http://[::1]:7860") as c:
        assert c.get("/jobs").status_code == 200


def test_bind_requires_api_key_off_loopback():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        check_bind(ServeSettings(host=host))
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(SettingsError, match="API key"):
            check_bind(ServeSettings(host=host))
        check_bind(ServeSettings(host=host, api_key="k"))


# ------------------------------------------------------------------------------------------------ faults
def test_out_of_memory_fails_one_job_and_the_next_one_works(client):
    bad = client.post("/jobs", json=job_body(width=96, height=96)).json()["id"]
    good = client.post("/jobs", json=job_body()).json()["id"]
    bad_job, good_job = wait_job(client, bad), wait_job(client, good)
    assert bad_job["status"] == "failed" and "out of memory" in bad_job["error"]
    assert good_job["status"] == "done" and len(good_job["images"]) == 1
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 96, "height": 96})
    assert r.status_code == 500 and "out of memory" in r.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"


def test_job_timeout(pipe, folders, control):
    app = create_app(make_settings(folders, job_timeout_s=0.2), pipeline=pipe)
    with local_client(app) as c:
        job_id = start_gated_job(c, control, steps=3)
        time.sleep(0.3)
        control.open.set()
        job = wait_job(c, job_id)
        assert job["status"] == "failed" and "timed out" in job["error"]


def test_shutdown_requeues_unfinished_jobs_and_restart_runs_them(pipe, folders, control):
    settings = make_settings(folders, shutdown_grace_s=0.2)
    app = create_app(settings, pipeline=pipe)
    with local_client(app) as c:
        done = wait_job(c, c.post("/jobs", json=job_body()).json()["id"])
        running = start_gated_job(c, control, steps=3)
        queued = c.post("/jobs", json=job_body(seed=5)).json()["id"]
        manager = app.state.manager

        def open_when_told_to_stop():  # the step in flight ends only after the grace period ran out
            end = time.monotonic() + 60
            while time.monotonic() < end:
                job = manager.current()
                if job is not None and job.stop_reason == "shutdown":
                    break
                time.sleep(0.01)
            control.open.set()

        threading.Thread(target=open_when_told_to_stop, daemon=True).start()
        # leaving the block runs the lifespan shutdown
    manager = app.state.manager
    assert manager.store.get(running).status == "queued"
    assert manager.store.get(queued).status == "queued"
    app2 = create_app(settings, pipeline=pipe)
    with local_client(app2) as c:
        again = wait_job(c, running)
        assert again["status"] == "done" and again["attempts"] == 2
        assert wait_job(c, queued)["status"] == "done"
        old = c.get(f"/jobs/{done['id']}").json()
        assert old["status"] == "done" and c.get(old["images"][0]["url"]).status_code == 200


# ------------------------------------------------------------------------------------------------ UI, schema
def test_info_schema_and_web_ui(client):
    info = client.get("/info").json()
    assert all(s["width"] * s["height"] <= 256 * 256 for s in info["sizes"])  # presets respect max_pixels
    assert info["model"]["sample_size"] == 1024
    assert {"euler", "dpmpp_2m"} <= {s["id"] for s in info["samplers"]}
    assert info["loras"] == ["style"] and info["models"] == ["other.safetensors"]
    assert info["refiners"] == []  # "other.safetensors" is not a readable checkpoint, let alone a refiner
    page = client.get("/")
    assert page.status_code == 200 and 'id="gen-form"' in page.text
    schema = client.get("/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/sdapi/v1/txt2img", "/sdapi/v1/progress"} <= set(schema["paths"])
    body_schema = schema["components"]["schemas"]["GenerationRequestBody"]
    assert {"prompt", "width", "sampler", "loras"} <= set(body_schema["properties"])


def test_size_presets_are_the_paper_buckets(client):
    service = client.app.state.service
    service.settings.limits.max_pixels = 2048 * 2048
    presets = {(p["width"], p["height"]) for p in service.size_presets(1024)}
    assert {(1024, 1024), (1152, 896), (896, 1152), (1344, 768), (2048, 512)} <= presets
    small = {(p["width"], p["height"]) for p in service.size_presets(256)}
    assert (256, 256) in small and (336, 192) in small  # 1344x768 scaled to a 256^2 area
