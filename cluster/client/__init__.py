"""The tidelog client library (trio): connections, producer, consumer, admin.

The common path::

    async with open_client("127.0.0.1:7600") as client:
        await client.admin.create_topic("orders", queues=4)
        result = await client.producer().send("orders", b"hello", key="customer-7")
        if result.outcome == "ok": ...          # stored at result.offset / result.queue_offset
        async with client.consumer("orders", start="earliest") as consumer:
            async for message in consumer:
                handle(message.body)

Every write answers with a :class:`SendResult` whose ``outcome`` says what is
known: ``"ok"`` (acknowledged at the requested level), ``"failed"`` (nothing was
written) or ``"unknown"`` (a timeout or a lost connection: it may or may not be
stored, so resending may duplicate it). The library never reports an unknown
outcome as a failure or as a success.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import trio

from cluster.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    Acks,
    ProtocolError,
    ResponseDecoder,
    Status,
    batch_results,
    encode_frame,
    make_request,
)
from storage.concurrency import lone_error_unwrapped

log = logging.getLogger(__name__)

Outcome = Literal["ok", "failed", "unknown"]
RECEIVE_CHUNK = 256 * 1024


class TidelogError(Exception):
    """A request the node answered with an error status (or could not be sent at all)."""

    def __init__(
        self, status: Status | None, message: str, response: Mapping[str, Any] | None = None
    ):
        super().__init__(f"{status.value if status else 'NO_ANSWER'}: {message}")
        self.status = status
        self.response = dict(response or {})


class ConnectionLostError(TidelogError):
    """The connection closed with the request in flight: its outcome is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class RequestTimeoutError(TidelogError):
    """No answer in time: the request's outcome is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:7600``) -> (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {address!r} must be host:port, e.g. 127.0.0.1:7600")
    return host.strip("[]"), int(port)


# ---- one connection ----------------------------------------------------------------------


class Connection:
    """One TCP connection with pipelined requests, answered in any order and matched by id.

    Owns one task (in the nursery given to :meth:`start`): the reader that matches
    responses to waiting requests. There is no writer task: a request appends its
    frame to the outbox, and if nobody is sending, it sends everything queued
    itself (frames queued meanwhile by others go in the same loop), so pipelined
    requests share syscalls and an idle connection costs no task switch.
    """

    def __init__(self, stream: trio.SocketStream, address: str, max_frame_size: int) -> None:
        self.address = address
        self._stream = stream
        self._decoder = ResponseDecoder(max_frame_size)
        self._max_frame_size = max_frame_size
        self._ids = itertools.count(1)
        self._waiting: dict[int, list] = {}  # id -> [event, response | error]
        self._outbox = bytearray()
        self._sending = False
        self._closed: str | None = None
        self._cancel = trio.CancelScope()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        with self._cancel:
            try:
                await self._read_loop()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail(f"connection to {self.address} lost: {exc}")
        self._fail(f"connection to {self.address} closed")
        await self._stream.aclose()

    async def _read_loop(self) -> None:
        while True:
            data = await self._stream.receive_some(RECEIVE_CHUNK)
            if not data:
                self._fail(f"node {self.address} closed the connection")
                return
            self._decoder.feed(data)
            for frame in self._decoder:
                if isinstance(frame, ProtocolError):
                    self._answer(frame.req_id, frame)
                else:
                    self._answer(frame["id"], frame)

    def _answer(self, req_id: int, answer: object) -> None:
        slot = self._waiting.pop(req_id, None)
        if slot is None:
            if isinstance(answer, dict) and answer.get("status") is Status.FRAME_TOO_LARGE:
                self._fail(f"node closed the connection: {answer.get('error')}")
            else:
                log.warning("unmatched_response address=%s id=%d", self.address, req_id)
            return
        slot[1] = answer
        slot[0].set()

    async def _send_outbox(self) -> None:
        """Send until the outbox is empty. Shielded: a half-sent frame would corrupt the
        stream for every other request on this connection."""
        self._sending = True
        try:
            with trio.CancelScope(shield=True):
                while self._outbox:
                    data, self._outbox = self._outbox, bytearray()
                    await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"connection to {self.address} lost while sending: {exc}")
        finally:
            self._sending = False

    def _fail(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot[1] = ConnectionLostError(reason)
            slot[0].set()

    def close(self) -> None:
        self._fail(f"connection to {self.address} closed by the client")
        self._cancel.cancel()

    async def request(self, op: str, timeout: float, /, **fields: Any) -> dict[str, Any]:
        """Send one request and return its response (any status).

        Raises :class:`ConnectionLostError` or :class:`RequestTimeoutError` when no
        answer comes (outcome unknown), ``ProtocolError`` for a request this
        client can tell is invalid before sending it.
        """
        if self._closed is not None:
            raise ConnectionLostError(self._closed)
        req_id = next(self._ids)
        frame = encode_frame(
            make_request(op, req_id, **fields), max_frame_size=self._max_frame_size
        )
        slot: list = [trio.Event(), None]
        self._waiting[req_id] = slot
        self._outbox += frame
        if not self._sending:
            await self._send_outbox()
        with trio.move_on_after(timeout):
            await slot[0].wait()
        if not slot[0].is_set():
            self._waiting.pop(req_id, None)
            raise RequestTimeoutError(
                f"no answer to {op!r} from {self.address} within {timeout:.1f}s; "
                "a write may or may not have been applied"
            )
        answer = slot[1]
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, ProtocolError):
            raise TidelogError(answer.status, str(answer))
        return answer


# ---- the client: connection management ------------------------------------------------


@attrs.frozen(kw_only=True)
class ClientConfig:
    bootstrap: tuple[str, ...]
    request_timeout: float = 30.0
    """Seconds to wait for any answer (writes add their own ``timeout_ms`` on top)."""
    connect_timeout: float = 5.0
    reconnect_backoff: float = 0.05
    reconnect_backoff_max: float = 2.0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE


class Client:
    """Connections to a node, with reconnect; hands out producers, consumers and the admin.

    Use :func:`open_client`. One connection is shared by every producer and
    consumer of the client (pipelining makes that cheap); if it breaks, the next
    request reconnects, trying the bootstrap addresses in order with backoff.
    """

    def __init__(self, config: ClientConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self._nursery = nursery
        self._connection: Connection | None = None
        self._connecting = trio.Lock()
        self.admin = Admin(self)

    async def connection(self) -> Connection:
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        async with self._connecting:
            if self._connection is None or self._connection.closed:
                self._connection = await self._connect()
            return self._connection

    async def _connect(self) -> Connection:
        backoff = self.config.reconnect_backoff
        deadline = trio.current_time() + self.config.connect_timeout
        errors = []
        while True:
            for address in self.config.bootstrap:
                host, port = parse_address(address)
                try:
                    with trio.fail_after(max(0.01, deadline - trio.current_time())):
                        stream = await trio.open_tcp_stream(host, port)
                except (OSError, trio.TooSlowError) as exc:
                    errors.append(f"{address}: {exc or 'timed out'}")
                    continue
                connection = Connection(stream, address, self.config.max_frame_size)
                await connection.start(self._nursery)
                log.debug("connected address=%s", address)
                return connection
            if trio.current_time() + backoff > deadline:
                raise ConnectionLostError(
                    "cannot connect to any of "
                    + ", ".join(self.config.bootstrap)
                    + f" ({'; '.join(errors[-len(self.config.bootstrap) :])}); is the node running?"
                )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.config.reconnect_backoff_max)

    async def call(
        self, op: str, /, *, timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """One request; reads are retried once on a fresh connection if the first one broke."""
        timeout = self.config.request_timeout if timeout is None else timeout
        try:
            try:
                return await (await self.connection()).request(op, timeout, **fields)
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
        if self._connection is not None:
            self._connection.close()


_WRITES = frozenset({"send", "send_batch", "create_topic"})


@asynccontextmanager
async def open_client(bootstrap: str | Sequence[str], **options: Any) -> AsyncIterator[Client]:
    """A :class:`Client` whose connections live for the ``async with`` block."""
    addresses = (bootstrap,) if isinstance(bootstrap, str) else tuple(bootstrap)
    for address in addresses:
        parse_address(address)
    config = ClientConfig(bootstrap=addresses, **options)
    with lone_error_unwrapped():
        async with trio.open_nursery() as nursery:
            client = Client(config, nursery)
            try:
                yield client
            finally:
                client.close()
                nursery.cancel_scope.cancel()


# ---- producing ---------------------------------------------------------------------------


@attrs.frozen
class SendResult:
    """What is known about one sent message.

    ``outcome`` is ``"ok"`` when the node acknowledged it at the requested level,
    ``"failed"`` when nothing was written (``status`` says why; None: no connection could
    be made, so nothing was sent), and
    ``"unknown"`` when it may or may not be stored (a flush timeout, no answer).
    Offsets are set whenever the node reported them (``OK`` and flush timeouts).
    """

    outcome: Outcome
    status: Status | None
    topic: str
    queue: int | None = None
    queue_offset: int | None = None
    offset: int | None = None
    store_us: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def raise_for_outcome(self) -> SendResult:
        """Return self when ok; raise :class:`TidelogError` (status None = unknown) otherwise."""
        if self.outcome != "ok":
            raise TidelogError(self.status, self.error or self.outcome)
        return self


def _result(topic: str, status: Status, entry: Mapping[str, Any], error: str | None) -> SendResult:
    if status is Status.OK:
        outcome: Outcome = "ok"
    elif status.outcome_unknown:
        outcome = "unknown"
    else:
        outcome = "failed"
    return SendResult(
        outcome,
        status,
        topic,
        entry.get("queue"),
        entry.get("queue_offset"),
        entry.get("offset"),
        entry.get("store_us"),
        error,
    )


@attrs.define
class _Pending:
    """A message waiting in the accumulator, and where its result goes."""

    message: dict[str, Any]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: SendResult | None = None


class Producer:
    """Sends messages, batching concurrent sends like Kafka's ``linger.ms``/``batch.size``.

    Every :meth:`send` joins the open batch of its (topic, acks); a batch leaves
    when it holds ``batch_size`` messages or ``max_batch_bytes`` of bodies, or
    ``linger_ms`` after its first message (0: at the next scheduling point, so
    sends made in the same moment still share a request). Batches are pipelined;
    retryable statuses (``NOT_MASTER``, ``SLAVE_NOT_AVAILABLE``, ``SHUTTING_DOWN``)
    are retried with exponential backoff, nothing else is.
    """

    def __init__(
        self,
        client: Client,
        nursery: trio.Nursery,
        *,
        acks: str = "durable",
        linger_ms: float = 0.0,
        batch_size: int = 256,
        max_batch_bytes: int = 1 << 20,
        timeout_ms: int = 5000,
        retries: int = 5,
        retry_backoff_ms: float = 50.0,
    ) -> None:
        self.client = client
        self._nursery = nursery
        self.acks = Acks(acks)
        self.linger = linger_ms / 1000
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.retry_backoff = retry_backoff_ms / 1000
        self._open: dict[tuple[str, Acks], list[_Pending]] = {}
        self._open_bytes: dict[tuple[str, Acks], int] = {}

    async def send(
        self,
        topic: str,
        body: bytes,
        *,
        key: bytes | str | None = None,
        queue: int | None = None,
        tags: str | None = None,
        props: Mapping[str, str] | None = None,
        acks: str | None = None,
    ) -> SendResult:
        """Send one message; returns once its outcome is known (or known to be unknown)."""
        message: dict[str, Any] = {"body": body}
        if key is not None:
            message["key"] = key
        if queue is not None:
            message["queue"] = queue
        if tags is not None:
            message["tags"] = tags
        if props:
            message["props"] = dict(props)
        pending = _Pending(message)
        batch_key = (topic, Acks(acks) if acks else self.acks)
        full = self._join(batch_key, pending)
        if full is not None:  # this send filled the batch: deliver it from this task
            await self._send_batch(batch_key, full)
        else:
            await pending.done.wait()
        assert pending.result is not None
        return pending.result

    async def send_batch(
        self,
        topic: str,
        bodies: Sequence[bytes],
        *,
        queue: int | None = None,
        key: bytes | str | None = None,
        acks: str | None = None,
    ) -> list[SendResult]:
        """Send many messages as one request (RocketMQ's batch send): appended together,
        all or nothing, one ack wait for all. Returns one result per body, in order."""
        message: dict[str, Any] = {}
        if queue is not None:
            message["queue"] = queue
        if key is not None:
            message["key"] = key
        messages = [dict(message, body=body) for body in bodies]
        return await self._deliver(topic, Acks(acks) if acks else self.acks, messages)

    def _join(self, batch_key: tuple[str, Acks], pending: _Pending) -> list[_Pending] | None:
        """Add ``pending`` to the open batch; return the batch if it is now full (closed)."""
        batch = self._open.get(batch_key)
        if batch is None:
            batch = []
            if self.batch_size > 1:
                self._open[batch_key] = batch
                self._open_bytes[batch_key] = 0
                self._nursery.start_soon(self._linger_then_ship, batch_key, batch)
        batch.append(pending)
        if self.batch_size == 1:
            return batch
        self._open_bytes[batch_key] += len(pending.message["body"])
        if len(batch) >= self.batch_size or self._open_bytes[batch_key] >= self.max_batch_bytes:
            self._close(batch_key)
            return batch
        return None

    async def _linger_then_ship(self, batch_key: tuple[str, Acks], batch: list[_Pending]) -> None:
        if self.linger > 0:
            await trio.sleep(self.linger)
        else:
            await trio.lowlevel.checkpoint()
        if self._open.get(batch_key) is batch:
            self._close(batch_key)
            await self._send_batch(batch_key, batch)

    def _close(self, batch_key: tuple[str, Acks]) -> None:
        del self._open[batch_key]
        del self._open_bytes[batch_key]

    async def _send_batch(self, batch_key: tuple[str, Acks], batch: list[_Pending]) -> None:
        topic, acks = batch_key
        results = [self._unknown(topic, "the producer closed before the node answered")] * len(
            batch
        )
        try:
            results = await self._deliver(topic, acks, [p.message for p in batch])
        finally:  # every sender gets an answer, even when this task is cancelled
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
                pending.done.set()

    def _unknown(self, topic: str, why: str) -> SendResult:
        return SendResult("unknown", None, topic, error=why)

    async def _deliver(
        self, topic: str, acks: Acks, messages: list[dict[str, Any]]
    ) -> list[SendResult]:
        """Send one batch, retrying retryable statuses; one result per message."""
        timeout = self.timeout_ms / 1000 + self.client.config.request_timeout
        backoff = self.retry_backoff
        for attempt in range(self.retries + 1):
            try:
                connection = await self.client.connection()
            except ConnectionLostError as exc:  # never connected: nothing was sent
                return [SendResult("failed", None, topic, error=str(exc))] * len(messages)
            try:
                if len(messages) == 1:
                    response = await connection.request(
                        "send",
                        timeout,
                        topic=topic,
                        acks=acks.value,
                        timeout_ms=self.timeout_ms,
                        **messages[0],
                    )
                    entries = [response]
                else:
                    response = await connection.request(
                        "send_batch",
                        timeout,
                        topic=topic,
                        messages=messages,
                        acks=acks.value,
                        timeout_ms=self.timeout_ms,
                    )
                    has_result = "offsets" in response
                    entries = batch_results(response) if has_result else [{}] * len(messages)
            except (ConnectionLostError, RequestTimeoutError) as exc:
                return [self._unknown(topic, str(exc))] * len(messages)
            except ProtocolError as exc:  # rejected by this client before sending
                return [SendResult("failed", exc.status, topic, error=str(exc))] * len(messages)
            status = response["status"]
            if status.retryable and attempt < self.retries:
                log.info("send_retry topic=%s status=%s attempt=%d", topic, status, attempt + 1)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            error = response.get("error")
            return [_result(topic, status, entry, error) for entry in entries]
        raise AssertionError("unreachable: the last attempt returns")


# ---- consuming ---------------------------------------------------------------------------


@attrs.frozen
class ConsumedMessage:
    topic: str
    queue: int
    queue_offset: int
    offset: int
    body: bytes
    born_us: int
    store_us: int
    tags: str | None = None
    props: Mapping[str, str] = attrs.field(factory=dict)


class Consumer:
    """Pulls every queue of a topic (or the chosen ones) with long polling.

    ``start``: ``"earliest"``, ``"latest"``, or a mapping queue -> queue offset.
    The application decides what to commit: :attr:`positions` is, per queue, the
    next offset to read, i.e. everything below it has been yielded. An offset the
    node no longer has (retention) resets to the earliest one, with a warning.
    """

    def __init__(
        self,
        client: Client,
        topic: str,
        *,
        queues: Sequence[int] | None = None,
        start: Literal["earliest", "latest"] | Mapping[int, int] = "earliest",
        max_messages: int = 256,
        wait_ms: int = 1000,
        buffer: int = 4096,
    ) -> None:
        self.client = client
        self.topic = topic
        self._queues = list(queues) if queues is not None else None
        self._start = start
        self.max_messages = max_messages
        self.wait_ms = wait_ms
        self._buffer = buffer
        self.positions: dict[int, int] = {}

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[trio.MemoryReceiveChannel]:
        described = await self.client.checked("describe_topic", topic=self.topic)
        queues = self._queues if self._queues is not None else list(range(described["queues"]))
        bounds = {entry["queue"]: entry for entry in described["offsets"]}
        for queue in queues:
            self.positions[queue] = self._initial_offset(queue, bounds.get(queue, {}))
        send, receive = trio.open_memory_channel[list[ConsumedMessage]](self._buffer)
        with lone_error_unwrapped():
            async with trio.open_nursery() as nursery:
                for queue in queues:
                    nursery.start_soon(self._pull_queue, queue, send.clone())
                send.close()
                try:
                    yield receive
                finally:
                    nursery.cancel_scope.cancel()

    def _initial_offset(self, queue: int, bounds: Mapping[str, int]) -> int:
        if isinstance(self._start, Mapping):
            return self._start.get(queue, bounds.get("min_offset", 0))
        key = "min_offset" if self._start == "earliest" else "max_offset"
        return bounds.get(key, 0)

    async def _pull_queue(self, queue: int, out: trio.MemorySendChannel) -> None:
        offset = self.positions[queue]
        async with out:
            while True:
                response = await self.client.call(
                    "pull",
                    timeout=self.wait_ms / 1000 + self.client.config.request_timeout,
                    topic=self.topic,
                    queue=queue,
                    offset=offset,
                    max_messages=self.max_messages,
                    wait_ms=self.wait_ms,
                )
                status = response["status"]
                if status is Status.OFFSET_OUT_OF_RANGE:
                    reset = response.get("min_offset", 0)
                    log.warning(
                        "consumer_offset_reset topic=%s queue=%d from=%d to=%d",
                        self.topic,
                        queue,
                        offset,
                        reset,
                    )
                    offset = reset
                    continue
                if status is not Status.OK:
                    raise TidelogError(status, response.get("error", ""), response)
                batch = [self._message(queue, m) for m in response["messages"]]
                offset = response["next_offset"]
                if batch:
                    await out.send(batch)

    def _message(self, queue: int, m: Mapping[str, Any]) -> ConsumedMessage:
        return ConsumedMessage(
            self.topic,
            queue,
            m["queue_offset"],
            m["offset"],
            m["body"],
            m["born_us"],
            m["store_us"],
            m.get("tags"),
            m.get("props") or {},
        )

    async def __aenter__(self) -> Consumer:
        self._context = self._running()
        self._channel = await self._context.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        return await self._context.__aexit__(*exc_info)

    def __aiter__(self) -> AsyncIterator[ConsumedMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ConsumedMessage]:
        async for batch in self._channel:
            for message in batch:
                self.positions[message.queue] = message.queue_offset + 1
                yield message


# ---- admin -------------------------------------------------------------------------------


class Admin:
    """Topics, offsets and node status."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def create_topic(self, topic: str, queues: int, *, exist_ok: bool = False) -> int:
        """Create ``topic``; returns its queue count. ``exist_ok`` accepts an existing one."""
        response = await self.client.call("create_topic", topic=topic, queues=queues)
        status = response["status"]
        if status is Status.OK or (status is Status.TOPIC_EXISTS and exist_ok):
            return response.get("queues", queues)
        raise TidelogError(status, response.get("error", ""), response)

    async def list_topics(self) -> list[dict[str, Any]]:
        return (await self.client.checked("list_topics"))["topics"]

    async def describe_topic(self, topic: str) -> dict[str, Any]:
        return await self.client.checked("describe_topic", topic=topic)

    async def offsets(self, topic: str, queue: int | None = None) -> list[dict[str, int]]:
        return (await self.client.checked("get_offsets", topic=topic, queue=queue))["offsets"]

    async def status(self) -> dict[str, Any]:
        return await self.client.checked("status")


__all__ = [
    "Admin",
    "Client",
    "ClientConfig",
    "ConnectionLostError",
    "ConsumedMessage",
    "Consumer",
    "Producer",
    "RequestTimeoutError",
    "SendResult",
    "TidelogError",
    "open_client",
    "parse_address",
]
