"""The topic registry: which topics exist and how many queues each has, kept in topics.json.

The store accepts any valid topic name; the registry is what makes a topic *exist* for
clients (``UNKNOWN_TOPIC`` otherwise) and fixes its queue count, which key hashing and
queue-range checks depend on. A topic is visible only after the file that records it
is on disk, so a crash can never forget a topic that messages were already sent to.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from cluster.protocol import MAX_QUEUES
from storage.mapped_file import replace_file_atomically
from storage.names import TOPIC_RULE, is_valid_topic_name

__all__ = [
    "FORMAT_VERSION",
    "InvalidTopicNameError",
    "QueueCountError",
    "Topic",
    "TopicError",
    "TopicExistsError",
    "TopicRegistry",
    "TopicRegistryCorruptError",
    "UnknownTopicError",
    "check_growth",
    "check_queue_count",
    "check_topic_name",
]

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1


class TopicError(Exception):
    """Base of the registry's errors; the server maps each to a wire status."""


class TopicExistsError(TopicError):
    """``create`` for a name that is taken; carries the existing topic so a client that
    asked for the same queue count can treat the create as done."""

    def __init__(self, topic: Topic) -> None:
        super().__init__(f"topic {topic.name!r} already exists with {topic.queues} queue(s)")
        self.topic = topic


class InvalidTopicNameError(TopicError):
    """The name breaks the naming rules (see docs/protocol.md, *Topic names*)."""


class QueueCountError(TopicError):
    """A queue count outside 1..MAX_QUEUES."""


class UnknownTopicError(TopicError):
    """The registry has no topic of that name."""


class TopicRegistryCorruptError(TopicError):
    """topics.json exists but cannot be read; starting without it would forget topics."""


@attrs.frozen
class Topic:
    """One topic: its name, how many queues it has, when it was created (us since the epoch)."""

    name: str
    queues: int
    created_us: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "queues": self.queues, "created_us": self.created_us}


def check_topic_name(name: object) -> str:
    """``name`` if it is a valid topic name, else :class:`InvalidTopicNameError`."""
    if not isinstance(name, str) or not is_valid_topic_name(name):
        raise InvalidTopicNameError(f"invalid topic name {name!r}: use {TOPIC_RULE}")
    return name


def check_queue_count(queues: object) -> int:
    """``queues`` if it is an integer in 1..MAX_QUEUES, else :class:`QueueCountError`."""
    if type(queues) is not int or not 1 <= queues <= MAX_QUEUES:
        raise QueueCountError(f"queues must be an integer from 1 to {MAX_QUEUES}, got {queues!r}")
    return queues


class TopicRegistry:
    """Topics by name, persisted atomically. Build it with :meth:`open`."""

    def __init__(self, path: Path, topics: dict[str, Topic] | None = None) -> None:
        self.path = path
        self._topics: dict[str, Topic] = dict(topics or {})
        self._lock = trio.Lock()
        """One create at a time: each writes the whole file, and the second create of a
        name must see the first one's outcome."""

    @classmethod
    async def open(cls, path: Path) -> TopicRegistry:
        """Load ``path`` (no file: no topics yet)."""
        topics = await trio.to_thread.run_sync(_load, path)
        log.info("topics_loaded path=%s count=%d", path, len(topics))
        return cls(path, topics)

    def get(self, name: str) -> Topic | None:
        return self._topics.get(name)

    def list(self) -> list[Topic]:
        """Every topic, by name."""
        return sorted(self._topics.values(), key=lambda t: t.name)

    def __len__(self) -> int:
        return len(self._topics)

    async def create(self, name: str, queues: int) -> Topic:
        """Create and persist a topic; it is visible once it is on disk.

        Raises :class:`InvalidTopicNameError`, :class:`QueueCountError` or
        :class:`TopicExistsError`; nothing changes then.
        """
        check_topic_name(name)
        check_queue_count(queues)
        async with self._lock:
            existing = self._topics.get(name)
            if existing is not None:
                raise TopicExistsError(existing)
            topic = Topic(name, queues, time.time_ns() // 1000)
            snapshot = [t.to_json() for t in (*self._topics.values(), topic)]
            await trio.to_thread.run_sync(_save, self.path, snapshot)
            self._topics[name] = topic
        log.info("topic_created topic=%s queues=%d", name, queues)
        return topic

    async def alter(self, name: str, queues: int) -> Topic:
        """Grow ``name`` to ``queues`` queues and persist it (the same count: nothing to do).

        Never shrinks: a queue's records stay in the log and keys already hashed onto
        it would move, so a consumer would lose them; :class:`QueueCountError` says so.
        :class:`UnknownTopicError` when the topic does not exist; nothing changes then.
        """
        check_queue_count(queues)
        async with self._lock:
            existing = self._topics.get(name)
            if existing is None:
                raise UnknownTopicError(f"topic {name!r} does not exist")
            check_growth(existing, queues)
            if queues == existing.queues:
                return existing
            topic = attrs.evolve(existing, queues=queues)
            others = [t.to_json() for t in self._topics.values() if t.name != name]
            snapshot = [*others, topic.to_json()]
            await trio.to_thread.run_sync(_save, self.path, snapshot)
            self._topics[name] = topic
        log.info("topic_altered topic=%s queues=%d was=%d", name, queues, existing.queues)
        return topic

    async def delete(
        self, name: str, drop_records: Callable[[], Awaitable[object]] | None = None
    ) -> Topic:
        """Delete ``name``: it leaves the table at once (writes and reads get
        ``UNKNOWN_TOPIC``), ``drop_records`` runs (the store's deletion marker, made
        durable), then the file forgets it. A create of the name waits for all of that
        (the lock), so a re-created topic starts after the marker, fresh.

        :class:`UnknownTopicError` when there is no such topic. When ``drop_records``
        raises, the topic is back as it was and the error propagates.
        """
        async with self._lock:
            topic = self._topics.pop(name, None)
            if topic is None:
                raise UnknownTopicError(f"topic {name!r} does not exist")
            try:
                if drop_records is not None:
                    await drop_records()
                snapshot = [t.to_json() for t in self._topics.values()]
                await trio.to_thread.run_sync(_save, self.path, snapshot)
            except BaseException:
                self._topics[name] = topic
                raise
        log.info("topic_removed topic=%s queues=%d", name, topic.queues)
        return topic


def check_growth(topic: Topic, queues: int) -> None:
    """Refuse a queue count below the topic's (with why), like Kafka's partition count."""
    if queues < topic.queues:
        raise QueueCountError(
            f"topic {topic.name!r} has {topic.queues} queue(s); a queue count can only grow "
            f"(asked for {queues}): its queues' records stay in the log and keyed messages "
            "would hash to other queues, so to use fewer queues create a new topic"
        )


# ---- blocking file work (worker threads) -----------------------------------------------------


def _load(path: Path) -> dict[str, Topic]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        document = json.loads(raw)
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported version {document.get('version')!r}")
        topics = [Topic(t["name"], t["queues"], t["created_us"]) for t in document["topics"]]
        for topic in topics:
            check_topic_name(topic.name)
            check_queue_count(topic.queues)
    except (ValueError, KeyError, TypeError, AttributeError, TopicError) as exc:
        raise TopicRegistryCorruptError(
            f"{path}: cannot read the topic registry ({exc}); restore it from a backup or "
            "recreate the topics with their queue counts before starting the node"
        ) from exc
    return {topic.name: topic for topic in topics}


def _save(path: Path, topics: list[dict[str, Any]]) -> None:
    """Write tmp, fsync, rename over ``path``, fsync the directory: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"version": FORMAT_VERSION, "topics": topics}, indent=1).encode()
    replace_file_atomically(path, data)
