"""What runs a job: the `Executor` seam between the job queue (`jobs.JobManager`) and the devices, and
`JobRunner`, the one path that runs a job on a loaded model, wherever it runs.

- `Executor`: what runs jobs has *slots*, each running one job at a time; the manager runs one dispatcher
  thread per slot and calls `Executor.run` on it. Implementations: `InProcessExecutor` here (one slot in
  this process: the one-worker server, jobs run in submission order), `workers.WorkerPool` (one worker
  process per device, `sdxl serve --devices`) and `ray_serve.RayExecutor` (Ray Serve replicas).
- `Reporter`: what a running job tells the manager (a step's progress, whether anyone watches for
  previews, a finished iteration); `JobManager` implements it.
- `WorkerLost`: the slot died mid-job (a worker process killed, a replica gone); the manager runs the job
  once more on another slot, then fails it with the reason.
- `job_key`: what a job needs loaded (model, refiner, LoRA names); the manager prefers a slot that holds it.
- `JobRunner`: rebuilds the request from the stored job (uploaded images are "input:NAME" files), runs its
  iterations, and writes each result PNG (A1111 text and the JSON record that remakes it) into the outputs
  folder, so only the job's record travels back. Any exception inside a job, CUDA out-of-memory included,
  fails that job with its message; the runner frees cached GPU memory and the slot goes on with the next
  job. Stops act between sampler steps: once the manager sets `job.stop_reason` (or the per-job timeout
  passes) the progress callback returns "stop", the sampler raises `Interrupted` carrying the x0 estimate
  reached, and for cancel, interrupt and skip (`KEEP_STOPPED_IMAGE`) the runner decodes and keeps that
  stopped image, as A1111 does. Previews are made here (this process owns the models), only while the
  reporter says someone watches.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from ..data.images import load_image
from ..errors import Interrupted
from ..files import resolve_in_folder
from ..metadata import write_png
from ..pipeline import a1111_parameters, to_pil
from ..prompts import extract_loras
from ..request import GenerationRequest, LoraSpec, iteration_seeds
from ..version import __version__
from .modelhost import ModelHost
from .previews import encode_image, make_preview
from .settings import ServeSettings
from .store import CANCELLED, DONE, FAILED, QUEUED, Job

log = logging.getLogger(__name__)

INPUT_PREFIX = "input:"  # how a request stored in the database refers to an uploaded init/mask image
KEEP_STOPPED_IMAGE = ("cancel", "interrupt", "skip")  # stop reasons whose partial image is kept


class WorkerLost(Exception):
    """Raised by `Executor.run` when the place running the job died mid-job (a worker process killed, a
    replica gone). The job itself may be fine: the manager runs it once more on another slot, then fails
    it with this message."""


def job_key(request: dict[str, Any], default_model: str | None = None) -> tuple[str, str, tuple[str, ...]]:
    """What a job needs loaded, from its stored request: (model, refiner, sorted LoRA names, request
    fields and prompt tags). `default_model` stands for an empty or "default" model field. Two jobs with
    the same key run without loading anything on a slot that ran either; the scheduler prefers such a
    slot, and a multiplexing router (Ray Serve's) can use the key as its model id."""
    model = request.get("model")
    if model in (None, "", "default"):
        model = default_model or "default"
    names = {str(x.get("name")) for x in request.get("loras") or () if isinstance(x, dict)}
    for field_name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
        text = request.get(field_name)
        if isinstance(text, str) and "<" in text:
            try:
                names.update(ref.name for ref in extract_loras(text)[1])
            except ValueError:  # a malformed tag fails in the job itself, with its message
                pass
    return str(model), str(request.get("refiner") or ""), tuple(sorted(names))


class Reporter(Protocol):
    """What a job tells the manager while it runs (the JobManager implements it)."""

    def progress(self, job: Job, event: dict[str, Any]) -> None:
        """A sampler step: `job.progress/step/total/stage/iteration` are up to date and `event` is the
        websocket's progress event (with "preview", a JPEG data URL, when one was made)."""

    def wants_preview(self, job: Job) -> bool:
        """Whether anyone watches the job now (previews cost a decode; make them only then)."""

    def checkpoint(self, job: Job) -> None:
        """An iteration finished: the job's images/seeds/infos grew; the manager saves the record."""


class Executor:
    """The seam between the JobManager and what runs a job.

    The manager owns the queue, the job table, idempotency, shutdown and the events clients see. An
    executor owns *slots*: places that each run one job at a time (the worker thread of the one-process
    server, a worker process per device in `workers.py`, a Ray Serve replica). For each slot the manager
    runs a dispatcher thread that picks a job (in submission order; with several slots it prefers a slot
    whose `holds` equals the job's `job_key`), marks it running (attempts counted, record saved), and calls
    `run(slot, job, reporter)` on that thread.

    To add another backend, subclass this and pass it to `JobManager(..., executor=...)`:

    - `slots()`: the slots' names (e.g. devices); fixed for the executor's life.
    - `start(reporter)` / `close()`: called by `JobManager.start` and after the dispatchers stopped in
      `drain`. `warm_up(slot)`: on the slot's dispatcher thread before its first job, when the settings
      ask for a warm-up.
    - `run(slot, job, reporter)`: run `job` (its stored request is `job.request`; uploaded images are
      "input:NAME" files in the manager's inputs folder) to its end, blocking, and never raise except
      `WorkerLost`. On return `job.status` is DONE, FAILED (`job.error` says why), CANCELLED, or QUEUED
      (stopped for a shutdown: it runs after the next start), and `job.images/seeds/infos/resolved` hold
      what it made (PNG files written into the manager's outputs folder, see `JobRunner`). While it runs,
      call `reporter.progress(job, event)` per step, `reporter.checkpoint(job)` per finished iteration.
      Stop requests: the manager sets `job.stop_reason` ("cancel", "interrupt", "skip", "timeout" or
      "shutdown") and calls `stop(slot, job)`; the job must stop at its next sampler step (`JobRunner`
      does this when it sees `stop_reason`; a remote slot has to be told). The per-job timeout is the
      runner's (`JobRunner` checks it at every step).
    - `holds(slot)`: the `job_key` of what the slot has loaded, or None (unknown: no preference).
      `available(slot)`: False while the slot cannot take jobs (default True).
    - `describe(slot)`: a JSON-able dict for GET /workers (device, pid, alive, loaded models, ...).

    `InProcessExecutor` (one slot, this process's thread, what `sdxl serve` runs by default) is the
    reference; `workers.WorkerPool` runs one process per device.
    """

    def slots(self) -> list[str]:
        raise NotImplementedError

    def start(self, reporter: Reporter) -> None:
        pass

    def warm_up(self, slot: int) -> None:
        pass

    def run(self, slot: int, job: Job, reporter: Reporter) -> None:
        raise NotImplementedError

    def stop(self, slot: int, job: Job) -> None:
        pass

    def holds(self, slot: int) -> tuple | None:
        return None

    def available(self, slot: int) -> bool:
        """False while the slot cannot take jobs (a device given up); its dispatcher then waits."""
        return True

    def describe(self, slot: int) -> dict[str, Any]:
        return {"name": self.slots()[slot]}

    def close(self) -> None:
        pass


class JobRunner:
    """Runs one job in this process on a `ModelHost`: the one generation path every executor uses (the
    in-process executor here; each worker process of `workers.py`). Writes the result PNGs into
    `outputs` itself, so only the job's record travels back."""

    def __init__(self, settings: ServeSettings, models: ModelHost, outputs: Path, inputs: Path):
        self.settings = settings
        self.models = models
        self.outputs = outputs
        self.inputs = inputs
        self.held: tuple | None = None  # job_key of the last job run here (its models stay loaded)

    def warm_up(self) -> None:
        """Load the default model and run one small generation (compiles the model when --compile is on),
        so the first request does not pay for it. A failure is logged; jobs then load the model as usual."""
        t0 = time.monotonic()
        try:
            pipe = self.models.get(None)
            size = pipe.config.sample_size
            pipe.generate(GenerationRequest(prompt="warm-up", width=size, height=size, steps=2, seed=0))
            log.info("warm-up done in %.1f s", time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - the server still serves; the first job will show the problem
            log.exception("warm-up failed")

    def loaded(self) -> dict[str, Any]:
        """What this runner's ModelHost holds now: file names of the base model and refiner, and the LoRAs
        of the last job."""
        base = self.models._base  # (path, pipeline) or None
        refiner = self.models._refiner
        preset = self.models._preset
        name = (Path(base[0]).name if base is not None and not isinstance(base[0], str)
                else "<preset>" if preset is not None else None)
        return {"model": name, "refiner": Path(refiner[0]).name if refiner is not None else None,
                "loras": list(self.held[2]) if self.held else []}

    def run(self, job: Job, reporter: Reporter) -> None:
        """Run one job to its end state. Never raises: every failure ends up in job.error."""
        t0 = time.monotonic()
        try:
            req = self._request_for_run(job)
            pipe = self.models.get(req.model)
            refiner = None
            if req.refiner:
                refiner = self.models.refiner(req.refiner)
                req = req.replace(refiner=str(self.models.resolve_refiner(req.refiner)))
            self.held = job_key(job.request, self._default_model_name())
            job.pipes = {"base": pipe, "refiner": refiner} if refiner is not None else {"base": pipe}
            job.images, job.seeds, job.infos = [], [], []
            for k, seed in enumerate(iteration_seeds(int(req.seed), req.batch, job.n_iter)):
                job.iteration = k
                r = req.replace(seed=seed)
                if job.resolved is None:
                    job.resolved = self._public_request(job, r.resolve(pipe.config))
                try:
                    result = pipe.generate(r, callback=self._callback(job, r, t0, reporter), refiner=refiner)
                    self._save_images(job, result.request, result.images, result.seeds, result.infos)
                except Interrupted as e:
                    if job.stop_reason in KEEP_STOPPED_IMAGE and e.denoised is not None:
                        self._save_stopped(job, r, e)
                    if job.stop_reason != "skip":
                        raise
                if job.stop_reason == "skip":  # a skip that came too late for this image is dropped
                    job.stop_reason = None
                reporter.checkpoint(job)  # finished iterations survive a crash in the next one
            job.status = DONE
            job.progress = 1.0
        except Interrupted:
            reason = job.stop_reason
            if reason == "timeout":
                job.status = FAILED
                job.error = f"timed out after {self.settings.job_timeout_s:g} s"
            elif reason == "shutdown":
                job.status = QUEUED
                job.error = None
            else:
                job.status = CANCELLED
        except Exception as e:  # noqa: BLE001 - a job must never take the worker down
            job.status = FAILED
            job.error = f"{type(e).__name__}: {e}"
            if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
                job.error = f"out of memory: {e}"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            log.exception("job %s failed", job.id)
        job.finished_at = None if job.status == QUEUED else time.time()
        job.last_latent = None
        job.pipes = {}

    def _request_for_run(self, job: Job) -> GenerationRequest:
        """Rebuild the request from the stored dict, opening uploaded images and resolving LoRA names."""
        d = dict(job.request)
        for key in ("init_image", "mask_image"):
            v = d.get(key)
            if isinstance(v, str) and v.startswith(INPUT_PREFIX):
                d[key] = self.open_input(v[len(INPUT_PREFIX):])
        d["region_masks"] = [self.open_input(v[len(INPUT_PREFIX):]) if v.startswith(INPUT_PREFIX) else v
                             for v in d.get("region_masks") or ()]
        req = GenerationRequest.from_dict(d)
        loras = [LoraSpec(str(self.models.resolve_lora(x.name)), x.weight) for x in req.loras]
        return req.replace(loras=loras)

    def open_input(self, name: str) -> Image.Image:
        return load_image(resolve_in_folder(self.inputs, name, "input image", files_only=True))

    def _update_preview(self, job: Job) -> Image.Image | None:
        """Make the preview of the job's latest x0 estimate (cached per stage and step)."""
        if job.last_latent is None or self.settings.preview == "off":
            return None
        stage, step, latent = job.last_latent
        if job.preview_cache is not None and job.preview_cache[0] == (stage, step):
            return job.preview_cache[1]
        pipe = job.pipes.get(stage) or job.pipes.get("base")
        image = make_preview(pipe, latent, self.settings.preview)
        job.preview_cache = ((stage, step), image)
        return image

    def _callback(self, job: Job, req: GenerationRequest, t0: float, reporter: Reporter) -> Callable:
        """The per-step progress callback: records progress, makes previews, enforces stops and timeout."""
        if req.refiner is None:
            base_share = 1.0
        elif req.refiner_mode == "ensemble":
            base_share = req.refiner_switch
        else:
            ref_steps = (req.refiner_steps or req.steps) * req.refiner_strength
            base_share = req.steps / (req.steps + ref_steps)
        hires_steps = (req.hires_steps or req.steps) if req.hires else 0
        hires_share = hires_steps / (req.steps + hires_steps)
        every = self.settings.preview_every

        def cb(p) -> str | None:
            if job.stop_reason is None and time.monotonic() - t0 > self.settings.job_timeout_s:
                job.stop_reason = "timeout"
            if job.stop_reason is not None:
                return "stop"
            frac = p.step / max(p.total, 1)
            within = frac * base_share if p.stage == "base" else base_share + (1 - base_share) * frac
            if p.stage == "hires":  # the hires fix's second pass: its share of the steps, after the others
                within = (1 - hires_share) + hires_share * frac
            else:
                within *= 1 - hires_share
            job.progress = (job.iteration + within) / job.n_iter
            job.step, job.total, job.stage = p.step, p.total, p.stage
            event: dict[str, Any] = {
                "type": "progress", "id": job.id, "progress": job.progress, "step": p.step, "total": p.total,
                "stage": p.stage, "iteration": job.iteration, "n_iter": job.n_iter,
            }
            if self.settings.preview != "off" and p.step % every == 0:
                job.last_latent = (p.stage, p.step, p.denoised[:1].detach().float().cpu().clone())
                if reporter.wants_preview(job):
                    try:
                        image = self._update_preview(job)
                        if image is not None:
                            event["preview"] = "data:image/jpeg;base64," + encode_image(image, "JPEG")
                    except Exception:  # noqa: BLE001 - a failed preview must not fail the job
                        log.exception("preview failed")
            reporter.progress(job, event)
            return None

        return cb

    def _public_request(self, job: Job, resolved: GenerationRequest) -> dict[str, Any]:
        """A resolved request as clients may see it: the names they sent for model, refiner, LoRAs and
        images, not server paths."""
        stored = job.request
        d = resolved.replace(refiner=stored.get("refiner"), model=stored.get("model"),
                             loras=[LoraSpec(**x) for x in stored.get("loras", [])]).to_dict()
        for key in ("init_image", "mask_image", "region_masks"):
            d[key] = stored.get(key)
        return d

    def _save_images(self, job: Job, resolved: GenerationRequest, images: list[Image.Image],
                     seeds: list[int], infos: list[str]) -> None:
        """Each image as a PNG with the A1111 text and the JSON record of the resolved request that remakes
        it (this image's seed, batch 1; the original names of model, refiner and LoRAs, not server paths)."""
        for image, seed, info in zip(images, seeds, infos):
            name = f"{job.id}-{len(job.images):02d}.png"
            single = self._public_request(job, resolved.replace(seed=int(seed), batch=1))
            for key in ("init_image", "mask_image"):  # the record marks an image it cannot hold
                single[key] = "<image>" if single[key] is not None else None
            single["region_masks"] = ["<image>" for _ in single.get("region_masks") or ()]
            record = {"request": single, "model": job.request.get("model") or self._default_model_name(),
                      "version": __version__, "job": job.id}
            try:
                write_png(image, self.outputs / name, info, record)  # atomic: no partial file is left
            except OSError as e:  # a full disk, a read-only or vanished folder: the job fails naming the file
                raise OSError(e.errno, f"cannot save {name} in {self.outputs}: {e.strerror or e}") from e
            job.images.append(name)
            job.seeds.append(int(seed))
            job.infos.append(info)

    def _save_stopped(self, job: Job, req: GenerationRequest, e: Interrupted) -> None:
        """Keep the image a stop caught mid-way: its x0 estimate decoded by the stage's model, saved with
        its infotext like a finished image (A1111 returns it too)."""
        base = job.pipes["base"]
        refiner = job.pipes.get("refiner")
        pipe = refiner if job.stage == "refiner" and refiner is not None and refiner.vae is not None else base
        with torch.no_grad(), pipe.on_device(pipe.vae):
            images = to_pil(pipe.decode(e.denoised.to(pipe.device)))
        resolved = req.resolve(base.config)
        seeds = [resolved.seed + i for i in range(len(images))]
        infos = [a1111_parameters(base, resolved, s, refiner) for s in seeds]
        self._save_images(job, resolved, images, seeds, infos)

    def _default_model_name(self) -> str | None:
        path = self.models.default_path()
        return path.stem if path is not None else None


class InProcessExecutor(Executor):
    """One slot: jobs run on the manager's dispatcher thread, in this process, on its ModelHost (what
    `sdxl serve` without --devices runs). Stops need no message: the step callback reads
    `job.stop_reason` itself."""

    def __init__(self, runner: JobRunner, name: str = "local"):
        self.runner = runner
        self.name = name
        self.jobs_done = 0

    def slots(self) -> list[str]:
        return [self.name]

    def warm_up(self, slot: int) -> None:
        self.runner.warm_up()

    def run(self, slot: int, job: Job, reporter: Reporter) -> None:
        self.runner.run(job, reporter)

    def holds(self, slot: int) -> tuple | None:
        return self.runner.held

    def describe(self, slot: int) -> dict[str, Any]:
        settings = self.runner.settings
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return {"name": self.name, "device": device, "pid": os.getpid(), "alive": True,
                "loaded": self.runner.loaded()}


def apply_remote_progress(job: Job, fields: dict[str, Any], event: dict[str, Any],
                          reporter: Reporter) -> None:
    """A progress message from a runner in another process (a `--devices` worker, a Ray replica): the job's
    fields as the runner set them, its preview (a JPEG data URL) decoded for A1111's /progress, then the
    event reported here."""
    for k, v in fields.items():
        setattr(job, k, v)
    if "preview" in event:
        job.preview_cache = ((job.stage, job.step), decode_preview(event["preview"]))
    reporter.progress(job, event)


def decode_preview(data_url: str) -> Image.Image | None:
    """A remote runner's preview (data URL) as a PIL image; None if it cannot be read (a preview must never
    fail a job)."""
    try:
        return Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2]))).convert("RGB")
    except Exception:  # noqa: BLE001 - see above
        return None
