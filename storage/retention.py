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
from typing import Protocol

import trio

from storage.commit_log import CommitLog
from storage.config import StoreConfig
from storage.errors import DiskFullError, StorageFailedError

log = logging.getLogger(__name__)


def segments_to_delete(
    ages_seconds: Sequence[float],
    *,
    retention_seconds: float,
    used_bytes: int,
    total_bytes: int,
    max_used_ratio: float,
    segment_size: int,
    delete_unexpired: bool,
) -> int:
    """How many of the oldest segments to delete (``ages_seconds`` oldest first).

    Expired segments go first, in order; then, only with ``delete_unexpired``, while
    the disk is fuller than ``max_used_ratio``, more of the oldest go. The last
    (active) segment never does.
    """
    deletable = max(0, len(ages_seconds) - 1)
    count = 0
    while count < deletable and ages_seconds[count] > retention_seconds:
        count += 1
    while (
        delete_unexpired
        and count < deletable
        and over_ratio(used_bytes - count * segment_size, total_bytes, max_used_ratio)
    ):
        count += 1
    return count


def over_ratio(used_bytes: int, total_bytes: int, max_used_ratio: float) -> bool:
    """Whether a disk with these figures is fuller than allowed (unknown figures: no)."""
    return bool(total_bytes) and used_bytes / total_bytes > max_used_ratio


class RetentionStore(Protocol):
    """What retention needs of the store (a Protocol: ``storage.store`` imports this
    module, never the other way round)."""

    config: StoreConfig
    commit_log: CommitLog

    async def delete_oldest_segments(self, count: int) -> int: ...


class RetentionService:
    """Every ``retention_check_interval_ms``, delete what :func:`segments_to_delete` says."""

    def __init__(self, store: RetentionStore) -> None:
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
        """One round: delete what the decision says, then refuse or resume writes by
        what the disk holds afterwards."""
        store = self.store
        config = store.config
        # A segment deleted behind the store's back fails it here, loudly, instead of
        # ending the node on a FileNotFoundError below.
        await store.commit_log.verify_files()
        paths = [segment.path for segment in store.commit_log.files.segments]

        def facts() -> tuple[list[float], int, int]:
            now = time.time()
            ages = [now - os.stat(path).st_mtime for path in paths]
            usage = shutil.disk_usage(config.data_dir)
            return ages, usage.used, usage.total

        ages, used, total = await trio.to_thread.run_sync(facts)
        retention_seconds = config.retention_hours * 3600
        count = segments_to_delete(
            ages,
            retention_seconds=retention_seconds,
            used_bytes=used,
            total_bytes=total,
            max_used_ratio=config.disk_max_used_ratio,
            segment_size=config.segment_size,
            delete_unexpired=config.delete_unexpired_under_pressure,
        )
        deleted = await store.delete_oldest_segments(count) if count else 0
        self.deleted += deleted
        unexpired = [
            str(p)
            for p, age in zip(paths[:deleted], ages, strict=False)
            if age <= retention_seconds
        ]
        if unexpired:
            log.warning(
                "retention_deleted_unexpired segments=%s reason=disk_pressure "
                "disk_used_ratio=%.3f max_used_ratio=%.3f",
                ",".join(unexpired),
                used / total,
                config.disk_max_used_ratio,
            )
        if deleted:
            log.info(
                "retention_deleted segments=%d log_min_offset=%d disk_used_ratio=%.3f",
                deleted,
                store.commit_log.min_offset,
                used / total if total else 0.0,
            )
        self._refuse_or_resume(used - deleted * config.segment_size, total)
        return deleted

    def _refuse_or_resume(self, used: int, total: int) -> None:
        commit_log = self.store.commit_log
        ratio = self.store.config.disk_max_used_ratio
        if over_ratio(used, total, ratio):
            if commit_log.disk_full is None:
                commit_log.disk_full = DiskFullError(
                    f"the disk of {self.store.config.data_dir} is {used / total:.1%} full, "
                    f"above disk_max_used_ratio {ratio}: writes are refused until space is "
                    "freed (retention deletes only expired data; "
                    "delete_unexpired_under_pressure deletes older data instead)"
                )
                log.error(
                    "disk_full action=refuse_writes disk_used_ratio=%.3f max_used_ratio=%.3f",
                    used / total,
                    ratio,
                )
        elif commit_log.disk_full is not None:
            commit_log.disk_full = None
            log.warning("disk_full_cleared action=accept_writes disk_used_ratio=%.3f", used / total)
