"""The ack policies: what a write waits for, by ``acks`` level, and how far reads go.

The node's role picks one (see :mod:`cluster.node.role`): :class:`StandaloneAcks` on a
master without slaves (and held, unused, by a slave), :class:`ReplicatedAcks` on a
master serving slaves. Both satisfy :class:`AckPolicy`, which is all the request
handler sees. The durable part (group commit on the master) is written once: the
replicated policy delegates it to the standalone one, so ``durable`` behaves exactly as
on a master without slaves and a ``replicated`` write is fsynced on the master *and*
acknowledged by the slaves. An ``in_sync`` write waits for the slaves alone: the
master holds it in its page cache from the append on, so it needs no fsync there
(Kafka's ``acks=all``; the peers' replicated level).

Timeouts are in milliseconds end to end, the unit requests carry (``timeout_ms``).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import trio

from cluster.node.status import AckStatus, ConnectedSlave, SlaveLagStatus, to_wire
from cluster.protocol import Acks, Status
from cluster.server.errors import RequestError
from replication import hop_trace
from replication.insync import SlaveLag
from replication.master import HAService
from storage import MessageStore
from storage.waiters import WakeHandle

__all__ = ["AckPolicy", "DurableAcks", "ReplicatedAcks", "SlaveAcks", "StandaloneAcks"]

# Read on every write's admit: an enum member read through its class is a descriptor
# call on Python 3.11, and ``Acks.needs_slaves`` a property on top; identity tests
# against module globals cost neither (same answer as ``acks.needs_slaves``).
_DURABLE: Final = Acks.DURABLE
_IN_SYNC: Final = Acks.IN_SYNC
_REPLICATED: Final = Acks.REPLICATED


class AckPolicy(Protocol):
    """What a write waits for, by ``acks`` level: the node's role decides.

    A master alone refuses ``replicated`` in :meth:`admit` and waits for group commit
    for ``durable``; a master with slaves also waits for in-sync slaves and bounds
    reads by the confirm offset. Called from the request handler's tasks on the event
    loop; any number of :meth:`wait` calls may be in progress at once.
    """

    def admit(self, acks: Acks) -> None:
        """Raise :class:`RequestError` if a write at ``acks`` cannot be served. Called
        *before* anything is appended, so a refused write is safe to resend."""

    async def wait(self, acks: Acks, end_offset: int, timeout_ms: int) -> tuple[Status, str | None]:
        """Wait until the bytes below ``end_offset`` meet ``acks`` (not ``leader``):
        ``(OK, None)``, or a timeout status with its error sentence."""
        ...

    def holds(self, acks: Acks, end_offset: int) -> bool:
        """Whether the bytes below ``end_offset`` meet ``acks`` now, so that :meth:`wait`
        would answer ``(OK, None)`` at once. False is no verdict (the caller waits):
        it is also the answer while hop tracing is on, so that every write's hops are
        recorded by :meth:`wait`. Never raises, never yields. Lets a connection answer
        the writes a wake-up released with no coroutine each."""
        ...

    def wake_when_holds(
        self, acks: Acks, end_offset: int, deadline_s: float, task: trio.lowlevel.Task
    ) -> WakeHandle | None:
        """Have ``task``, parked by its own means, woken when ``acks`` may hold for the
        bytes below ``end_offset`` (it checks :meth:`holds`, and waits if not), or at
        ``deadline_s``, or on a failure; None when this policy registers nothing (the
        caller wakes the task itself). Lets the ack that releases a write wake the
        connection's idle ack task, instead of a step of that task to park on
        :meth:`wait` first."""
        ...

    def read_limit(self) -> int | None:
        """Consumers see records ending at or below this offset (None: all of them)."""
        ...


class DurableAcks(Protocol):
    """The part of an ack policy :class:`ReplicatedAcks` reuses: group commit."""

    async def wait(self, acks: Acks, end_offset: int, timeout_ms: int) -> tuple[Status, str | None]:
        """``(OK, None)`` once the bytes below ``end_offset`` are fsynced, else a timeout."""
        ...

    def holds(self, acks: Acks, end_offset: int) -> bool:
        """As :meth:`AckPolicy.holds`."""
        ...


class StandaloneAcks:
    """Ack levels on a master with no slaves.

    ``durable`` waits for group commit. ``replicated`` is refused before anything is
    appended (``SLAVE_NOT_AVAILABLE``), so the client may resend it without risking a
    duplicate, or fall back to ``durable``.
    """

    def __init__(self, store: MessageStore) -> None:
        self._store = store

    def admit(self, acks: Acks) -> None:
        if hop_trace.enabled:
            hop_trace.record("m.admit", self._store.commit_log.max_offset)
        if acks is _IN_SYNC or acks is _REPLICATED:  # acks.needs_slaves
            raise RequestError(
                Status.SLAVE_NOT_AVAILABLE,
                f"acks={acks.value} needs an in-sync slave and this node has none; nothing "
                "was written: resend later or with acks=durable",
            )

    async def wait(self, acks: Acks, end_offset: int, timeout_ms: int) -> tuple[Status, str | None]:
        if hop_trace.enabled:
            hop_trace.record("m.wait", end_offset)
        if await self._store.wait_durable(end_offset, timeout_ms / 1000):
            if hop_trace.enabled:
                hop_trace.record("m.fsynced", end_offset)
                _trace_sync(self._store, end_offset)
            return Status.OK, None
        return (
            Status.FLUSH_DISK_TIMEOUT,
            f"appended, but the fsync did not complete within {timeout_ms:.0f} ms: the "
            "write is probably stored; resend only if duplicates are acceptable",
        )

    def holds(self, acks: Acks, end_offset: int) -> bool:
        """``durable`` (also ``replicated``'s first step): fsynced below ``end_offset``
        and no fsync failed (what ``wait_durable`` answers at once). The levels that
        need slaves are never admitted here."""
        if acks is _IN_SYNC or hop_trace.enabled:
            return False
        commit_log = self._store.commit_log
        return commit_log.failure is None and end_offset <= commit_log.flushed_offset

    def wake_when_holds(
        self, acks: Acks, end_offset: int, deadline_s: float, task: trio.lowlevel.Task
    ) -> WakeHandle | None:
        """``durable``: woken by the end of the fsync that covers ``end_offset`` (group
        commit's waiters), at the deadline, or on a failure. Not while hop tracing is
        on, where every write's hops are recorded by :meth:`wait`."""
        if acks is _DURABLE and not hop_trace.enabled:
            return self._store.group_commit.wake_when_durable(task, end_offset, deadline_s)
        return None

    def read_limit(self) -> int | None:
        return None


def _trace_sync(store: MessageStore, end_offset: int) -> None:
    """Record when the fdatasync that made the bytes below ``end_offset`` durable began and
    ended on the sync thread (the last one, if it covered them: one write at a time, as
    ``bench produce --trace`` sends)."""
    last = store.commit_log.last_sync
    if last is not None and last.flushed_offset >= end_offset:
        hop_trace.record_at("m.sync_began", end_offset, last.began)
        hop_trace.record_at("m.sync_ended", end_offset, last.ended)


class ReadLimited(Protocol):
    """What bounds a slave's reads: its follower (:class:`replication.slave.SlaveReplication`)."""

    def read_limit(self) -> int:
        """The master's confirm offset as the stream carried it, capped at the log end."""
        ...


class SlaveAcks:
    """The policy a slave holds: writes never get this far (the role gate answers
    ``NOT_MASTER`` first), so admit and wait are the standalone ones; reads stop at the
    master's confirm offset as the replication stream carries it (issue 7 point 2), so a
    consumer of a slave never sees a record a failover could take back.
    """

    def __init__(self, standalone: StandaloneAcks, follower: ReadLimited) -> None:
        self._standalone = standalone
        self._follower = follower

    def admit(self, acks: Acks) -> None:
        self._standalone.admit(acks)

    async def wait(self, acks: Acks, end_offset: int, timeout_ms: int) -> tuple[Status, str | None]:
        return await self._standalone.wait(acks, end_offset, timeout_ms)

    def holds(self, acks: Acks, end_offset: int) -> bool:
        return self._standalone.holds(acks, end_offset)

    def wake_when_holds(
        self, acks: Acks, end_offset: int, deadline_s: float, task: trio.lowlevel.Task
    ) -> WakeHandle | None:
        return None

    def read_limit(self) -> int | None:
        return self._follower.read_limit()


class ReplicatedAcks:
    """Ack levels on a master serving slaves through ``ha``.

    ``admit(replicated)`` refuses, before anything is appended, when fewer than
    ``min_insync_replicas`` slaves are *in sync* (:mod:`replication.insync`: connected,
    within the HA service's ``max_lag_bytes`` and caught up within its ``max_lag_ms``):
    the client can resend the write without risking a duplicate. Counting merely
    connected slaves would admit a write that then waits on a slave far behind and ends
    in ``FLUSH_SLAVE_TIMEOUT`` after it was stored -- the one answer a client cannot
    safely retry.

    ``wait(replicated)`` is group commit, then the HA *replicated* offset reaching the
    write's end: every slave in sync at the time has it, and those are at least
    ``min_insync_replicas`` (:meth:`HAService.require_in_sync`). A slave that drops out
    after the write was admitted does not let fewer acknowledge it: with fewer in sync
    the write waits for one to (re)join and catch up, else it ends in
    ``FLUSH_SLAVE_TIMEOUT`` saying so. One deadline covers both steps, so
    the request's ``timeout_ms`` is the whole budget. The two run side by side: the
    master's senders wake on the append, and ``admit(replicated)`` has the group commit
    start right after the append, before its bytes go to the slaves (no task of the
    flusher's is woken for it: that was a wake-up per pipelined round for nothing).
    ``wait(in_sync)`` is the confirm offset alone (admitted like ``replicated``).

    :meth:`read_limit` is the confirm offset: consumers never read past what the
    in-sync slaves hold, so a record a consumer saw survives the master's loss (if an
    in-sync slave takes over). The price: right after the master starts, and while no
    slave is in sync, the confirm offset does not move, so new records are not
    readable until a slave acknowledges them.
    """

    def __init__(self, durable: DurableAcks, ha: HAService, min_insync_replicas: int) -> None:
        if min_insync_replicas < 1:
            raise ValueError(f"min_insync_replicas must be at least 1, got {min_insync_replicas}")
        self._durable = durable
        self._ha = ha
        self.min_insync_replicas = min_insync_replicas
        ha.require_in_sync(min_insync_replicas)  # acks wait for the replicated offset

    def admit(self, acks: Acks) -> None:
        if hop_trace.enabled:
            hop_trace.record("m.admit", self._ha.store.commit_log.max_offset)
        if acks is not _IN_SYNC and acks is not _REPLICATED:  # not acks.needs_slaves
            return
        in_sync = self._ha.in_sync_count()
        if in_sync < self.min_insync_replicas:
            connected = len(self._ha.ack_offsets)
            raise RequestError(
                Status.SLAVE_NOT_AVAILABLE,
                f"acks={acks.value} needs {self.min_insync_replicas} in-sync slave(s) and "
                f"{in_sync} are in sync ({connected} connected); nothing was written: "
                "resend later or with acks=durable",
            )
        if acks is _REPLICATED:  # the fsync runs beside the slaves' round trip
            self._ha.fsync_before_next_send()  # it starts before the append's send

    async def wait(self, acks: Acks, end_offset: int, timeout_ms: int) -> tuple[Status, str | None]:
        """As :meth:`AckPolicy.wait`; a write whose level already holds is answered
        without a scheduling point (the durable part answers so too), so a connection's
        queue of waits (see ``cluster.server.connection``) releases every satisfied
        one in the same pass and their answers leave in one send."""
        ha = self._ha
        deadline: float | None = None
        if acks is not _IN_SYNC:
            deadline = trio.current_time() + timeout_ms / 1000  # one budget for both steps
            status, error = await self._durable.wait(acks, end_offset, timeout_ms)
            if acks is not _REPLICATED or status is not Status.OK:
                return status, error
        elif hop_trace.enabled:
            hop_trace.record("m.wait", end_offset)
        # in_sync reads the clock only when it has to wait: most of a released batch are
        # covered already (nothing awaited before this, so the deadline is the same).
        replicated = ha.replicated_now(end_offset) or await ha.wait_replicated(
            end_offset, trio.current_time() + timeout_ms / 1000 if deadline is None else deadline
        )
        if replicated:
            failure = self._ha.store.commit_log.failure
            if failure is not None:  # the master's page cache is suspect after a failed fsync
                raise failure
            if hop_trace.enabled:
                hop_trace.record("m.released", end_offset)
            return Status.OK, None
        return Status.FLUSH_SLAVE_TIMEOUT, self._slave_timeout(acks, end_offset, timeout_ms)

    def _slave_timeout(self, acks: Acks, end_offset: int, timeout_ms: int) -> str:
        """The error of a write the slaves did not release in time: which lagged, or
        that too few stayed in sync after it was admitted."""
        ha = self._ha
        held = sorted(name for name, offset in ha.ack_offsets.items() if offset >= end_offset)
        in_sync = ha.in_sync_count()
        if in_sync < self.min_insync_replicas:
            return (
                f"{_ON_MASTER[acks]}, but only {in_sync} slave(s) stayed in sync after it "
                f"was admitted, fewer than min_insync_replicas={self.min_insync_replicas}, "
                f"and none rejoined within {timeout_ms:.0f} ms (slaves holding it: "
                f"{held or 'none'}): it is not acknowledged at this level; resend only if "
                "duplicates are acceptable, once enough slaves are back in sync (status "
                "shows them), or read it back"
            )
        lagging = {name: offset for name, offset in ha.ack_offsets.items() if offset < end_offset}
        return (
            f"{_ON_MASTER[acks]}, but not acknowledged by the slaves within "
            f"{timeout_ms:.0f} ms (write ends at {end_offset}, acknowledged by the in-sync "
            f"slaves up to {ha.replicated_offset}, lagging slaves "
            f"{lagging or 'none connected'}): the "
            "write is probably stored; resend only if duplicates are acceptable"
        )

    def holds(self, acks: Acks, end_offset: int) -> bool:
        """``in_sync``: the replicated offset (see :meth:`HAService.require_in_sync`)
        reached ``end_offset``; ``replicated``: that and the durable part; ``durable``:
        the durable part. And no fsync failed, as in :meth:`wait` (which raises that
        failure instead of answering)."""
        if acks is not _IN_SYNC and not self._durable.holds(acks, end_offset):
            return False
        if acks is _IN_SYNC or acks is _REPLICATED:
            ha = self._ha
            return (
                ha.replicated_now(end_offset)
                and ha.store.commit_log.failure is None
                and not hop_trace.enabled
            )
        return True

    def wake_when_holds(
        self, acks: Acks, end_offset: int, deadline_s: float, task: trio.lowlevel.Task
    ) -> WakeHandle | None:
        """``in_sync`` and ``replicated``: woken when the confirm offset reaches
        ``end_offset`` (a ``replicated`` write whose fsync is still running then waits
        for it), at the deadline, or when this master turns stale."""
        if acks is _IN_SYNC or acks is _REPLICATED:
            return self._ha.wake_when_replicated(task, end_offset, deadline_s)
        return None

    def read_limit(self) -> int | None:
        return self._ha.confirm_offset

    def ack_status(self) -> AckStatus:
        """Every connected slave under ``slaves``, and under ``in_sync`` /
        ``out_of_sync`` the same slaves split by the in-sync decision, with their lag
        in bytes and ms."""
        lags = self._ha.slave_lags()
        return AckStatus(
            in_sync=tuple(_lag(lag) for lag in lags if lag.in_sync),
            out_of_sync=tuple(_lag(lag) for lag in lags if not lag.in_sync),
            min_insync_replicas=self.min_insync_replicas,
            confirm_offset=self._ha.confirm_offset,
            replicated_offset=self._ha.replicated_offset,
            slaves=tuple(
                ConnectedSlave(name, offset)
                for name, offset in sorted(self._ha.ack_offsets.items())
            ),
        )

    def status(self) -> dict[str, Any]:
        """:meth:`ack_status` as the wire map (the replication part of ``status``)."""
        return to_wire(self.ack_status())


_ON_MASTER = {
    Acks.IN_SYNC: "appended on the master",
    Acks.REPLICATED: "appended and fsynced on the master",
}
"""What a slave timeout says the master did, by level."""


def _lag(lag: SlaveLag) -> SlaveLagStatus:
    return SlaveLagStatus(lag.name, lag.ack_offset, lag.lag_bytes, lag.lag_ms)
