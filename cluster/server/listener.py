"""The client port's listener: accepts connections, caps their number, shuts down
gracefully (stop accepting, answer new requests ``SHUTTING_DOWN``, let in-flight ones
finish within the grace period, close)."""

from __future__ import annotations

import logging
from functools import partial

import trio

from cluster.node.config import ServerSection
from cluster.protocol import Status, encode_frame, error_response
from cluster.server.connection import Connection
from cluster.server.handler import RequestHandler
from cluster.server.streams import GONE, linger, peer_name

__all__ = ["ClientServer"]

log = logging.getLogger(__name__)


class ClientServer:
    """Accepts connections on (host, port) and shuts down gracefully on :meth:`stop`."""

    def __init__(
        self, handler: RequestHandler, settings: ServerSection, host: str, port: int
    ) -> None:
        self.handler = handler
        self.settings = settings
        self._host = host
        self._port = port
        self._stop = trio.Event()
        self._connections: set[Connection] = set()
        self._inflight = 0
        self._idle = trio.Event()
        self.draining = False
        self.refused = 0
        self.address: tuple[str, int] | None = None

    @property
    def connections(self) -> int:
        return len(self._connections)

    def stop(self) -> None:
        """Begin the shutdown: stop accepting, drain, close (see :meth:`serve`)."""
        self._stop.set()

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report the bound ``(host, port)``, serve until :meth:`stop`; then stop
        accepting, let in-flight requests finish within ``shutdown_grace_ms`` (new ones
        are answered ``SHUTTING_DOWN``) and close every connection."""
        listeners, address = await self._listen()
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptor:
                    acceptor.start_soon(
                        partial(
                            trio.serve_listeners,
                            self._accept,
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    task_status.started(address)
                    await self._stop.wait()
                    acceptor.cancel_scope.cancel()
                await self._drain()
                connections.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
        log.info("server_stopped address=%s", self.address)

    async def _listen(self) -> tuple[list[trio.SocketListener], tuple[str, int]]:
        listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        if self._port == 0 and len(listeners) > 1:
            # Port 0 on a host with several addresses binds a different free port on each;
            # one node has one address, so keep the first.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = (host, port)
        log.info("server_listening host=%s port=%d", host, port)
        return listeners, (host, port)

    async def _accept(self, stream: trio.SocketStream) -> None:
        if len(self._connections) >= self.settings.max_connections:
            await self._refuse(stream)
            return
        connection = Connection(stream, self)
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:  # one client's failure must not end the server: logged, isolated
            log.exception("connection_failed peer=%s", connection.peer)
        finally:
            self._connections.discard(connection)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        self.refused += 1
        limit = self.settings.max_connections
        log.warning("connection_refused peer=%s limit=%d", peer_name(stream), limit)
        response = error_response(
            0,
            Status.TOO_MANY_CONNECTIONS,
            f"this node serves at most {limit} connections and all are in use: retry after a "
            "pause, or share connections between producers and consumers",
            max_connections=limit,
        )
        try:
            await stream.send_all(encode_frame(response))
            await linger(stream)
        except GONE:
            pass  # the refused peer left first: nothing more to tell it
        finally:
            await trio.aclose_forcefully(stream)

    # ---- in-flight accounting and draining -------------------------------------------------

    def admitted(self) -> None:
        self._inflight += 1

    def retired(self, count: int) -> None:
        self._inflight -= count
        if self._inflight <= 0:
            self._idle.set()

    async def _drain(self) -> None:
        self.draining = True
        for connection in self._connections:
            connection.polls.wake_all()
        grace = self.settings.shutdown_grace_ms / 1000
        with trio.move_on_after(grace) as scope:
            while self._inflight > 0:
                self._idle = trio.Event()
                await self._idle.wait()
        log.info(
            "server_drained inflight_left=%d connections=%d grace_expired=%s",
            self._inflight,
            len(self._connections),
            scope.cancelled_caught,
        )
