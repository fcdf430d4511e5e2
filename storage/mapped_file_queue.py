"""The ordered segments of one log: lookup by offset, roll-over, truncation, retention.

Segments are contiguous: segment ``i`` starts at ``first.base + i * segment_size``.
So a lookup is arithmetic, not a search. Blocking methods (``load``, ``truncate``,
``delete_*``) are called by the owner through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from storage.errors import CorruptSegmentError, OffsetOutOfRangeError
from storage.mapped_file import MappedFile, fsync_directory, parse_segment_name

log = logging.getLogger(__name__)


class MappedFileQueue:
    """Segments of ``segment_size`` bytes in ``directory``, in offset order.

    Invariants: the segments are contiguous (asserted by :meth:`append` and after
    :meth:`truncate`), every base a multiple of ``segment_size``, and the files on disk
    are these segments plus at most prepared ones past the last. Every change on disk
    keeps that true at each step: :meth:`truncate` deletes from the end and makes
    each deletion durable before the next, :meth:`delete_first` from the front, so a
    kill never leaves a gap that :meth:`load` would refuse.

    Not thread-safe and not locked: the owner (CommitLog, or one ConsumeQueue) runs one
    change at a time, blocking ones in a worker thread while the loop does not touch
    the segment list; lookups (:meth:`find`, :meth:`between`) run on the loop.
    """

    def __init__(self, directory: Path, segment_size: int) -> None:
        self.directory = directory
        self.segment_size = segment_size
        self.segments: list[MappedFile] = []

    # ---- loading -----------------------------------------------------------------------

    def load(self) -> None:
        """Open every segment on disk; check names, sizes and that they are contiguous.

        Leftover ``*.tmp`` files are segments whose creation never finished: removed.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        for tmp in self.directory.glob("*.tmp"):
            log.warning("removing_unfinished_segment path=%s", tmp)
            tmp.unlink()
        paths = []
        for path in self.directory.iterdir():
            base = parse_segment_name(path)
            if base is None:
                raise CorruptSegmentError(
                    f"{path}: unexpected file in a segment directory; move it away"
                )
            paths.append((base, path))
        paths.sort()
        expected = None
        for base, path in paths:
            if base % self.segment_size:
                raise CorruptSegmentError(
                    f"{path}: offset {base} is not a multiple of the segment size "
                    f"{self.segment_size}; was the log written with another segment size?"
                )
            if expected is not None and base != expected:
                raise CorruptSegmentError(
                    f"{path}: segment missing before it (expected offset {expected})"
                )
            self.segments.append(MappedFile.open(path, self.segment_size))
            expected = base + self.segment_size

    # ---- positions ---------------------------------------------------------------------

    @property
    def first(self) -> MappedFile | None:
        return self.segments[0] if self.segments else None

    @property
    def last(self) -> MappedFile | None:
        return self.segments[-1] if self.segments else None

    @property
    def min_offset(self) -> int:
        return self.segments[0].base if self.segments else 0

    @property
    def max_offset(self) -> int:
        """Offset just past the last written byte."""
        last = self.last
        return last.base + last.wrote if last else 0

    def find(self, offset: int) -> MappedFile:
        """The segment holding ``offset``."""
        if not self.segments:
            raise OffsetOutOfRangeError(f"offset {offset}: the log is empty")
        index = (offset - self.segments[0].base) // self.segment_size
        if index < 0 or index >= len(self.segments):
            raise OffsetOutOfRangeError(
                f"offset {offset} is outside the log [{self.min_offset}, {self.max_offset})"
            )
        return self.segments[index]

    def between(self, start: int, end: int) -> Iterator[MappedFile]:
        """Segments overlapping [start, end)."""
        if not self.segments or start >= end:
            return
        first = self.segments[0].base
        lo = max(0, (start - first) // self.segment_size)
        hi = min(len(self.segments), (end - 1 - first) // self.segment_size + 1)
        yield from self.segments[lo : max(hi, 0)]  # a negative hi would slice from the end

    def append(self, segment: MappedFile) -> None:
        last = self.last
        expected = last.end if last else segment.base
        assert segment.base == expected, (segment.base, expected)
        assert segment.size == self.segment_size
        self.segments.append(segment)

    # ---- cutting (blocking) ------------------------------------------------------------

    def truncate(self, offset: int) -> None:
        """Cut the data at ``offset``: delete later segments, zero the rest of its segment.

        Crash-safe at every step: segments go last first, each deletion made durable
        (directory fsync) before the next, so a kill leaves a contiguous log that is only
        longer than asked, never one with a gap. Zeroing comes last, after the deletions.
        """
        keep = [segment for segment in self.segments if segment.base < offset]
        if not keep and self.segments:
            keep = self.segments[:1]  # cut at the log's very start: keep one empty segment
        doomed = self.segments[len(keep) :]
        for segment in reversed(doomed):
            log.info("deleting_segment path=%s reason=truncate offset=%d", segment.path, offset)
            segment.delete()
            self.segments.pop()
            fsync_directory(self.directory)
        assert self.segments == keep
        if keep:
            last = keep[-1]
            pos = min(max(offset - last.base, 0), last.size)
            last.zero_from(pos)
            last.wrote = pos
            last.flushed = min(last.flushed, pos)
            last.sync()
        self._assert_contiguous()

    def restart_at(self, base: int, *, warm: bool) -> MappedFile:
        """Delete every segment (last first) and start an empty log whose first segment is
        at ``base``, created on disk so that an empty log keeps its start across restarts."""
        assert base >= 0 and base % self.segment_size == 0, (base, self.segment_size)
        while self.segments:
            self.segments.pop().close()
        remove_segment_files(self.directory, from_base=0, keep_lowest=False)
        segment = MappedFile.create(self.directory, base, self.segment_size, warm=warm)
        self.segments = [segment]
        return segment

    def _assert_contiguous(self) -> None:
        size = self.segment_size
        first = self.segments[0].base if self.segments else 0
        for index, segment in enumerate(self.segments):
            assert segment.base == first + index * size, (index, segment.base, first)

    def delete_first(self, count: int) -> list[MappedFile]:
        """Delete the ``count`` oldest segments (never the last one)."""
        count = min(count, len(self.segments) - 1)
        doomed, self.segments = self.segments[:count], self.segments[count:]
        for segment in doomed:
            segment.delete()
        if doomed:
            fsync_directory(self.directory)
        return doomed

    def verify(self) -> str | None:
        """Blocking: the first segment whose file was deleted, replaced or cut short."""
        for segment in self.segments:
            problem = segment.replaced()
            if problem is not None:
                return problem
        return None

    def close(self) -> None:
        for segment in self.segments:
            segment.close()
        self.segments = []


def remove_segment_files(directory: Path, *, from_base: int, keep_lowest: bool) -> list[Path]:
    """Blocking, before a load: delete the segment files at or past ``from_base`` (and every
    unfinished ``*.tmp``), highest first, each deletion made durable before the next. With
    ``keep_lowest`` the lowest segment file of the directory stays whatever its base."""
    if not directory.exists():
        return []
    for tmp in directory.glob("*.tmp"):
        tmp.unlink(missing_ok=True)  # a dropped creation may rename it meanwhile
    found = sorted(
        (base, path)
        for path in directory.iterdir()
        if (base := parse_segment_name(path)) is not None
    )
    if keep_lowest:
        found = found[1:]
    removed = []
    for base, path in reversed(found):
        if base < from_base:
            break
        log.info("deleting_segment path=%s reason=cut from=%d", path, from_base)
        path.unlink(missing_ok=True)
        fsync_directory(directory)
        removed.append(path)
    return removed


def segment_bases(directory: Path) -> list[int]:
    """Blocking: the bases of the segment files in ``directory``, sorted."""
    if not directory.exists():
        return []
    return sorted(
        base for path in directory.iterdir() if (base := parse_segment_name(path)) is not None
    )
