"""Loopback load test of the native job API: `python bench/load_test.py [--requests 200 --clients 20 ...]`.

Starts the real server (`python -m sdxl.serve`, uvicorn on 127.0.0.1, the shipped default model unless
--model is given) in a subprocess with a fresh data folder, then C client threads send N `POST /jobs` between
them (each client its own keep-alive connection, as fast as it can), poll every accepted job until it ends,
and stop the server with SIGTERM. Printed: submit throughput and latency percentiles, accepted vs 429,
end-to-end job latency, completed jobs per second, and the exactly-once check:
  - every accepted job id is unique and ends `done`;
  - each has exactly one result image, and the output folder holds exactly those images (no duplicate, no
    orphan);
  - the SQLite job store has exactly one row per accepted id and no other row.
Exit code 0 only if the check passes. Sends traffic to 127.0.0.1 only; bounded by --timeout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


class Server:
    def __init__(self, data_dir: Path, queue_size: int, model: str | None, threads: int):
        self.port = free_port()
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "sdxl.serve", "--data-dir", str(data_dir), "--port", str(self.port),
                "--queue-size", str(queue_size), "--log-level", "warning", "--preview", "off"]
        if model:
            args += ["--model", model]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "src"))
        self.log = data_dir / "server.log"
        self.proc = subprocess.Popen(args, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env)

    def request(self, method: str, path: str, body: dict | None = None, conn=None):
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = json.dumps(body).encode() if body is not None else None
        c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = c.getresponse()
        payload = r.read()
        if conn is None:
            c.close()
        return r.status, (json.loads(payload) if payload[:1] in (b"{", b"[") else payload)

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("server did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run(args) -> dict:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="sdxl-load-"))
    server = Server(data_dir, args.queue_size, args.model, args.server_threads)
    try:
        server.wait_ready(120)
        body = {"prompt": "a red circle", "width": args.size, "height": args.size, "steps": args.steps,
                "sampler": "euler", "schedule": "karras"}
        lock = threading.Lock()
        submits: list[tuple[float, int, str | None, float]] = []  # (latency, status, job id, sent at)
        counter = iter(range(args.requests))

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                t0 = time.perf_counter()
                status, reply = server.request("POST", "/jobs", {**body, "seed": i}, conn=conn)
                dt = time.perf_counter() - t0
                with lock:
                    submits.append((dt, status, reply.get("id") if status == 202 else None, t0))
            conn.close()

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        submit_wall = time.perf_counter() - start
        accepted = [(jid, t0) for _, status, jid, t0 in submits if status == 202]
        ids = [jid for jid, _ in accepted]
        # wait for every accepted job (polling each until terminal), bounded by --timeout
        final: dict[str, dict] = {}
        ended_at: dict[str, float] = {}
        deadline = time.monotonic() + args.timeout
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while len(final) < len(set(ids)) and time.monotonic() < deadline:
            for jid in ids:
                if jid in final:
                    continue
                status, job = server.request("GET", f"/jobs/{jid}", conn=conn)
                if status == 200 and job["status"] in ("done", "failed", "cancelled"):
                    final[jid] = job
                    ended_at[jid] = time.perf_counter()
            time.sleep(0.1)
        total_wall = time.perf_counter() - start
    finally:
        server.stop()

    # exactly once: ids unique, each done with one image, the output folder and the store hold exactly those
    problems = []
    if len(ids) != len(set(ids)):
        problems.append(f"{len(ids) - len(set(ids))} duplicate job ids")
    not_done = [j for j in ids if final.get(j, {}).get("status") != "done"]
    if not_done:
        shown = [(j, final.get(j, {}).get("status"), final.get(j, {}).get("error")) for j in not_done[:5]]
        problems.append(f"{len(not_done)} accepted jobs did not complete: {shown}")
    image_names = [img["name"] for j in ids if j in final for img in final[j]["images"]]
    wrong = [j for j in ids if j in final and len(final[j]["images"]) != 1]
    if wrong:
        problems.append(f"{len(wrong)} jobs without exactly one image")
    on_disk = sorted(p.name for p in (data_dir / "outputs").glob("*.png"))
    if sorted(image_names) != on_disk:
        problems.append(f"output folder holds {len(on_disk)} images, the jobs list {len(image_names)}")
    db = sqlite3.connect(data_dir / "jobs.sqlite3")
    rows = db.execute("SELECT id, COUNT(*) FROM jobs GROUP BY id").fetchall()
    db.close()
    if sorted(r[0] for r in rows) != sorted(set(ids)) or any(n != 1 for _, n in rows):
        problems.append(f"job store has {len(rows)} ids for {len(set(ids))} accepted jobs")

    lat = [dt * 1000 for dt, *_ in submits]
    job_lat = [ended_at[j] - t0 for j, t0 in accepted if j in ended_at]
    done = sum(1 for j in final.values() if j["status"] == "done")
    return {
        "requests": args.requests, "clients": args.clients, "queue_size": args.queue_size,
        "size": args.size, "steps": args.steps,
        "accepted": len(ids), "rejected_429": sum(1 for _, s, *_ in submits if s == 429),
        "other_status": sorted({s for _, s, *_ in submits if s not in (202, 429)}),
        "submit_wall_s": round(submit_wall, 3), "submit_throughput_rps": round(len(submits) / submit_wall, 1),
        "submit_latency_ms": {f"p{q}": round(percentile(lat, q), 1) for q in (50, 90, 99)},
        "job_latency_s": {f"p{q}": round(percentile(job_lat, q), 2) for q in (50, 90, 99)},
        "completed": done, "total_wall_s": round(total_wall, 2),
        "jobs_per_s": round(done / total_wall, 2),
        "exactly_once": not problems, "problems": problems, "data_dir": str(data_dir),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--queue-size", type=int, default=256, help="server queue; smaller gives 429s")
    p.add_argument("--size", type=int, default=64, help="image width = height (pixels)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--model", help="checkpoint (default: the shipped default model)")
    p.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the jobs")
    p.add_argument("--data-dir", help="server data folder (default: a new temporary one)")
    return p


def main(argv: list[str] | None = None) -> int:
    result = run(parser().parse_args(argv))
    print(json.dumps(result, indent=1))
    return 0 if result["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
