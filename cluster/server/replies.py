"""What a request handler gives back: an answer now, or a wait that answers later."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import trio

from cluster.protocol import Acks
from storage.waiters import WakeHandle

__all__ = ["Deferred", "PendingAck", "Reply"]

Reply: TypeAlias = dict[str, Any]
"""A response map, ready to encode (``id``, ``status`` and the op's fields)."""
Deferred: TypeAlias = Callable[[], Awaitable[Reply]]
"""A request that must wait (durable ack, long poll): the connection runs it in a task."""


class PendingAck:
    """A write's ack wait (a :data:`Deferred` that says what it waits for).

    The connection queues these instead of spawning a task each (a task per
    pipelined write cost more than the wait itself): a connection's writes at one
    ``acks`` level with non-decreasing deadlines are released in append order anyway,
    so one task awaits them in turn (see :class:`~cluster.server.connection.Connection`).
    ``deadline_s`` is absolute (``trio.current_time()`` clock), fixed when the write was
    appended: waiting behind another write never extends it. ``answer_now`` gives the
    ``OK`` answer when the level holds already (the ack policy's ``holds``), else None:
    the queue's task answers such a write without a coroutine, and awaits the others.
    ``wake_on(task)`` has the policy wake the queue's idle task when the level may
    hold (``AckPolicy.wake_when_holds``; None: it registered nothing). Immutable once
    built.
    """

    __slots__ = ("_wait", "acks", "answer_now", "deadline_s", "wake_on")

    def __init__(
        self,
        acks: Acks,
        deadline_s: float,
        wait: Deferred,
        answer_now: Callable[[], Reply | None],
        wake_on: Callable[[trio.lowlevel.Task], WakeHandle | None],
    ) -> None:
        self.acks = acks
        self.deadline_s = deadline_s
        self._wait = wait
        self.answer_now = answer_now
        self.wake_on = wake_on

    def __call__(self) -> Awaitable[Reply]:
        return self._wait()
