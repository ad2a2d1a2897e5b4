"""Server settings, where the server keeps its files, and the rules for names that come from requests.

Everything the operator decides (address, API key, folders, limits, queue size, time-outs) is one
`ServeSettings` value, built by the CLI (`sdxl serve ...`) or by tests. Two safety rules live here because
every route depends on them:

- `check_bind`: the server listens on the loopback interface unless an API key is set. Anyone who can reach
  the port can run jobs on the GPU and read every generated image, so an open address needs a key.
- `resolve_name` (`sdxl.files.resolve_in_folder`): a model, LoRA or image name sent by a client is a
  *name inside a configured folder*, never a path. Absolute paths, `..` components and symlinks that lead
  out of the folder are refused, so a request cannot make the server read (or reveal the existence of)
  files elsewhere on the machine.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadName, NameNotFound  # noqa: F401 - re-exported for the routes
from ..files import resolve_in_folder as resolve_name  # noqa: F401 - the name rule, re-exported
from ..request import Limits

PREVIEW_MODES = ("auto", "approx", "vae", "off")


class SettingsError(ValueError):
    """A setting the server cannot start with; the message says which and what to do."""


def default_data_dir() -> Path:
    """The per-user data folder: job history (SQLite), generated images, uploaded init images.

    Linux/BSD: `$XDG_DATA_HOME/sdxl` or `~/.local/share/sdxl`; macOS: `~/Library/Application Support/sdxl`;
    Windows: `%LOCALAPPDATA%\\sdxl`. These are the platforms' usual places for application data.
    """
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "sdxl"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "sdxl"
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "sdxl"


@dataclass
class ServeSettings:
    """What `sdxl serve` is started with. Every field has a safe default.

    host/port: where to listen. Only loopback addresses are allowed without `api_key`.
    model: the default checkpoint (a path chosen by the operator, so it may live anywhere); None = the
        shipped miniature model. Requests may name other models, but only files inside `models_dir`.
    models_dir: folder of checkpoints (`*.safetensors` files and diffusers folders) that requests may name.
    loras_dir: folder of LoRA files; default `<models_dir>/loras`.
    embeddings_dir: folder of textual-inversion embeddings (safetensors with `clip_l` and `clip_g`), loaded
        into every model; prompts use them by file stem. Default `<models_dir>/embeddings`.
    upscalers_dir: folder of model upscaler files (ESRGAN and kin, `.safetensors` / `.pth` / `.pt` state
        dicts) for A1111's upscaler routes; default `<models_dir>/upscalers`.
    data_dir: job database and images; default `default_data_dir()`. One server at a time: it holds the
        folder's lock (`datalock.py`) while it runs, and a second one on the same folder refuses to start.
    api_key: when set, every route except the static web-UI files needs it (see `app.py`).
    device/dtype: where and how models run; None/"auto" = CUDA with fp16 when available, else CPU fp32.
    limits: per-request limits (pixels, steps, batch, prompt length), checked before a job is queued.
    max_images_per_job: batch x n_iter for A1111 requests.
    max_body_bytes: the largest request body accepted (base64 init images make bodies big).
    queue_size: jobs waiting (not counting the running one); a full queue answers 429.
    job_timeout_s: a job running longer is stopped between two sampler steps and fails.
    shutdown_grace_s: on shutdown (SIGTERM, SIGINT), how long the running job may take to finish before
        it is stopped at its next step and put back in the queue for the next start. Meanwhile new
        generations are answered 503 with Retry-After, and no queued job is started.
    max_attempts: a job that was running when the server died this many times is failed, not retried
        (protects against a job that crashes the process on every start).
    preview: "auto" (SDXL's linear latent->RGB map for models with SDXL's VAE, else a small decode with the
        model's own VAE), "approx" (always the linear map, free), "vae" (a full decode per preview; exact
        but costs a VAE pass), or "off". See `previews.py`.
    preview_every: compute a preview every N sampler steps.
    allowed_origins: browser origins (scheme://host:port) other than the server itself that may call the API
        (CORS). Cross-origin requests from anywhere else are refused.
    allowed_hosts: without an API key the server answers only requests whose Host header is a loopback
        name or address (this defeats DNS rebinding: a web page whose domain is re-pointed at 127.0.0.1);
        list other names here (e.g. a reverse proxy's). Ignored when an API key is set.
    threads: torch's intra-op CPU threads (None: torch's default); set by `serve()` for the process, and
        in each worker process with `devices` (there None means 1 per CPU worker, torch's default on GPUs).
    devices: one worker process per entry ("cuda:0", "cpu", ...; repeats allowed), all on the one job
        queue (`workers.py`); empty: jobs run in the server's own process on `device` (the default).
    compile: load models with torch.compile (`SDXL.load(..., compile=True)`).
    warmup: load the default model and run one small generation at start, before the first job (None:
        when `compile` is on, since compiling is what makes a first request slow).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    model: str | None = None
    models_dir: Path | None = None
    loras_dir: Path | None = None
    embeddings_dir: Path | None = None
    upscalers_dir: Path | None = None
    data_dir: Path | None = None
    api_key: str | None = None
    device: str | None = None
    dtype: str = "auto"
    limits: Limits = field(default_factory=Limits)
    max_images_per_job: int = 16
    max_body_bytes: int = 32 * 2**20
    queue_size: int = 64
    job_timeout_s: float = 900.0
    shutdown_grace_s: float = 30.0
    max_attempts: int = 3
    preview: str = "auto"
    preview_every: int = 1
    allowed_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    threads: int | None = None
    compile: bool = False
    warmup: bool | None = None
    devices: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("models_dir", "loras_dir", "embeddings_dir", "upscalers_dir", "data_dir"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                setattr(self, name, Path(v))
        if self.loras_dir is None and self.models_dir is not None:
            self.loras_dir = self.models_dir / "loras"
        if self.embeddings_dir is None and self.models_dir is not None:
            self.embeddings_dir = self.models_dir / "embeddings"
        if self.upscalers_dir is None and self.models_dir is not None:
            self.upscalers_dir = self.models_dir / "upscalers"
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None
        if self.preview not in PREVIEW_MODES:
            raise SettingsError(f"preview: {self.preview!r} is not one of {', '.join(PREVIEW_MODES)}")
        if self.threads is not None and self.threads < 1:
            raise SettingsError(f"threads: {self.threads} must be at least 1")
        self.devices = parse_devices(self.devices)
        if self.warmup is None:
            self.warmup = self.compile
        if self.queue_size < 1:
            raise SettingsError("queue_size must be at least 1")
        if self.preview_every < 1:
            raise SettingsError("preview_every must be at least 1")
        if not 0 <= self.shutdown_grace_s < float("inf"):  # also refuses NaN
            raise SettingsError(f"shutdown grace: {self.shutdown_grace_s} must be a number of seconds, 0 or "
                                "more")

    @property
    def data_path(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_data_dir()


def parse_devices(text: str | list[str] | None) -> list[str]:
    """`--devices cuda:0,cuda:1` -> ["cuda:0", "cuda:1"]. Each entry is cpu, cuda, cuda:N or mps;
    repeats are allowed (`cpu,cpu`: two CPU workers). Raises SettingsError naming the bad entry."""
    if not text:
        return []
    items = list(text) if not isinstance(text, str) else text.split(",")
    out = []
    for raw in items:
        d = str(raw).strip().lower()
        kind, _, index = d.partition(":")
        bad_index = bool(index) and (kind != "cuda" or not index.isdigit())
        if kind not in ("cpu", "cuda", "mps") or bad_index or d.endswith(":"):
            shown = repr(raw) if d else "an empty entry"
            raise SettingsError(f"--devices: {shown} is not a device (cpu, cuda, cuda:N or mps; e.g. "
                                "cuda:0,cuda:1 or cpu,cpu)")
        out.append(d)
    return out


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses (127.0.0.0/8, ::1). Any other name is treated as
    reachable from the network, including 0.0.0.0 and :: (all interfaces)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(settings: ServeSettings) -> None:
    """Refuse to listen on a non-loopback address without an API key."""
    if not is_loopback(settings.host) and not settings.api_key:
        raise SettingsError(
            f"refusing to listen on {settings.host}: that address can be reached from other machines, so an "
            "API key is required. Pass --api-key KEY (clients then send 'Authorization: Bearer KEY' or "
            "'X-API-Key: KEY'), or listen on 127.0.0.1."
        )
