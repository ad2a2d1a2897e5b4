"""The web UI in a real browser: headless Chromium (Debian's `chromium` package) driven by Playwright,
against a real `python -m sdxl.serve` process with a tiny random-weight model file.

The page is opened, an image is generated, progress (websocket events, live preview, progress bar) is
seen, the image appears in the gallery with its parameters, and "Reuse these settings" puts them back
in the form. A second test runs the server with an API key: the page asks for it, and once entered the
key reaches fetch(), <img> and the websocket (through the SameSite cookie).
A screenshot is saved to tests/artifacts/webui.png.

Needs `pip install playwright` and `apt-get install -y chromium`; the browser is never downloaded by
Playwright. Without them the test fails (it does not skip), saying what to install.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from sdxl.models.config import tiny_config
from sdxl.models.text import TextEncoders
from sdxl.models.unet import UNet
from sdxl.models.vae import AutoencoderKL
from sdxl.weights.checkpoint import Checkpoint, write_single_file

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPT = "a red circle above a blue square"
STEPS = 8


def sync_playwright():
    """Playwright's entry point, or a failure that says what to install."""
    try:
        from playwright.sync_api import sync_playwright as entry
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install playwright (it drives Debian's chromium; "
                    "do not run `playwright install`)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}: apt-get install -y chromium")
    return entry()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config()
    text = TextEncoders(cfg.text_l, cfg.text_g)
    parts = {"unet": UNet(cfg.unet).state_dict(), "vae": AutoencoderKL(cfg.vae).state_dict(),
             "text_l": text.clip_l.state_dict(), "text_g": text.clip_g.state_dict()}
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return write_single_file(Checkpoint(path=path, config=cfg, parts=parts), path)


def start_server(model: Path, data_dir: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = data_dir.parent / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdxl.serve", "--model", str(model), "--data-dir", str(data_dir), "--port",
         str(port), "--log-level", "warning", *extra],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 90
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/static/app.js", timeout=5).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    print("server log:\n" + log.read_text()[-5000:])  # shown by pytest when the test fails


def wait_js(page, expression: str, timeout_ms: int = 60_000) -> None:
    """Wait until `expression` is true in the page; on timeout, fail with what the page shows."""
    try:
        page.wait_for_function(expression, timeout=timeout_ms)
    except Exception as e:  # noqa: BLE001 - turned into a readable failure
        state = page.evaluate("({status: document.getElementById('server-status').textContent,"
                              " text: document.getElementById('progress-text').textContent,"
                              " error: document.getElementById('error').textContent,"
                              " events: window.sdxl ? window.sdxl.events.map("
                              "e => e.type + ':' + (e.step || '') + (e.job ? e.job.status : '')) : null})")
        raise AssertionError(f"timed out waiting for {expression!r}; the page shows {state}") from e


def wait_done(page) -> None:
    wait_js(page, "document.getElementById('progress-text').textContent.startsWith('done')", 300_000)


def wait_status(api: httpx.Client, job_id: str, status: str, timeout: float = 300.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = api.get(f"/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never became {status}: {job}")


def wait_ready(page) -> None:
    wait_js(page, "document.getElementById('server-status').textContent === 'ready'", 30_000)


def open_page(playwright):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return browser, page, errors


def generate(page, steps: int) -> None:
    page.fill("#prompt", PROMPT)
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#steps", str(steps))
    page.fill("#seed", "1234")
    page.select_option("#sampler", "euler")
    page.click("#generate")


def test_generate_in_the_browser(model_file, tmp_path):
    proc, url, log = start_server(model_file, tmp_path / "data")
    try:
        with sync_playwright() as pw:
            browser, page, errors = open_page(pw)
            page.goto(url + "/")
            wait_ready(page)
            # idle: no preview image shown (no broken-image icon); the CSS must not override `hidden`
            assert page.get_attribute("#preview", "hidden") is not None
            assert not page.locator("#preview").is_visible()
            assert page.eval_on_selector("#preview", "e => getComputedStyle(e).display") == "none"
            # the refiner choice lists refiner checkpoints only (this tiny base model has none)
            assert page.eval_on_selector_all("#refiner option", "os => os.map(o => o.value)") == [""]
            # the form is filled from /info: samplers, schedules, the paper's size buckets
            assert page.locator("#sampler option").count() >= 10
            sizes = page.eval_on_selector_all("#size-preset option", "os => os.map(o => o.value)")
            assert {"1024x1024", "1344x768", "768x1344"} <= set(sizes)
            page.select_option("#size-preset", "1152x896")
            assert page.input_value("#width") == "1152" and page.input_value("#height") == "896"

            # a long job submitted through the API holds the worker, so the page's job waits in the queue
            # with its websocket open and every step of it is seen, however fast or slow this machine is
            api = httpx.Client(base_url=url, timeout=60)
            blocker = api.post("/jobs", json={"prompt": "blocker", "width": 256, "height": 256, "steps": 150,
                                              "sampler": "euler", "schedule": "karras"}).json()["id"]
            wait_status(api, blocker, "running")
            generate(page, steps=STEPS)
            wait_js(page, "document.getElementById('progress-text').textContent.startsWith('queued')")
            assert api.post(f"/jobs/{blocker}/cancel").status_code == 200
            # progress: websocket events, the bar, the live preview
            wait_js(page, "window.sdxl.events.some(e => e.type === 'progress' && e.step < e.total)", 300_000)
            wait_done(page)
            steps_seen = page.evaluate(
                "window.sdxl.events.filter(e => e.type === 'progress').map(e => e.step)")
            assert steps_seen == list(range(1, STEPS + 1))
            assert wait_status(api, blocker, "cancelled")["status"] == "cancelled"
            api.close()
            # live previews arrived as JPEGs; at the end the result replaced the preview
            assert page.evaluate("window.sdxl.events.filter(e => e.type === 'progress')"
                                 ".every(e => e.preview.startsWith('data:image/jpeg;base64,'))")
            assert page.get_attribute("#preview", "src").endswith(".png")
            assert page.locator("#preview").is_visible()
            assert float(page.get_attribute("#progress", "data-progress")) == 1.0

            # the gallery shows the image (loaded, 128 px) with its parameters
            card = page.locator("#gallery .card").first
            card.wait_for(timeout=30_000)
            page.wait_for_function(
                "(() => { const i = document.querySelector('#gallery .card img');"
                " return i && i.complete && i.naturalWidth === 128; })()", timeout=30_000)
            assert PROMPT in card.locator(".prompt").inner_text()
            info = card.locator(".info").text_content()
            assert "Seed: 1234" in info and f"Steps: {STEPS}," in info and "Size: 128x128" in info

            # "Reuse these settings" puts the request back into the form
            page.fill("#prompt", "something else")
            page.fill("#steps", "3")
            page.fill("#seed", "")
            card.locator(".reuse").click()
            assert page.input_value("#prompt") == PROMPT
            assert page.input_value("#steps") == str(STEPS) and page.input_value("#seed") == "1234"
            assert page.input_value("#width") == "128"

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)

            # a reload shows the same gallery (history from the server)
            page.reload()
            page.locator("#gallery .card").first.wait_for(timeout=30_000)
            assert page.locator("#gallery .card").count() == 1
            assert not errors, errors
            browser.close()
    finally:
        stop_server(proc, log)
    assert (ARTIFACTS / "webui.png").stat().st_size > 10_000


def test_browser_with_api_key(model_file, tmp_path):
    proc, url, log = start_server(model_file, tmp_path / "data", "--api-key", "browser key")
    try:
        with sync_playwright() as pw:
            browser, page, errors = open_page(pw)
            page.goto(url + "/")
            wait_js(page, "document.getElementById('error').textContent.includes('401')", 30_000)
            assert page.locator("#key-box").get_attribute("open") is not None
            page.fill("#api-key", "browser key")
            page.click("#key-form button")  # saves the key and reloads
            wait_ready(page)
            # the guidance controls: PAG scale, FreeU and eta reach the request and the infotext
            page.fill("#pag_scale", "2")
            page.check("#freeu")
            page.fill("#eta", "0.5")
            page.fill("#hires_scale", "1.5")  # the hires fix: scale, upscaler, strength
            page.select_option("#hires_upscaler", "Lanczos")
            page.fill("#hires_strength", "0.5")
            generate(page, steps=3)
            wait_done(page)
            # the websocket got through (its events arrived) and the image loaded through the cookie
            assert page.evaluate("window.sdxl.events.some(e => e.type === 'finished')")
            request = page.evaluate("window.sdxl.events.find(e => e.type === 'finished').job.request")
            assert (request["pag_scale"], request["freeu"], request["eta"]) == (2, True, 0.5)
            info = page.locator("#gallery .card .info").first.text_content()
            assert "PAG scale: 2" in info and "FreeU: b1=1.3 b2=1.4 s1=0.9 s2=0.2" in info
            assert (request["hires_scale"], request["hires_upscaler"], request["hires_strength"]) == (
                1.5, "Lanczos", 0.5)
            assert "Denoising strength: 0.5" in info and "Hires upscale: 1.5, Hires upscaler: Lanczos" in info
            page.fill("#pag_scale", "0")
            page.uncheck("#freeu")
            page.fill("#eta", "")
            page.fill("#hires_scale", "0")
            page.locator("#gallery .card .reuse").first.click()
            assert page.input_value("#pag_scale") == "2" and page.is_checked("#freeu")
            assert page.input_value("#hires_scale") == "1.5"
            assert page.input_value("#hires_upscaler") == "Lanczos"
            page.fill("#hires_scale", "0")
            assert page.input_value("#eta") == "0.5"
            # region masks for a prompt split by AND go with the request as images, in file-name order
            masks = []
            for i, box in enumerate([(0, 0, 64, 128), (64, 0, 128, 128)]):
                mask = Image.new("L", (128, 128), 0)
                mask.paste(255, box)
                masks.append(tmp_path / f"mask{i}.png")
                mask.save(masks[-1])
            page.fill("#prompt", "a red circle AND a blue square")
            page.set_input_files("#region_masks", [str(masks[1]), str(masks[0])])
            page.click("#generate")
            wait_js(page, "window.sdxl.events.filter(e => e.type === 'finished').length === 2", 300_000)
            job = page.evaluate("window.sdxl.events.filter(e => e.type === 'finished')[1].job")
            assert job["status"] == "done", job
            assert [m.rsplit("-", 1)[1] for m in job["request"]["region_masks"]] == ["region0.png",
                                                                                     "region1.png"]
            page.wait_for_function(
                "(() => { const i = document.querySelector('#gallery .card img');"
                " return i && i.complete && i.naturalWidth === 128; })()", timeout=30_000)
            browser.close()
            unexpected = [e for e in errors if "401" not in e]  # the first load's refusal is expected
            assert not unexpected, unexpected
    finally:
        stop_server(proc, log)
