"""File hashes as A1111 and Civitai write and look them up, computed once per file version.

- `short_hash`: A1111's "Model hash" (Civitai's AutoV2), the first 10 hex digits of the file's SHA-256.
- `lora_hash`: the 12 digits in "Lora hashes": the "addnet" hash (`addnet_hash`, the SHA-256 of a
  safetensors file's tensor data, header excluded) for safetensors files, else the whole file's SHA-256.
- `embedding_hash`: the 12 digits in "TI hashes" (the whole file's SHA-256).
- `legacy_hash`: A1111's old 8-digit model hash.

An SDXL checkpoint is ~7 GB, so a full hash takes seconds. `sha256_file` and `addnet_hash` remember each
result in memory and in a JSON file, keyed by the resolved path, the size and the modification time
(nanoseconds), as A1111's `cache.json` does: a file is hashed once per version, also across processes.
The file is `hash_cache_file()` (`<user cache dir>/hashes.json`, see `sdxl.files.user_cache_dir`; the
environment variable SDXL_CACHE_DIR moves it), written atomically. A missing, unreadable or corrupt cache
file only means recomputing; it never raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes, user_cache_dir
from .values import loads

_BLOCK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
# (resolved path, size, mtime_ns, kind) -> hex digest, for this process
_memory: dict[tuple[str, int, int, str], str] = {}


def hash_cache_file() -> Path:
    """Where file hashes are kept between runs: `<user cache dir>/hashes.json`."""
    return user_cache_dir() / "hashes.json"


def _digest(path: Path, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            block = f.read(_BLOCK if remaining is None else min(_BLOCK, remaining))
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return h.hexdigest()


def _load_cache(cache_file: Path) -> dict[str, Any]:
    try:
        loaded = loads(cache_file.read_text("utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _save_cache(cache_file: Path, stored: dict[str, Any]) -> None:
    """Write the cache atomically, dropping entries of files that no longer exist. Failures are ignored
    (a read-only home, a full disk): the hash is only recomputed next time."""
    kept = {key: entry for key, entry in stored.items() if os.path.exists(key.partition(":")[2])}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_file, json.dumps(kept, indent=0).encode("utf-8"))
    except OSError:
        pass


def _cached(
    path: str | os.PathLike, kind: str, compute: Callable[[Path], str], cache_file: str | os.PathLike | None
) -> str:
    """compute(path), once per (resolved path, size, mtime_ns, kind): from memory, else from the cache
    file (default `hash_cache_file()`), else computed and stored in both."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, kind)
    if key in _memory:
        return _memory[key]
    cache = Path(cache_file) if cache_file is not None else hash_cache_file()
    stored = _load_cache(cache)
    entry_key = f"{kind}:{p}"
    entry = stored.get(entry_key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
        and _SHA256.fullmatch(entry["sha256"])
    ):
        _memory[key] = entry["sha256"]
        return entry["sha256"]
    digest = compute(p)
    _memory[key] = digest
    after = p.stat()
    if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):  # not changed while hashing
        stored[entry_key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        _save_cache(cache, stored)
    return digest


def sha256_file(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """SHA-256 (hex) of the whole file, read in 1 MiB blocks; cached (module docstring)."""
    return _cached(path, "sha256", _digest, cache_file)


def short_hash(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """A1111's "Model hash" (Civitai's AutoV2): the first 10 hex digits of the file's SHA-256."""
    return sha256_file(path, cache_file=cache_file)[:10]


def legacy_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-digit model hash: SHA-256 of the 64 KiB at offset 1 MiB (still accepted by A1111)."""
    return _digest(Path(path), offset=0x100000, length=0x10000)[:8]


def _addnet_digest(p: Path) -> str:
    with open(p, "rb") as f:
        header = f.read(8)
    size = p.stat().st_size
    if len(header) != 8 or 8 + int.from_bytes(header, "little") > size:
        raise ValueError(f"{p}: not a safetensors file (bad header length)")
    return _digest(p, offset=8 + int.from_bytes(header, "little"))


def addnet_hash(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """SHA-256 of a safetensors file's tensor data, header excluded (kohya's `sshs_model_hash`), so
    editing the metadata does not change it. A1111 identifies LoRAs by its first 12 digits. For tensors
    not yet written, `sdxl.weights.io.tensor_data_sha256` gives the same value."""
    return _cached(path, "addnet", _addnet_digest, cache_file)


def lora_hash(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """The 12-digit hash A1111 writes in "Lora hashes" (addnet hash for safetensors, else whole file)."""
    if Path(path).suffix.lower() == ".safetensors":
        return addnet_hash(path, cache_file=cache_file)[:12]
    return sha256_file(path, cache_file=cache_file)[:12]


def embedding_hash(path: str | os.PathLike, *, cache_file: str | os.PathLike | None = None) -> str:
    """The 12-digit hash A1111 writes in "TI hashes": the whole file's SHA-256."""
    return sha256_file(path, cache_file=cache_file)[:12]
