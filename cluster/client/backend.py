"""The running event loop's own events and shielding scopes, looked up once.

``anyio.Event()`` and ``anyio.CancelScope()`` ask which event loop runs at every call,
and under trio wrap trio's own objects (each call and each ``wait`` pays a layer: more
than the rest of a small request's bookkeeping). The client's hot paths (an event per
request in flight and per message waiting in a batch, a shielded send per request) take
their classes here once per connection or producer: trio's own under trio, anyio's
asyncio ones under asyncio. Both behave alike for what the client uses (``set``,
``is_set``, ``wait``; a shielding ``with`` block).
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
    "direct_socket",
    "event_class",
    "loop_clock_and_checkpoint",
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
    return raw if isinstance(raw, socket) and not raw.getblocking() else None


def loop_clock_and_checkpoint() -> tuple[Callable[[], float], Callable[[], Awaitable[None]]]:
    """The running loop's own clock and checkpoint, looked up once per connection or client
    (anyio's ask which loop runs at every call, on every request's path): trio's own under trio,
    anyio's otherwise (and when no loop runs yet)."""
    if _running_trio():
        import trio

        return trio.current_time, trio.lowlevel.checkpoint
    return anyio.current_time, anyio.lowlevel.checkpoint
