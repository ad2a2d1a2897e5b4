"""The job queue behind every generating route: a bounded FIFO, its dispatchers, progress and previews.

One GPU runs one generation at a time, so every request that generates (native `POST /jobs` and the A1111
`txt2img` / `img2img` routes alike) becomes a `Job` in one queue, held by the `JobManager` here. What
runs a job is an `Executor` (the seam between the queue and the devices, in `executor.py`): it has *slots*,
each running one job at a time, and the manager runs one dispatcher thread per slot. The default,
`executor.InProcessExecutor`, has one slot in this process (the one-worker server: jobs run in submission
order); `workers.WorkerPool` has one worker process per device (`sdxl serve --devices`); another backend
(Ray Serve replicas) plugs in the same way. `executor.JobRunner` is the one path that runs a job on a
loaded model, wherever it runs.

Life of a job::

    queued --(worker picks it)--> running --> done | failed | cancelled
       |                            |
       +--(cancel)--> cancelled     +--(shutdown before it finished)--> queued (runs again on the next start)

- The queue is bounded (`queue_size`); `submit` raises `QueueFull` (HTTP 429) instead of growing.
- Every state change is written to the `JobStore` (SQLite, `store.py`) before anyone is told about it, and
  result images are PNG files in `<data_dir>/outputs/`, so a restart loses nothing finished. At start, jobs
  that were queued are queued again in their original order; a job that was *running* when the process
  died is queued again too, unless it already had `max_attempts` tries (then it fails, so a job that kills
  the process cannot do so forever).
- One process owns a data folder: `start` takes the folder's lock (`datalock.py`) before it opens the
  store or recovers anything, so a second server on the same folder stops without touching the first
  one's jobs.
- Shutdown (`begin_shutdown`, then `drain`): new submissions are refused at once (`ShuttingDown`, HTTP 503),
  the dispatchers take no new job, the running jobs get `shutdown_grace_s` to finish and are then stopped
  at their next step and queued again. Queued jobs stay queued for the next start. Clients awaiting a job
  that did not finish are answered `JobNotFinished` (503 naming the job) as soon as the dispatchers have
  stopped and the executor is closed (worker processes exit).
- Idempotency: a submission may carry a client's key and a digest of the body it came with. The key is
  unique in the job table, so a retry with the same key and body returns the first job (across restarts
  too) instead of queueing a second one; the same key with another body is `IdempotencyConflict` (409).
- Any exception inside a job, CUDA out-of-memory included, fails that job with its message; the worker
  frees cached GPU memory and goes on with the next job.
- Cancel, A1111's interrupt and skip, the per-job timeout and shutdown act between sampler steps: the
  progress callback returns "stop", which the sampler turns into `Interrupted` carrying the x0 estimate
  reached. Cancel and interrupt end the job as cancelled and skip moves on to the next iteration; all
  three keep the stopped image, decoded from that estimate, as A1111 does. A timeout fails the job; a
  shutdown queues it again.
- Progress and previews are pushed to subscribers (the websocket route) through asyncio queues, and are
  kept on the job for polling (`GET /jobs/{id}`, A1111 `/progress`). Previews are computed where the job
  runs (that process owns the models), and only while someone watches: a websocket subscriber, or a
  `/progress` poll in the last `PREVIEW_INTEREST_S` seconds.
- With several slots: a job goes to an idle slot, preferring one that holds its model, refiner and LoRAs
  (`job_key`); a slot that dies mid-job (`WorkerLost`) has its job queued once more for another slot, then
  failed with the reason. A1111's /progress, interrupt and skip act on the running job that started first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.images import load_image
from ..errors import RequestError
from ..files import resolve_in_folder
from ..request import GenerationRequest
from .datalock import DataDirLock
from .executor import INPUT_PREFIX, Executor, InProcessExecutor, JobRunner, WorkerLost, job_key
from .metrics import ServeMetrics
from .modelhost import ModelHost
from .settings import ServeSettings
from .store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, TERMINAL, Job, JobStore

log = logging.getLogger(__name__)

PREVIEW_INTEREST_S = 10.0  # a /progress poll keeps previews coming for this long
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:~+/=-]{1,128}")  # UUIDs, ULIDs, base64 and hex tokens fit


class QueueFull(Exception):
    """The queue holds `queue_size` waiting jobs already (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs (HTTP 503 with Retry-After)."""

    job_id: str | None = None


class JobNotFinished(ShuttingDown):
    """The server stopped before the awaited job finished; it stays queued and runs after the next start
    (HTTP 503 naming the job)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"the server is shutting down and job {job_id} did not finish; it stays queued and "
                         "runs after the restart: retry with the same Idempotency-Key to get its result, or "
                         f"poll GET /jobs/{job_id}")


class JobNotFound(LookupError):
    """No job has this id (HTTP 404)."""


class JobConflict(Exception):
    """The job is in a state that does not allow the operation, e.g. cancelling a finished job (HTTP 409)."""


class IdempotencyConflict(JobConflict):
    """An idempotency key already used with a different request (HTTP 409)."""


def check_idempotency_key(key: str | None, what: str) -> str | None:
    """A client's idempotency key as given (None: none), or RequestError naming `what` (the header or the
    field) when it is not 1 to 128 letters, digits or `. _ : ~ + / = -`."""
    if key is None:
        return None
    if not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key):
        raise RequestError(f"{what}: must be 1 to 128 characters, letters, digits and . _ : ~ + / = - only")
    return key


def request_digest(kind: str, body: dict[str, Any]) -> str:
    """A digest of what a client sent (`kind`: the route), compared when a key comes again."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{kind}\n{text}".encode("utf-8", "surrogatepass")).hexdigest()


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


@dataclass
class _Slot:
    """The manager's view of one executor slot."""

    index: int
    name: str
    thread: threading.Thread | None = None
    job: Job | None = None
    jobs_done: int = 0
    jobs_failed: int = 0
    busy_since: float | None = None
    steps: int = 0  # sampler steps of the running job
    by_model: dict[str, int] = field(default_factory=dict)  # finished jobs per model name
    ready: bool = False  # warmed up (or no warm-up asked)


class JobManager:
    """The queue, the dispatcher threads (one per executor slot) and the job records. Thread-safe; the HTTP
    layer calls it. `executor`: what runs the jobs (see `Executor`); default: `InProcessExecutor`, one
    slot in this process, exactly the one-worker server."""

    def __init__(self, settings: ServeSettings, models: ModelHost, store: JobStore | None = None,
                 data_lock: DataDirLock | None = None, executor: Executor | None = None):
        """Touches no file: the data folder is locked, created and opened by `start`. `data_lock`: the
        folder's lock when the caller took it already (`serve` does, before binding its port)."""
        self.settings = settings
        self.models = models
        self.data_dir = settings.data_path
        self.outputs = self.data_dir / "outputs"
        self.inputs = self.data_dir / "inputs"
        self.executor = executor or InProcessExecutor(JobRunner(settings, models, self.outputs, self.inputs))
        self._store = store
        self.data_lock = data_lock
        self._own_lock = False  # True when start() took the lock (shutdown() then lets it go)
        self._cond = threading.Condition()
        self._pending: deque[str] = deque()
        self._live: dict[str, Job] = {}  # queued and running jobs
        self._slots = [_Slot(i, name) for i, name in enumerate(self.executor.slots())]
        self._avoid: dict[str, set[int]] = {}  # job id -> slots it must not run on again (they died on it)
        self._lost: dict[str, list[str]] = {}  # job id -> why the slots that ran it died
        self._accepting = False
        self._stopping = False
        self._subs: dict[str, list[_Subscriber]] = {}
        self._subs_lock = threading.Lock()
        self._preview_polled_at = 0.0
        self._seq = 0
        self._run_number = 0
        self._drained = threading.Event()  # set when the dispatchers have stopped for good (shutdown)
        self._hurry = threading.Event()  # set to end the shutdown grace at once
        self.warmed_up = threading.Event()  # every slot is ready (warmed up when the settings ask for it)
        self.metrics = ServeMetrics()

    @property
    def store(self) -> JobStore:
        """The job table, opened on first use (`start` opens it only once it holds the folder's lock)."""
        if self._store is None:
            self._store = JobStore(self.data_dir / "jobs.sqlite3")
        return self._store

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Take the data folder's lock (DataDirInUse when another server holds it: then nothing is
        touched), pick up what the previous process left, then start the executor and one dispatcher
        thread per slot (each warms up first when the settings ask for it)."""
        if self.data_lock is None:
            self.data_lock = DataDirLock(self.data_dir)
            self._own_lock = True
        try:
            self.data_lock.acquire()
        except Exception:
            if self._own_lock:
                self.data_lock, self._own_lock = None, False
            raise
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(parents=True, exist_ok=True)
        with self._cond:
            self._seq = self.store.max_value("seq")
            self._run_number = self.store.max_value("run_number")
            self._pending.clear()
            self._live.clear()
            self._recover()
            self._drained.clear()
            self._hurry.clear()
            self._accepting = True
            self._stopping = False
        self.executor.start(self)
        for slot in self._slots:
            slot.ready = False
            thread_name = "sdxl-job-worker" if len(self._slots) == 1 else f"sdxl-job-worker-{slot.name}"
            slot.thread = threading.Thread(target=self._work, args=(slot,), name=thread_name, daemon=True)
            slot.thread.start()

    def _recover(self) -> None:
        for job in self.store.unfinished():
            if job.status == FAILED:  # a row that cannot be read (see JobStore._row_to_job): never run
                log.warning("job %s: its stored record cannot be read; marked failed", job.id)
                self.store.mark_failed(job.id, job.error or "unreadable", time.time())
                continue
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

    @property
    def stopping(self) -> bool:
        """True from the start of a shutdown on: submissions are refused."""
        return self._stopping

    def begin_shutdown(self) -> None:
        """Refuse new submissions (ShuttingDown) and let the dispatchers take no new job; returns at once."""
        with self._cond:
            self._accepting = False
            self._stopping = True  # the dispatchers take no new job after the current one
            self._cond.notify_all()

    def hurry(self) -> None:
        """End the shutdown grace now: running jobs stop at their next step and are queued again."""
        self._hurry.set()

    def drain(self, grace_s: float | None = None) -> None:
        """`begin_shutdown`, then give the running jobs `grace_s` (default `shutdown_grace_s`) to finish,
        else stop them at their next step and queue them again. Queued jobs stay queued in the database
        for the next start. When the dispatchers have stopped, the executor is closed and everyone awaiting
        a job (`wait`) is woken: those whose job did not finish get JobNotFinished. Blocks; safe to call
        more than once."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.begin_shutdown()
        threads = [s.thread for s in self._slots if s.thread is not None]
        if threads:
            began = time.monotonic()
            end = began + max(grace, 0.0)
            while (any(t.is_alive() for t in threads) and not self._hurry.is_set()
                   and time.monotonic() < end):
                alive = next(t for t in threads if t.is_alive())
                alive.join(timeout=min(0.05, max(end - time.monotonic(), 0.0)))
            stopped: list[Job] = []
            for slot in self._slots:
                job = slot.job
                if slot.thread is not None and slot.thread.is_alive() and job is not None:
                    log.warning("job %s still running %.1f s into shutdown; it will run again", job.id,
                                time.monotonic() - began)
                    job.stop_reason = "shutdown"
                    self.executor.stop(slot.index, job)
                    stopped.append(job)
            deadline = time.monotonic() + 10.0
            for slot in self._slots:
                if slot.thread is not None:
                    slot.thread.join(timeout=max(deadline - time.monotonic(), 0.0))
            for slot, job in ((s, s.job) for s in self._slots):
                if slot.thread is not None and slot.thread.is_alive() and job is not None:
                    # stuck inside one step: record it as queued so the next start runs it again
                    job.status = QUEUED
                    job.finished_at = None
                    self.store.save(job)
            for slot in self._slots:
                slot.thread = None
        try:
            self.executor.close()
        except Exception:  # noqa: BLE001 - closing must not keep waiters from being answered
            log.exception("closing the executor failed")
        self._drained.set()
        with self._subs_lock:
            waiting = list(self._subs)
        for job_id in waiting:
            self._publish(job_id, {"type": "shutdown", "id": job_id})

    def shutdown(self, grace_s: float | None = None) -> None:
        """`drain`, then let go of the data folder's lock if `start` took it."""
        self.drain(grace_s)
        if self._own_lock and self.data_lock is not None:
            self.data_lock.release()
            self.data_lock, self._own_lock = None, False

    # ------------------------------------------------------------------ submit / cancel / query
    def submit(self, request: GenerationRequest, n_iter: int = 1, source: str = "api",
               job_id: str | None = None, idempotency: tuple[str, str] | None = None) -> Job:
        """Queue a validated request. Raises QueueFull or ShuttingDown.

        `idempotency`: (the client's key, `request_digest` of what it sent). When a job with that key
        exists, it is returned instead (`job.id != job_id`; the uploaded images saved for `job_id` are
        deleted), whatever its state and even during shutdown; when it was sent with another body,
        IdempotencyConflict."""
        if request.seed is None:  # fixed now, so a job that runs again after a restart gives the same image
            request = request.replace(seed=random.randrange(2**32))
        with self._cond:
            if idempotency is not None:
                existing = self.store.by_idempotency_key(idempotency[0])
                if existing is not None:
                    if existing.request_digest != idempotency[1]:
                        raise IdempotencyConflict(
                            f"Idempotency-Key {idempotency[0]!r} was already used for a different request "
                            f"(job {existing.id}); use a new key for a new request")
                    if job_id is not None and job_id != existing.id:
                        for path in self.inputs.glob(f"{job_id}-*.png"):
                            path.unlink(missing_ok=True)
                    return self._live.get(existing.id, existing)
            if not self._accepting:
                raise ShuttingDown("the server is shutting down; try again later")
            if len(self._pending) >= self.settings.queue_size:
                raise QueueFull(f"the queue is full ({len(self._pending)} jobs waiting); try again later")
            self._seq += 1
            key, digest = idempotency if idempotency is not None else (None, None)
            job = Job(id=job_id or secrets.token_hex(16), seq=self._seq, request=request.to_dict(),
                      n_iter=int(n_iter), source=source, created_at=time.time(), idempotency_key=key,
                      request_digest=digest)
            self.store.save(job)
            self._live[job.id] = job
            self._pending.append(job.id)
            self._cond.notify_all()
        self.metrics.job_submitted(source)
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
        """Queued: removed from the queue at once. Running: stopped at the next sampler step, keeping the
        stopped image (the status turns to cancelled when it has stopped). Finished: JobConflict."""
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
                self.metrics.job_finished(CANCELLED, job.finished_at - job.created_at, None)
                finished = True
            else:
                job.stop_reason = "cancel"
                self._tell_stop(job)
                finished = False
        if finished:
            self._publish(job.id, {"type": "finished", "job": job.public()})
        return job

    def interrupt_current(self) -> Job | None:
        """A1111's /interrupt: stop the running job (with several slots: the one `current` returns, the
        one A1111's /progress shows) at its next step; it ends as cancelled and returns the images it
        finished plus the stopped one."""
        with self._cond:
            job = self._current_locked()
            if job is not None:
                job.stop_reason = "interrupt"
                self._tell_stop(job)
        return job

    def skip_current(self) -> Job | None:
        """A1111's /skip: stop the running job's current image (iteration) at its next step, keep it as it
        is, and go on with the job's next iteration."""
        with self._cond:
            job = self._current_locked()
            if job is not None and job.stop_reason is None:
                job.stop_reason = "skip"
                self._tell_stop(job)
        return job

    def current(self) -> Job | None:
        """The running job; with several slots, the one that started first."""
        with self._cond:
            return self._current_locked()

    def _current_locked(self) -> Job | None:
        running = [s.job for s in self._slots if s.job is not None]
        return min(running, key=lambda j: j.run_number or 0) if running else None

    def running(self) -> list[Job]:
        """Every running job (one per busy slot)."""
        with self._cond:
            return [s.job for s in self._slots if s.job is not None]

    def _tell_stop(self, job: Job) -> None:
        """`job.stop_reason` was just set: tell the slot running it (called with the lock held)."""
        for slot in self._slots:
            if slot.job is job:
                try:
                    self.executor.stop(slot.index, job)
                except Exception:  # noqa: BLE001 - the slot may be gone; the job then ends with it
                    log.exception("could not tell slot %s to stop job %s", slot.name, job.id)

    def queued_count(self) -> int:
        with self._cond:
            return len(self._pending)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is queued or running (tests, shutdown scripts)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._cond:
                if not self._pending and all(s.job is None for s in self._slots):
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
        """Await the end of a job (done, failed or cancelled) and return it. Raises JobNotFinished when the
        server stops first (the job stays queued for the next start)."""
        q = self.subscribe(job_id, asyncio.get_running_loop())
        try:
            while True:
                job = self.get(job_id)
                if job.status in TERMINAL:
                    return job
                if self._drained.is_set():
                    raise JobNotFinished(job_id)
                try:
                    await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.unsubscribe(job_id, q)

    # ------------------------------------------------------------------ previews
    def polled_preview(self, job: Job) -> Image.Image | None:
        """For A1111's /progress: the running job's latest preview (None before the first one). Asking
        keeps previews coming for PREVIEW_INTEREST_S seconds."""
        self._preview_polled_at = time.monotonic()
        cached = job.preview_cache
        return cached[1] if cached is not None else None

    def _wants_preview(self, job: Job) -> bool:
        recently_polled = time.monotonic() - self._preview_polled_at < PREVIEW_INTEREST_S
        return recently_polled or self._has_subscribers(job.id)

    # ------------------------------------------------------------------ what runners report (Reporter)
    def progress(self, job: Job, event: dict[str, Any]) -> None:
        for slot in self._slots:
            if slot.job is job:
                slot.steps += 1
                self.metrics.step(slot.name)
        self._publish(job.id, event)

    def wants_preview(self, job: Job) -> bool:
        return self._wants_preview(job)

    def checkpoint(self, job: Job) -> None:
        self.store.save(job)

    # ------------------------------------------------------------------ worker status
    def workers(self) -> list[dict[str, Any]]:
        """One entry per slot: what the executor says about it (device, pid, alive, loaded models) and
        the manager's counts (jobs done and failed, the running job)."""
        out = []
        for slot in self._slots:
            try:
                d = dict(self.executor.describe(slot.index))
            except Exception as e:  # noqa: BLE001 - a status page must not fail for one slot
                d = {"name": slot.name, "error": f"{type(e).__name__}: {e}"}
            with self._cond:
                job = slot.job
                d.update({"name": slot.name, "ready": slot.ready, "busy": job is not None,
                          "current_job": job.id if job is not None else None,
                          "busy_for_s": (time.monotonic() - slot.busy_since) if slot.busy_since else None,
                          "jobs_done": slot.jobs_done, "jobs_failed": slot.jobs_failed,
                          "jobs_by_model": dict(slot.by_model)})
            out.append(d)
        return out

    # ------------------------------------------------------------------ the dispatchers
    def _pick(self, slot: _Slot) -> str | None:
        """The id of the job `slot` should run next, or None to wait (called with the lock held).

        One slot: the oldest job (strict submission order). Several: among the oldest few, the first whose
        `job_key` is what this slot holds; else the first that no other slot holds; else the oldest, unless
        an idle slot that holds it can take it (it will). A job is not given to a slot it died on while
        another slot may take it."""
        n = len(self._slots)
        if n == 1:
            return self._pending[0] if self._pending else None
        if not self.executor.available(slot.index) and any(self.executor.available(s.index)
                                                           for s in self._slots):
            return None  # with no slot left at all, jobs still go out and fail with the slot's reason
        window = [jid for jid in list(self._pending)[:max(8, 4 * n)]
                  if slot.index not in self._avoid.get(jid, ()) or len(self._avoid[jid]) >= n]
        if not window:
            return None
        default = self._default_name()
        keys = {jid: job_key(self._live[jid].request, default) for jid in window}
        held = self.executor.holds(slot.index)
        if held is not None:
            for jid in window:
                if keys[jid] == held:
                    return jid
        others = {s.index: self.executor.holds(s.index) for s in self._slots if s is not slot}
        held_elsewhere = {k for k in others.values() if k is not None}
        for jid in window:
            if keys[jid] not in held_elsewhere:
                return jid
        head = window[0]
        for s in self._slots:
            if (s is not slot and s.job is None and s.ready and others[s.index] == keys[head]
                    and self.executor.available(s.index)
                    and s.index not in self._avoid.get(head, ())):
                return None  # that idle slot takes it
        return head

    def _default_name(self) -> str | None:
        path = self.models.default_path()
        return path.stem if path is not None else None

    def _work(self, slot: _Slot) -> None:
        if self.settings.warmup:
            self.executor.warm_up(slot.index)
        with self._cond:
            slot.ready = True
            if all(s.ready for s in self._slots):
                self.warmed_up.set()
            self._cond.notify_all()
        while True:
            with self._cond:
                while not self._stopping and (job_id := self._pick(slot)) is None:
                    self._cond.wait(timeout=1.0 if len(self._slots) > 1 else None)
                if self._stopping:
                    return
                self._pending.remove(job_id)
                job = self._live[job_id]
                job.status = RUNNING
                job.stop_reason = None
                job.started_at = time.time()
                job.attempts += 1
                self._run_number += 1
                job.run_number = self._run_number
                slot.job = job
                slot.busy_since = time.monotonic()
                slot.steps = 0
                self.store.save(job)
            self._publish(job.id, {"type": "status", "job": job.public()})
            lost: str | None = None
            try:
                self.executor.run(slot.index, job, self)
            except WorkerLost as e:
                lost = str(e) or f"worker {slot.name} died"
            except Exception as e:  # noqa: BLE001 - an executor bug fails the job, not the dispatcher
                log.exception("executor failed on job %s", job.id)
                job.status, job.error = FAILED, f"{type(e).__name__}: {e}"
            if lost is not None:
                self._on_lost(slot, job, lost)
            if job.status != RUNNING:
                job.finished_at = None if job.status == QUEUED else (job.finished_at or time.time())
            job.last_latent = None
            job.preview_cache = None
            job.pipes = {}
            self.store.save(job)
            if job.status in TERMINAL:
                end = job.finished_at or time.time()
                self.metrics.job_finished(job.status, end - job.created_at,
                                          end - job.started_at if job.started_at else None)
            if slot.busy_since is not None:
                self.metrics.job_speed(slot.name, slot.steps, time.monotonic() - slot.busy_since)
            with self._cond:
                slot.job = None
                slot.busy_since = None
                if job.status in TERMINAL:
                    model = job_key(job.request, self._default_name())[0]
                    slot.by_model[model] = slot.by_model.get(model, 0) + 1
                if job.status == DONE:
                    slot.jobs_done += 1
                elif job.status == FAILED:
                    slot.jobs_failed += 1
                if job.status in TERMINAL:
                    self._live.pop(job.id, None)
                    self._avoid.pop(job.id, None)
                    self._lost.pop(job.id, None)
                elif job.status == QUEUED and self._stopping:
                    pass  # left for the next start
                elif job.status == QUEUED:
                    self._pending.appendleft(job.id)
                self._cond.notify_all()
            self._publish(job.id, {"type": "finished" if job.status in TERMINAL else "status",
                                   "job": job.public()})

    def _on_lost(self, slot: _Slot, job: Job, reason: str) -> None:
        """The slot died while running `job`: queue it again for another slot, once; the second time (or
        when it was being cancelled or stopped anyway) it ends with the reason."""
        log.warning("job %s: %s", job.id, reason)
        self.metrics.worker_lost()
        with self._cond:
            reasons = self._lost.setdefault(job.id, [])
            reasons.append(reason)
            self._avoid.setdefault(job.id, set()).add(slot.index)
        if job.stop_reason == "shutdown":
            job.status = QUEUED
        elif job.stop_reason in ("cancel", "interrupt"):
            job.status = CANCELLED
        elif job.stop_reason == "timeout":
            job.status, job.error = FAILED, f"timed out after {self.settings.job_timeout_s:g} s ({reason})"
        elif len(reasons) >= 2:
            job.status = FAILED
            job.error = f"{reason}; it had been retried once after: {reasons[0]}"
        else:
            job.status = QUEUED
            job.error = None
            job.progress, job.step, job.total = 0.0, 0, 0

    # ------------------------------------------------------------------ files
    def save_input(self, image: Image.Image, job_id: str, which: str) -> str:
        """Store an uploaded init/mask image; returns the reference to put in the request."""
        name = f"{job_id}-{which}.png"
        image.save(self.inputs / name, format="PNG")
        return INPUT_PREFIX + name

    def open_input(self, name: str) -> Image.Image:
        return load_image(resolve_in_folder(self.inputs, name, "input image", files_only=True))

    def output_path(self, name: str) -> Path:
        return resolve_in_folder(self.outputs, name, "image", files_only=True)
