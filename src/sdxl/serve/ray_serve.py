"""The server on Ray Serve: one host or many, generation replicas that each hold one device.

    python -m sdxl.serve.ray_serve --max-replicas 2            # a local Ray cluster, http://127.0.0.1:7860
    ray start --head ... ; python -m sdxl.serve.ray_serve --ray-address auto --host 0.0.0.0 --api-key KEY
    serve run deploy/ray-serve.yaml                            # the same from a config (docs/SERVING.md)

An optional extra (`pip install 'sdxl[ray]'`); nothing else imports this module.

Two deployments make one Serve application:

- `sdxl` (the ingress): one replica running the same FastAPI app as `sdxl serve` (`app.create_app`): the
  routes, the web UI, the A1111 API, the job queue and its SQLite table, the data folder and its lock. Its
  jobs run through `RayExecutor` (an `executor.Executor`) instead of in its own process. It needs no CPU of
  its own (`num_cpus=0`) and is placed on the head node, so the data folder is the head node's.
- `generator`: the replicas that run jobs, each holding one device (`num_gpus=1` on GPUs: Ray gives each
  its own card through CUDA_VISIBLE_DEVICES; `num_cpus=1` on CPUs, with one torch thread unless
  `--threads`). Each runs one job at a time (`max_ongoing_requests=1`) with the same `executor.JobRunner` as
  the one-process server, so a request gives the same pixels. Serve's autoscaler keeps between
  `min_replicas` and `max_replicas` of them (one in-flight job per replica is the target).

Model multiplexing: a job is sent with a multiplexed model id, `model_id(job_key(...))`: the model,
refiner and sorted LoRA names it needs (a stable string). Serve's router sends it to a replica that holds
that id when one is free (after 1-2 s of waiting for one, Serve falls back to the replica holding the
fewest models; RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S sets that wait). A replica keeps
`models_per_replica` ids (default 1: one SDXL per device), each a `JobRunner` with its own `ModelHost`;
Serve evicts the least recently used one, and the models go with it.

Results: a replica runs the job in a scratch folder of its own and streams the result PNGs (the same
files, metadata included) back to the ingress, which writes them into its data folder's `outputs/`; the
uploaded init/mask images travel with the job the other way. So no host but the ingress's needs the data
folder, and every HTTP request, on any node's proxy, is answered from the one job table. What every host
needs is the same `--model` / `--models-dir` / `--loras-dir` paths (a shared or synced folder), since
replicas load models from files.

The stream from a replica carries, in order: `started` (replica id, pid, node, device), `progress` (the
job's live fields and the websocket event, with a JPEG preview while someone watches), `checkpoint` (an
iteration's PNGs and the job's result fields so far), `end` (the final fields, the PNGs not sent yet, the
replica's status). Stops (cancel, interrupt, skip, timeout is the runner's own, shutdown) and whether
anyone watches for previews go the other way through `JobBoard`, a small Ray actor the ingress owns, that
each replica polls every `BOARD_POLL_S` while it runs a job. A replica that dies mid-job ends the stream
with a RayActorError: the executor raises `WorkerLost`, so the manager runs the job once more (Serve sends
it to a live replica and starts a new one in place of the dead one), then fails it with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError
except ModuleNotFoundError as e:  # the optional extra is missing
    if __name__ == "__main__" and (e.name or "").startswith("ray"):
        sys.exit("error: Ray Serve is not installed; install the extra: pip install 'sdxl[ray]'")
    raise

from .__main__ import build_parser, settings_from_args
from .app import create_app
from .executor import INPUT_PREFIX, Executor, JobRunner, Reporter, WorkerLost, apply_remote_progress, job_key
from .modelhost import ModelHost
from .settings import ServeSettings, SettingsError, check_bind
from .store import RUNNING, Job

log = logging.getLogger(__name__)

APP_NAME = "sdxl"
INGRESS_NAME = "sdxl"
GENERATOR_NAME = "generator"
STATUS_KEEP = 100  # a replica's report lists its last this many jobs and loads
BOARD_POLL_S = 0.2  # how often a running replica asks the board for stops and preview interest
LIVE_FIELDS = ("progress", "step", "total", "stage", "iteration")
RESULT_FIELDS = ("status", "error", "images", "seeds", "infos", "resolved", "finished_at", "stop_reason",
                 *LIVE_FIELDS)


@dataclasses.dataclass
class RayOptions:
    """How the Serve application is laid out (the server's own settings are `ServeSettings`).

    min_replicas/max_replicas: autoscaling bounds of the generator deployment (equal: a fixed count).
    gpus_per_replica: 1 (each replica holds one GPU) or 0 (CPU replicas, `num_cpus=1` each); None: 1 when
        the cluster has GPUs, else 0.
    models_per_replica: multiplexed model ids a replica keeps loaded (Serve evicts the least recently used).
    ingress_on_head: place the ingress (job table, data folder) on the Ray head node.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float | None = None
    models_per_replica: int = 1
    ingress_on_head: bool = True

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise SettingsError(f"replicas: need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}) "
                                "and max >= 1 (see --min-replicas, --max-replicas)")
        if self.models_per_replica < 1:
            raise SettingsError(f"--models-per-replica: {self.models_per_replica} must be at least 1")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise SettingsError(f"--gpus-per-replica: {self.gpus_per_replica} must be 0 or more")


def model_id(key: tuple) -> str:
    """A `job_key` (model, refiner, LoRA names) as Serve's multiplexed model id: a stable string."""
    model, refiner, loras = key
    return f"model={model};refiner={refiner};loras={','.join(loras)}"


# ------------------------------------------------------------------------------------------------ the board
class JobBoard:
    """A Ray actor owned by the ingress: per running job, a stop asked for and whether anyone watches it
    (replicas poll it), and the latest status each replica reported (for GET /workers)."""

    def __init__(self):
        self.stops: dict[str, str] = {}
        self.watched: dict[str, bool] = {}
        self.replicas: dict[str, dict[str, Any]] = {}

    def set_stop(self, job_id: str, reason: str) -> None:
        self.stops[job_id] = reason

    def set_watched(self, job_id: str, watched: bool) -> None:
        self.watched[job_id] = watched

    def poll(self, job_id: str) -> tuple[str | None, bool]:
        """(the stop asked since the last poll or None, whether anyone watches)."""
        return self.stops.pop(job_id, None), self.watched.get(job_id, False)

    def forget(self, job_id: str) -> None:
        self.stops.pop(job_id, None)
        self.watched.pop(job_id, None)

    def report(self, replica: str, status: dict[str, Any]) -> None:
        self.replicas[replica] = status

    def replica_status(self) -> dict[str, dict[str, Any]]:
        return dict(self.replicas)


# ------------------------------------------------------------------------------------------------ replicas
class Generator:
    """One generation replica (deployment `generator`): runs jobs one at a time on its device."""

    def __init__(self, settings: ServeSettings, models_per_replica: int = 1):
        # the device Ray gave this replica (CUDA_VISIBLE_DEVICES holds its GPU), whatever --device said
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        threads = settings.threads or (1 if device == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        self.settings = dataclasses.replace(settings, device=device, devices=[])
        self.device = device
        self.scratch = Path(tempfile.mkdtemp(prefix="sdxl-replica-"))
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.node = ray.util.get_node_ip_address()
        self.loads: deque[str] = deque(maxlen=STATUS_KEEP)  # the multiplexed ids it loaded, latest last
        self.jobs: deque[str] = deque(maxlen=STATUS_KEEP)  # the jobs it ran, latest last
        self.jobs_done = 0
        self.current: str | None = None

        async def load(mid: str) -> JobRunner:  # a function: Serve keeps its model cache on it
            return await self._load(mid)

        self._runner = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load)

    async def _load(self, mid: str) -> JobRunner:
        """A multiplexed id's models: a JobRunner on a ModelHost of its own (it loads the job's model and
        refiner on its first job, on the job's thread, and keeps them while Serve keeps the id)."""
        self.loads.append(mid)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()  # what an evicted id held
        return JobRunner(self.settings, ModelHost(self.settings), self.scratch, self.scratch)

    def status(self) -> dict[str, Any]:
        return {"replica": self.replica, "pid": os.getpid(), "node": self.node, "device": self.device,
                "threads": torch.get_num_threads(), "model_ids_loaded": list(self.loads),
                "jobs": list(self.jobs), "jobs_done": self.jobs_done, "current_job": self.current}

    async def run(self, payload: dict[str, Any]):
        """Run one job (see the module docstring for what the stream carries)."""
        mid = serve.get_multiplexed_model_id()
        runner = await self._runner(mid)
        board = payload["board"]
        job = Job(id=payload["id"], seq=payload["seq"], request=payload["request"], n_iter=payload["n_iter"],
                  source=payload["source"], attempts=payload["attempts"], status=RUNNING,
                  stop_reason=payload.get("stop_reason"))
        folder = self.scratch / job.id
        (folder / "inputs").mkdir(parents=True, exist_ok=True)
        (folder / "outputs").mkdir(exist_ok=True)
        for name, data in payload["inputs"].items():
            (folder / "inputs" / name).write_bytes(data)
        runner.inputs, runner.outputs = folder / "inputs", folder / "outputs"
        runner.models.default_name = payload.get("default_name")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        watched = [bool(payload.get("watched"))]
        sent: set[str] = set()

        def new_files() -> dict[str, bytes]:
            out = {}
            for name in job.images:
                if name not in sent:
                    out[name] = (runner.outputs / name).read_bytes()
                    sent.add(name)
            return out

        class StreamReporter:
            def progress(self, job: Job, event: dict[str, Any]) -> None:
                live = {k: getattr(job, k) for k in LIVE_FIELDS}
                loop.call_soon_threadsafe(events.put_nowait, ("progress", live, event))

            def wants_preview(self, job: Job) -> bool:
                return watched[0]

            def checkpoint(self, job: Job) -> None:
                fields = {k: getattr(job, k) for k in ("images", "seeds", "infos", "resolved")}
                loop.call_soon_threadsafe(events.put_nowait, ("checkpoint", fields, new_files()))

        def work() -> None:
            try:
                runner.run(job, StreamReporter())
            finally:
                loop.call_soon_threadsafe(events.put_nowait, ("done",))

        async def poll_board() -> None:
            while True:
                await asyncio.sleep(BOARD_POLL_S)
                try:
                    stop, watched[0] = await board.poll.remote(job.id)
                except RayActorError:  # the ingress is gone: nobody waits for this job any more
                    stop = "shutdown"
                if stop is not None:
                    job.stop_reason = stop

        self.current = job.id
        thread = loop.run_in_executor(None, work)
        poller = asyncio.create_task(poll_board())
        try:
            yield ("started", {"replica": self.replica, "pid": os.getpid(), "node": self.node,
                               "device": self.device})
            while True:
                event = await events.get()
                if event[0] == "done":
                    break
                yield event
            await thread
            self.jobs.append(job.id)
            self.jobs_done += 1
            self.current = None
            result = {k: getattr(job, k) for k in RESULT_FIELDS}
            files = new_files()
            status = self.status()
            board.report.remote(self.replica, status)
            yield ("end", result, files, status)
        except (asyncio.CancelledError, GeneratorExit):  # the ingress went away: stop at the next step
            if not thread.done():
                job.stop_reason = job.stop_reason or "shutdown"
                await thread
            raise
        finally:
            self.current = None
            poller.cancel()
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- ingress side
class RayExecutor(Executor):
    """The ingress's executor: `max_replicas` slots (jobs in flight at once), each sending its job to the
    generator deployment with the job's multiplexed model id and reading the replica's stream. Which
    replica runs a job is Serve's choice (multiplexing, then load); `holds` says nothing, so the manager
    keeps submission order."""

    def __init__(self, settings: ServeSettings, options: RayOptions, handle: Any):
        self.settings = settings
        self.options = options
        self.handle = handle
        self.data = settings.data_path
        self.board = None
        self._lanes: list[dict[str, Any]] = [{} for _ in range(options.max_replicas)]
        self._models: ModelHost | None = None
        self._status_cache: tuple[float, dict] = (0.0, {})

    def slots(self) -> list[str]:
        return [f"ray-{i}" for i in range(self.options.max_replicas)]

    def start(self, reporter: Reporter) -> None:
        self._models = getattr(reporter, "models", None)
        self.board = ray.remote(JobBoard).options(num_cpus=0).remote()

    def _default_name(self) -> str | None:
        if self._models is None:
            return None
        path = self._models.default_path()
        return path.stem if path is not None else None

    def _inputs(self, job: Job) -> dict[str, bytes]:
        """The uploaded images the job refers to ("input:NAME"), as bytes for the replica."""
        refs = [job.request.get("init_image"), job.request.get("mask_image"),
                *(job.request.get("region_masks") or ())]
        out = {}
        for ref in refs:
            if isinstance(ref, str) and ref.startswith(INPUT_PREFIX):
                name = ref[len(INPUT_PREFIX):]
                out[name] = (self.data / "inputs" / Path(name).name).read_bytes()
        return out

    def _write(self, files: dict[str, bytes]) -> None:
        """Result PNGs from a replica into the data folder's outputs (atomic: no partial file is left)."""
        outputs = self.data / "outputs"
        for name, data in files.items():
            target = outputs / Path(name).name
            tmp = target.with_name(f".{target.name}.part")
            tmp.write_bytes(data)
            os.replace(tmp, target)

    def run(self, slot: int, job: Job, reporter: Reporter) -> None:
        lane = self._lanes[slot]
        watched = reporter.wants_preview(job)
        payload = {"id": job.id, "seq": job.seq, "request": job.request, "n_iter": job.n_iter,
                   "source": job.source, "attempts": job.attempts, "stop_reason": job.stop_reason,
                   "default_name": getattr(self._models, "default_name", None), "inputs": self._inputs(job),
                   "board": self.board, "watched": watched}
        mid = model_id(job_key(job.request, self._default_name()))
        replica = None
        try:
            stream = self.handle.options(stream=True, multiplexed_model_id=mid).run.remote(payload)
            for message in stream:
                kind = message[0]
                if kind == "started":
                    replica = message[1]["replica"]
                    lane.update(message[1], job=job.id, model_id=mid)
                elif kind == "progress":
                    apply_remote_progress(job, message[1], message[2], reporter)
                elif kind == "checkpoint":
                    self._write(message[2])
                    for k, v in message[1].items():
                        setattr(job, k, v)
                    reporter.checkpoint(job)
                elif kind == "end":
                    self._write(message[2])
                    for k, v in message[1].items():
                        setattr(job, k, v)
                    lane.update(job=None, status=message[3])
                    return
                now = reporter.wants_preview(job)
                if now != watched:
                    watched = now
                    self.board.set_watched.remote(job.id, now)
        except Exception as e:  # noqa: BLE001 - Ray's and Serve's errors: the job may run elsewhere
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            lane.update(job=None)
            what = "died while running the job" if isinstance(e, RayActorError) else "failed to run the job"
            raise WorkerLost(f"Ray Serve replica {replica or '(not started)'} {what} "
                             f"({type(e).__name__}: {first})") from None
        finally:
            if self.board is not None:
                self.board.forget.remote(job.id)
        lane.update(job=None)
        raise WorkerLost(f"Ray Serve replica {replica or '(not started)'} ended the job's stream without a "
                         "result")

    def stop(self, slot: int, job: Job) -> None:
        if self.board is not None and job.stop_reason is not None:
            self.board.set_stop.remote(job.id, job.stop_reason)

    def replica_status(self) -> dict[str, dict[str, Any]]:
        """The latest status each replica reported (after each job), cached for a second."""
        at, cached = self._status_cache
        if self.board is None or time.monotonic() - at < 1.0:
            return cached
        try:
            cached = ray.get(self.board.replica_status.remote(), timeout=5)
        except Exception as e:  # noqa: BLE001 - a status page must not fail
            log.warning("replica status: %s", e)
        self._status_cache = (time.monotonic(), cached)
        return cached

    def describe(self, slot: int) -> dict[str, Any]:
        lane = self._lanes[slot]
        d = {"name": self.slots()[slot], "backend": "ray serve", "alive": True,
             "replica": lane.get("replica"), "pid": lane.get("pid"), "node": lane.get("node"),
             "device": lane.get("device"), "model_id": lane.get("model_id")}
        if slot == 0:  # every replica's own report once, on the first lane
            d["replicas"] = self.replica_status()
        return d

    def close(self) -> None:
        if self.board is not None:
            try:
                ray.kill(self.board)
            except Exception:  # noqa: BLE001 - Ray may be shutting down already
                pass
            self.board = None


# ------------------------------------------------------------------------------------------- the application
def build_app(settings: ServeSettings, options: RayOptions | None = None):
    """The Serve application: the ingress (the FastAPI app of `create_app` on a `RayExecutor`) bound to
    the generator deployment. Run it with `serve.run(build_app(...))` or `serve run` (`app_builder`)."""
    options = options or RayOptions()
    if settings.devices:
        raise SettingsError("--devices: Ray Serve places one replica per device itself; leave --devices out")
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    actor_options = {"num_gpus": gpus, "num_cpus": 1} if gpus else {"num_cpus": 1}
    autoscaling = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                   "initial_replicas": max(options.min_replicas, 1), "target_ongoing_requests": 1}
    generator = serve.deployment(
        Generator, name=GENERATOR_NAME, max_ongoing_requests=1, ray_actor_options=actor_options,
        autoscaling_config=autoscaling, graceful_shutdown_timeout_s=settings.shutdown_grace_s + 10,
    )

    def make_fastapi():  # runs in the ingress replica
        handle = serve.get_deployment_handle(GENERATOR_NAME, app_name=serve.get_replica_context().app_name)
        return create_app(settings, executor=RayExecutor(settings, options, handle))

    ingress_actor = {"num_cpus": 0}
    if options.ingress_on_head:
        ingress_actor["resources"] = {"node:__internal_head__": 0.001}
    ingress = serve.deployment(
        serve.ingress(make_fastapi)(), name=INGRESS_NAME, num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options=ingress_actor, graceful_shutdown_timeout_s=settings.shutdown_grace_s + 15,
    )
    return ingress.bind(generator.bind(settings, options.models_per_replica))


def app_builder(args: dict[str, Any]):
    """`serve run sdxl.serve.ray_serve:app_builder key=value ...` or a config's `import_path` with `args`:
    the keys are `sdxl serve`'s options with underscores (model, models_dir, data_dir, api_key, ...) and
    RayOptions' fields (min_replicas, max_replicas, gpus_per_replica, models_per_replica)."""
    args = dict(args or {})
    ray_fields = {f.name for f in dataclasses.fields(RayOptions)}
    option_values = {k: args.pop(k) for k in list(args) if k in ray_fields}
    for k in ("min_replicas", "max_replicas", "models_per_replica"):
        if k in option_values:
            option_values[k] = int(option_values[k])
    if "gpus_per_replica" in option_values:
        option_values["gpus_per_replica"] = float(option_values["gpus_per_replica"])
    if "ingress_on_head" in option_values:
        value = str(option_values["ingress_on_head"]).lower()
        option_values["ingress_on_head"] = value in ("1", "true", "yes")
    argv: list[str] = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not False and v is not None:
            argv += [flag, str(v)]
    settings = settings_from_args(build_parser().parse_args(argv))
    return build_app(settings, RayOptions(**option_values))


# ------------------------------------------------------------------------------------------------ the command
def build_ray_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "python -m sdxl.serve.ray_serve"
    p.description = "Serve the sdxl HTTP API on Ray Serve (generation replicas, one device each)."
    g = p.add_argument_group("Ray Serve")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join ('auto': the one `ray start` made on this host); default: "
                   "start a local one")
    g.add_argument("--min-replicas", type=int, default=1,
                   help="fewest generation replicas (0: scale to zero)")
    g.add_argument("--max-replicas", type=int, default=1, help="most generation replicas")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="1: each replica holds a GPU; 0: CPU replicas (default: 1 when the cluster has GPUs)")
    g.add_argument("--models-per-replica", type=int, default=1,
                   help="multiplexed models (model + refiner + LoRA set) a replica keeps loaded")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    return p


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A `host:port` (or `ray://host:port`) cluster address must answer a TCP connect within `timeout`
    seconds: `ray.init` would otherwise retry an unreachable one for minutes. `auto` and `local` are Ray's to
    resolve. Raises SettingsError naming the address."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise SettingsError(f"--ray-address {address}: expected host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise SettingsError(f"--ray-address {address}: nothing answers there ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    ns = build_ray_parser().parse_args(argv)
    try:
        settings = settings_from_args(ns)
        check_bind(settings)
        if settings.devices:
            raise SettingsError("--devices: Ray Serve places one replica per device itself; use "
                                "--max-replicas and --gpus-per-replica instead")
        options = RayOptions(min_replicas=ns.min_replicas, max_replicas=ns.max_replicas,
                             gpus_per_replica=ns.gpus_per_replica, models_per_replica=ns.models_per_replica)
        logging.basicConfig(level=ns.log_level.upper())
        t0 = time.monotonic()
        if ns.ray_address:
            check_ray_address(ns.ray_address)
            try:
                ray.init(address=ns.ray_address)
            except ConnectionError as e:
                raise SettingsError(f"--ray-address {ns.ray_address}: {e}") from None
        else:
            ray.init(num_cpus=ns.num_cpus, include_dashboard=False)
        serve.start(proxy_location="EveryNode", http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/")
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        log.info("sdxl on Ray Serve at http://%s:%d (ready in %.1f s; data folder %s on the head node; "
                 "Ctrl+C to stop)", shown, settings.port, time.monotonic() - t0, settings.data_path)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        serve.delete(APP_NAME)  # the ingress drains (the running jobs get --shutdown-grace)
        if not ns.ray_address:
            serve.shutdown()
            ray.shutdown()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
