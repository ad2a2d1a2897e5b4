"""Jobs per minute of `sdxl serve --devices ...` for 1 and 2 CPU workers (issue 20's throughput figure).

    python bench/serve_throughput.py                      # --devices cpu, then cpu,cpu; 12 jobs each
    python bench/serve_throughput.py --jobs 20 --steps 20 --configs cpu cpu,cpu ""   # "": no --devices

For each configuration it starts the real server (`python -m sdxl.serve`, uvicorn on 127.0.0.1, the shipped
default model, `--threads 1`, so each worker runs on one thread; a fresh data folder), sends one warm-up job
per worker and waits for them (model loading is not counted), then queues --jobs jobs at once (the same
request with different seeds, the model's native size, --steps steps), polls until all are done, and stops
the server with SIGTERM. Printed per configuration: wall time from the first submission to the last job's
end, jobs per minute, the mean run time of one job on its worker, and the speed-up over the first
configuration. Appends a JSON line per configuration to --out when given.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def wait_done(port: int, ids: list[str], timeout: float) -> list[dict]:
    end = time.monotonic() + timeout
    left, done = set(ids), {}
    while left:
        if time.monotonic() > end:
            raise SystemExit(f"timed out with {len(left)} jobs unfinished")
        for job_id in list(left):
            status, job = call(port, "GET", f"/jobs/{job_id}")
            if job["status"] in ("done", "failed", "cancelled"):
                if job["status"] != "done":
                    raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
                done[job_id] = job
                left.discard(job_id)
        time.sleep(0.2)
    return [done[i] for i in ids]


def run_config(devices: str, jobs: int, steps: int, timeout: float) -> dict:
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="sdxl-throughput-"))
    cmd = [sys.executable, "-m", "sdxl.serve", "--port", str(port), "--data-dir", str(data), "--threads", "1",
           "--log-level", "warning", "--queue-size", str(max(64, jobs + 8))]
    if devices:
        cmd += ["--devices", devices]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    server = subprocess.Popen(cmd, env=env, cwd=ROOT)
    try:
        end = time.monotonic() + 120
        while True:
            try:
                if call(port, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"server ({' '.join(cmd)}) did not start")
            time.sleep(0.2)
        n_workers = len(call(port, "GET", "/workers")[1]["workers"])
        base = {"prompt": "a lighthouse on a cliff at dusk", "steps": steps}
        warm = [call(port, "POST", "/jobs", {**base, "seed": 10_000 + i})[1]["id"] for i in range(n_workers)]
        wait_done(port, warm, timeout)
        t0 = time.monotonic()
        ids = []
        for i in range(jobs):
            status, r = call(port, "POST", "/jobs", {**base, "seed": i})
            assert status == 202, r
            ids.append(r["id"])
        done = wait_done(port, ids, timeout)
        wall = time.monotonic() - t0
        run_s = [j["finished_at"] - j["started_at"] for j in done]
        workers = call(port, "GET", "/workers")[1]["workers"]
        return {"devices": devices or "(none: in-process)", "workers": n_workers, "jobs": jobs,
                "steps": steps, "size": done[0]["resolved"]["width"], "wall_s": round(wall, 2),
                "jobs_per_min": round(60 * jobs / wall, 2),
                "mean_job_run_s": round(sum(run_s) / len(run_s), 2),
                "jobs_per_worker": [w["jobs_done"] - 1 for w in workers]}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["cpu", "cpu,cpu"],
                    help='--devices values to compare ("" = the one-process server)')
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, help="append one JSON line per configuration")
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.2f}")
    first = None
    for devices in args.configs:
        r = run_config(devices, args.jobs, args.steps, args.timeout)
        first = first or r
        r["speedup"] = round(r["jobs_per_min"] / first["jobs_per_min"], 2)
        r["load_before"] = round(load, 2)
        print(json.dumps(r))
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(r) + "\n")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
