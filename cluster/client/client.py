"""The client: connections to nodes (with reconnect), and the producers, consumers and
admin that share them."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import anyio.abc
import attrs

from cluster.client.admin import Admin
from cluster.client.backend import loop_clock_and_checkpoint
from cluster.client.connection import Connection
from cluster.client.consumer import Consumer
from cluster.client.errors import (
    ConnectFailedError,
    ConnectionLostError,
    NotSentError,
    RequestTimeoutError,
    TidelogError,
    lone_error_as_itself,
)
from cluster.client.producer import Producer
from cluster.client.routing import (
    Attempt,
    ClusterView,
    Step,
    addresses_to_ask,
    best_view,
    next_step,
    view_from_metadata,
    view_from_status,
)
from cluster.client.tls import TlsHandshakeError, connect_tls
from cluster.protocol import DEFAULT_MAX_FRAME_SIZE, ProtocolError, Status
from cluster.protocol.address import parse_address
from storage.backoff import Backoff

__all__ = ["Client", "ClientConfig", "Delivery", "open_client"]

log = logging.getLogger(__name__)

_WRITES = frozenset({"send", "send_batch", "create_topic"})
_HOPELESS = ("connection refused", "cannot resolve", "TLS handshake")
"""Failures that waiting will not cure, so a client's first connect reports them at once."""

_OK: Final = Status.OK
"""(A module global: an enum member read through its class costs a descriptor call on
Python 3.11.)"""

RETRY_BACKOFF_MAX_S: Final = 0.25
"""The longest pause between two resends: a new master is found within about this much
of its election (a pause is a refused connect or one small request: cheap)."""


@attrs.frozen(kw_only=True)
class ClientConfig:
    bootstrap: tuple[str, ...]
    request_timeout: float = 30.0
    """Seconds to wait for any answer (writes add their own ``timeout_ms`` on top)."""
    connect_timeout: float = 5.0
    """Seconds a reconnect keeps trying. The first connection of a client gives up at once
    when every address refuses or does not resolve: waiting will not change that."""
    reconnect_backoff: float = 0.05
    reconnect_backoff_max: float = 2.0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    failover_timeout: float = 30.0
    """Seconds a request keeps looking for a node (reads) or for the master (writes)
    while the cluster fails over, before it is reported failed."""
    metadata_timeout: float = 1.0
    """Seconds one node gets to answer ``metadata`` while the master is looked for."""
    tls: ssl.SSLContext | None = None
    """Speak TLS to the nodes with this context (:func:`cluster.client.tls.client_tls`
    makes one from the CA file and an optional client certificate). None: plain TCP."""


@attrs.frozen
class Delivery:
    """How a request to the master ended: its final ``response`` (any status), or the
    ``error`` of no answer (:class:`NotSentError`: nothing was applied; any other: the
    outcome is unknown)."""

    response: dict[str, Any] | None
    error: ConnectionLostError | RequestTimeoutError | None = None


class Client:
    """Connections to nodes, with reconnect and master rediscovery; hands out producers,
    consumers and the admin.

    Use :func:`open_client`. Reads share one connection to any known node (the bootstrap
    addresses, then members learnt from ``metadata``); if it breaks, they reconnect to
    the next node that answers. Writes go to the master: the one a ``NOT_MASTER``
    answer named, or the one the nodes name in ``metadata`` (asked when the master
    cannot be reached or no hint says where it went; :meth:`rediscover`). The routing
    decisions live in :mod:`cluster.client.routing`.

    Invariant: ``epoch`` never decreases; ``master`` is None or the master of ``epoch``
    as last learnt. All methods may be called from any task of the client's event loop
    (trio or asyncio, through anyio).
    """

    def __init__(self, config: ClientConfig, nursery: anyio.abc.TaskGroup) -> None:
        self.config = config
        self._nursery = nursery
        self._connections: dict[str | None, Connection] = {}
        self._connecting = anyio.Lock()
        self._connected_once = False
        self.master: str | None = None
        """The master's client address as last learnt (None: unknown, ask any node)."""
        self.epoch: int | None = None
        """The epoch ``master`` leads (None: unknown, or a cluster without epochs)."""
        self.members: tuple[str, ...] = ()
        """Client addresses of the group's members, learnt from ``metadata``."""
        self.rediscoveries = 0
        """How many times the nodes were asked who the master is."""
        self.last_answered = 0
        """How many nodes answered the last rediscovery."""
        self._rediscovering = anyio.Lock()
        self._now, _ = loop_clock_and_checkpoint()
        self.admin = Admin(self)

    @property
    def connected_once(self) -> bool:
        return self._connected_once

    @property
    def known_addresses(self) -> tuple[str, ...]:
        """Where to look for a node: the bootstrap addresses, then learnt members."""
        return addresses_to_ask(self.config.bootstrap, self.members)

    async def connection(self, address: str | None = None, *, patient: bool = True) -> Connection:
        """The open connection to ``address`` (default: any known node), made on first
        use and again after it broke. ``patient``: keep trying for ``connect_timeout``
        (else one round over the addresses). Raises :class:`ConnectFailedError`."""
        connection = self._connections.get(address)
        if connection is not None and not connection.closed:
            return connection
        async with self._connecting:
            connection = self._connections.get(address)
            if connection is None or connection.closed:
                addresses = self.known_addresses if address is None else (address,)
                connection = await self._connect(addresses, patient=patient)
                self._connections[address] = connection
            return connection

    async def _connect(self, addresses: tuple[str, ...], *, patient: bool = True) -> Connection:
        backoff = Backoff(self.config.reconnect_backoff, self.config.reconnect_backoff_max)
        deadline = anyio.current_time() + self.config.connect_timeout
        errors: dict[str, str] = {}
        while True:
            for address in addresses:
                host, port = parse_address(address)
                try:
                    with anyio.fail_after(max(0.01, deadline - anyio.current_time())):
                        tcp = await anyio.connect_tcp(host, port)
                        stream: anyio.abc.ByteStream = tcp
                        if self.config.tls is not None:
                            stream = await connect_tls(tcp, self.config.tls, host)
                except OSError as exc:  # TimeoutError included
                    errors[address] = _why_not_connected(address, exc)
                    continue
                connection = Connection(stream, address, self.config.max_frame_size)
                await connection.start(self._nursery)
                self._connected_once = True
                log.debug("connected address=%s", address)
                return connection
            if not self._connected_once and all(
                why.startswith(_HOPELESS) for why in errors.values()
            ):
                raise ConnectFailedError("; ".join(errors.values()))
            if not patient or anyio.current_time() + backoff.peek_s() > deadline:
                raise ConnectFailedError(
                    f"cannot connect to any of {', '.join(addresses)}"
                    + (f" within {self.config.connect_timeout:g}s" if patient else "")
                    + f" ({'; '.join(errors.values())})"
                )
            await anyio.sleep(backoff.next_delay_s())

    # ---- where the master is ---------------------------------------------------------------

    def follow_hint(self, master: str, epoch: int | None) -> bool:
        """Take the master a ``NOT_MASTER`` answer named, unless its epoch is older than
        the one known. Returns whether it was taken."""
        if epoch is not None and self.epoch is not None and epoch < self.epoch:
            return False
        if master != self.master:
            log.info("master_hint master=%s epoch=%s was=%s", master, epoch, self.master)
        self.master = master
        if epoch is not None:
            self.epoch = epoch
        return True

    async def rediscover(self, seen: int | None = None) -> ClusterView | None:
        """Ask every known node who the master is (``metadata``; ``status`` on nodes
        without it) and take the answer with the highest epoch. Learnt members become
        extra addresses to look at. ``seen``: the :attr:`rediscoveries` count the caller
        saw before its failure; if another task asked since, its answer is used as is.
        Returns the best view (None: no node named a master)."""
        async with self._rediscovering:
            if seen is not None and seen != self.rediscoveries:
                return None if self.master is None else ClusterView("", self.epoch, self.master)
            views: list[ClusterView] = []
            async with anyio.create_task_group() as nursery:
                for address in self.known_addresses:
                    nursery.start_soon(self._ask_view, address, views)
            self.rediscoveries += 1
            self.last_answered = len(views)
            members = [m for view in views for m in view.members]
            self.members = addresses_to_ask(members, ())
            best = best_view(views)
            stale = best is not None and (
                best.epoch is not None and self.epoch is not None and best.epoch < self.epoch
            )
            if best is None or stale:
                self.master = None
                log.info(
                    "rediscover_no_master asked=%d answered=%d",
                    len(self.known_addresses),
                    len(views),
                )
                return None
            assert best.master is not None
            if best.master != self.master:
                log.info(
                    "rediscover master=%s epoch=%s was=%s", best.master, best.epoch, self.master
                )
            self.master = best.master
            if best.epoch is not None:
                self.epoch = best.epoch
            return best

    async def _ask_view(self, address: str, views: list[ClusterView]) -> None:
        timeout = self.config.metadata_timeout
        with anyio.move_on_after(timeout):
            try:
                connection = await self.connection(address, patient=False)
                view = await self._metadata(connection, timeout)
            except (TidelogError, ProtocolError) as exc:
                log.debug("rediscover_unanswered address=%s error=%s", address, exc)
                return
            if view is not None:
                views.append(view)

    async def _metadata(self, connection: Connection, timeout: float) -> ClusterView | None:
        """One node's view: its ``metadata``, or its ``status`` when it cannot serve that
        op (an older node, or one without coordination that refuses it)."""
        try:
            answer = await connection.request("metadata", timeout)
        except ProtocolError as exc:  # this client's protocol has no metadata op
            if exc.status is not Status.UNKNOWN_OP:
                raise
            answer = {"status": Status.UNKNOWN_OP}
        if answer["status"] is Status.OK:
            return view_from_metadata(connection.address, answer)
        status = await connection.request("status", timeout)
        if status["status"] is not Status.OK:
            return None
        return view_from_status(connection.address, status)

    async def request_master(
        self,
        op: str,
        timeout: float,
        /,
        *,
        resends: int,
        backoff_initial_s: float = 0.05,
        **fields: Any,
    ) -> Delivery:
        """Send ``op`` to the master, following hints and rediscovering it, resending
        only what was certainly not applied, at most ``resends`` times and for at most
        ``failover_timeout``. Raises ``ProtocolError`` for a request this client refuses
        before sending."""
        return await self.deliver(
            op, timeout, fields, resends=resends, backoff_initial_s=backoff_initial_s
        )

    async def deliver(
        self,
        op: str,
        timeout: float,
        fields: dict[str, Any],
        *,
        resends: int,
        backoff_initial_s: float = 0.05,
    ) -> Delivery:
        """:meth:`request_master` with the fields in a dict (read, not changed): the producer's
        path, which builds them itself."""
        deadline = self._now() + self.config.failover_timeout
        backoff: Backoff | None = None  # made at the first resend: most requests need none
        done = 0
        followed = False
        while True:
            seen = self.rediscoveries
            response: dict[str, Any] | None = None
            error: ConnectionLostError | None = None
            target = self.master
            try:
                connection = self._connections.get(target)  # open: no coroutine to await
                if connection is None or connection.closed:
                    connection = await self.connection(target, patient=target is None)
            except ConnectFailedError as exc:
                attempt, error = Attempt(sent=False, status=None, address=target), exc
            else:
                try:
                    response = await connection.request_fields(op, timeout, fields)
                except NotSentError as exc:
                    attempt, error = Attempt(sent=False, status=None, address=target), exc
                except (ConnectionLostError, RequestTimeoutError) as exc:
                    return Delivery(None, exc)  # maybe applied: never resent
                else:
                    status = response["status"]
                    if status is _OK or not status.retryable:  # final: what next_step says too
                        return Delivery(response)
                    attempt = self._attempt(connection.address, response)
            step = next_step(
                attempt,
                resends_left=done < resends,
                time_left=anyio.current_time() < deadline,
                followed_hint_last=followed,
                may_wait_for_nodes=self._connected_once,
            )
            if step is Step.DONE:
                return Delivery(response, error)
            done += 1
            followed = step is Step.FOLLOW_HINT
            if step is Step.FOLLOW_HINT:
                assert attempt.hint is not None
                continue
            log.info(
                "resend op=%s step=%s to=%s status=%s",
                op,
                step.value,
                attempt.address,
                attempt.status,
            )
            if backoff is None:
                initial_s = max(backoff_initial_s, 1e-3)
                backoff = Backoff(initial_s, max(backoff_initial_s, RETRY_BACKOFF_MAX_S))
            await anyio.sleep(
                min(backoff.next_delay_s(), max(0.0, deadline - anyio.current_time()))
            )
            if step is Step.REDISCOVER:
                await self._find_master(seen, deadline, backoff)

    def _attempt(self, address: str, response: dict[str, Any]) -> Attempt:
        """The attempt an answer makes; a usable ``NOT_MASTER`` hint is taken at once."""
        status = response["status"]
        hint = response.get("master") if status is Status.NOT_MASTER else None
        if isinstance(hint, str) and self.follow_hint(hint, response.get("epoch")):
            return Attempt(sent=True, status=status, address=address, hint=hint)
        return Attempt(sent=True, status=status, address=address)

    async def _find_master(self, seen: int, deadline: float, backoff: Backoff) -> None:
        """Rediscover until some node names a master, or nobody answers, or ``deadline``:
        while an election runs, the nodes answer but name nobody, and a send would only
        be refused."""
        view = await self.rediscover(seen)
        while view is None and self.last_answered and anyio.current_time() < deadline:
            await anyio.sleep(
                min(backoff.next_delay_s(), max(0.0, deadline - anyio.current_time()))
            )
            view = await self.rediscover()

    async def call(
        self, op: str, /, *, timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """One request, answered by whichever node the client's shared connection reaches
        (any status; a ``NOT_MASTER`` is returned, not followed: :meth:`request_master`
        follows it). Writes are never resent; reads go to another known node while the
        one they used cannot be reached or is shutting down, for up to ``failover_timeout``."""
        timeout = self.config.request_timeout if timeout is None else timeout
        try:
            if op in _WRITES:
                return await (await self.connection()).request(op, timeout, **fields)
            return await self._read(op, timeout, fields)
        except ProtocolError as invalid:  # refused by this client's own checks: nothing sent
            raise TidelogError(invalid.status, str(invalid)) from None

    async def call_master(
        self, op: str, /, *, timeout: float | None = None, resends: int = 5, **fields: Any
    ) -> dict[str, Any]:
        """One request to the master (:meth:`request_master`); its final answer, any
        status. Raises :class:`ConnectionLostError` (its subclasses say whether it was
        sent) or :class:`RequestTimeoutError` when no answer came."""
        timeout = self.config.request_timeout if timeout is None else timeout
        try:
            delivery = await self.request_master(op, timeout, resends=resends, **fields)
        except ProtocolError as invalid:
            raise TidelogError(invalid.status, str(invalid)) from None
        if delivery.error is not None:
            raise delivery.error
        assert delivery.response is not None
        return delivery.response

    async def _read(self, op: str, timeout: float, fields: dict[str, Any]) -> dict[str, Any]:
        deadline = anyio.current_time() + self.config.failover_timeout
        backoff = Backoff(self.config.reconnect_backoff, RETRY_BACKOFF_MAX_S)
        while True:
            seen = self.rediscoveries
            try:
                connection = await self.connection()
                answer = await connection.request(op, timeout, **fields)
            except RequestTimeoutError:
                raise
            except ConnectionLostError as exc:  # reads change nothing: ask another node
                hopeless = isinstance(exc, ConnectFailedError) and not self._connected_once
                if hopeless or anyio.current_time() >= deadline:
                    raise
                log.info("read_retry op=%s error=%s", op, exc.message)
            else:
                if answer["status"] is not Status.SHUTTING_DOWN or anyio.current_time() >= deadline:
                    return answer
                # The node is going away (it accepts no more, did nothing, and closes the
                # connection next): leave it now and read from another, as after a break.
                connection.close()
                log.info("read_retry op=%s error=%s", op, f"{connection.address} shutting down")
            await anyio.sleep(
                min(backoff.next_delay_s(), max(0.0, deadline - anyio.current_time()))
            )
            await self.rediscover(seen)

    async def checked(self, op: str, /, **fields: Any) -> dict[str, Any]:
        """:meth:`call`, raising :class:`TidelogError` unless the answer is ``OK``."""
        response = await self.call(op, **fields)
        if response["status"] is not Status.OK:
            raise TidelogError(response["status"], response.get("error", ""), response)
        return response

    def producer(self, **options: Any) -> Producer:
        return Producer(self, self._nursery, **options)

    def consumer(self, topic: str, **options: Any) -> Consumer:
        return Consumer(self, topic, **options)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()


def _why_not_connected(address: str, exc: BaseException) -> str:
    """One phrase for a failed connect: refused, unknown host, or what the OS said."""
    if isinstance(exc, TimeoutError):
        return f"no answer from {address} (connect timed out)"
    if isinstance(exc, TlsHandshakeError):
        return f"TLS handshake with {address} failed: {exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of {address}: {exc.strerror}"
    cause = exc.__cause__
    causes = (
        cause.exceptions if isinstance(cause, BaseExceptionGroup) else (cause,) if cause else ()
    )
    if isinstance(exc, ConnectionRefusedError) or (
        causes and all(isinstance(cause, ConnectionRefusedError) for cause in causes)
    ):
        return (
            f"connection refused at {address}: no node listens there "
            "(is it running? is the port right?)"
        )
    return f"{address}: {exc}"


@asynccontextmanager
async def open_client(bootstrap: str | Sequence[str], **options: Any) -> AsyncIterator[Client]:
    """A :class:`Client` whose connections live for the ``async with`` block.

    Raises ``ValueError`` for an address that is not ``host:port``.
    """
    addresses = (bootstrap,) if isinstance(bootstrap, str) else tuple(bootstrap)
    for address in addresses:
        parse_address(address)
    config = ClientConfig(bootstrap=addresses, **options)
    with lone_error_as_itself():
        async with anyio.create_task_group() as nursery:
            client = Client(config, nursery)
            try:
                yield client
            finally:
                client.close()
                nursery.cancel_scope.cancel()
