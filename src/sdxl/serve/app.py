"""The HTTP server: native job API, AUTOMATIC1111-compatible routes, websocket progress and the web UI.

    from sdxl.serve.app import create_app, serve
    from sdxl.serve.settings import ServeSettings
    serve(ServeSettings(port=7860, model="sd_xl_base_1.0.safetensors"))   # what `sdxl serve` runs

Routes (all need the API key when one is set, except the web UI's static files):

    GET  /                      the web UI (static/index.html, app.js, style.css)
    GET  /health                liveness: {"status": "ok", "queued": n, "running": id or null}
    GET  /workers               per-worker status: device, pid, alive, loaded models, jobs done, queue
    GET  /metrics               Prometheus text format: jobs, latency, steps/s, errors, queue, busy workers
    GET  /info                  what the UI needs: model, samplers, schedules, size presets, LoRAs, limits
    POST /jobs                  body = GenerationRequest JSON -> {"id": ...}; 429 when the queue is full
    GET  /jobs                  history, newest first (?limit=&offset=&status=)
    GET  /jobs/{id}             status, progress, images (URLs, seeds, infotexts), error
    POST /jobs/{id}/cancel      cancel (DELETE /jobs/{id} does the same)
    GET  /images/{name}         a result PNG (with its metadata)
    WS   /ws/jobs/{id}          JSON events: status, progress (with a JPEG preview), finished
    /sdapi/v1/...               the A1111 subset, see a1111.py (shared code: service.py)
    /controlnet/...             sd-webui-controlnet's routes (model_list, module_list, detect, version)
    GET  /openapi.json, /docs   the schema (FastAPI)

Errors are JSON `{"detail": "..."}` with a message that names the field: 400 bad value, 401 no or wrong
API key, 403 cross-origin, 404 unknown id or name, 409 wrong state, 413 body too large, 422 malformed
JSON/type errors, 429 queue full, 503 shutting down.

Security, in `Guard` (one ASGI middleware in front of everything):
  - Without an API key (loopback only), requests must be addressed to a loopback Host (DNS rebinding).
  - API key: `Authorization: Bearer KEY`, `X-API-Key: KEY`, HTTP basic auth with the key as password and
    any user name (what A1111 clients send for A1111's `--api-auth`), or the `sdxl_api_key` cookie
    (SameSite=Strict; the web UI sets it so that <img> tags and the websocket carry the key). Compared in
    constant time.
  - Cross-origin requests (a foreign `Origin` header) are refused unless listed in `allowed_origins`. This
    stops any web page the user visits from driving a server on localhost (for example a form POST to
    /sdapi/v1/interrupt, which needs no body) or reading progress over a websocket.
  - Request bodies above `max_body_bytes` get 413 before any parsing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import errno
import hmac
import json
import logging
import math
import socket
import threading
import typing
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

import torch
import uvicorn
from fastapi import FastAPI, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ConfigDict, Field, Strict, create_model
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware

from ..data.images import ImageError
from ..errors import BadName, NameNotFound, RequestError
from ..prompts import PromptError
from ..request import GenerationRequest
from ..version import __version__
from .a1111 import make_router
from .a1111_controlnet import make_controlnet_router
from .datalock import DataDirLock
from .executor import Executor
from .jobs import (
    JobConflict,
    JobManager,
    JobNotFound,
    QueueFull,
    ShuttingDown,
    check_idempotency_key,
    request_digest,
)
from .metrics import METRICS_CONTENT_TYPE
from .modelhost import ModelHost
from .service import Service
from .settings import ServeSettings, SettingsError, check_bind, is_loopback
from .store import TERMINAL
from .workers import WorkerPool, check_devices

log = logging.getLogger(__name__)

STATIC_DIR = Path(str(resources.files("sdxl.serve") / "static"))
API_KEY_COOKIE = "sdxl_api_key"
MAX_SQLITE_INT = 2**63 - 1  # a larger ?offset= made SQLite raise OverflowError: a 500 (found by schemathesis)
RETRY_AFTER_S = 10  # Retry-After on 503 while shutting down: about what a service manager needs to restart
IDEMPOTENCY_HELP = ("a key (1 to 128 letters, digits, . _ : ~ + / = -) that makes retries safe: a request "
                    "sent again with the same key returns the first job instead of making another one, also "
                    "after a restart; the same key with a different request is 409")


# ------------------------------------------------------------------------------------------------ guard
class Guard:
    """ASGI middleware: cross-origin check, API key, body size limit (see the module docstring)."""

    OPEN_PATHS = ("/", "/index.html")
    OPEN_PREFIXES = ("/static/",)

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.key = settings.api_key
        self.allowed_hosts = {h.lower() for h in settings.allowed_hosts}
        self.max_body = settings.max_body_bytes
        self.allowed_origins = {o.rstrip("/").lower() for o in settings.allowed_origins}

    def _is_open(self, path: str) -> bool:
        return path in self.OPEN_PATHS or path.startswith(self.OPEN_PREFIXES)

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        o = origin.rstrip("/").lower()
        if o in self.allowed_origins:
            return True
        netloc = urlsplit(o).netloc
        return bool(host) and netloc == host.lower()

    def _host_ok(self, host: str | None) -> bool:
        """Without an API key, only requests addressed to a loopback name (or an allowed host) are served."""
        if self.key:
            return True
        if not host:
            return False
        name = urlsplit("//" + host).hostname or ""
        return is_loopback(name) or name.lower() in self.allowed_hosts

    def _authorized(self, headers: Headers) -> bool:
        assert self.key is not None
        candidates = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            candidates.append(auth[7:].strip())
        elif auth.lower().startswith("basic "):  # A1111 clients' --api-auth: any user, the key as password
            try:
                user_pass = base64.b64decode(auth[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                user_pass = ""
            candidates.append(user_pass.partition(":")[2])
        if "x-api-key" in headers:
            candidates.append(headers["x-api-key"].strip())
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == API_KEY_COOKIE:
                candidates.append(unquote(value))  # the UI stores it with encodeURIComponent
        expected = self.key.encode()
        return any(hmac.compare_digest(c.encode(), expected) for c in candidates)

    async def _refuse(self, scope, receive, send, status: int, detail: str) -> None:
        if scope["type"] == "websocket":
            # closing before accept makes the server answer the handshake with 403
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
            return
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if not self._host_ok(headers.get("host")):
            return await self._refuse(
                scope, receive, send, 403,
                f"Host {headers.get('host')!r} is not a loopback address; without an API key this server "
                "only answers requests addressed to localhost (see --allow-host)",
            )
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, headers.get("host")):
            return await self._refuse(scope, receive, send, 403,
                                      f"cross-origin request from {origin} refused (see --allow-origin)")
        if self.key and not self._is_open(scope["path"]) and not self._authorized(headers):
            return await self._refuse(
                scope, receive, send, 401,
                "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            )
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await self._refuse(scope, receive, send, 413,
                                          f"request body larger than {self.max_body} bytes")
            # read the body here, counting, so a chunked upload cannot exceed the limit either
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    return await self._refuse(scope, receive, send, 413,
                                              f"request body larger than {self.max_body} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            problem = json_problem(body, headers.get("content-type", ""))
            if problem is not None:
                return await self._refuse(scope, receive, send, 400, problem)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


def json_problem(body: bytes, content_type: str) -> str | None:
    """What makes a JSON body unusable before any route sees it, or None: numbers JSON does not have (NaN,
    Infinity: Python's parser accepts them, but they cannot be stored or sent back as JSON) and text that
    is not Unicode (a lone surrogate escape such as \\ud800 cannot be encoded as UTF-8 for a PNG, the job
    table or a response). The message names the field's path. Bodies that are not JSON are left to the
    route (422)."""
    if not body or (content_type and "json" not in content_type.lower()):
        return None
    try:
        value = json.loads(body)
    except RecursionError:
        return "request body: JSON nested too deeply"
    except ValueError:  # not JSON (or not UTF-8): the route answers 422
        return None
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return f"{path or 'request body'}: {v} is not a number JSON allows (RFC 8259)"
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return (f"{path or 'request body'}: not valid Unicode text (it holds a lone surrogate "
                        "escape such as \\ud800)")
        elif isinstance(v, dict):
            for k, item in v.items():
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return f"{path or 'request body'}: a key that is not valid Unicode text"
                stack.append((f"{path}.{k}" if path else k, item))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
    return None


# ------------------------------------------------------------------------------------------------ requests
def _request_body_model():
    """A pydantic model mirroring `GenerationRequest` field for field, so the OpenAPI schema documents the
    native job body and unknown fields are refused (a typo must not be silently ignored). Scalar fields are
    strict (no bool for a number, no "5" for 5): the request's own `validate` checks them again, but
    pydantic's lax mode would have converted them before it could see them."""
    hints = typing.get_type_hints(GenerationRequest)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(GenerationRequest):
        if f.name == "region_masks":  # images, never server paths
            desc = ("composable prompts (`a AND b`): one mask per sub-prompt, each base64 PNG/JPEG or "
                    "'output:NAME'; white = where that sub-prompt applies")
            fields[f.name] = (list[Annotated[str, Strict()]], Field(default_factory=list, description=desc))
            continue
        if f.name in ("controls", "ip_adapters"):  # units whose images are base64, never server paths
            desc = (f.metadata.get("help") or "") + (
                " Each unit as the Python API's ControlUnit / IPAdapterUnit; images base64 PNG/JPEG or "
                "'output:NAME'; models are names in the control models folder.")
            fields[f.name] = (list[dict[str, Any]], Field(default_factory=list, description=desc))
            continue
        tp = hints[f.name]
        if f.name in ("init_image", "mask_image"):
            tp = str | None
            desc = ("base64 PNG/JPEG (a data: URL is fine), or 'output:NAME' for an image this server made"
                    + ("; white = repaint" if f.name == "mask_image" else ""))
            fields[f.name] = (Annotated[tp, Strict()], Field(default=None, description=desc))
            continue
        if f.name != "loras":
            tp = Annotated[tp, Strict()]
        if f.default is not dataclasses.MISSING:
            fields[f.name] = (tp, Field(default=f.default, description=f.metadata.get("help") or None))
        else:
            fields[f.name] = (tp, Field(default_factory=f.default_factory,
                                        description=f.metadata.get("help") or None))
    # not a generation setting, so not in GenerationRequest: the route takes it out before building one
    fields["idempotency_key"] = (str | None, Field(default=None, description=IDEMPOTENCY_HELP))
    return create_model("GenerationRequestBody",
                        __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)


GenerationRequestBody = _request_body_model()


# ------------------------------------------------------------------------------------------------ the app
def _error_handlers(app: FastAPI) -> None:
    def handler(status: int):
        async def h(request: Request, exc: Exception):
            return JSONResponse({"detail": str(exc)}, status_code=status)

        return h

    async def shutting_down(request: Request, exc: Exception):
        """503 with Retry-After; `job`: the id of the awaited job that did not finish (it runs after the
        restart)."""
        body: dict[str, Any] = {"detail": str(exc)}
        if getattr(exc, "job_id", None) is not None:
            body["job"] = exc.job_id
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    for exc_type, status in ((RequestError, 400), (BadName, 400), (NameNotFound, 404), (JobNotFound, 404),
                             (JobConflict, 409), (QueueFull, 429)):
        app.add_exception_handler(exc_type, handler(status))
    app.add_exception_handler(ShuttingDown, shutting_down)
    # PIL / load_image errors on 'output:NAME' images and prompt errors are ValueErrors with a message
    app.add_exception_handler(ImageError, handler(400))
    app.add_exception_handler(PromptError, handler(400))


def create_app(settings: ServeSettings | None = None, pipeline: Any = None,
               data_lock: DataDirLock | None = None, executor: Executor | None = None) -> FastAPI:
    """Build the FastAPI app. `pipeline`: an already-built `SDXL` used as the default model (tests,
    notebooks); without it the default model is loaded from `settings.model` on the first job.
    `data_lock`: the data folder's lock, already held (`serve`); without it the app's startup takes it
    (and fails with DataDirInUse when another server holds it). `executor`: what runs the jobs (see
    `executor.Executor`); default: one worker process per entry of `settings.devices` (`workers.WorkerPool`),
    or, without devices, this process."""
    settings = settings or ServeSettings()
    if executor is None and settings.devices:
        if pipeline is not None:
            raise SettingsError("devices: worker processes load their models from files; a preset pipeline "
                                "runs in this process only")
        executor = WorkerPool(settings, settings.devices)
    models = ModelHost(settings, pipeline)
    manager = JobManager(settings, models, data_lock=data_lock, executor=executor)
    service = Service(settings, models, manager)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        try:
            yield
        finally:
            await asyncio.to_thread(manager.shutdown)

    app = FastAPI(title="sdxl", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion XL: native job API, an AUTOMATIC1111-compatible subset "
                              "(/sdapi/v1) and a web UI at /.")
    app.state.service = service
    app.state.manager = manager
    app.state.settings = settings
    _error_handlers(app)

    # ---------------------------------------------------------- native API
    @app.get("/health", tags=["native"])
    def health():
        """Liveness: the worker's state and the queue length. While the server shuts down: 503 with
        `"status": "stopping"` and Retry-After (it takes no new jobs)."""
        cur = manager.current()
        d = {"status": "ok", "queued": manager.queued_count(), "running": cur.id if cur else None}
        if manager.stopping:
            return JSONResponse({**d, "status": "stopping"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return d

    @app.get("/workers", tags=["native"])
    def workers() -> dict[str, Any]:
        """Per-worker status: device, pid, alive, loaded model / refiner / LoRAs, jobs done and failed, the
        running job; and the queue length. One entry for the one-process server."""
        return {"queued": manager.queued_count(), "workers": manager.workers()}

    @app.get("/metrics", tags=["native"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text format (0.0.4): jobs, latency, steps/s, errors, queue length, busy workers."""
        return PlainTextResponse(manager.metrics.render(manager), media_type=METRICS_CONTENT_TYPE)

    @app.get("/info", tags=["native"])
    def info() -> dict[str, Any]:
        """Model, samplers, schedules, size presets, LoRAs and limits (what the web UI shows)."""
        return service.info()

    @app.post("/jobs", tags=["native"], status_code=202)
    def submit_job(body: GenerationRequestBody,  # type: ignore[valid-type]
                   idempotency_key: str | None = Header(None, alias="Idempotency-Key",
                                                        description=IDEMPOTENCY_HELP)) -> dict[str, Any]:
        """Queue a generation. Runs in submission order; answers 429 when the queue is full, 503 while the
        server shuts down. With an idempotency key (the `Idempotency-Key` header or the `idempotency_key`
        field), a request sent again returns the first job's id."""
        d = body.model_dump()
        key = check_idempotency_key(idempotency_key, "Idempotency-Key header")
        field_key = check_idempotency_key(d.pop("idempotency_key"), "idempotency_key")
        if key is not None and field_key is not None and key != field_key:
            raise RequestError("idempotency_key: differs from the Idempotency-Key header; send one of them")
        key = key or field_key
        idempotency = (key, request_digest("POST /jobs", d)) if key is not None else None
        job = service.submit(service.request_from_body(d), idempotency=idempotency)
        return {"id": job.id, "status": job.status, "url": f"/jobs/{job.id}", "ws": f"/ws/jobs/{job.id}"}

    @app.get("/jobs", tags=["native"])
    def list_jobs(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_SQLITE_INT),
                  status: str | None = Query(None, pattern="^(queued|running|done|failed|cancelled)$")):
        """Job history, newest first."""
        return {"jobs": [manager.public(j) for j in manager.list(limit, offset, status)]}

    @app.get("/jobs/{job_id}", tags=["native"])
    def get_job(job_id: str) -> dict[str, Any]:
        return manager.public(manager.get(job_id))

    @app.post("/jobs/{job_id}/cancel", tags=["native"])
    def cancel_job(job_id: str) -> dict[str, Any]:
        """A queued job is cancelled at once; a running one stops after its current step."""
        return manager.public(manager.cancel(job_id))

    @app.delete("/jobs/{job_id}", tags=["native"])
    def delete_job(job_id: str) -> dict[str, Any]:
        """Same as POST /jobs/{id}/cancel."""
        return manager.public(manager.cancel(job_id))

    @app.get("/images/{name}", tags=["native"], response_class=FileResponse)
    def get_image(name: str):
        """A result image (PNG with its generation metadata)."""
        return FileResponse(manager.output_path(name), media_type="image/png")

    @app.websocket("/ws/jobs/{job_id}")
    async def job_events(ws: WebSocket, job_id: str):
        """Events as JSON: {"type": "status", "job"}, {"type": "progress", "step", "total", "progress",
        "preview": "data:image/jpeg;base64,..."}, and finally {"type": "finished", "job"}."""
        await ws.accept()
        q = manager.subscribe(job_id, asyncio.get_running_loop())
        try:
            try:
                job = manager.get(job_id)
            except JobNotFound as e:
                await ws.send_json({"type": "error", "detail": str(e)})
                await ws.close(code=4404)
                return
            await ws.send_json({"type": "status", "job": manager.public(job)})
            if job.status in TERMINAL:
                await ws.send_json({"type": "finished", "job": manager.public(job)})
                await ws.close()
                return
            while True:
                event = await q.get()
                await ws.send_json(event)
                if event["type"] in ("finished", "shutdown"):  # shutdown: the job runs after the restart
                    break
            await ws.close()
        except WebSocketDisconnect:
            pass
        finally:
            manager.unsubscribe(job_id, q)

    # ---------------------------------------------------------- A1111 subset
    app.include_router(make_router(service))
    app.include_router(make_controlnet_router(service))

    # ---------------------------------------------------------- web UI
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")

    # outermost last: CORS (only for explicitly allowed origins) must answer preflights before the guard
    app.add_middleware(Guard, settings=settings)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    return app


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind the listening sockets (every address `host` resolves to, as asyncio would), before the app
    starts: a port in use is a one-line SettingsError here, before the job store is opened."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SettingsError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            try:
                if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # POSIX
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRNOTAVAIL and len(infos) > 1:  # e.g. ::1 for localhost without IPv6
                    continue
                raise
            sockets.append(sock)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise SettingsError(f"cannot listen on {host} port {port}: {e.strerror or e} (see --host, --port)"
                            ) from None
    if not sockets:
        raise SettingsError(f"cannot listen on {host} port {port}: no usable address")
    return sockets


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a shutdown that drains the job queue before it closes the listener.

    uvicorn alone, on SIGTERM, closes the listener (new clients: connection refused), then waits for open
    requests, and only then runs the app's shutdown, so a client awaiting an A1111 generation kept the
    worker going through the queue. Here the first SIGTERM or SIGINT starts `JobManager.drain` at once (in
    a thread, from the next 0.1 s tick of uvicorn's main loop, not inside the signal handler): new
    generations get 503 with Retry-After while the listener stays open, the worker takes no new job, the
    running one gets the grace, and awaiting clients whose job did not finish get 503 naming it. When the
    drain is over, uvicorn's own shutdown runs and the process exits (by the signal, as uvicorn does). A
    second signal ends the grace at once; a third is uvicorn's (SIGINT: force quit)."""

    def __init__(self, config: uvicorn.Config, manager: JobManager):
        super().__init__(config)
        self.manager = manager
        self._signals = 0
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:  # the signal handler: only counts
        self._signals += 1
        if self._signals == 1:
            self._captured_signals.append(sig)  # re-raised when the server has stopped, as uvicorn does
        elif self._signals > 2:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._signals and self._drain is None:
            log.warning("shutting down: no new jobs; the running one gets %g s to finish",
                        self.manager.settings.shutdown_grace_s)
            self.manager.begin_shutdown()
            self._drain = threading.Thread(target=self.manager.drain, name="sdxl-drain", daemon=True)
            self._drain.start()
        if self._signals >= 2:
            self.manager.hurry()
        if self._drain is not None and not self._drain.is_alive():
            self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: ServeSettings, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM (what `sdxl serve` calls). Raises SettingsError for an unsafe
    bind, a port in use, or a data folder another server holds (`DataDirInUse`): all before the job
    store is opened. In that order: the data folder's lock, the port, then the app (which recovers the
    jobs an earlier process left). On SIGTERM/SIGINT see `DrainingServer`: the running job gets
    `shutdown_grace_s` to finish, then is queued again; queued jobs wait for the next start.
    `settings.threads` sets torch's CPU threads for the whole process."""
    check_bind(settings)
    check_devices(settings.devices)
    lock = DataDirLock(settings.data_path).acquire()
    try:
        sockets = bind_sockets(settings.host, settings.port)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        app = create_app(settings, data_lock=lock)
        # timeout_graceful_shutdown: for connections still open after the drain answered every waiter
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                                timeout_graceful_shutdown=RETRY_AFTER_S)
        server = DrainingServer(config, app.state.manager)
        port = sockets[0].getsockname()[1]
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        logging.getLogger("uvicorn.error").info("sdxl serve on http://%s:%d (data folder %s; Ctrl+C to stop)",
                                                shown, port, settings.data_path)
        server.run(sockets=sockets)
    finally:
        lock.release()
