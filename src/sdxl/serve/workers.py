"""One worker process per device on the server's one job queue (`sdxl serve --devices cuda:0,cuda:1`).

`WorkerPool` is an `Executor` (see `executor.py`): one slot per listed device, each a process started with
multiprocessing's *spawn* (no CUDA state inherited from the parent). A worker builds its own `ModelHost`
on its device, sets torch's CPU threads (`--threads`, else 1 for a CPU worker: several CPU workers share
the cores), and runs jobs with the same `JobRunner` as the one-process server, so the same request gives
the same pixels. The parent process keeps the queue, the SQLite job table, the data folder's lock,
idempotency and shutdown; only it writes the table. Workers write result PNGs into the data folder's
`outputs/` and send the job's record back.

One duplex pipe per worker carries, parent -> worker: `run` (a job's stored record, the default model's
name and any stop already asked for), `stop` (job id, reason: cancel, interrupt, skip, shutdown),
`warmup`, `exit`; worker -> parent: `ready`, `progress` (the job's live fields and the websocket event,
with a JPEG preview when someone watches: a shared flag per worker says so), `checkpoint` (an iteration
finished), `end` (the job's final record and what the worker holds loaded). The parent reads the pipe on
the slot's dispatcher thread; sends are serialized by a lock (the dispatcher sends jobs, request threads
send stops).

A worker that dies (killed, out of host memory, a crash in a native library) is noticed within
`POLL_S`: its job is handed back to the manager as `WorkerLost` (queued once more for another worker,
then failed with the reason) and a new process is started on the device at once. A worker that dies
while idle is restarted by the pool's monitor thread.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from .executor import Executor, JobRunner, Reporter, WorkerLost, apply_remote_progress
from .modelhost import ModelHost
from .settings import ServeSettings, SettingsError
from .store import RUNNING, Job

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a waiting dispatcher checks that its worker lives and updates the preview flag
START_TIMEOUT_S = 120.0  # a worker that has not said `ready` by then is taken as failed to start
MAX_FAILED_STARTS = 3  # a device whose worker dies this many times in a row before it is ready is given up
# the job fields a worker sends back (live ones with progress, all of them at the end)
LIVE_FIELDS = ("progress", "step", "total", "stage", "iteration")
RESULT_FIELDS = ("status", "error", "images", "seeds", "infos", "resolved", "finished_at", "stop_reason",
                 *LIVE_FIELDS)


def check_devices(devices: list[str]) -> None:
    """Refuse devices this machine does not have (one line naming the entry), before any worker starts."""
    for d in devices:
        if d.startswith("cuda"):
            if not torch.cuda.is_available():
                raise SettingsError(f"--devices: {d} asked for, but CUDA is not available on this machine")
            index = int(d.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise SettingsError(f"--devices: {d} asked for, but this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s)")
        elif d == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise SettingsError("--devices: mps asked for, but it is not available on this machine")


def worker_threads(settings: ServeSettings, device: str) -> int | None:
    """torch's CPU threads in a worker: `--threads`, else 1 for a CPU worker (CPU workers share the
    cores), else torch's default (None)."""
    if settings.threads:
        return settings.threads
    return 1 if device == "cpu" else None


# ------------------------------------------------------------------------------------------------ worker side
class _PipeReporter:
    """The Reporter inside a worker: forwards steps and checkpoints to the parent."""

    def __init__(self, conn: Connection, send_lock: threading.Lock, want_preview):
        self.conn = conn
        self.lock = send_lock
        self.want_preview = want_preview

    def send(self, message: tuple) -> None:
        with self.lock:
            self.conn.send(message)

    def progress(self, job: Job, event: dict[str, Any]) -> None:
        self.send(("progress", job.id, {k: getattr(job, k) for k in LIVE_FIELDS}, event))

    def wants_preview(self, job: Job) -> bool:
        return bool(self.want_preview.value)

    def checkpoint(self, job: Job) -> None:
        fields = ("images", "seeds", "infos", "resolved")
        self.send(("checkpoint", job.id, {k: getattr(job, k) for k in fields}))


def _worker_main(conn: Connection, settings: ServeSettings, device: str, want_preview) -> None:
    """A worker process: load models on `device` when jobs ask for them, run jobs one at a time.

    SIGINT and SIGTERM are ignored: Ctrl+C in a terminal and a service manager's stop reach every process
    of the group, and the parent drains (the running job gets the grace, then a `stop`), then says `exit`;
    a worker whose parent is gone exits when its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {device} pid {os.getpid()}: "
                        "%(levelname)s %(message)s")
    threads = worker_threads(settings, device)
    if threads:
        torch.set_num_threads(threads)
    settings = dataclasses.replace(settings, device=device, devices=[])
    models = ModelHost(settings)
    loads = [0]
    load = models._load

    def counted_load(path):
        loads[0] += 1
        return load(path)

    models._load = counted_load  # type: ignore[method-assign]
    data = settings.data_path
    runner = JobRunner(settings, models, data / "outputs", data / "inputs")
    send_lock = threading.Lock()
    reporter = _PipeReporter(conn, send_lock, want_preview)
    todo: list[tuple] = []
    todo_cond = threading.Condition()
    jobs: dict[str, Job] = {}

    def listen() -> None:  # reads the pipe; the main thread runs the jobs
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent is gone: nothing left to work for
                os._exit(0)
            if message[0] == "stop":
                job = jobs.get(message[1])
                if job is not None:
                    job.stop_reason = message[2]
                continue
            if message[0] == "run":
                payload = message[1]
                job = Job(id=payload["id"], seq=payload["seq"], request=payload["request"],
                          n_iter=payload["n_iter"], source=payload["source"], attempts=payload["attempts"],
                          status=RUNNING, stop_reason=payload.get("stop_reason"))
                jobs[job.id] = job
            with todo_cond:
                todo.append(message)
                todo_cond.notify()

    threading.Thread(target=listen, name="sdxl-worker-pipe", daemon=True).start()
    reporter.send(("ready", os.getpid(), {"threads": torch.get_num_threads()}))
    while True:
        with todo_cond:
            while not todo:
                todo_cond.wait()
            message = todo.pop(0)
        if message[0] == "exit":
            break
        if message[0] == "warmup":
            runner.warm_up()
            reporter.send(("warm", runner.loaded(), loads[0]))
            continue
        payload = message[1]
        job = jobs[payload["id"]]
        models.default_name = payload.get("default_name")
        runner.run(job, reporter)
        jobs.pop(job.id, None)
        reporter.send(("end", job.id, {k: getattr(job, k) for k in RESULT_FIELDS}, runner.loaded(), loads[0],
                       runner.held))
    conn.close()


# ------------------------------------------------------------------------------------------------ parent side
@dataclass
class _Worker:
    """The parent's handle on one worker process."""

    device: str
    process: Any = None  # multiprocessing Process
    conn: Connection | None = None
    want_preview: Any = None  # shared byte: 1 while someone watches the running job
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    lock: threading.RLock = field(default_factory=threading.RLock)  # starting / restarting
    pid: int | None = None
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    deaths: list[str] = field(default_factory=list)
    held: tuple | None = None  # job_key of what it has loaded
    loaded: dict[str, Any] = field(default_factory=dict)
    loads: int = 0  # models loaded by the current process
    busy: bool = False
    threads: int | None = None
    failed_starts: int = 0  # deaths before `ready`, in a row
    broken: str | None = None  # set after MAX_FAILED_STARTS: the slot takes no more jobs


class WorkerPool(Executor):
    """One worker process per device (see the module docstring). `devices`: e.g. ["cuda:0", "cuda:1"] or
    ["cpu", "cpu"]."""

    def __init__(self, settings: ServeSettings, devices: list[str]):
        if not devices:
            raise SettingsError("--devices: at least one device")
        self.settings = settings
        self.devices = list(devices)
        self._ctx = mp.get_context("spawn")
        counts = Counter(self.devices)
        seen: Counter[str] = Counter()
        self._names = []
        for d in self.devices:
            self._names.append(d if counts[d] == 1 else f"{d}#{seen[d]}")
            seen[d] += 1
        self._workers = [_Worker(d) for d in self.devices]
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None

    # ---------------------------------------------------------- processes
    def _spawn(self, w: _Worker) -> None:
        """Start a process for `w` (returns at once; the process says `ready` when it has started)."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        w.want_preview = self._ctx.Value("b", 0, lock=False)
        p = self._ctx.Process(target=_worker_main, args=(child_conn, self.settings, w.device, w.want_preview),
                              name=f"sdxl-worker-{w.device}", daemon=True)
        p.start()
        child_conn.close()
        w.process, w.conn, w.pid, w.ready = p, parent_conn, p.pid, False
        w.started_at = time.monotonic()
        w.held, w.loaded, w.loads = None, {}, 0

    def _alive(self, w: _Worker) -> bool:
        return w.process is not None and w.process.is_alive()

    def _death_reason(self, w: _Worker, name: str) -> str:
        p = w.process
        if p is not None:
            p.join(timeout=1.0)
        code = p.exitcode if p is not None else None
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit code {code}" if code is not None else "its pipe closed")
        return f"worker {name} (pid {w.pid}) died while running the job ({how})"

    def _restart(self, w: _Worker, name: str, reason: str) -> None:
        with w.lock:
            if self._closing.is_set() or w.broken:
                return
            w.deaths.append(reason)
            if w.conn is not None:
                w.conn.close()
            if not w.ready:
                w.failed_starts += 1
                if w.failed_starts >= MAX_FAILED_STARTS:
                    w.broken = (f"worker {name} died {w.failed_starts} times before it was ready (last: "
                                f"{reason}); no more jobs go to {w.device}")
                    log.error("%s", w.broken)
                    return
            log.warning("%s; starting a new worker on %s", reason, w.device)
            w.restarts += 1
            self._spawn(w)

    def _wait_ready(self, w: _Worker, name: str) -> None:
        """Read messages until the worker says `ready` (raises WorkerLost when it dies first)."""
        end = time.monotonic() + START_TIMEOUT_S
        while not w.ready:
            message = self._recv(w, name, end)
            if message is not None and message[0] == "ready":
                w.ready, w.pid, w.threads = True, message[1], message[2].get("threads")
                w.failed_starts = 0

    def _recv(self, w: _Worker, name: str, deadline: float | None = None) -> tuple | None:
        """The next message from `w` (None after POLL_S without one); WorkerLost when it died."""
        if w.broken:
            raise WorkerLost(w.broken)
        try:
            if w.conn.poll(POLL_S):
                return w.conn.recv()
        except (EOFError, OSError):  # the pipe closed: the process is exiting
            w.process.join(timeout=2.0)
        else:
            if self._alive(w) and (deadline is None or time.monotonic() < deadline):
                return None
        reason = (self._death_reason(w, name) if not self._alive(w)
                  else f"worker {name} (pid {w.pid}) did not start within {START_TIMEOUT_S:g} s")
        if self._alive(w):
            w.process.kill()
        self._restart(w, name, reason)
        raise WorkerLost(reason)

    def _send(self, w: _Worker, message: tuple) -> None:
        with w.send_lock:
            w.conn.send(message)

    def _watch(self) -> None:
        """Restart workers that died while idle (a busy one is restarted by its dispatcher)."""
        while not self._closing.wait(1.0):
            for i, w in enumerate(self._workers):
                with w.lock:
                    dead = w.process is not None and not self._alive(w) and w.broken is None
                    if not w.busy and dead and not self._closing.is_set():
                        self._restart(w, self._names[i], self._death_reason(w, self._names[i]).replace(
                            " while running the job", " while idle"))

    # ---------------------------------------------------------- Executor
    def slots(self) -> list[str]:
        return list(self._names)

    def start(self, reporter: Reporter) -> None:
        self._closing.clear()
        for w in self._workers:
            self._spawn(w)
        self._monitor = threading.Thread(target=self._watch, name="sdxl-worker-monitor", daemon=True)
        self._monitor.start()

    def warm_up(self, slot: int) -> None:
        w, name = self._workers[slot], self._names[slot]
        with w.lock:
            w.busy = True
        try:
            self._wait_ready(w, name)
            self._send(w, ("warmup",))
            while True:
                message = self._recv(w, name)
                if message is not None and message[0] == "warm":
                    w.loaded, w.loads = message[1], message[2]
                    return
        except (WorkerLost, OSError) as e:
            log.warning("warm-up on %s: %s", name, e)
        finally:
            w.busy = False

    def run(self, slot: int, job: Job, reporter: Reporter) -> None:
        w, name = self._workers[slot], self._names[slot]
        with w.lock:
            w.busy = True
            if not self._alive(w):
                self._restart(w, name, self._death_reason(w, name).replace(" while running the job", ""))
        try:
            self._wait_ready(w, name)
            with w.send_lock:  # a stop asked before this is sent with the job, one asked after follows it
                payload = {"id": job.id, "seq": job.seq, "request": job.request, "n_iter": job.n_iter,
                           "source": job.source, "attempts": job.attempts, "stop_reason": job.stop_reason,
                           "default_name": _default_name(reporter)}
                try:
                    w.conn.send(("run", payload))
                except OSError:
                    pass  # dead: the next read says so
            while True:
                w.want_preview.value = 1 if reporter.wants_preview(job) else 0
                message = self._recv(w, name)
                if message is None:
                    continue
                kind = message[0]
                if kind == "progress":
                    apply_remote_progress(job, message[2], message[3], reporter)
                elif kind == "checkpoint":
                    for k, v in message[2].items():
                        setattr(job, k, v)
                    reporter.checkpoint(job)
                elif kind == "end":
                    for k, v in message[2].items():
                        setattr(job, k, v)
                    w.loaded, w.loads, w.held = message[3], message[4], message[5]
                    return
        finally:
            w.busy = False

    def stop(self, slot: int, job: Job) -> None:
        w = self._workers[slot]
        try:
            self._send(w, ("stop", job.id, job.stop_reason))
        except OSError:  # the worker is gone: its dispatcher notices
            pass

    def holds(self, slot: int) -> tuple | None:
        return self._workers[slot].held

    def available(self, slot: int) -> bool:
        return self._workers[slot].broken is None

    def describe(self, slot: int) -> dict[str, Any]:
        w = self._workers[slot]
        return {"name": self._names[slot], "device": w.device, "pid": w.pid, "alive": self._alive(w),
                "started": w.ready, "threads": w.threads, "loaded": dict(w.loaded), "model_loads": w.loads,
                "restarts": w.restarts, "last_death": w.deaths[-1] if w.deaths else None,
                "broken": w.broken}

    def kill(self, slot: int) -> int | None:
        """Kill a worker's process (tests, operators): what a crash does. Returns its pid."""
        w = self._workers[slot]
        if self._alive(w):
            w.process.kill()
        return w.pid

    def close(self) -> None:
        """Ask every worker to exit, then kill what is left after a few seconds."""
        self._closing.set()
        for w in self._workers:
            if self._alive(w):
                try:
                    self._send(w, ("exit",))
                except OSError:
                    pass
        end = time.monotonic() + 5.0
        for w in self._workers:
            if w.process is not None:
                w.process.join(timeout=max(end - time.monotonic(), 0.1))
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join(timeout=2.0)
            if w.conn is not None:
                w.conn.close()
        if self._monitor is not None:
            self._monitor.join(timeout=2.0)


def _default_name(reporter: Reporter) -> str | None:
    """The default model's name in models_dir when A1111's /options changed it (the JobManager's
    ModelHost knows), else None: the worker's own startup default."""
    models = getattr(reporter, "models", None)
    return getattr(models, "default_name", None)



