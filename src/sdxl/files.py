"""Files: atomic writes, the per-user cache folder, and names that must stay inside a folder.

At the bottom of the import graph, next to `errors.py`: it imports nothing else from the package.

- `atomic_write` / `atomic_write_bytes`: a reader sees the old file or the complete new one, never half a
  file, even if the process dies mid-write. The new file gets ordinary permissions (what `open()` gives
  under the umask), not a temporary file's 0600.
- `fsync_dir`: make a rename inside a folder durable.
- `user_cache_dir`: where recomputable data (file hashes) is kept.
- `resolve_in_folder`: a name a user or client sent -> a file inside a given folder, never outside it.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from .errors import BadName, NameNotFound

CACHE_DIR_ENV = "SDXL_CACHE_DIR"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that renames and new entries in it survive a crash. Best effort: platforms and
    file systems that cannot open or sync a folder are skipped silently."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Run `write(fileobj)` into a temporary file next to `path`, fsync it, rename it over `path`, fsync the
    folder. `path` is then either the old file or the complete new one.

    The temporary file is created with `open(.., "xb")` (not `mkstemp`, whose mode 0600 would stick to the
    result), so the file gets the permissions `open()` gives under the umask. If anything fails, the
    temporary file is removed and `path` is left as it was. The folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`atomic_write` of a bytes value."""
    atomic_write(path, lambda f: f.write(data))


def user_cache_dir() -> Path:
    """The per-user folder for data that can be recomputed (file hashes).

    `$SDXL_CACHE_DIR` when set; else Linux/BSD `$XDG_CACHE_HOME/sdxl` or `~/.cache/sdxl`, macOS
    `~/Library/Caches/sdxl`, Windows `%LOCALAPPDATA%\\sdxl\\Cache`.
    """
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "sdxl" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sdxl"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sdxl"


def resolve_in_folder(
    folder: str | os.PathLike | None,
    name: str,
    what: str,
    suffixes: tuple[str, ...] = (),
    files_only: bool = False,
) -> Path:
    """Resolve `name` to an existing file (or, unless `files_only`, folder) inside `folder`.

    This is a security boundary: `name` comes from a user or an HTTP client and may only pick something
    inside `folder`. It may contain sub-folders (`sdxl/juggernaut`) and may omit one of `suffixes`.
    `what` names the kind of thing in messages ("model", "LoRA"). Raises `BadName` (HTTP 400) for an
    empty name, NUL bytes, absolute paths, drive letters, `~`, `..` components, or a match that resolves,
    through symlinks, to somewhere outside `folder` (the folder itself included); `NameNotFound` (HTTP
    404) when nothing matches or no folder is configured. Returns the resolved path.
    """
    if not isinstance(name, str) or not name.strip():
        raise BadName(f"{what}: empty name")
    if "\x00" in name or len(name) > 1024:
        raise BadName(f"{what} {name[:64]!r}: not a valid name")
    # Backslashes are separators on Windows; treating them as such everywhere refuses `..\\x` too.
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(name).drive or name.startswith("~"):
        raise BadName(f"{what} {name!r}: give a name inside the {what} folder, not a path")
    if any(part == ".." for part in rel.parts):
        raise BadName(f"{what} {name!r}: '..' is not allowed in names")
    if folder is None:
        raise NameNotFound(f"{what} {name!r}: no {what} folder is configured")
    root = Path(folder).resolve()
    candidates = [root / rel] + [root / (str(rel) + s) for s in suffixes if not str(rel).endswith(s)]
    for cand in candidates:
        if not os.path.lexists(cand):
            continue
        real = cand.resolve()
        if root not in real.parents:
            raise BadName(f"{what} {name!r}: not a name inside the {what} folder")
        if real.is_file() or (real.is_dir() and not files_only):
            return real
    raise NameNotFound(f"{what} {name!r}: not found in the {what} folder")
