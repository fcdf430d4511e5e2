"""The CommitLog: every topic's records, appended to one sequence of segments.

One writer (the trio task that calls :meth:`append` or :meth:`append_batch`)
packs records into the active segment: less than a page straight into its map, more
into a buffer written with one ``pwrite`` (no page fault per page). The write part of an
append is synchronous (no checkpoint inside), so a cancelled append either wrote
whole records or nothing; the only await is taking the next segment, which
happens *before* any byte of the batch is written. Durability is separate:
:meth:`flush` fdatasyncs in a worker thread, and the flush services decide when;
:meth:`begin_flush` starts one from plain code and reports on the loop (group commit).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import attrs
import outcome
import trio
from crc32c import crc32c

from storage.allocator import SegmentAllocator
from storage.config import StoreConfig
from storage.errors import (
    CorruptSegmentError,
    DiskFullError,
    InvalidMessageError,
    MessageTooLargeError,
    OffsetOutOfRangeError,
    SegmentMissingError,
    StorageFailedError,
)
from storage.mapped_file import MappedFile
from storage.mapped_file_queue import MappedFileQueue
from storage.record import (
    BLANK,
    BLANK_MAGIC,
    BLANK_MIN,
    CRC_FIELD,
    CRC_OFFSET,
    CRC_START,
    FLAG_TOPIC_DELETED,
    HEADER,
    HEADER_SIZE,
    MAX_QUEUE_ID,
    RECORD_MAGIC,
    Message,
    ScanStop,
    StoredRecord,
    check_record,
    decode_record,
    tags_hash,
    validate_topic,
    write_blank,
)
from storage.sync_thread import SyncThread

log = logging.getLogger(__name__)

_pack_header = HEADER.pack_into
_unpack_header = HEADER.unpack_from
_pack_crc = CRC_FIELD.pack_into
_unpack_blank = BLANK.unpack_from
_unpack_dispatch = struct.Struct("<II4xII4xQ24xQ2xB").unpack_from
"""size, magic, flags, queue_id, queue_offset, tags_hash, topic_size: the header fields
that indexing needs (offsets 0, 4, 12, 16, 24, 56, 66 of docs/format.md)."""
_unpack_received = struct.Struct("<IIIIIIQQ16xQHB").unpack_from
"""size, magic, crc, flags, queue_id, body_size, queue_offset, physical offset, tags_hash,
props_size, topic_size: what checking a replicated record and indexing it need (all of
the header but the timestamps), in one unpack."""

_pwrite = os.pwrite
_PWRITE_MIN = 4096
"""Replicated chunks this long or longer are written with ``pwrite``, not through the map
(see :func:`_copy_in`): CPU per KiB written to a warm segment, map / ``pwrite``, 0.89 / 1.21
us at 1.1 KiB, 0.85 / 0.80 at 2.2 KiB, 0.84 / 0.58 at 4.4 KiB, 0.73 / 0.30 at 70 KiB."""

_PACK_KEEP = 1 << 20
"""Own appends of a page or more are packed into a buffer and written with one ``pwrite``
(:meth:`CommitLog._pack_space`); the log keeps a buffer up to this size for the next one,
a larger batch packs into its own."""

IndexFields = tuple[int, int, str, int, int, int, int]
"""(offset, size, topic, queue_id, queue_offset, tags_hash, flags) of one record: what
the dispatcher indexes, from :meth:`CommitLog.iter_headers` or :meth:`CommitLog.take_appended`."""

APPENDED_LIMIT = 16_384
"""Most own appends :meth:`CommitLog.take_appended` holds: past it they are dropped (the
dispatcher then reads their headers back), so a log appended to with no dispatcher taking
them (a benchmark, a tool) does not grow without bound. Above the largest batch a send may
carry, so a node's dispatches always take them."""


class AppendResult(NamedTuple):
    """Where a record landed. ``end_offset`` is what a durable or replicated ack waits for.

    A NamedTuple, not attrs: one is built per append on the hot path, and a frozen
    attrs instance costs several times as much to create.
    """

    offset: int
    size: int
    queue_id: int
    queue_offset: int
    store_us: int

    @property
    def end_offset(self) -> int:
        return self.offset + self.size


@attrs.frozen(slots=True)
class BatchAppendResult:
    """Where each record of a batch landed, in input order (parallel lists: no object per record)."""

    offsets: list[int]
    queue_offsets: list[int]
    end_offset: int
    store_us: int


def _pack_record(
    view: memoryview,
    pos: int,
    size: int,
    offset: int,
    message: Message,
    topic: bytes,
    queue_offset: int,
    now_us: int,
) -> int:
    """Write one record at ``pos``: header, topic, properties, body, then its CRC.
    Returns the hash of its tags (0 for none), which the consume queue keeps too."""
    body = message.body
    props = message.properties
    tags = tags_hash(message.tags) if message.tags else 0
    topic_size = len(topic)
    props_size = len(props)
    _pack_header(
        view,
        pos,
        size,
        RECORD_MAGIC,
        0,
        message.flags,
        message.queue_id,
        len(body),
        queue_offset,
        offset,
        message.born_us or now_us,
        now_us,
        tags,
        props_size,
        topic_size,
        0,
    )
    p = pos + HEADER_SIZE
    view[p : p + topic_size] = topic
    p += topic_size
    if props_size:
        view[p : p + props_size] = props
        p += props_size
    view[p : pos + size] = body
    _pack_crc(view, pos + CRC_OFFSET, crc32c(view[pos + CRC_START : pos + size]))
    return tags


@attrs.frozen
class LastSync:
    """One fdatasync of the log: the offset it made durable, and when it began and ended
    on the sync thread (``perf_counter`` seconds, one clock for every process)."""

    flushed_offset: int
    began: float
    ended: float


class CommitLog:
    """The log of one node: every record of every topic, in one offset space, in the
    segments of :attr:`files`; :class:`storage.store.MessageStore` recovers and owns it.

    Invariants (between any two awaits):

    - The segments are contiguous (segment ``i`` starts at ``first.base + i *
      segment_size``) and every byte in ``[min_offset, max_offset)`` belongs to a whole,
      CRC-valid record or to a segment's closing filler; there is no partial record
      below :attr:`max_offset` (a slave's partial one waits past it, :attr:`raw_pending`).
    - Every segment but the last is full (``wrote == size``, ended by a filler); the last
      keeps ``BLANK_MIN`` bytes free for its filler.
    - ``flushed_offset <= max_offset``; bytes below ``flushed_offset`` were fdatasynced.
    - Once :attr:`failure` is set it stays set: no write and no fsync happen again.

    Concurrency (one trio thread; blocking work goes to threads): any number of tasks
    may call :meth:`append` and :meth:`append_batch` at once (the write part is
    synchronous; taking segments is serialised by ``_take_lock`` and re-checked after
    each await). :meth:`append_raw` is for one replication stream at a time and never
    overlaps own appends (a slave takes none; a promoted one first calls
    :meth:`discard_raw_pending`). :meth:`truncate` and :meth:`restart_at` hold both
    locks, so they wait for a segment take or a flush in flight; the store must still
    not let appends run during them (its queue bookkeeping follows the cut).
    :meth:`flush` callers share one fsync. :meth:`take_appended` is the dispatcher's (one
    task at a time). Reads (:meth:`read`, :meth:`scan`) may run at
    any time; a record's body view stays valid after a cut (the map lives until the
    last view is released).
    """

    def __init__(self, config: StoreConfig, allocator: SegmentAllocator) -> None:
        self.config = config
        self.files = MappedFileQueue(config.commit_log_dir, config.segment_size)
        self.allocator = allocator
        self.next_queue_offsets: dict[tuple[str, int], int] = {}
        """(topic, queue id) -> queue offset the next record of that queue gets."""
        self.flushed_offset = 0
        self.failure: StorageFailedError | None = None
        self._failed = trio.Event()
        self.disk_full: DiskFullError | None = None
        """Set by retention while the disk is above its watermark: own appends are refused
        (replicated ones are not: a slave follows its master)."""
        self._topics: dict[str, bytes] = {}
        self._spares: collections.deque[MappedFile] = collections.deque()
        self._flush_lock = trio.Lock()
        self._take_lock = trio.Lock()
        self._sync_thread = SyncThread("commitlog-fsync")
        self._syncing: trio.Event | None = None
        """Set while an fdatasync started by :meth:`begin_flush` runs (it holds no lock):
        whoever takes ``_flush_lock`` waits for it, and none starts while the lock is held,
        so at most one fdatasync of the log runs at a time."""
        self._closed = False
        self.flush_count = 0
        self.on_flush: Callable[[float, float], None] = _ignore_flush
        """Called after each flush that fsynced, with its seconds from the call (lock wait
        and the sync thread's hand-offs included) and of the fdatasync alone, as the sync
        thread timed it: the node's metrics time flushes through it."""
        self.last_sync: LastSync | None = None
        """The last fdatasync that succeeded (``bench produce --trace`` places it among a
        write's hops)."""
        self.raw_pending = 0
        """Bytes received by :meth:`append_raw` past :attr:`max_offset`: the start of a
        record whose rest is in the next chunk. Kept in the map, never exposed."""
        self._packing = memoryview(bytearray())
        """Where own appends of a page or more are packed before their ``pwrite``."""
        self._appended: list[IndexFields] = []
        """The index fields of appends the dispatcher has not taken yet, in log order (see
        :meth:`take_appended`): own appends', or the records the last replicated chunk
        exposed. Whenever it is not empty it holds every record from its first to
        :attr:`max_offset` (only segment fillers lie between them): a replicated chunk
        empties it before noting its own records, a cut empties it."""

    # ---- positions ---------------------------------------------------------------------

    @property
    def min_offset(self) -> int:
        return self.files.min_offset

    @property
    def max_offset(self) -> int:
        """Offset just past the last record: where the next one goes."""
        return self.files.max_offset

    @property
    def dirty_bytes(self) -> int:
        return self.max_offset - self.flushed_offset

    # ---- appending ---------------------------------------------------------------------

    def _topic_bytes(self, topic: str) -> bytes:
        encoded = self._topics.get(topic)
        if encoded is None:
            encoded = self._topics[topic] = validate_topic(topic)
        return encoded

    def _measure(self, message: Message) -> tuple[bytes, int]:
        """Validate ``message``; return its topic bytes and record size. Writes nothing."""
        topic = self._topic_bytes(message.topic)
        size = HEADER_SIZE + len(topic) + len(message.properties) + len(message.body)
        if size > self.config.max_message_size:
            raise MessageTooLargeError(
                f"record of {size} bytes exceeds max_message_size "
                f"{self.config.max_message_size}: send a smaller body or raise the limit"
            )
        if not 0 <= message.queue_id <= MAX_QUEUE_ID:
            raise InvalidMessageError(f"queue id {message.queue_id} is outside 0..{MAX_QUEUE_ID}")
        if message.tags:  # hashed while packing: must not fail half-way through a batch
            try:
                message.tags.encode()
            except (AttributeError, UnicodeEncodeError) as exc:
                raise InvalidMessageError(
                    f"tags {message.tags!r} must be a string encodable as UTF-8"
                ) from exc
        return topic, size

    async def append(self, message: Message) -> AppendResult:
        """Append one record; raises before writing anything if it is invalid."""
        if self.failure is not None or self.disk_full is not None:
            raise self._refusal()
        topic, size = self._measure(message)
        segments = self.files.segments  # not the ``last`` property: one append per send
        last = segments[-1] if segments else None
        if last is None or last.wrote + size + BLANK_MIN > last.size:
            await self._make_room((size,))
            if self._needs_roll(size):
                self._roll()
            last = self.files.last
            assert last is not None
        pos = last.wrote
        offset = last.base + pos
        key = (message.topic, message.queue_id)
        table = self.next_queue_offsets
        queue_offset = table.get(key, 0)
        now_us = time.time_ns() // 1000
        assert pos + size + BLANK_MIN <= last.size, (pos, size, last.size)
        view, shift = self._pack_space(last, pos, size)
        tags = _pack_record(view, pos - shift, size, offset, message, topic, queue_offset, now_us)
        self._write_packed(last, pos, pos + size, view)
        table[key] = queue_offset + 1
        appended = self._appended
        if len(appended) >= APPENDED_LIMIT:
            appended.clear()  # the dispatcher reads these back from the log
        appended.append((offset, size, key[0], key[1], queue_offset, tags, message.flags))
        return AppendResult(offset, size, message.queue_id, queue_offset, now_us)

    async def append_batch(self, messages: Sequence[Message]) -> BatchAppendResult:
        """Append many records in one pass with consecutive offsets; all or nothing.

        Every message is validated and every segment the batch needs is taken
        before the first byte is written.
        """
        if self.failure is not None or self.disk_full is not None:
            raise self._refusal()
        measure = self._measure
        measured = [measure(m) for m in messages]
        await self._make_room([size for _topic, size in measured])
        if self.failure is not None:
            raise self.failure
        segment = self.files.last
        if segment is None:
            segment = self._roll()
        base, pos, limit = segment.base, segment.wrote, segment.size - BLANK_MIN
        unpacked = sum([size for _topic, size in measured])
        view, shift = self._pack_space(segment, pos, unpacked)
        start = pos
        table = self.next_queue_offsets
        now_us = time.time_ns() // 1000
        offsets: list[int] = []
        queue_offsets: list[int] = []
        appended = self._appended
        if len(appended) + len(messages) > APPENDED_LIMIT:
            appended.clear()  # the dispatcher reads these back from the log
            if len(messages) > APPENDED_LIMIT:
                appended = []  # and this batch's too: filled, never kept
        first, first_wrote, rolled = segment, segment.wrote, 0
        try:
            for message, (topic, size) in zip(messages, measured, strict=True):
                if pos + size > limit:
                    self._write_packed(segment, start, pos, view)
                    unpacked -= pos - start
                    segment = self._roll()
                    rolled += 1
                    base, pos, start = segment.base, 0, 0
                    view, shift = self._pack_space(segment, 0, unpacked)
                key = (message.topic, message.queue_id)
                queue_offset = table.get(key, 0)
                offset = base + pos
                tags = _pack_record(
                    view, pos - shift, size, offset, message, topic, queue_offset, now_us
                )
                table[key] = queue_offset + 1
                offsets.append(offset)
                queue_offsets.append(queue_offset)
                appended.append((offset, size, key[0], key[1], queue_offset, tags, message.flags))
                pos += size
            assert pos <= limit, (pos, limit)
            self._write_packed(segment, start, pos, view)
        except StorageFailedError:
            self._unroll(first, first_wrote, rolled)
            raise
        return BatchAppendResult(offsets, queue_offsets, base + pos, now_us)

    def _unroll(self, first: MappedFile, first_wrote: int, rolled: int) -> None:
        """A write of a batch failed after ``rolled`` roll-overs: hide the parts written
        before it again (all or nothing), so no reader, flush or slave ever sees part of
        the batch. Nothing yielded since those parts became visible, so nobody saw them;
        the log has failed for good, so no append follows. The rolled-in segments go back
        to the spares; their bytes and the filler stay past the visible end, like a torn
        write's (recovery keeps whole records there, as after a crash mid-write)."""
        segments = self.files.segments
        for _ in range(rolled):
            self._spares.appendleft(segments.pop())
        first.wrote = first_wrote
        assert self.files.last is first, "a batch rolls from the log's last segment"

    def _pack_space(self, segment: MappedFile, start: int, length: int) -> tuple[memoryview, int]:
        """Where to pack the ``length`` bytes of records bound for ``segment`` from ``start``:
        ``(view, shift)``, the record at segment position ``p`` packed at ``p - shift`` of
        ``view``, then handed to :meth:`_write_packed`.

        Less than a page goes straight into the map; a page or more into the log's packing
        buffer, written with one ``pwrite``: a write through the map takes a page fault for
        each page it dirties, again after every fdatasync (which write-protects them), and
        costs more than the call from about a page on. Measured (CPU): 70 KiB with an
        fdatasync between rounds, 55 us through the map, 28 us packed and written; a batch
        of 64 records of 1 KiB, 2.5-2.8 us a record through the map, 2.0-2.2 packed (a
        buffer made per call: 2.1-2.3). Through the map one record is cheaper, 1.7 against
        2.4 us at 1.1 KiB and 0.9 against 1.9 at 128 B, with 16 and 64 writes between fsyncs.
        """
        if length < _PWRITE_MIN:
            return segment.view, 0
        packing = self._packing
        if len(packing) < length:
            packing = memoryview(bytearray(max(length, _PWRITE_MIN)))
            if length <= _PACK_KEEP:
                self._packing = packing
        return packing, start

    def _write_packed(self, segment: MappedFile, start: int, end: int, view: memoryview) -> None:
        """Make ``[start, end)`` of ``segment`` hold the records packed in ``view`` (see
        :meth:`_pack_space`), then advance ``segment.wrote`` over them: never before, so
        readers, flushes and replication see whole records only.

        A short ``pwrite`` goes on with the rest. One that fails fails the log for good, as
        a failed fdatasync does (:attr:`failure`): the bytes may be anywhere between
        ``start`` and ``end``, none of them is visible, and after a restart recovery keeps
        the whole records among them and cuts the rest, as after a crash mid-write.
        """
        if view is not segment.view:
            fd = segment.fd
            done, length = 0, end - start
            try:
                while done < length:
                    written = _pwrite(fd, view[done:length], start + done)
                    if written <= 0:
                        raise OSError(errno.EIO, "pwrite wrote nothing")
                    done += written
            except OSError as exc:
                failure = self._fail(
                    StorageFailedError(
                        f"writing {length} bytes of records at offset {segment.base + start} "
                        f"of the commit log failed after {done} ({exc.strerror}): these records "
                        "are not stored and this node takes no writes until it is restarted "
                        f"(what is fsynced stays: up to offset {self.flushed_offset}, or as far "
                        "as an fsync already running reaches); check the disk (dmesg) before "
                        "restarting"
                    )
                )
                log.critical(
                    "commit_log_write_failed error=%s offset=%d length=%d written=%d",
                    exc,
                    segment.base + start,
                    length,
                    done,
                )
                raise failure from exc
        segment.wrote = end

    def take_appended(self, end: int) -> list[IndexFields] | None:
        """Hand over the index fields of the own appends since the last call, and forget them.

        The dispatcher indexes a master's appends, and the records of a slave's last
        replicated chunk, from these instead of reading each header back from the map. When
        they are given, they are every record from the first of them to ``end`` (the log's
        end: checked), in log order; records before the first are not among them (earlier
        chunks', recovered, or dropped past :data:`APPENDED_LIMIT`) and must be read from
        the log. None when there are none, or when they do not end at ``end``.
        """
        appended = self._appended
        if not appended:
            return None
        self._appended = []
        last = appended[-1]
        return appended if last[0] + last[1] == end else None

    def forget_appended(self) -> None:
        """Drop the index fields of own appends not taken yet: the log's end moves by other
        means (replicated bytes, a cut), so the dispatcher reads the records back instead."""
        if self._appended:
            self._appended = []

    def _refusal(self) -> StorageFailedError | DiskFullError:
        refusal = self.failure or self.disk_full
        assert refusal is not None
        return refusal

    def _needs_roll(self, size: int) -> bool:
        last = self.files.last
        return last is None or last.wrote + size + BLANK_MIN > last.size

    def _segments_needed(self, sizes: Sequence[int]) -> int:
        """How many new segments appending records of ``sizes`` now would roll into."""
        last = self.files.last
        needed = 0 if last is not None else 1
        pos = last.wrote if last is not None else 0
        limit = self.config.segment_size - BLANK_MIN
        for size in sizes:
            if pos + size > limit:
                needed += 1
                pos = 0
            pos += size
        return needed

    async def _make_room(self, sizes: Sequence[int]) -> None:
        """Take every segment that appending ``sizes`` will roll into, before writing.

        Other writers may roll while this one awaits the allocator, so the need is
        computed again after every await; one writer at a time takes segments.
        """
        while self._segments_needed(sizes) > len(self._spares):
            async with self._take_lock:
                if self._segments_needed(sizes) <= len(self._spares):
                    break
                if self._spares:
                    base = self._spares[-1].end
                elif self.files.last is not None:
                    base = self.files.last.end
                else:
                    base = self.files.min_offset
                self._spares.append(await self.allocator.take(base))

    def _roll(self) -> MappedFile:
        """End the active segment with a filler and activate the next (already taken) one."""
        last = self.files.last
        if last is not None and last.wrote < last.size:
            write_blank(last.view, last.wrote, last.size - last.wrote)
            last.wrote = last.size
        segment = self._spares.popleft()
        self.files.append(segment)
        log.debug("segment_rolled base=%d", segment.base)
        return segment

    # ---- replicated appends (slave) ----------------------------------------------------

    @property
    def received_offset(self) -> int:
        """End of the bytes :meth:`append_raw` has received: where the next chunk starts."""
        return self.max_offset + self.raw_pending

    async def append_raw(self, offset: int, data: bytes | memoryview) -> int:
        """Copy replicated bytes to the physical offset they have on the master; return the
        new visible end (:attr:`max_offset`).

        The visible end advances only over whole records that pass :func:`check_record`,
        and over a filler once the segment's last byte has arrived, so readers, the
        dispatcher and flushes never see a partial or corrupt record. The exposed records'
        index fields are handed to the dispatcher (:meth:`take_appended`). A trailing partial
        record stays in the map past the visible end (:attr:`raw_pending`) until the next
        chunk completes it; after a crash, recovery cuts it like any torn record.

        ``offset`` is :attr:`received_offset` (the stream goes on) or :attr:`max_offset`
        (the stream restarted, e.g. after a reconnect: a pending partial record is
        dropped). A chunk stays within one segment, as the master sends it; one that
        starts at a full segment's end rolls into the next segment through the allocator,
        the only await, taken before any byte is copied.

        Raises :class:`OffsetOutOfRangeError` for a chunk that does not continue the log
        or crosses a segment end, and :class:`CorruptSegmentError` naming the offset of
        the first bytes that can never be a valid record; the records before it stay.
        """
        if self.failure is not None:
            raise self.failure
        segments = self.files.segments  # once per chunk, not through the max_offset chain
        last = segments[-1] if segments else None
        log_end = last.base + last.wrote if last is not None else 0  # max_offset
        self._check_raw_chunk(offset, len(data), log_end)
        if not data:
            return log_end
        self.forget_appended()  # the fields of what follows are noted below
        if offset == log_end and self.raw_pending:
            self.discard_raw_pending()
        if last is None or offset == last.base + last.size:
            last = await self._raw_roll(offset)
        base = last.base
        pos = offset - base
        end = pos + len(data)
        _copy_in(last, pos, data)
        # The dispatcher indexes the exposed records from the fields noted here, not by
        # reading their headers again. The list holds one chunk's (emptied just above).
        noted = self._appended
        visible, stop = _expose_received(last, last.wrote, end, self.next_queue_offsets, noted)
        last.wrote = visible
        self.raw_pending = end - visible
        if stop is not None:
            self.discard_raw_pending()
            raise CorruptSegmentError(
                f"replicated bytes are not a valid record: {stop}; the log ends at "
                f"{self.max_offset}, resend from there"
            )
        return base + visible

    def discard_raw_pending(self) -> None:
        """Drop and zero the partial record held past the visible end.

        Zeroed, not just forgotten: a shorter record written over them later would
        leave stale bytes behind it that recovery could misread. A slave promoted to
        master must call this before its first own append.
        """
        last = self.files.last
        if last is not None and self.raw_pending:
            last.view[last.wrote : last.wrote + self.raw_pending] = bytes(self.raw_pending)
        self.raw_pending = 0

    def _check_raw_chunk(self, offset: int, length: int, log_end: int) -> None:
        """Refuse a chunk that does not start at ``log_end`` (:attr:`max_offset`) or
        :attr:`received_offset`, or that crosses a segment end."""
        received = log_end + self.raw_pending
        if offset != received and offset != log_end:
            raise OffsetOutOfRangeError(
                f"replicated chunk at offset {offset} does not continue the log, which ends at "
                f"{log_end} (received up to {received}): the master must "
                "send from there, or the slave truncate first"
            )
        segment_size = self.files.segment_size
        segment_end = (offset // segment_size + 1) * segment_size
        if offset + length > segment_end:
            raise OffsetOutOfRangeError(
                f"replicated chunk [{offset}, {offset + length}) crosses the segment end at "
                f"{segment_end}: the master must send one segment at a time"
            )

    async def _raw_roll(self, base: int) -> MappedFile:
        """Activate the segment at ``base`` after a full one, the way appends roll over."""
        async with self._take_lock:
            if not self._spares:
                self._spares.append(await self.allocator.take(base))
            last = self.files.last
            if self._spares[0].base != base or (last is not None and last.wrote != last.size):
                raise OffsetOutOfRangeError(
                    f"replicated chunk at offset {base}: the log changed while the segment "
                    "was being taken (one replication stream may write at a time)"
                )
            return self._roll()

    # ---- reading -----------------------------------------------------------------------

    def read(self, offset: int) -> StoredRecord:
        """The record starting at ``offset``, verified against its CRC, body as a view."""
        if not self.files.min_offset <= offset < self.max_offset:
            raise OffsetOutOfRangeError(
                f"offset {offset} is outside the log [{self.min_offset}, {self.max_offset})"
            )
        segment = self.files.find(offset)
        return decode_record(segment.view, offset - segment.base, segment.base)

    def scan(self, start: int, end: int | None = None) -> Iterator[StoredRecord]:
        """Records from ``start`` (a record boundary) up to ``end`` (default: the end)."""
        for offset, _size, _segment in self._walk(start, end):
            yield self.read(offset)

    def iter_headers(self, start: int, end: int | None = None) -> Iterator[tuple]:
        """(offset, size, topic, queue_id, queue_offset, tags_hash, flags) of each record
        in [start, end): what the dispatcher needs, without building record objects.

        The dispatcher calls this after every append, so it is one flat loop with one
        unpack of just these fields (plus the magic, to recognise a segment's filler).
        """
        end = self.max_offset if end is None else min(end, self.max_offset)
        unpack = _unpack_dispatch
        offset = start
        while offset < end:
            segment = self.files.find(offset)
            view, base, size_limit = segment.view, segment.base, segment.size
            pos, stop = offset - base, min(end - base, size_limit)
            while pos < stop:
                if pos + HEADER_SIZE > size_limit:
                    break  # only a filler fits here
                size, magic, flags, queue_id, queue_offset, tags, topic_size = unpack(view, pos)
                if magic != RECORD_MAGIC:
                    break  # the filler: the rest of the segment
                topic_at = pos + HEADER_SIZE
                topic = str(view[topic_at : topic_at + topic_size], "ascii")
                yield base + pos, size, topic, queue_id, queue_offset, tags, flags
                pos += size
            else:
                offset = base + pos
                continue
            offset = segment.end

    def _walk(self, start: int, end: int | None) -> Iterator[tuple[int, int, MappedFile]]:
        """Offsets and sizes of the records in [start, end), skipping segment fillers."""
        end = self.max_offset if end is None else min(end, self.max_offset)
        offset = start
        while offset < end:
            segment = self.files.find(offset)
            view, pos = segment.view, offset - segment.base
            size, magic = _unpack_blank(view, pos)
            if magic != RECORD_MAGIC:  # the filler: continue in the next segment
                offset = segment.end
                continue
            yield offset, size, segment
            offset += size

    # ---- durability --------------------------------------------------------------------

    async def flush(self) -> int:
        """fdatasync everything written so far; return the new flushed offset.

        Concurrent callers share the lock: whoever gets it next flushes whatever
        has been written by then, so nobody fsyncs twice for the same bytes.
        """
        if self.failure is not None:
            raise self.failure
        called = time.perf_counter()
        async with self._flush_lock:
            await self._settle()
            if self.failure is not None:  # failed while we waited: never fsync again
                raise self.failure
            target = self.max_offset
            if target <= self.flushed_offset:
                return self.flushed_offset
            segments = list(self.files.between(self.flushed_offset, target))
            synced = await self._sync_thread.run(lambda: outcome.capture(_sync_all, segments))
            return self._synced(synced, segments, target, called)

    def begin_flush(self, on_done: Callable[[int | StorageFailedError], None]) -> bool:
        """Start an fdatasync of everything written so far and return at once; when it
        ends, ``on_done`` gets the new flushed offset (or the failure, which is set for
        good as in :meth:`flush`) from a callback on the event loop.

        Group commit's fast path: no task wakes to start it and none to end it. False
        (``on_done`` never called) when nothing is unflushed, when the log failed or is
        closed, when one started here is still running, or when :meth:`flush` or a cut
        holds the flush lock: then the caller takes the async way (:meth:`flush`).
        """
        if (
            self._syncing is not None
            or self.failure is not None
            or self._closed
            or self._flush_lock.locked()
        ):
            return False
        target = self.max_offset
        if target <= self.flushed_offset:
            return False
        segments = list(self.files.between(self.flushed_offset, target))
        called = time.perf_counter()
        syncing = self._syncing = trio.Event()

        def done(synced: outcome.Outcome[outcome.Outcome[tuple[float, float]]]) -> None:
            self._syncing = None
            syncing.set()
            try:
                flushed: int | StorageFailedError = self._synced(
                    synced.unwrap(), segments, target, called
                )
            except StorageFailedError as failure:
                flushed = failure
            on_done(flushed)

        self._sync_thread.submit(lambda: outcome.capture(_sync_all, segments), done)
        return True

    async def _settle(self) -> None:
        """Wait for an fdatasync started by :meth:`begin_flush` (call with the flush lock:
        then no other starts)."""
        while (syncing := self._syncing) is not None:
            await syncing.wait()

    def _synced(
        self,
        synced: outcome.Outcome[tuple[float, float]],
        segments: list[MappedFile],
        target: int,
        called: float,
    ) -> int:
        """Account for one fdatasync of ``segments`` up to ``target`` asked for at
        ``called``: the new flushed offset, or :class:`StorageFailedError` (the log
        fails for good)."""
        try:
            sync_began, sync_ended = synced.unwrap()
        except SegmentMissingError as exc:
            raise self.fail_missing(str(exc)) from exc
        except OSError as exc:
            failure = self._fail(
                StorageFailedError(
                    f"fdatasync of the commit log failed ({exc.strerror}); nothing past "
                    f"offset {self.flushed_offset} is acknowledged and this node takes no "
                    "writes until it is restarted: check the disk (dmesg) before restarting"
                )
            )
            log.critical("commit_log_fsync_failed error=%s flushed=%d", exc, self.flushed_offset)
            raise failure from exc
        for segment in segments:
            segment.flushed = min(segment.size, target - segment.base)
        self.flushed_offset = target
        self.flush_count += 1
        self.last_sync = LastSync(target, sync_began, sync_ended)
        self.on_flush(time.perf_counter() - called, sync_ended - sync_began)
        return target

    def fail_missing(self, problem: str) -> StorageFailedError:
        """A segment file vanished under the log: take no more writes (the same state as
        a failed fsync), say loudly what is missing; return the failure to raise."""
        if self.failure is None:
            self._fail(
                StorageFailedError(
                    f"{problem}; records written to it are lost at the next start, so this "
                    "node takes no more writes: restore the file or this node from a replica "
                    "before restarting (the store refuses to start while a segment is missing)"
                )
            )
            log.error("segment_missing problem=%r flushed=%d", problem, self.flushed_offset)
        assert self.failure is not None
        return self.failure

    def _fail(self, failure: StorageFailedError) -> StorageFailedError:
        """Enter the failed state for good (nothing clears it but a restart)."""
        self.failure = failure
        self._failed.set()
        return failure

    async def wait_failed(self) -> StorageFailedError:
        """Return the failure once the log has failed (a node with failover leaves its
        group on it, so a healthy replica takes the writes)."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    async def verify_files(self) -> None:
        """Check that every segment file is still the one mapped (the flush services call
        it periodically); a missing one fails the log (:meth:`fail_missing`)."""
        problem = await trio.to_thread.run_sync(self.files.verify)
        if problem is not None:
            raise self.fail_missing(problem)

    async def truncate(self, offset: int) -> None:
        """Cut the log at ``offset`` (a record boundary); replication uses it for divergent tails.

        Segments taken or prepared for roll-overs go too: left on disk past the new end,
        a crash would leave a gap between segments that stops the next start.
        """
        async with self._take_lock, self._flush_lock:
            await self._settle()
            assert self.min_offset <= offset <= self.max_offset, (
                f"cut at {offset} outside the log [{self.min_offset}, {self.max_offset}]"
            )
            self._drop_spares()
            self.forget_appended()
            self.raw_pending = 0  # files.truncate zeroes those bytes
            await trio.to_thread.run_sync(self.files.truncate, offset)
            self.flushed_offset = min(self.flushed_offset, self.max_offset)
            assert self.max_offset == offset or not self.files.segments, (offset, self.max_offset)

    async def restart_at(self, base: int) -> None:
        """Discard every segment and leave an empty log whose next record lands at ``base``
        (a segment start). The segment at ``base`` is created now: it is what keeps the
        empty log's start across restarts. Crash safety is the caller's cut intent."""
        async with self._take_lock, self._flush_lock:
            await self._settle()
            self._drop_spares()
            # a dropped creation still running in its thread renames its file into place
            # when done, then deletes it: at `base` that would replace, then remove, the
            # segment made here (the empty log's only one)
            await self.allocator.wait_dropped()
            self.forget_appended()
            self.raw_pending = 0
            await trio.to_thread.run_sync(
                lambda: self.files.restart_at(base, warm=self.config.warm_segments)
            )
            self.next_queue_offsets = {}
            self.flushed_offset = base
        assert self.min_offset == self.max_offset == base

    def _drop_spares(self) -> None:
        """Delete the segments taken or prepared past the end, highest first: a kill in
        between must never leave a gap on disk."""
        self.allocator.drop_prepared()  # prepared ones lie past the spares
        for spare in reversed(self._spares):
            spare.delete()
        self._spares.clear()

    async def delete_oldest(self, count: int) -> int:
        """Retention: delete the ``count`` oldest segments (never the active one)."""
        async with self._flush_lock:
            await self._settle()
            doomed = await trio.to_thread.run_sync(self.files.delete_first, count)
        return len(doomed)

    def close(self) -> None:
        self._closed = True  # no fdatasync starts from now on; one running ends first
        self._sync_thread.stop(wait=self._syncing is not None)
        for spare in self._spares:
            spare.delete()
        self._spares.clear()
        self.files.close()


def _ignore_flush(_flush_s: float, _fsync_s: float) -> None:
    """The default :attr:`CommitLog.on_flush`: nobody times flushes."""


def _sync_all(segments: list[MappedFile]) -> tuple[float, float]:
    """fdatasync each segment, then check its file is still linked and whole: an fsync
    of a deleted file succeeds, and acknowledging it would be a lie. Returns when the
    first fdatasync began and the last check ended (``perf_counter``, read on the
    sync thread: the loop's hand-offs before and after are not in it)."""
    began = time.perf_counter()
    for segment in segments:
        segment.sync()
        problem = segment.gone()
        if problem is not None:
            raise SegmentMissingError(problem)
    return began, time.perf_counter()


def _copy_in(segment: MappedFile, pos: int, data: bytes | memoryview) -> None:
    """Write ``data`` at ``pos`` of ``segment``: a chunk of a page or more with one
    ``pwrite`` (a write through the map takes a page fault for each page it dirties, which
    costs more than the call from about half a page on), a smaller one through the map.

    Both land in the same page cache, so the map reads what was written either way. What
    a ``pwrite`` did not write goes through the map, as every chunk did before."""
    length = len(data)
    if length >= _PWRITE_MIN:
        try:
            written = _pwrite(segment.fd, data, pos)
        except OSError as exc:  # the map may still take it; the next fsync reports a bad disk
            log.warning(
                "raw_append_pwrite_failed path=%s pos=%d error=%s fallback=map",
                segment.path,
                pos,
                exc.strerror,
            )
            written = 0
        if written == length:
            return
        data = memoryview(data)[written:]
        pos += written
    segment.view[pos : pos + len(data)] = data


def _awaits_more(view: memoryview, pos: int, end: int, segment_size: int) -> bool:
    """Whether the bytes at ``pos`` may be a record or filler cut short by ``end``."""
    if end - pos < BLANK_MIN:
        return True
    size, magic = _unpack_blank(view, pos)
    if magic == BLANK_MAGIC:
        return end < segment_size and pos + size == segment_size
    return magic == RECORD_MAGIC and size >= HEADER_SIZE and end < pos + size <= segment_size


def _note_queue_offset(
    view: memoryview,
    pos: int,
    base: int,
    table: dict[tuple[str, int], int],
    noted: list[IndexFields],
) -> None:
    """Advance (topic, queue)'s next queue offset past the valid record at ``pos``, so a
    slave promoted to master numbers its first records where the old master stopped, and
    hand its index fields to the dispatcher (``noted``)."""
    fields = _unpack_header(view, pos)
    topic_start = pos + HEADER_SIZE
    topic = str(view[topic_start : topic_start + fields[12]], "ascii")
    _note(table, noted, (base + pos, fields[0], topic, fields[4], fields[6], fields[10], fields[3]))


def _note(table: dict[tuple[str, int], int], noted: list[IndexFields], fields: IndexFields) -> None:
    """Advance the record's (topic, queue) next queue offset in ``table`` (a topic
    deletion marker starts its topic again at 0) and note its index fields."""
    _, _, topic, queue_id, queue_offset, _, flags = fields
    if flags & FLAG_TOPIC_DELETED:
        forget_topic(table, topic)
    else:
        table[(topic, queue_id)] = queue_offset + 1
    noted.append(fields)


def forget_topic(table: dict[tuple[str, int], int], topic: str) -> None:
    """Drop ``topic``'s next queue offsets: its next records start again at 0."""
    for key in [key for key in table if key[0] == topic]:
        del table[key]


def _expose_received(
    segment: MappedFile,
    pos: int,
    end: int,
    table: dict[tuple[str, int], int],
    noted: list[IndexFields],
) -> tuple[int, ScanStop | None]:
    """Walk the whole valid records of ``segment`` in ``[pos, end)``, noting each one's
    queue offset in ``table`` and its index fields in ``noted``.

    Returns the position after the last of them (or the segment's end after its filler)
    and, when the bytes there can never become a valid record, why. Bytes cut short by
    ``end`` are no error while more can come; once the segment's last byte is in, they are.

    The first loop takes the common case, a whole record, with one unpack of its header:
    it accepts exactly what :func:`check_record` accepts (magic, a size within the
    received bytes, the claimed offset, the parts adding up, the CRC) and hands anything
    else (a filler, a cut or corrupt record) to :func:`_expose_checked`, which says which.
    """
    view, base = segment.view, segment.base
    unpack = _unpack_received
    last_header = end - HEADER_SIZE
    while pos <= last_header:
        (
            size,
            magic,
            crc,
            flags,
            queue_id,
            body_size,
            queue_offset,
            physical,
            tags,
            props_size,
            topic_size,
        ) = unpack(view, pos)
        record_end = pos + size
        if (
            magic != RECORD_MAGIC
            or size < HEADER_SIZE
            or record_end > end
            or physical != base + pos
            or HEADER_SIZE + topic_size + props_size + body_size != size
            or crc32c(view[pos + CRC_START : record_end]) != crc
        ):
            break
        topic_at = pos + HEADER_SIZE
        topic = str(view[topic_at : topic_at + topic_size], "ascii")
        _note(table, noted, (physical, size, topic, queue_id, queue_offset, tags, flags))
        pos = record_end
    return _expose_checked(segment, pos, end, table, noted)


def _expose_checked(
    segment: MappedFile,
    pos: int,
    end: int,
    table: dict[tuple[str, int], int],
    noted: list[IndexFields],
) -> tuple[int, ScanStop | None]:
    """:func:`_expose_received` one :func:`check_record` at a time: the walk that tells a
    filler, a record still arriving and bytes that can never be a record apart."""
    view, base, size_limit = segment.view, segment.base, segment.size
    while pos < end:
        if _awaits_more(view, pos, end, size_limit):
            if end == size_limit:
                return pos, ScanStop(base + pos, "the segment ends inside a record")
            return pos, None
        try:
            size = check_record(view, pos, base, size_limit)
        except ScanStop as stop:
            return pos, stop
        if size < 0:
            return size_limit, None
        _note_queue_offset(view, pos, base, table, noted)
        pos += size
    return pos, None
