"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand (GET /metrics).

What is exported (every name starts with `sdxl_`):

    sdxl_jobs_submitted_total{source}            counter  jobs queued (api: native, a1111)
    sdxl_jobs_finished_total{status}             counter  jobs ended: done, failed, cancelled
    sdxl_job_latency_seconds                     histogram  submission to end, finished jobs
    sdxl_job_run_seconds                         histogram  start to end on a worker, finished jobs
    sdxl_sampler_steps_total{worker}             counter  sampler steps run (rate() = steps per second)
    sdxl_steps_per_second{worker}                gauge    steps / running time of the worker's last job
    sdxl_errors_total{kind}                      counter  job (a job failed), worker_lost (a worker died
                                                          mid-job)
    sdxl_queue_length                            gauge    jobs waiting
    sdxl_jobs_running                            gauge    jobs running
    sdxl_worker_busy{worker,device}              gauge    1 while the worker runs a job
    sdxl_worker_up{worker,device}                gauge    1 while its process (or thread) is alive
    sdxl_worker_jobs_total{worker,status}        counter  jobs each worker ended: done, failed
    sdxl_worker_restarts_total{worker}           counter  worker processes started again after a death

Format rules followed: one `# HELP` and one `# TYPE` line per metric family before its samples; counters
end in `_total`; a histogram has cumulative `_bucket{le=...}` samples ending with `le="+Inf"`, then `_sum`
and `_count`; label values escape backslash, double quote and newline; HELP text escapes backslash and
newline; the body ends with a newline. Counters live in this process and start at 0 with it.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Any

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: a tiny CPU job takes well under a second, an SDXL job on a slow card minutes
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _labels(pairs: dict[str, Any]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs.items()) + "}"


class Histogram:
    """Cumulative buckets, sum and count (one label-less series)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        if not math.isfinite(v):
            return
        v = max(v, 0.0)
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{format_value(b)}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {format_value(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class Exposition:
    """Builds the text: families in the order added, each with HELP, TYPE and its samples."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, Any], float]]
               ) -> None:
        self.parts.append(f"# HELP {name} {escape_help(help_text)}")
        self.parts.append(f"# TYPE {name} {kind}")
        self.parts.extend(f"{name}{_labels(labels)} {format_value(v)}" for labels, v in samples)

    def histogram(self, name: str, help_text: str, h: Histogram) -> None:
        self.parts.append(f"# HELP {name} {escape_help(help_text)}")
        self.parts.append(f"# TYPE {name} histogram")
        self.parts.extend(h.lines(name))

    def text(self) -> str:
        return "\n".join(self.parts) + "\n"


class ServeMetrics:
    """The counters the JobManager updates; `render` adds the gauges it reads from the manager."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submitted: dict[str, int] = defaultdict(int)
        self.finished: dict[str, int] = {"done": 0, "failed": 0, "cancelled": 0}
        self.errors: dict[str, int] = {"job": 0, "worker_lost": 0}
        self.steps: dict[str, int] = defaultdict(int)
        self.steps_per_second: dict[str, float] = {}
        self.latency = Histogram()
        self.run_time = Histogram()

    def job_submitted(self, source: str) -> None:
        with self._lock:
            self.submitted[source] += 1

    def job_finished(self, status: str, latency_s: float | None, run_s: float | None) -> None:
        with self._lock:
            self.finished[status] = self.finished.get(status, 0) + 1
            if status == "failed":
                self.errors["job"] += 1
            if latency_s is not None:
                self.latency.observe(latency_s)
            if run_s is not None:
                self.run_time.observe(run_s)

    def worker_lost(self) -> None:
        with self._lock:
            self.errors["worker_lost"] += 1

    def step(self, worker: str) -> None:
        with self._lock:
            self.steps[worker] += 1

    def job_speed(self, worker: str, steps: int, seconds: float) -> None:
        if steps > 0 and seconds > 0:
            with self._lock:
                self.steps_per_second[worker] = steps / seconds

    def render(self, manager: Any) -> str:
        """The exposition text. `manager`: the JobManager (queue length, workers)."""
        workers = manager.workers()
        queued = manager.queued_count()
        with self._lock:
            e = Exposition()
            for source in ("api", "a1111"):
                self.submitted.setdefault(source, 0)
            e.family("sdxl_jobs_submitted_total", "counter", "Jobs queued, by where they came from.",
                     [({"source": s}, n) for s, n in sorted(self.submitted.items())])
            e.family("sdxl_jobs_finished_total", "counter", "Jobs that ended, by final status.",
                     [({"status": s}, n) for s, n in sorted(self.finished.items())])
            e.histogram("sdxl_job_latency_seconds", "Seconds from submission to the end of a job.",
                        self.latency)
            e.histogram("sdxl_job_run_seconds", "Seconds a job ran on its worker (start to end).",
                        self.run_time)
            names = [w["name"] for w in workers]
            e.family("sdxl_sampler_steps_total", "counter", "Sampler steps run, by worker.",
                     [({"worker": n}, self.steps.get(n, 0)) for n in names])
            e.family("sdxl_steps_per_second", "gauge", "Sampler steps per second of the worker's last job.",
                     [({"worker": n}, self.steps_per_second[n]) for n in names if n in self.steps_per_second])
            e.family("sdxl_errors_total", "counter", "Errors: failed jobs (job), workers that died mid-job "
                     "(worker_lost).", [({"kind": k}, n) for k, n in sorted(self.errors.items())])
        e.family("sdxl_queue_length", "gauge", "Jobs waiting in the queue.", [({}, queued)])
        e.family("sdxl_jobs_running", "gauge", "Jobs running now.",
                 [({}, sum(1 for w in workers if w.get("busy")))])
        e.family("sdxl_worker_busy", "gauge", "1 while the worker runs a job.",
                 [({"worker": w["name"], "device": w.get("device", "")}, 1 if w.get("busy") else 0)
                  for w in workers])
        e.family("sdxl_worker_up", "gauge", "1 while the worker's process is alive.",
                 [({"worker": w["name"], "device": w.get("device", "")}, 1 if w.get("alive") else 0)
                  for w in workers])
        e.family("sdxl_worker_jobs_total", "counter", "Jobs each worker ended, by status.",
                 [({"worker": w["name"], "status": s}, w.get(f"jobs_{s}", 0))
                  for w in workers for s in ("done", "failed")])
        e.family("sdxl_worker_restarts_total", "counter", "Worker processes started again after a death.",
                 [({"worker": w["name"]}, w.get("restarts", 0)) for w in workers])
        return e.text()
