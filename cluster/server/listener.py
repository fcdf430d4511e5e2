"""The client port's listener: accepts connections, caps their number, shuts down
gracefully (stop accepting, answer new requests ``SHUTTING_DOWN``, let in-flight ones
finish within the grace period, close).

The cap is ``max_connections`` lowered to what the open-file limit affords
(:mod:`cluster.server.limits`). An accept that fails (``EMFILE`` when descriptors run
out anyway, or any other ``OSError``) never ends the node: the first failure of a burst
is logged, accepting backs off, and the recovery is logged once.
"""

from __future__ import annotations

import logging
import os
import resource
import ssl
from typing import Final

import trio

from cluster.node.config import ServerSection
from cluster.protocol import Status, encode_frame, error_response
from cluster.server.budget import ByteBudget
from cluster.server.connection import Connection
from cluster.server.handler import RequestHandler
from cluster.server.limits import connection_budget
from cluster.server.streams import GONE, linger, peer_name
from cluster.server.tls import accept_tls
from replication.tls import server_context
from storage.backoff import Backoff

__all__ = ["ClientServer"]

log = logging.getLogger(__name__)

MAX_REFUSALS_IN_FLIGHT: Final = 16
"""Refused connections being told why at once (each holds its descriptor for up to the
linger time); past this, a refused connection is closed without the error frame."""
ACCEPT_BACKOFF_INITIAL_S: Final = 0.01
ACCEPT_BACKOFF_MAX_S: Final = 1.0


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
        self.request_bytes = ByteBudget(settings.max_buffered_request_bytes)
        """Reserved by connections receiving a large frame (see :class:`Connection`)."""
        self.response_bytes = 0
        """Answer bytes queued or being sent, over all connections."""
        self._response_bytes_sent = trio.Event()
        self.draining = False
        self.refused = 0
        self._refusing = 0
        self.accept_failures = 0
        """Accepts that failed (``EMFILE`` and the like), since start."""
        self.max_connections = settings.max_connections
        """The cap in force: the configured one, lowered at :meth:`serve` if the
        open-file limit cannot afford it."""
        self.address: tuple[str, int] | None = None
        self._tls: ssl.SSLContext | None = None
        """With ``settings.tls``: every connection speaks TLS (see :mod:`cluster.server.tls`)."""

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
        self._apply_fd_budget()
        tls = self.settings.tls
        if tls is not None:
            self._tls = await trio.to_thread.run_sync(
                lambda: server_context(tls, require_client_cert=bool(tls.ca_file))
            )
        listeners, address = await self._listen()
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptor:
                    for listener in listeners:
                        acceptor.start_soon(self._accept_loop, listener, connections)
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
        log.info(
            "server_listening host=%s port=%d tls=%s",
            host,
            port,
            "none" if self._tls is None else "mutual" if self.settings.tls_ca_file else "server",
        )
        return listeners, (host, port)

    def _apply_fd_budget(self) -> None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        budget = connection_budget(
            self.settings.max_connections,
            None if soft == resource.RLIM_INFINITY else soft,
            _open_fds(),
        )
        self.max_connections = budget.max_connections
        if budget.lowered_because is not None:
            log.warning(
                "max_connections_lowered configured=%d now=%d reason=%r",
                self.settings.max_connections,
                budget.max_connections,
                budget.lowered_because,
            )

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        """Accept until cancelled; failures back off and are logged once per burst."""
        backoff = Backoff(ACCEPT_BACKOFF_INITIAL_S, ACCEPT_BACKOFF_MAX_S)
        failures = 0
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                failures += 1
                self.accept_failures += 1
                if failures == 1:
                    log.error(
                        "accept_failing error=%r connections=%d: backing off until it "
                        "succeeds (if it is EMFILE, raise ulimit -n or lower max_connections)",
                        exc,
                        len(self._connections),
                    )
                await trio.sleep(backoff.next_delay_s())
                continue
            if failures:
                log.warning("accept_recovered failures=%d", failures)
                failures = 0
                backoff.reset()
            connections.start_soon(self._accept, stream)

    async def _accept(self, stream: trio.SocketStream) -> None:
        if len(self._connections) >= self.max_connections:
            await self._refuse(stream)
            return
        served: trio.abc.Stream = stream
        if self._tls is not None:
            secured = await accept_tls(stream, self._tls)
            if secured is None:
                return  # a plain-TCP client (told so) or a failed handshake (logged)
            served = secured
        connection = Connection(served, self)
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:  # one client's failure must not end the server: logged, isolated
            log.exception("connection_failed peer=%s", connection.peer)
        finally:
            self._connections.discard(connection)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        self.refused += 1
        if self._refusing >= MAX_REFUSALS_IN_FLIGHT:
            await trio.aclose_forcefully(stream)  # a flood: keep the descriptors
            return
        self._refusing += 1
        try:
            await self._tell_refused(stream)
        finally:
            self._refusing -= 1

    async def _tell_refused(self, stream: trio.SocketStream) -> None:
        limit = self.max_connections
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

    # ---- memory of queued answers -----------------------------------------------------------

    def over_response_bytes(self, connection_unsent: int) -> bool:
        """A connection with ``connection_unsent`` answer bytes waiting must not take new
        requests: over its own bound, or the node's."""
        settings = self.settings
        return (
            connection_unsent >= settings.max_connection_response_bytes
            or self.response_bytes >= settings.max_buffered_response_bytes
        )

    def response_bytes_queued(self, count: int) -> None:
        self.response_bytes += count

    def response_bytes_sent(self, count: int) -> None:
        """``count`` answer bytes left the node (sent, or dropped with their connection)."""
        if not count:
            return
        self.response_bytes -= count
        assert self.response_bytes >= 0, self.response_bytes
        self._response_bytes_sent.set()
        self._response_bytes_sent = trio.Event()

    async def wait_response_bytes_sent(self) -> None:
        await self._response_bytes_sent.wait()

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


def _open_fds() -> int:
    """Descriptors this process has open now (0 where the OS does not tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0
