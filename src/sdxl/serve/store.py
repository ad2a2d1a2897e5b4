"""Job records and their SQLite store (`<data_dir>/jobs.sqlite3`).

A `Job` is one queued generation: the persisted part (request, state, times, result file names, seeds,
infotexts) is a row in one table; the live part (progress, the latest x0 estimate for previews, the
pipeline running it) exists only in the process that runs it. Every state change is written here before
anyone is told about it, so a restart loses nothing finished (see `jobs.JobManager`).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL = frozenset({DONE, FAILED, CANCELLED})


@dataclass
class Job:
    """One queued generation. The first group of fields is persisted; the second is live state."""

    id: str
    seq: int  # submission order; the queue runs jobs in increasing seq
    request: dict[str, Any]  # GenerationRequest.to_dict() as submitted, uploaded images as "input:NAME"
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
    # the request as the model ran it (first iteration): canonical sampler/schedule names, size, seed
    resolved: dict[str, Any] | None = None
    # the client's idempotency key (unique in the table) and a digest of the body sent with it: a retry with
    # the same key gets this job back, the same key with another body is a conflict (see JobManager.submit)
    idempotency_key: str | None = None
    request_digest: str | None = None
    # --- live state, not persisted ---
    progress: float = 0.0
    step: int = 0
    total: int = 0
    stage: str = ""
    iteration: int = 0
    stop_reason: str | None = None  # "cancel", "timeout", "shutdown", "interrupt", "skip"
    pipes: dict[str, Any] = field(default_factory=dict, repr=False)  # stage -> the pipeline running it
    last_latent: tuple[str, int, Any] | None = field(default=None, repr=False)  # (stage, step, x0 estimate)
    preview_cache: tuple[tuple[str, int], Any] | None = field(default=None, repr=False)  # key, PIL image

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
            "resolved": self.resolved,
        }


def _unreadable_job(d: dict[str, Any], error: Exception) -> Job:
    """A failed stand-in for a stored row that cannot be read (see `JobStore._row_to_job`)."""

    def number(v: Any, default: Any) -> Any:
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else default

    job_id = d.get("id") if isinstance(d.get("id"), str) else str(d.get("id"))
    job_id = job_id.encode("utf-8", "replace").decode("utf-8")
    return Job(id=job_id, seq=int(number(d.get("seq"), 0)), request={}, status=FAILED,
               source=d.get("source") if d.get("source") in ("api", "a1111") else "api",
               created_at=number(d.get("created_at"), 0.0), started_at=number(d.get("started_at"), None),
               finished_at=number(d.get("finished_at"), None),
               error=f"this job's stored record cannot be read ({type(error).__name__}); shown as failed")


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
    infos TEXT NOT NULL DEFAULT '[]',
    resolved TEXT NOT NULL DEFAULT 'null'
);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""

_COLUMNS = ("id", "seq", "source", "status", "request", "n_iter", "created_at", "started_at", "finished_at",
            "attempts", "run_number", "error", "images", "seeds", "infos", "resolved", "idempotency_key",
            "request_digest")
_COLS = ", ".join(_COLUMNS)
_JSON_COLUMNS = ("request", "images", "seeds", "infos", "resolved")
# columns added after the first release: (name, definition), added to older databases on open
_ADDED = (("resolved", "TEXT NOT NULL DEFAULT 'null'"), ("idempotency_key", "TEXT"),
          ("request_digest", "TEXT"))
# created after the columns above exist (SQLite allows any number of NULLs in a unique index)
_INDEXES = "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency_key ON jobs (idempotency_key);"


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
            have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for name, definition in _ADDED:
                if name not in have:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
            self._db.executescript(_INDEXES)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row_to_job(self, row: tuple) -> Job:
        """A row as a Job. A row this code cannot use (broken JSON, numbers JSON cannot send back such as
        NaN, text that is not Unicode, wrong types: written by an older version or by hand) never breaks a
        listing: it is returned as a failed job that says why, with its id and times kept."""
        d = dict(zip(_COLUMNS, row))
        try:
            for k in _JSON_COLUMNS:
                d[k] = json.loads(d[k])
            job = Job(**d)
            # what the API will send: it must encode as strict JSON in UTF-8
            json.dumps(job.public(), allow_nan=False, ensure_ascii=False).encode("utf-8")
            if not isinstance(job.request, dict) or not isinstance(job.id, str):
                raise TypeError("request is not an object")
            return job
        except (TypeError, ValueError, RecursionError) as e:
            return _unreadable_job(d, e)

    def save(self, job: Job) -> None:
        """Insert the persisted fields of `job`, or update its row. An upsert on the id, not INSERT OR
        REPLACE: a second job with a key already in the table must fail (sqlite3.IntegrityError), never
        silently delete the row that holds the key."""
        values = []
        for k in _COLUMNS:
            v = getattr(job, k)
            values.append(json.dumps(v) if k in _JSON_COLUMNS else v)
        marks = ", ".join("?" for _ in _COLUMNS)
        updates = ", ".join(f"{k} = excluded.{k}" for k in _COLUMNS if k != "id")
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({_COLS}) VALUES ({marks}) "
                             f"ON CONFLICT (id) DO UPDATE SET {updates}", values)

    def mark_failed(self, job_id: str, error: str, finished_at: float) -> None:
        """Set a row's status to failed without rewriting the rest (an unreadable row keeps its text)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                             (FAILED, error, finished_at, job_id))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row_to_job(row) if row else None

    def by_idempotency_key(self, key: str) -> Job | None:
        """The job submitted with this idempotency key, if any."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
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
