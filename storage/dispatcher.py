"""The dispatcher: follows the commit log and writes each record's consume-queue entry.

One code path serves the master (after its own appends), a slave (after raw
appends of replicated bytes) and recovery (re-dispatching the tail the queues
may have lost), so the three can never disagree on what an entry is. Only where the
fields come from differs: the master's own appends hand them over as they write
(:meth:`CommitLog.take_appended`: the topic, queue, offsets, size and tags hash are
known there), and so does a slave's raw append for the records of the chunk it checked
(it unpacked their headers to check them); everything else (recovery, earlier chunks not
dispatched yet, appends dropped past the hand-over's limit) is read back from the record
headers in the log. Reading them back made indexing about half of a 1 KiB put's CPU;
from the hand-over it is about a third.

Long polls park on their own queue (:meth:`Dispatcher.wait_for_queue`): a dispatch wakes
only the polls of the queues it added entries to, and a topic deletion those of the
topic's queues. With nobody parked, the per-entry cost is one truthiness check.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable

import trio

from storage.commit_log import CommitLog, IndexFields
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
        self._arrival_waiters = 0
        """Tasks in :meth:`wait_for_arrival`: with none, a dispatch leaves the event alone."""
        self.on_dispatched: Callable[[], None] | None = None
        """Called, with no await, after each dispatch that moved :attr:`offset`: a master's
        replication sends the new bytes to idle slaves from the appending task itself
        (no task woken in between). Must not block or raise."""
        self._parked: KeyedWakeups[tuple[str, int]] = KeyedWakeups()
        self._busy = False
        self._yielded = False
        """Whether the running :meth:`_index` awaited (other tasks may have appended)."""
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
        files = self.commit_log.files  # its max_offset is the log's, one property less
        try:
            end = files.max_offset
            while self.offset < end:
                self._yielded = False
                count += await self._index(self._records(end), end)
                if not self._yielded:
                    break  # nobody ran meanwhile: the log still ends at ``end``
                end = files.max_offset
        finally:
            self._busy = False
            self.records_dispatched += count
            moved = self.offset - start
            if moved > 0:
                self.bytes_dispatched += moved
            if count and self._arrival_waiters:
                self._arrival.set()
                self._arrival = trio.Event()
            if self.on_dispatched is not None and self.offset > start:
                self.on_dispatched()
        return count

    async def catch_up_strict(self) -> int:
        """Recovery's dispatch, in one go. When it starts past the log's first record, a
        queue that first shows up with a queue offset above 0 lost its files: that raises
        :class:`QueueConflictError` so the caller rebuilds every queue."""
        strict = self.offset > self.commit_log.min_offset
        end = self.commit_log.max_offset
        return await self._index(self._records(end), end, strict=strict)

    def _records(self, end: int) -> Iterable[IndexFields]:
        """The index fields of the records in [:attr:`offset`, ``end``) (``end`` is the
        log's end): the own appends' as handed over, the rest read from their headers."""
        commit_log = self.commit_log
        appended = commit_log.take_appended(end)
        if appended is None or appended[0][0] < self.offset:  # none, or not ours to take
            return commit_log.iter_headers(self.offset, end)
        first = appended[0][0]
        if first == self.offset:
            return appended
        # Before them: replicated or recovered records, or a segment's filler.
        return itertools.chain(commit_log.iter_headers(self.offset, first), appended)

    async def _index(
        self, records: Iterable[IndexFields], end: int, *, strict: bool = False
    ) -> int:
        """Write the entries of ``records`` (every record in [:attr:`offset`, ``end``), in
        log order), then move :attr:`offset` to ``end``; return how many were indexed."""
        queues, parked = self.queues, self._parked
        lots = parked.lots  # tested per entry: a dict's truth, not KeyedWakeups.__len__
        table = queues.queues
        count = 0
        for offset, size, topic, queue_id, queue_offset, tags, flags in records:
            if flags & FLAG_TOPIC_DELETED:
                self._yielded = True
                await self._drop_topic(topic, offset)
                self.offset = offset + size
                continue
            queue = table.get((topic, queue_id)) or queues.get_or_create(topic, queue_id)
            if queue.needs_file(queue_offset):
                if strict and queue_offset and not queue.files.segments:
                    raise QueueConflictError(
                        f"{topic}/{queue_id}: record with queue offset {queue_offset} at log "
                        f"offset {offset} but the queue has no files"
                    )
                self._yielded = True
                await queue.add_file(queue_offset)
            queue.put(queue_offset, offset, size, tags)
            if lots:  # the woken run after this task yields: the entries are in by then
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
        self._arrival_waiters += 1
        try:
            await self._arrival.wait()
        finally:
            self._arrival_waiters -= 1

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
