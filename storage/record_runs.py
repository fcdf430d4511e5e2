"""A page of one queue as runs of stored record bytes, for a pull to send as they are.

A pull answered in the stored format (docs/protocol.md, ``pull`` with ``format``
``records``) sends the records' bytes from the mapped log: the client decodes them and
checks their CRCs. So the node builds no object and copies nothing per record: it walks
the queue's entries, checks each record's header against its entry (the queue's own
record at that queue offset, as :meth:`MessageStore.get_messages` checks), and joins
records that lie back to back in the log into one run (a memoryview of the segment map).
Records of other queues interleave in the log, so a page is a list of runs.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from storage.commit_log import CommitLog
from storage.consume_queue import ENTRY, ENTRY_SIZE, ConsumeQueue
from storage.errors import OffsetOutOfRangeError
from storage.record import HEADER_SIZE, RECORD_MAGIC

__all__ = ["RecordRuns", "queue_record_runs"]

_CHECKED: Final = struct.Struct("<II8xI4xQQ26xB")
"""The header fields that tie a record to a queue entry: total_size, magic, queue_id,
queue_offset, physical_offset, topic_size (docs/format.md)."""
assert _CHECKED.size == HEADER_SIZE - 1
_NO_LIMIT: Final = 2**64


@attrs.frozen(slots=True)
class RecordRuns:
    """Records of one queue from a queue offset, as stored bytes, and where the queue stands.

    ``runs`` holds ``(log offset, bytes)`` pairs in queue order: each a view into a
    segment map covering whole records that lie back to back in the log. Views keep
    their segment mapped while referenced: use them right away, then :meth:`release`.
    """

    runs: list[tuple[int, memoryview]]
    records: int
    """How many records the runs hold (the page is empty when 0)."""
    size: int
    """Bytes of the runs together."""
    next_offset: int
    min_offset: int
    max_offset: int

    def release(self) -> None:
        for _offset, view in self.runs:
            view.release()


def queue_record_runs(
    commit_log: CommitLog,
    queue: ConsumeQueue,
    queue_offset: int,
    *,
    max_messages: int,
    max_bytes: int,
    below_offset: int | None,
) -> RecordRuns:
    """Records of ``queue`` from ``queue_offset`` on, up to the limits, as runs.

    At least one record when one exists, even past ``max_bytes``; ``below_offset`` hides
    records ending past it (a read limit). An entry that does not lead to its record
    (empty, past the log's end, or another record there) ends the page, or raises
    :class:`OffsetOutOfRangeError` when it is the first one asked for. The caller keeps
    cuts out (the log and the queues change in worker threads while one runs).
    """
    next_offset = max(queue_offset, queue.min_offset)
    stop = min(queue.max_offset, next_offset + max_messages)
    page = _PageBuilder(queue, next_offset)
    log_min, log_end = commit_log.min_offset, commit_log.max_offset
    read_limit = _NO_LIMIT if below_offset is None else below_offset
    topic = queue.topic.encode("ascii")
    topic_size, queue_id = len(topic), queue.queue_id
    find = commit_log.files.find
    unpack = _CHECKED.unpack_from
    segment_base = segment_end = -1
    view = memoryview(b"")
    index = next_offset
    while index < stop:
        byte = index * ENTRY_SIZE
        entry_file = queue.files.find(byte)
        first = byte - entry_file.base
        last = min(entry_file.size, stop * ENTRY_SIZE - entry_file.base)
        for offset, size, _tags in ENTRY.iter_unpack(entry_file.view[first:last]):
            end = offset + size
            if end > read_limit:
                return page.done()  # not served yet (a slave's confirm offset)
            if page.records and page.size + size > max_bytes:
                return page.done()
            if not segment_base <= offset < segment_end and log_min <= offset < log_end:
                segment = find(offset)
                view, segment_base = segment.view, segment.base
                segment_end = segment_base + segment.size
            pos = offset - segment_base
            if (
                size < HEADER_SIZE
                or offset < log_min
                or end > log_end
                or end > segment_end
                or unpack(view, pos) != (size, RECORD_MAGIC, queue_id, index, offset, topic_size)
                or view[pos + HEADER_SIZE : pos + HEADER_SIZE + topic_size] != topic
            ):
                if page.records:
                    return page.done()
                raise OffsetOutOfRangeError(
                    f"{queue.topic}/{queue.queue_id}: queue offset {index} has no record in "
                    f"the log (its entry points at log offset {offset}, size {size}; the log "
                    f"ends at {log_end}): the queue is being cut or rebuilt; retry the pull"
                )
            page.add(view, segment_base, pos, size)
            index += 1
    return page.done()


class _PageBuilder:
    """Accumulates records into runs: a record right after the run's end (same segment)
    extends it, any other starts a new one."""

    __slots__ = (
        "_base", "_end", "_next_offset", "_queue", "_start", "_view", "records", "runs", "size",
    )  # fmt: skip

    def __init__(self, queue: ConsumeQueue, next_offset: int) -> None:
        self._queue = queue
        self.runs: list[tuple[int, memoryview]] = []
        self.records = 0
        self.size = 0
        self._view = memoryview(b"")
        self._base = self._start = self._end = -1
        self._next_offset = next_offset

    def add(self, view: memoryview, base: int, pos: int, size: int) -> None:
        if pos != self._end or base != self._base:
            self._close_run()
            self._view, self._base, self._start = view, base, pos
            self._end = pos
        self._end += size
        self.records += 1
        self.size += size
        self._next_offset += 1

    def _close_run(self) -> None:
        if self._start >= 0:
            self.runs.append((self._base + self._start, self._view[self._start : self._end]))
        self._start = -1

    def done(self) -> RecordRuns:
        self._close_run()
        queue = self._queue
        return RecordRuns(
            self.runs, self.records, self.size, self._next_offset, queue.min_offset,
            queue.max_offset,
        )  # fmt: skip
