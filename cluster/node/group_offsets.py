"""Committed consumer-group offsets: the record that carries a commit, and the map the
records add up to (sans-IO).

A commit is a record in the internal topic :data:`OFFSETS_TOPIC` (queue 0), appended
through the normal write path, so it is replicated, fsynced and cut exactly like a
message. The map is the last commit per ``(group, topic, queue)`` in log order, so a
replay of the topic's queue on any node (a restart, a slave, a new master) gives the
same map. No compaction: the map holds every key ever committed, and a key whose last
commit was deleted by retention is forgotten (Kafka's offsets retention, by another name).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Final

import attrs

from storage.names import INTERNAL_TOPIC_PREFIX, is_valid_topic_name

__all__ = [
    "OFFSETS_QUEUE",
    "OFFSETS_TOPIC",
    "Commit",
    "OffsetsMap",
    "decode_commit",
    "encode_commit",
]

OFFSETS_TOPIC: Final = f"{INTERNAL_TOPIC_PREFIX}offsets"
"""Where commits are stored; clients cannot name it (the topic rule refuses ``_`` first)."""
OFFSETS_QUEUE: Final = 0


@attrs.frozen
class Commit:
    """One committed position: the group's next queue offset to read in one queue."""

    group: str
    topic: str
    queue: int
    offset: int

    def __attrs_post_init__(self) -> None:
        assert is_valid_topic_name(self.group) and is_valid_topic_name(self.topic)
        assert self.queue >= 0 and self.offset >= 0


def encode_commit(commit: Commit) -> bytes:
    """The record body: compact JSON, readable in a dump of the log."""
    return json.dumps(
        {"g": commit.group, "t": commit.topic, "q": commit.queue, "o": commit.offset},
        separators=(",", ":"),
    ).encode()


def decode_commit(body: bytes) -> Commit | None:
    """The commit a record body carries, or None for a body that is not one (it is
    skipped: a later version's record must not stop an older node's replay)."""
    try:
        raw = json.loads(body)
        commit = Commit(raw["g"], raw["t"], raw["q"], raw["o"])
    except (ValueError, KeyError, TypeError, AssertionError):
        return None
    if type(commit.queue) is not int or type(commit.offset) is not int:
        return None
    return commit


class OffsetsMap:
    """The last committed offset per ``(group, topic, queue)``, in the order applied.

    Invariant: after applying the records of the offsets queue in log order, ``get``
    answers the offset of the last commit of that key. One task applies and reads
    (the node's event loop); no locking.
    """

    def __init__(self) -> None:
        self._offsets: dict[str, dict[tuple[str, int], int]] = {}

    def apply(self, commit: Commit) -> None:
        self._offsets.setdefault(commit.group, {})[(commit.topic, commit.queue)] = commit.offset

    def apply_all(self, commits: Iterable[Commit]) -> None:
        for commit in commits:
            self.apply(commit)

    def get(self, group: str, topic: str, queue: int) -> int | None:
        return self._offsets.get(group, {}).get((topic, queue))

    def group(self, group: str) -> Mapping[tuple[str, int], int]:
        """Every committed position of ``group``: ``(topic, queue) -> offset``."""
        return dict(self._offsets.get(group, {}))

    def groups(self) -> list[str]:
        return sorted(self._offsets)

    def __iter__(self) -> Iterator[Commit]:
        for group, positions in sorted(self._offsets.items()):
            for (topic, queue), offset in sorted(positions.items()):
                yield Commit(group, topic, queue, offset)
