"""Control units as users give them: the control image preparation (preprocessors, resize modes), the
CLI flags, the A1111 API's ControlNet units and endpoints, the web UI's control section, the metadata.

The preprocessors are compared with OpenCV's functions, which sd-webui-controlnet calls (OpenCV is a test
dependency only; the package computes them with torch and numpy).
"""

from __future__ import annotations

import cv2  # the reference the preprocessors are checked against (opencv-python-headless, a test dependency)
import numpy as np
import pytest
import torch
from PIL import Image

from sdxl import control_maps as cm
from sdxl.errors import RequestError
from sdxl.request import ControlUnit, GenerationRequest


def _picture(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (0, 0), 2)
    cv2.rectangle(img, (20, 20), (80, 70), (255, 0, 0), -1)
    cv2.circle(img, (90, 50), 20, (10, 200, 30), -1)
    return img


@pytest.mark.parametrize("low,high", [(100, 200), (20, 60), (50, 51)])
def test_canny_matches_opencv(low, high):
    img = _picture()
    ours = cm.canny_edges(img, low, high)
    ref = cv2.Canny(img, low, high)
    assert (ref > 0).sum() > 50  # the picture has edges at these thresholds
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("sigma", [0.5, 3.0, 9.0])
def test_gaussian_matches_opencv(sigma):
    img = _picture()
    ours = cm._gaussian(img, sigma, eight_bit=True)
    ref = cv2.GaussianBlur(img, (0, 0), sigma)
    assert np.abs(ours.astype(int) - ref).max() <= 1  # OpenCV's 8-bit fixed point rounds a little apart
    ours_f = cm._gaussian(img.astype(np.float32), sigma, eight_bit=False)
    assert np.abs(ours_f - cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigma)).max() < 1e-3


def _ext_fit(x: np.ndarray, mode: str, w: int, h: int) -> np.ndarray:
    """sd-webui-controlnet's detectmap_proc for maps of many colours (no binary handling), with OpenCV."""
    def resize(y, size):
        smaller = size[0] * size[1] < y.shape[0] * y.shape[1]
        return cv2.resize(y, size, interpolation=cv2.INTER_AREA if smaller else cv2.INTER_CUBIC)
    if mode == "resize":
        return resize(x, (w, h))
    oh, ow = x.shape[:2]
    k0, k1 = h / oh, w / ow
    if mode == "fill":
        k = min(k0, k1)
        borders = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
        bg = np.tile(np.median(borders, axis=0).astype(x.dtype)[None, None], [h, w, 1])
        y = resize(x, (int(np.round(ow * k)), int(np.round(oh * k))))
        nh, nw = y.shape[:2]
        ph, pw = max(0, (h - nh) // 2), max(0, (w - nw) // 2)
        bg[ph:ph + nh, pw:pw + nw] = y
        return bg
    k = max(k0, k1)
    y = resize(x, (int(np.round(ow * k)), int(np.round(oh * k))))
    nh, nw = y.shape[:2]
    ph, pw = max(0, (nh - h) // 2), max(0, (nw - w) // 2)
    return y[ph:ph + h, pw:pw + w]


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
@pytest.mark.parametrize("size", [(64, 128), (160, 96)])
def test_resize_modes_match_the_extension(mode, size):
    w, h = size
    img = _picture()
    hint = cm.prepare_control_image(Image.fromarray(img), "none", None, None, mode, w, h)
    assert hint.shape == (1, 3, h, w) and hint.dtype == torch.float32
    assert 0.0 <= hint.min() and hint.max() <= 1.0
    ours = (hint[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    ref = _ext_fit(img, mode, w, h)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    # PIL's box filter / our linear weights and OpenCV's fixed-point arithmetic round apart by one level
    assert diff.mean() < 0.2 and diff.max() <= 1, (diff.mean(), diff.max())


def test_fill_pads_with_the_border_median_and_crop_covers():
    img = np.full((50, 100, 3), 30, np.uint8)
    img[:, :, 0] = 200
    img[20:30, 40:60] = 255
    hint = cm.prepare_control_image(img, "none", None, None, "fill", 64, 64)
    ours = (hint[0].permute(1, 2, 0) * 255).round().numpy()
    assert ours[0, 0].tolist() == [200, 30, 30] and ours[-1, -1].tolist() == [200, 30, 30]
    hint = cm.prepare_control_image(img, "none", None, None, "crop", 64, 64)
    ours = (hint[0].permute(1, 2, 0) * 255).round().numpy()
    assert ours[32, 32].tolist() == [255, 255, 255]  # the centre survives the crop at 64 x 64


def test_preprocessors_give_maps_at_the_generation_size(tmp_path):
    img = _picture()
    path = tmp_path / "c.png"
    Image.fromarray(img).save(path)
    for name in ("canny", "threshold", "scribble_xdog", "invert", "tile", "blur_gaussian", "none"):
        hint = cm.prepare_control_image(str(path), name, None, None, "crop", 96, 64)
        assert hint.shape == (1, 3, 64, 96), name
    # pixel perfect: the canny map of the source size is OpenCV's canny of that image
    hint = cm.prepare_control_image(img, "canny", 100, 200, "resize", 128, 96)
    assert torch.equal(hint[0, 0], torch.from_numpy(cv2.Canny(img, 100, 200) / 255.0).float())
    inv = cm.prepare_control_image(img, "invert", None, None, "resize", 128, 96)
    assert torch.allclose(inv[0].permute(1, 2, 0) * 255, torch.from_numpy(255.0 - img).float())
    thr = cm.detect("threshold", Image.fromarray(img), 127, None, 96)
    assert np.array_equal(np.asarray(thr)[:, :, 0] > 0, img.min(axis=2) > 127)
    tile = cm.detect("tile_resample", Image.fromarray(img), 2.0)
    assert tile.size == (64, 48)


def test_bad_preprocessor_and_thresholds_are_one_line_errors():
    with pytest.raises(RequestError, match=r"controls\[0\]\.preprocessor: 'depth_midas' is not a preprocessor"
                       r" \(known: none, canny"):
        GenerationRequest(controls=[{"model": "cn", "image": "a.png",
                                     "preprocessor": "depth_midas"}]).validate()
    with pytest.raises(RequestError, match=r"controls\[0\]\.threshold_a: 300 is outside 1..255"):
        GenerationRequest(controls=[ControlUnit("cn", "a.png", preprocessor="canny",
                                                threshold_a=300)]).validate()
    with pytest.raises(RequestError, match="resize_mode"):
        cm.prepare_control_image(_picture(), "none", None, None, "stretch", 64, 64)
    with pytest.raises(RequestError, match=r"control image: .*nope\.png"):
        cm.prepare_control_image("nope.png", "none", None, None, "crop", 64, 64)


# ------------------------------------------------------------------------------------------------ infotext
def test_infotext_writes_units_as_the_extension(tmp_path):
    from sdxl.metadata import parse_a1111, request_infotext
    from sdxl.metadata.hashes import legacy_hash
    from sdxl.metadata.infotext import CONTROL_FIELDS, parse_control_unit

    model = tmp_path / "diffusers_xl_canny_full.safetensors"
    model.write_bytes(b"x" * 100)
    img = Image.new("RGB", (512, 384))
    req = GenerationRequest(
        prompt="a cat", width=1024, height=768, seed=1,
        controls=[{"model": str(model), "image": img, "preprocessor": "canny"},
                  {"model": "t2i", "image": img, "weight": 0.5, "control_mode": "prompt",
                   "resize_mode": "fill", "start": 0.1, "end": 0.8}],
        ip_adapters=[{"model": "ip-adapter-plus_sdxl_vit-h.safetensors", "images": [img], "scale": 0.6}])
    text = request_infotext(req)
    want = ('ControlNet 0: "Module: canny, Model: diffusers_xl_canny_full [' + legacy_hash(model)
            + '], Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 768, Threshold A: 100, '
            'Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: True, '
            'Control Mode: Balanced"')
    assert want in text
    parsed = parse_a1111(text)
    one = parse_control_unit(parsed["ControlNet 1"])
    assert tuple(one) == CONTROL_FIELDS
    assert one["Control Mode"] == "My prompt is more important" and one["Resize Mode"] == "Resize and Fill"
    assert (one["Weight"], one["Guidance Start"], one["Guidance End"]) == ("0.5", "0.1", "0.8")
    two = parse_control_unit(parsed["ControlNet 2"])
    assert two["Module"] == "ip-adapter_clip_sdxl_plus_vith" and two["Weight"] == "0.6"


# ------------------------------------------------------------------------------------------------ A1111 API
def _b64(image: Image.Image, prefix: bool = False) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return "data:image/png;base64," + text if prefix else text


@pytest.fixture(scope="module")
def cn_file(tmp_path_factory):
    """A tiny random-weight ControlNet for tiny_config's UNet, as an sgm-layout file (`control_model.*`)."""
    from sdxl.models.config import tiny_config
    from sdxl.models.controlnet import ControlNet, ControlNetConfig
    from sdxl.weights.io import save_safetensors

    torch.manual_seed(0)
    cn = ControlNet(ControlNetConfig(unet=tiny_config().unet))
    path = tmp_path_factory.mktemp("cn") / "tiny_canny.safetensors"
    save_safetensors({"control_model." + k: v for k, v in cn.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, cn_file):
    """The tiny pipeline served over HTTP (uvicorn in a thread) with the tiny ControlNet in
    models/ControlNet."""
    import shutil

    from conftest import serve_in_thread, tiny_pipeline
    from sdxl.request import Limits
    from sdxl.serve.app import create_app
    from sdxl.serve.settings import ServeSettings

    root = tmp_path_factory.mktemp("cn_serve")
    cn_dir = root / "models" / "ControlNet"
    cn_dir.mkdir(parents=True)
    shutil.copy(cn_file, cn_dir / "tiny_canny.safetensors")
    pipe = tiny_pipeline()
    limits = Limits(max_pixels=128 * 128, max_steps=20, max_batch=2)
    settings = ServeSettings(data_dir=root / "data", models_dir=root / "models", queue_size=4,
                             shutdown_grace_s=5, limits=limits)
    with serve_in_thread(create_app(settings, pipeline=pipe)) as port:
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "model": cn_dir / "tiny_canny.safetensors",
               "pipe": pipe}


def test_controlnet_routes_list_models_and_modules(served):
    import httpx

    from sdxl.metadata.hashes import legacy_hash

    url = served["url"]
    title = f"tiny_canny [{legacy_hash(served['model'])}]"
    assert httpx.get(f"{url}/controlnet/model_list").json() == {"model_list": [title]}
    assert httpx.get(f"{url}/controlnet/version").json() == {"version": 3}
    modules = httpx.get(f"{url}/controlnet/module_list").json()
    assert modules["module_list"][:7] == ["none", "canny", "threshold", "scribble_xdog", "invert",
                                          "tile_resample", "blur_gaussian"]
    low = {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1}
    assert modules["module_detail"]["canny"]["sliders"][1] == low
    assert "controlnet" in httpx.get(f"{url}/sdapi/v1/scripts").json()["txt2img"]
    img = _picture()
    r = httpx.post(f"{url}/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [_b64(Image.fromarray(img), prefix=True)],
        "controlnet_processor_res": 96, "controlnet_threshold_a": 100, "controlnet_threshold_b": 200})
    import base64
    import io
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
    assert np.array_equal(got[:, :, 0], cv2.Canny(img, 100, 200))  # 96 = the picture's short side
    r = httpx.post(f"{url}/controlnet/detect", json={
        "controlnet_module": "depth_midas", "controlnet_input_images": [_b64(Image.fromarray(img))]})
    assert r.status_code == 400 and "depth_midas" in r.json()["detail"]
    r = httpx.post(f"{url}/controlnet/detect", json={"controlnet_module": "canny"})
    assert r.status_code == 400 and r.json()["detail"] == "controlnet_input_images: no image selected"


def test_webuiapi_controlnet_unit_and_hires(served):
    import webuiapi  # lazy: the third-party client is a test dependency only

    from sdxl.metadata import parse_a1111
    from sdxl.metadata.infotext import parse_control_unit

    api = webuiapi.WebUIApi(host="127.0.0.1", port=served["port"])
    title = api.controlnet_model_list()[0]
    control = Image.fromarray(_picture(48, 32))
    unit = webuiapi.ControlNetUnit(image=control, module="canny", model=title, weight=0.8, threshold_a=100,
                                   threshold_b=200, guidance_start=0.0, guidance_end=0.5, control_mode=1,
                                   resize_mode="Crop and Resize")
    result = api.txt2img(prompt="a red circle", seed=7, steps=3, width=32, height=48, cfg_scale=4,
                         sampler_name="Euler", enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                         denoising_strength=0.6, hr_second_pass_steps=2, controlnet_units=[unit],
                         alwayson_scripts={})  # webuiapi's default dict is shared between calls
    assert result.image.size == (64, 96)
    info = parse_a1111(result.image.info["parameters"])
    assert info["hires_upscale"] == 2.0 and info["hires_steps"] == 2 and info["denoising_strength"] == 0.6
    fields = parse_control_unit(info["ControlNet 0"])
    assert fields["Module"] == "canny" and fields["Model"] == title and fields["Weight"] == "0.8"
    assert fields["Control Mode"] == "My prompt is more important" and fields["Guidance End"] == "0.5"
    assert (fields["Threshold A"], fields["Threshold B"]) == ("100", "200")  # the defaults, as the extension
    # the control changes the picture: the same request without the unit differs
    plain = api.txt2img(prompt="a red circle", seed=7, steps=3, width=32, height=48, cfg_scale=4,
                        sampler_name="Euler", enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                        denoising_strength=0.6, hr_second_pass_steps=2, alwayson_scripts={})
    assert not np.array_equal(np.asarray(plain.image), np.asarray(result.image))
    assert "ControlNet 0" not in plain.image.info["parameters"]


@pytest.mark.parametrize("unit, words", [
    ({"model": "nope", "image": "x"}, "args[0].image: not valid base64"),
    ({"model": "nope"}, "args[0].image: missing"),
    ({"model": "nope", "image": "<png>"}, "args[0].model: 'nope' is not in the control models folder"),
    ({"model": "tiny_canny", "image": "<png>", "module": "depth_midas"}, "args[0].module: 'depth_midas'"),
    ({"model": "tiny_canny", "image": "<png>", "weight": "1"}, "args[0].weight: '1' is not a number"),
    ({"model": "tiny_canny", "image": "<png>", "control_mode": 7}, "args[0].control_mode: 7 is not one of"),
    ({"model": "tiny_canny", "image": "<png>", "resize_mode": "Stretch"}, "args[0].resize_mode: 'Stretch'"),
    ({"model": "ip.bin", "image": "<png>", "module": "ip-adapter_face_id"}, "FaceID needs a face detector"),
])
def test_bad_controlnet_units_are_one_line_400s(served, unit, words):
    import httpx

    png = _b64(Image.fromarray(_picture(16, 16)))
    unit = {k: (png if v == "<png>" else v) for k, v in unit.items()}
    r = httpx.post(f"{served['url']}/sdapi/v1/txt2img", json={
        "prompt": "x", "width": 32, "height": 32, "steps": 2,
        "alwayson_scripts": {"controlnet": {"args": [{"enabled": False, "model": 5}, unit]}}})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "\n" not in detail and words.replace("args[0]", "args[1]") in detail, detail


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_controlnet_flags_metadata_and_from(tiny_files, cn_file, tmp_path):
    import json

    from typer.testing import CliRunner

    from sdxl.cli import app

    runner = CliRunner()
    control = tmp_path / "edges.png"
    Image.fromarray(_picture(64, 64)).save(control)
    out = tmp_path / "a.png"
    base = ["generate", "a red circle", "--model", str(tiny_files["base"]), "-W", "32", "-H", "32", "--steps",
            "2", "--seed", "3", "--quiet"]
    res = runner.invoke(app, [*base, "--out", str(out), "--controlnet", f"{cn_file}:0.8:0:0.5",
                              "--control-image", str(control), "--control-preprocessor", "canny",
                              "--control-mode", "prompt", "--control-threshold", "50:150"])
    assert res.exit_code == 0, res.output
    stored = json.loads(Image.open(out).info["sdxl"])["request"]["controls"]
    assert stored == [{"model": str(cn_file.resolve()), "image": str(control.resolve()), "weight": 0.8,
                       "start": 0.0, "end": 0.5, "control_type": None, "control_mode": "prompt",
                       "resize_mode": "crop", "preprocessor": "canny", "threshold_a": 50.0,
                       "threshold_b": 150.0}]
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny [' in Image.open(out).info["parameters"]
    again = tmp_path / "again.png"
    res = runner.invoke(app, ["generate", "--from", str(out), "--model", str(tiny_files["base"]), "--out",
                              str(again), "--quiet"])
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))


@pytest.mark.parametrize("extra, words", [
    (["--controlnet", "<cn>"], "--control-image: 0 given for 1 --controlnet units"),
    (["--controlnet", "<cn>:1:0.5", "--control-image", "<img>"], "expected FILE, FILE:WEIGHT or"),
    (["--controlnet", "nope.safetensors", "--control-image", "<img>"],
     "--controlnet nope.safetensors: no such"),
    (["--controlnet", "<cn>", "--control-image", "<img>", "--control-mode", "loud"],
     "--control-mode (unit 1): 'loud' is not one of balanced, prompt, control"),
    (["--controlnet", "<cn>", "--control-image", "<img>", "--control-preprocessor", "depth"],
     "--control-preprocessor (unit 1): 'depth' is not a preprocessor"),
    (["--controlnet", "<cn>", "--controlnet", "<cn>", "--control-image", "<img>", "--control-image", "<img>",
      "--control-resize", "crop", "--control-resize", "fill", "--control-resize", "crop"],
     "--control-resize: given 3 times for 2 units"),
    (["--controlnet", "<cn>:20", "--control-image", "<img>"], "--controlnet (unit 1): 20"),
    (["--control-mode", "prompt"], "--control-mode: no control unit"),
    (["--ip-adapter", "<cn>", "--ip-adapter", "<cn>", "--ip-image", "<img>"], "--ip-image: 1 given for 2"),
])  # fmt: skip
def test_cli_control_errors_are_one_line(cn_file, tmp_path, extra, words):
    from typer.testing import CliRunner

    from sdxl.cli import app

    img = tmp_path / "c.png"
    Image.new("RGB", (8, 8)).save(img)
    extra = [x.replace("<cn>", str(cn_file)).replace("<img>", str(img)) for x in extra]
    res = CliRunner().invoke(app, ["generate", "x", "--steps", "2", *extra])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and words in res.output and len(lines) == 1, res.output


def test_native_api_control_unit_takes_base64_never_server_paths(served, tmp_path):
    import time

    import httpx

    url = served["url"]
    png = _b64(Image.fromarray(_picture(32, 32)), prefix=True)
    body = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 2, "seed": 1,
            "controls": [{"model": "tiny_canny", "image": png, "preprocessor": "canny", "weight": 0.7}]}
    job = httpx.post(f"{url}/jobs", json=body).json()
    assert "id" in job, job
    for _ in range(600):
        j = httpx.get(f"{url}/jobs/{job['id']}").json()
        if j["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert j["status"] == "done", j
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny [' in j["images"][0]["info"]
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    r = httpx.post(f"{url}/jobs", json={**body, "controls": [{"model": "tiny_canny", "image": str(secret)}]})
    assert r.status_code == 400 and "controls[0].image" in r.json()["detail"], r.text
    outside = tmp_path / "cn.safetensors"
    outside.write_bytes(served["model"].read_bytes())
    r = httpx.post(f"{url}/jobs", json={**body, "controls": [{"model": str(outside), "image": png}]})
    assert r.status_code == 400 and "controls[0].model" in r.json()["detail"], r.text


# ------------------------------------------------------------------------------------------------ web UI
def test_webui_control_section(served, tmp_path):
    """The page lists the server's control models, sends the chosen image as a unit and shows the
    ControlNet infotext; "Reuse these settings" puts the unit's settings back (Chromium via Playwright, as
    tests/test_webui.py)."""
    from test_webui import open_page, sync_playwright, wait_done, wait_js, wait_ready

    control = tmp_path / "control.png"
    Image.fromarray(_picture(32, 32)).save(control)
    with sync_playwright() as pw:
        browser, page, errors = open_page(pw)
        page.goto(served["url"] + "/")
        wait_ready(page)
        wait_js(page, "document.querySelectorAll('#control_model option').length === 2", 10_000)
        assert page.eval_on_selector_all("#control_model option", "os => os.map(o => o.value)") == [
            "", "tiny_canny"]
        page.fill("#prompt", "a red circle")
        page.fill("#width", "32")
        page.fill("#height", "32")
        page.fill("#steps", "2")
        page.fill("#seed", "5")
        page.set_input_files("#control_image", str(control))
        page.select_option("#control_model", "tiny_canny")
        page.select_option("#control_preprocessor", "canny")
        page.select_option("#control_mode", "control")
        page.fill("#control_weight", "0.6")
        page.fill("#control_end", "0.5")
        page.click("#generate")
        wait_done(page)
        card = page.locator("#gallery .card").first
        card.wait_for(timeout=10_000)
        info = card.locator(".info").text_content()
        assert 'ControlNet 0: "Module: canny, Model: tiny_canny [' in info
        assert "Weight: 0.6, Resize Mode: Crop" in info
        assert "Guidance End: 0.5" in info and "Control Mode: ControlNet is more important" in info
        page.select_option("#control_mode", "balanced")
        page.fill("#control_weight", "1")
        card.locator(".reuse").click()
        assert page.input_value("#control_mode") == "control" and page.input_value("#control_weight") == "0.6"
        # an image without a model is a message on the page, not a request
        page.select_option("#control_model", "")
        page.click("#generate")
        wait_js(page, "document.getElementById('error').textContent.includes('choose a model')", 5_000)
        assert not errors, errors
        browser.close()


def test_a1111_unit_fields_map_as_the_extension_reads_them(tmp_path):
    """sd-webui-controlnet's spellings -> ControlUnit / IPAdapterUnit (without running anything)."""
    import base64
    import io
    from types import SimpleNamespace

    from sdxl.serve.a1111_controlnet import controlnet_units

    (tmp_path / "models" / "ControlNet").mkdir(parents=True)
    (tmp_path / "models" / "ControlNet" / "cn_lineart.safetensors").write_bytes(b"0" * 64)

    def decode(text, what):
        return Image.open(io.BytesIO(base64.b64decode(text.partition(",")[2] if text.startswith("data:")
                                                      else text))).convert("RGB")

    svc = SimpleNamespace(settings=SimpleNamespace(models_dir=tmp_path / "models"),
                          manager=SimpleNamespace(inputs=tmp_path / "inputs"), decode_image=decode)
    pic = Image.fromarray(_picture(16, 24))
    args = [
        {"enabled": False, "module": "canny", "model": "missing"},
        {"input_image": _b64(pic, prefix=True), "module": "invert (from white bg & black line)",
         "model": "cn_lineart [0123abcd]", "guidance": 0.6, "resize_mode": 2, "weight": 1.5,
         "control_mode": "ControlNet is more important", "threshold_a": 500, "low_vram": True,
         "some_future_field": [1, 2]},
        {"image": {"image": _b64(pic), "mask": _b64(pic)}, "module": "canny", "model": "CN_LINEART",
         "threshold_a": 30, "threshold_b": -1, "resize_mode": "Outer Fit (Shrink to Fit)", "control_mode": 1},
        {"image": _b64(pic), "module": "ip-adapter_clip_sdxl_plus_vith",
         "model": "ip-adapter-plus_sdxl_vit-h [f1e2d3c4]", "weight": 0.7, "guidance_start": 0.2},
    ]
    controls, ips = controlnet_units(svc, "ControlNet", {"args": args})
    first, second = controls
    assert (first.preprocessor, first.end, first.resize_mode, first.weight, first.control_mode) == (
        "invert", 0.6, "fill", 1.5, "control")
    assert first.threshold_a is None and first.control_type == "lineart"
    assert first.model == str((tmp_path / "models" / "ControlNet" / "cn_lineart.safetensors").resolve())
    assert np.array_equal(np.asarray(Image.open(first.image)), np.asarray(pic))  # kept in the inputs folder
    assert (second.preprocessor, second.threshold_a, second.threshold_b, second.resize_mode,
            second.control_mode, second.control_type) == ("canny", 30.0, None, "fill", "prompt", "canny")
    (ip,) = ips
    assert (ip.model, ip.scale, ip.start, ip.end, len(ip.images)) == ("ip-adapter-plus_sdxl_vit-h", 0.7, 0.2,
                                                                     1.0, 1)
    GenerationRequest(controls=controls, ip_adapters=ips).validate()  # the request's own checks pass


def test_cli_ip_adapter_flags_and_from_replacements(tmp_path, capsys):
    import typer

    from sdxl.cli import _control_fields

    adapter, encoder = tmp_path / "ip-adapter_sdxl.safetensors", tmp_path / "image_encoder"
    adapter.write_bytes(b"0")
    encoder.mkdir()
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        Image.new("RGB", (8, 8)).save(p)
    empty = {k: [] for k in ("controlnet", "control_image", "control_type", "control_mode", "control_resize",
                             "control_preprocessor", "control_threshold", "ip_adapter", "ip_image")}
    empty.update(controlnet_dir=None, ip_adapter_dir=None, image_encoder=None)
    got = _control_fields({**empty, "ip_adapter": [f"{adapter}:0.6:0.1:0.9"], "ip_image": [a, b],
                           "image_encoder": str(encoder)}, {})
    assert got == {"ip_adapters": [{"model": str(adapter.resolve()), "images": [str(a.resolve()),
                                                                                  str(b.resolve())],
                                    "scale": 0.6, "start": 0.1, "end": 0.9,
                                    "image_encoder": str(encoder.resolve())}]}
    # --from: an image uploaded to the server is not stored; --control-image supplies it, the rest stays
    stored = {"controls": [{"model": "cn", "image": "<image>", "weight": 0.5}]}
    got = _control_fields({**empty, "control_image": [a], "control_mode": ["control"]}, stored)
    assert got["controls"] == [{"model": "cn", "image": str(a.resolve()), "weight": 0.5,
                                "control_mode": "control"}]
    with pytest.raises(typer.Exit):
        _control_fields(empty, stored)
    assert "unit 1 has no stored control image" in capsys.readouterr().err


def test_a1111_img2img_unit_without_image_uses_the_init_image(served):
    import json

    import httpx

    init = _b64(Image.fromarray(_picture(32, 32)))
    r = httpx.post(f"{served['url']}/sdapi/v1/img2img", timeout=120, json={
        "prompt": "a red circle", "init_images": [init], "steps": 2, "seed": 3, "denoising_strength": 0.5,
        "alwayson_scripts": {"ControlNet": {"args": [{"image": "", "mask": None, "module": "canny",
                                                       "model": "tiny_canny", "enabled": True}]}}})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])["infotexts"][0]
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny [' in info and "Denoising strength: 0.5" in info
