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
    log_min, log_end = commit_log.min_offset, commit_log.max_offset
    read_limit = _NO_LIMIT if below_offset is None else below_offset
    topic = queue.topic.encode("ascii")
    topic_size, queue_id = len(topic), queue.queue_id
    find = commit_log.files.find
    unpack = _CHECKED.unpack_from
    segment_base = segment_end = -1
    view = memoryview(b"")
    runs: list[tuple[int, memoryview]] = []
    run_view, run_base, run_start, run_end = view, -1, -1, -1  # the run being built
    records = total = 0
    index = next_offset
    while index < stop:
        byte = index * ENTRY_SIZE
        entry_file = queue.files.find(byte)
        first = byte - entry_file.base
        last = min(entry_file.size, stop * ENTRY_SIZE - entry_file.base)
        for offset, size, _tags in ENTRY.iter_unpack(entry_file.view[first:last]):
            end = offset + size
            if end > read_limit or (records and total + size > max_bytes):
                stop = index  # not served yet (a read limit), or the page is full
                break
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
                if not records:
                    raise OffsetOutOfRangeError(
                        f"{queue.topic}/{queue_id}: queue offset {index} has no record in the "
                        f"log (its entry points at log offset {offset}, size {size}; the log "
                        f"ends at {log_end}): the queue is being cut or rebuilt; retry the pull"
                    )
                stop = index  # the page ends before an entry that does not lead to its record
                break
            if pos == run_end and segment_base == run_base:
                run_end += size
            else:
                if run_start >= 0:
                    runs.append((run_base + run_start, run_view[run_start:run_end]))
                run_view, run_base, run_start, run_end = view, segment_base, pos, pos + size
            records += 1
            total += size
            index += 1
    if run_start >= 0:
        runs.append((run_base + run_start, run_view[run_start:run_end]))
    return RecordRuns(runs, records, total, index, queue.min_offset, queue.max_offset)
