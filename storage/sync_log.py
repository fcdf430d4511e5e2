"""Fault injection only: record what the node made durable, and inject fsync faults.

Off unless the process starts with ``TIDELOG_FAULT_SYNC_LOG`` naming a file (never set
in a normal run); then :data:`ACTIVE` is a :class:`SyncLog` and the storage's sync points
append one JSON line each, *after* the sync returned, so a simulated power loss can drop
exactly the bytes that were not durable (the reader and the transform are the chaos
tools' power-loss fault). Records (``path`` absolute)::

    {"op": "sync", "path": P, "synced_upto": N}   fdatasync of P returned; bytes [0, N)
                                                  were written before it began
    {"op": "sync", "path": P, "synced_upto": 0}   P was created and its directory fsynced
    {"op": "replace", "path": P}                  P was replaced whole (tmp, fsync, rename,
                                                  directory fsync)
    {"op": "fault", "path": P, ...}               an injected delay or error (below) hit
                                                  the fdatasync of P

With ``TIDELOG_FAULT_DISK_CONTROL`` naming a JSON file too, each segment fdatasync first
reads that file (when it changed) and obeys it: ``{"fsync_delay_ms": 200}``
sleeps before the call (a slow disk), ``{"fsync_error": "EIO"}`` raises that error
instead of syncing (a failing disk). The harness replaces the file by rename and removes
it; no file means no fault. This stands in for dm-flakey and dm-delay, which this kind of machine
lacks.

When off, a sync point costs one module attribute read and a ``None`` test.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

__all__ = [
    "ACTIVE",
    "CONTROL_ENV",
    "SYNC_LOG_ENV",
    "DiskControl",
    "SyncLog",
    "from_environ",
]

SYNC_LOG_ENV: Final = "TIDELOG_FAULT_SYNC_LOG"
CONTROL_ENV: Final = "TIDELOG_FAULT_DISK_CONTROL"

log = logging.getLogger(__name__)


@attrs.frozen
class DiskControl:
    """What the harness asks of the next segment fsyncs: a delay, an error, or neither."""

    fsync_delay_ms: int = 0
    fsync_error: str | None = None

    @classmethod
    def parse(cls, text: str, source: Path) -> DiskControl:
        """The control file's content; a bad file is an error naming it and what is wanted."""
        try:
            fields = json.loads(text) if text.strip() else {}
            if not isinstance(fields, dict):
                raise TypeError("not an object")
            delay_ms = int(fields.get("fsync_delay_ms", 0))
            error = fields.get("fsync_error")
            if error is not None and not isinstance(getattr(errno, str(error), None), int):
                raise ValueError(f"unknown errno name {error!r}")
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f'{source}: want JSON like {{"fsync_delay_ms": 200}} or '
                f'{{"fsync_error": "EIO"}} ({exc})'
            ) from None
        if delay_ms < 0:
            raise ValueError(f"{source}: fsync_delay_ms must be >= 0, got {delay_ms}")
        return cls(delay_ms, str(error) if error is not None else None)


class SyncLog:
    """An append-only JSON-lines record of durable points, plus the optional disk control.

    Called from the commit log's sync thread and trio's worker threads at once: each
    record is one ``os.write`` under a lock on an ``O_APPEND`` descriptor (it survives a
    SIGKILL in the page cache, which is all a simulated power loss needs).
    """

    def __init__(self, path: Path, control: Path | None = None) -> None:
        self.path = Path(path)
        self.control = Path(control) if control is not None else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self._control_seen: tuple[int, int, int] | None = None
        self._disk = DiskControl()

    def _append(self, record: Mapping[str, object]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)

    def synced(self, path: Path | str, synced_upto: int) -> None:
        """An fdatasync of ``path`` returned; bytes ``[0, synced_upto)`` are durable."""
        assert synced_upto >= 0, synced_upto
        self._append({"op": "sync", "path": os.path.abspath(path), "synced_upto": synced_upto})

    def created(self, path: Path | str) -> None:
        """``path`` exists durably (directory fsynced); none of its bytes are durable yet."""
        self.synced(path, 0)

    def replaced(self, path: Path | str) -> None:
        """``path`` was replaced whole and durably."""
        self._append({"op": "replace", "path": os.path.abspath(path)})

    def disk(self) -> DiskControl:
        """The harness's current control, re-read when the file changed (its inode, size or
        mtime: the harness replaces it by rename, as mtimes are as coarse as a tick)."""
        if self.control is None:
            return self._disk
        try:
            stat = os.stat(self.control)
        except FileNotFoundError:
            self._control_seen, self._disk = None, DiskControl()
            return self._disk
        seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if seen != self._control_seen:
            self._disk = DiskControl.parse(self.control.read_text(), self.control)
            self._control_seen = seen
            log.warning(
                "fault_disk_control path=%s fsync_delay_ms=%d fsync_error=%s",
                self.control, self._disk.fsync_delay_ms, self._disk.fsync_error,
            )  # fmt: skip
        return self._disk

    def before_sync(self, path: Path | str) -> None:
        """Blocking (a sync thread): the injected delay, then the injected error, if any."""
        disk = self.disk()
        if disk.fsync_delay_ms or disk.fsync_error:
            self._append({"op": "fault", "path": os.path.abspath(path), **attrs.asdict(disk)})
        if disk.fsync_delay_ms:
            time.sleep(disk.fsync_delay_ms / 1000)
        if disk.fsync_error is not None:
            code = getattr(errno, disk.fsync_error)
            raise OSError(code, f"{os.strerror(code)} (injected by {self.control})", str(path))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def from_environ(environ: Mapping[str, str]) -> SyncLog | None:
    """A :class:`SyncLog` when ``TIDELOG_FAULT_SYNC_LOG`` is set, else None."""
    path = environ.get(SYNC_LOG_ENV)
    if not path:
        if environ.get(CONTROL_ENV):
            raise ValueError(f"{CONTROL_ENV} needs {SYNC_LOG_ENV} too (fault injection only)")
        return None
    control = environ.get(CONTROL_ENV) or None
    log.warning(
        "fault injection enabled: recording syncs to %s (control=%s); never use in production",
        path, control,
    )  # fmt: skip
    return SyncLog(Path(path), Path(control) if control else None)


ACTIVE: SyncLog | None = from_environ(os.environ)
"""The process's sync log, or None (the normal case)."""
