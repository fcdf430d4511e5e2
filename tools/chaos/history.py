"""The chaos history: one JSON event per line in ``history.jsonl``, written append-only.

Event contract (what a runner emits; the checker reads nothing else)
====================================================================

Every line is one JSON object with exactly these keys::

    index    int    0-based, equal to the line number - 1 (the writer assigns it)
    time_s   float  monotonic seconds since the run started, never decreasing
    type     str    "invoke" | "ok" | "fail" | "info"
    process  str    who did it: "producer-3", "consumer-1", "drainer", "nemesis", "observer"
    f        str    "send" | "poll" | "drain" | "digest" | "nemesis" | "master"
    value    object f-specific, below (never null)
    node     str|null  the node that served the request (name or host:port), if known
    error    str|null  a status name ("NOT_MASTER", "FLUSH_SLAVE_TIMEOUT") or the exception text

Operations are pairs: an ``invoke`` then exactly one completion (``ok`` | ``fail`` | ``info``)
from the same process, which has at most one operation open at a time. A process that
crashes mid-operation never completes it (the checker treats it like ``info``) and goes on
under a new process name. ``fail`` means the operation *certainly* did not take effect
(a retryable status: nothing applied). Anything uncertain (a timeout, a lost connection,
``FLUSH_DISK_TIMEOUT``, ``FLUSH_SLAVE_TIMEOUT``, ``STORAGE_FAILED``) is ``info``: **a timeout
is always info, never fail** (the writer and reader refuse a ``fail`` whose error is an
outcome-unknown status or mentions a timeout). The one lone event is ``f="master"`` (type ``info``).

A queue is named ``"topic:queue_id"``. A message is a unique string the producer makes
from its process name and a counter (``"producer-3:17"``); nobody sends one value twice.

send (process ``producer-N``)
    invoke  {"queue": q, "message": m, "acks": "leader"|"durable"|"in_sync"|"replicated"}
    ok      the invoke's value plus {"offset": queue offset, "physical_offset": int|null}
    fail    the invoke's value
    info    the invoke's value, plus "offset" when the answer carried one (a flush timeout)

poll (process ``consumer-N``; a consumer reads one queue forward from where it left off)
    invoke  {"queue": q, "offset": first queue offset asked for}
    ok      {"queue": q, "offset": same, "messages": [[queue_offset, message], ...]}
    fail / info  the invoke's value

drain (process ``drainer``, after heal and quiesce: every queue on every node from offset 0)
    invoke  {"queue": q, "offset": o, "role": "master"|"replica"}
    ok      the invoke's value plus {"messages": [[queue_offset, message], ...],
            "end": true when the node has nothing at or past the next offset}
    A (node, queue) drain is complete once an ``ok`` with ``"end": true`` is recorded.

digest (process ``drainer``, after the drains: the commit-log bytes of each node)
    invoke  {"role": "master"|"replica"}
    ok      {"role": r, "confirm_offset": the master's confirm offset (same figure on
            every node's digest), "start_offset": first physical offset hashed,
            "end_offset": end of the bytes hashed (min of the node's log end and
            confirm_offset), "chunk_bytes": int, "chunks": [sha256 hex of each chunk]}
    Chunk i covers [start + i * chunk_bytes, min(start + (i + 1) * chunk_bytes, end)).

nemesis (process ``nemesis``; a fault is a window from its start to its stop)
    invoke/ok|info {"fault": "kill"|"pause"|"partition"|"power-loss"|"disk"|...,
            "action": "start"|"stop", "fault_id": str, "targets": [node, ...],
            "disk_lost": true only when a node's disk contents were destroyed,
            "details": {...} on a start's ``ok``: what the fault did (its fields)}
    A fault's window runs from its start ``invoke`` to its stop's completion (or the run's end).

master (process ``observer``, lone ``info``): {"master": node|null, "epoch": int|null}
    recorded whenever the observer sees the master change (null: none known).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

import attrs

from cluster.protocol.statuses import STATUS_BY_VALUE

__all__ = [
    "ACK_LEVELS",
    "COMPLETION_TYPES",
    "EVENT_TYPES",
    "FUNCTIONS",
    "Event",
    "HistoryError",
    "HistoryWriter",
    "event_from_json",
    "event_to_json",
    "is_uncertain_error",
    "iter_history",
    "read_history",
]

EVENT_TYPES: Final = frozenset({"invoke", "ok", "fail", "info"})
COMPLETION_TYPES: Final = frozenset({"ok", "fail", "info"})
FUNCTIONS: Final = frozenset({"send", "poll", "drain", "digest", "nemesis", "master"})
ACK_LEVELS: Final = ("leader", "durable", "in_sync", "replicated")
_KEYS: Final = ("index", "time_s", "type", "process", "f", "value", "node", "error")


class HistoryError(ValueError):
    """A history line that does not follow the event contract; the message names the line."""


@attrs.frozen
class Event:
    """One history line. Immutable; ``index`` equals its line number - 1."""

    index: int
    time_s: float
    type: str
    process: str
    f: str
    value: dict[str, Any]
    node: str | None = None
    error: str | None = None

    @property
    def line(self) -> int:
        """The 1-based line of ``history.jsonl`` this event was read from (or will be written to)."""
        return self.index + 1


def event_to_json(event: Event) -> str:
    """One line of JSON (no newline), keys in contract order."""
    return json.dumps(
        {key: getattr(event, key) for key in _KEYS}, separators=(",", ":"), allow_nan=False
    )


def event_from_json(text: str, line: int) -> Event:
    """Parse and validate one line; raise :class:`HistoryError` naming ``line`` and the fault."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HistoryError(
            f"history line {line}: not JSON ({exc.msg} at column {exc.colno})"
        ) from exc
    if not isinstance(raw, dict):
        raise HistoryError(f"history line {line}: expected a JSON object, got {type(raw).__name__}")
    missing = [key for key in _KEYS if key not in raw]
    if missing:
        raise HistoryError(f"history line {line}: missing key(s) {', '.join(missing)}")
    extra = sorted(set(raw) - set(_KEYS))
    if extra:
        raise HistoryError(f"history line {line}: unknown key(s) {', '.join(extra)}")
    _check_fields(raw, line)
    return Event(
        index=raw["index"],
        time_s=float(raw["time_s"]),
        type=raw["type"],
        process=raw["process"],
        f=raw["f"],
        value=raw["value"],
        node=raw["node"],
        error=raw["error"],
    )


def _check_fields(raw: dict[str, Any], line: int) -> None:
    def bad(what: str) -> HistoryError:
        return HistoryError(f"history line {line}: {what}")

    if type(raw["index"]) is not int or raw["index"] != line - 1:
        raise bad(f"index must be the line number - 1 ({line - 1}), got {raw['index']!r}")
    time_s = raw["time_s"]
    if type(time_s) not in (int, float) or not math.isfinite(time_s) or time_s < 0:
        raise bad(f"time_s must be a finite number >= 0, got {time_s!r}")
    if raw["type"] not in EVENT_TYPES:
        raise bad(f"type must be one of {sorted(EVENT_TYPES)}, got {raw['type']!r}")
    if not isinstance(raw["process"], str) or not raw["process"]:
        raise bad(f"process must be a non-empty string, got {raw['process']!r}")
    if raw["f"] not in FUNCTIONS:
        raise bad(f"f must be one of {sorted(FUNCTIONS)}, got {raw['f']!r}")
    if not isinstance(raw["value"], dict):
        raise bad(f"value must be a JSON object, got {raw['value']!r}")
    for key in ("node", "error"):
        if raw[key] is not None and not isinstance(raw[key], str):
            raise bad(f"{key} must be a string or null, got {raw[key]!r}")
    if raw["f"] == "master" and raw["type"] != "info":
        raise bad("a master observation is a lone 'info' event")
    if raw["type"] == "fail" and is_uncertain_error(raw["error"]):
        raise bad(
            f"a 'fail' with error {raw['error']!r}, whose outcome is unknown: "
            "record it as 'info' (fail means certainly not applied)"
        )


CORRUPT_READ_PREFIX = "corrupt read: "
"""Marks a poll or drain whose answer failed the client's record checks (CRC, size, topic
or queue, a gap in queue offsets): the node served bytes it must never serve, which the
checker reports as ``corrupt_read``."""

NOT_SENT_PREFIX = "not sent: "
"""Marks an error after which the client knows nothing reached a node (e.g. a connect that
timed out): certain, whatever words the reason uses."""


def is_uncertain_error(error: str | None) -> bool:
    """A status or exception text after which a write may or may not have been applied."""
    if error is None or error.startswith(NOT_SENT_PREFIX):
        return False
    status = STATUS_BY_VALUE.get(error)
    if status is not None:
        return status.outcome_unknown
    return "timeout" in error.lower() or "timed out" in error.lower()


def read_history(path: str | os.PathLike[str]) -> list[Event]:
    """Read a whole history, refusing the first malformed line by number.

    Also refuses time going backwards and completions without an open invoke on their
    process, or a second invoke while one is open: the checker relies on both.
    """
    return list(iter_history(path))


def iter_history(path: str | os.PathLike[str]) -> Iterator[Event]:
    """Like :func:`read_history`, one event at a time."""
    open_ops: dict[str, Event] = {}
    last_time_s = 0.0
    with open(path, encoding="utf-8") as file:
        for line_number, text in enumerate(file, start=1):
            if not text.endswith("\n"):
                raise HistoryError(
                    f"history line {line_number}: no newline at the end (a torn last write?); "
                    "drop the partial line to check the rest"
                )
            event = event_from_json(text, line_number)
            if event.time_s < last_time_s:
                raise HistoryError(
                    f"history line {line_number}: time_s {event.time_s} goes back "
                    f"from {last_time_s}"
                )
            last_time_s = event.time_s
            _check_pairing(event, open_ops)
            yield event


def _check_pairing(event: Event, open_ops: dict[str, Event]) -> None:
    if event.f == "master":
        return
    opened = open_ops.get(event.process)
    if event.type == "invoke":
        if opened is not None:
            raise HistoryError(
                f"history line {event.line}: process {event.process!r} invokes again while "
                f"its operation of line {opened.line} is still open"
            )
        open_ops[event.process] = event
        return
    if opened is None:
        raise HistoryError(
            f"history line {event.line}: {event.type} of process {event.process!r} "
            "completes no open invoke"
        )
    if opened.f != event.f:
        raise HistoryError(
            f"history line {event.line}: completion f={event.f!r} does not match the "
            f"invoke f={opened.f!r} of line {opened.line}"
        )
    del open_ops[event.process]


class HistoryWriter:
    """Append-only writer of ``history.jsonl``: one flushed line per event.

    Assigns ``index`` itself and refuses what the reader would refuse (time going back, a
    completion without its invoke), so a runner bug stops the run at once. Not safe to
    call from several threads at once: a trio runner calls :meth:`append` from its one
    event-loop thread (a flush to the page cache, no fsync) and :meth:`close` (which
    fsyncs) from a worker thread.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: IO[str] = open(self.path, "x", encoding="utf-8")  # noqa: SIM115
        self._next_index = 0
        self._last_time_s = 0.0
        self._open_ops: dict[str, Event] = {}

    def append(
        self,
        *,
        time_s: float,
        type: str,
        process: str,
        f: str,
        value: dict[str, Any],
        node: str | None = None,
        error: str | None = None,
    ) -> Event:
        """Write one event and flush it to the file; returns it with its index."""
        if time_s < self._last_time_s:
            raise HistoryError(f"time_s {time_s} goes back from {self._last_time_s}")
        event = Event(self._next_index, float(time_s), type, process, f, value, node, error)
        text = event_to_json(event)
        event_from_json(text, event.line)  # the same rules as the reader, before writing
        _check_pairing(event, self._open_ops)
        self._file.write(text + "\n")
        self._file.flush()
        self._next_index += 1
        self._last_time_s = event.time_s
        return event

    def close(self) -> None:
        """Flush, fsync and close (a history must survive the run's own power-loss faults)."""
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
