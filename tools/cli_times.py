"""Times on the command line: ``consume --from-time`` and ``group reset --to-time``
take an ISO 8601 time or one relative to now, in one way."""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Sequence

__all__ = ["attach_relative_times", "time_argument"]

_TIME_OPTIONS = ("--from-time", "--to-time")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def time_argument(value: str, *, now_s: float | None = None) -> int:
    """``consume --from-time``, ``group reset --to-time``: an ISO 8601 time (no zone:
    UTC) or a time relative to now (``-10m``, ``-90s``, ``-2h``, ``-1d``); microseconds
    since the epoch."""
    now_s = time.time() if now_s is None else now_s
    text = value.strip()
    if text[:1] == "-" and text[-1:] in _UNIT_SECONDS and text[1:-1].isascii():
        try:
            amount = float(text[1:-1])
        except ValueError:
            amount = -1.0
        if amount >= 0:
            return max(0, int((now_s - amount * _UNIT_SECONDS[text[-1]]) * 1_000_000))
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a time: use ISO 8601 (2026-11-30T18:00:00, UTC unless it "
            "names a zone, e.g. +01:00) or a time before now (-10m, -90s, -2h, -1d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0, (when - _EPOCH) // datetime.timedelta(microseconds=1))


def attach_relative_times(argv: Sequence[str]) -> list[str]:
    """``--from-time -10m`` as ``--from-time=-10m`` (and ``--to-time``): argparse takes a
    value starting with a dash for an option of its own (only plain negative numbers
    are exempt)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _TIME_OPTIONS and arg.startswith("-") and arg != "--":
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out
