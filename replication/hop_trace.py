"""Timestamps of one write's hops through master and slaves, for ``tidelog bench produce
--trace``: where a replicated ack's latency goes, measured, not guessed.

Off unless the process starts with :data:`ENV` naming a file. Then every hop a write
passes (the master admits it, starts its ack wait, sends its chunk to a slave, the slave
receives and applies it and acks, the master hears the ack, moves the confirm offset,
releases the wait) appends ``(hop, log offset, time.perf_counter())`` to a list in memory,
and the list is written to that file when the process exits normally (SIGTERM: the
node's clean shutdown). ``perf_counter`` is ``CLOCK_MONOTONIC`` on Linux, one clock for
every process of the machine, so a reader joins the files of master, slaves and client
by offset and subtracts.

Cost when off: each site is ``if hop_trace.enabled:`` (one global and one attribute
lookup). When on: a tuple appended per hop, at most :data:`MAX_RECORDS` of them.

A hop is keyed by the log offset a process knows there: the master's admit by where the
write will start (the log end), everything after the append by where it ends (a chunk,
an ack and the confirm offset all name an end), so a reader matches a write's end to
the chunk, ack and confirm that carry exactly that end (one write per chunk: the
sequential workload the trace is for).
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path
from typing import Final

__all__ = ["ENV", "MAX_RECORDS", "enabled", "load", "record", "record_at"]

ENV: Final = "TIDELOG_TRACE_HOPS"
"""Environment variable naming the file the hops go to at exit (unset: tracing off)."""
MAX_RECORDS: Final = 1_000_000
"""Hops kept per process (about 100 MB at most): later hops are dropped, not the process."""

_path = os.environ.get(ENV) or None
enabled: bool = _path is not None
"""Read once at import: whether this process records hops."""
_records: list[tuple[str, int, float]] = []


def record(hop: str, offset: int) -> None:
    """Note that ``hop`` happened now for the write keyed by ``offset`` (call only when
    :data:`enabled`, behind the check, so the off path costs nothing more)."""
    if len(_records) < MAX_RECORDS:
        _records.append((hop, offset, time.perf_counter()))


def record_at(hop: str, offset: int, at: float) -> None:
    """:func:`record` with the time taken elsewhere (``perf_counter`` seconds): a hop
    that happened where nothing may record it, such as the storage's sync thread."""
    if len(_records) < MAX_RECORDS:
        _records.append((hop, offset, at))


def _dump() -> None:
    """Write the hops, one ``hop offset seconds`` line each (temp file, then rename, so a
    reader never sees half a file)."""
    if _path is None:
        return
    path = Path(_path)
    temp = path.with_name(path.name + ".tmp")
    with temp.open("w", encoding="ascii") as out:
        out.writelines(f"{hop} {offset} {at!r}\n" for hop, offset, at in _records)
    temp.replace(path)


def load(path: Path) -> list[tuple[str, int, float]]:
    """The hops a traced process wrote to ``path``, in the order they happened."""
    hops = []
    for line in path.read_text(encoding="ascii").splitlines():
        hop, offset, at = line.split()
        hops.append((hop, int(offset), float(at)))
    return hops


if enabled:
    atexit.register(_dump)
