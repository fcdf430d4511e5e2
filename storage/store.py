"""MessageStore: one node's storage, recovered, with its services running.

It owns the CommitLog, the consume queues and their dispatcher, the checkpoint
and four services (allocation, group commit, async flush, retention), all tasks
in one nursery. ``async with MessageStore.open(config) as store`` recovers,
serves, and on exit flushes everything and writes a clean checkpoint, even when
the body was cancelled (that is how SIGTERM ends a node).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from storage.allocator import SegmentAllocator
from storage.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from storage.commit_log import AppendResult, BatchAppendResult, CommitLog
from storage.config import StoreConfig
from storage.consume_queue import ConsumeQueueStore, sync_segments
from storage.dispatcher import Dispatcher
from storage.errors import CorruptSegmentError, StorageFailedError
from storage.flush import AsyncFlusher, GroupCommitFlusher
from storage.record import Message, StoredRecord
from storage.recovery import RecoveryReport, recover
from storage.retention import RetentionService

log = logging.getLogger(__name__)


@attrs.frozen
class GetResult:
    """Records of one queue from a queue offset, and where the queue stands."""

    records: list[tuple[int, StoredRecord]]
    """(queue offset, record) pairs; record bodies are views into the log."""
    next_offset: int
    min_offset: int
    max_offset: int


class MessageStore:
    """Use :meth:`open`; the constructor alone does no I/O and starts nothing."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.allocator = SegmentAllocator(
            config.commit_log_dir,
            config.segment_size,
            warm=config.warm_segments,
            ahead=config.preallocate,
        )
        self.commit_log = CommitLog(config, self.allocator)
        self.queues = ConsumeQueueStore(config.consume_queue_dir, config.consume_queue_entries)
        self.group_commit = GroupCommitFlusher(self.commit_log)
        self.retention = RetentionService(self)
        self.dispatcher: Dispatcher
        self.recovery: RecoveryReport
        self._abandoned = False
        self._flush_all_lock = trio.Lock()
        """One flush_all at a time: they share checkpoint.tmp (the async flusher's and the
        shutdown's used to race: FileNotFoundError on the rename)."""

    @classmethod
    @asynccontextmanager
    async def open(cls, config: StoreConfig) -> AsyncIterator[MessageStore]:
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

    async def _recover(self) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = await trio.to_thread.run_sync(load_checkpoint, config.checkpoint_path)
        self.dispatcher, self.recovery = await recover(
            self.commit_log,
            self.queues,
            checkpoint.commit_log_flushed if checkpoint else None,
            checkpoint.consume_queue_flushed if checkpoint else None,
            clean=bool(checkpoint and checkpoint.clean),
        )
        # From here until a clean shutdown the checkpoint says "not clean".
        await self._save_checkpoint(clean=False)

    def _next_segment_base(self) -> int:
        last = self.commit_log.files.last
        return last.end if last is not None else self.commit_log.min_offset

    # ---- writing -----------------------------------------------------------------------

    async def put(self, message: Message) -> AppendResult:
        """Append one message and index it. Durability: see :meth:`wait_durable`."""
        result = await self.commit_log.append(message)
        await self.dispatcher.catch_up()
        return result

    async def put_batch(self, messages: Sequence[Message]) -> BatchAppendResult:
        """Append many messages in one pass (all or nothing) and index them."""
        result = await self.commit_log.append_batch(messages)
        await self.dispatcher.catch_up()
        return result

    async def append_replicated(self, offset: int, data: bytes | memoryview) -> int:
        """Append bytes replicated from the master at ``offset`` and index the whole records
        among them; return the log's new visible end (see :meth:`CommitLog.append_raw`).

        The dispatcher reads the same bytes the master's did, so the consume queues match
        the master's. On corrupt data the valid records before it are indexed too.
        """
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
        one kept, so the queues stay dense.
        """
        await self.dispatcher.catch_up()
        await self.commit_log.truncate(offset)
        self.group_commit.rewind(self.commit_log.flushed_offset)
        end = self.commit_log.max_offset
        await trio.to_thread.run_sync(self.queues.truncate_from_log_offset, end)
        self.dispatcher.offset = min(self.dispatcher.offset, end)
        self.commit_log.next_queue_offsets = {
            key: queue.max_offset for key, queue in self.queues.queues.items()
        }
        await self.flush_all()
        log.warning("store_truncated offset=%d", end)

    # ---- reading -----------------------------------------------------------------------

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
        """
        queue = self.queues.get(topic, queue_id)
        if queue is None:
            return GetResult([], queue_offset, 0, 0)
        records: list[tuple[int, StoredRecord]] = []
        total = 0
        next_offset = max(queue_offset, queue.min_offset)
        for index, offset, size, _tags in queue.entries(next_offset, max_messages):
            if (below_offset is not None and offset + size > below_offset) or (
                records and total + size > max_bytes
            ):
                break
            records.append((index, self.commit_log.read(offset)))
            total += size
            next_offset = index + 1
        return GetResult(records, next_offset, queue.min_offset, queue.max_offset)

    def read(self, offset: int) -> StoredRecord:
        return self.commit_log.read(offset)

    async def wait_for_arrival(self) -> None:
        """Return once new records were indexed (long polls re-check after it)."""
        await self.dispatcher.wait_for_arrival()

    # ---- durability and shutdown -------------------------------------------------------

    async def flush_all(self, *, clean: bool = False) -> None:
        """Flush the log and the queues, then record both in the checkpoint."""
        async with self._flush_all_lock:
            dispatched = self.dispatcher.offset
            log_flushed = await self.commit_log.flush()
            await trio.to_thread.run_sync(sync_segments, self.queues.dirty_segments())
            await self._save_checkpoint(clean=clean, queues_flushed=min(dispatched, log_flushed))

    async def _save_checkpoint(self, *, clean: bool, queues_flushed: int | None = None) -> None:
        log_flushed = self.commit_log.flushed_offset
        checkpoint = Checkpoint(
            commit_log_flushed=log_flushed,
            consume_queue_flushed=log_flushed if queues_flushed is None else queues_flushed,
            clean=clean,
        )
        await trio.to_thread.run_sync(save_checkpoint, self.config.checkpoint_path, checkpoint)

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
            "failure": str(commit_log.failure) if commit_log.failure else None,
        }
