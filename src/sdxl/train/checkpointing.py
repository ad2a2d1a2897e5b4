"""Training state on disk: written so that no crash, signal or full disk can leave a checkpoint that looks
usable but is not, and read back so that a resumed run continues exactly where the saved one was.

Layout of one checkpoint (no pickle anywhere: tensors in safetensors, everything else in JSON):

    <output>/checkpoints/step-00000100/
        model.safetensors       the trained parameters (full weights, or only the LoRA tensors), named as in
                                the training module (`unet.input_blocks.1.0...`), plus any frozen part that
                                has no other source (from-scratch text towers or VAE) under `frozen.`
        ema.safetensors         the EMA weights, same names (only with EMA on)
        optimizer.safetensors   every tensor of the optimizer state, flattened
                                (`optimizer/__dict__/state/unet.out.2.weight/exp_avg`)
        rng.safetensors         RNG states of every process: torch CPU/CUDA, numpy (python's in state.json)
        state.json              written LAST: step, data position, LR-scheduler / grad-scaler state,
                                counters, the optimizer state's structure (tensors replaced by their key), and
                                the size of every file above
    <output>/checkpoints/latest  the name of the newest complete checkpoint

How "never half-written" is kept:
  1. everything is written into a temporary folder `.tmp-step-00000100`, each file fsync'ed;
  2. state.json goes last and lists every file with its size;
  3. the folder is renamed to `step-00000100` (one atomic rename) and the parent folder fsync'ed;
  4. `latest` is replaced atomically (write a temp file, rename);
  5. only then are old checkpoints beyond `keep` deleted.
A crash at any point leaves either a `.tmp-*` folder (ignored and cleaned up) or a complete checkpoint. A
write that fails (a full disk: ENOSPC, a quota: EDQUOT) removes the `.tmp-*` folder at once and raises
`CheckpointWriteError`; the trainer then stops with that message (see docs/RELIABILITY.md).
On resume, `find_checkpoint` tries `latest` first, then every `step-*` folder newest first, and accepts one
only if state.json parses, says it is complete, and every listed file has its recorded size and a valid
safetensors header. A truncated or missing file makes it fall back to the previous checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write_bytes, fsync_dir
from ..weights.io import CheckpointError, open_tensors, save_safetensors

log = logging.getLogger(__name__)

FORMAT = "sdxl-train-state"
VERSION = 1
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
LATEST = "latest"

# Test hook: "STEP:SECONDS" makes the save of checkpoint STEP sleep SECONDS seconds in the middle of writing
# (after model.safetensors, before state.json and the rename), after touching `<root>/.save-hook-STEP`, so a
# test can SIGKILL the process while a checkpoint is half-written.
SLEEP_HOOK_ENV = "SDXL_TRAIN_SAVE_SLEEP"


# --------------------------------------------------------------------------------------------- flattening
def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A JSON-able copy of `obj` in which every tensor is moved into `tensors` and replaced by its key.

    Handles what optimizer / scheduler / scaler state dicts contain: dicts (any scalar keys), lists, tuples,
    tensors, numbers, strings, None. Dicts with non-string keys and tuples are tagged so `unflatten` restores
    them exactly (Adam's `betas` must come back as a tuple, integer parameter ids as integers).
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten(v, tensors, f"{prefix}/{k}") for k, v in obj.items()}}
        return {"__items__": [[k, flatten(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a training checkpoint")


def unflatten(obj: Any, tensors) -> Any:
    """Inverse of `flatten`; `tensors` maps keys to tensors (tensors are copied out of any memory map)."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]].clone()
        if "__dict__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        raise ValueError(f"unknown tagged object {list(obj)}")
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """This process's random states: python, numpy, torch CPU and (if initialised) every CUDA device."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine %d GPUs: CUDA RNG not restored",
                        len(cuda), torch.cuda.device_count())


# --------------------------------------------------------------------------------------------- saving
@dataclass
class TrainingState:
    """Everything a checkpoint holds, in memory."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    rng: list[dict[str, Any]] = field(default_factory=list)  # one per process, by rank
    scalars: dict[str, Any] = field(default_factory=dict)  # data position, scheduler, scaler, counters, ...
    path: Path | None = None


def _sleep_hook(root: Path, step: int) -> None:
    spec = os.environ.get(SLEEP_HOOK_ENV)
    if not spec:
        return
    at, seconds = spec.split(":")
    if int(at) == step:
        (root / f".save-hook-{step}").write_text(str(os.getpid()))
        time.sleep(float(seconds))


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, quota, I/O error). Nothing of it is left that
    `find_checkpoint` could pick, and older checkpoints are untouched. The message names the folder, the free
    space and the newest complete checkpoint."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def save_checkpoint(root: str | Path, state: TrainingState, keep: int = 2) -> Path:
    """Write `state` as `<root>/step-XXXXXXXX` atomically (see the module docstring); returns its path.

    Called on ONE process (rank 0) with everything already gathered. Old checkpoints beyond `keep` (>= 1) are
    removed only after the new one is complete and `latest` points at it.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(state.step)
    tmp = root / f"{TMP_PREFIX}{step_name(state.step)}"
    try:
        return _write_checkpoint(root, tmp, final, state, keep)
    except OSError as e:  # disk full, quota, I/O error: remove what was half-written, say where and why
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        previous = find_checkpoint(root)
        raise CheckpointWriteError(
            e.errno or errno.EIO,
            f"cannot write checkpoint {final.name} to {root} ({e.strerror or e}; the disk holding it has "
            f"{free}); the unfinished checkpoint was removed and the newest complete one is "
            f"{previous.name if previous else 'none'}: free space, then run again with --resume",
        ) from e


def _write_checkpoint(root: Path, tmp: Path, final: Path, state: TrainingState, keep: int) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    files: dict[str, int] = {}

    def put(name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        save_safetensors(tensors, tmp / name, metadata)
        files[name] = (tmp / name).stat().st_size

    put("model.safetensors", state.model)
    _sleep_hook(root, state.step)
    if state.ema is not None:
        put("ema.safetensors", state.ema)
    optimizer_tree = None
    if state.optimizer is not None:
        opt_tensors: dict[str, torch.Tensor] = {}
        optimizer_tree = flatten(state.optimizer, opt_tensors, "optimizer")
        put("optimizer.safetensors", opt_tensors)
    rng_tensors: dict[str, torch.Tensor] = {}
    rng_tree = flatten(state.rng, rng_tensors, "rng")
    put("rng.safetensors", rng_tensors)

    scalar_tensors: dict[str, torch.Tensor] = {}
    scalars_tree = flatten(state.scalars, scalar_tensors, "scalars")
    if scalar_tensors:  # e.g. a tensor inside the grad scaler's state
        put("scalars.safetensors", scalar_tensors)

    doc = {
        "format": FORMAT,
        "version": VERSION,
        "complete": True,
        "step": state.step,
        "files": files,
        "optimizer": optimizer_tree,
        "rng": rng_tree,
        "scalars": scalars_tree,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_bytes(tmp / "state.json", json.dumps(doc, indent=1).encode())
    fsync_dir(tmp)

    if final.exists():  # the same step saved twice (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    atomic_write_bytes(root / LATEST, (final.name + "\n").encode())
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))
    for name in names[: max(0, len(names) - max(1, keep))]:
        if name != newest:
            shutil.rmtree(root / name, ignore_errors=True)
    for p in root.iterdir():  # debris of interrupted saves
        if p.is_dir() and p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------- loading
def check_checkpoint(path: Path) -> dict[str, Any]:
    """state.json of a complete, intact checkpoint; raises CheckpointError saying what is wrong otherwise."""
    doc_path = path / "state.json"
    try:
        doc = json.loads(doc_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no state.json (incomplete checkpoint)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{doc_path}: unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not doc.get("complete"):
        raise CheckpointError(f"{doc_path}: not a complete {FORMAT} file")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{doc_path}: version {doc.get('version')}, this code reads {VERSION}")
    for name, size in doc["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} has {f.stat().st_size} bytes, {size} were written")
        open_tensors(f)  # validates the safetensors header against the file size
    return doc


def find_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Damaged ones are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates: list[Path] = []
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if name.startswith(STEP_PREFIX) and "/" not in name:
            candidates.append(root / name)
    steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)),
                   key=lambda p: p.name, reverse=True)
    candidates += [p for p in steps if p not in candidates]
    for path in candidates:
        try:
            check_checkpoint(path)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    f = open_tensors(path)
    return {k: f[k].clone() for k in f.keys()}


def load_checkpoint(path: str | Path) -> TrainingState:
    """Read a checkpoint written by `save_checkpoint` (checked first with `check_checkpoint`)."""
    path = Path(path)
    doc = check_checkpoint(path)
    files = doc["files"]
    ema = _read_tensors(path / "ema.safetensors") if "ema.safetensors" in files else None
    optimizer = None
    if doc.get("optimizer") is not None:
        optimizer = unflatten(doc["optimizer"], open_tensors(path / "optimizer.safetensors"))
    rng = unflatten(doc["rng"], open_tensors(path / "rng.safetensors"))
    scalar_tensors = open_tensors(path / "scalars.safetensors") if "scalars.safetensors" in files else {}
    return TrainingState(
        step=int(doc["step"]),
        model=_read_tensors(path / "model.safetensors"),
        ema=ema,
        optimizer=optimizer,
        rng=rng,
        scalars=unflatten(doc["scalars"], scalar_tensors),
        path=path,
    )
