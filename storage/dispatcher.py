"""The dispatcher: follows the commit log and writes each record's consume-queue entry.

One code path serves the master (after its own appends), a slave (after raw
appends of replicated bytes) and recovery (re-dispatching the tail the queues
may have lost), so the three can never disagree on what an entry is.

Long polls park on their own queue (:meth:`Dispatcher.wait_for_queue`): a dispatch wakes
only the polls of the queues it added entries to, and a topic deletion those of the
topic's queues. With nobody parked, the per-entry cost is one truthiness check.
"""

from __future__ import annotations

import logging

import trio

from storage.commit_log import CommitLog
from storage.consume_queue import ConsumeQueueStore, QueueConflictError
from storage.record import FLAG_TOPIC_DELETED
from storage.waiters import KeyedWakeups

log = logging.getLogger(__name__)


class Dispatcher:
    """Everything below :attr:`offset` has its consume-queue entry.

    One task dispatches at a time (:meth:`catch_up` coalesces); any number of tasks may
    wait, on the event loop.
    """

    def __init__(self, commit_log: CommitLog, queues: ConsumeQueueStore, offset: int) -> None:
        self.commit_log = commit_log
        self.queues = queues
        self.offset = offset
        self._arrival = trio.Event()
        self._parked: KeyedWakeups[tuple[str, int]] = KeyedWakeups()
        self._busy = False
        self.records_dispatched = 0
        """Records :meth:`catch_up` indexed since the store opened (recovery's not
        counted): what this process appended, for the node's metrics."""
        self.bytes_dispatched = 0
        """The log bytes those records (and segment fillers) took."""

    async def catch_up(self) -> int:
        """Dispatch every record written so far; return how many this call dispatched.

        Calls coalesce: while one is running (it may await a new queue file), others
        return at once and the running one continues to the log's new end, so
        entries are always written in log order by one task.
        """
        if self._busy:
            return 0
        self._busy = True
        count = 0
        start = self.offset
        try:
            while self.offset < self.commit_log.max_offset:
                count += await self._dispatch(self.commit_log.max_offset)
        finally:
            self._busy = False
            self.records_dispatched += count
            self.bytes_dispatched += max(0, self.offset - start)
            if count:
                self._arrival.set()
                self._arrival = trio.Event()
        return count

    async def catch_up_strict(self) -> int:
        """Recovery's dispatch, in one go. When it starts past the log's first record, a
        queue that first shows up with a queue offset above 0 lost its files: that raises
        :class:`QueueConflictError` so the caller rebuilds every queue."""
        strict = self.offset > self.commit_log.min_offset
        return await self._dispatch(self.commit_log.max_offset, strict=strict)

    async def _dispatch(self, end: int, *, strict: bool = False) -> int:
        queues, parked = self.queues, self._parked
        count = 0
        headers = self.commit_log.iter_headers(self.offset, end)
        for offset, size, topic, queue_id, queue_offset, tags, flags in headers:
            if flags & FLAG_TOPIC_DELETED:
                await self._drop_topic(topic, offset)
                self.offset = offset + size
                continue
            queue = queues.get_or_create(topic, queue_id)
            if queue.needs_file(queue_offset):
                if strict and queue_offset and not queue.files.segments:
                    raise QueueConflictError(
                        f"{topic}/{queue_id}: record with queue offset {queue_offset} at log "
                        f"offset {offset} but the queue has no files"
                    )
                await queue.add_file(queue_offset)
            queue.put(queue_offset, offset, size, tags)
            if parked:  # the woken run after this task yields: the entries are in by then
                parked.wake((topic, queue_id))
            self.offset = offset + size
            count += 1
        self.offset = end
        return count

    async def _drop_topic(self, topic: str, offset: int) -> None:
        """A deletion marker: the topic's queues leave the table at once (readers see no
        topic), then their files go in a worker thread; the dispatcher's offset passes
        the marker only after that, so a crash in between replays it at the next start."""
        dropped = self.queues.pop_topic(topic)
        self._parked.wake_where(lambda key: key[0] == topic)
        await trio.to_thread.run_sync(self.queues.delete_topic_files, topic, dropped)
        log.info("topic_queues_dropped topic=%s queues=%d offset=%d", topic, len(dropped), offset)

    async def wait_for_arrival(self) -> None:
        """Return after the next dispatch that added entries to any queue."""
        await self._arrival.wait()

    async def wait_for_queue(self, topic: str, queue_id: int) -> bool:
        """Park until a dispatch adds entries to ``topic``/``queue_id`` (True), or the
        topic's queues are dropped (False: its deletion was dispatched).

        Check for entries before calling, with no await in between: only later
        dispatches wake the caller."""
        await self._parked.wait((topic, queue_id))
        return self.queues.get(topic, queue_id) is not None

    def parked_polls(self, topic: str, queue_id: int) -> int:
        """How many tasks :meth:`wait_for_queue` holds on that queue (metrics, tests)."""
        return self._parked.parked((topic, queue_id))

    def wake_every_poll(self) -> int:
        """Wake every parked poll to re-check its queue (the log was cut: its offset may
        be out of range now); return how many woke."""
        return self._parked.wake_where(lambda _key: True)
