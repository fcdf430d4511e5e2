"""The on-disk record format of the CommitLog (every byte is documented in docs/format.md).

A record is a fixed little-endian header followed by the topic, the encoded
properties and the body::

    0  u32 total_size      whole record, header included
    4  u32 magic           RECORD_MAGIC (carries the format version)
    8  u32 crc             CRC32C of bytes [12, total_size)
    12 u32 flags
    16 u32 queue_id
    20 u32 body_size
    24 u64 queue_offset
    32 u64 physical_offset  where the record starts in the log; checked on read
    40 u64 born_us          producer timestamp, microseconds since the epoch
    48 u64 store_us         master's store timestamp, microseconds
    56 u64 tags_hash        CRC32C of the tags string (0 = no tags)
    64 u16 props_size
    66 u8  topic_size
    67 u8  reserved (0)
    68 topic | props | body

The CRC is computed over the bytes already packed in the map, so the hot path
never builds an intermediate ``bytes`` per record. A segment ends with a BLANK
filler (``total_size`` + ``BLANK_MAGIC``) when the next record does not fit:
records never straddle two segments.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import attrs
from crc32c import crc32c

from storage.errors import CorruptSegmentError, InvalidMessageError
from storage.names import MAX_TOPIC_LENGTH as MAX_TOPIC_LENGTH  # the one rule, re-exported
from storage.names import validate_topic as validate_topic

RECORD_MAGIC = 0x7D1E_0001
"""Magic of a record; the low 16 bits are the format version."""
BLANK_MAGIC = 0x7D1E_BB01
"""Magic of the filler that ends a segment."""

HEADER = struct.Struct("<IIIIIIQQQQQHBB")
HEADER_SIZE = HEADER.size
CRC_FIELD = struct.Struct("<I")
CRC_OFFSET = 8
CRC_START = 12
BLANK = struct.Struct("<II")
BLANK_MIN = BLANK.size
"""Every segment keeps room for a filler header, so a roll-over can always mark its end."""

MAX_QUEUE_ID = 0xFFFF

FLAG_NONE = 0
FLAG_TOPIC_DELETED = 0x0000_0001
"""A topic deletion marker (empty body, queue 0): every consume queue of its topic is
dropped where the dispatcher meets it, and the topic's queue offsets start again at 0
after it. It is no message: no queue indexes it, whatever node reads the log."""

FLAG_PRODUCER_BATCH = 0x0000_0002
"""The first record of an idempotent producer's batch: its ``PRODUCER`` property holds
``"<producer id>:<first sequence>:<count>"``, so a new master rebuilds what it must
deduplicate from the log (cluster/node/idempotence.py). Only that one flag bit tells
a scan which records to decode."""

_PROP_LEN = struct.Struct("<H")

assert HEADER_SIZE == 68


def tags_hash(tags: str | None) -> int:
    """Hash stored in the record and the consume queue so consumers can filter by tag."""
    return crc32c(tags.encode()) if tags else 0


def encode_properties(props: Mapping[str, str] | None) -> bytes:
    """Encode properties as (u16 len, utf-8 key, u16 len, utf-8 value) pairs."""
    if not props:
        return b""
    out = bytearray()
    for key, value in props.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise InvalidMessageError(
                f"property {key!r}={value!r}: keys must be non-empty strings and values strings"
            )
        for part in (key.encode(), value.encode()):
            if len(part) > 0xFFFF:
                raise InvalidMessageError(f"property {key!r} is longer than 65535 bytes")
            out += _PROP_LEN.pack(len(part))
            out += part
    if len(out) > 0xFFFF:
        raise InvalidMessageError("properties take more than 65535 bytes in all; send fewer")
    return bytes(out)


def decode_properties(data: bytes | memoryview) -> dict[str, str]:
    """Inverse of :func:`encode_properties`."""
    props: dict[str, str] = {}
    pos, end = 0, len(data)
    parts: list[str] = []
    while pos < end:
        (size,) = _PROP_LEN.unpack_from(data, pos)
        pos += 2
        if pos + size > end:
            raise CorruptSegmentError("properties run past their declared size")
        parts.append(bytes(data[pos : pos + size]).decode())
        pos += size
    if len(parts) % 2:
        raise CorruptSegmentError("properties hold a key without a value")
    for i in range(0, len(parts), 2):
        props[parts[i]] = parts[i + 1]
    return props


@attrs.frozen(slots=True)
class Message:
    """What a producer asks the log to store.

    ``properties`` are kept pre-encoded so that a message built once can be
    appended (or retried) without re-encoding; build it with :meth:`create`.
    """

    topic: str
    body: bytes
    queue_id: int = 0
    tags: str | None = None
    properties: bytes = b""
    born_us: int = 0
    flags: int = FLAG_NONE

    @classmethod
    def create(
        cls,
        topic: str,
        body: bytes,
        queue_id: int = 0,
        *,
        tags: str | None = None,
        properties: Mapping[str, str] | None = None,
        born_us: int = 0,
    ) -> Message:
        return cls(topic, body, queue_id, tags, encode_properties(properties), born_us)


@attrs.frozen(slots=True)
class StoredRecord:
    """A record read from the log. ``body`` is a zero-copy view into the segment map.

    The view stays valid while it is referenced, even if the segment is deleted;
    call :meth:`release` (or drop the record) when done so the map can be unmapped.
    """

    physical_offset: int
    size: int
    queue_id: int
    queue_offset: int
    flags: int
    born_us: int
    store_us: int
    tags_hash: int
    topic: str
    properties_raw: memoryview
    body: memoryview

    @property
    def end_offset(self) -> int:
        return self.physical_offset + self.size

    @property
    def properties(self) -> dict[str, str]:
        return decode_properties(self.properties_raw)

    def release(self) -> None:
        self.body.release()
        self.properties_raw.release()


@attrs.frozen(slots=True)
class RecordHeader:
    """The fixed header, decoded; what the dispatcher and the scanner need."""

    size: int
    queue_id: int
    queue_offset: int
    physical_offset: int
    store_us: int
    tags_hash: int
    topic_size: int
    props_size: int
    body_size: int


def record_size(topic_size: int, props_size: int, body_size: int) -> int:
    return HEADER_SIZE + topic_size + props_size + body_size


def record_crc(view: memoryview, pos: int, size: int) -> int:
    return crc32c(view[pos + CRC_START : pos + size])


def write_blank(view: memoryview, pos: int, size: int) -> None:
    """Mark [pos, pos+size) as the end-of-segment filler."""
    BLANK.pack_into(view, pos, size, BLANK_MAGIC)


class ScanStop(Exception):
    """Why a scan stopped before its limit: the first byte that is not a whole, valid record."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"{reason} at offset {offset}")
        self.offset = offset
        self.reason = reason


def check_record(view: memoryview, pos: int, base: int, limit: int) -> int:
    """Verify the record at ``pos`` of a segment starting at log offset ``base``.

    Returns its size, or ``-size`` for a BLANK filler. Raises :class:`ScanStop` when
    the bytes there are not a complete, valid record: zeros (the end of the log),
    a torn or corrupt record, or a record that claims another position.
    ``limit`` is the position in ``view`` that the record may not cross.
    """
    offset = base + pos
    if pos + BLANK_MIN > limit:
        raise ScanStop(offset, "no room for a record header")
    size, magic = BLANK.unpack_from(view, pos)
    if size == 0 and magic == 0:
        raise ScanStop(offset, "end of data")
    if magic == BLANK_MAGIC:
        if pos + size != limit:
            raise ScanStop(offset, f"filler of {size} bytes does not end the segment")
        return -size
    if magic != RECORD_MAGIC:
        raise ScanStop(offset, f"bad magic 0x{magic:08x}")
    if size < HEADER_SIZE or pos + size > limit:
        raise ScanStop(offset, f"record size {size} runs past the data")
    fields = HEADER.unpack_from(view, pos)
    stored_crc, body_size, physical, props_size, topic_size = (
        fields[2],
        fields[5],
        fields[7],
        fields[11],
        fields[12],
    )
    if physical != offset:
        raise ScanStop(offset, f"record claims offset {physical}")
    if record_size(topic_size, props_size, body_size) != size:
        raise ScanStop(offset, "record parts do not add up to its size")
    if record_crc(view, pos, size) != stored_crc:
        raise ScanStop(offset, "CRC mismatch (torn or corrupt record)")
    return size


def read_header(view: memoryview, pos: int) -> RecordHeader:
    """Decode the header of a record already known to be valid."""
    (
        size,
        _m,
        _c,
        _f,
        queue_id,
        body_size,
        queue_offset,
        physical,
        _b,
        store_us,
        th,
        ps,
        ts,
        _r,
    ) = HEADER.unpack_from(view, pos)
    return RecordHeader(size, queue_id, queue_offset, physical, store_us, th, ts, ps, body_size)


def decode_record(view: memoryview, pos: int, base: int) -> StoredRecord:
    """Decode the record at ``pos``; raise :class:`CorruptSegmentError` if it is not valid."""
    if pos < 0 or pos + HEADER_SIZE > len(view):  # e.g. an offset inside a segment's filler
        raise CorruptSegmentError(f"no record starts at offset {base + pos}")
    (
        size,
        magic,
        stored_crc,
        flags,
        queue_id,
        body_size,
        queue_offset,
        physical,
        born_us,
        store_us,
        th,
        props_size,
        topic_size,
        _reserved,
    ) = HEADER.unpack_from(view, pos)
    if magic != RECORD_MAGIC or physical != base + pos or size < HEADER_SIZE:
        raise CorruptSegmentError(f"no record starts at offset {base + pos}")
    if pos + size > len(view) or record_crc(view, pos, size) != stored_crc:
        raise CorruptSegmentError(f"record at offset {base + pos} fails its CRC check")
    p = pos + HEADER_SIZE
    topic = bytes(view[p : p + topic_size]).decode("ascii")
    p += topic_size
    props = view[p : p + props_size]
    p += props_size
    return StoredRecord(
        physical,
        size,
        queue_id,
        queue_offset,
        flags,
        born_us,
        store_us,
        th,
        topic,
        props,
        view[p : p + body_size],
    )
