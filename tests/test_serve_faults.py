"""Faults injected into the running server (tiny random-weight SDXL, in-process):

- CUDA out of memory raised inside the UNet call at the second sampler step: that job fails with a message
  naming out of memory, the worker empties the CUDA cache and runs the next job to the end;
- the per-job timeout: the slow job fails "timed out" between two steps, the next job runs;
- a full disk (ENOSPC) while the result PNG is written: the job fails with one line naming the disk
  problem, no temporary or partial file is left in `<data_dir>/outputs`, nothing of it is served, the job
  list still answers, and the next job is saved.

The fixtures are those of `test_serve.py` (the tiny pipeline and its UNet hook, the folders, the client).
"""

from __future__ import annotations

import errno
import time
import types

import pytest
import torch

import sdxl.metadata.png as png_module
import sdxl.serve.executor as executor_module
import test_serve
from sdxl.files import atomic_write
from sdxl.metadata import read_info
from sdxl.serve.app import create_app
from test_serve import job_body, local_client, make_settings, start_gated_job, wait_job

# test_serve.py's fixtures (the tiny pipeline with its UNet hook, the folders, the client, the autouse gate
# reset), found by pytest under these names
pipe, folders, client, control = test_serve.pipe, test_serve.folders, test_serve.client, test_serve.control


class _FakeCuda:
    """`torch.cuda` as `sdxl.serve.executor` sees it on a machine with a GPU: is_available() is True and
    empty_cache() is counted; everything else is the real `torch.cuda`."""

    def __init__(self):
        self.emptied = 0

    def is_available(self) -> bool:
        return True

    def empty_cache(self) -> None:
        self.emptied += 1

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithCuda(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(torch, name)


# ------------------------------------------------------------------------------------------------ OOM
def test_out_of_memory_inside_the_unet_fails_the_job_frees_memory_and_the_next_job_runs(
        client, pipe, monkeypatch):
    cuda = _FakeCuda()
    monkeypatch.setattr(executor_module, "torch", _TorchWithCuda(cuda=cuda))  # only the job runner's torch
    forward = pipe.unet.forward
    calls = {"armed": True, "n": 0, "raised": 0}

    def unet_forward(*args, **kwargs):
        if calls["armed"]:
            calls["n"] += 1
            if calls["n"] == 2:  # the first step ran; the second one runs out of memory
                calls["armed"] = False
                calls["raised"] += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", unet_forward)
    bad = client.post("/jobs", json=job_body(steps=3, sampler="euler", cfg=5.0)).json()["id"]
    good = client.post("/jobs", json=job_body(seed=2)).json()["id"]
    bad_job, good_job = wait_job(client, bad), wait_job(client, good)
    assert calls["raised"] == 1 and calls["n"] == 2  # raised inside the UNet, at its second call
    assert bad_job["status"] == "failed" and bad_job["error"].startswith("out of memory")
    assert "\n" not in bad_job["error"] and bad_job["images"] == []
    assert cuda.emptied == 1  # freed once, for the failed job only
    assert good_job["status"] == "done" and len(good_job["images"]) == 1
    assert client.get(good_job["images"][0]["url"]).status_code == 200
    manager = client.app.state.manager
    assert manager.current() is None and manager.queued_count() == 0
    assert client.get("/health").json() == {"status": "ok", "queued": 0, "running": None}


# ------------------------------------------------------------------------------------------------ timeout
def test_job_over_the_timeout_fails_between_steps_and_the_next_job_runs(pipe, folders, control):
    app = create_app(make_settings(folders, job_timeout_s=0.5), pipeline=pipe)
    with local_client(app) as c:
        slow = start_gated_job(c, control, steps=5)
        t0 = time.monotonic()
        time.sleep(0.6)  # past the timeout inside step 1; the check runs at the end of each step
        control.open.set()
        job = wait_job(c, slow)
        assert job["status"] == "failed" and job["error"] == "timed out after 0.5 s"
        assert job["images"] == [] and time.monotonic() - t0 < 30
        app.state.settings.job_timeout_s = 60  # the next job has the time it needs on this slow machine
        nxt = wait_job(c, c.post("/jobs", json=job_body(seed=3)).json()["id"])
        assert nxt["status"] == "done" and len(nxt["images"]) == 1
        assert c.get(nxt["images"][0]["url"]).status_code == 200


# ------------------------------------------------------------------------------------------------ full disk
def _outputs(folders):
    return sorted(p.name for p in (folders / "data" / "outputs").iterdir())


def _full_disk_after(monkeypatch, saves_that_work: int) -> dict:
    """Make the PNG writer hit ENOSPC after `saves_that_work` good saves: the real `atomic_write` runs
    (its temporary file is created and partly written), then the write fails as on a full disk."""
    state = {"saves": 0, "failed": 0}

    def full(path, write):
        state["saves"] += 1
        if state["saves"] <= saves_that_work:
            return atomic_write(path, write)

        def half_then_enospc(f):
            f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 4096)  # something is on disk when it fails
            state["failed"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")

        return atomic_write(path, half_then_enospc)

    monkeypatch.setattr(png_module, "atomic_write", full)
    return state


@pytest.mark.parametrize("saves_that_work", [0, 1], ids=["first_image", "second_image"])
def test_full_disk_while_saving_fails_the_job_cleanly_and_the_next_job_saves(
        client, folders, monkeypatch, saves_that_work):
    before = _outputs(folders)
    state = _full_disk_after(monkeypatch, saves_that_work)
    bad = client.post("/jobs", json=job_body(batch=2)).json()["id"]
    job = wait_job(client, bad)
    assert state["failed"] == 1
    assert job["status"] == "failed" and "\n" not in job["error"]
    # one line naming the disk problem and the file: "OSError: [Errno 28] cannot save <id>-01.png in
    # <data_dir>/outputs: No space left on device"
    assert f"cannot save {bad}-{saves_that_work:02d}.png in " in job["error"]
    assert job["error"].endswith("outputs: No space left on device")
    # nothing half-written: no temporary file, no file of this job but the complete ones it lists
    new = [n for n in _outputs(folders) if n not in before]
    assert not [n for n in new if n.endswith(".tmp") or n.startswith(".")], new
    listed = [im["name"] for im in job["images"]]
    assert sorted(new) == sorted(listed) and len(listed) == saves_that_work
    for name in listed:  # what the failed job kept is a complete PNG with its record
        assert read_info(folders / "data" / "outputs" / name)["source"] == "sdxl"
        assert client.get(f"/images/{name}").status_code == 200
    for k in range(saves_that_work, 2):  # the image that hit the full disk is not served
        assert client.get(f"/images/{bad}-{k:02d}.png").status_code == 404
    r = client.get("/jobs")
    assert r.status_code == 200 and bad in [j["id"] for j in r.json()["jobs"]]
    assert client.get(f"/jobs/{bad}").status_code == 200
    # the disk has room again: the next job is saved
    monkeypatch.setattr(png_module, "atomic_write", atomic_write)
    good = wait_job(client, client.post("/jobs", json=job_body(seed=9)).json()["id"])
    assert good["status"] == "done" and len(good["images"]) == 1
    assert read_info(folders / "data" / "outputs" / good["images"][0]["name"])["source"] == "sdxl"


def test_full_disk_on_an_a1111_request_answers_with_the_disk_error(client, folders, monkeypatch):
    _full_disk_after(monkeypatch, 0)
    before = _outputs(folders)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 500 and "No space left on device" in r.json()["detail"]
    assert _outputs(folders) == before
    monkeypatch.setattr(png_module, "atomic_write", atomic_write)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
