"""One validation at the edge: the requests an independent probe found poisoning the server.

Each case was accepted before (202/200) and then broke something later: a job that failed while saving its
PNG and made every `GET /jobs` page holding it a 500, an option that made every later A1111 request fail, a
bool taken as a number, a 1 MB negative prompt. Here each is refused when sent (4xx naming the field), and
nothing stored afterwards breaks a listing. Runs in-process on the tiny random-weight model of
tests/test_serve.py.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

import test_serve
from sdxl.errors import RequestError
from sdxl.request import GenerationRequest
from test_serve import job_body, wait_job

# test_serve.py's fixtures (the tiny pipeline with its UNet hook, the folders, the client, the autouse gate
# reset), found by pytest under these names
pipe, folders, client, control = test_serve.pipe, test_serve.folders, test_serve.client, test_serve.control

RAW_JSON = {"Content-Type": "application/json"}


def post_raw(client, url: str, text: str):
    """Send JSON text as is (NaN, Infinity and lone surrogate escapes are not what `json=` would send)."""
    return client.post(url, content=text.encode(), headers=RAW_JSON)


def native(**fields) -> str:
    return json.dumps(job_body(**fields))


def everything_lists(client) -> None:
    """The job list, every job and every image answer 200."""
    jobs = client.get("/jobs?limit=500")
    assert jobs.status_code == 200, jobs.text
    for job in jobs.json()["jobs"]:
        assert client.get(f"/jobs/{job['id']}").status_code == 200
        for image in job["images"]:
            assert client.get(image["url"]).status_code == 200


# ------------------------------------------------------------------------------------------ not JSON numbers
@pytest.mark.parametrize("field", ["aesthetic_score", "negative_aesthetic_score", "eta", "cfg"])
@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_naming_the_field(client, field, token):
    text = native().rstrip("}") + f', "{field}": {token}}}'
    r = post_raw(client, "/jobs", text)
    assert r.status_code == 400 and r.json()["detail"].startswith(f"{field}: "), r.text
    a1111 = json.dumps({"prompt": "x", "steps": 1, "width": 64, "height": 64})
    r = post_raw(client, "/sdapi/v1/txt2img", a1111.rstrip("}") + f', "eta": {token}}}')
    assert r.status_code == 400 and r.json()["detail"].startswith("eta: ")
    everything_lists(client)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "prompt_2", "negative_prompt_2"])
def test_lone_surrogates_are_refused_naming_the_field(client, field):
    text = native().rstrip("}") + f', "{field}": "a \\ud800 b"}}'
    if field == "prompt":
        text = native(prompt="PLACEHOLDER").replace('"PLACEHOLDER"', '"a \\ud800 b"')
    r = post_raw(client, "/jobs", text)
    assert r.status_code == 400 and r.json()["detail"].startswith(f"{field}: not valid Unicode"), r.text
    everything_lists(client)


def test_surrogates_and_nan_nested_in_a1111_bodies(client):
    r = post_raw(client, "/sdapi/v1/txt2img",
                 '{"prompt": "x", "steps": 1, "override_settings": {"CLIP_stop_at_last_layers": NaN}}')
    assert r.status_code == 400 and "override_settings.CLIP_stop_at_last_layers" in r.json()["detail"]
    r = post_raw(client, "/sdapi/v1/txt2img", '{"prompt": "x", "steps": 1, "comments": {"a": ["\\udfff"]}}')
    assert r.status_code == 400 and r.json()["detail"].startswith("comments.a[0]: not valid Unicode")
    r = post_raw(client, "/sdapi/v1/options", '{"\\ud800": 1}')
    assert r.status_code == 400
    assert client.get("/sdapi/v1/options").status_code == 200


# ------------------------------------------------------------------------------------------ types and ranges
@pytest.mark.parametrize("fields, named", [
    ({"steps": True}, "steps"), ({"width": True}, "width"), ({"seed": False}, "seed"),
    ({"steps": 2.0}, "steps"), ({"cfg": True}, "cfg"), ({"watermark": 1}, "watermark"),
    ({"eta": -5}, "eta"), ({"clip_skip": 1000}, "clip_skip"), ({"crop_top": -1}, "crop_top"),
    ({"original_width": 10**9}, "original_width"), ({"loras": [{"name": "style", "weight": 1e300}]}, "loras"),
])  # fmt: skip
def test_native_types_are_strict_and_ranges_checked(client, fields, named):
    r = client.post("/jobs", json=job_body(**fields))
    assert r.status_code in (400, 422), r.text
    assert named in r.text
    assert client.get("/jobs").json()["jobs"] == []  # nothing was queued


@pytest.mark.parametrize("fields, named", [
    ({"steps": True}, "steps"), ({"batch_size": True}, "batch_size"), ({"cfg_scale": False}, "cfg_scale"),
    ({"seed": 1.5}, "seed"), ({"eta": -5.0}, "eta"), ({"n_iter": True}, "n_iter"),
])  # fmt: skip
def test_a1111_types_are_strict(client, fields, named):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, **fields}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code in (400, 422), r.text
    assert named in r.text


@pytest.mark.parametrize("field", ["negative_prompt", "prompt_2", "negative_prompt_2"])
def test_every_text_field_has_the_prompt_limit(client, field):
    r = client.post("/jobs", json=job_body(**{field: "x" * 201}))  # the fixture's limit is 200 characters
    assert r.status_code == 400 and r.json()["detail"] == f"{field}: 201 characters, the limit is 200"


def test_one_megabyte_negative_prompt_is_refused_on_the_a1111_route(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "negative_prompt": "n" * 2**20, "steps": 1,
                                                "width": 64, "height": 64})
    assert r.status_code == 400 and r.json()["detail"].startswith("negative_prompt: 1048576 characters")


def test_error_messages_never_show_an_object_address():
    for value in (object(), [object()], {"name": object()}):
        with pytest.raises(RequestError) as e:
            GenerationRequest(prompt="x", loras=(value,)).validate()
        assert " at 0x" not in str(e.value)
    with pytest.raises(RequestError) as e:
        GenerationRequest(prompt="x", sampler=object()).validate()
    assert str(e.value) == "sampler: a object is not text"


# ------------------------------------------------------------------------------------------ option poisoning
@pytest.mark.parametrize("value", [1000, 0, -3, True, "2", 2.0, None, [1]])
def test_an_option_that_would_fail_every_request_is_refused_when_set(client, value):
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": value})
    assert r.status_code == 400, r.text
    assert "CLIP_stop_at_last_layers" in r.json()["detail"] and "nothing was changed" in r.json()["detail"]
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_clip_skip_beyond_the_models_text_layers_is_refused_when_set(client):
    # the tiny model's towers have 2 layers: CLIP_stop_at_last_layers 4 -> clip_skip 3 cannot run on it
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 4})
    assert r.status_code == 400 and "text encoders have layers (2)" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 200
    assert json.loads(r.json()["info"])["clip_skip"] == 3


def test_native_clip_skip_beyond_the_model_fails_the_job_with_the_field_named(client):
    job = wait_job(client, client.post("/jobs", json=job_body(clip_skip=5)).json()["id"])
    assert job["status"] == "failed" and "clip_skip: 5 is more than" in job["error"]
    ok = wait_job(client, client.post("/jobs", json=job_body()).json()["id"])
    assert ok["status"] == "done"


# ------------------------------------------------------------------------------------------ stored rows
def test_unreadable_stored_rows_are_listed_as_failed(client, folders):
    done = wait_job(client, client.post("/jobs", json=job_body()).json()["id"])
    db = sqlite3.connect(str(folders / "data" / "jobs.sqlite3"))
    good = db.execute("SELECT * FROM jobs WHERE id = ?", (done["id"],)).fetchone()
    cols = [c[1] for c in db.execute("PRAGMA table_info(jobs)")]
    bad_requests = {
        "nan": '{"prompt": "x", "aesthetic_score": NaN}',
        "broken": '{"prompt": ',
        "surrogate": '{"prompt": "\\ud800"}',
        "list": "[1, 2]",
    }
    for i, (name, text) in enumerate(bad_requests.items()):
        row = dict(zip(cols, good))
        row.update(id=f"bad-{name}", seq=1000 + i, request=text, status="done")
        marks = ", ".join("?" for _ in cols)
        db.execute(f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({marks})", [row[c] for c in cols])
    db.commit()
    db.close()
    r = client.get("/jobs?limit=500")
    assert r.status_code == 200, r.text
    by_id = {j["id"]: j for j in r.json()["jobs"]}
    for name in bad_requests:
        job = by_id[f"bad-{name}"]
        assert job["status"] == "failed" and "cannot be read" in job["error"]
        assert client.get(f"/jobs/bad-{name}").status_code == 200
    assert by_id[done["id"]]["status"] == "done"
