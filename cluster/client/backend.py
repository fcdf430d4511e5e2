"""The running event loop's own events, shielding scopes and parking, looked up once.

``anyio.Event()`` and ``anyio.CancelScope()`` ask which event loop runs at every call,
and under trio wrap trio's own objects (each call and each ``wait`` pays a layer: more
than the rest of a small request's bookkeeping). The client's hot paths (a parked
requester per request in flight, an event per message waiting in a batch, a shielded
send per request) take their classes and functions here once per connection or
producer: trio's own under trio, anyio's asyncio ones under asyncio. Both behave alike
for what the client uses (``set``, ``is_set``, ``wait``; a shielding ``with`` block;
:func:`parking`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from socket import socket
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import sniffio

__all__ = [
    "Event",
    "Slot",
    "direct_socket",
    "event_class",
    "loop_clock_and_checkpoint",
    "parking",
    "shield_scope_class",
]


class Event(Protocol):
    """What the client needs of an event: trio's and anyio's both are one."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> None: ...


def _running_trio() -> bool:
    try:
        return sniffio.current_async_library() == "trio"
    except sniffio.AsyncLibraryNotFoundError:  # no loop yet: anyio's adapters decide later
        return False


def event_class() -> Callable[[], Event]:
    """The event class to make events from in the running event loop."""
    if _running_trio():
        import trio  # under trio only: the client runs on asyncio without it

        return trio.Event
    return type(anyio.Event())


def shield_scope_class() -> Callable[..., AbstractContextManager[Any]]:
    """The cancel scope class of the running event loop (call it with ``shield=True``)."""
    if _running_trio():
        import trio

        return trio.CancelScope
    return type(anyio.CancelScope())


def direct_socket(stream: object) -> socket | None:
    """The socket of a plain TCP ``stream`` under trio, for writing to it without an await
    (None: TLS, a caller's own stream, or asyncio, whose transport writes at once itself).

    trio's ``send`` pays a shielded scope, two resource guards and a pass of the event loop
    after the write; a write to the non-blocking socket itself takes what fits at once and
    leaves the rest to ``send``. Only one task may write at a time, and never while a
    ``send`` of the same stream is under way (bytes would interleave).
    """
    if not _running_trio() or not isinstance(stream, anyio.abc.SocketStream):
        return None
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if not isinstance(raw, socket) or raw.getblocking() or not hasattr(raw, "sendmsg"):
        return None  # (no ``sendmsg`` on Windows: writes go by ``send``)
    return raw


def loop_clock_and_checkpoint() -> tuple[Callable[[], float], Callable[[], Awaitable[None]]]:
    """The running loop's own clock and checkpoint, looked up once per connection or client
    (anyio's ask which loop runs at every call, on every request's path): trio's own under trio,
    anyio's otherwise (and when no loop runs yet). Under trio the clock is the run's clock
    object's own (what ``trio.current_time`` reads, two calls fewer each time)."""
    if _running_trio():
        import trio

        return trio.lowlevel.current_clock().current_time, trio.lowlevel.checkpoint
    return anyio.current_time, anyio.lowlevel.checkpoint


NO_ANSWER: Any = object()
"""A :class:`Slot`'s answer until one is given."""


class Slot:
    """Where the answer to one request in flight goes, and who waits for it.

    ``waker`` is the parked requester (a trio task, or an asyncio future) while it
    waits, None before it parks and once its wait was cancelled. Whoever answers sets
    ``answer`` first, then wakes ``waker`` if set (see :func:`parking`); exactly one
    party answers a slot (the one that took it out of the connection's table).
    """

    __slots__ = ("answer", "waker")

    def __init__(self) -> None:
        self.answer: object = NO_ANSWER
        self.waker: object = None


def parking() -> tuple[Callable[[Slot], Awaitable[Any]], Callable[[Any], None]]:
    """``(park, wake)`` of the running event loop: ``await park(slot)`` returns once
    ``wake(slot.waker)`` ran for it (a cancelled park leaves ``slot.waker`` None).

    Under trio the requester parks itself and is rescheduled directly: a ``trio.Event``
    per request costs an object, a set of waiters and a closure on top (measured: 3.0 ->
    2.3 us per wait and wake-up, 64 tasks). Under asyncio, a future."""
    if _running_trio():
        import trio

        current_task = trio.lowlevel.current_task
        wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
        succeeded = trio.lowlevel.Abort.SUCCEEDED

        def park_trio(slot: Slot) -> Awaitable[Any]:
            """trio's own wait, returned to be awaited by the caller (no frame of its own)."""

            def abort(_: object) -> trio.lowlevel.Abort:
                slot.waker = None  # an answer that comes later wakes nobody
                return succeeded

            slot.waker = current_task()
            return wait_task_rescheduled(abort)

        return park_trio, trio.lowlevel.reschedule

    import asyncio

    async def park_asyncio(slot: Slot) -> None:
        future = asyncio.get_running_loop().create_future()
        slot.waker = future
        try:
            await future
        finally:
            slot.waker = None

    def wake_asyncio(future: Any) -> None:
        if not future.done():
            future.set_result(None)

    return park_asyncio, wake_asyncio
