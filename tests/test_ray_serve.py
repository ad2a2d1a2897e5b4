"""The server on Ray Serve (sdxl.serve.ray_serve): a local Ray cluster with two CPU generation replicas.

Ray is an optional extra, so this file skips without it; CI installs it (.ci/run: `.[test,serve,ray]`).
To run it here: `pip install -e '.[ray]'`, then `python -m pytest -q tests/test_ray_serve.py`.

Only this file starts Ray: one local cluster (2 CPUs, no dashboard) and one Serve application for the
whole module, over real HTTP through Serve's proxy. On the 2-core build machine Ray's start and the
deployment's take 20 to 35 s of the file's time (printed by the fixture). Checked here:

- deploy/ray-serve.yaml's args build the application `serve run` would deploy (no cluster needed);

- requests for two models land on the replicas that hold them: each replica loads one multiplexed id
  (model + refiner + LoRA set) and runs only that model's jobs, counted from the replicas' own reports;
- a request gives the same pixels (and infotext) as the single-process server, natively and through A1111's
  txt2img;
- progress and previews (made on the replica while someone watches) reach a websocket;
- a cancel reaches the replica running the job;
- killing the replica that runs a job mid-job loses nothing: the job runs again on the other replica
  (attempts 2) and gives the same pixels as an uninterrupted run.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
yaml = pytest.importorskip("yaml")  # PyYAML comes with ray[serve]
connect = pytest.importorskip("websockets.sync.client").connect

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from sdxl.models.config import tiny_config  # noqa: E402
from sdxl.serve.app import create_app  # noqa: E402
from sdxl.serve.ray_serve import APP_NAME, GENERATOR_NAME, RayOptions, app_builder, build_app  # noqa: E402
from sdxl.serve.settings import ServeSettings  # noqa: E402
from sdxl.weights.checkpoint import random_checkpoint, write_single_file  # noqa: E402

TERMINAL = ("done", "failed", "cancelled")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_serve")
    models = root / "models"
    models.mkdir()
    shutil.copy(tiny_files["base"], models / "a.safetensors")
    write_single_file(random_checkpoint(tiny_config("base"), seed=21), models / "b.safetensors")
    return root


def _settings(folders, data: str) -> ServeSettings:
    return ServeSettings(model=str(folders / "models" / "a.safetensors"), models_dir=folders / "models",
                         data_dir=folders / data, shutdown_grace_s=2, preview="approx")


@pytest.fixture(scope="module")
def cluster(folders):
    """A local Ray cluster running the app with two CPU replicas; yields an HTTP client on its proxy."""
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t1 = time.monotonic()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_settings(folders, "ray_data"), RayOptions(min_replicas=2, max_replicas=2,
                                                                   gpus_per_replica=0)),
              name=APP_NAME, route_prefix="/")
    print(f"\nRay start {t1 - t0:.1f} s, Serve application ready {time.monotonic() - t1:.1f} s later")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    ray.shutdown()  # the whole local cluster at once (serve.shutdown first would drain: 5 s more)


def _wait(client, job_id: str, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s: {job}")


def _run(client, body: dict) -> dict:
    r = client.post("/jobs", json=body)
    assert r.status_code == 202, r.text
    return _wait(client, r.json()["id"])


def _pixels(client, job: dict) -> np.ndarray:
    assert job["status"] == "done", job
    r = client.get(job["images"][0]["url"])
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def _replicas(client) -> dict:
    workers = client.get("/workers").json()["workers"]
    return workers[0]["replicas"]


def test_an_unreachable_ray_address_is_one_line_not_a_hang(tmp_path):
    """The command with --ray-address where nothing listens: exit 2 within seconds, one line naming the flag
    and the address (ray.init alone retries such an address for minutes); a malformed one likewise."""
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{dead}", "cluster-without-port"):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "sdxl.serve.ray_serve", "--ray-address", address, "--port",
                            str(port), "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, r.stderr
        assert time.monotonic() - t0 < 60
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: --ray-address {address}: "), r.stderr
        assert "Traceback" not in r.stderr


def test_the_serve_run_config_builds_the_application():
    """deploy/ray-serve.yaml's args through app_builder (what `serve run` calls): the settings and the
    replica layout reach the two deployments (no cluster needed)."""
    config = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "sdxl.serve.ray_serve:app_builder"
    ingress = app_builder(dict(application["args"], api_key="k"))._bound_deployment
    assert ingress.name == "sdxl" and ingress.ray_actor_options["num_cpus"] == 0
    generator = ingress.init_args[0]._bound_deployment
    settings, models_per_replica = generator.init_args
    assert generator.name == "generator" and generator.max_ongoing_requests == 1
    assert generator.ray_actor_options["num_gpus"] == 1 and models_per_replica == 1
    scaling = generator._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 8)
    assert settings.models_dir == Path("/shared/models") and settings.api_key == "k"
    assert settings.queue_size == 256 and str(settings.data_dir) == "/var/lib/sdxl"


def test_two_models_land_on_the_replicas_that_hold_them(cluster):
    """Six jobs alternating two models: each replica loads one multiplexed id and runs only its jobs."""
    jobs = {}
    for k in range(6):
        model = "a.safetensors" if k % 2 == 0 else "b.safetensors"
        job = _run(cluster, {"prompt": f"p{k}", "width": 64, "height": 64, "steps": 2, "seed": k,
                             "model": model})
        assert job["status"] == "done", job
        jobs[job["id"]] = model
    time.sleep(1.1)  # the executor caches the replicas' reports for a second
    replicas = _replicas(cluster)
    assert len(replicas) == 2, replicas
    loads = {rid: r["model_ids_loaded"] for rid, r in replicas.items()}
    assert sorted(len(v) for v in loads.values()) == [1, 1], loads  # one load per replica: 2 for 6 jobs
    assert {v[0] for v in loads.values()} == {"model=a.safetensors;refiner=;loras=",
                                              "model=b.safetensors;refiner=;loras="}
    for rid, r in replicas.items():
        models = {jobs[j] for j in r["jobs"] if j in jobs}
        assert len(models) == 1 and f"model={models.pop()};" in loads[rid][0], (rid, r, jobs)
        assert len([j for j in r["jobs"] if j in jobs]) == 3


def test_same_pixels_as_the_single_process_server(cluster, folders):
    body = {"prompt": "a red house", "negative_prompt": "blur", "width": 64, "height": 96, "steps": 4,
            "seed": 1234, "sampler": "euler_a", "cfg": 6.0}
    with TestClient(create_app(_settings(folders, "local_data")), base_url="http://localhost") as local:
        expected = _run(local, body)
        expected_pixels = _pixels(local, expected)
        a1111 = {"prompt": "a boat", "width": 64, "height": 64, "steps": 3, "seed": 99, "batch_size": 2,
                 "sampler_name": "DPM++ 2M", "cfg_scale": 4}
        expected_a1111 = local.post("/sdapi/v1/txt2img", json=a1111).json()
    got = _run(cluster, body)
    np.testing.assert_array_equal(_pixels(cluster, got), expected_pixels)
    assert got["images"][0]["info"] == expected["images"][0]["info"]
    assert got["images"][0]["seed"] == expected["images"][0]["seed"] == 1234
    # the A1111 route (awaits the job, answers base64 PNGs): the same images and info
    got_a1111 = cluster.post("/sdapi/v1/txt2img", json=a1111).json()
    assert len(got_a1111["images"]) == 2
    for mine, theirs in zip(got_a1111["images"], expected_a1111["images"]):
        np.testing.assert_array_equal(*(np.asarray(Image.open(io.BytesIO(base64.b64decode(x))).convert("RGB"))
                                        for x in (mine, theirs)))
    info, expected_info = (json.loads(r["info"]) for r in (got_a1111, expected_a1111))
    del info["job_timestamp"], expected_info["job_timestamp"]  # when each job was submitted
    assert info == expected_info


def test_progress_and_previews_reach_a_websocket(cluster):
    """A watcher's websocket gets the replica's steps, previews made on the replica once the board says
    someone watches, and the final event."""
    job_id = cluster.post("/jobs", json={"prompt": "w", "width": 64, "height": 64, "steps": 40,
                                         "seed": 5}).json()["id"]
    port = cluster.base_url.port
    events = []
    with connect(f"ws://127.0.0.1:{port}/ws/jobs/{job_id}", open_timeout=30) as ws:
        while not events or events[-1]["type"] != "finished":
            events.append(json.loads(ws.recv(timeout=60)))
    assert events[-1]["job"]["status"] == "done"
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps and steps == sorted(steps) and steps[-1] == 40
    previews = [e["preview"] for e in events if e["type"] == "progress" and "preview" in e]
    assert previews and all(p.startswith("data:image/jpeg;base64,") for p in previews)


def _running_replica(client, job_id: str) -> str:
    """The replica running `job_id`, once it has made two steps."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        job = client.get(f"/jobs/{job_id}").json()
        lanes = [w for w in client.get("/workers").json()["workers"] if w["current_job"] == job_id]
        if job["status"] == "running" and job["step"] >= 2 and lanes and lanes[0]["replica"]:
            return lanes[0]["replica"]
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError("the job never got going")


def test_cancel_reaches_the_replica(cluster):
    """A cancel (through the board the replicas poll) stops the running job at its next step; the stopped
    image is kept, as in the one-process server."""
    job_id = cluster.post("/jobs", json={"prompt": "c", "width": 64, "height": 64, "steps": 80,
                                         "seed": 3}).json()["id"]
    _running_replica(cluster, job_id)
    assert cluster.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = _wait(cluster, job_id)
    assert job["status"] == "cancelled", job
    assert len(job["images"]) == 1 and cluster.get(job["images"][0]["url"]).status_code == 200


def test_killing_a_replica_mid_job_loses_no_job(cluster):
    body = {"prompt": "long", "width": 64, "height": 64, "steps": 30, "seed": 7, "model": "b.safetensors"}
    job_id = cluster.post("/jobs", json=body).json()["id"]
    replica = _running_replica(cluster, job_id)
    actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{GENERATOR_NAME}#{replica}", namespace="serve")
    ray.kill(actor, no_restart=True)
    job = _wait(cluster, job_id, timeout=90)
    assert job["status"] == "done", job
    assert job["attempts"] == 2
    # the rerun is the whole job from its seed: the same pixels as a run nobody interrupted
    again = _run(cluster, body)
    np.testing.assert_array_equal(_pixels(cluster, job), _pixels(cluster, again))
