"""Which connected slaves are *in sync* with the master (sans-IO: no clock, no sockets).

A slave counts toward ``acks=replicated`` (and bounds the confirm offset) only while
it keeps up; otherwise one slow or stuck slave would stall every replicated write
until ``FLUSH_SLAVE_TIMEOUT``. Two conditions, both must hold:

* **bytes**: ``master_end - ack <= max_lag_bytes`` (RocketMQ's ``haMaxGapNotInSync``);
* **time**: the slave was *caught up* (held everything the master had) at some point
  within the last ``max_lag_ms`` (Kafka's ``replica.lag.time.max.ms``). A slave that
  keeps acking but never reaches the end -- it is slower than the producers -- drops
  out as surely as one that stops acking.

"Caught up" is judged the way Kafka does it, because under a steady load an ack
rarely equals the master's end at the moment it arrives: an ack that reaches the
master's end *as of the slave's previous ack* proves the slave was caught up at that
previous ack's time. An ack equal to the current end makes it caught up now, and so
does a slave whose ack equals the end when membership is evaluated (nothing is
outstanding, however long ago it last spoke: liveness is the heartbeat's job).

A newly added slave starts as caught up at the time it is added, like Kafka's
follower at a leader election: its lag in bytes is checked at once, but it has
``max_lag_ms`` to catch up before it drops out. That is the conservative choice for
the confirm offset (a new slave holds it back rather than letting it run past bytes
that slave lacks) and keeps "a slave that just connected counts" true for
``min_insync_replicas``.

Times are seconds on any monotonic clock (the HA service passes
``trio.current_time()``), so MockClock tests drive it directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

__all__ = [
    "DEFAULT_MAX_LAG_BYTES",
    "DEFAULT_MAX_LAG_MS",
    "InSyncSet",
    "InSyncWindow",
    "SlaveLag",
    "SlaveState",
]

DEFAULT_MAX_LAG_BYTES = 256 << 20
"""RocketMQ's ``haMaxGapNotInSync`` default."""
DEFAULT_MAX_LAG_MS = 10_000
"""Kafka's ``replica.lag.time.max.ms`` (30 s since 2.5; 10 s before, which suits a log
whose slaves are one hop away)."""


@attrs.define
class SlaveState:
    """What the decision needs to remember about one slave."""

    ack_offset: int
    last_ack_time: float
    caught_up_time: float
    """The last time the slave is known to have held everything the master had."""
    end_at_last_ack: int
    """The master's end when the previous ack arrived: reaching it proves the slave was
    caught up at ``last_ack_time``."""


@attrs.frozen
class SlaveLag:
    """One slave's lag, as ``status`` shows it."""

    name: str
    ack_offset: int
    lag_bytes: int
    lag_ms: float
    """Milliseconds since the slave was last caught up (0 while it is)."""
    in_sync: bool


@attrs.frozen
class InSyncWindow:
    """How many slaves are in sync, and for how long that count stands with no state
    change: for every master end in ``[end_low, end_high]`` and every time ``now`` no
    earlier than the one judged at with ``(now - caught_up_time) * 1000 <= max_lag_ms``,
    :meth:`InSyncSet.count_in_sync` answers ``count`` (until an add, ack or remove).

    Why it exists: a slave in sync drops out only as the master's end grows past its
    byte bound or as time passes its time bound, and one out of sync comes back only
    with an ack (or a cut that lowers the end), so the ``acks=in_sync``/``replicated``
    admit can answer from the window with two comparisons instead of judging every
    slave for every write."""

    count: int
    end_low: int
    end_high: float
    """``inf``: no slave's byte bound binds."""
    caught_up_time: float
    """The earliest caught-up time whose time bound binds (``inf``: none binds)."""
    max_lag_ms: float

    def holds(self, master_end: int, now: float) -> bool:
        """Whether ``count`` is still the answer at ``master_end`` and ``now`` (the same
        arithmetic as :meth:`InSyncSet.is_in_sync`, so it agrees at the boundary)."""
        return (
            self.end_low <= master_end <= self.end_high
            and (now - self.caught_up_time) * 1000 <= self.max_lag_ms
        )


class InSyncSet:
    """The in-sync decision for the slaves of one master.

    :attr:`observers` are called (no arguments, synchronously) after every slave's state
    changed: added, acked, removed. They let a waiter on the event loop (the node's ack
    path, a switchover) wake on progress instead of polling; an observer must not
    raise and must not call back into this set's mutators.
    """

    def __init__(
        self, max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES, max_lag_ms: float = DEFAULT_MAX_LAG_MS
    ) -> None:
        if max_lag_bytes < 0 or max_lag_ms < 0:
            raise ValueError(
                f"max_lag_bytes and max_lag_ms must not be negative, got "
                f"{max_lag_bytes} and {max_lag_ms}"
            )
        self.max_lag_bytes = max_lag_bytes
        self.max_lag_ms = max_lag_ms
        self.slaves: dict[str, SlaveState] = {}
        self.observers: list[Callable[[], None]] = []

    def _changed(self) -> None:
        for observer in self.observers:
            observer()

    def add(self, name: str, ack_offset: int, master_end: int, now: float) -> None:
        """A slave connected (or reconnected: its old state is replaced)."""
        self.slaves[name] = SlaveState(ack_offset, now, now, master_end)
        self._changed()

    def remove(self, name: str) -> None:
        """A slave disconnected; unknown names are ignored (removal is idempotent)."""
        if self.slaves.pop(name, None) is not None:
            self._changed()

    def ack(self, name: str, offset: int, master_end: int, now: float) -> None:
        """Record an ack frame (a heartbeat repeats the last offset). Acks never move a
        slave's offset back: a stale frame only refreshes its time."""
        state = self.slaves.get(name)
        if state is None:
            return
        offset = max(offset, state.ack_offset)
        if offset >= master_end:
            state.caught_up_time = now
        elif offset >= state.end_at_last_ack:
            state.caught_up_time = max(state.caught_up_time, state.last_ack_time)
        state.ack_offset = offset
        state.last_ack_time = now
        state.end_at_last_ack = master_end
        self._changed()

    def is_in_sync(self, name: str, master_end: int, now: float) -> bool:
        state = self.slaves.get(name)
        if state is None:
            return False
        lag = master_end - state.ack_offset
        if lag <= 0:
            return True
        return lag <= self.max_lag_bytes and (now - state.caught_up_time) * 1000 <= self.max_lag_ms

    def in_sync(self, master_end: int, now: float) -> dict[str, int]:
        """The in-sync slaves' ack offsets, by name."""
        return {
            name: state.ack_offset
            for name, state in self.slaves.items()
            if self.is_in_sync(name, master_end, now)
        }

    def count_in_sync(
        self, master_end: int, now: float, member: Callable[[str], bool] | None = None
    ) -> int:
        """``len(in_sync(...))`` over the slaves ``member`` admits (all without it), with
        no dict built and no call per slave: an ``acks=in_sync``/``replicated`` admit
        asks it on every write. Same rule as :meth:`is_in_sync`."""
        max_lag_bytes, max_lag_ms = self.max_lag_bytes, self.max_lag_ms
        count = 0
        for name, state in self.slaves.items():
            lag = master_end - state.ack_offset
            if (
                lag <= 0
                or (lag <= max_lag_bytes and (now - state.caught_up_time) * 1000 <= max_lag_ms)
            ) and (member is None or member(name)):
                count += 1
        return count

    def count_window(self, master_end: int, now: float) -> InSyncWindow:
        """:meth:`count_in_sync` (every slave counted) at ``master_end`` and ``now``, with
        the ends and times it stands for (see :class:`InSyncWindow`)."""
        max_lag_bytes, max_lag_ms = self.max_lag_bytes, self.max_lag_ms
        count, end_high, caught_up = 0, math.inf, math.inf
        for state in self.slaves.values():
            lag = master_end - state.ack_offset
            timely = (now - state.caught_up_time) * 1000 <= max_lag_ms
            if lag > 0 and not (lag <= max_lag_bytes and timely):
                continue  # out: stays out as the end grows and time passes
            count += 1
            if timely:  # in up to the byte bound, while the time bound holds
                end_high = min(end_high, state.ack_offset + max_lag_bytes)
                caught_up = min(caught_up, state.caught_up_time)
            else:  # caught up but silent past the time bound: in while nothing is new
                end_high = min(end_high, state.ack_offset)
        return InSyncWindow(
            count=count,
            end_low=master_end,
            end_high=end_high,
            caught_up_time=caught_up,
            max_lag_ms=max_lag_ms,
        )

    def lags(self, master_end: int, now: float) -> list[SlaveLag]:
        """Every known slave's lag, sorted by name."""
        out = []
        for name, state in sorted(self.slaves.items()):
            lag_bytes = max(0, master_end - state.ack_offset)
            lag_ms = 0.0 if lag_bytes == 0 else max(0.0, (now - state.caught_up_time) * 1000)
            out.append(
                SlaveLag(
                    name,
                    state.ack_offset,
                    lag_bytes,
                    lag_ms,
                    self.is_in_sync(name, master_end, now),
                )
            )
        return out
