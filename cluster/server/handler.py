"""What each op does: validated requests in, an answer or a wait out.

The decisions beside it are plain functions and classes (:mod:`cluster.server.routing`
for where a message goes, :mod:`cluster.server.errors` for every exception's status);
what a write waits for is the node's :class:`~cluster.node.acks.AckPolicy`.

Why appends run inline (the connection's reader awaits :meth:`RequestHandler.handle`):
``store.put`` does not yield on its fast path, so serving a send where it is decoded
keeps one connection's appends in the order it sent them, and an ``acks=leader`` send
costs no task. Only waits are deferred (:data:`~cluster.server.replies.Deferred`; a
write's ack wait is a :class:`~cluster.server.replies.PendingAck`, queued per connection).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from cluster.node.config import TopicsSection
from cluster.node.idempotence import PRODUCER_SPAN
from cluster.node.idempotent_sends import IdempotentSends, SendRefused
from cluster.node.topics import Topic, TopicExistsError, TopicRegistry, UnknownTopicError
from cluster.protocol import (
    RECORDS_FORMAT,
    Acks,
    AlterTopicRequest,
    BatchMessage,
    CreateTopicRequest,
    DeleteTopicRequest,
    DescribeTopicRequest,
    GetOffsetsRequest,
    InitProducerRequest,
    ListTopicsRequest,
    OffsetsForTimeRequest,
    PullRequest,
    ReadRequest,
    Request,
    SendBatchRequest,
    SendRequest,
    Status,
    StatusRequest,
    make_response,
    pull_records_response,
    pull_response,
    read_response,
    send_batch_response,
    send_response,
)
from cluster.protocol.spliced import SplicedBytes
from cluster.server.errors import RequestError, unknown_topic
from cluster.server.polls import Wakeups
from cluster.server.replies import AckTimer, Deferred, PendingAck, Reply
from cluster.server.routing import QueueChooser, build_message, check_queue, message_map
from storage import (
    CorruptSegmentError,
    DiskFullError,
    Message,
    MessageStore,
    OffsetOutOfRangeError,
)
from storage.record import StoredRecord, decode_record
from storage.record_runs import RecordRuns

if TYPE_CHECKING:
    from cluster.node.acks import AckPolicy

__all__ = ["AckTimer", "OpHandler", "RequestHandler"]

DELETE_DURABLE_TIMEOUT_MS: Final = 30_000
"""How long a topic deletion waits for its marker to be fsynced before it is refused."""

_LEADER: Final = Acks.LEADER
_DURABLE: Final = Acks.DURABLE
_REPLICATED: Final = Acks.REPLICATED
"""(Module globals: an enum member read through its class costs a descriptor call on
Python 3.11, on every send.)"""

OpHandler = Callable[[Any, Wakeups], Awaitable[Reply | Deferred]]
"""One op's handler; it takes that op's request TypedDict (``Any`` here only because the
table maps every op name to its own request type)."""
_Result = TypeVar("_Result")


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
        self.on_ack_answered: AckTimer | None = None
        """Told each write's ack level, status and seconds from its append to its answer,
        where the connection's ack queue answers it (by ``holds`` or after its wait):
        the node's metrics. None: nothing is timed."""
        self._settings = settings
        self._max_pull_bytes = max_pull_bytes
        self._status = status
        self._chooser = QueueChooser()
        self.idempotence = IdempotentSends(store)
        """Idempotent sends (producer id + sequence): used only by requests naming one."""
        self.disk_full = False
        """The last write met a full disk (cleared by the next write that succeeds)."""
        self._ops: dict[str, OpHandler] = {
            "send": self._send,
            "send_batch": self._send_batch,
            "pull": self._pull,
            "get_offsets": self._get_offsets,
            "offsets_for_time": self._offsets_for_time,
            "read": self._read,
            "create_topic": self._create_topic,
            "alter_topic": self._alter_topic,
            "delete_topic": self._delete_topic,
            "list_topics": self._list_topics,
            "describe_topic": self._describe_topic,
            "status": self._node_status,
            "init_producer": self._init_producer,
        }

    async def handle(self, request: Request, polls: Wakeups) -> Reply | Deferred:
        return await self._ops[request["op"]](request, polls)

    # ---- topics --------------------------------------------------------------------------

    def _existing_topic(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is None:
            raise unknown_topic(name)
        return topic

    async def _topic_for_write(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is not None:
            return topic
        if not self._settings.auto_create:
            raise unknown_topic(name)
        try:
            return await self._topics.create(name, self._settings.default_queues)
        except TopicExistsError as exc:  # another connection created it meanwhile
            return exc.topic

    # ---- writes --------------------------------------------------------------------------

    async def _send(self, req: SendRequest, _polls: Wakeups) -> Reply | Deferred:
        # The hot path of one-message requests: an existing topic is taken without the
        # auto-create coroutine, and an acks=leader answer is built without a closure.
        topic = self._topics.get(req["topic"])
        if topic is None:
            topic = await self._topic_for_write(req["topic"])
        acks = req["acks"]
        self._acks.admit(acks)
        if req["producer"] is not None:
            return await self._send_idempotent(req, topic, [req])
        queue = self._chooser.choose(topic, req["queue"], req["key"])
        result = await self._append(self._store.put, build_message(topic.name, req, queue))
        fields = (
            req["id"],
            topic.name,
            result.queue_id,
            result.queue_offset,
            result.offset,
            result.store_us,
        )
        if acks is _LEADER:
            return send_response(*fields)
        return self._after_append(req, result.end_offset, send_response, fields)

    async def _send_batch(self, req: SendBatchRequest, _polls: Wakeups) -> Reply | Deferred:
        topic = await self._topic_for_write(req["topic"])
        self._acks.admit(req["acks"])
        messages = req["messages"]
        if req["producer"] is not None:
            return await self._send_idempotent(req, topic, messages)
        queues = self._chooser.choose_batch(topic, messages)
        built = [
            build_message(topic.name, message, queue, f"messages[{index}].")
            for index, (message, queue) in enumerate(zip(messages, queues, strict=True))
        ]
        result = await self._append(self._store.put_batch, built)
        fields = (
            req["id"],
            topic.name,
            queues,
            result.queue_offsets,
            result.offsets,
            result.store_us,
        )
        return self._after_append(req, result.end_offset, send_batch_response, fields)

    async def _send_idempotent(
        self,
        req: SendRequest | SendBatchRequest,
        topic: Topic,
        messages: Sequence[SendRequest | BatchMessage],
    ) -> Reply | Deferred:
        """A send or batch naming its producer: appended unless stored before, when the
        original offsets are the answer (after the same ack wait)."""

        def build() -> list[Message]:
            queues = self._chooser.choose_batch(topic, messages)
            return [
                build_message(topic.name, message, queue, f"messages[{index}].")
                for index, (message, queue) in enumerate(zip(messages, queues, strict=True))
            ]

        producer, sequence = req["producer"], req["sequence"]
        assert producer is not None and sequence is not None
        try:
            stored = await self.idempotence.append(
                producer,
                sequence,
                messages,
                build,
                lambda built: self._append(self._store.put_batch, built),
                req["epoch"] or 0,
            )
        except SendRefused as refused:
            raise RequestError(refused.status, str(refused)) from None
        if req["op"] == "send":
            respond: Callable[..., Reply] = send_response
            fields: tuple[Any, ...] = (
                req["id"],
                topic.name,
                stored.queues[0],
                stored.queue_offsets[0],
                stored.offsets[0],
                stored.store_us,
            )
        else:
            respond = send_batch_response
            fields = (
                req["id"],
                topic.name,
                stored.queues,
                stored.queue_offsets,
                stored.offsets,
                stored.store_us,
            )
        return self._after_append(req, stored.end_offset, respond, fields)

    async def _init_producer(self, req: InitProducerRequest, _polls: Wakeups) -> Reply:
        producer = req["producer"]
        if producer is None:
            producer, epoch = self.idempotence.new_producer_id(), 0
        else:  # a producer starting again with its id: a new epoch fences its old copies
            epoch = await self.idempotence.restart(producer, req["epoch"] or 0)
        return make_response(req["id"], producer=producer, epoch=epoch, span=PRODUCER_SPAN)

    async def _append(self, put: Callable[[Any], Awaitable[_Result]], what: object) -> _Result:
        try:
            result = await put(what)
        except DiskFullError:
            self.disk_full = True
            raise
        self.disk_full = False
        return result

    def _after_append(
        self,
        req: SendRequest | SendBatchRequest,
        end_offset: int,
        respond: Callable[..., Reply],
        fields: tuple[Any, ...],
    ) -> Reply | Deferred:
        """The answer of an appended write, ``respond(*fields)``: at once at
        ``acks=leader``, else a :class:`PendingAck` for the policy in force now."""
        acks: Acks = req["acks"]
        if acks is _LEADER:
            return respond(*fields)
        if acks is _DURABLE or acks is _REPLICATED:
            self._store.group_commit.flush_now()  # the fsync runs while the wait is queued
        appended_s = trio.current_time()
        return PendingAck(
            self._acks,
            acks,
            end_offset,
            appended_s,
            appended_s + req["timeout_ms"] / 1000,
            respond,
            fields,
            self.on_ack_answered,
        )

    async def _create_topic(self, req: CreateTopicRequest, _polls: Wakeups) -> Reply:
        topic = await self._topics.create(req["topic"], req["queues"])
        return make_response(req["id"], topic=topic.name, queues=topic.queues)

    async def _alter_topic(self, req: AlterTopicRequest, _polls: Wakeups) -> Reply:
        try:
            topic = await self._topics.alter(req["topic"], req["queues"])
        except UnknownTopicError:
            raise unknown_topic(req["topic"]) from None
        return make_response(req["id"], topic=topic.name, queues=topic.queues)

    async def _delete_topic(self, req: DeleteTopicRequest, _polls: Wakeups) -> Reply:
        queues, offset = await self.delete_topic_here(req["topic"])
        return make_response(req["id"], topic=req["topic"], queues=queues, offset=offset)

    async def delete_topic_here(self, name: str, *, forgotten_ok: bool = False) -> tuple[int, int]:
        """Delete ``name`` on this node; returns its queue count and where the deletion
        marker landed. The topic leaves the registry first (writes to it get
        ``UNKNOWN_TOPIC`` from then on), then the store's deletion marker is appended and
        made durable, then the registry's file forgets it.

        ``forgotten_ok``: the deletion is recorded elsewhere already (etcd), so a registry
        that forgot the topic meanwhile (it follows etcd) still gets the marker written.
        """
        marker: list[int] = []

        async def drop_records() -> None:
            result = await self._append(self._store.delete_topic, name)
            status, error = await self._acks.wait(
                Acks.DURABLE, result.end_offset, DELETE_DURABLE_TIMEOUT_MS
            )
            if status is not Status.OK:
                raise RequestError(status, f"deleting topic {name!r}: {error}; delete it again")
            marker.append(result.offset)

        try:
            topic = await self._topics.delete(name, drop_records)
        except UnknownTopicError:
            if not forgotten_ok:
                raise unknown_topic(name) from None
            await drop_records()
            return 0, marker[0]
        return topic.queues, marker[0]

    # ---- reads ---------------------------------------------------------------------------

    async def _pull(self, req: PullRequest, polls: Wakeups) -> Reply | Deferred:
        check_queue(self._existing_topic(req["topic"]), req["queue"], "queue")
        page = self._page(req)
        if page.records or not req["wait_ms"]:
            return self._pull_answer(req, page)
        deadline = trio.current_time() + req["wait_ms"] / 1000

        async def long_poll() -> Reply:
            topic, queue = req["topic"], req["queue"]
            with polls.deadline(deadline):
                while not (page := self._page(req)).records:
                    if page.max_offset > page.next_offset:
                        # Entries past the read limit (or a cut running): wait for the
                        # limit to cover the next one (or the cut to end), not for records.
                        await self._store.wait_for_read_limit(topic, queue, page.next_offset)
                        if self._topics.get(topic) is None:
                            raise unknown_topic(topic)  # deleted while the poll waited
                    elif not await self._store.wait_for_queue(topic, queue):
                        raise unknown_topic(topic)  # deleted while the poll waited
                return self._pull_answer(req, page)  # the page read last, not a second one
            return self._pull_answer(req, self._page(req))  # the deadline (or EOF) came

        return long_poll

    def _page(self, req: PullRequest) -> RecordRuns:
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
        return self._store.get_record_runs(
            topic,
            queue,
            offset,
            max_messages=req["max_messages"],
            max_bytes=min(req["max_bytes"], self._max_pull_bytes),
            below_offset=self._acks.read_limit(),
        )

    def _pull_answer(self, req: PullRequest, page: RecordRuns) -> Reply:
        """The page in the format asked for: the records' stored bytes (the client decodes
        them: nothing per record here), or a map per message, each record decoded and its
        CRC checked here.

        Stored bytes stay where they are: the answer's ``records`` is a
        :class:`SplicedBytes` of the page's views, lent by the store until the connection
        has written them to the socket (``writev``, see :mod:`storage.lent_views` for why a
        cut or retention meanwhile is safe)."""
        if req["format"] == RECORDS_FORMAT:
            if not page.runs:
                return pull_records_response(
                    req["id"], b"", page.next_offset, page.min_offset, page.max_offset
                )
            loan = self._store.lent.lend(page)  # the loan releases the views, once sent
            records = SplicedBytes(loan.parts, loan.size, loan.give_back)
            return pull_records_response(
                req["id"], records, page.next_offset, page.min_offset, page.max_offset
            )
        try:
            return pull_response(
                req["id"],
                [message_map(record.queue_offset, record) for record in _decoded(page)],
                page.next_offset,
                page.min_offset,
                page.max_offset,
            )
        finally:
            page.release()

    def _offsets(self, topic: Topic, queues: Sequence[int]) -> list[dict[str, int]]:
        entries = []
        for queue in queues:
            low, high = self._store.queue_offsets(topic.name, queue)
            entries.append({"queue": queue, "min_offset": low, "max_offset": high})
        return entries

    async def _get_offsets(self, req: GetOffsetsRequest, _polls: Wakeups) -> Reply:
        topic = self._existing_topic(req["topic"])
        queue = req["queue"]
        queues = range(topic.queues) if queue is None else [check_queue(topic, queue, "queue")]
        return make_response(req["id"], topic=topic.name, offsets=self._offsets(topic, queues))

    async def _offsets_for_time(self, req: OffsetsForTimeRequest, _polls: Wakeups) -> Reply:
        """Per queue, where reading from a time starts; never past the read limit (a
        slave's confirm offset), so no record a failover could take back is skipped."""
        topic = self._existing_topic(req["topic"])
        queue = req["queue"]
        queues = range(topic.queues) if queue is None else [check_queue(topic, queue, "queue")]
        limit = self._acks.read_limit()
        offsets = [
            {
                "queue": q,
                "offset": self._store.queue_offset_at_time(
                    topic.name, q, req["time_us"], below_offset=limit
                ),
            }
            for q in queues
        ]
        return make_response(req["id"], topic=topic.name, offsets=offsets)

    async def _read(self, req: ReadRequest, _polls: Wakeups) -> Reply:
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

    async def _list_topics(self, req: ListTopicsRequest, _polls: Wakeups) -> Reply:
        topics = [{"topic": t.name, "queues": t.queues} for t in self._topics.list()]
        return make_response(req["id"], topics=topics)

    async def _describe_topic(self, req: DescribeTopicRequest, _polls: Wakeups) -> Reply:
        topic = self._existing_topic(req["topic"])
        return make_response(
            req["id"],
            topic=topic.name,
            queues=topic.queues,
            created_us=topic.created_us,
            offsets=self._offsets(topic, range(topic.queues)),
        )

    async def _node_status(self, req: StatusRequest, _polls: Wakeups) -> Reply:
        return make_response(req["id"], **self._status())


def _decoded(page: RecordRuns) -> Iterator[StoredRecord]:
    """The records of a page, each decoded and checked against its CRC (bodies are views
    into the log: use them before the page is released)."""
    for log_offset, view in page.runs:
        pos = 0
        while pos < len(view):
            record = decode_record(view, pos, log_offset)
            yield record
            pos += record.size
