"""The models the server runs: which checkpoints exist, what kind each is, loading and caching them.

The default model is the operator's `--model` (any path; "default" = the shipped miniature) or the shipped
miniature. A request's `model` and `refiner` are names that resolve only inside `models_dir` (a refiner may
also be "default": the shipped refiner). One base model and one refiner stay loaded; asking for another
replaces it, so memory holds at most two models. Listings read each checkpoint's kind (base, refiner,
inpaint) from its header, cached per file and modification time, so they stay cheap.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..assets import DEFAULT_NAME, default_model_path
from ..errors import CheckpointError, NameNotFound
from ..files import resolve_in_folder
from ..pipeline import SDXL
from ..weights import detect
from ..weights.checkpoint import read_checkpoint
from ..weights.io import open_tensors
from .control_files import control_dirs
from .settings import ServeSettings

log = logging.getLogger(__name__)

_DIFFUSERS_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint a client may name. `name` is what requests send (a path relative to models_dir, or
    the file name of an operator's default model outside it); `kind` is the checkpoint's ModelConfig.kind
    ("base", "refiner", "inpaint"), or "unknown" when its header cannot be read."""

    name: str
    path: Path
    kind: str
    is_default: bool = False


def header_config(path: Path):
    """A checkpoint's `ModelConfig` from its header alone (tensor names and shapes, metadata): no weights
    are read. Diffusers folders are read through their config files."""
    path = Path(path)
    if path.is_dir():
        return read_checkpoint(path).config
    tensors = open_tensors(path)
    return detect.detect(tensors, dict(getattr(tensors, "metadata", {}) or {}), name=str(path))


class ModelHost:
    """Loads and caches the models jobs ask for. Loading happens on the worker thread only; listings and
    name checks are safe from any thread."""

    def __init__(self, settings: ServeSettings, pipeline: Any = None):
        self.settings = settings
        self.default_name: str | None = None  # a name in models_dir chosen through A1111 /options
        self._lock = threading.RLock()
        self._base: tuple[Path | str, Any] | None = None
        self._refiner: tuple[Path, Any] | None = None
        self._configs: dict[tuple[Path, int], Any] = {}
        self._preset = pipeline  # an already-built model (tests, embedding); it is the default
        if pipeline is not None:
            self._prepare(pipeline)
            self._base = ("<preset>", pipeline)

    # ---------------------------------------------------------- names
    def startup_default_path(self) -> Path | None:
        """The operator's default: the preset pipeline's file, `--model`, or the shipped miniature."""
        if self._preset is not None:
            return getattr(self._preset, "path", None)
        if self.settings.model and self.settings.model != DEFAULT_NAME:
            return Path(self.settings.model).expanduser()
        return default_model_path("base")

    def default_path(self) -> Path | None:
        """The file the default model comes from now (None for a preset pipeline without a path)."""
        if self.default_name is not None:
            return self.resolve(self.default_name)
        return self.startup_default_path()

    def set_default(self, name: str | None) -> None:
        """Make `name` (inside models_dir) the default model; the startup default's name (or "default")
        switches back to it. Raises BadName / NameNotFound."""
        if name in (None, "", DEFAULT_NAME) or self._is_startup_default(name):
            self.default_name = None
            return
        self.resolve(name)
        self.default_name = name

    def _is_startup_default(self, name: str) -> bool:
        start = self.startup_default_path()
        if start is None:
            return False
        if name in (start.name, start.stem):
            return True
        entry = self._default_entry()
        return entry is not None and name in (entry.name, _stem(entry.name))

    def resolve(self, name: str) -> Path:
        """A model name (inside models_dir) -> its path. Raises BadName / NameNotFound."""
        return resolve_in_folder(self.settings.models_dir, name, "model", (".safetensors",))

    def resolve_refiner(self, name: str) -> Path:
        """A refiner name: one inside models_dir, or "default" for the shipped refiner."""
        if name == DEFAULT_NAME:
            path = default_model_path("refiner")
            if not path.is_file():
                raise NameNotFound("refiner 'default': the shipped refiner is missing from this install")
            return path
        return self.resolve(name)

    def resolve_lora(self, name: str) -> Path:
        return resolve_in_folder(self.settings.loras_dir, name, "LoRA", (".safetensors",), files_only=True)

    def is_default(self, name: str | None) -> bool:
        if name in (None, "", DEFAULT_NAME):
            return True
        dp = self.default_path()
        if dp is None:
            return False
        if name in (dp.name, dp.stem):
            return True
        return self.default_name is None and self._is_startup_default(name)

    # ---------------------------------------------------------- listings
    def list_models(self) -> list[Path]:
        """Checkpoints in models_dir (files and diffusers folders), relative paths, sorted."""
        root = self.settings.models_dir
        if root is None or not root.is_dir():
            return []
        root = root.resolve()
        skip = [d.resolve() for d in (self.settings.loras_dir, self.settings.upscalers_dir) if d]
        found: list[Path] = []
        for p in sorted(root.rglob("*")):
            real = p.resolve()
            if root not in real.parents or any(real == d or d in real.parents for d in skip):
                continue
            in_diffusers_folder = p.parent.name in _DIFFUSERS_PARTS
            if p.is_file() and p.suffix == ".safetensors" and not in_diffusers_folder:
                found.append(p.relative_to(root))
            elif p.is_dir() and (p / "model_index.json").exists():
                found.append(p.relative_to(root))
        return found

    def list_loras(self) -> list[Path]:
        root = self.settings.loras_dir
        if root is None or not root.is_dir():
            return []
        root = root.resolve()
        return [p.relative_to(root) for p in sorted(root.rglob("*.safetensors"))
                if p.is_file() and root in p.resolve().parents]

    def kind_of(self, path: Path) -> str:
        """"base", "refiner", "inpaint", ... from the checkpoint's header; "unknown" if it cannot be read."""
        try:
            return self.config_of(path).kind
        except (CheckpointError, OSError, ValueError, KeyError) as e:
            log.debug("cannot read %s: %s", path, e)
            return "unknown"

    def _default_entry(self) -> ModelEntry | None:
        """The startup default model as a listing entry: named by its path inside models_dir when it is
        there (so requests can name it), else by its file name."""
        start = self.startup_default_path()
        if start is None or not start.exists():
            return None
        real = start.resolve()
        root = self.settings.models_dir.resolve() if self.settings.models_dir else None
        name = str(real.relative_to(root)) if root is not None and root in real.parents else start.name
        return ModelEntry(name, real, self.kind_of(real), is_default=True)

    def catalog(self) -> list[ModelEntry]:
        """Every checkpoint once: the startup default first, then models_dir's, bases before refiners.
        A default model that lives inside models_dir is listed once, under its name there."""
        entries: list[ModelEntry] = []
        default = self._default_entry()
        if default is not None:
            entries.append(default)
        root = self.settings.models_dir.resolve() if self.settings.models_dir else None
        rest = []
        for rel in self.list_models():
            real = (root / rel).resolve()
            if default is not None and real == default.path:
                continue
            rest.append(ModelEntry(str(rel), real, self.kind_of(real)))
        rest.sort(key=lambda e: (e.kind == "refiner", e.name))
        return entries + rest

    def refiner_names(self) -> list[str]:
        """Names a request's `refiner` may take, for choosers: the refiners in models_dir, and "default"
        (the shipped refiner) when the default model is the shipped base and models_dir does not hold it."""
        names, paths = [], set()
        for e in self.catalog():
            if e.kind == "refiner" and not e.is_default:
                names.append(e.name)
                paths.add(e.path)
        shipped = default_model_path("refiner")
        start = self.startup_default_path()
        shipped_base = start is not None and start.resolve() == default_model_path("base").resolve()
        if shipped_base and shipped.is_file() and shipped.resolve() not in paths:
            names.append(DEFAULT_NAME)
        return names

    # ---------------------------------------------------------- configs
    def default_config(self):
        """The default model's `ModelConfig` without loading its weights (read from the file header)."""
        with self._lock:
            if self._base is not None and (self._preset is not None or self._base[0] == self.default_path()):
                return self._base[1].config
        path = self.default_path()
        if path is None:
            raise NameNotFound("no default model")
        return self.config_of(path)

    def config_of(self, path: Path):
        """A checkpoint's `ModelConfig` from its header (cached per path and modification time)."""
        key = (Path(path), Path(path).stat().st_mtime_ns)
        with self._lock:
            if key not in self._configs:
                self._configs[key] = header_config(Path(path))
            return self._configs[key]

    # ---------------------------------------------------------- loading
    def _load(self, path: Path):
        device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype_name = self.settings.dtype
        if dtype_name == "auto":
            dtype_name = "fp16" if device.startswith("cuda") else "fp32"
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        compile_ = self.settings.compile
        log.info("loading %s on %s (%s)%s", path, device, dtype_name, ", compiled" if compile_ else "")
        return self._prepare(SDXL.load(path, device=device, dtype=dtype, compile=compile_))

    def _prepare(self, pipe):
        """LoRA names (request fields and prompt tags) resolve inside the LoRA folder only; the
        embeddings folder's textual inversions are loaded (a bad file is logged and left out)."""
        pipe.lora_dirs = [self.settings.loras_dir] if self.settings.loras_dir else []
        pipe.allow_lora_paths = False
        pipe.control_dirs = control_dirs(self.settings, existing=False)  # names only, inside these folders
        pipe.upscaler_dirs = [self.settings.upscalers_dir] if self.settings.upscalers_dir else []
        if getattr(pipe, "ip_files", None) is not None:
            pipe.ip_files.dirs = pipe.ip_files.dirs or control_dirs(self.settings, existing=False)
            pipe.ip_files.allow_paths = False
        folder = self.settings.embeddings_dir
        if folder is not None and folder.is_dir():
            try:
                pipe.load_embeddings(folder)
            except (CheckpointError, ValueError, OSError) as e:  # one bad file: load the others one by one
                log.warning("textual inversions in %s: %s", folder, e)
                library = pipe.embeddings
                for file in sorted(folder.rglob("*.safetensors")) if library is not None else []:
                    if file.stem not in library:
                        try:
                            library.load(file)
                        except (CheckpointError, ValueError, OSError) as e2:
                            log.warning("textual inversion %s left out: %s", file, e2)
        return pipe

    def loaded_default(self):
        """The default model if it is loaded (no loading here), else None."""
        with self._lock:
            if self._preset is not None and self.default_name is None:
                return self._preset
            if self._base is not None and self._base[0] == self.default_path():
                return self._base[1]
        return None

    def get(self, name: str | None):
        """The base model for a request's `model` field (None/"default" = the default model)."""
        with self._lock:
            if self.is_default(name):
                if self._preset is not None and self.default_name is None:
                    return self._preset
                path = self.default_path()
            else:
                path = self.resolve(name)
            if self._base is not None and self._base[0] == path:
                return self._base[1]
            self._base = None  # free the old one before loading the new one
            pipe = self._load(path)
            self._base = (path, pipe)
            return pipe

    def refiner(self, name: str):
        with self._lock:
            path = self.resolve_refiner(name)
            if self._refiner is not None and self._refiner[0] == path:
                return self._refiner[1]
            self._refiner = None
            pipe = self._load(path)
            self._refiner = (path, pipe)
            return pipe


def _stem(name: str) -> str:
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name
