"""One server per data folder: an exclusive lock on `<data_dir>/sdxl-serve.lock`, held for the server's life.

The job database and the image folders belong to one process. Two servers on one folder would both run
every queued job, and a second one starting up would "recover" the first one's running job (mark it queued
again). So the server takes this lock before it opens the job store, recovers anything or binds its port,
and a second server on the same folder stops with one line (`DataDirInUse`, a `SettingsError`: exit code 2)
before touching anything.

How the lock is held:
- POSIX: `fcntl.flock(LOCK_EX | LOCK_NB)` on the lock file. The kernel drops the lock when the process
  ends, however it ends (SIGKILL, crash), so a stale lock file never blocks a restart.
- Windows (no `fcntl`): `msvcrt.locking(LK_NBLCK)` on one byte of the lock file, past the pid text so
  that the pid stays readable; also dropped by the system when the process ends. (Not exercised by this
  project's tests, which run on Linux.)
- A platform with neither module: the server starts without a lock and logs a warning that nothing stops
  a second server on the same folder.

The owner writes its pid into the lock file, so the refusal can name the process that holds the folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .settings import SettingsError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # everything but Windows
    msvcrt = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = "sdxl-serve.lock"
_WINDOWS_LOCK_OFFSET = 1 << 20  # the byte locked on Windows: far past the pid text, which stays readable


class DataDirInUse(SettingsError):
    """Another live server holds the data folder's lock."""


class DataDirLock:
    """The exclusive lock on one data folder. `acquire()` raises `DataDirInUse`; `release()` (or the end
    of the process) lets the next server in."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DataDirLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif msvcrt is not None:
                os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                log.warning("this platform has neither fcntl nor msvcrt: the data folder %s is not locked, "
                            "so nothing stops a second server from using it at the same time", self.folder)
        except OSError:  # held by another process (EWOULDBLOCK / EACCES)
            os.close(fd)
            raise DataDirInUse(
                f"data folder {self.folder} is in use by another sdxl server (pid {self._owner_pid()}); stop "
                "that server first, or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            elif msvcrt is not None:
                os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)

    def _owner_pid(self) -> str:
        """The pid the owner wrote ("unknown" while it is between taking the lock and writing it)."""
        try:
            text = self.path.read_text(errors="replace").strip()
        except OSError:
            return "unknown"
        return text if text.isdigit() else "unknown"

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
