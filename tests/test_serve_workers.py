"""`sdxl serve --devices cpu,cpu`: two worker processes on one job queue (serve/workers.py).

One server with two CPU workers (1 torch thread each) serves every test of this module, on the tiny
random-weight base model under two names (`a`, `b`: the same file copied, so two models to place). Jobs
are 64 px and 1 to 2 steps unless a test needs one that runs long enough to be stopped or killed.

Covers: the same pixels as the one-process server for the same requests; 200 jobs from 20 client threads,
none lost or run twice; a worker killed mid-job (the job runs again on the other worker; killed on both,
it fails naming the deaths) and restarted; jobs for two models landing on the workers that hold them
(counted); cancel, A1111 interrupt and previews reaching the worker that runs the job; GET /workers and
GET /metrics on the pool; --devices parsing.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxl.serve.__main__ import build_parser, settings_from_args
from sdxl.serve.app import create_app
from sdxl.serve.settings import ServeSettings, SettingsError, parse_devices

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def folders(tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    models = root / "models"
    models.mkdir()
    for name in ("a", "b"):
        shutil.copy(tiny_files["base"], models / f"{name}.safetensors")
    return root, models


@pytest.fixture(scope="module")
def pool(folders):
    root, models = folders
    settings = ServeSettings(model=str(models / "a.safetensors"), models_dir=models, data_dir=root / "data",
                             devices=["cpu", "cpu"], queue_size=256, preview="approx",
                             shutdown_grace_s=0)
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, app.state.manager


def _wait(client, job_id, timeout=60.0, until=("done", "failed", "cancelled")):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def _pixels(client, job) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(client.get(im["url"]).content)).convert("RGB"))
            for im in job["images"]]


def _running_on(client, job_id, timeout=60.0) -> dict:
    """The /workers entry of the worker running `job_id`, once the job has made a step."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] == "running" and job["step"] >= 1:
            for w in client.get("/workers").json()["workers"]:
                if w["current_job"] == job_id:
                    return w
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not start")


def test_two_workers_give_the_one_process_servers_pixels(pool, folders):
    client, _ = pool
    root, models = folders
    bodies = [{"prompt": "a red fox", "seed": 1, **SMALL},
              {"prompt": "a blue bird", "seed": 2, "sampler": "dpmpp_2m", "batch": 2, **SMALL},
              {"prompt": "a green hill", "seed": 3, "model": "b", "cfg": 3.0, **SMALL}]
    ids = [client.post("/jobs", json=b).json()["id"] for b in bodies]
    pooled = [_wait(client, i) for i in ids]
    assert [j["status"] for j in pooled] == ["done"] * 3, [j["error"] for j in pooled]
    single = create_app(ServeSettings(model=str(models / "a.safetensors"), models_dir=models,
                                      data_dir=root / "single"))
    with TestClient(single, base_url="http://127.0.0.1") as one:
        for body, job in zip(bodies, pooled):
            ref = _wait(one, one.post("/jobs", json=body).json()["id"])
            assert ref["status"] == "done"
            got, want = _pixels(client, job), _pixels(one, ref)
            assert len(got) == len(want) == body.get("batch", 1)
            for g, w in zip(got, want):
                assert np.array_equal(g, w)
            assert [im["seed"] for im in job["images"]] == [im["seed"] for im in ref["images"]]


def test_200_jobs_from_20_clients_none_lost_or_run_twice(pool):
    client, manager = pool
    before = sum(w["jobs_done"] for w in client.get("/workers").json()["workers"])
    body = {"prompt": "x", "width": 32, "height": 32, "steps": 1, "cfg": 1.0}

    def submit(k):
        ids = []
        for i in range(10):
            r = client.post("/jobs", json={**body, "seed": 1000 * k + i},
                            headers={"Idempotency-Key": f"c{k}-{i}"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        return ids

    with ThreadPoolExecutor(20) as ex:
        ids = [i for chunk in ex.map(submit, range(20)) for i in chunk]
    assert len(set(ids)) == 200
    again = client.post("/jobs", json={**body, "seed": 1000 * 7 + 3}, headers={"Idempotency-Key": "c7-3"})
    assert again.json()["id"] == ids[7 * 10 + 3]  # a retried submission is the same job
    assert manager.wait_idle(120)
    jobs = [client.get(f"/jobs/{i}").json() for i in ids]
    assert all(j["status"] == "done" for j in jobs), {j["status"] for j in jobs}
    assert all(j["attempts"] == 1 and len(j["images"]) == 1 for j in jobs)
    assert len({j["run_number"] for j in jobs}) == 200  # each started exactly once
    assert len({j["images"][0]["name"] for j in jobs}) == 200
    workers = client.get("/workers").json()["workers"]
    assert sum(w["jobs_done"] for w in workers) - before == 200
    assert all(w["jobs_done"] > 0 for w in workers)  # both worked


def test_a_killed_worker_loses_no_job(pool):
    client, _ = pool
    long = {"prompt": "slow", "width": 64, "height": 64, "steps": 100, "seed": 5}  # seconds: killed mid-way
    job_id = client.post("/jobs", json=long).json()["id"]
    first = _running_on(client, job_id)
    os.kill(first["pid"], signal.SIGKILL)
    # queued again and run to the end on the other worker
    job = _wait(client, job_id, timeout=120)
    assert job["status"] == "done" and job["attempts"] == 2 and len(job["images"]) == 1, job
    # killed on both workers: failed, naming both deaths
    job_id = client.post("/jobs", json={**long, "seed": 6}).json()["id"]
    on = _running_on(client, job_id, timeout=120)
    os.kill(on["pid"], signal.SIGKILL)
    end = time.monotonic() + 120
    while True:
        again = _running_on(client, job_id, timeout=120)
        if again["pid"] != on["pid"]:
            break
        assert time.monotonic() < end
    assert again["name"] != on["name"]  # retried on the other worker, not the one it died on
    os.kill(again["pid"], signal.SIGKILL)
    job = _wait(client, job_id, timeout=60)
    assert job["status"] == "failed"
    assert job["error"].count("died while running the job (killed by signal 9)") == 2, job["error"]
    # both restarted (the next tests run their jobs on them)
    end = time.monotonic() + 120
    while not all(w["alive"] and w["pid"] not in (on["pid"], again["pid"])
                  for w in client.get("/workers").json()["workers"]):
        assert time.monotonic() < end
        time.sleep(0.1)
    metrics = client.get("/metrics").text
    assert 'sdxl_errors_total{kind="worker_lost"} 3' in metrics


def test_jobs_for_two_models_land_on_the_workers_that_hold_them(pool):
    client, manager = pool
    assert manager.wait_idle(60)

    def pair(seed):
        ids = [client.post("/jobs", json={"prompt": "p", "model": m, "seed": seed, **SMALL}).json()["id"]
               for m in ("a", "b")]
        return [_wait(client, i) for i in ids]

    pair(0)  # now one worker holds a, the other b
    start = {w["name"]: w for w in client.get("/workers").json()["workers"]}
    held = {w["loaded"]["model"]: name for name, w in start.items()}
    assert set(held) == {"a.safetensors", "b.safetensors"}
    for seed in range(1, 5):
        assert all(j["status"] == "done" for j in pair(seed))
    end = {w["name"]: w for w in client.get("/workers").json()["workers"]}
    for model in ("a", "b"):
        name = held[f"{model}.safetensors"]
        ran = end[name]["jobs_by_model"].get(model, 0) - start[name]["jobs_by_model"].get(model, 0)
        assert ran == 4, (model, name, end)
        assert end[name]["model_loads"] == start[name]["model_loads"]  # nothing loaded again


def test_cancel_interrupt_and_previews_reach_the_right_worker(pool):
    client, manager = pool
    assert manager.wait_idle(60)
    long = {"prompt": "slow", "width": 64, "height": 64, "steps": 150}
    first = client.post("/jobs", json={**long, "seed": 11}).json()["id"]
    w1 = _running_on(client, first)
    second = client.post("/jobs", json={**long, "seed": 12}).json()["id"]
    with client.websocket_connect(f"ws://127.0.0.1/ws/jobs/{second}") as ws:
        w2 = _running_on(client, second)
        assert w1["name"] != w2["name"]
        # A1111's interrupt stops the job /progress shows (the one that started first), on its worker
        assert client.get("/sdapi/v1/progress").json()["state"]["job"] == f"task({first})"
        client.post("/sdapi/v1/interrupt")
        stopped = _wait(client, first, timeout=30)
        assert stopped["status"] == "cancelled" and len(stopped["images"]) == 1  # the stopped image
        assert client.get(f"/jobs/{second}").json()["status"] == "running"
        for _ in range(200):  # progress events from the other worker carry previews for a watcher
            event = ws.receive_json()
            if event.get("preview"):
                assert event["preview"].startswith("data:image/jpeg;base64,")
                break
        else:
            raise AssertionError("no preview")
        client.post(f"/jobs/{second}/cancel")
        assert _wait(client, second, timeout=30)["status"] == "cancelled"


def test_workers_and_metrics_endpoints(pool):
    client, manager = pool
    before = client.get("/metrics").text
    assert _wait(client, client.post("/jobs", json={"prompt": "m", "seed": 9, **SMALL}).json()["id"])
    assert manager.wait_idle(60)
    status = client.get("/workers").json()
    assert status["queued"] == 0 and [w["name"] for w in status["workers"]] == ["cpu#0", "cpu#1"]
    for w in status["workers"]:
        assert w["device"] == "cpu" and w["alive"] and w["threads"] == 1 and isinstance(w["pid"], int)
        assert w["busy"] is False and w["current_job"] is None and w["jobs_done"] > 0
        assert w["loaded"]["model"] in ("a.safetensors", "b.safetensors")
    # Ctrl+C and a service manager's SIGTERM reach the whole process group: workers leave the stop to the
    # server's drain
    pids = [w["pid"] for w in status["workers"]]
    os.kill(pids[0], signal.SIGINT)
    os.kill(pids[1], signal.SIGTERM)
    time.sleep(0.5)
    after = client.get("/workers").json()["workers"]
    assert [(w["pid"], w["alive"]) for w in after] == [(p, True) for p in pids]
    text = client.get("/metrics").text
    assert 'sdxl_worker_up{worker="cpu#0",device="cpu"} 1' in text
    assert 'sdxl_worker_busy{worker="cpu#1",device="cpu"} 0' in text
    assert "sdxl_queue_length 0" in text
    done = [_sample(m, 'sdxl_jobs_finished_total{status="done"}') for m in (before, text)]
    assert done[1] == done[0] + 1
    steps = [sum(_sample(m, f'sdxl_sampler_steps_total{{worker="cpu#{i}"}}') for i in (0, 1))
             for m in (before, text)]
    assert steps[1] == steps[0] + SMALL["steps"]


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the metrics")


def test_drain_requeues_the_running_job_and_stops_the_workers(pool):
    """Last in the module: it shuts the pool down (the fixture's own shutdown then finds it drained)."""
    client, manager = pool
    long = {"prompt": "slow", "width": 64, "height": 64, "steps": 150}
    running = [client.post("/jobs", json={**long, "seed": i}).json()["id"] for i in (1, 2)]
    for job_id in running:
        _running_on(client, job_id)
    queued = client.post("/jobs", json={"prompt": "later", "seed": 1, **SMALL}).json()["id"]
    manager.drain(grace_s=0)
    for job_id in running:  # stopped at their next step; they run again after a restart
        stored = manager.store.get(job_id)
        assert stored.status == "queued" and stored.attempts == 1 and not stored.images
    stored = manager.store.get(queued)
    assert stored.status == "queued" and stored.attempts == 0
    assert client.post("/jobs", json={"prompt": "x", **SMALL}).status_code == 503
    assert not any(w["alive"] for w in client.get("/workers").json()["workers"])
    assert manager.data_lock is not None and manager.data_lock.held  # let go by the shutdown, not the drain


def test_devices_option_and_its_errors():
    ns = build_parser().parse_args(["--devices", "cuda:0, cuda:1"])
    assert settings_from_args(ns).devices == ["cuda:0", "cuda:1"]
    assert settings_from_args(build_parser().parse_args([])).devices == []
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    for bad in ("gpu", "cpu:1", "cuda:", "cuda,,cuda"):
        with pytest.raises(SettingsError, match="--devices"):
            parse_devices(bad)
    with pytest.raises(SettingsError, match="preset pipeline"):
        create_app(ServeSettings(devices=["cpu"]), pipeline=object())

