"""The data-dir lock: one process at a time may open a store's directory.

A second node started on the same directory (an everyday mistake) used to run recovery
on the live store: it deleted the running node's prepared segment and rewrote its
checkpoint, and acknowledged data was lost. The lock is taken before anything in the
directory is read or written, and refused at once, naming the holder's PID.

``flock`` on ``<data_dir>/lock``: the kernel drops it when the holder exits, however it
exits, so a crash never leaves a stale lock behind. The file itself stays (deleting it
would let two processes lock two different files of the same name); it holds the
holder's PID, for the error message only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from storage.errors import StorageError

LOCK_FILE_NAME = "lock"


class DataDirLockedError(StorageError):
    """Another process holds the data directory; nothing in it was touched."""


class DataDirLock:
    """The held lock of one data directory; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """Blocking: create ``data_dir`` if needed and take its lock, or raise
    :class:`DataDirLockedError` naming the directory and the holder's PID."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataDirLockedError(
            f"data dir {data_dir} is in use by another process (pid {holder}): stop it "
            "first, or give this node its own data_dir; nothing was changed"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DataDirLock(path, fd)
