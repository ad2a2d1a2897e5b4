"""`python -m sdxl.serve [options]`: run the HTTP server (the same as `sdxl serve`).

    python -m sdxl.serve --model sd_xl_base_1.0.safetensors --models-dir ~/models --port 7860
    SDXL_API_KEY=secret python -m sdxl.serve --host 0.0.0.0     # other addresses need an API key

The API key can come from the environment variable SDXL_API_KEY, which keeps it out of `ps` listings.
A setting the server cannot start with (an open address without a key, a port in use, a data folder that
another server holds) is one line on stderr and exit code 2, before any job is touched.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ..request import Limits
from .settings import PREVIEW_MODES, ServeSettings, SettingsError

# what the serve extra installs (pyproject: [project.optional-dependencies] serve)
SERVE_PACKAGES = ("fastapi", "uvicorn", "pydantic", "starlette", "websockets")


def build_parser() -> argparse.ArgumentParser:
    d = ServeSettings()
    lim = Limits()
    p = argparse.ArgumentParser(prog="sdxl serve", description="Serve the HTTP API (A1111-compatible subset "
                                "and native job API) and the web UI.")
    p.add_argument("--host", default=d.host, help="address to listen on (default 127.0.0.1; any other "
                   "address needs --api-key)")
    p.add_argument("--port", type=int, default=d.port, help="port (default 7860)")
    p.add_argument("--model", help="default checkpoint file or folder (default: the shipped model)")
    p.add_argument("--models-dir", type=Path, help="folder of checkpoints that requests may name")
    p.add_argument("--loras-dir", type=Path, help="folder of LoRA files (default: MODELS_DIR/loras)")
    p.add_argument("--embeddings-dir", type=Path,
                   help="folder of textual-inversion embeddings (default: MODELS_DIR/embeddings)")
    p.add_argument("--upscalers-dir", type=Path,
                   help="folder of model upscaler files, ESRGAN and kin (default: MODELS_DIR/upscalers)")
    p.add_argument("--data-dir", type=Path, help="job database and images (default: the user data folder, "
                   "e.g. ~/.local/share/sdxl); one server per folder: a second one on it exits with an error")
    p.add_argument("--api-key", default=os.environ.get("SDXL_API_KEY"),
                   help="require this key on every request (or set SDXL_API_KEY)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--devices", metavar="LIST",
                   help="one worker process per device on one job queue, e.g. cuda:0,cuda:1 (cpu,cpu: two "
                   "CPU workers, 1 torch thread each unless --threads); default: jobs run in this process")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "fp16", "bf16"],
                   help="model precision (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the models (slow first load; warms up at start so requests are fast)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="load the default model and run one small generation at start "
                   "(default: with --compile)")
    p.add_argument("--max-pixels", type=int, default=lim.max_pixels, help="largest width*height")
    p.add_argument("--max-steps", type=int, default=lim.max_steps, help="most sampler steps")
    p.add_argument("--max-batch", type=int, default=lim.max_batch, help="most images per batch")
    p.add_argument("--max-prompt-chars", type=int, default=lim.max_prompt_chars, help="longest prompt")
    p.add_argument("--max-images-per-job", type=int, default=d.max_images_per_job,
                   help="most images per request (batch x n_iter)")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="largest request body")
    p.add_argument("--queue-size", type=int, default=d.queue_size, help="jobs waiting before 429")
    p.add_argument("--job-timeout", type=float, default=d.job_timeout_s, help="seconds a job may run")
    p.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace_s,
                   help="on SIGTERM/SIGINT, seconds the running job may take to finish before it is requeued "
                   "(meanwhile new generations get 503; queued jobs wait for the next start)")
    p.add_argument("--preview", default=d.preview, choices=list(PREVIEW_MODES),
                   help="previews: auto (free linear map for SDXL's VAE, else a small decode with the "
                   "model's VAE), approx (linear map), vae (full decode, exact), off")
    p.add_argument("--preview-every", type=int, default=d.preview_every, help="preview every N steps")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (http://host:port) allowed to call the API (repeatable)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host name other than localhost accepted without an API key (repeatable)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def settings_from_args(ns: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        host=ns.host, port=ns.port, model=ns.model, models_dir=ns.models_dir, loras_dir=ns.loras_dir,
        embeddings_dir=ns.embeddings_dir, data_dir=ns.data_dir, api_key=ns.api_key, device=ns.device,
        dtype=ns.dtype, upscalers_dir=ns.upscalers_dir,
        limits=Limits(max_pixels=ns.max_pixels, max_steps=ns.max_steps, max_batch=ns.max_batch,
                      max_prompt_chars=ns.max_prompt_chars),
        max_images_per_job=ns.max_images_per_job, max_body_bytes=int(ns.max_body_mb * 2**20),
        queue_size=ns.queue_size, job_timeout_s=ns.job_timeout, shutdown_grace_s=ns.shutdown_grace,
        preview=ns.preview, preview_every=ns.preview_every, allowed_origins=list(ns.allow_origin),
        allowed_hosts=list(ns.allow_host), threads=ns.threads, compile=ns.compile, warmup=ns.warmup,
        devices=ns.devices,
    )


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(ns)
        try:
            from .app import serve  # lazy: fastapi and uvicorn come with the optional serve extra
        except ModuleNotFoundError as e:
            missing = (e.name or "").partition(".")[0]
            if missing not in SERVE_PACKAGES:
                raise
            print(f"error: sdxl serve needs the '{missing}' package, which is not installed; install the "
                  "serve extra: pip install 'sdxl[serve]'", file=sys.stderr)
            return 1
        # Ctrl+C ends in KeyboardInterrupt (exit 130) even when the server was started with SIGINT ignored
        # (`sdxl serve &` from a script): uvicorn restores the handler it found and re-raises the signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        serve(settings, log_level=ns.log_level)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C: the server has drained and stopped; uvicorn re-raises the signal
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
