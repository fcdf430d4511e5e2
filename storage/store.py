"""MessageStore: one node's storage, recovered, with its services running.

It owns the CommitLog, the consume queues and their dispatcher, the checkpoint
and four services (allocation, group commit, async flush, retention), all tasks
in one nursery. ``async with MessageStore.open(config) as store`` recovers,
serves, and on exit flushes everything and writes a clean checkpoint, even when
the body was cancelled (that is how SIGTERM ends a node).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from storage.allocator import SegmentAllocator
from storage.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from storage.commit_log import AppendResult, BatchAppendResult, CommitLog, forget_topic
from storage.config import StoreConfig
from storage.consume_queue import ConsumeQueue, ConsumeQueueStore, sync_segments
from storage.cut import (
    CutIntent,
    CutKind,
    clear_cut_intent,
    load_cut_intent,
    save_cut_intent,
)
from storage.dispatcher import Dispatcher
from storage.errors import (
    CorruptSegmentError,
    OffsetOutOfRangeError,
    SegmentMissingError,
    StorageFailedError,
)
from storage.flush import AsyncFlusher, GroupCommitFlusher
from storage.lent_views import LentViews
from storage.lock import lock_data_dir
from storage.mapped_file import MappedFile, fsync_directory, segment_name
from storage.mapped_file_queue import remove_segment_files, segment_bases
from storage.record import FLAG_TOPIC_DELETED, Message, StoredRecord
from storage.record_runs import RecordRuns, queue_record_runs
from storage.recovery import RecoveryReport, recover
from storage.retention import RetentionService
from storage.waiters import ReadLimitWaiters

log = logging.getLogger(__name__)

_PAST_EVERY_LIMIT = 2**64
"""What a poll waits for while a cut runs: no limit reaches it, the cut's end wakes it."""


def _no_step_hook(_step: str) -> None:
    return None


@attrs.frozen
class GetResult:
    """Records of one queue from a queue offset, and where the queue stands."""

    records: list[tuple[int, StoredRecord]]
    """(queue offset, record) pairs; record bodies are views into the log."""
    next_offset: int
    min_offset: int
    max_offset: int


class MessageStore:
    """One node's storage: the commit log, its consume queues and dispatcher, the
    checkpoint, and the services (allocation, group commit, async flush, retention).

    Use :meth:`open`; the constructor alone does no I/O and starts nothing. Open holds
    the data dir's lock (storage.lock) until it returns.

    Invariants: the dispatcher's offset never passes the log's end, and every record
    below it has its consume-queue entry; the checkpoint on disk never claims more than
    is fsynced, and names every segment that must exist (a start refuses when one is
    missing); a cut intent file exists exactly while a truncation or log restart is
    under way (a start finishes it). Once the commit log failed, no write and no
    acknowledgement happen until a restart.

    Concurrency (one trio thread): :meth:`put`, :meth:`put_batch`, reads and
    :meth:`wait_durable` from any number of tasks at once. :meth:`append_replicated` from
    one replication stream, never alongside own puts. :meth:`truncate` and
    :meth:`restart_log_at` from the only writer (a slave's follower) with no put or
    replicated append in flight: asserted. :meth:`flush_all` from anyone (serialised).
    """

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.allocator = SegmentAllocator(
            config.commit_log_dir,
            config.segment_size,
            warm=config.warm_segments,
            ahead=config.preallocate,
        )
        self.commit_log = CommitLog(config, self.allocator)
        files = self.commit_log.files
        self.queues = ConsumeQueueStore(
            config.consume_queue_dir,
            config.consume_queue_entries,
            log_start=lambda: files.min_offset,
        )
        self.group_commit = GroupCommitFlusher(self.commit_log)
        self.retention = RetentionService(self)
        self.lent = LentViews()
        """Views of the log lent to answers not sent yet (copied before a cut changes them)."""
        self.dispatcher: Dispatcher
        self.recovery: RecoveryReport
        self._abandoned = False
        self._flush_all_lock = trio.Lock()
        """One flush_all at a time: they share checkpoint.tmp (the async flusher's and the
        shutdown's used to race: FileNotFoundError on the rename). Cuts hold it too."""
        self._cutting = False
        """True while a truncation or log restart runs (writes must not start then)."""
        self.checkpointed_last_segment: int | None = None
        """The last segment the checkpoint on disk names (see :meth:`segments_changed`)."""
        self._limited = ReadLimitWaiters()
        """Long polls whose next entry ends past the read limit (see
        :meth:`wait_for_read_limit`)."""
        self.after_cut_step: Callable[[str], None] = _no_step_hook
        """Called after each step of a truncation or log restart; crash tests kill there."""

    @classmethod
    @asynccontextmanager
    async def open(cls, config: StoreConfig) -> AsyncIterator[MessageStore]:
        # Before anything in the directory is read or written (storage.lock).
        data_dir_lock = await trio.to_thread.run_sync(lock_data_dir, config.data_dir)
        store = cls(config)
        try:
            await store._recover()
            async with trio.open_nursery() as nursery:
                await nursery.start(store.allocator.run)
                if config.preallocate:
                    store.allocator.prepare(store._next_segment_base())
                await nursery.start(store.group_commit.run)
                await nursery.start(AsyncFlusher(store).run)
                await nursery.start(store.retention.run)
                try:
                    yield store
                finally:
                    with trio.CancelScope(shield=True):
                        await store._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            store.commit_log.close()
            store.queues.close()
            data_dir_lock.release()

    async def _recover(self) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        intent = await trio.to_thread.run_sync(load_cut_intent, config.cut_intent_path)
        if intent is not None:
            log.warning(
                "cut_unfinished kind=%s offset=%d action=finish", intent.kind.name, intent.offset
            )
            await trio.to_thread.run_sync(self._finish_cut_on_disk, intent)
        checkpoint = await trio.to_thread.run_sync(load_checkpoint, config.checkpoint_path)
        if checkpoint is not None:
            await trio.to_thread.run_sync(self._check_segments_present, checkpoint, intent)
        log_flushed = checkpoint.commit_log_flushed if checkpoint else None
        queues_flushed = checkpoint.consume_queue_flushed if checkpoint else None
        if intent is not None:  # nothing past the cut counts, whatever the checkpoint says
            cut = intent.offset
            restart = intent.kind is CutKind.RESTART
            log_flushed = cut if restart or log_flushed is None else min(cut, log_flushed)
            queues_flushed = cut if restart or queues_flushed is None else min(cut, queues_flushed)
        self.dispatcher, self.recovery = await recover(
            self.commit_log,
            self.queues,
            log_flushed,
            queues_flushed,
            clean=bool(checkpoint and checkpoint.clean and intent is None),
            cut_at=intent.offset if intent is not None else None,
            before_cut=self._save_recovery_cut,
        )
        # From here until a clean shutdown the checkpoint says "not clean".
        await self._save_checkpoint(clean=False)
        if config.cut_intent_path.exists():  # ours, or recovery's own (before_cut)
            await trio.to_thread.run_sync(clear_cut_intent, config.cut_intent_path)
            if intent is not None:
                log.warning("cut_finished kind=%s offset=%d", intent.kind.name, intent.offset)

    def _save_recovery_cut(self, offset: int) -> None:
        """Blocking: recovery is about to delete whole segments past a torn end: record
        it, so a kill before the checkpoint names the new last segment is no false loss."""
        save_cut_intent(self.config.cut_intent_path, CutIntent(CutKind.TRUNCATE, offset))

    def _check_segments_present(self, checkpoint: Checkpoint, intent: CutIntent | None) -> None:
        """Blocking, before loading: every segment the checkpoint names must be on disk.

        Files below its first segment are retention's (it records the new start before
        deleting): their deletion is finished here. A missing one is a loss that no
        recovery can hide: refuse to start, naming it.
        """
        config = self.config
        size = config.segment_size
        on_disk = segment_bases(config.commit_log_dir)
        required = checkpoint.required_segments(size)
        if intent is not None:  # an unfinished cut removes what lies past it
            cut = intent.offset if intent.kind is CutKind.TRUNCATE else required.start
            required = range(required.start, max(required.start + size, cut), size)
            if intent.kind is CutKind.RESTART:
                required = range(0)
        if required and on_disk:
            retention_leftovers = [b for b in on_disk if b < required.start]
            for base in retention_leftovers:  # lowest first: the rest stays contiguous
                path = config.commit_log_dir / segment_name(base)
                log.warning("deleting_segment path=%s reason=retention_unfinished", path)
                path.unlink()
                fsync_directory(config.commit_log_dir)
        missing = [config.commit_log_dir / segment_name(b) for b in required if b not in on_disk]
        if missing:
            shown = ", ".join(str(path) for path in missing[:5])
            raise SegmentMissingError(
                f"refusing to start: {len(missing)} commit-log segment file(s) missing: {shown}"
                f"{' ...' if len(missing) > 5 else ''}; the checkpoint says the log spans "
                f"segments {required.start} to {required.stop - size}. They were deleted or "
                "lost outside tidelog: put them back, or restore this node from a replica "
                "(move the data dir away to start empty)"
            )

    def _finish_cut_on_disk(self, intent: CutIntent) -> None:
        """Blocking, before anything is loaded: redo the file deletions of a cut a crash
        interrupted (each step is idempotent); recovery then cuts at ``intent.offset``."""
        config = self.config
        if intent.kind is CutKind.RESTART:
            remove_segment_files(config.commit_log_dir, from_base=0, keep_lowest=False)
            shutil.rmtree(config.consume_queue_dir, ignore_errors=True)
            config.commit_log_dir.mkdir(parents=True, exist_ok=True)
            MappedFile.create(
                config.commit_log_dir, intent.offset, config.segment_size, warm=False
            ).close()
        else:
            remove_segment_files(config.commit_log_dir, from_base=intent.offset, keep_lowest=True)

    def _next_segment_base(self) -> int:
        last = self.commit_log.files.last
        return last.end if last is not None else self.commit_log.min_offset

    # ---- writing -----------------------------------------------------------------------

    async def put(self, message: Message) -> AppendResult:
        """Append one message and index it. Durability: see :meth:`wait_durable`."""
        assert not self._cutting, "no write may start while the log is being cut"
        result = await self.commit_log.append(message)
        await self.dispatcher.catch_up()
        return result

    async def put_batch(self, messages: Sequence[Message]) -> BatchAppendResult:
        """Append many messages in one pass (all or nothing) and index them."""
        assert not self._cutting, "no write may start while the log is being cut"
        result = await self.commit_log.append_batch(messages)
        await self.dispatcher.catch_up()
        return result

    async def delete_topic(self, topic: str) -> AppendResult:
        """Drop every consume queue of ``topic``; its records stay in the log until
        retention, never indexed again. Returns where the deletion marker landed (wait
        for its ``end_offset`` to be durable before calling the deletion done).

        The marker (:data:`~storage.record.FLAG_TOPIC_DELETED`) is a record, so the
        dispatcher meets it at the same place on every node that reads this log: a
        slave's replicated copy and a rebuild of the queues at a start drop the topic
        there too, and the topic's records after it (a re-created topic) number their
        queue offsets from 0 again.
        """
        assert not self._cutting, "no write may start while the log is being cut"
        result = await self.commit_log.append(Message(topic, b"", 0, flags=FLAG_TOPIC_DELETED))
        forget_topic(self.commit_log.next_queue_offsets, topic)
        await self.dispatcher.catch_up()
        self._limited.wake_all()  # a poll on the topic answers now, not when the limit moves
        log.info("topic_deleted topic=%s marker_offset=%d", topic, result.offset)
        return result

    async def append_replicated(self, offset: int, data: bytes | memoryview) -> int:
        """Append bytes replicated from the master at ``offset`` and index the whole records
        among them; return the log's new visible end (see :meth:`CommitLog.append_raw`).

        The dispatcher indexes the fields of the same bytes the master's did (handed over
        by the raw append), so the consume queues match the master's. On corrupt data the
        valid records before it are indexed too.
        """
        assert not self._cutting, "no write may start while the log is being cut"
        try:
            end = await self.commit_log.append_raw(offset, data)
        except CorruptSegmentError:
            await self.dispatcher.catch_up()
            raise
        await self.dispatcher.catch_up()
        return end

    async def wait_durable(self, offset: int, timeout: float) -> bool:
        """True once every byte below ``offset`` is fsynced; False after ``timeout`` seconds."""
        return await self.group_commit.wait_durable(offset, trio.current_time() + timeout)

    async def truncate(self, offset: int) -> None:
        """Cut the log at ``offset`` (a record boundary) and bring the queues along.

        Replication uses it to drop a divergent tail. Queue entries of cut records
        go, and the next record of each queue gets the queue offset after the last
        one kept, so the queues stay dense. Crash-safe: the cut intent is on disk
        before the first file changes and goes after the checkpoint is lowered, so a
        start after a kill at any step finishes the cut (docs/format.md).
        """
        await self.dispatcher.catch_up()
        async with self._flush_all_lock, self._cut():
            self.lent.copy_from(offset)  # no read lends more while _cutting is set
            # A queue's start marker (docs/format.md) must be on disk before its records
            # can be cut: after the cut it is the only record of where that queue starts,
            # and a start that finishes the cut can no longer re-dispatch it from the log.
            await trio.to_thread.run_sync(sync_segments, self.queues.dirty_segments())
            intent = CutIntent(CutKind.TRUNCATE, offset)
            await trio.to_thread.run_sync(save_cut_intent, self.config.cut_intent_path, intent)
            self._cut_step("intent_saved")
            await self.commit_log.truncate(offset)
            self._cut_step("log_cut")
            self.group_commit.rewind(self.commit_log.flushed_offset)
            end = self.commit_log.max_offset
            await trio.to_thread.run_sync(self.queues.truncate_from_log_offset, end)
            self._cut_step("queues_cut")
            self.dispatcher.offset = min(self.dispatcher.offset, end)
            self.commit_log.next_queue_offsets = {
                key: queue.max_offset for key, queue in self.queues.queues.items()
            }
            await self._flush_all_locked(clean=False)
            self._cut_step("checkpoint_saved")
            await trio.to_thread.run_sync(clear_cut_intent, self.config.cut_intent_path)
        # Polls parked at a queue's old end re-check: past the new end they answer
        # OFFSET_OUT_OF_RANGE now instead of at their deadline. (After a log restart the
        # queues are gone, and a poll woken there would read that as its topic deleted.)
        self.dispatcher.wake_every_poll()
        log.warning("store_truncated offset=%d", end)

    async def restart_log_at(self, start_offset: int) -> None:
        """Discard the whole log, every consume queue and the checkpoint's positions, and
        leave an empty log that starts at ``start_offset``: the next append, batch,
        ``append_raw`` or :meth:`append_replicated` lands at exactly that offset.

        For a slave's full resync: ``start_offset`` is the master's log start (its
        first segment's base), so it must be a multiple of ``segment_size``
        (``ValueError`` otherwise, nothing changed). Afterwards :attr:`min_offset` ==
        :attr:`max_offset` == ``start_offset``, and that survives restarts (the empty
        segment file named ``start_offset`` is the record of it). Crash-safe: a kill
        at any step restarts into the same empty log at ``start_offset``.

        The caller must be the store's only writer while this runs (no ``put`` or
        ``append_replicated`` in flight); waiters for durability past the old end
        get False.
        """
        size = self.config.segment_size
        if start_offset < 0 or start_offset % size:
            raise ValueError(
                f"a log can only start at a segment boundary (a multiple of segment_size "
                f"{size}), got {start_offset}: the master's log start is one when both "
                "nodes use the same segment_size"
            )
        await self.dispatcher.catch_up()
        async with self._flush_all_lock, self._cut():
            intent = CutIntent(CutKind.RESTART, start_offset)
            await trio.to_thread.run_sync(save_cut_intent, self.config.cut_intent_path, intent)
            self._cut_step("intent_saved")
            await self.commit_log.restart_at(start_offset)
            self._cut_step("log_cut")
            self.group_commit.rewind(start_offset)
            await trio.to_thread.run_sync(self.queues.delete_all)
            self._cut_step("queues_cut")
            self.dispatcher.offset = start_offset
            await self._save_checkpoint(clean=False, queues_flushed=start_offset)
            self._cut_step("checkpoint_saved")
            await trio.to_thread.run_sync(clear_cut_intent, self.config.cut_intent_path)
        if self.config.preallocate:
            self.allocator.prepare(self._next_segment_base())
        log.warning("store_log_restarted start_offset=%d", start_offset)

    @property
    def min_offset(self) -> int:
        """The log's start: its first segment's base (0 for a log that never had one)."""
        return self.commit_log.min_offset

    @property
    def max_offset(self) -> int:
        """The log's end: where the next record goes."""
        return self.commit_log.max_offset

    @asynccontextmanager
    async def _cut(self) -> AsyncIterator[None]:
        assert not self._cutting, "one cut at a time"
        self._cutting = True
        try:
            yield
        finally:
            self._cutting = False
            self._limited.wake_all()  # they re-check: their entries may be gone now

    def _cut_step(self, step: str) -> None:
        """A cut reached ``step`` (tests kill the process here to prove each is safe)."""
        self.after_cut_step(step)

    # ---- reading -----------------------------------------------------------------------

    def holds_topic(self, topic: str) -> bool:
        """Whether records of ``topic`` are indexed (it was written and not deleted)."""
        return self.queues.holds_topic(topic)

    def queue_offsets(self, topic: str, queue_id: int) -> tuple[int, int]:
        """(min, max) queue offsets: the first entry, and one past the last."""
        queue = self.queues.get(topic, queue_id)
        return (queue.min_offset, queue.max_offset) if queue is not None else (0, 0)

    def get_messages(
        self,
        topic: str,
        queue_id: int,
        queue_offset: int,
        *,
        max_messages: int = 32,
        max_bytes: int = 1 << 20,
        below_offset: int | None = None,
    ) -> GetResult:
        """Records from ``queue_offset`` on, up to the limits.

        At least one record is returned when one exists, even if larger than
        ``max_bytes``, so a consumer never gets stuck. ``below_offset`` hides
        records ending past it (replication's confirm offset).

        Every record returned is the queue's own (its topic, queue id and queue offset
        are checked): while a cut runs nothing is served (the log and the queues change
        in worker threads, and a zeroed entry would read as the record at offset 0), and
        an entry that does not lead to its record ends the page, or raises
        :class:`OffsetOutOfRangeError` when it is the first one asked for.
        """
        queue = self.queues.get(topic, queue_id)
        if queue is None:
            return GetResult([], queue_offset, 0, 0)
        records: list[tuple[int, StoredRecord]] = []
        total = 0
        next_offset = max(queue_offset, queue.min_offset)
        if self._cutting:
            return GetResult(records, next_offset, queue.min_offset, queue.max_offset)
        log_end = self.commit_log.max_offset
        for index, offset, size, _tags in queue.entries(next_offset, max_messages):
            if (below_offset is not None and offset + size > below_offset) or (
                records and total + size > max_bytes
            ):
                break
            record = self._queue_record(topic, queue_id, index, offset, size, log_end)
            if record is None:
                if records:
                    break
                raise OffsetOutOfRangeError(
                    f"{topic}/{queue_id}: queue offset {index} has no record in the log "
                    f"(its entry points at log offset {offset}, size {size}; the log ends at "
                    f"{log_end}): the queue is being cut or rebuilt; retry the pull"
                )
            records.append((index, record))
            total += size
            next_offset = index + 1
        return GetResult(records, next_offset, queue.min_offset, queue.max_offset)

    def get_record_runs(
        self,
        topic: str,
        queue_id: int,
        queue_offset: int,
        *,
        max_messages: int = 32,
        max_bytes: int = 1 << 20,
        below_offset: int | None = None,
    ) -> RecordRuns:
        """What :meth:`get_messages` returns, as the stored bytes of the records (runs of
        views into the log, see :mod:`storage.record_runs`): no record is decoded, no
        CRC checked (the reader checks them), nothing copied."""
        queue = self.queues.get(topic, queue_id)
        if queue is None:
            return RecordRuns([], 0, 0, queue_offset, 0, 0)
        if self._cutting:
            next_offset = max(queue_offset, queue.min_offset)
            return RecordRuns([], 0, 0, next_offset, queue.min_offset, queue.max_offset)
        return queue_record_runs(
            self.commit_log,
            queue,
            queue_offset,
            max_messages=max_messages,
            max_bytes=max_bytes,
            below_offset=below_offset,
        )

    def queue_offset_at_time(
        self, topic: str, queue_id: int, store_us: int, *, below_offset: int | None = None
    ) -> int:
        """The first queue offset whose record was stored at or after ``store_us``, or the
        queue's end when every record is older: where "consume from a time" starts.

        A binary search over the queue that reads each probe's store timestamp from the log
        (RocketMQ's lookup by time): a few reads, no index of its own. Store times follow
        the master's wall clock, so after a clock step back the answer is approximate, but
        it is always within the queue's range. ``below_offset`` (a slave's confirm offset,
        as for :meth:`get_messages`) caps the answer at the first record ending past it:
        a record a failover could take back is never skipped over.
        """
        queue = self.queues.get(topic, queue_id)
        if queue is None:
            return 0
        if self._cutting:
            raise OffsetOutOfRangeError(
                f"{topic}/{queue_id}: the log is being cut; retry the lookup by time"
            )
        low, high = queue.min_offset, queue.max_offset
        if below_offset is not None:
            high = self._first_entry_past(queue, low, high, below_offset)
        log_end = self.commit_log.max_offset
        while low < high:
            middle = (low + high) // 2
            offset, size, _tags = queue.get(middle)
            record = self._queue_record(topic, queue_id, middle, offset, size, log_end)
            if record is None:
                raise OffsetOutOfRangeError(
                    f"{topic}/{queue_id}: queue offset {middle} has no record in the log "
                    "while looking up a time: the queue is being cut or rebuilt; retry"
                )
            stored_before = record.store_us < store_us
            record.release()
            if stored_before:
                low = middle + 1
            else:
                high = middle
        return low

    @staticmethod
    def _first_entry_past(queue: ConsumeQueue, low: int, high: int, log_offset: int) -> int:
        """The first queue offset in ``[low, high)`` whose record ends past ``log_offset``
        (``high`` if none does): entries ascend in log offset, so a binary search."""
        while low < high:
            middle = (low + high) // 2
            offset, size, _tags = queue.get(middle)
            if offset + size > log_offset:
                high = middle
            else:
                low = middle + 1
        return low

    def _queue_record(
        self, topic: str, queue_id: int, queue_offset: int, offset: int, size: int, log_end: int
    ) -> StoredRecord | None:
        """The record a queue entry points at, or None when it is not that queue's record
        at that queue offset (an empty entry, one past the log end, or a stale one)."""
        if not size or offset < self.commit_log.min_offset or offset + size > log_end:
            return None
        record = self.commit_log.read(offset)
        if (record.topic, record.queue_id, record.queue_offset, record.size) != (
            topic,
            queue_id,
            queue_offset,
            size,
        ):
            log.error(
                "queue_entry_mismatch topic=%s queue=%d queue_offset=%d log_offset=%d "
                "record_topic=%s record_queue=%d record_queue_offset=%d",
                topic,
                queue_id,
                queue_offset,
                offset,
                record.topic,
                record.queue_id,
                record.queue_offset,
            )
            record.release()
            return None
        return record

    def read(self, offset: int) -> StoredRecord:
        return self.commit_log.read(offset)

    async def wait_for_arrival(self) -> None:
        """Return once new records were indexed, in any queue."""
        await self.dispatcher.wait_for_arrival()

    async def wait_for_queue(self, topic: str, queue_id: int) -> bool:
        """Return once new records were indexed in that queue (True), or its topic was
        dropped (False); see :meth:`Dispatcher.wait_for_queue` (long polls)."""
        return await self.dispatcher.wait_for_queue(topic, queue_id)

    async def wait_for_read_limit(self, topic: str, queue_id: int, queue_offset: int) -> None:
        """Park a long poll whose entry ``queue_offset`` of that queue exists but ends past
        the read limit, until :meth:`read_limit_moved` reaches that entry's end, a cut
        ends, or :meth:`read_limit_reset`. Call it right after the read that found the
        entry hidden, with no await in between (only later moves wake the caller).

        The read limit is the caller's (replication's confirm offset): the store only
        keeps who waits for which log offset, so a move that covers no poll costs a
        heap peek, not a wakeup of every parked poll."""
        needed = _PAST_EVERY_LIMIT  # while a cut runs: its end wakes the poll
        queue = self.queues.get(topic, queue_id)
        readable = queue is not None and not self._cutting
        if readable and queue is not None and queue.min_offset <= queue_offset < queue.max_offset:
            log_offset, size, _tags = queue.get(queue_offset)
            needed = log_offset + size
        await self._limited.wait(needed)

    def read_limit_moved(self, limit: int | None) -> int:
        """The read limit is now ``limit`` (None: none): wake the polls of
        :meth:`wait_for_read_limit` whose entry it covers; return how many woke."""
        return self._limited.limit_moved(limit)

    def read_limit_reset(self) -> int:
        """The read limit changed in a way no offset describes (a new ack policy): wake
        every poll of :meth:`wait_for_read_limit` to re-check; return how many woke."""
        return self._limited.wake_all()

    def polls_past_read_limit(self) -> int:
        """How many polls :meth:`wait_for_read_limit` holds (metrics, tests)."""
        return len(self._limited)

    # ---- durability and shutdown -------------------------------------------------------

    async def flush_all(self, *, clean: bool = False) -> None:
        """Flush the log and the queues, then record both in the checkpoint."""
        async with self._flush_all_lock:
            await self._flush_all_locked(clean=clean)

    async def _flush_all_locked(self, *, clean: bool) -> None:
        await self.commit_log.verify_files()
        dispatched = self.dispatcher.offset
        log_flushed = await self.commit_log.flush()
        await trio.to_thread.run_sync(sync_segments, self.queues.dirty_segments())
        await self._save_checkpoint(clean=clean, queues_flushed=min(dispatched, log_flushed))

    async def _save_checkpoint(
        self,
        *,
        clean: bool,
        queues_flushed: int | None = None,
        first_segment: int | None = None,
    ) -> None:
        """Write the checkpoint; ``first_segment`` overrides the log's first segment
        (retention records the new one before deleting the old ones)."""
        log_flushed = self.commit_log.flushed_offset
        files = self.commit_log.files
        first, last = files.first, files.last
        last_base = last.base if last is not None else None
        if first_segment is None and first is not None:
            first_segment = first.base
        checkpoint = Checkpoint(
            commit_log_flushed=log_flushed,
            consume_queue_flushed=log_flushed if queues_flushed is None else queues_flushed,
            clean=clean,
            first_segment=first_segment if last_base is not None else None,
            last_segment=last_base,
        )
        await trio.to_thread.run_sync(save_checkpoint, self.config.checkpoint_path, checkpoint)
        self.checkpointed_last_segment = last_base

    def segments_changed(self) -> bool:
        """Whether the log rolled into a segment the checkpoint does not name yet (the
        async flusher then writes one soon, so a lost active segment is noticed at start)."""
        last = self.commit_log.files.last
        return last is not None and last.base != self.checkpointed_last_segment

    async def delete_oldest_segments(self, count: int) -> int:
        """Retention: delete the ``count`` oldest segments (never the active one) and move
        the consume queues' starts along. The checkpoint names the new first segment
        before anything is deleted, so a kill in between is finished at the next start.
        It also says the queues are on disk up to the dispatched records (recovery
        trusts their entries there), so the queue files are fsynced first."""
        async with self._flush_all_lock:
            segments = self.commit_log.files.segments
            count = min(count, len(segments) - 1)
            if count <= 0:
                return 0
            dispatched = self.dispatcher.offset  # every entry below it is in the maps
            await trio.to_thread.run_sync(sync_segments, self.queues.dirty_segments())
            await self._save_checkpoint(
                clean=False,
                queues_flushed=min(dispatched, self.commit_log.flushed_offset),
                first_segment=segments[count].base,
            )
            deleted = await self.commit_log.delete_oldest(count)
        await trio.to_thread.run_sync(self.queues.advance_min, self.commit_log.min_offset)
        return deleted

    def abandon(self) -> None:
        """Simulate a crash (for tests and the crash harness): leaving :meth:`open` after
        this skips the clean shutdown, so nothing more is flushed and the checkpoint stays
        "not clean". The services still stop and the files are still closed."""
        self._abandoned = True

    async def _shutdown(self) -> None:
        if self._abandoned:
            log.warning("store_abandoned clean=False log_end=%d", self.commit_log.max_offset)
            return
        try:
            await self.dispatcher.catch_up()
            await self.flush_all(clean=True)
        except StorageFailedError:
            log.error("shutdown_not_clean reason=storage_failed: recovery will scan on restart")
            return
        log.info("store_closed clean=True log_end=%d", self.commit_log.max_offset)

    def status(self) -> dict[str, int | bool | str | None]:
        """Positions and health, for `tidelog status` and metrics."""
        commit_log = self.commit_log
        return {
            "log_min_offset": commit_log.min_offset,
            "log_max_offset": commit_log.max_offset,
            "flushed_offset": commit_log.flushed_offset,
            "dispatched_offset": self.dispatcher.offset,
            "segments": len(commit_log.files.segments),
            "fsyncs": commit_log.flush_count,
            "queues": len(self.queues.queues),
            "failed": commit_log.failure is not None,
            "disk_full": commit_log.disk_full is not None,
            "failure": str(commit_log.failure) if commit_log.failure else None,
        }
