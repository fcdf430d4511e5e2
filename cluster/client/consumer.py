"""Consuming: every queue of a topic pulled with long polls, positions kept per queue."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from cluster.client.errors import TidelogError, lone_error_as_itself
from cluster.protocol import RECORDS_FORMAT, Status, decode_records

if TYPE_CHECKING:
    from cluster.client.client import Client

__all__ = ["ConsumedMessage", "Consumer", "consumed_message", "consumed_messages"]

log = logging.getLogger(__name__)


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


def consumed_messages(topic: str, queue: int, response: Mapping[str, Any]) -> list[ConsumedMessage]:
    """The messages of an ``OK`` ``pull`` answer in either format: ``records`` (the stored
    bytes, decoded and CRC-checked here; :class:`CorruptRecordError` when one is damaged)
    or ``messages`` (a map each)."""
    records = response.get("records")
    if records is not None:
        make = partial(ConsumedMessage, topic, queue)
        return decode_records(records, topic, queue, response["next_offset"], make)
    return [consumed_message(topic, queue, m) for m in response["messages"]]


def consumed_message(topic: str, queue: int, m: Mapping[str, Any]) -> ConsumedMessage:
    """One message of a ``pull`` answer, as the consumer hands it out."""
    return ConsumedMessage(
        topic,
        queue,
        m["queue_offset"],
        m["offset"],
        m["body"],
        m["born_us"],
        m["store_us"],
        m.get("tags"),
        m.get("props") or {},
    )


class Consumer:
    """Pulls every queue of a topic (or the chosen ones) with long polling.

    ``start``: ``"earliest"``, ``"latest"``, or a mapping queue -> queue offset.
    The application decides what to commit: :attr:`positions` is, per queue, the
    next offset to read, i.e. everything below it has been yielded. An offset the
    node no longer has (retention) resets to the earliest one, with a warning. When the
    node it reads from is lost, the client reads on from another node (or the new
    master) at the same positions; a node behind those positions is waited for.
    One task iterates a consumer; one puller task per queue runs inside it.
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
        self._start_offsets: dict[int, int] = {}

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[MemoryObjectReceiveStream[list[ConsumedMessage]]]:
        described = await self.client.checked("describe_topic", topic=self.topic)
        queues = self._queues if self._queues is not None else list(range(described["queues"]))
        bounds = {entry["queue"]: entry for entry in described["offsets"]}
        for queue in queues:
            self.positions[queue] = self._initial_offset(queue, bounds.get(queue, {}))
        self._start_offsets = dict(self.positions)
        send, receive = anyio.create_memory_object_stream[list[ConsumedMessage]](self._buffer)
        with lone_error_as_itself(), receive:
            async with anyio.create_task_group() as nursery:
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

    async def _pull_queue(
        self, queue: int, out: MemoryObjectSendStream[list[ConsumedMessage]]
    ) -> None:
        offset = self.positions[queue]
        unknown_since = 0.0  # when a node first said it does not know the topic
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
                    format=RECORDS_FORMAT,
                )
                status = response["status"]
                if (
                    status is Status.OFFSET_OUT_OF_RANGE
                    and offset != self._start_offsets.get(queue)
                    and offset > response.get("max_offset", offset)
                ):
                    # A position this consumer read up to, past the end of the node it
                    # reached after a failover: wait for that node (or another) to catch
                    # up; never reread from the start. (A start position past the end is
                    # reset below, as a position the node never had.)
                    log.info(
                        "consumer_node_behind topic=%s queue=%d offset=%d node_max=%s",
                        self.topic,
                        queue,
                        offset,
                        response.get("max_offset"),
                    )
                    await anyio.sleep(min(1.0, self.wait_ms / 1000))
                    continue
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
                if status is Status.UNKNOWN_TOPIC:
                    # The topic was there when this consumer started: the node reached
                    # after a failover has not learnt it yet. Wait, within the bound.
                    unknown_since = unknown_since or anyio.current_time()
                    if anyio.current_time() < unknown_since + self.client.config.failover_timeout:
                        log.info(
                            "consumer_topic_not_there_yet topic=%s queue=%d", self.topic, queue
                        )
                        await anyio.sleep(min(1.0, self.wait_ms / 1000))
                        continue
                if status is not Status.OK:
                    raise TidelogError(status, response.get("error", ""), response)
                unknown_since = 0.0
                batch = consumed_messages(self.topic, queue, response)
                offset = response["next_offset"]
                if batch:
                    await out.send(batch)

    async def __aenter__(self) -> Consumer:
        self._context: AbstractAsyncContextManager[
            MemoryObjectReceiveStream[list[ConsumedMessage]]
        ] = self._running()
        self._channel = await self._context.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._context.__aexit__(*exc_info)

    def __aiter__(self) -> AsyncIterator[ConsumedMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ConsumedMessage]:
        async for batch in self._channel:
            for message in batch:
                self.positions[message.queue] = message.queue_offset + 1
                yield message
