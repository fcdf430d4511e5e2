"""Recovery: from whatever is on disk to a log and queues that agree, before serving.

The rules (what recovery keeps) are:

1. The scan starts at the segment holding the checkpoint's flushed offset (no
   checkpoint: the first segment) and verifies every record's CRC from there.
2. The log ends at the first byte that is not a whole, valid record. Everything
   after it is cut: the rest of that segment is zeroed (stale bytes could
   otherwise pass for records once new ones are written before them) and later
   segments are deleted.
3. An end below the checkpoint's flushed offset means records acknowledged as
   durable were lost (disk corruption): logged as an error, never hidden.
4. Consume-queue entries for records at or past the checkpoint's queue-flushed
   offset are dropped and dispatched again; any disagreement (gap, other
   record, a queue that vanished) rebuilds every queue from the log.
5. A queue starts at its first entry that points into the log. Entries below the
   log's start (a retired queue's kept last entry, a queue's start marker) say where
   a queue stands when the log no longer can, and a rebuild keeps them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs
import trio

from storage.commit_log import CommitLog
from storage.consume_queue import ConsumeQueueStore, QueueConflictError, sync_segments
from storage.dispatcher import Dispatcher
from storage.mapped_file_queue import MappedFileQueue
from storage.record import ScanStop, check_record

log = logging.getLogger(__name__)


@attrs.frozen
class RecoveryReport:
    clean_shutdown: bool
    scanned_from: int
    log_end: int
    stop_reason: str
    records_checked: int
    durable_lost: bool
    queues_rebuilt: bool
    redispatched: int
    seconds: float


@attrs.frozen
class LogEnd:
    offset: int
    reason: str
    records_checked: int


def find_log_end(files: MappedFileQueue, start: int) -> LogEnd:
    """Scan forward from the start of the segment holding ``start``; where does valid data end?

    Marks every segment before the end as full. Pure over the maps: no I/O of its own.
    """
    segments = files.segments
    if not segments:
        return LogEnd(files.min_offset, "empty log", 0)
    first_index = max(0, min(len(segments) - 1, (start - segments[0].base) // files.segment_size))
    for segment in segments[:first_index]:  # before the checkpoint: whole, and on disk
        segment.wrote = segment.flushed = segment.size
    checked = 0
    for segment in segments[first_index:]:
        pos = 0
        while True:
            try:
                size = check_record(segment.view, pos, segment.base, segment.size)
            except ScanStop as stop:
                segment.wrote = pos
                return LogEnd(stop.offset, stop.reason, checked)
            if size < 0:  # the filler ends this segment
                segment.wrote = segment.flushed = segment.size
                break
            pos += size
            checked += 1
    return LogEnd(segments[-1].end, "end of the last segment", checked)


async def recover_commit_log(
    commit_log: CommitLog,
    start: int,
    cut_at: int | None = None,
    before_cut: Callable[[int], None] | None = None,
) -> LogEnd:
    """Load the segments, find the end, cut there and fsync what is kept. ``cut_at`` is
    an unfinished cut's offset: the log ends there at the latest. ``before_cut(end)``
    (blocking) runs before whole segments past the end are deleted."""
    files = commit_log.files
    await trio.to_thread.run_sync(files.load)
    end = await trio.to_thread.run_sync(find_log_end, files, start)
    if cut_at is not None and end.offset > cut_at:
        end = LogEnd(cut_at, "an unfinished cut", end.records_checked)
    last = files.last
    if (
        before_cut is not None
        and last is not None
        and last.base >= max(end.offset, files.min_offset + 1)
    ):
        await trio.to_thread.run_sync(before_cut, end.offset)
    await trio.to_thread.run_sync(files.truncate, end.offset)
    # Data that survived a process crash may still be only in the page cache: sync it
    # before the checkpoint claims it is on disk.
    kept = list(files.between(max(files.min_offset, start - files.segment_size), end.offset))
    await trio.to_thread.run_sync(sync_segments, kept)
    commit_log.flushed_offset = files.max_offset
    return end


async def recover_queues(
    commit_log: CommitLog, queues: ConsumeQueueStore, redispatch_from: int | None
) -> tuple[Dispatcher, bool, int]:
    """Make the consume queues match the log; return the dispatcher, whether queues were
    rebuilt from scratch, and how many entries were written."""
    await trio.to_thread.run_sync(queues.load)
    retired = _retired_queues(queues, commit_log.min_offset)
    rebuild = redispatch_from is None or (not queues.queues and commit_log.max_offset > 0)
    if redispatch_from is not None and not rebuild:
        start = min(redispatch_from, commit_log.max_offset)
        await trio.to_thread.run_sync(queues.truncate_from_log_offset, start)
        dispatcher = Dispatcher(commit_log, queues, max(start, commit_log.min_offset))
        try:
            count = await dispatcher.catch_up_strict()
        except QueueConflictError as conflict:
            log.warning("consume_queue_conflict error=%s action=rebuild_all", conflict)
            rebuild = True
    if rebuild:
        await trio.to_thread.run_sync(queues.delete_all)
        dispatcher = Dispatcher(commit_log, queues, commit_log.min_offset)
        count = await dispatcher.catch_up_strict()
        await _restore_retired(queues, retired)
    # Retention may have deleted log segments whose entries are still in the queues' first
    # files: without this, a reopened queue's min offset points below the log's start.
    await trio.to_thread.run_sync(queues.advance_min, commit_log.min_offset)
    await trio.to_thread.run_sync(sync_segments, queues.dirty_segments())
    commit_log.next_queue_offsets = {key: q.max_offset for key, q in queues.queues.items()}
    return dispatcher, rebuild, count


def _retired_queues(
    queues: ConsumeQueueStore, log_min_offset: int
) -> dict[tuple[str, int], tuple[int, tuple[int, int, int]]]:
    """Queues whose last entry points below the log's start: (topic, queue id) -> (queue
    offset of that entry, the entry). Retention deleted every record of them, or a cut
    removed every record after a start marker (docs/format.md). The log holds nothing of
    them, so a rebuild from the log alone would restart them at 0 and move consumers'
    offsets backwards."""
    retired = {}
    for key, queue in queues.queues.items():
        if queue.max_offset > queue.min_offset:
            last = queue.get(queue.max_offset - 1)
            if last[0] + last[1] <= log_min_offset:
                retired[key] = (queue.max_offset - 1, last)
    return retired


async def _restore_retired(
    queues: ConsumeQueueStore, retired: dict[tuple[str, int], tuple[int, tuple[int, int, int]]]
) -> None:
    """Put back the last entry of each retired queue the rebuild did not recreate: the
    queue then reopens empty at the offset after it (advance_min skips the entry)."""
    for (topic, queue_id), (queue_offset, (log_offset, size, tags)) in retired.items():
        if queues.get(topic, queue_id) is not None:
            continue  # it has records in the log: those carry its offsets
        queue = queues.get_or_create(topic, queue_id)
        await queue.add_file(queue_offset)
        queue.put(queue_offset, log_offset, size, tags)
        log.info(
            "consume_queue_kept_offset topic=%s queue=%d next_offset=%d reason=retention",
            topic,
            queue_id,
            queue_offset + 1,
        )


async def recover(
    commit_log: CommitLog,
    queues: ConsumeQueueStore,
    checkpoint_log: int | None,
    checkpoint_queues: int | None,
    clean: bool,
    cut_at: int | None = None,
    before_cut: Callable[[int], None] | None = None,
) -> tuple[Dispatcher, RecoveryReport]:
    """Run both recoveries; the checkpoint offsets are None when there is no checkpoint,
    ``cut_at`` is the offset of a cut a crash interrupted (the caller clamped the
    checkpoint offsets to it)."""
    started = time.perf_counter()
    start = checkpoint_log if checkpoint_log is not None else 0
    end = await recover_commit_log(commit_log, start, cut_at, before_cut)
    durable_lost = checkpoint_log is not None and end.offset < checkpoint_log
    if durable_lost:
        log.error(
            "durable_records_lost checkpoint_flushed=%d log_end=%d reason=%r: the disk lost or "
            "corrupted data that had been fsynced; restore this node from a replica",
            checkpoint_log,
            end.offset,
            end.reason,
        )
    elif clean and checkpoint_log is not None and end.offset != checkpoint_log:
        log.warning(
            "clean_checkpoint_mismatch checkpoint=%d log_end=%d", checkpoint_log, end.offset
        )
    dispatcher, rebuilt, count = await recover_queues(commit_log, queues, checkpoint_queues)
    report = RecoveryReport(
        clean_shutdown=clean,
        scanned_from=start,
        log_end=end.offset,
        stop_reason=end.reason,
        records_checked=end.records_checked,
        durable_lost=durable_lost,
        queues_rebuilt=rebuilt,
        redispatched=count,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "recovered clean=%s log_end=%d stop=%r checked=%d queues_rebuilt=%s redispatched=%d "
        "seconds=%.3f",
        clean,
        end.offset,
        end.reason,
        end.records_checked,
        rebuilt,
        count,
        report.seconds,
    )
    return dispatcher, report
