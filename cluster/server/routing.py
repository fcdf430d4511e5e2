"""Where a message goes and how it is shaped: sans-IO decisions of the write and read paths.

:class:`QueueChooser` picks a message's queue; :func:`build_message` and
:func:`message_map` carry tags in the reserved ``TAGS`` property, as RocketMQ does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from cluster.node.idempotence import PRODUCER_PROPERTY
from cluster.node.topics import Topic
from cluster.protocol import BatchMessage, SendRequest, Status, pulled_message, queue_for_key
from cluster.server.errors import RequestError
from storage import Message, StoredRecord
from storage.record import FLAG_PRODUCER_BATCH

__all__ = ["TAGS_PROPERTY", "QueueChooser", "build_message", "check_queue", "message_map"]

TAGS_PROPERTY: Final = "TAGS"
"""Reserved property holding a message's tags: the log keeps only their hash (for
filtering), so the text travels in the properties, as RocketMQ does."""


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
    (:func:`cluster.protocol.queue_for_key`), else the topic's next queue in turn.

    Holds the round-robin position per topic; used by one handler on the event loop.
    """

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

    def choose_batch(
        self, topic: Topic, messages: Sequence[BatchMessage | Mapping[str, Any]]
    ) -> list[int]:
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


def build_message(
    topic: str,
    fields: SendRequest | BatchMessage | Mapping[str, Any],
    queue: int,
    path: str = "",
) -> Message:
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
    """A stored record as the wire's message map: ``TAGS`` back into ``tags``; the
    producer mark of an idempotent batch's first record is the node's, not the user's."""
    props = record.properties if len(record.properties_raw) else None
    tags = props.pop(TAGS_PROPERTY, None) if props else None
    if record.flags & FLAG_PRODUCER_BATCH and props:
        props.pop(PRODUCER_PROPERTY, None)
    return pulled_message(
        queue_offset,
        record.physical_offset,
        record.body,
        record.born_us,
        record.store_us,
        tags=tags,
        props=props,
    )
