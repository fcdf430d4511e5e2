"""Socket helpers both ends of the client port use: peer names and a polite close."""

from __future__ import annotations

import contextlib
from typing import Final

import trio

__all__ = ["GONE", "LINGER_SECONDS", "RECEIVE_SIZE", "linger", "peer_name"]

RECEIVE_SIZE: Final = 64 * 1024
LINGER_SECONDS: Final = 1.0
"""After a fatal frame or a refused connection: how long to read and discard what the
client still sends, so that closing with unread input (which makes the kernel send a
reset) does not destroy the error frame before the client reads it."""
GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError)
"""What a send or receive raises once the peer is gone."""


def peer_name(stream: trio.abc.Stream) -> str:
    while isinstance(stream, trio.SSLStream):  # the client port with TLS
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return "?"
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


async def linger(stream: trio.abc.Stream) -> None:
    """Half-close (TLS has no half-close: its stream only discards), then discard input
    until EOF or :data:`LINGER_SECONDS` (see there)."""
    with trio.move_on_after(LINGER_SECONDS), contextlib.suppress(*GONE):  # gone: done
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        while await stream.receive_some(RECEIVE_SIZE):
            continue  # what the client still sends is discarded
