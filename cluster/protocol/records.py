"""Records as the log stores them, read by clients: a ``pull`` with ``format`` ``records``.

Such an answer carries the stored bytes of the records (docs/format.md, *Record*) back
to back in one byte string, as the node's log holds them: the node decodes and copies
nothing per record, the client decodes them here and checks each one's CRC.

The client library does not import the storage engine (a client is not a node), so the
layout is spelled out here from docs/format.md; a test checks it against
``storage/record.py``, which writes it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final, TypeAlias, TypeVar, overload

from crc32c import crc32c

__all__ = [
    "FORMATS",
    "MESSAGES_FORMAT",
    "RECORDS_FORMAT",
    "CorruptRecordError",
    "PulledRecord",
    "decode_records",
    "record_message",
]

MESSAGES_FORMAT: Final = "messages"
"""A ``pull`` answer with ``messages``, a map per message (the default)."""
RECORDS_FORMAT: Final = "records"
"""A ``pull`` answer with ``records``, the stored bytes of the messages."""
FORMATS: Final = (MESSAGES_FORMAT, RECORDS_FORMAT)

RECORD_HEADER: Final = struct.Struct("<IIIIIIQQQQQHBB")
"""total_size, magic, crc, flags, queue_id, body_size, queue_offset, physical_offset,
born_us, store_us, tags_hash, props_size, topic_size, reserved (68 bytes)."""
RECORD_MAGIC: Final = 0x7D1E_0001
CRC_START: Final = 12
"""The CRC covers bytes ``[12, total_size)`` of a record."""
FLAG_PRODUCER_BATCH: Final = 0x2
"""The first record of an idempotent batch: its ``PRODUCER`` property is the node's."""
TAGS_PROPERTY: Final = "TAGS"
"""Where the log keeps a message's tags (moved back into ``tags`` when read)."""
PRODUCER_PROPERTY: Final = "PRODUCER"

_LENGTH: Final = struct.Struct("<H")

PulledRecord: TypeAlias = tuple[int, int, bytes, int, int, str | None, dict[str, str]]
"""One decoded record: queue offset, physical offset, body, born_us, store_us, tags,
props (the fields of a ``messages`` entry, in that order)."""


_Decoded = TypeVar("_Decoded")


def _as_tuple(*fields: Any) -> PulledRecord:
    return fields


class CorruptRecordError(ValueError):
    """A record of a ``records`` answer is not what was asked for, or fails its CRC."""


@overload
def decode_records(data: bytes, topic: str, queue: int, next_offset: int) -> list[PulledRecord]: ...
@overload
def decode_records(
    data: bytes, topic: str, queue: int, next_offset: int, make: Callable[..., _Decoded]
) -> list[_Decoded]: ...
def decode_records(
    data: bytes,
    topic: str,
    queue: int,
    next_offset: int,
    make: Callable[..., Any] = _as_tuple,
) -> list[Any]:
    """The records of a ``pull`` answer's ``records`` bytes, checked, each as
    ``make(*fields)`` (the fields of a :data:`PulledRecord`; by default that tuple).

    Each must be a whole record of ``topic``/``queue`` whose CRC matches, and their queue
    offsets must run without a gap up to ``next_offset`` (the answer's): else
    :class:`CorruptRecordError` names the first bad one.
    """
    data = bytes(data)  # a no-op for bytes, which the checks below read without slicing
    view = memoryview(data)
    end = len(view)
    wanted_topic = topic.encode("ascii")
    unpack = RECORD_HEADER.unpack_from
    header_size = RECORD_HEADER.size
    records: list[Any] = []
    append = records.append
    pos = 0
    expected = -1
    while pos < end:
        if pos + header_size > end:
            raise _corrupt(topic, queue, pos, "is cut short (no whole header)")
        (
            size,
            magic,
            crc,
            flags,
            queue_id,
            body_size,
            queue_offset,
            offset,
            born_us,
            store_us,
            _tags_hash,
            props_size,
            topic_size,
            _reserved,
        ) = unpack(view, pos)
        if magic != RECORD_MAGIC:
            raise _corrupt(topic, queue, pos, f"has magic 0x{magic:08x}, not a record's")
        if pos + size > end or header_size + topic_size + props_size + body_size != size:
            raise _corrupt(topic, queue, pos, f"claims {size} bytes that do not add up")
        if crc32c(view[pos + CRC_START : pos + size]) != crc:
            raise _corrupt(topic, queue, pos, f"(log offset {offset}) fails its CRC check")
        at = pos + header_size
        if (
            queue_id != queue
            or topic_size != len(wanted_topic)
            or not data.startswith(wanted_topic, at)
        ):
            raise _corrupt(topic, queue, pos, f"belongs to queue {queue_id} of another topic")
        if expected >= 0 and queue_offset != expected:
            raise _corrupt(topic, queue, pos, f"has queue offset {queue_offset}, not {expected}")
        expected = queue_offset + 1
        at += topic_size
        tags = None
        props: dict[str, str] = {}
        if props_size:
            props = _properties(view[at : at + props_size])
            tags = props.pop(TAGS_PROPERTY, None)
            if flags & FLAG_PRODUCER_BATCH:
                props.pop(PRODUCER_PROPERTY, None)
        at += props_size
        append(make(queue_offset, offset, data[at : at + body_size], born_us, store_us, tags,
                    props))  # fmt: skip
        pos += size
    if expected >= 0 and expected != next_offset:
        raise _corrupt(topic, queue, pos, f"ends at queue offset {expected}, not {next_offset}")
    return records


def record_message(record: PulledRecord) -> dict[str, object]:
    """A decoded record as a ``messages`` entry (the map a default ``pull`` answer holds)."""
    queue_offset, offset, body, born_us, store_us, tags, props = record
    message: dict[str, object] = {
        "queue_offset": queue_offset,
        "offset": offset,
        "body": body,
        "born_us": born_us,
        "store_us": store_us,
    }
    if tags is not None:
        message["tags"] = tags
    if props:
        message["props"] = props
    return message


def _properties(data: memoryview) -> dict[str, str]:
    """(u16 length, UTF-8 key), (u16 length, UTF-8 value) pairs (docs/format.md)."""
    parts: list[str] = []
    pos, end = 0, len(data)
    while pos < end:
        if pos + 2 > end:
            raise CorruptRecordError("a record's properties end inside a length")
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += 2
        if pos + size > end:
            raise CorruptRecordError("a record's properties run past their declared size")
        parts.append(str(data[pos : pos + size], "utf-8"))
        pos += size
    if len(parts) % 2:
        raise CorruptRecordError("a record's properties hold a key without a value")
    return dict(zip(parts[::2], parts[1::2], strict=True))


def _corrupt(topic: str, queue: int, pos: int, what: str) -> CorruptRecordError:
    return CorruptRecordError(
        f"pull answer for {topic}/{queue}: the record at byte {pos} of 'records' {what}; "
        "the node's copy may be damaged: read from another node, and check the node's log"
    )
