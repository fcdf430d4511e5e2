"""What a request handler gives back: an answer now, or a wait that answers later."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import trio

from cluster.protocol import Acks, Status
from cluster.server.errors import status_of
from storage.waiters import WakeHandle

if TYPE_CHECKING:
    from cluster.node.acks import AckPolicy

__all__ = ["AckTimer", "Deferred", "PendingAck", "Reply"]

Reply: TypeAlias = dict[str, Any]
"""A response map, ready to encode (``id``, ``status`` and the op's fields)."""
Deferred: TypeAlias = Callable[[], Awaitable[Reply]]
"""A request that must wait (durable ack, long poll): the connection runs it in a task."""
AckTimer: TypeAlias = Callable[[Acks, Status, float], None]
"""Told an answered write's ``acks``, status and seconds since its append."""

_OK: Final = Status.OK


class PendingAck:
    """A write's ack wait (a :data:`Deferred` that says what it waits for).

    The connection queues these instead of spawning a task each (a task per
    pipelined write cost more than the wait itself): a connection's writes at one
    ``acks`` level with non-decreasing deadlines are released in append order anyway,
    so one task awaits them in turn (see :class:`~cluster.server.connection.Connection`).
    ``deadline_s`` is absolute (``trio.current_time()`` clock), fixed when the write was
    appended: waiting behind another write never extends it. :meth:`answer_now` gives
    the ``OK`` answer when the level holds already (the ack policy's ``holds``), else
    None: the queue's task answers such a write without a coroutine, and awaits the
    others. :meth:`wake_on` has the policy wake the queue's idle task when the level may
    hold (``AckPolicy.wake_when_holds``; None: it registered nothing).

    One object per waiting write, holding what its answer needs (``respond(*fields)``
    builds it): no closure per write. Each write in flight was once about twenty
    objects the garbage collector tracks (closures, their cells, the request): with
    64 in flight that passed the collector's threshold, and the master ran collections
    (young and full) that writes at ``acks=leader`` never trigger. Immutable once built.
    """

    __slots__ = (
        "_appended_s",
        "_fields",
        "_policy",
        "_respond",
        "_timer",
        "acks",
        "deadline_s",
        "end_offset",
    )

    def __init__(
        self,
        policy: AckPolicy,
        acks: Acks,
        end_offset: int,
        appended_s: float,
        deadline_s: float,
        respond: Callable[..., Reply],
        fields: tuple[Any, ...],
        timer: AckTimer | None = None,
    ) -> None:
        self._policy = policy
        """The policy in force at the append: a wait queued behind another runs later,
        and a master that became a slave meanwhile would answer a replicated write with
        a slave's (standalone) wait, OK once fsynced, for a write nobody replicated."""
        self.acks = acks
        self.end_offset = end_offset
        self._appended_s = appended_s
        self.deadline_s = deadline_s
        self._respond = respond
        """Builds the answer from ``fields``, with ``status`` and ``error`` keywords for
        one that is not OK (``send_response``, ``send_batch_response``)."""
        self._fields = fields
        self._timer = timer

    def answer(self, status: Status = _OK, error: str | None = None) -> Reply:
        """The write's answer at ``status`` (where it was stored, whatever the status)."""
        if status is _OK:
            return self._respond(*self._fields)
        return self._respond(*self._fields, status=status, error=error)

    def record_wait(self, status: Status) -> None:
        """Tell the ack timer (metrics) this write was answered ``status`` now, for an
        answer given without awaiting the wait (a cut ended it)."""
        if self._timer is not None:
            self._timer(self.acks, status, trio.current_time() - self._appended_s)

    def answer_now(self) -> Reply | None:
        """The ``OK`` answer if the write's level holds now, else None (never yields)."""
        if not self._policy.holds(self.acks, self.end_offset):
            return None
        if self._timer is not None:
            self._timer(self.acks, _OK, trio.current_time() - self._appended_s)
        return self._respond(*self._fields)

    def wake_on(self, task: trio.lowlevel.Task) -> WakeHandle | None:
        """Have the policy wake ``task`` (parked by its own means) when the level may
        hold; None when it registered nothing (the caller wakes the task itself)."""
        return self._policy.wake_when_holds(self.acks, self.end_offset, self.deadline_s, task)

    def __call__(self) -> Awaitable[Reply]:
        return self._acknowledged()

    async def _acknowledged(self) -> Reply:
        # Time left of the write's own budget: it may have waited behind an earlier
        # write of its connection.
        left_ms = max(0, math.ceil((self.deadline_s - trio.current_time()) * 1000))
        timer = self._timer
        if timer is None:
            status, error = await self._policy.wait(self.acks, self.end_offset, left_ms)
            return self.answer(status, error)
        try:
            status, error = await self._policy.wait(self.acks, self.end_offset, left_ms)
        except Exception as exc:
            timer(self.acks, status_of(exc), trio.current_time() - self._appended_s)
            raise
        timer(self.acks, status, trio.current_time() - self._appended_s)
        return self.answer(status, error)
