"""Property-based API testing: schemathesis generates requests from the server's own OpenAPI schema
(`/openapi.json`) for every operation, valid and invalid, and checks each answer.

Runs in-process (ASGI) against the app built on a tiny random-weight SDXL, with small limits so the
synchronous A1111 routes that do generate stay fast. Asserted for every generated request:
  - not_a_server_error: no 5xx answer (a 500 is an unhandled exception: a bug);
  - response_schema_conformance: a documented status's body matches its documented schema;
  - content_type_conformance: the Content-Type is the documented one.
Not asserted: `status_code_conformance`: the routes answer 400/404/409/429 with a message the schema does not
list per route (documented once, in the module docstring of `sdxl.serve.app`).

The example budget is fixed and `derandomize=True`, so every CI run sends the same requests.

Then the hostile run (`test_hostile_values_in_every_field`): every operation that takes a JSON body, query,
header or path parameters gets, in each field in turn (nested ones too: LoRA entries, A1111
`override_settings` keys), NaN, Infinity and -Infinity (as the raw JSON tokens, which Python's json
accepts), huge (1e308, 2**70) and negative numbers, booleans, lone surrogates (a `\ud800` JSON escape) and a
1 MB text; `POST /sdapi/v1/options` gets the same in every option, each accepted setting followed by a
normal txt2img. Afterwards every job is listed (`GET /jobs` paged to the end, `GET /jobs/{id}` each) and
every stored PNG is read back (`sdxl.metadata.read_info`). Asserted: no 5xx, no request accepted and then
failed at run time, no option that breaks later requests, no unreadable row or file. The totals per route
and status are printed (`pytest -s`). `SDXL_SCHEMATHESIS_EXAMPLES` above 12 adds more hostile values.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import sqlite3
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from sdxl.metadata import read_info
from sdxl.models.config import tiny_config
from sdxl.models.text import TextEncoders
from sdxl.models.unet import UNet
from sdxl.models.vae import AutoencoderKL
from sdxl.pipeline import SDXL
from sdxl.request import Limits
from sdxl.serve.app import create_app
from sdxl.serve.settings import ServeSettings
from sdxl.serve.store import JobStore

# per operation and mode (valid / invalid data): 20 operations -> some 300 requests, ~10 s here
EXAMPLES = int(os.environ.get("SDXL_SCHEMATHESIS_EXAMPLES", "12"))  # deeper runs: set it to 200
# random bodies almost never fit the limits, so these valid ones go through the same checks too
VALID = {
    "POST /jobs": {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 1},
    "POST /sdapi/v1/txt2img": {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 1},
}

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    cfg = tiny_config()
    return SDXL(cfg, UNet(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval(),
                TextEncoders(cfg.text_l, cfg.text_g).eval())


def _settings(folders: Path) -> ServeSettings:
    (folders / "models" / "loras").mkdir(parents=True, exist_ok=True)
    return ServeSettings(
        data_dir=folders / "data", models_dir=folders / "models", queue_size=64, shutdown_grace_s=2,
        # small limits: the A1111 txt2img/img2img routes wait for their images
        limits=Limits(max_pixels=64 * 64, max_steps=3, max_batch=2, max_prompt_chars=200),
        max_body_bytes=3 * 2**20,  # a 1 MB text in a field reaches the validation, not the 413
        job_timeout_s=20,
        allowed_hosts=["testserver"],  # schemathesis' ASGI client addresses `testserver`
    )


@pytest.fixture
def app(pipe, tmp_path):
    """For schemathesis, which runs the app's lifespan (the job worker) itself, from its first request to the
    end of the test (a TestClient context around it too would start a second worker on the same queue)."""
    return create_app(_settings(tmp_path), pipeline=pipe)


@pytest.fixture
def served_app(pipe, tmp_path):
    application = create_app(_settings(tmp_path), pipeline=pipe)
    with TestClient(application, base_url="http://127.0.0.1"):  # runs the lifespan: the job worker
        yield application


def _check_operation(operation, mode: GenerationMode, statuses: Counter) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(
            checks=CHECKS)
        statuses[(operation.label, response.status_code)] += 1

    run()


def test_api_conforms_to_its_schema(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert "POST /jobs" in labels and "POST /sdapi/v1/txt2img" in labels and len(labels) >= 15, labels
    failures, statuses = [], Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _check_operation(operation, mode, statuses)
            except Unsatisfiable:  # no invalid request exists (an operation without parameters or body)
                assert mode is GenerationMode.NEGATIVE
            except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report them all
                failures.append(f"{operation.label} ({mode.value}): {e}"[:3000])
        if operation.label in VALID:
            case = operation.Case(body=VALID[operation.label], media_type="application/json")
            response = case.call_and_validate(checks=CHECKS)
            statuses[(operation.label, response.status_code)] += 1
    assert not failures, "\n\n".join(failures)
    # the generated requests reached the handlers, not only the validation layer: jobs were accepted and
    # refused, A1111 generations ran, and nothing answered 5xx
    seen = {(label, code // 100) for label, code in statuses}
    assert {("POST /jobs", 2), ("POST /jobs", 4), ("POST /sdapi/v1/txt2img", 2),
            ("POST /sdapi/v1/txt2img", 4)} <= seen, sorted(statuses.items())
    assert not any(code >= 500 for _, code in statuses)
    assert sum(statuses.values()) > 200
    # then every job the run left is listed and every image it saved reads back
    rec = Recorder(TestClient(app, base_url="http://127.0.0.1"))
    stored = _reread_everything(rec, app.state.manager, app.state.manager.outputs)
    print(f"\nschemathesis: {sum(statuses.values())} requests; stored {dict(stored)}")
    assert not rec.failures, "\n".join(rec.failures)
    assert stored["rows"] >= 2 and stored["files"] >= 2


# ------------------------------------------------------------------------------------------------ hostile
BIG_TEXT = "x" * 1_000_000
HOSTILE: list[tuple[str, object]] = [
    ("NaN", math.nan), ("Infinity", math.inf), ("-Infinity", -math.inf), ("1e308", 1e308), ("-1e308", -1e308),
    ("2**70", 2**70), ("-2**70", -(2**70)), ("-1", -1), ("-5.5", -5.5), ("true", True), ("false", False),
    ("lone surrogate", "\ud800"), ("text with a lone surrogate", "a cat \udc00"), ("1 MB text", BIG_TEXT),
    ("empty text", ""), ("null", None),
]
if EXAMPLES > 12:  # the deeper run
    HOSTILE += [("2**63", 2**63), ("2**64", 2**64), ("-0.0", -0.0), ("5e-324", 5e-324), ("NUL", "a\x00b"),
                ("[]", []), ("{}", {}),
                ("100 000 nested lists", "NESTED"), ("BOM and RTL", "\ufeff\u202ea cat"),
                ("1 MB of U+FFFF", "\uffff" * 1_000_000)]
HUGE_OR_NOT_FINITE = {"NaN", "Infinity", "-Infinity", "1e308", "-1e308", "2**70", "-2**70"}
BAD_TEXT = {"lone surrogate", "text with a lone surrogate", "1 MB text"}
# the same values as URL text (query, path, header): a lone surrogate is not UTF-8, so its 3 bytes go raw
# (URLs stop at 64 KB in the HTTP client, so the long text is 32 KB there)
URL_HOSTILE = [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"), ("1e308", "1e308"),
               ("2**70", str(2**70)), ("-2**70", str(-(2**70))), ("-1", "-1"), ("true", "true"),
               ("lone surrogate", "%ED%A0%80"), ("32 KB text", "x" * 32_000)]
# px: small, as every accepted A1111 request generates an image; the tiny model (one channel per norm group)
# cannot run below 32 px without CFG's doubled batch
SIZE = 32


def _png_b64(size: int = SIZE, color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _base_bodies() -> dict[str, dict]:
    small = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "steps": 1, "seed": 1}
    return {
        "POST /jobs": dict(small),
        "POST /sdapi/v1/txt2img": dict(small),
        "POST /sdapi/v1/img2img": {**small, "init_images": [_png_b64()], "denoising_strength": 0.5,
                                   # inpainting, so that the mask fields reach the request too
                                   "mask": _png_b64(color=(255, 255, 255))},
        "POST /sdapi/v1/png-info": {"image": _png_b64(8)},
    }


# A1111 fields that reach the generation from the bodies above (the others are accepted and ignored, as A1111
# clients send many, e.g. refiner_switch_at without a refiner): a hostile value there must be refused
TXT2IMG_MAPPED = {"prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler",
                  "batch_size", "n_iter", "steps", "cfg_scale", "width", "height", "eta", "override_settings",
                  "refiner_checkpoint", "styles", "script_name", "alwayson_scripts", "subseed_strength",
                  "tiling", "enable_hr"}
MAPPED = {
    "POST /sdapi/v1/txt2img": TXT2IMG_MAPPED,
    "POST /sdapi/v1/img2img": TXT2IMG_MAPPED - {"enable_hr"} | {
        "init_images", "denoising_strength", "mask", "mask_blur", "mask_blur_x", "mask_blur_y",
        "inpainting_mask_invert"},
}
MAPPED_OPTIONS = {"CLIP_stop_at_last_layers", "sd_model_checkpoint"}  # the override_settings that count
NESTED_ITEM = {"loras": {"name": "style", "weight": 0.5}}  # a base entry of a list field, per field
UNKNOWN_OPTION = "outdir_samples"  # an A1111 option this server does not use


def _deref(schema: dict, spec: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _kinds(schema: dict, spec: dict) -> list[dict]:
    schema = _deref(schema, spec)
    out = []
    for s in schema.get("anyOf", []) or [schema]:
        out.append(_deref(s, spec))
    return out


def _field_paths(body_schema: dict, spec: dict, option_keys: list[str]) -> list[tuple[tuple, str]]:
    """Every (path, json type) of a body: top-level fields, the keys of a LoRA-like list entry, and the
    option keys inside `override_settings`."""
    paths = []
    for name, prop in _deref(body_schema, spec).get("properties", {}).items():
        kinds = _kinds(prop, spec)
        types = {k.get("type") for k in kinds}
        paths.append(((name,), "/".join(sorted(t for t in types if t))))
        for k in kinds:
            item = _deref(k.get("items", {}), spec) if k.get("type") == "array" else {}
            for sub, sub_schema in item.get("properties", {}).items():
                sub_types = {t.get("type") for t in _kinds(sub_schema, spec)}
                paths.append(((name, 0, sub), "/".join(sorted(t for t in sub_types if t))))
            if k.get("type") == "object" and k.get("additionalProperties") and name == "override_settings":
                paths += [((name, key), "any") for key in option_keys]
    return paths


def _with(body: dict, path: tuple, value: object) -> dict:
    body = json.loads(json.dumps(body))
    if len(path) == 3:
        body[path[0]] = [dict(NESTED_ITEM.get(path[0], {}))]
        body[path[0]][0][path[2]] = value
    elif len(path) == 2:
        body[path[0]] = {**(body.get(path[0]) or {}), path[1]: value}
    else:
        body[path[0]] = value
    return body


def _json(body: dict) -> bytes:
    """Python's json writes NaN/Infinity as those tokens and a lone surrogate as a `\\ud800` escape."""
    text = json.dumps(body)
    return text.replace('"NESTED"', "[" * 100_000 + "]" * 100_000).encode()


def _exception_summary(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/sdxl/" in f.filename]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    at = f" at {Path(where.filename).name}:{where.lineno} {where.name}" if where else ""
    return f"{type(e).__name__}: {str(e)[:160]}{at}"


class Recorder:
    def __init__(self, client: TestClient):
        self.client = client
        self.statuses: Counter = Counter()
        self.failures: list[str] = []
        self.ignored: list[str] = []  # hostile values accepted in fields that do not reach a generation

    def send(self, label: str, method: str, url: str, *, body: dict | None = None,
             headers: dict | None = None, what: str = "") -> tuple[int, object]:
        try:
            r = self.client.request(method, url, content=None if body is None else _json(body),
                                    headers={"content-type": "application/json", **(headers or {})})
            status, detail = r.status_code, r.text[:200]
            try:
                data = r.json()
            except ValueError:
                data = None
        except Exception as e:  # noqa: BLE001 - an unhandled exception in the app: the 500 a client gets
            status, detail, data = 500, _exception_summary(e), None
        self.statuses[(label, status)] += 1
        if status >= 500:
            self.failures.append(f"{label} {what}: {status} {detail}")
        return status, data


def _is_hostile_for(label: str, value: object, types: str) -> bool:
    """A value no field of this JSON type may accept ("any": a field of any type, e.g. an unknown option)."""
    if label in BAD_TEXT:
        return True
    if types == "any":
        return False
    return label in HUGE_OR_NOT_FINITE or isinstance(value, bool) and "boolean" not in types.split("/")


def _option_type(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value), "any")


def _is_hostile_option(label: str, value: object, current: object) -> bool:
    """For an option: a bad text, or for an option the server has (`current` not None) a huge or non-finite
    number or a value (other than null) not of the type of its current value (a bool is not an int)."""
    want = _option_type(current)
    if current is None or value is None or want == "any":  # null: the option's default
        return _is_hostile_for(label, value, "any")
    got = _option_type(value)
    wrong_type = got != want and not (want == "number" and got == "integer")
    return wrong_type or _is_hostile_for(label, value, want)


def _probe_together(rec: Recorder, label: str, url: str, base: dict, paths: list[tuple], name: str,
                    value: object) -> dict[tuple, int]:
    """`value` in all `paths` of an A1111 body at once: fields it ignores, where each accepted value costs a
    whole generation. Fields pydantic refuses are named in the 422 and dropped, the rest sent again; any
    other refusal is narrowed down one field at a time. Returns each path's status."""
    result: dict[tuple, int] = {}
    remaining = list(paths)
    while remaining:
        body = base
        for path in remaining:
            body = _with(body, path, value)
        status, data = rec.send(label, "POST", url, body=body, what=f"{len(remaining)} ignored fields={name}")
        if status // 100 == 2:
            return {**result, **{path: status for path in remaining}}
        detail = data.get("detail") if isinstance(data, dict) else None
        refused = {tuple(e["loc"][1:2]) for e in detail if e.get("loc", [""])[0] == "body"} if (
            status == 422 and isinstance(detail, list)) else set()
        hit = [path for path in remaining if path[:1] in refused]
        if not hit:
            break
        result.update({path: status for path in hit})
        remaining = [path for path in remaining if path not in hit]
    for path in remaining:
        where = ".".join(str(p) for p in path)
        result[path] = rec.send(label, "POST", url, body=_with(base, path, value), what=f"{where}={name}")[0]
    return result


def _send_hostile_bodies(rec: Recorder, spec: dict, options: dict, manager) -> list:
    """Every hostile value in every field of every JSON body, one field at a time; the A1111 fields that
    reach no generation share requests (`_probe_together`)."""
    native_jobs = []
    bases = _base_bodies()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            label = f"{method.upper()} {path}"
            if schema is None or label == "POST /sdapi/v1/options":
                continue
            url, base = path.replace("{job_id}", "0" * 32), bases.get(label, {})
            fields = _field_paths(schema, spec, list(options))
            types = dict(fields)
            mapped = MAPPED.get(label)
            ignored = [] if mapped is None else [
                p for p, _ in fields if (p[1] not in MAPPED_OPTIONS if len(p) == 2 else p[0] not in mapped)]
            for name, value in HOSTILE:
                statuses = _probe_together(rec, label, url, base, ignored, name, value) if ignored else {}
                for field_path, status in statuses.items():
                    if status // 100 == 2 and _is_hostile_for(name, value, types[field_path]):
                        rec.ignored.append(f"{label} {'.'.join(str(p) for p in field_path)}={name}")
                for field_path, kind in fields:
                    if field_path in statuses:
                        continue
                    where = ".".join(str(p) for p in field_path)
                    status, data = rec.send(label, method.upper(), url, body=_with(base, field_path, value),
                                            what=f"{where}={name}")
                    if status // 100 != 2:
                        continue
                    if label == "POST /jobs":
                        native_jobs.append((data["id"], where, name))
                    if len(field_path) == 2:  # override_settings.KEY
                        bad = _is_hostile_option(name, value, options.get(field_path[1]))
                    else:
                        bad = _is_hostile_for(name, value, kind)
                    if bad:
                        rec.failures.append(f"{label} {where}={name}: accepted ({status})")
                    if manager.queued_count() > 32:
                        manager.wait_idle(300)
    return native_jobs


def _send_hostile_parameters(rec: Recorder, spec: dict) -> None:
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            label = f"{method.upper()} {path}"
            params = op.get("parameters", [])
            for p in params:
                for name, text in URL_HOSTILE:
                    url, headers = path.replace("{job_id}", "0" * 32), {}
                    if p["in"] == "query":
                        url = f"{url}?{p['name']}={text}"
                    elif p["in"] == "path":
                        url = path.replace("{" + p["name"] + "}", text)
                    elif p["in"] == "header":
                        headers = {p["name"]: b"\xed\xa0\x80" if name == "lone surrogate" else text}
                    else:
                        continue
                    body = _base_bodies().get(label) if "requestBody" in op else None
                    rec.send(label, method.upper(), url, body=body, headers=headers,
                             what=f"{p['in']} {p['name']}={name}")


def _send_hostile_options(rec: Recorder, normal: dict) -> None:
    """Every option gets every hostile value. A refused one must change nothing; an accepted one must be of
    the option's type, and a normal txt2img after it must still work (then the option is set back)."""
    status, original = rec.send("GET /sdapi/v1/options", "GET", "/sdapi/v1/options")
    assert status == 200, original
    for key in [*original, UNKNOWN_OPTION]:
        for name, value in HOSTILE:
            what = f"{key}={name}"
            before = rec.send("GET /sdapi/v1/options", "GET", "/sdapi/v1/options")[1]
            status, _ = rec.send("POST /sdapi/v1/options", "POST", "/sdapi/v1/options", body={key: value},
                                 what=what)
            after_status, after = rec.send("GET /sdapi/v1/options", "GET", "/sdapi/v1/options",
                                           what=f"after setting {what}")
            if status // 100 != 2:
                if after_status == 200 and after != before:
                    rec.failures.append(f"POST /sdapi/v1/options {what}: refused ({status}) but changed the "
                                        "options")
                continue
            if _is_hostile_option(name, value, original.get(key)):
                rec.failures.append(f"POST /sdapi/v1/options {what}: accepted ({status}) and stored")
            status, data = rec.send("POST /sdapi/v1/txt2img", "POST", "/sdapi/v1/txt2img", body=normal,
                                    what=f"(a normal request after setting {what})")
            if status != 200:
                rec.failures.append(f"POST /sdapi/v1/options {what} makes the next txt2img answer {status}: "
                                    f"{str(data)[:160]}")
            restore = {key: original.get(key, "")}
            status, data = rec.send("POST /sdapi/v1/options", "POST", "/sdapi/v1/options", body=restore,
                                    what=f"(restoring {key})")
            assert status == 200, data


def _reread_everything(rec: Recorder, manager, outputs: Path) -> Counter:
    """List every job (paged to the end, then one by one) and read every stored PNG back."""
    assert manager.wait_idle(300), "the queue did not drain"
    statuses: Counter = Counter()
    offset, ids = 0, []
    while True:
        status, data = rec.send("GET /jobs", "GET", f"/jobs?limit=500&offset={offset}",
                                what=f"offset={offset}")
        if status != 200:
            rec.failures.append(f"GET /jobs?offset={offset}: unreadable page ({status})")
            break
        if not data["jobs"]:
            break
        ids += [j["id"] for j in data["jobs"]]
        offset += len(data["jobs"])
    for job_id in ids:
        status, job = rec.send("GET /jobs/{job_id}", "GET", f"/jobs/{job_id}", what=f"row {job_id}")
        if status != 200:
            rec.failures.append(f"GET /jobs/{job_id}: unreadable row ({status})")
            continue
        statuses[job["status"]] += 1
        for image in job["images"]:
            if rec.send("GET /images/{name}", "GET", image["url"], what=image["name"])[0] != 200:
                rec.failures.append(f"{image['url']} of job {job_id} is listed but not served")
    files = sorted(outputs.iterdir())
    for f in files:
        try:
            info = read_info(f)
            ok = info["source"] == "sdxl" and "error" not in info and not f.name.startswith(".")
        except Exception as e:  # noqa: BLE001 - report every unreadable file
            ok, info = False, _exception_summary(e)
        if not ok:
            rec.failures.append(f"outputs/{f.name}: unreadable ({str(info)[:160]})")
    statuses["rows"], statuses["files"] = len(ids), len(files)
    return statuses


def test_hostile_values_in_every_field(served_app):
    app = served_app
    client = TestClient(app, base_url="http://127.0.0.1")
    manager = app.state.manager
    spec = app.openapi()
    rec = Recorder(client)
    status, options = rec.send("GET /sdapi/v1/options", "GET", "/sdapi/v1/options")
    assert status == 200
    t0 = time.monotonic()
    native_jobs = _send_hostile_bodies(rec, spec, options, manager)
    t1 = time.monotonic()
    _send_hostile_parameters(rec, spec)
    t2 = time.monotonic()
    _send_hostile_options(rec, _base_bodies()["POST /sdapi/v1/txt2img"])
    t3 = time.monotonic()
    stored = _reread_everything(rec, manager, manager.outputs)
    t4 = time.monotonic()
    for job_id, where, name in native_jobs:  # what was accepted must run: validation is at the edge
        job = manager.get(job_id)
        if job.status != "done":
            rec.failures.append(f"POST /jobs {where}={name}: accepted, then {job.status}: {job.error}")
    totals = Counter()
    for (_, code), n in rec.statuses.items():
        totals[f"{code // 100}xx"] += n
    print(f"\nhostile run: {sum(rec.statuses.values())} requests, {dict(sorted(totals.items()))}; stored "
          f"{dict(stored)}; seconds: bodies {t1 - t0:.1f}, parameters {t2 - t1:.1f}, options {t3 - t2:.1f}, "
          f"rereading {t4 - t3:.1f}")
    for (label, code), n in sorted(rec.statuses.items()):
        print(f"  {label} {code}: {n}")
    print(f"hostile values accepted and ignored (fields that reach no generation): {len(rec.ignored)}")
    for line in rec.ignored:
        print(f"  {line}")
    assert not rec.failures, f"{len(rec.failures)} failures:\n" + "\n".join(rec.failures)


# ------------------------------------------------------------------------------------------------ old rows
GOOD_REQUEST = json.dumps({"prompt": "a red circle", "width": 64, "height": 64, "steps": 1, "seed": 1})
BAD_ROWS = {  # id -> (status, request column, other columns), as an older version or a hand edit left them
    "nan-request": ("done", '{"prompt": "x", "aesthetic_score": NaN}', {}),
    "infinity-request": ("failed", '{"prompt": "x", "eta": -Infinity}', {}),
    "broken-json": ("done", '{"prompt": "x"', {}),
    "surrogate-prompt": ("done", '{"prompt": "a \\ud800 cat"}', {}),
    "nan-seed-surrogate-info": ("done", GOOD_REQUEST,
                                {"images": '["old-00.png"]', "seeds": "[NaN]", "infos": '["\\udfff"]'}),
    "request-not-an-object": ("done", "[1, 2, 3]", {}),
    "queued-broken-json": ("queued", "{", {}),
    "running-nan": ("running", '{"prompt": "x", "cfg": NaN}', {}),
}


def test_old_bad_rows_are_listed_as_failed_not_500(pipe, tmp_path):
    settings = _settings(tmp_path)
    db = settings.data_path / "jobs.sqlite3"
    JobStore(db).close()  # the table as this version makes it
    con = sqlite3.connect(db)
    rows = {"good": ("done", GOOD_REQUEST, {}), **BAD_ROWS}
    for seq, (job_id, (status, request, extra)) in enumerate(rows.items(), 1):
        cols = {"id": job_id, "seq": seq, "source": "api", "status": status, "request": request, "n_iter": 1,
                "created_at": 1.0e9 + seq, **extra}
        con.execute(f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    list(cols.values()))
    con.commit()
    con.close()
    app = create_app(settings, pipeline=pipe)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        assert app.state.manager.wait_idle(60)
        r = c.get("/jobs?limit=500")
        assert r.status_code == 200, r.text[:500]
        listed = {j["id"]: j for j in r.json()["jobs"]}
        assert set(listed) == set(rows)
        assert listed["good"]["status"] == "done"
        problems = []
        for job_id in BAD_ROWS:
            one = c.get(f"/jobs/{job_id}")
            job = one.json() if one.status_code == 200 else {}
            # failed, saying why, and never run: a request that cannot be read cannot be generated
            if (one.status_code != 200 or job["status"] != "failed" or listed[job_id]["status"] != "failed"
                    or not job["error"] or job["attempts"] != 0):
                problems.append(f"{job_id}: {one.status_code} {one.text[:300]}")
        assert not problems, "\n".join(problems)
        for status in ("done", "failed", "queued", "running"):
            assert c.get(f"/jobs?status={status}").status_code == 200
