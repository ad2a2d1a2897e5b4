"""One request, every entry point, the same pixels.

The request (prompt, 64x64, 4 steps, seed 7, CFG 5, each sampler with its default "Automatic" schedule)
runs through:
- the Python API (`sdxl.load(path).generate(GenerationRequest(...))`): the reference image;
- the CLI (`sdxl generate ... --sampler S`): every sampler through the CLI's own entry point with the
  user's argv, in one child process per model (a process per sampler would cost ~4 s of torch import
  each), plus one whole `sdxl generate` process per model;
- the native HTTP API of a real `python -m sdxl.serve` process (POST /jobs, then GET the image);
- the A1111 endpoint of that server, driven by the third-party A1111 client from PyPI (`webuiapi`), the
  sampler named by its A1111 label and the schedule "Automatic";
- the web UI in headless Chromium: the form filled, the sampler picked by its label, the schedule left at
  its default ("Automatic"), Generate clicked, the finished job's image fetched;
for the shipped model (zero-terminal SNR: "Automatic" must mean "trailing" everywhere) and for a tiny
random-weight model in the official single-file layout. Each cell compares its image with the Python
API's: 8-bit difference <= 1, and the schedule the entry point reports must be the one the Python API
resolved. A failure names the model, the sampler and the entry point.

One server process and one browser page per model; everything for a model is computed once, the first
time one of its cells runs (the Python API and the CLI processes beside the server's entry points), and
the server is stopped before the next model's starts.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import sdxl
from sdxl.models.config import tiny_config
from sdxl.sampling import A1111_SAMPLER_NAMES, SAMPLER_INFO
from sdxl.sampling.names import parse_schedule_label
from sdxl.weights.checkpoint import random_checkpoint, write_single_file
from test_webui import open_page, start_server, stop_server, sync_playwright, wait_ready

PROMPT = "a red circle above a blue square"
STEPS, SIZE, SEED, CFG = 4, 64, 7, 5.0
MODELS = ("shipped", "tiny")
SAMPLERS = tuple(SAMPLER_INFO)
ENTRY_POINTS = ("cli", "http", "a1111", "webui")
PROCESS_SAMPLER = "dpmpp_2m"  # the sampler of the one whole `sdxl generate` process per model
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# The CLI's entry point called once per argv in one child process; prints {name: error or null} as JSON.
CLI_DRIVER = r"""
import contextlib, io, json, sys
from sdxl.cli import app
out = {}
for name, argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = app(args=argv, prog_name="sdxl", standalone_mode=False)
        out[name] = None if code in (None, 0) else f"exit {code}: {err.getvalue().strip()}"
    except BaseException as e:
        out[name] = f"{type(e).__name__}: {e} {err.getvalue().strip()}"
print("RESULTS " + json.dumps(out))
"""


def pixels(png: bytes | Image.Image) -> np.ndarray:
    img = png if isinstance(png, Image.Image) else Image.open(io.BytesIO(png))
    return np.asarray(img.convert("RGB")).astype(np.int16)


def png_schedule(png: bytes) -> str | None:
    """The schedule an image's A1111 infotext names ("Schedule type: Trailing" -> "trailing")."""
    text = Image.open(io.BytesIO(png)).info.get("parameters", "")
    m = re.search(r"Schedule type: ([^,\n]+)", text)
    return parse_schedule_label(m.group(1).strip()) if m else None


class Cell:
    """One entry point's outcome for one sampler: the image, or the first line of its error."""

    def __init__(self, image: np.ndarray | None = None, schedule: str | None = None,
                 error: str | None = None):
        self.image, self.schedule, self.error = image, schedule, error


def first_line(e: BaseException | str) -> str:
    text = str(e) if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return (text.strip().splitlines() or [""])[0]


# ------------------------------------------------------------------------------------------- entry points
def run_python(model: str) -> dict[str, Cell]:
    pipe = sdxl.load(model)
    out = {}
    for s in SAMPLERS:
        try:
            res = pipe.generate(sdxl.GenerationRequest(prompt=PROMPT, sampler=s, steps=STEPS, width=SIZE,
                                                       height=SIZE, seed=SEED, cfg=CFG))
            out[s] = Cell(pixels(res.images[0]), res.request.schedule)
        except Exception as e:  # noqa: BLE001 - reported by the cell
            out[s] = Cell(error=first_line(e))
    return out


def cli_argv(model: str, sampler: str, png: Path) -> list[str]:
    return ["generate", PROMPT, "--model", model, "--sampler", sampler, "--steps", str(STEPS),
            "-W", str(SIZE), "-H", str(SIZE), "--seed", str(SEED), "--cfg", str(int(CFG)),
            "--out", str(png), "--quiet"]


def run_cli(model: str, folder: Path) -> dict[str, Cell]:
    pngs = {s: folder / f"cli-{s}.png" for s in SAMPLERS}
    runs = [(s, cli_argv(model, s, pngs[s])) for s in SAMPLERS]
    proc = subprocess.run([sys.executable, "-c", CLI_DRIVER, json.dumps(runs)], capture_output=True,
                          text=True, env=CHILD_ENV, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    if line is None:
        tail = proc.stderr.strip().splitlines()
        err = first_line(tail[-1] if tail else f"rc {proc.returncode}")
        return {s: Cell(error=f"CLI driver failed: {err}") for s in SAMPLERS}
    errors = json.loads(line[len("RESULTS "):])
    out = {}
    for s in SAMPLERS:
        if errors.get(s):
            out[s] = Cell(error=first_line(errors[s]))
        elif not pngs[s].is_file():
            out[s] = Cell(error=f"no image written to {pngs[s]}")
        else:
            data = pngs[s].read_bytes()
            out[s] = Cell(pixels(data), png_schedule(data))
    return out


def run_cli_process(model: str, folder: Path) -> Cell:
    """The whole `sdxl generate` process (console script) for one sampler."""
    png = folder / "cli-process.png"
    exe = Path(sys.executable).with_name("sdxl")
    proc = subprocess.run([str(exe), *cli_argv(model, PROCESS_SAMPLER, png)], capture_output=True, text=True,
                          env=CHILD_ENV, timeout=300)
    if proc.returncode != 0:
        return Cell(error=f"exit {proc.returncode}: {first_line(proc.stderr or proc.stdout)}")
    data = png.read_bytes()
    return Cell(pixels(data), png_schedule(data))


def wait_job(api: httpx.Client, job_id: str, timeout: float = 300.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = api.get(f"/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def job_cell(api: httpx.Client, job: dict) -> Cell:
    if job["status"] != "done":
        return Cell(error=f"job {job['status']}: {first_line(job.get('error') or '')}")
    data = api.get(job["images"][0]["url"]).content
    return Cell(pixels(data), (job.get("resolved") or {}).get("schedule"))


def run_http(api: httpx.Client) -> dict[str, Cell]:
    out = {}
    for s in SAMPLERS:
        body = {"prompt": PROMPT, "sampler": s, "steps": STEPS, "width": SIZE, "height": SIZE, "seed": SEED,
                "cfg": CFG}
        r = api.post("/jobs", json=body)
        if r.status_code != 202:
            out[s] = Cell(error=f"POST /jobs {r.status_code}: {r.text[:300]}")
            continue
        out[s] = job_cell(api, wait_job(api, r.json()["id"]))
    return out


def a1111_name(sampler: str) -> str:
    """What an A1111 client sends for `sampler`: its A1111 label, or where several of our samplers share
    that label ("UniPC": unipc, unipc_bh1), our name, which /sdapi/v1/samplers lists as the label's alias."""
    label = A1111_SAMPLER_NAMES[sampler]
    shared = [s for s in SAMPLERS if A1111_SAMPLER_NAMES[s] == label]
    return label if len(shared) == 1 else sampler


def run_a1111(url: str) -> dict[str, Cell]:
    import webuiapi  # lazy: the third-party client is a test dependency only

    port = int(url.rsplit(":", 1)[1])
    client = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    listed = {n for e in client.get_samplers() for n in [e["name"], *(e.get("aliases") or [])]}
    out = {}
    for s in SAMPLERS:
        if a1111_name(s) not in listed:
            out[s] = Cell(error=f"/sdapi/v1/samplers does not list {a1111_name(s)!r}")
            continue
        try:
            # eta=None: the client sends no eta (its default, 1.0, would change DDIM), as the other entry
            # points send none
            res = client.txt2img(prompt=PROMPT, sampler_name=a1111_name(s), scheduler="Automatic",
                                 steps=STEPS, width=SIZE, height=SIZE, seed=SEED, cfg_scale=CFG, eta=None)
            schedule = parse_schedule_label(res.info["scheduler"]) if res.info.get("scheduler") else None
            out[s] = Cell(pixels(res.image), schedule)
        except Exception as e:  # noqa: BLE001 - reported by the cell
            out[s] = Cell(error=first_line(e))
    return out


def run_webui(url: str, api: httpx.Client) -> dict[str, Cell]:
    try:
        return drive_webui(url, api)
    except (Exception, pytest.fail.Exception) as e:  # no browser, or the page never became ready
        return {s: Cell(error=f"web UI: {first_line(e)}") for s in SAMPLERS}


def drive_webui(url: str, api: httpx.Client) -> dict[str, Cell]:
    out = {}
    with sync_playwright() as pw:
        browser, page, errors = open_page(pw)
        page.goto(url + "/")
        wait_ready(page)
        assert page.input_value("#schedule") == "automatic", "the web UI's default schedule is not Automatic"
        assert page.locator("#schedule option:checked").inner_text() == "Automatic"
        page.fill("#prompt", PROMPT)
        page.fill("#width", str(SIZE))
        page.fill("#height", str(SIZE))
        page.fill("#steps", str(STEPS))
        page.fill("#cfg", str(int(CFG)))
        page.fill("#seed", str(SEED))
        for s in SAMPLERS:
            try:
                before = page.evaluate("window.sdxl.current")
                page.select_option("#sampler", label=f"{A1111_SAMPLER_NAMES[s]} ({s})")
                page.click("#generate")
                page.wait_for_function(
                    "(before) => { const id = window.sdxl.current; return (id && id !== before &&"
                    " window.sdxl.events.some(e => e.type === 'finished' && e.job && e.job.id === id))"
                    " || document.getElementById('error').textContent !== ''; }",
                    arg=before, timeout=120_000)
                shown = page.text_content("#error")
                if shown:
                    out[s] = Cell(error=f"the page shows: {first_line(shown)}")
                    page.evaluate("document.getElementById('error').textContent = ''")
                    continue
                job = api.get(f"/jobs/{page.evaluate('window.sdxl.current')}").json()
                assert job["request"]["sampler"] == s
                out[s] = job_cell(api, job)
            except Exception as e:  # noqa: BLE001 - reported by the cell
                out[s] = Cell(error=first_line(e))
        browser.close()
    if errors:
        for s, cell in out.items():
            if cell.error is None:
                out[s] = Cell(error=f"console errors on the page: {first_line(errors[0])}")
    return out


# ------------------------------------------------------------------------------------------------ fixtures
class Matrix:
    """Every entry point's cells for a model, computed once, when a cell of that model first asks."""

    def __init__(self, tiny_model: Path, folder: Path):
        self.paths = {"shipped": "default", "tiny": str(tiny_model)}
        self.folder = folder
        self.done: dict[str, dict[str, dict[str, Cell]]] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, model: str) -> dict[str, dict[str, Cell]]:
        if model not in self.done:
            self.done[model] = self.compute(model)
        return self.done[model]

    def compute(self, model: str) -> dict[str, dict[str, Cell]]:
        path = self.paths[model]
        folder = self.folder / model
        folder.mkdir()
        cells: dict[str, dict[str, Cell]] = {}

        def timed(entry: str, run, *args) -> None:
            start = time.monotonic()
            cells[entry] = run(*args)
            self.seconds[f"{model} {entry}"] = round(time.monotonic() - start, 1)

        def in_process_and_cli() -> None:
            timed("python", run_python, path)
            timed("cli", run_cli, path, folder)
            timed("cli-process", lambda: {PROCESS_SAMPLER: run_cli_process(path, folder)})

        # The Python API and the CLI processes run on one core while the (one-thread) server is driven on
        # the other; the cells are compared only after both are done.
        with ThreadPoolExecutor(1) as pool:
            side = pool.submit(in_process_and_cli)
            start = time.monotonic()
            proc, url, log = start_server(Path(path), folder / "data")  # "default": the shipped model
            self.seconds[f"{model} server start"] = round(time.monotonic() - start, 1)
            try:
                with httpx.Client(base_url=url, timeout=120) as api:
                    timed("http", run_http, api)
                    timed("a1111", run_a1111, url)
                    timed("webui", run_webui, url, api)
            finally:
                stop_server(proc, log)
            side.result()
        print(f"entry point seconds: {self.seconds}")
        return cells


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-weight base model in the official single-file layout whose image depends on the
    sampler and the schedule. With conftest's weights (std 0.02) the UNet predicts almost nothing, every
    deterministic sampler on every schedule gives the same picture within 1, and a wrong "Automatic" would
    pass unseen; std 0.1 and a 3x output layer make the schedules differ (`test_tiny_model_tells_...`)."""
    ck = random_checkpoint(tiny_config("base"), seed=10, std=0.1)
    ck.parts["vae"] = random_checkpoint(tiny_config("base"), seed=10).parts["vae"]
    for key in ("out.2.weight", "out.2.bias"):
        ck.parts["unet"][key] = ck.parts["unet"][key] * 3
    return write_single_file(ck, tmp_path_factory.mktemp("tiny_model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def matrix(tiny_model, tmp_path_factory) -> Matrix:
    return Matrix(tiny_model, tmp_path_factory.mktemp("entry_points"))


def test_tiny_model_tells_schedules_apart(tiny_model):
    """Euler on Karras vs on its Automatic schedule (uniform): different pictures, so the matrix's
    comparisons on the tiny model can see a wrong schedule."""
    pipe = sdxl.load(tiny_model)
    images = [pixels(pipe.generate(sdxl.GenerationRequest(
        prompt=PROMPT, sampler="euler", schedule=schedule, steps=STEPS, width=SIZE, height=SIZE, seed=SEED,
        cfg=CFG)).images[0]) for schedule in ("automatic", "karras")]
    assert int(np.abs(images[0] - images[1]).max()) > 8


CASES = [(m, s, e) for m in MODELS for s in SAMPLERS for e in ("python", *ENTRY_POINTS)]
CASES += [(m, PROCESS_SAMPLER, "cli-process") for m in MODELS]
CASES.sort(key=lambda c: MODELS.index(c[0]))


@pytest.mark.parametrize(("model", "sampler", "entry"), CASES, ids=[f"{m}-{s}-{e}" for m, s, e in CASES])
def test_same_pixels(matrix, model, sampler, entry):
    cells = matrix(model)
    ref = cells["python"][sampler]
    assert ref.error is None, f"Python API, {model} model, {sampler}: {ref.error}"
    if model == "shipped":
        assert ref.schedule == "trailing", f"Automatic on the zero-terminal-SNR model gave {ref.schedule}"
    if entry == "python":
        return
    cell = cells[entry][sampler]
    where = f"{entry}, {model} model, {sampler}"
    assert cell.error is None, f"{where}: {cell.error}"
    assert cell.image.shape == ref.image.shape, f"{where}: image {cell.image.shape}, not {ref.image.shape}"
    diff = int(np.abs(cell.image - ref.image).max())
    assert cell.schedule is None or cell.schedule == ref.schedule, (
        f"{where}: schedule {cell.schedule}, the Python API's {ref.schedule} (pixel difference {diff})")
    assert diff <= 1, f"{where}: max 8-bit difference {diff} from the Python API's image"


def test_every_cell_reports_a_schedule(matrix):
    """Every entry point says which schedule ran (so the schedule check above is not vacuous)."""
    for model in MODELS:
        for entry in ("cli", "http", "a1111", "webui"):
            for s, cell in matrix(model)[entry].items():
                if cell.error is None:
                    assert cell.schedule is not None, f"{entry}, {model} model, {s}: no schedule reported"
