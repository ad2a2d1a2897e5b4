"""The server's upscalers: A1111's `/sdapi/v1/upscalers` listing and the extras tab's single-image upscale.

Names a client may send: the pixel upscalers of `sdxl.upscale` ("None", "Lanczos", "Nearest") and the
model upscaler files of the upscalers folder (`ServeSettings.upscalers_dir`, default MODELS_DIR/upscalers),
by file stem or by path inside the folder (with or without the suffix). Names resolve only inside that folder
(`resolve_in_folder`). A loaded model is kept for the next request (one at a time, keyed by path and
modification time).

An upscale runs synchronously in the route's thread on the server's device and dtype, one at a time under
this host's lock; it does not go through the job queue, so it may run beside a generation job.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import NameNotFound, RequestError
from ..files import resolve_in_folder
from ..upscale import pixel_upscaler_names, upscale_image
from ..upscale_models import (
    UPSCALER_SUFFIXES,
    Upscaler,
    list_upscaler_files,
    load_upscaler,
    postprocess_text,
    scale_from_name,
)
from .settings import ServeSettings

MAX_SCALE = 8.0


class UpscalerHost:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._cached: tuple[tuple[Path, int], Upscaler] | None = None

    def files(self) -> list[Path]:
        return list_upscaler_files(self.settings.upscalers_dir)

    def listing(self) -> list[dict[str, Any]]:
        """A1111's shape: {name, model_name, model_path, model_url, scale}; the resamplers first."""
        out: list[dict[str, Any]] = [{"name": n, "model_name": None, "model_path": None, "model_url": None,
                                      "scale": 4} for n in pixel_upscaler_names()]
        root = self.settings.upscalers_dir or Path()
        for rel in self.files():
            out.append({"name": rel.stem, "model_name": rel.stem, "model_path": str(root / rel),
                        "model_url": None, "scale": scale_from_name(rel.stem)})
        return out

    def resolve(self, name: str, field: str) -> Path:
        """A model upscaler's name -> its file. Raises BadName / NameNotFound / RequestError."""
        for rel in self.files():  # a file stem, as the listing names it
            if rel.stem == name or rel.with_suffix("").as_posix() == name:
                return resolve_in_folder(self.settings.upscalers_dir, rel.as_posix(), field, files_only=True)
        try:
            path = resolve_in_folder(self.settings.upscalers_dir, name, field, UPSCALER_SUFFIXES,
                                     files_only=True)
        except NameNotFound:
            known = ", ".join([*pixel_upscaler_names(), *(r.stem for r in self.files())])
            raise NameNotFound(f"{field} {name!r}: no such upscaler (known: {known})") from None
        if path.suffix.lower() not in UPSCALER_SUFFIXES:
            raise RequestError(f"{field} {name!r}: not an upscaler file")
        return path

    def _model(self, path: Path) -> Upscaler:
        key = (path, path.stat().st_mtime_ns)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._cached = None  # the previous model's memory goes before the next one loads
        device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype_name = self.settings.dtype
        if dtype_name == "auto":
            dtype_name = "fp16" if device.startswith("cuda") else "fp32"
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        up = load_upscaler(path, device, dtype, name=path.stem)
        self._cached = (key, up)
        return up

    def upscale(self, image: Image.Image, name: str, scale: float, field: str = "upscaler_1",
                max_pixels: int | None = None) -> tuple[Image.Image, str]:
        """`image` upscaled by `scale` with the upscaler `name` -> (image, A1111's extras infotext).
        Raises RequestError for a bad scale, a result over `max_pixels`, or a file that is not an upscaler."""
        if not 0 < scale <= MAX_SCALE:
            raise RequestError(f"upscaling_resize: {scale} is not in (0, {MAX_SCALE:g}]")
        w, h = image.size
        target = (max(1, int(w * scale)), max(1, int(h * scale)))
        if max_pixels is not None and target[0] * target[1] > max_pixels:
            raise RequestError(f"upscaling_resize: {target[0]}x{target[1]} is more pixels than the server "
                               f"makes ({max_pixels})")
        if name in pixel_upscaler_names():
            return upscale_image(image, name, scale), postprocess_text(name, scale)
        path = self.resolve(name, field)
        with self._lock:
            try:
                up = self._model(path)
            except ValueError as e:  # CheckpointError: one line naming the file
                raise RequestError(f"{field} {name!r}: {e}") from None
            return up.upscale(image, scale), postprocess_text(up.name, scale)
