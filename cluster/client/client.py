"""The client: connections to nodes (with reconnect), and the producers, consumers and
admin that share them."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from cluster.client.admin import Admin
from cluster.client.connection import Connection
from cluster.client.consumer import Consumer
from cluster.client.errors import (
    ConnectFailedError,
    ConnectionLostError,
    TidelogError,
    lone_error_as_itself,
)
from cluster.client.producer import Producer
from cluster.protocol import DEFAULT_MAX_FRAME_SIZE, ProtocolError, Status
from cluster.protocol.address import parse_address
from storage.backoff import Backoff

__all__ = ["Client", "ClientConfig", "open_client"]

log = logging.getLogger(__name__)

_WRITES = frozenset({"send", "send_batch", "create_topic"})
_HOPELESS = ("connection refused", "cannot resolve")
"""Failures that waiting will not cure, so a client's first connect reports them at once."""


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


class Client:
    """Connections to nodes, with reconnect; hands out producers, consumers and the admin.

    Use :func:`open_client`. One connection to the bootstrap addresses is shared by
    every producer and consumer of the client (pipelining makes that cheap); if it
    breaks, the next request reconnects, trying the addresses in order with backoff.
    A producer told ``NOT_MASTER`` with a hint gets its own connection to the hinted
    master (:meth:`connection` with ``address``). All methods may be called from any
    task of the client's trio run.
    """

    def __init__(self, config: ClientConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self._nursery = nursery
        self._connections: dict[tuple[str, ...], Connection] = {}
        self._connecting = trio.Lock()
        self._connected_once = False
        self.admin = Admin(self)

    async def connection(self, address: str | None = None) -> Connection:
        """The open connection to ``address`` (default: the bootstrap addresses), made
        on first use and again after it broke. Raises :class:`ConnectFailedError`."""
        addresses = self.config.bootstrap if address is None else (address,)
        connection = self._connections.get(addresses)
        if connection is not None and not connection.closed:
            return connection
        async with self._connecting:
            connection = self._connections.get(addresses)
            if connection is None or connection.closed:
                connection = await self._connect(addresses)
                self._connections[addresses] = connection
            return connection

    async def _connect(self, addresses: tuple[str, ...]) -> Connection:
        backoff = Backoff(self.config.reconnect_backoff, self.config.reconnect_backoff_max)
        deadline = trio.current_time() + self.config.connect_timeout
        errors: dict[str, str] = {}
        while True:
            for address in addresses:
                host, port = parse_address(address)
                try:
                    with trio.fail_after(max(0.01, deadline - trio.current_time())):
                        stream = await trio.open_tcp_stream(host, port)
                except (OSError, trio.TooSlowError) as exc:
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
            if trio.current_time() + backoff.peek_s() > deadline:
                raise ConnectFailedError(
                    f"cannot connect to any of {', '.join(addresses)} within "
                    f"{self.config.connect_timeout:g}s ({'; '.join(errors.values())})"
                )
            await trio.sleep(backoff.next_delay_s())

    async def call(
        self, op: str, /, *, timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """One request; reads are retried once on a fresh connection if the first one broke."""
        timeout = self.config.request_timeout if timeout is None else timeout
        try:
            try:
                return await (await self.connection()).request(op, timeout, **fields)
            except ConnectFailedError:
                raise
            except ConnectionLostError:
                if op in _WRITES:
                    raise
                return await (await self.connection()).request(op, timeout, **fields)
        except ProtocolError as invalid:  # refused by this client's own checks: nothing sent
            raise TidelogError(invalid.status, str(invalid)) from None

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
    if isinstance(exc, trio.TooSlowError):
        return f"no answer from {address} (connect timed out)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of {address}: {exc.strerror}"
    causes = exc.__cause__.exceptions if isinstance(exc.__cause__, BaseExceptionGroup) else ()
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
        async with trio.open_nursery() as nursery:
            client = Client(config, nursery)
            try:
                yield client
            finally:
                client.close()
                nursery.cancel_scope.cancel()
