"""The two flush services: periodic (async) and group commit (synchronous acks).

Both go through the commit log, which runs one fsync at a time (:meth:`CommitLog.flush`
for the periodic one; group commit starts its own with :meth:`CommitLog.begin_flush`);
whoever flushes next covers every byte written by then, so the two never fsync the same
bytes twice.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from storage.commit_log import CommitLog
from storage.config import StoreConfig
from storage.errors import StorageFailedError
from storage.mapped_file import PAGE_SIZE
from storage.waiters import OffsetWaiters, WakeHandle

log = logging.getLogger(__name__)


class MessageStoreLike(Protocol):
    """What the async flusher needs of the store (kept small on purpose)."""

    config: StoreConfig
    commit_log: CommitLog

    async def flush_all(self) -> None: ...

    def segments_changed(self) -> bool: ...


class GroupCommitFlusher:
    """``await wait_durable(offset, deadline)``: True once ``offset`` is on disk.

    Waiters that arrive while an fsync runs are all covered by the next single
    fsync. The fsync starts from the call that asks for it (:meth:`flush_now`, or
    :meth:`wait_durable`) through :meth:`CommitLog.begin_flush`, and its end wakes the
    waiters it covers from the loop's callback and starts the next one for those still
    waiting: no task hop before or after the fdatasync. Only while a flush or a cut
    holds the log's flush lock does the flusher task take over (it waits for the lock).
    Every method runs on the event loop; any number of waiters at once. A deadline that
    passes gives False (the caller answers ``FLUSH_DISK_TIMEOUT``); a failed fsync
    raises :class:`StorageFailedError` in every waiter, now and later: nothing after it
    is ever acknowledged.
    """

    def __init__(self, commit_log: CommitLog) -> None:
        self.commit_log = commit_log
        self._waiters = OffsetWaiters()
        self._wake = trio.Event()
        self._syncing = False
        """An fdatasync started by :meth:`_start` runs; its end (:meth:`_synced`) starts
        the next one if anyone still waits."""
        self.fsyncs = 0

    def rewind(self, flushed_offset: int) -> None:
        """The log was truncated: offsets past ``flushed_offset`` are not durable any more,
        even if bytes were once flushed there."""
        self._waiters.rewind(flushed_offset)

    def flush_now(self) -> None:
        """Start a group commit of everything written so far, now, unless one runs (its
        end starts the next for whoever waits by then). For a caller that has just
        appended a write whose ack needs the fsync: it begins before the write's wait is
        even queued. Cheap to repeat."""
        if self.commit_log.flushed_offset < self.commit_log.max_offset:
            self._start()

    def _start(self) -> None:
        if self._syncing:
            return
        if self.commit_log.begin_flush(self._synced):
            self._syncing = True
        else:  # the flush lock is held (a flush or a cut), or nothing to do: the task's way
            self._wake.set()

    def _synced(self, flushed: int | StorageFailedError) -> None:
        """The end of an fdatasync from :meth:`_start` (a loop callback): wake whom it
        covers; start the next if a waiter wants bytes written since it began."""
        self._syncing = False
        if isinstance(flushed, StorageFailedError):
            self._waiters.fail(flushed)
            return
        self.fsyncs += 1
        self._waiters.advance(flushed)
        lowest = self._waiters.pending_min
        if lowest is not None and lowest <= self.commit_log.max_offset:
            self._start()

    def wake_when_durable(
        self, task: trio.lowlevel.Task, offset: int, deadline: float
    ) -> WakeHandle | None:
        """Have ``task``, parked by its own means, woken as :meth:`wait_durable` would
        answer for ``offset`` (True once fsynced, False at ``deadline`` or past a cut, the
        failure as an error; see :meth:`OffsetWaiters.wake_task`), and start the fsync
        if none runs. None when that would be at once (durable already, or the log
        failed): the caller wakes the task itself. Lets the end of the fsync wake a
        connection's idle ack task, with no step of its own to park on
        :meth:`wait_durable` first."""
        if self.commit_log.failure is not None or offset <= self.commit_log.flushed_offset:
            return None
        self._start()  # its end comes as a loop callback: after the caller parks the task
        return self._waiters.wake_task(task, offset, deadline)

    async def wait_durable(self, offset: int, deadline: float) -> bool:
        if self.commit_log.failure is not None:
            raise self.commit_log.failure
        if offset <= self.commit_log.flushed_offset:
            return True
        self._start()  # the fsync's end comes as a loop callback: never before we park
        return await self._waiters.wait(offset, deadline)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._waiters.expire_deadlines)
            task_status.started()
            await self._flush_for_waiters()

    async def _flush_for_waiters(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while not self._syncing and (lowest := self._waiters.pending_min) is not None:
                flushed = await self._flush()
                if flushed is None:
                    return
                if flushed < lowest:  # not written yet: flushing again now would only spin
                    break

    async def _flush(self) -> int | None:
        """One fsync; wake the waiters it covers. None: it failed (every waiter, now and
        later, gets the failure)."""
        try:
            flushed = await self.commit_log.flush()
        except StorageFailedError as failure:
            self._waiters.fail(failure)
            return None
        self.fsyncs += 1
        self._waiters.advance(flushed)
        return flushed


class AsyncFlusher:
    """RocketMQ's FlushRealTimeService: every ``flush_interval_ms``, flush when at least
    ``flush_least_pages`` pages are dirty, and flush everything (queues and checkpoint
    too) every ``flush_thorough_interval_ms``."""

    def __init__(self, store: MessageStoreLike) -> None:
        self.store = store
        config = store.config
        self.interval = config.flush_interval_ms / 1000
        self.thorough_interval = config.flush_thorough_interval_ms / 1000
        self.least_bytes = config.flush_least_pages * PAGE_SIZE

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        last_thorough = trio.current_time()
        commit_log = self.store.commit_log
        while True:
            await trio.sleep(self.interval)
            now = trio.current_time()
            try:
                if now - last_thorough >= self.thorough_interval or self.store.segments_changed():
                    await self.store.flush_all()
                    last_thorough = now
                elif commit_log.dirty_bytes and commit_log.dirty_bytes >= self.least_bytes:
                    await commit_log.flush()
            except StorageFailedError:
                return  # logged by the log; writes are refused from now on
