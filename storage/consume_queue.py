"""ConsumeQueue: the per (topic, queue id) index of the commit log.

Entry ``n`` of a queue describes the record with queue offset ``n``, in 20 bytes
(little endian): ``u64 log offset, u32 record size, u64 tags hash``. Entry n sits
at byte ``n * 20`` of the queue's address space, split into files of
``entries_per_file`` entries named like segments. An all-zero entry is empty.
Queues are rebuilt from the commit log whenever they are missing or behind, so
they are flushed lazily; the one thing they keep that the log may not is below.

What the log cannot tell is where a queue starts once retention took its first
records: entries below a queue's start that point below the log's start say it
(a retired queue's kept last entry, or the start marker written just before a
queue that starts partway into its file), see docs/format.md.
"""

from __future__ import annotations

import logging
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from storage.errors import CorruptSegmentError, OffsetOutOfRangeError
from storage.mapped_file import MappedFile, fsync_directory
from storage.mapped_file_queue import MappedFileQueue

log = logging.getLogger(__name__)

ENTRY = struct.Struct("<QIQ")
ENTRY_SIZE = ENTRY.size
_pack_entry = ENTRY.pack_into
_unpack_entry = ENTRY.unpack_from

START_MARKER = (0, 1, 0)
"""(log offset, size, tags hash) of a start marker: the entry just before a queue that
starts partway into its file (its earlier records went with retention). It points below
any log that can hold such a queue (one that starts past 0), so :meth:`ConsumeQueue.advance_min`
skips it and truncation keeps it, and it is no record's entry (records are 68 bytes or more)."""


def _no_log_start() -> int:
    return 0


class QueueConflictError(CorruptSegmentError):
    """An entry disagrees with the commit log (a gap or a different record): rebuild."""


class ConsumeQueue:
    """Entries ``[min_offset, max_offset)`` of one (topic, queue id): the index that turns
    a consumer's queue offset into a commit-log offset.

    Invariants: entries are dense (every queue offset in the range has one, pointing at
    the record with that queue offset); their log offsets increase with the queue
    offset; entry ``n`` is at byte ``n * ENTRY_SIZE`` of the queue's files; appends go to
    the last file only. Entries past the commit log's end never stay (truncation and
    recovery cut them); entries below its start are skipped by :meth:`advance_min`. A
    queue that starts partway into its first file has an entry just before its start,
    pointing below the log's start (:data:`START_MARKER`, or a retired queue's kept entry).

    Written only by the store's dispatcher (one task, in log order) and, blocking, by
    recovery and the store's cuts while the dispatcher is idle; read (:meth:`get`,
    :meth:`entries`) by any task at any time on the loop.
    """

    def __init__(
        self,
        root: Path,
        topic: str,
        queue_id: int,
        entries_per_file: int,
        log_start: Callable[[], int] = _no_log_start,
    ) -> None:
        self.topic = topic
        self.queue_id = queue_id
        self.files = MappedFileQueue(root / topic / str(queue_id), entries_per_file * ENTRY_SIZE)
        self.log_start = log_start
        """The commit log's start (its first segment's base); 0 without a log."""
        self.min_offset = 0
        self.max_offset = 0
        """Queue offset the next entry gets (one past the last)."""

    @property
    def empty(self) -> bool:
        return self.min_offset == self.max_offset

    # ---- loading (blocking) --------------------------------------------------------------

    def load(self) -> None:
        """Open the files and find the first and last entries."""
        self.files.load()
        first, last = self.files.first, self.files.last
        if first is None or last is None:
            return
        # The first files may hold no entry (their entries were lost in a crash, or a
        # truncation emptied them): the queue starts in the first file that has one.
        segments = self.files.segments
        start_index, lo = 0, _first_entry(first)
        while lo is None and start_index < len(segments) - 1:
            start_index += 1
            lo = _first_entry(segments[start_index])
        # The last file may hold no entry yet (a crash came between creating it and
        # writing its first entry): the queue ends in the last file that has one.
        end_index, hi = len(segments) - 1, _end_entry(last)
        while hi is None and end_index > 0:
            end_index -= 1
            hi = _end_entry(segments[end_index])
        if lo is None or hi is None:
            # No entry survives: every one was past the checkpoint (lost in a crash, never
            # durable) and recovery re-dispatches what the log kept. The queue starts
            # again where its files start, in one file (appends go to the last file).
            self.files.truncate(first.base)
            self.min_offset = self.max_offset = first.base // ENTRY_SIZE
            return
        if end_index < len(segments) - 1:  # appends go to the last file: drop the empty ones
            self.files.truncate(segments[end_index].base + hi)
        end_segment = self.files.segments[-1]
        self.min_offset = (segments[start_index].base + lo) // ENTRY_SIZE
        self.max_offset = (end_segment.base + hi) // ENTRY_SIZE
        end_segment.wrote = end_segment.flushed = hi
        for segment in self.files.segments[:-1]:
            segment.wrote = segment.flushed = segment.size

    # ---- writing -------------------------------------------------------------------------

    def needs_file(self, queue_offset: int) -> bool:
        segments = self.files.segments  # called per dispatched record: no property chain
        if not segments:
            return True
        last = segments[-1]
        return queue_offset * ENTRY_SIZE >= last.base + last.size  # last.end

    async def add_file(self, queue_offset: int) -> None:
        """Create the file that will hold ``queue_offset`` (in a worker thread)."""
        size = self.files.segment_size
        last = self.files.last
        base = last.end if last is not None else (queue_offset * ENTRY_SIZE) // size * size
        self.files.directory.mkdir(parents=True, exist_ok=True)
        segment = await trio.to_thread.run_sync(
            lambda: MappedFile.create(self.files.directory, base, size, warm=False)
        )
        self.files.append(segment)

    def put(self, queue_offset: int, log_offset: int, size: int, tags_hash: int) -> bool:
        """Record entry ``queue_offset``; False when it is already there (re-dispatch).

        Raises :class:`QueueConflictError` on a gap or a different record: the
        queue no longer matches the log and must be rebuilt.
        """
        if queue_offset != self.max_offset:
            if self.empty and not self.files.segments[:-1]:
                self._start_at(queue_offset, log_offset + size)
            elif queue_offset < self.max_offset and queue_offset >= self.min_offset:
                if self.get(queue_offset)[0] != log_offset:
                    raise QueueConflictError(
                        f"{self.topic}/{self.queue_id}: entry {queue_offset} points elsewhere "
                        f"than the log's record at {log_offset}"
                    )
                return False
            else:
                raise QueueConflictError(
                    f"{self.topic}/{self.queue_id}: record with queue offset {queue_offset} at "
                    f"log offset {log_offset}, but the queue holds [{self.min_offset}, "
                    f"{self.max_offset})"
                )
        segments = self.files.segments
        assert segments, "needs_file/add_file run before put"
        segment = segments[-1]
        pos = queue_offset * ENTRY_SIZE - segment.base
        assert 0 <= pos <= segment.size - ENTRY_SIZE, (queue_offset, segment.base)
        _pack_entry(segment.view, pos, log_offset, size, tags_hash)
        segment.wrote = pos + ENTRY_SIZE
        self.max_offset = queue_offset + 1
        return True

    def _start_at(self, queue_offset: int, entry_end: int) -> None:
        """The queue starts at ``queue_offset``, whose record ends at log offset ``entry_end``.

        Partway into its file, the entry before it gets :data:`START_MARKER`, written before
        the first entry, in the same file: from the files alone a queue that starts there
        looks like one whose first entries a crash lost, which :meth:`load` and
        :meth:`truncate_from_log_offset` restart at the file's start, reusing queue offsets
        consumers have read. Not needed when the entry itself points below the log (a
        retired queue's kept entry, put back by recovery: it is that queue's marker).
        """
        self.min_offset = self.max_offset = queue_offset
        segment = self.files.segments[-1]
        pos = queue_offset * ENTRY_SIZE - segment.base
        log_start = self.log_start()
        marker_end = START_MARKER[0] + START_MARKER[1]
        if pos > 0 and entry_end > log_start >= marker_end:
            _pack_entry(segment.view, pos - ENTRY_SIZE, *START_MARKER)

    # ---- reading -------------------------------------------------------------------------

    def get(self, queue_offset: int) -> tuple[int, int, int]:
        """(log offset, size, tags hash) of entry ``queue_offset``."""
        if not self.min_offset <= queue_offset < self.max_offset:
            raise OffsetOutOfRangeError(
                f"{self.topic}/{self.queue_id}: queue offset {queue_offset} outside "
                f"[{self.min_offset}, {self.max_offset})"
            )
        byte = queue_offset * ENTRY_SIZE
        segment = self.files.find(byte)
        return _unpack_entry(segment.view, byte - segment.base)

    def entries(self, start: int, count: int) -> Iterator[tuple[int, int, int, int]]:
        """(queue offset, log offset, size, tags hash) from ``start``, at most ``count``."""
        stop = min(self.max_offset, start + count)
        for queue_offset in range(max(start, self.min_offset), stop):
            yield (queue_offset, *self.get(queue_offset))

    # ---- cutting (blocking) --------------------------------------------------------------

    def truncate_from_log_offset(self, log_offset: int) -> int:
        """Drop the entries of records at or past ``log_offset``; return how many.

        Empty entries among them are writes lost in a crash (only entries below the
        checkpoint are known to be on disk): dropped too, or the walk would stop there
        and keep the entries above them, pointing past the end of the log.
        """
        keep = self.max_offset
        while keep > self.min_offset:
            entry_offset, size, _tags = self.get(keep - 1)
            if size and entry_offset < log_offset:
                break
            keep -= 1
        dropped = self.max_offset - keep
        if dropped:
            self.max_offset = keep  # first: readers stop before the entries are zeroed
            self.files.truncate(keep * ENTRY_SIZE)
            if keep == self.min_offset:
                first = self.files.first
                if first is not None and all(_first_entry(s) is None for s in self.files.segments):
                    # No entry at all is left: start where load() starts an empty queue,
                    # not past a lost first entry that load() skipped.
                    self.files.truncate(first.base)
                    keep = first.base // ENTRY_SIZE
                self.min_offset = self.max_offset = keep
        return dropped

    def advance_min(self, log_min_offset: int) -> None:
        """Retention: forget entries of records below ``log_min_offset``, drop whole files."""
        while self.min_offset < self.max_offset and self.get(self.min_offset)[0] < log_min_offset:
            self.min_offset += 1
        whole_files = 0
        for segment in self.files.segments[:-1]:
            if segment.end <= self.min_offset * ENTRY_SIZE:
                whole_files += 1
        if whole_files:
            self.files.delete_first(whole_files)


def _entry_sizes(segment: MappedFile) -> Iterator[int]:
    for _log_offset, size, _tags in ENTRY.iter_unpack(segment.view):
        yield size


def _first_entry(segment: MappedFile) -> int | None:
    """Byte position of the first non-empty entry of a file."""
    for index, size in enumerate(_entry_sizes(segment)):
        if size:
            return index * ENTRY_SIZE
    return None


def _end_entry(segment: MappedFile) -> int | None:
    """Byte position just past the last non-empty entry of a file."""
    end = None
    for index, size in enumerate(_entry_sizes(segment)):
        if size:
            end = (index + 1) * ENTRY_SIZE
    return end


class ConsumeQueueStore:
    """All consume queues of a node, under ``root/<topic>/<queue id>/``."""

    def __init__(
        self, root: Path, entries_per_file: int, log_start: Callable[[], int] = _no_log_start
    ) -> None:
        self.root = root
        self.entries_per_file = entries_per_file
        self.log_start = log_start
        """The commit log's start, for :data:`START_MARKER` (the default, 0: the queues of
        no log, as in tests of the queues alone, get no markers)."""
        self.queues: dict[tuple[str, int], ConsumeQueue] = {}

    def load(self) -> None:
        """Blocking: open every queue on disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        for topic_dir in sorted(self.root.iterdir()):
            if not topic_dir.is_dir():
                raise CorruptSegmentError(
                    f"{topic_dir}: unexpected file among the consume queues; move it away"
                )
            for queue_dir in sorted(topic_dir.iterdir()):
                if not queue_dir.is_dir() or not queue_dir.name.isdigit():
                    raise CorruptSegmentError(f"{queue_dir}: not a queue directory")
                queue = self._new(topic_dir.name, int(queue_dir.name))
                queue.load()

    def _new(self, topic: str, queue_id: int) -> ConsumeQueue:
        queue = ConsumeQueue(self.root, topic, queue_id, self.entries_per_file, self.log_start)
        self.queues[(topic, queue_id)] = queue
        return queue

    def get(self, topic: str, queue_id: int) -> ConsumeQueue | None:
        return self.queues.get((topic, queue_id))

    def get_or_create(self, topic: str, queue_id: int) -> ConsumeQueue:
        queue = self.queues.get((topic, queue_id))
        return queue if queue is not None else self._new(topic, queue_id)

    def dirty_segments(self) -> list[MappedFile]:
        return [
            segment
            for queue in self.queues.values()
            for segment in queue.files.segments
            if segment.wrote > segment.flushed
        ]

    def truncate_from_log_offset(self, log_offset: int) -> int:
        """Blocking: drop every entry of a record at or past ``log_offset``."""
        return sum(q.truncate_from_log_offset(log_offset) for q in self.queues.values())

    def advance_min(self, log_min_offset: int) -> None:
        for queue in self.queues.values():
            queue.advance_min(log_min_offset)

    def holds_topic(self, topic: str) -> bool:
        """Whether any queue of ``topic`` is in the table (records of it were indexed)."""
        return any(key[0] == topic for key in self.queues)

    def pop_topic(self, topic: str) -> list[ConsumeQueue]:
        """Take every queue of ``topic`` out of the table (readers stop finding them); their
        files stay until :meth:`delete_topic_files`."""
        keys = [key for key in self.queues if key[0] == topic]
        return [self.queues.pop(key) for key in keys]

    def delete_topic_files(self, topic: str, dropped: list[ConsumeQueue]) -> None:
        """Blocking: close the queues :meth:`pop_topic` took and delete ``topic``'s
        directory, durably (a queue that came back after a power loss would be indexed
        records of a deleted topic)."""
        for queue in dropped:
            queue.files.close()
        shutil.rmtree(self.root / topic, ignore_errors=True)
        fsync_directory(self.root)

    def delete_all(self) -> None:
        """Blocking: forget every queue (they are rebuilt from the log)."""
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        for queue in self.queues.values():
            queue.files.close()
        self.queues.clear()


def sync_segments(segments: list[MappedFile]) -> None:
    """Blocking: fdatasync each segment and mark what it held as flushed."""
    for segment in segments:
        wrote = segment.wrote
        segment.sync()
        segment.flushed = wrote
