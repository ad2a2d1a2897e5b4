"""One owner per data folder, a shutdown that tells the truth, and idempotency keys.

- Two servers on one `--data-dir`: the second exits with code 2 and one line naming the first one's pid,
  before it opens the job store or binds its port (also when its port is the first one's), so the first
  server's running job is not "recovered" by it and every job runs exactly once.
- SIGTERM with an A1111 client waiting: new generations get 503 with Retry-After while the listener stays
  open, the worker takes no new job, the running job is stopped after the grace and queued again, the
  waiting client gets 503 naming its job (not 500), the process exits; after a restart the queued jobs run
  exactly once and the client's retry with the same Idempotency-Key gets the first job's images.
- A second Ctrl+C ends the grace at once: the running job is queued again, exit code 130, no traceback.
- Idempotency keys (native header and field, A1111 header): a retry returns the first job, also after a
  restart; the same key with another body is 409; a malformed key is a one-line 400.

Real processes (`python -m sdxl.serve`, tiny model file) where the signal or the second process matters,
in-process apps (test_serve.py's fixtures) elsewhere.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import test_serve
import test_serve_process
from sdxl.serve.app import create_app
from sdxl.serve.datalock import LOCK_FILE, DataDirInUse
from test_serve import job_body, local_client, make_settings, start_gated_job, wait_job
from test_serve_process import GRACEFUL_EXIT, Server, free_port, small

# the fixtures of test_serve.py (tiny pipeline with its UNet gate, folders, autouse gate reset) and of
# test_serve_process.py (the tiny model file), found by pytest under these names
pipe, folders, control = test_serve.pipe, test_serve.folders, test_serve.control
model_file = test_serve_process.model_file


def stored(data: Path) -> dict[str, dict]:
    """Every row of the job table, read straight from the file (not through a server)."""
    db = sqlite3.connect(f"file:{data / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, status, attempts, run_number, images, idempotency_key FROM jobs"
                          ).fetchall()
    finally:
        db.close()
    return {r[0]: {"status": r[1], "attempts": r[2], "run_number": r[3], "images": r[4], "key": r[5]}
            for r in rows}


def second_server(model: Path, data: Path, port: int) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "sdxl.serve", "--model", str(model), "--data-dir", str(data),
            "--port", str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------------------ the lock
def test_second_server_on_the_same_data_folder_exits_2_and_touches_nothing(model_file, tmp_path):
    data = tmp_path / "data"
    first = Server(model_file, data).wait_ready()
    try:
        c = first.client
        # long enough to be running while the two refused starts happen; cancelled afterwards
        long_id = c.post("/jobs", json=small(width=256, height=256, steps=150)).json()["id"]
        queued = [c.post("/jobs", json=small(seed=i, steps=1)).json()["id"] for i in range(4)]
        first.wait_running(long_id)
        assert stored(data)[long_id]["status"] == "running"

        # another port, and the first server's own port (the start that used to requeue the running job
        # while failing to bind): both refused by the lock, in parallel
        results: dict[str, subprocess.CompletedProcess] = {}
        starts = [threading.Thread(target=lambda n=n, p=p: results.__setitem__(n, second_server(model_file,
                                                                                                data, p)))
                  for n, p in (("other port", free_port()), ("same port", first.port))]
        for t in starts:
            t.start()
        for t in starts:
            t.join()
        for name, r in results.items():
            assert r.returncode == 2, (name, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
            owner = f"data folder {data} is in use by another sdxl server (pid {first.proc.pid})"
            assert lines[0].startswith("error: ") and owner in lines[0], lines

        # untouched: the running job is still running (not queued again) with its single attempt
        assert c.get(f"/jobs/{long_id}").json()["status"] == "running", "the long job ended too soon"
        row = stored(data)[long_id]
        assert row["status"] == "running" and row["attempts"] == 1, row
        assert (data / LOCK_FILE).read_text().strip() == str(first.proc.pid)

        assert c.post(f"/jobs/{long_id}/cancel").status_code == 200
        assert first.wait_job(long_id)["status"] == "cancelled"
        jobs = [first.wait_job(i) for i in queued]
    finally:
        assert first.stop() in GRACEFUL_EXIT
    # every job ran exactly once, each image written once
    assert all(j["status"] == "done" and j["attempts"] == 1 and len(j["images"]) == 1 for j in jobs)
    rows = stored(data)
    runs = [rows[i]["run_number"] for i in [long_id, *queued]]
    assert len(set(runs)) == 5 and all(rows[i]["attempts"] == 1 for i in [long_id, *queued])
    outputs = sorted(p.name for p in (data / "outputs").iterdir())
    assert outputs == sorted([f"{long_id}-00.png"] + [f"{i}-00.png" for i in queued])


def test_port_in_use_is_one_line_before_the_data_folder_is_touched(model_file, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = second_server(model_file, tmp_path / "data", port)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: cannot listen on 127.0.0.1 port") and str(port) in lines[0]
    assert not (tmp_path / "data" / "jobs.sqlite3").exists()  # no store opened, nothing recovered


def test_in_process_app_on_a_held_folder_fails_to_start_and_recovers_nothing(pipe, folders, control):
    settings = make_settings(folders)
    app = create_app(settings, pipeline=pipe)
    with local_client(app) as c:
        running = start_gated_job(c, control, steps=2)
        with pytest.raises(DataDirInUse, match="is in use by another sdxl server"):
            with local_client(create_app(settings, pipeline=pipe)):
                pass
        assert stored(settings.data_path)[running]["status"] == "running"
        control.open.set()
        assert wait_job(c, running)["attempts"] == 1
    # the lock went with the first app: a new one starts on the folder
    with local_client(create_app(settings, pipeline=pipe)) as c:
        assert c.get(f"/jobs/{running}").json()["status"] == "done"


# ------------------------------------------------------------------------------------------------ shutdown
def test_sigterm_answers_a_waiting_a1111_client_503_and_leaves_the_queue_for_the_restart(model_file,
                                                                                         tmp_path):
    data = tmp_path / "data"
    server = Server(model_file, data, "--shutdown-grace", "1").wait_ready()
    # 150 steps at 192 px: far from done when the grace runs out, even on a fast CPU
    body = {"prompt": "a slow one", "width": 192, "height": 192, "steps": 150, "seed": -1,
            "sampler_name": "Euler"}
    key = {"Idempotency-Key": "a1111-retry-0001"}
    answer: dict[str, httpx.Response] = {}

    def waiting_client():
        with httpx.Client(base_url=server.url, timeout=120) as own:
            answer["r"] = own.post("/sdapi/v1/txt2img", json=body, headers=key)

    try:
        client = threading.Thread(target=waiting_client)
        client.start()
        c = server.client
        end = time.monotonic() + 60
        while not (running := c.get("/jobs?status=running").json()["jobs"]) and time.monotonic() < end:
            time.sleep(0.02)
        slow_id = running[0]["id"]
        server.wait_running(slow_id)
        queued = [c.post("/jobs", json=small(seed=i, steps=1)).json()["id"] for i in range(3)]

        server.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        while (health := c.get("/health")).status_code == 200 and time.monotonic() < end:
            time.sleep(0.01)
        # draining: the listener is open, generations are refused with 503 and Retry-After
        assert health.status_code == 503 and health.json()["status"] == "stopping"
        refused = c.post("/jobs", json=small(seed=99))
        assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit(), refused.text
        a1111 = c.post("/sdapi/v1/txt2img", json={**body, "seed": 5})
        assert a1111.status_code == 503 and "Retry-After" in a1111.headers

        client.join(60)
        r = answer["r"]
        assert r.status_code == 503, r.text  # not 500
        assert r.json()["job"] == slow_id and slow_id in r.json()["detail"]
        assert r.headers["Retry-After"].isdigit()
        assert server.proc.wait(60) in GRACEFUL_EXIT
    finally:
        server.stop()
    rows = stored(data)
    assert rows[slow_id]["status"] == "queued" and rows[slow_id]["attempts"] == 1  # stopped after the grace
    assert all(rows[i]["status"] == "queued" and rows[i]["attempts"] == 0 for i in queued)  # never started
    assert len(rows) == 4  # nothing from the refused requests

    server = Server(model_file, data).wait_ready()
    try:
        # the client retries with its key: it gets the first job (running again, first in the queue) and
        # its images; no second job is made. The job is interrupted once it runs, to keep the test short:
        # the answer then holds the image where it stopped, as A1111's does (whether the retry came
        # before or after the interrupt, it is that job's answer).
        client = threading.Thread(target=waiting_client)
        client.start()
        server.wait_running(slow_id)
        time.sleep(0.2)
        assert server.client.post("/sdapi/v1/interrupt").status_code == 200
        client.join(60)
        retry = answer["r"]
        assert retry.status_code == 200, retry.text
        jobs = [server.wait_job(i) for i in queued]
        again = server.client.get(f"/jobs/{slow_id}").json()
    finally:
        assert server.stop() in GRACEFUL_EXIT
    assert again["status"] == "cancelled" and again["attempts"] == 2 and len(again["images"]) == 1
    expected = [(data / "outputs" / im["name"]).read_bytes() for im in again["images"]]
    assert [base64.b64decode(s) for s in retry.json()["images"]] == expected
    assert all(j["status"] == "done" and j["attempts"] == 1 for j in jobs)  # each queued job ran once
    rows = stored(data)
    assert len(rows) == 4 and len({r["run_number"] for r in rows.values()}) == 4


def test_second_ctrl_c_ends_the_grace_at_once_and_exits_130_without_a_traceback(model_file, tmp_path):
    data = tmp_path / "data"
    # started with SIGINT ignored, as a script's background job is: Ctrl+C must still end in 130
    server = Server(model_file, data, "--shutdown-grace", "600", sigint_ignored=True).wait_ready()
    try:
        job_id = server.client.post("/jobs", json=small(width=1024, height=1024, steps=150)).json()["id"]
        server.wait_running(job_id)
        server.proc.send_signal(signal.SIGINT)
        end = time.monotonic() + 10
        while server.client.get("/health").status_code == 200 and time.monotonic() < end:
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGINT)  # do not wait out the 600 s grace
        assert server.proc.wait(60) == 130
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text(), server.log.read_text()
    row = stored(data)[job_id]
    assert row["status"] == "queued" and row["attempts"] == 1  # stopped at a step, runs after the restart


# ------------------------------------------------------------------------------------------------ idempotency
def test_idempotency_key_returns_the_first_job_also_after_a_restart(pipe, folders):
    settings = make_settings(folders)
    a1111_body = {"prompt": "same", "width": 64, "height": 64, "steps": 2, "seed": -1}
    with local_client(create_app(settings, pipeline=pipe)) as c:
        first = c.post("/jobs", json=job_body(seed=None, idempotency_key="native-1"))
        assert first.status_code == 202, first.text
        job_id = first.json()["id"]
        # the same key again, as the field or the header: the same job
        assert c.post("/jobs", json=job_body(seed=None, idempotency_key="native-1")).json()["id"] == job_id
        assert c.post("/jobs", json=job_body(seed=None), headers={"Idempotency-Key": "native-1"}).json()[
            "id"] == job_id
        done = wait_job(c, job_id)
        assert done["status"] == "done" and len(done["images"]) == 1
        # the same key with another request: 409 naming the key, nothing queued
        conflict = c.post("/jobs", json=job_body(seed=3, idempotency_key="native-1"))
        assert conflict.status_code == 409 and "native-1" in conflict.json()["detail"]
        # A1111: the second call returns the first call's images (seed -1: a new job would differ)
        h = {"Idempotency-Key": "a1111-1"}
        one = c.post("/sdapi/v1/txt2img", json=a1111_body, headers=h)
        two = c.post("/sdapi/v1/txt2img", json=a1111_body, headers=h)
        assert one.status_code == two.status_code == 200, (one.text, two.text)
        assert one.json()["images"] == two.json()["images"] and one.json()["info"] == two.json()["info"]
        assert c.post("/sdapi/v1/txt2img", json={**a1111_body, "steps": 3}, headers=h).status_code == 409
        # a native body under the A1111 request's key is another request too
        assert c.post("/jobs", json=job_body(), headers=h).status_code == 409
        assert len(c.get("/jobs").json()["jobs"]) == 2
    with local_client(create_app(settings, pipeline=pipe)) as c:  # after a restart
        again = c.post("/jobs", json=job_body(seed=None), headers={"Idempotency-Key": "native-1"})
        assert again.status_code == 202 and again.json()["id"] == job_id
        three = c.post("/sdapi/v1/txt2img", json=a1111_body, headers={"Idempotency-Key": "a1111-1"})
        assert three.status_code == 200 and three.json()["images"] == one.json()["images"]
        assert len(c.get("/jobs").json()["jobs"]) == 2
    pngs = sorted(p.name for p in (settings.data_path / "outputs").iterdir())
    assert len(pngs) == 2 and sum(p.startswith(job_id) for p in pngs) == 1  # one image per job
    assert not any((settings.data_path / "inputs").iterdir())


BAD_KEYS = ["", "has space", "k" * 129, "a,b", "semi;colon"]


@pytest.mark.parametrize("where, key", [("header", k) for k in BAD_KEYS]  # headers are ASCII
                         + [("field", k) for k in [*BAD_KEYS, "ключ", "a\tb", "a\nb"]])
def test_malformed_idempotency_keys_are_one_line_400s(pipe, folders, where, key):
    with local_client(create_app(make_settings(folders), pipeline=pipe)) as c:
        if where == "header":
            r = c.post("/jobs", json=job_body(), headers={"Idempotency-Key": key})
        else:
            r = c.post("/jobs", json=job_body(idempotency_key=key))
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        named = "Idempotency-Key" if where == "header" else "idempotency_key"
        assert "\n" not in detail and named in detail
        assert c.get("/jobs").json()["jobs"] == []


def test_header_and_field_keys_that_differ_are_refused(pipe, folders):
    with local_client(create_app(make_settings(folders), pipeline=pipe)) as c:
        r = c.post("/jobs", json=job_body(idempotency_key="one"), headers={"Idempotency-Key": "two"})
        assert r.status_code == 400 and "idempotency_key" in r.json()["detail"]
