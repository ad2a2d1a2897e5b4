"""The job queue behind every generating route: one worker thread, a bounded FIFO, SQLite persistence.

One GPU runs one generation at a time, so every request that generates (native `POST /jobs` and the A1111
`txt2img` / `img2img` routes alike) becomes a `Job` in one queue and one worker thread runs them in order.

Life of a job::

    queued --(worker picks it)--> running --> done | failed | cancelled
       |                            |
       +--(cancel)--> cancelled     +--(shutdown before it finished)--> queued (runs again on the next start)

- The queue is bounded (`queue_size`); `submit` raises `QueueFull` (HTTP 429) instead of growing.
- Every state change is written to SQLite (`<data_dir>/jobs.sqlite3`) before anyone is told about it, and
  result images are PNG files in `<data_dir>/outputs/`, so a restart loses nothing finished. At start, jobs
  that were queued are queued again in their original order; a job that was *running* when the process
  died is queued again too, unless it already had `max_attempts` tries (then it fails, so a job that kills
  the process cannot do so forever).
- Any exception inside a job, CUDA out-of-memory included, fails that job with its message; the worker
  frees cached GPU memory and goes on with the next job.
- Cancellation and the per-job timeout act between sampler steps: the progress callback returns "stop",
  which the sampler turns into `Interrupted`.
- Progress and previews are pushed to subscribers (the websocket route) through asyncio queues, and are
  kept on the job for polling (`GET /jobs/{id}`, A1111 `/progress`).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import io
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..assets import default_model_path
from ..request import GenerationRequest, LoraSpec
from .settings import NameNotFound, ServeSettings, resolve_name

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL = frozenset({DONE, FAILED, CANCELLED})
INPUT_PREFIX = "input:"  # how a request stored in the database refers to an uploaded init/mask image


class QueueFull(Exception):
    """The queue holds `queue_size` waiting jobs already (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs (HTTP 503)."""


class JobNotFound(LookupError):
    """No job has this id (HTTP 404)."""


class JobConflict(Exception):
    """The job is in a state that does not allow the operation, e.g. cancelling a finished job (HTTP 409)."""


# ------------------------------------------------------------------------------------------------ previews
# A fixed linear map from the 4 SDXL latent channels (scaled latents, as the samplers see them) to RGB in
# [-1, 1]: rgb = latent @ FACTORS + BIAS. The numbers are ComfyUI's least-squares fit for the SDXL VAE
# (comfy/latent_formats.py, class SDXL). It costs nothing next to a UNet step and shows the composition and
# colours of the current x0 estimate at 1/8 resolution, which is what a progress preview needs. Models with
# another VAE (such as the shipped miniature) get wrong colours from it; use `preview="vae"` for those.
SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latent_preview(latent: torch.Tensor) -> Image.Image:
    """One scaled latent [4, h, w] (or [1, 4, h, w]) -> an RGB PIL image of size (w, h), by the linear map."""
    z = latent.detach().float().cpu()
    if z.ndim == 4:
        z = z[0]
    factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", z[: factors.shape[0]], factors) + bias
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGB")


def encode_image(image: Image.Image, fmt: str = "JPEG", quality: int = 80) -> str:
    """PIL image -> base64 text (no data: prefix)."""
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------------ the job
@dataclass
class Job:
    """One queued generation. The first group of fields is persisted; the second is live state."""

    id: str
    seq: int  # submission order; the queue runs jobs in increasing seq
    request: dict[str, Any]  # GenerationRequest.to_dict(), with uploaded images as "input:NAME"
    n_iter: int = 1  # A1111's n_iter: the request is run n_iter times with seeds advancing by batch
    source: str = "api"  # "api" (native) or "a1111"
    status: str = QUEUED
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # times the worker started it (a restart during a run counts)
    run_number: int | None = None  # order in which the worker started jobs (increases over restarts too)
    error: str | None = None
    images: list[str] = field(default_factory=list)  # file names in <data_dir>/outputs
    seeds: list[int] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)  # A1111 infotext per image
    # --- live state, not persisted ---
    progress: float = 0.0
    step: int = 0
    total: int = 0
    stage: str = ""
    iteration: int = 0
    stop_reason: str | None = None  # "cancel", "timeout", "shutdown", "interrupt"
    last_latent: torch.Tensor | None = field(default=None, repr=False)
    last_preview_step: int = -1
    preview_jpeg: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """The JSON the API returns for this job."""
        return {
            "id": self.id,
            "seq": self.seq,
            "status": self.status,
            "source": self.source,
            "queue_position": None,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": 1.0 if self.status == DONE else self.progress,
            "step": self.step,
            "total": self.total,
            "stage": self.stage,
            "iteration": self.iteration,
            "n_iter": self.n_iter,
            "error": self.error,
            "attempts": self.attempts,
            "run_number": self.run_number,
            "images": [
                {"name": n, "url": f"/images/{n}", "seed": s, "info": i}
                for n, s, i in zip(self.images, self.seeds, self.infos)
            ],
            "request": self.request,
        }


# ------------------------------------------------------------------------------------------------ storage
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    n_iter INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    run_number INTEGER,
    error TEXT,
    images TEXT NOT NULL DEFAULT '[]',
    seeds TEXT NOT NULL DEFAULT '[]',
    infos TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""

_COLUMNS = ("id", "seq", "source", "status", "request", "n_iter", "created_at", "started_at", "finished_at",
            "attempts", "run_number", "error", "images", "seeds", "infos")
_COLS = ", ".join(_COLUMNS)
_JSON_COLUMNS = ("request", "images", "seeds", "infos")


class JobStore:
    """Jobs in one SQLite file. One connection shared by all threads behind a lock: the writes are a few
    per job, so contention is irrelevant, and WAL mode keeps the file consistent if the process dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row_to_job(self, row: tuple) -> Job:
        d = dict(zip(_COLUMNS, row))
        for k in _JSON_COLUMNS:
            d[k] = json.loads(d[k])
        return Job(**d)

    def save(self, job: Job) -> None:
        """Insert or replace the persisted fields of `job`."""
        values = []
        for k in _COLUMNS:
            v = getattr(job, k)
            values.append(json.dumps(v) if k in _JSON_COLUMNS else v)
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})", values)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row_to_job(row) if row else None

    def list(self, limit: int = 50, offset: int = 0, status: str | None = None) -> list[Job]:
        """Newest first."""
        q = f"SELECT {_COLS} FROM jobs"
        args: list[Any] = []
        if status:
            q += " WHERE status = ?"
            args.append(status)
        q += " ORDER BY seq DESC LIMIT ? OFFSET ?"
        args += [int(limit), int(offset)]
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        return [self._row_to_job(r) for r in rows]

    def unfinished(self) -> list[Job]:
        """Queued and running jobs in submission order (what a restart must pick up)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLS} FROM jobs WHERE status IN (?, ?) ORDER BY seq", (QUEUED, RUNNING)
            ).fetchall()
        return [self._row_to_job(r) for r in rows]

    def max_value(self, column: str) -> int:
        assert column in ("seq", "run_number")
        with self._lock:
            row = self._db.execute(f"SELECT MAX({column}) FROM jobs").fetchone()
        return int(row[0]) if row and row[0] is not None else 0


# ------------------------------------------------------------------------------------------------ models
class ModelHost:
    """Loads and caches the models jobs ask for. Used only from the worker thread (plus read-only listings).

    The default model is the operator's `--model` (any path) or the shipped miniature; a request's `model`
    and `refiner` names resolve only inside `models_dir`. One base model and one refiner stay loaded; asking
    for another replaces it, so memory holds at most two models.
    """

    def __init__(self, settings: ServeSettings, pipeline: Any = None):
        self.settings = settings
        self.default_name: str | None = None  # a name in models_dir chosen through A1111 /options
        self._lock = threading.RLock()
        self._base: tuple[Path | str, Any] | None = None
        self._refiner: tuple[Path, Any] | None = None
        self._configs: dict[tuple[Path, int], Any] = {}
        self._preset = pipeline  # an already-built model (tests, embedding); it is the default
        if pipeline is not None and hasattr(pipeline, "lora_dirs"):
            self._confine(pipeline)
        if pipeline is not None:
            self._base = ("<preset>", pipeline)

    # ---------------------------------------------------------- names
    def startup_default_path(self) -> Path | None:
        """The operator's default: the preset pipeline's file, `--model`, or the shipped miniature."""
        if self._preset is not None:
            return getattr(self._preset, "path", None)
        if self.settings.model:
            return Path(self.settings.model).expanduser()
        return default_model_path("base")

    def default_path(self) -> Path | None:
        """The file the default model comes from now (None for a preset pipeline without a path)."""
        if self.default_name is not None:
            return self.resolve(self.default_name)
        return self.startup_default_path()

    def set_default(self, name: str | None) -> None:
        """Make `name` (inside models_dir) the default model; the startup default's name (or "default")
        switches back to it. Raises BadName / NameNotFound."""
        start = self.startup_default_path()
        if name in (None, "", "default") or (start is not None and name in (start.name, start.stem)):
            self.default_name = None
            return
        self.resolve(name)
        self.default_name = name

    def resolve(self, name: str) -> Path:
        """A model name (inside models_dir) -> its path. Raises BadName / NameNotFound."""
        return resolve_name(self.settings.models_dir, name, "model", (".safetensors",))

    def resolve_lora(self, name: str) -> Path:
        return resolve_name(self.settings.loras_dir, name, "LoRA", (".safetensors",), files_only=True)

    def is_default(self, name: str | None) -> bool:
        if name in (None, "", "default"):
            return True
        dp = self.default_path()
        return dp is not None and name in (dp.name, dp.stem)

    def list_models(self) -> list[Path]:
        """Checkpoints in models_dir (files and diffusers folders), relative paths, sorted."""
        root = self.settings.models_dir
        if root is None or not root.is_dir():
            return []
        root = root.resolve()
        loras = self.settings.loras_dir.resolve() if self.settings.loras_dir else None
        found: list[Path] = []
        for p in sorted(root.rglob("*")):
            real = p.resolve()
            if root not in real.parents or (loras is not None and (real == loras or loras in real.parents)):
                continue
            in_diffusers_folder = p.parent.name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if p.is_file() and p.suffix == ".safetensors" and not in_diffusers_folder:
                found.append(p.relative_to(root))
            elif p.is_dir() and (p / "model_index.json").exists():
                found.append(p.relative_to(root))
        return found

    def list_loras(self) -> list[Path]:
        root = self.settings.loras_dir
        if root is None or not root.is_dir():
            return []
        root = root.resolve()
        return [p.relative_to(root) for p in sorted(root.rglob("*.safetensors"))
                if p.is_file() and root in p.resolve().parents]

    def default_config(self):
        """The default model's `ModelConfig` without loading its weights (read from the file header)."""
        with self._lock:
            if self._base is not None and (self._preset is not None or self._base[0] == self.default_path()):
                return self._base[1].config
        path = self.default_path()
        if path is None:
            raise NameNotFound("no default model")
        return self.config_of(path)

    def config_of(self, path: Path):
        """A checkpoint's `ModelConfig` from its header (cached per path and modification time)."""
        from ..weights.checkpoint import read_checkpoint

        key = (Path(path), Path(path).stat().st_mtime_ns)
        with self._lock:
            if key not in self._configs:
                self._configs[key] = read_checkpoint(path).config
            return self._configs[key]

    # ---------------------------------------------------------- loading
    def _load(self, path: Path):
        from ..pipeline import SDXL

        device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype_name = self.settings.dtype
        if dtype_name == "auto":
            dtype_name = "fp16" if device.startswith("cuda") else "fp32"
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        log.info("loading %s on %s (%s)", path, device, dtype_name)
        return self._confine(SDXL.load(path, device=device, dtype=dtype))

    def _confine(self, pipe):
        """LoRA names (request fields and prompt tags) resolve inside the LoRA folder only."""
        pipe.lora_dirs = [self.settings.loras_dir] if self.settings.loras_dir else []
        pipe.allow_lora_paths = False
        return pipe

    def get(self, name: str | None):
        """The base model for a request's `model` field (None/"default" = the default model)."""
        with self._lock:
            if self.is_default(name):
                if self._preset is not None and self.default_name is None:
                    return self._preset
                path = self.default_path()
            else:
                path = self.resolve(name)
            if self._base is not None and self._base[0] == path:
                return self._base[1]
            self._base = None  # free the old one before loading the new one
            pipe = self._load(path)
            self._base = (path, pipe)
            return pipe

    def refiner(self, name: str):
        with self._lock:
            path = self.resolve(name)
            if self._refiner is not None and self._refiner[0] == path:
                return self._refiner[1]
            self._refiner = None
            pipe = self._load(path)
            self._refiner = (path, pipe)
            return pipe


# ------------------------------------------------------------------------------------------------ manager
@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _put_latest(q: asyncio.Queue, event: dict) -> None:
    """Runs in the event loop: enqueue, dropping the oldest event if a slow client let the queue fill up
    (progress events are superseded by later ones; the final event always gets in)."""
    while True:
        try:
            q.put_nowait(event)
            return
        except asyncio.QueueFull:
            try:
                q.get_nowait()
            except asyncio.QueueEmpty:
                return


class JobManager:
    """The queue, the worker thread and the job records. Thread-safe; the HTTP layer calls it."""

    def __init__(self, settings: ServeSettings, models: ModelHost, store: JobStore | None = None):
        self.settings = settings
        self.models = models
        self.data_dir = settings.data_path
        self.outputs = self.data_dir / "outputs"
        self.inputs = self.data_dir / "inputs"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(parents=True, exist_ok=True)
        self.store = store or JobStore(self.data_dir / "jobs.sqlite3")
        self._cond = threading.Condition()
        self._pending: deque[str] = deque()
        self._live: dict[str, Job] = {}  # queued and running jobs
        self._current: Job | None = None
        self._accepting = False
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._subs: dict[str, list[_Subscriber]] = {}
        self._subs_lock = threading.Lock()
        self._seq = self.store.max_value("seq")
        self._run_number = self.store.max_value("run_number")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Pick up what the previous process left, then start the worker."""
        self._recover()
        self._accepting = True
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="sdxl-job-worker", daemon=True)
        self._worker.start()

    def _recover(self) -> None:
        for job in self.store.unfinished():
            if job.status == RUNNING:
                if job.attempts >= self.settings.max_attempts:
                    job.status = FAILED
                    job.error = (f"the server stopped while this job was running, {job.attempts} times; "
                                 "not retrying it again")
                    job.finished_at = time.time()
                    self.store.save(job)
                    continue
                log.warning("job %s was running when the server stopped; queued again", job.id)
                job.status = QUEUED
                self.store.save(job)
            self._live[job.id] = job
            self._pending.append(job.id)

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop taking jobs; give the running job `grace_s` to finish, else stop it and queue it again.
        Queued jobs stay queued in the database and run after the next start."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        with self._cond:
            self._accepting = False
            self._stopping = True  # the worker takes no new job after the current one
            self._cond.notify_all()
        worker = self._worker
        if worker is None:
            return
        worker.join(timeout=max(grace, 0.0))
        if worker.is_alive():
            job = self._current
            if job is not None:
                log.warning("job %s still running %.0f s into shutdown; it will run again", job.id, grace)
                job.stop_reason = "shutdown"
            worker.join(timeout=10.0)
            if worker.is_alive() and job is not None:
                # stuck inside one step: record it as queued so the next start runs it again
                job.status = QUEUED
                self.store.save(job)
        self._worker = None

    # ------------------------------------------------------------------ submit / cancel / query
    def submit(self, request: GenerationRequest, n_iter: int = 1, source: str = "api",
               job_id: str | None = None) -> Job:
        """Queue a validated request. Raises QueueFull or ShuttingDown."""
        request.resolved_seed()  # fixed now, so a job that runs again after a restart gives the same image
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down; try again later")
            if len(self._pending) >= self.settings.queue_size:
                raise QueueFull(f"the queue is full ({len(self._pending)} jobs waiting); try again later")
            self._seq += 1
            job = Job(id=job_id or secrets.token_hex(16), seq=self._seq, request=request.to_dict(),
                      n_iter=int(n_iter), source=source, created_at=time.time())
            self.store.save(job)
            self._live[job.id] = job
            self._pending.append(job.id)
            self._cond.notify_all()
        return job

    def new_job_id(self) -> str:
        return secrets.token_hex(16)

    def get(self, job_id: str) -> Job:
        with self._cond:
            job = self._live.get(job_id)
        if job is None:
            job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return job

    def public(self, job: Job) -> dict[str, Any]:
        d = job.public()
        with self._cond:
            if job.status == QUEUED and job.id in self._pending:
                d["queue_position"] = list(self._pending).index(job.id)
        return d

    def list(self, limit: int = 50, offset: int = 0, status: str | None = None) -> list[Job]:
        jobs = self.store.list(limit, offset, status)
        with self._cond:  # running jobs: show live progress
            return [self._live.get(j.id, j) for j in jobs]

    def cancel(self, job_id: str) -> Job:
        """Queued: removed from the queue at once. Running: stopped at the next sampler step (the status
        turns to cancelled when it has stopped). Finished: JobConflict."""
        with self._cond:
            job = self._live.get(job_id)
            if job is None:
                stored = self.store.get(job_id)
                if stored is None:
                    raise JobNotFound(f"no job with id {job_id!r}")
                raise JobConflict(f"job {job_id} is already {stored.status}")
            if job.status == QUEUED:
                self._pending.remove(job.id)
                del self._live[job.id]
                job.status = CANCELLED
                job.finished_at = time.time()
                self.store.save(job)
                finished = True
            else:
                job.stop_reason = "cancel"
                finished = False
        if finished:
            self._publish(job.id, {"type": "finished", "job": job.public()})
        return job

    def interrupt_current(self) -> Job | None:
        """A1111's /interrupt: stop the running job (it ends as cancelled, keeping finished images)."""
        with self._cond:
            job = self._current
            if job is not None:
                job.stop_reason = "interrupt"
        return job

    def current(self) -> Job | None:
        return self._current

    def queued_count(self) -> int:
        with self._cond:
            return len(self._pending)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is queued or running (tests, shutdown scripts)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._cond:
                if not self._pending and self._current is None:
                    return True
            time.sleep(0.02)
        return False

    # ------------------------------------------------------------------ events
    def subscribe(self, job_id: str, loop: asyncio.AbstractEventLoop, maxsize: int = 64) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        with self._subs_lock:
            self._subs.setdefault(job_id, []).append(_Subscriber(loop, q))
        return q

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        with self._subs_lock:
            subs = [s for s in self._subs.get(job_id, []) if s.queue is not q]
            if subs:
                self._subs[job_id] = subs
            else:
                self._subs.pop(job_id, None)

    def _has_subscribers(self, job_id: str) -> bool:
        with self._subs_lock:
            return bool(self._subs.get(job_id))

    def _publish(self, job_id: str, event: dict) -> None:
        with self._subs_lock:
            subs = list(self._subs.get(job_id, []))
        for s in subs:
            try:
                s.loop.call_soon_threadsafe(_put_latest, s.queue, event)
            except RuntimeError:  # the loop is closed: the client went away
                self.unsubscribe(job_id, s.queue)

    async def wait(self, job_id: str) -> Job:
        """Await the end of a job (done, failed or cancelled) and return it."""
        q = self.subscribe(job_id, asyncio.get_running_loop())
        try:
            while True:
                job = self.get(job_id)
                if job.status in TERMINAL:
                    return job
                try:
                    await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.unsubscribe(job_id, q)

    # ------------------------------------------------------------------ previews
    def preview(self, job: Job, fmt: str = "JPEG") -> str | None:
        """Base64 preview of the running job's current x0 estimate (None before the first step)."""
        latent = job.last_latent
        if latent is None or self.settings.preview == "off":
            return None
        if self.settings.preview == "vae":
            from ..pipeline import to_pil

            pipe = self.models.get(job.request.get("model"))
            image = to_pil(pipe.decode(latent.to(pipe.device)))[0]
        else:
            image = latent_preview(latent)
        return encode_image(image, fmt)

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._live[self._pending.popleft()]
                job.status = RUNNING
                job.stop_reason = None
                job.started_at = time.time()
                job.attempts += 1
                self._run_number += 1
                job.run_number = self._run_number
                self._current = job
                self.store.save(job)
            self._publish(job.id, {"type": "status", "job": job.public()})
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._current = None
                    if job.status in TERMINAL:
                        self._live.pop(job.id, None)
                    elif job.status == QUEUED and self._stopping:
                        pass  # left for the next start
                    elif job.status == QUEUED:
                        self._pending.appendleft(job.id)
                self._publish(job.id, {"type": "finished" if job.status in TERMINAL else "status",
                                       "job": job.public()})

    def _run(self, job: Job) -> None:
        """Run one job to its end state. Never raises: every failure ends up in job.error."""
        from ..pipeline import Interrupted

        t0 = time.monotonic()
        try:
            req = self._request_for_run(job)
            pipe = self.models.get(req.model)
            refiner = self.models.refiner(req.refiner) if req.refiner else None
            if refiner is not None:
                req.refiner = str(self.models.resolve(req.refiner))
            job.images, job.seeds, job.infos = [], [], []
            base_seed = int(req.seed)
            for k in range(job.n_iter):
                job.iteration = k
                r = copy.copy(req)
                r.loras = list(req.loras)
                r.seed = base_seed + k * req.batch
                result = pipe.generate(r, callback=self._callback(job, r, t0), refiner=refiner)
                self._save_results(job, r, result)
                self.store.save(job)  # finished iterations survive a crash in the next one
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
        self.store.save(job)

    def _request_for_run(self, job: Job) -> GenerationRequest:
        """Rebuild the request from the stored dict, opening uploaded images and resolving LoRA names."""
        d = dict(job.request)
        for key in ("init_image", "mask_image"):
            v = d.get(key)
            if isinstance(v, str) and v.startswith(INPUT_PREFIX):
                d[key] = self.open_input(v[len(INPUT_PREFIX):])
        req = GenerationRequest.from_dict(d)
        req.loras = [LoraSpec(str(self.models.resolve_lora(x.name)), x.weight) for x in req.loras]
        return req

    def _callback(self, job: Job, req: GenerationRequest, t0: float) -> Callable:
        """The per-step progress callback: records progress, makes previews, enforces cancel and timeout."""
        if req.refiner is None:
            base_share = 1.0
        elif req.refiner_mode == "ensemble":
            base_share = req.refiner_switch
        else:
            ref_steps = (req.refiner_steps or req.steps) * req.refiner_strength
            base_share = req.steps / (req.steps + ref_steps)

        def cb(p) -> str | None:
            if job.stop_reason is None and time.monotonic() - t0 > self.settings.job_timeout_s:
                job.stop_reason = "timeout"
            if job.stop_reason is not None:
                return "stop"
            frac = p.step / max(p.total, 1)
            within = frac * base_share if p.stage == "base" else base_share + (1 - base_share) * frac
            job.progress = (job.iteration + within) / job.n_iter
            job.step, job.total, job.stage = p.step, p.total, p.stage
            if self.settings.preview != "off" and p.step % self.settings.preview_every == 0:
                job.last_latent = p.denoised[:1].detach().float().cpu().clone()
            event: dict[str, Any] = {
                "type": "progress", "id": job.id, "progress": job.progress, "step": p.step, "total": p.total,
                "stage": p.stage, "iteration": job.iteration, "n_iter": job.n_iter,
            }
            if job.last_latent is not None and self._has_subscribers(job.id) and \
                    p.step % self.settings.preview_every == 0:
                try:
                    event["preview"] = "data:image/jpeg;base64," + (self.preview(job) or "")
                except Exception:  # noqa: BLE001 - a failed preview must not fail the job
                    log.exception("preview failed")
            self._publish(job.id, event)
            return None

        return cb

    def _save_results(self, job: Job, req: GenerationRequest, result) -> None:
        """Each image as a PNG with the A1111 text and the JSON record of the request that remakes it
        (this image's seed, batch 1; the original names of model, refiner and LoRAs, not server paths)."""
        from .. import __version__
        from ..metadata import write_png

        stored = job.request
        for image, seed, info in zip(result.images, result.seeds, result.infos):
            name = f"{job.id}-{len(job.images):02d}.png"
            single = dataclasses.replace(req, seed=int(seed), batch=1, refiner=stored.get("refiner"),
                                         loras=[LoraSpec(**x) for x in stored.get("loras", [])])
            record = {"request": single.to_dict(), "model": stored.get("model") or self._default_model_name(),
                      "version": __version__, "job": job.id}
            write_png(image, self.outputs / name, info, record)
            job.images.append(name)
            job.seeds.append(int(seed))
            job.infos.append(info)

    def _default_model_name(self) -> str | None:
        path = self.models.default_path()
        return path.stem if path is not None else None

    # ------------------------------------------------------------------ files
    def save_input(self, image: Image.Image, job_id: str, which: str) -> str:
        """Store an uploaded init/mask image; returns the reference to put in the request."""
        name = f"{job_id}-{which}.png"
        image.save(self.inputs / name, format="PNG")
        return INPUT_PREFIX + name

    def open_input(self, name: str) -> Image.Image:
        from ..data.images import load_image

        return load_image(resolve_name(self.inputs, name, "input image", files_only=True))

    def output_path(self, name: str) -> Path:
        return resolve_name(self.outputs, name, "image", files_only=True)
