"""Retention: which old segments to delete, and the service that does it.

The decision is a pure function of ages and disk use, tested on its own; the
service only gathers those facts and applies the answer.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from storage.errors import StorageFailedError

if TYPE_CHECKING:
    from storage.store import MessageStore

log = logging.getLogger(__name__)


def segments_to_delete(
    ages_seconds: Sequence[float],
    *,
    retention_seconds: float,
    used_bytes: int,
    total_bytes: int,
    max_used_ratio: float,
    segment_size: int,
) -> int:
    """How many of the oldest segments to delete (``ages_seconds`` oldest first).

    Expired segments go first, in order; then, while the disk is fuller than
    ``max_used_ratio``, more of the oldest go. The last (active) segment never does.
    """
    deletable = max(0, len(ages_seconds) - 1)
    count = 0
    while count < deletable and ages_seconds[count] > retention_seconds:
        count += 1
    while (
        count < deletable
        and total_bytes
        and ((used_bytes - count * segment_size) / total_bytes > max_used_ratio)
    ):
        count += 1
    return count


class RetentionService:
    """Every ``retention_check_interval_ms``, delete what :func:`segments_to_delete` says."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store
        self.deleted = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        interval = self.store.config.retention_check_interval_ms / 1000
        while True:
            await trio.sleep(interval)
            try:
                await self.apply()
            except StorageFailedError:
                return  # logged where it failed; nothing is deleted from a failed store

    async def apply(self) -> int:
        config = self.store.config
        # A segment deleted behind the store's back fails it here, loudly, instead of
        # ending the node on a FileNotFoundError below.
        await self.store.commit_log.verify_files()
        files = self.store.commit_log.files
        paths = [segment.path for segment in files.segments]

        def facts() -> tuple[list[float], int, int]:
            now = time.time()
            ages = [now - os.stat(path).st_mtime for path in paths]
            usage = shutil.disk_usage(config.data_dir)
            return ages, usage.used, usage.total

        ages, used, total = await trio.to_thread.run_sync(facts)
        count = segments_to_delete(
            ages,
            retention_seconds=config.retention_hours * 3600,
            used_bytes=used,
            total_bytes=total,
            max_used_ratio=config.disk_max_used_ratio,
            segment_size=config.segment_size,
        )
        if not count:
            return 0
        deleted = await self.store.delete_oldest_segments(count)
        self.deleted += deleted
        log.info(
            "retention_deleted segments=%d log_min_offset=%d disk_used_ratio=%.3f",
            deleted,
            self.store.commit_log.min_offset,
            used / total if total else 0.0,
        )
        return deleted
