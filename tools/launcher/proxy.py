"""A TCP proxy on loopback whose traffic a test can cut or black-hole: the network fault
between one node and etcd (or between two nodes) without touching anyone else.

``partition()`` keeps accepting connections but forwards nothing and answers nothing,
like a dropped route (clients see timeouts, not refusals); ``heal()`` ends it;
``cut()`` closes the connections open now (a broken stream; new ones work).
"""

from __future__ import annotations

import contextlib
import logging

import attrs
import trio

__all__ = ["TcpProxy"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024


@attrs.define
class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``. Run :meth:`serve` in a
    nursery (``port = await nursery.start(proxy.serve)``); the fault methods are called
    from any task of the same trio run."""

    target_host: str
    target_port: int
    port: int = 0
    chunk_bytes: int = CHUNK_BYTES
    """The largest piece forwarded at once: small values split every message the
    peers exchange across many reads (tests of stream parsers)."""
    connections: int = 0
    partitioned: bool = False
    _open: set[trio.CancelScope] = attrs.field(factory=set)
    _healed: trio.Event = attrs.field(factory=trio.Event)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def cut(self) -> None:
        """Close every connection open now; later ones are forwarded as before."""
        for scope in self._open:
            scope.cancel()

    def partition(self) -> None:
        """Silence: open connections are cut, new ones are accepted and ignored."""
        self.partitioned = True
        self._healed = trio.Event()
        self.cut()

    def heal(self) -> None:
        """End a partition: held connections start forwarding."""
        self.partitioned = False
        self._healed.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            if self.partitioned:
                await self._healed.wait()
            scope = trio.CancelScope()
            self._open.add(scope)
            try:
                with scope:
                    await self._forward(client)
            finally:
                self._open.discard(scope)

    async def _forward(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError as error:
            log.info("proxy cannot reach target port=%s error=%r", self.target_port, error)
            return
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        """Copy one direction; when either side ends or fails, end both."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(self.chunk_bytes):
                await sink.send_all(data)
        both.cancel()
