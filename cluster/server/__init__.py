"""The client server: frames in, requests served against the store, responses out.

Three parts, from the wire inwards:

- :class:`ClientServer` listens, enforces ``max_connections`` and runs the shutdown
  (stop accepting, answer new requests ``SHUTTING_DOWN``, let in-flight ones finish
  within the grace period, close).
- :class:`Connection` is one client: a reader that decodes frames and serves most
  requests inline, a writer that coalesces every response ready into one ``send_all``,
  and tasks for the requests that wait (durable acks, long polls). Responses carry
  their request's id and may leave out of order.
- :class:`RequestHandler` is what each op does, with the sans-IO decisions beside it as
  plain functions: :class:`QueueChooser` (where a message goes), :func:`build_message`
  and :func:`message_map` (the ``TAGS`` property), :func:`response_for_error` (every
  exception to a status, in one place).

Why appends run inline in the reader: ``store.put`` does not yield on its fast path,
so serving a send where it is decoded keeps one connection's appends in the order it
sent them, and an ``acks=leader`` send costs no task. Only waits become tasks.

Why a request holds its in-flight slot until its response is *sent*: a client that
pipelines without reading would otherwise make the node buffer answers without limit.
With the slots taken, the reader stops reading and TCP pushes back on the client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Final, Protocol, TypeAlias

import trio

from cluster.node.config import ServerSection, TopicsSection
from cluster.node.topics import (
    InvalidTopicNameError,
    QueueCountError,
    Topic,
    TopicExistsError,
    TopicRegistry,
)
from cluster.protocol import (
    MAX_FRAME_SIZE_LIMIT,
    Acks,
    FrameDecoder,
    ProtocolError,
    Request,
    Status,
    encode_frame,
    error_response,
    make_response,
    pull_response,
    pulled_message,
    queue_for_key,
    read_response,
    send_batch_response,
    send_response,
)
from storage import (
    CorruptSegmentError,
    DiskFullError,
    GetResult,
    InvalidMessageError,
    InvalidTopicError,
    Message,
    MessageStore,
    MessageTooLargeError,
    OffsetOutOfRangeError,
    StorageFailedError,
    StoredRecord,
)

__all__ = [
    "TAGS_PROPERTY",
    "AckPolicy",
    "ClientServer",
    "Connection",
    "Deferred",
    "QueueChooser",
    "Reply",
    "RequestError",
    "RequestHandler",
    "Wakeups",
    "build_message",
    "check_queue",
    "message_map",
    "response_for_error",
]

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 64 * 1024
LINGER_SECONDS: Final = 1.0
"""After a fatal frame or a refused connection: how long to read and discard what the
client still sends, so that closing with unread input (which makes the kernel send a
reset) does not destroy the error frame before the client reads it."""
TAGS_PROPERTY: Final = "TAGS"
"""Reserved property holding a message's tags: the log keeps only their hash (for
filtering), so the text travels in the properties, as RocketMQ does."""

Reply: TypeAlias = dict[str, Any]
Deferred: TypeAlias = Callable[[], Awaitable[Reply]]
"""A request that must wait (durable ack, long poll): the connection runs it in a task."""
_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


# ---- errors to statuses: the one place ---------------------------------------------------------


class RequestError(Exception):
    """A request that cannot be served as sent: answer ``status`` with ``details``."""

    def __init__(self, status: Status, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


_STATUS_OF: Final[tuple[tuple[type[Exception], Status], ...]] = (
    (InvalidTopicNameError, Status.INVALID_TOPIC),
    (QueueCountError, Status.BAD_REQUEST),
    (InvalidTopicError, Status.INVALID_TOPIC),  # before its base class, InvalidMessageError
    (MessageTooLargeError, Status.MESSAGE_TOO_LARGE),
    (InvalidMessageError, Status.BAD_REQUEST),
    (OffsetOutOfRangeError, Status.OFFSET_OUT_OF_RANGE),
    (DiskFullError, Status.DISK_FULL),
    (StorageFailedError, Status.STORAGE_FAILED),
)


def response_for_error(req_id: int, exc: Exception, op: str = "?") -> Reply:
    """The answer to a request that raised ``exc``. Anything unexpected is a server bug:
    logged with its traceback and answered ``INTERNAL_ERROR`` for this request only."""
    if isinstance(exc, RequestError):
        return error_response(req_id, exc.status, exc.message, **exc.details)
    if isinstance(exc, TopicExistsError):
        return error_response(req_id, Status.TOPIC_EXISTS, str(exc), queues=exc.topic.queues)
    for kind, status in _STATUS_OF:
        if isinstance(exc, kind):
            return error_response(req_id, status, str(exc))
    log.error("internal_error op=%s id=%d error=%r", op, req_id, exc, exc_info=exc)
    return error_response(
        req_id,
        Status.INTERNAL_ERROR,
        f"internal error serving op {op!r} ({type(exc).__name__}); the node logged it: "
        "report it, and treat a write as of unknown outcome",
    )


# ---- sans-IO decisions ------------------------------------------------------------------------


def check_queue(topic: Topic, queue: int, field: str) -> int:
    """``queue`` if the topic has it, else ``BAD_REQUEST`` naming the field and the count."""
    if queue >= topic.queues:
        raise RequestError(
            Status.BAD_REQUEST,
            f"field {field!r} is {queue} but topic {topic.name!r} has {topic.queues} "
            f"queue(s), numbered 0 to {topic.queues - 1}",
        )
    return queue


class QueueChooser:
    """Where a message goes: its explicit ``queue``, else its ``key``'s queue
    (:func:`cluster.protocol.queue_for_key`), else the topic's next queue in turn."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def route(
        self, topic: Topic, queue: int | None, key: bytes | str | None, field: str
    ) -> int | None:
        """The queue a message asked for, explicitly or by key; None if it left it to us."""
        if queue is not None:
            return check_queue(topic, queue, field)
        if key is not None:
            return queue_for_key(key, topic.queues)
        return None

    def round_robin(self, topic: Topic) -> int:
        turn = self._next.get(topic.name, 0) % topic.queues
        self._next[topic.name] = turn + 1
        return turn

    def choose(self, topic: Topic, queue: int | None, key: bytes | str | None) -> int:
        """One message: routed, or the next queue in turn."""
        routed = self.route(topic, queue, key, "queue")
        return self.round_robin(topic) if routed is None else routed

    def choose_batch(self, topic: Topic, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """A batch: every message without ``queue`` or ``key`` goes to the *same* next
        queue, so a batch stays together and in order, and one batch takes one turn."""
        turn: int | None = None
        queues: list[int] = []
        for index, message in enumerate(messages):
            routed = self.route(topic, message["queue"], message["key"], f"messages[{index}].queue")
            if routed is None:
                if turn is None:
                    turn = self.round_robin(topic)
                routed = turn
            queues.append(routed)
        return queues


def build_message(topic: str, fields: Mapping[str, Any], queue: int, path: str = "") -> Message:
    """A storage message from a request's message fields; tags go into ``TAGS``.

    ``born_us`` left out becomes the store time (within microseconds of receipt).
    """
    props: dict[str, str] | None = fields["props"]
    tags: str | None = fields["tags"]
    if props and TAGS_PROPERTY in props:
        raise RequestError(
            Status.BAD_REQUEST,
            f"field {path}props[{TAGS_PROPERTY!r}] is reserved (it carries the tags): send "
            "tags in the 'tags' field",
        )
    if tags is not None:
        props = {**props, TAGS_PROPERTY: tags} if props else {TAGS_PROPERTY: tags}
    return Message.create(
        topic, fields["body"], queue, tags=tags, properties=props, born_us=fields["born_us"] or 0
    )


def message_map(queue_offset: int, record: StoredRecord) -> dict[str, Any]:
    """A stored record as the wire's message map: ``TAGS`` back into ``tags``."""
    props = record.properties if len(record.properties_raw) else None
    tags = props.pop(TAGS_PROPERTY, None) if props else None
    return pulled_message(
        queue_offset,
        record.physical_offset,
        record.body,
        record.born_us,
        record.store_us,
        tags=tags,
        props=props,
    )


# ---- what the node provides -------------------------------------------------------------------


class AckPolicy(Protocol):
    """What a write waits for, by ``acks`` level: the node's role decides.

    A master alone refuses ``replicated`` in :meth:`admit` and waits for group commit
    for ``durable``; replication plugs in a policy that also waits for in-sync slaves
    and bounds reads by the confirm offset.
    """

    def admit(self, acks: Acks) -> None:
        """Raise :class:`RequestError` if a write at ``acks`` cannot be served. Called
        *before* anything is appended, so a refused write is safe to resend."""

    async def wait(self, acks: Acks, end_offset: int, timeout: float) -> tuple[Status, str | None]:
        """Wait until the bytes below ``end_offset`` meet ``acks`` (not ``leader``):
        ``(OK, None)``, or a timeout status with its error sentence."""
        ...

    def read_limit(self) -> int | None:
        """Consumers see records ending at or below this offset (None: all of them)."""
        ...


class Wakeups:
    """Deadlines of parked long polls, so that EOF or shutdown can end them early.

    A woken poll answers with what it has (usually nothing), like a timed-out one.
    """

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.woken = False

    @contextmanager
    def deadline(self, when: float) -> Iterator[None]:
        scope = trio.CancelScope(deadline=when)
        if self.woken:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)

    def wake_all(self) -> None:
        self.woken = True
        for scope in self._scopes:
            scope.cancel()


# ---- the ops ----------------------------------------------------------------------------------


def _unknown_topic(name: str) -> RequestError:
    return RequestError(
        Status.UNKNOWN_TOPIC, f"topic {name!r} does not exist: create it first (create_topic)"
    )


class RequestHandler:
    """Serves validated requests: an immediate :data:`Reply`, or a :data:`Deferred`
    when the answer must wait. Raises for errors (see :func:`response_for_error`)."""

    def __init__(
        self,
        store: MessageStore,
        topics: TopicRegistry,
        acks: AckPolicy,
        settings: TopicsSection,
        *,
        max_pull_bytes: int,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self._store = store
        self._topics = topics
        self._acks = acks
        self._settings = settings
        self._max_pull_bytes = max_pull_bytes
        self._status = status
        self._chooser = QueueChooser()
        self.disk_full = False
        """The last write met a full disk (cleared by the next write that succeeds)."""
        self._ops: dict[str, Callable[[Any, Wakeups], Awaitable[Reply | Deferred]]] = {
            "send": self._send,
            "send_batch": self._send_batch,
            "pull": self._pull,
            "get_offsets": self._get_offsets,
            "read": self._read,
            "create_topic": self._create_topic,
            "list_topics": self._list_topics,
            "describe_topic": self._describe_topic,
            "status": self._node_status,
        }

    async def handle(self, request: Request, polls: Wakeups) -> Reply | Deferred:
        return await self._ops[request["op"]](request, polls)

    # ---- topics --------------------------------------------------------------------------

    def _existing_topic(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is None:
            raise _unknown_topic(name)
        return topic

    async def _topic_for_write(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is not None:
            return topic
        if not self._settings.auto_create:
            raise _unknown_topic(name)
        try:
            return await self._topics.create(name, self._settings.default_queues)
        except TopicExistsError as exc:  # another connection created it meanwhile
            return exc.topic

    # ---- writes --------------------------------------------------------------------------

    async def _send(self, req: Any, _polls: Wakeups) -> Reply | Deferred:
        topic = await self._topic_for_write(req["topic"])
        self._acks.admit(req["acks"])
        queue = self._chooser.choose(topic, req["queue"], req["key"])
        result = await self._append(self._store.put, build_message(topic.name, req, queue))

        def answer(status: Status = Status.OK, error: str | None = None) -> Reply:
            return send_response(
                req["id"],
                topic.name,
                result.queue_id,
                result.queue_offset,
                result.offset,
                result.store_us,
                status=status,
                error=error,
            )

        return self._after_append(req, result.end_offset, answer)

    async def _send_batch(self, req: Any, _polls: Wakeups) -> Reply | Deferred:
        topic = await self._topic_for_write(req["topic"])
        self._acks.admit(req["acks"])
        messages = req["messages"]
        queues = self._chooser.choose_batch(topic, messages)
        built = [
            build_message(topic.name, message, queue, f"messages[{index}].")
            for index, (message, queue) in enumerate(zip(messages, queues, strict=True))
        ]
        result = await self._append(self._store.put_batch, built)

        def answer(status: Status = Status.OK, error: str | None = None) -> Reply:
            return send_batch_response(
                req["id"],
                topic.name,
                queues,
                result.queue_offsets,
                result.offsets,
                result.store_us,
                status=status,
                error=error,
            )

        return self._after_append(req, result.end_offset, answer)

    async def _append(self, put: Callable[[Any], Awaitable[Any]], what: Any) -> Any:
        try:
            result = await put(what)
        except DiskFullError:
            self.disk_full = True
            raise
        self.disk_full = False
        return result

    def _after_append(
        self, req: Any, end_offset: int, answer: Callable[..., Reply]
    ) -> Reply | Deferred:
        acks: Acks = req["acks"]
        if acks is Acks.LEADER:
            return answer()
        timeout = req["timeout_ms"] / 1000

        async def acknowledged() -> Reply:
            status, error = await self._acks.wait(acks, end_offset, timeout)
            return answer(status, error)

        return acknowledged

    async def _create_topic(self, req: Any, _polls: Wakeups) -> Reply:
        topic = await self._topics.create(req["topic"], req["queues"])
        return make_response(req["id"], topic=topic.name, queues=topic.queues)

    # ---- reads ---------------------------------------------------------------------------

    async def _pull(self, req: Any, polls: Wakeups) -> Reply | Deferred:
        check_queue(self._existing_topic(req["topic"]), req["queue"], "queue")
        page = self._page(req)
        if page.records or not req["wait_ms"]:
            return self._pull_answer(req, page)
        deadline = trio.current_time() + req["wait_ms"] / 1000

        async def long_poll() -> Reply:
            with polls.deadline(deadline):
                while not self._page(req).records:
                    await self._store.wait_for_arrival()
            return self._pull_answer(req, self._page(req))

        return long_poll

    def _page(self, req: Any) -> GetResult:
        topic, queue, offset = req["topic"], req["queue"], req["offset"]
        low, high = self._store.queue_offsets(topic, queue)
        if not low <= offset <= high:
            raise RequestError(
                Status.OFFSET_OUT_OF_RANGE,
                f"queue offset {offset} of {topic}/{queue} is outside the stored range "
                f"[{low}, {high}]: continue from min_offset or max_offset",
                min_offset=low,
                max_offset=high,
            )
        return self._store.get_messages(
            topic,
            queue,
            offset,
            max_messages=req["max_messages"],
            max_bytes=min(req["max_bytes"], self._max_pull_bytes),
            below_offset=self._acks.read_limit(),
        )

    @staticmethod
    def _pull_answer(req: Any, page: GetResult) -> Reply:
        return pull_response(
            req["id"],
            [message_map(queue_offset, record) for queue_offset, record in page.records],
            page.next_offset,
            page.min_offset,
            page.max_offset,
        )

    def _offsets(self, topic: Topic, queues: Sequence[int]) -> list[dict[str, int]]:
        entries = []
        for queue in queues:
            low, high = self._store.queue_offsets(topic.name, queue)
            entries.append({"queue": queue, "min_offset": low, "max_offset": high})
        return entries

    async def _get_offsets(self, req: Any, _polls: Wakeups) -> Reply:
        topic = self._existing_topic(req["topic"])
        queue = req["queue"]
        queues = range(topic.queues) if queue is None else [check_queue(topic, queue, "queue")]
        return make_response(req["id"], topic=topic.name, offsets=self._offsets(topic, queues))

    async def _read(self, req: Any, _polls: Wakeups) -> Reply:
        offset = req["offset"]
        try:
            record = self._store.read(offset)
        except (OffsetOutOfRangeError, CorruptSegmentError) as exc:
            # CorruptSegmentError here means "no record starts there": read() checks the
            # range, so the offset points into a record or a segment's filler.
            commit_log = self._store.commit_log
            raise RequestError(
                Status.OFFSET_OUT_OF_RANGE,
                f"no record starts at offset {offset} (the log holds "
                f"[{commit_log.min_offset}, {commit_log.max_offset})): use an offset a send "
                "returned",
                min_offset=commit_log.min_offset,
                max_offset=commit_log.max_offset,
            ) from exc
        limit = self._acks.read_limit()
        if limit is not None and record.end_offset > limit:
            raise RequestError(
                Status.OFFSET_OUT_OF_RANGE,
                f"the record at offset {offset} is not confirmed yet (confirm offset {limit})",
                min_offset=self._store.commit_log.min_offset,
                max_offset=limit,
            )
        return read_response(
            req["id"], record.topic, record.queue_id, message_map(record.queue_offset, record)
        )

    async def _list_topics(self, req: Any, _polls: Wakeups) -> Reply:
        topics = [{"topic": t.name, "queues": t.queues} for t in self._topics.list()]
        return make_response(req["id"], topics=topics)

    async def _describe_topic(self, req: Any, _polls: Wakeups) -> Reply:
        topic = self._existing_topic(req["topic"])
        return make_response(
            req["id"],
            topic=topic.name,
            queues=topic.queues,
            created_us=topic.created_us,
            offsets=self._offsets(topic, range(topic.queues)),
        )

    async def _node_status(self, req: Any, _polls: Wakeups) -> Reply:
        return make_response(req["id"], **self._status())


# ---- connections ------------------------------------------------------------------------------


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


class Connection:
    """One client connection: reader, coalescing writer, and tasks for waiting requests.

    Every admitted frame gets exactly one response, and holds one of the connection's
    ``max_inflight_per_connection`` slots until that response is sent.
    """

    def __init__(self, stream: trio.SocketStream, server: ClientServer) -> None:
        settings = server.settings
        self._stream = stream
        self._server = server
        self._handler = server.handler
        self._decoder = FrameDecoder(settings.max_frame_size)
        self._max_inflight = settings.max_inflight_per_connection
        self._slots = trio.Semaphore(self._max_inflight)
        self.polls = Wakeups()
        self.peer = _peer(stream)
        self._out = bytearray()
        self._out_count = 0
        self._wake = trio.Event()
        self._reading = True
        self._fatal = False
        self._aborted = False
        self._nursery: trio.Nursery | None = None

    @property
    def inflight(self) -> int:
        return self._max_inflight - self._slots.value

    async def run(self) -> None:
        log.debug("connection_open peer=%s", self.peer)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop)
                await self._read_loop()
                self._reading = False
                self.polls.wake_all()
                self._wake.set()
            if self._fatal:
                await self._linger()
        finally:
            await trio.aclose_forcefully(self._stream)
            log.debug("connection_closed peer=%s", self.peer)

    # ---- reading -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        decoder = self._decoder
        try:
            while data := await self._stream.receive_some(RECEIVE_SIZE):
                decoder.feed(data)
                for item in decoder:
                    await self._admit()
                    await self._dispatch(item)
        except ProtocolError as fatal:
            log.info("connection_fatal peer=%s status=%s", self.peer, fatal.status)
            await self._admit()
            self._reply(fatal.response())
            self._fatal = True
        except _GONE:
            self._abort()

    async def _admit(self) -> None:
        """Take an in-flight slot; with none free, stop reading until a response is sent."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            log.debug("backpressure peer=%s inflight=%d", self.peer, self.inflight)
            await self._slots.acquire()
        self._server.admitted()

    async def _dispatch(self, item: Request | ProtocolError) -> None:
        if isinstance(item, ProtocolError):
            self._reply(item.response())
            return
        req_id, op = item["id"], item["op"]
        if self._server.draining:
            self._reply(
                error_response(
                    req_id,
                    Status.SHUTTING_DOWN,
                    "the node is shutting down and did not start this request: reconnect "
                    "(possibly to another node) and resend",
                )
            )
            return
        try:
            outcome = await self._handler.handle(item, self.polls)
        except Exception as exc:
            self._reply(response_for_error(req_id, exc, op))
            return
        if isinstance(outcome, dict):
            self._reply(outcome)
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._finish, req_id, op, outcome)

    async def _finish(self, req_id: int, op: str, deferred: Deferred) -> None:
        try:
            response = await deferred()
        except Exception as exc:
            response = response_for_error(req_id, exc, op)
        self._reply(response)

    # ---- writing -------------------------------------------------------------------------

    def _reply(self, response: Reply) -> None:
        try:
            frame = encode_frame(response, max_frame_size=MAX_FRAME_SIZE_LIMIT)
        except Exception as exc:
            frame = encode_frame(response_for_error(response.get("id", 0), exc, "encode"))
        self._out += frame
        self._out_count += 1
        self._wake.set()

    async def _write_loop(self) -> None:
        """Send everything queued in one ``send_all``; release the slots it answered."""
        try:
            while True:
                if self._out:
                    data, count = self._out, self._out_count
                    self._out, self._out_count = bytearray(), 0
                    await self._stream.send_all(data)
                    self._retire(count)
                elif not self._reading and not self.inflight:
                    return
                else:
                    self._wake = trio.Event()
                    await self._wake.wait()
        except _GONE:
            self._abort()

    def _retire(self, count: int) -> None:
        if self._aborted:  # _abort already retired everything outstanding
            return
        for _ in range(count):
            self._slots.release()
        self._server.retired(count)

    # ---- closing -------------------------------------------------------------------------

    def _abort(self) -> None:
        """The peer is gone: stop everything, nobody is left to answer."""
        if self._aborted:
            return
        self._aborted = True
        log.debug("connection_reset peer=%s inflight=%d", self.peer, self.inflight)
        self._server.retired(self.inflight)  # their responses will never be sent
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _linger(self) -> None:
        await _linger(self._stream)


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then discard input until EOF or :data:`LINGER_SECONDS` (see there)."""
    with trio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except _GONE:
            pass


# ---- the listener -----------------------------------------------------------------------------


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
        listeners = await self._listen()
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
                    task_status.started(self.address)
                    await self._stop.wait()
                    acceptor.cancel_scope.cancel()
                await self._drain()
                connections.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
        log.info("server_stopped address=%s", self.address)

    async def _listen(self) -> list[trio.SocketListener]:
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
        return listeners

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
        log.warning("connection_refused peer=%s limit=%d", _peer(stream), limit)
        response = error_response(
            0,
            Status.TOO_MANY_CONNECTIONS,
            f"this node serves at most {limit} connections and all are in use: retry after a "
            "pause, or share connections between producers and consumers",
            max_connections=limit,
        )
        try:
            await stream.send_all(encode_frame(response))
            await _linger(stream)
        except _GONE:
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
