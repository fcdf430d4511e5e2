"""The allocation service: creates (and warms) the next segment before it is needed.

Like RocketMQ's AllocateMappedFileService: a roll-over takes a segment that is
already on disk and mapped, so appends never wait for fallocate or page faults.
Creation runs in a worker thread; requests are served by tasks in the store's nursery.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import attrs
import trio

from storage.mapped_file import MappedFile

log = logging.getLogger(__name__)


@attrs.define
class _Pending:
    done: trio.Event = attrs.field(factory=trio.Event)
    segment: MappedFile | None = None
    error: BaseException | None = None
    dropped: bool = False


class SegmentAllocator:
    """Hands out segments for one directory; prepares the one after each it hands out."""

    def __init__(self, directory: Path, segment_size: int, *, warm: bool, ahead: bool) -> None:
        self.directory = directory
        self.segment_size = segment_size
        self.warm = warm
        self.ahead = ahead
        self._pending: dict[int, _Pending] = {}
        self._dropped: dict[int, _Pending] = {}
        """Creations dropped while still running: a new one of the same base waits for
        them, or the dropped one's deletion could remove the new file."""
        self._nursery: trio.Nursery | None = None
        self.created = 0
        self.last_create_seconds = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve background creations until cancelled; drops unused segments on exit."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for pending in self._pending.values():
                if pending.segment is not None:
                    pending.segment.delete()  # never used: leave no empty segment behind
            self._pending.clear()

    def prepare(self, base: int) -> None:
        """Start creating the segment at ``base`` in the background (idempotent)."""
        if base in self._pending or self._nursery is None:
            return
        pending = self._pending[base] = _Pending()
        self._nursery.start_soon(self._create, base, pending)

    async def take(self, base: int) -> MappedFile:
        """The segment at ``base``: prepared earlier, or created now (the slow path)."""
        if base not in self._pending:
            if self._nursery is None:
                return await self._create_now(base)
            self.prepare(base)
        pending = self._pending[base]
        await pending.done.wait()
        if pending.dropped:  # a truncate dropped it meanwhile: make a fresh one
            return await self.take(base)
        if self._pending.pop(base, None) is not pending:
            raise RuntimeError(f"segment at {base} was taken twice; takers must be serialised")
        if pending.error is not None:
            raise pending.error
        assert pending.segment is not None
        if self.ahead:
            self.prepare(base + self.segment_size)
        return pending.segment

    def drop_prepared(self) -> None:
        """Delete every prepared segment: after a truncate they would lie past the log's end,
        and a crash would leave a gap that stops the next start."""
        for base, pending in self._pending.items():
            pending.dropped = True
            if pending.segment is not None:
                pending.segment.delete()
                pending.segment = None
            elif not pending.done.is_set():
                self._dropped[base] = pending
        self._pending.clear()

    async def wait_dropped(self) -> None:
        """Return once every creation dropped while running has finished and deleted its
        file (a creation runs in a worker thread, so it can outlive the drop)."""
        while self._dropped:
            await next(iter(self._dropped.values())).done.wait()

    async def _create(self, base: int, pending: _Pending) -> None:
        try:
            earlier = self._dropped.get(base)
            if earlier is not None and earlier is not pending:
                await earlier.done.wait()  # it deletes its file first
            pending.segment = await self._create_now(base)
            if pending.dropped:
                pending.segment.delete()
                pending.segment = None
        except Exception as exc:  # handed to the taker, who reports it (e.g. DiskFullError)
            pending.error = exc
        finally:
            if self._dropped.get(base) is pending:
                del self._dropped[base]
            pending.done.set()

    async def _create_now(self, base: int) -> MappedFile:
        start = time.perf_counter()
        segment = await trio.to_thread.run_sync(
            lambda: MappedFile.create(self.directory, base, self.segment_size, warm=self.warm)
        )
        self.last_create_seconds = time.perf_counter() - start
        self.created += 1
        log.debug(
            "segment_created path=%s warm=%s seconds=%.4f",
            segment.path,
            self.warm,
            self.last_create_seconds,
        )
        return segment
