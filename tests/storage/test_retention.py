"""Retention: the decision (a pure function of segment ages and disk use) and the
service on a real store (a full disk refuses writes unless configured to delete)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from storage import DiskFullError, Message, MessageStore, StoreConfig, sync_log
from storage.checkpoint import load_checkpoint
from storage.retention import segments_to_delete
from storage.sync_log import SyncLog
from tools.faults.disk import apply_power_loss, read_sync_log

SEGMENT = 1 << 20
RETENTION = 3600.0

ages_st = st.lists(st.floats(0, 10 * RETENTION, allow_nan=False), max_size=12)
"""Ages of the segments, oldest first (not necessarily sorted: mtimes can be touched)."""
disk_st = st.tuples(st.integers(0, 64 * SEGMENT), st.integers(0, 64 * SEGMENT))
ratio_st = st.floats(0.05, 1.0)


def decide(ages: list[float], used: int, total: int, ratio: float) -> int:
    return segments_to_delete(
        ages,
        retention_seconds=RETENTION,
        used_bytes=used,
        total_bytes=total,
        max_used_ratio=ratio,
        segment_size=SEGMENT,
        delete_unexpired=True,
    )


def expired_prefix(ages: list[float]) -> int:
    count = 0
    while count < len(ages) - 1 and ages[count] > RETENTION:
        count += 1
    return count


def over(used: int, total: int, ratio: float, deleted: int) -> bool:
    """Is the disk still fuller than allowed once ``deleted`` segments are gone?"""
    return total > 0 and (used - deleted * SEGMENT) / total > ratio


@given(ages_st, disk_st, ratio_st)
def test_never_deletes_the_last_segment(
    ages: list[float], disk: tuple[int, int], ratio: float
) -> None:
    used, total = disk
    count = decide(ages, used, total, ratio)
    assert 0 <= count <= max(0, len(ages) - 1)


@given(ages_st, disk_st, ratio_st)
def test_deletes_the_expired_prefix_and_only_more_when_over_the_ratio(
    ages: list[float], disk: tuple[int, int], ratio: float
) -> None:
    used, total = disk
    count = decide(ages, used, total, ratio)
    prefix = expired_prefix(ages)
    assert count >= prefix
    if count > prefix:  # each extra deletion was needed to get under the ratio
        assert over(used, total, ratio, count - 1)
    if count < len(ages) - 1:  # it stopped because the disk is under the ratio now
        assert not over(used, total, ratio, count)


@given(ages_st)
def test_with_room_on_disk_exactly_the_expired_prefix_goes(ages: list[float]) -> None:
    assert decide(ages, used=SEGMENT, total=100 * SEGMENT, ratio=0.9) == expired_prefix(ages)
    assert decide(ages, used=10**15, total=0, ratio=0.5) == expired_prefix(ages)  # no figures


@given(st.integers(2, 12), st.integers(1, 200), ratio_st)
def test_over_the_ratio_young_segments_go_until_under_it(
    segments: int, used_segments: int, ratio: float
) -> None:
    total = 100 * SEGMENT
    used = used_segments * SEGMENT
    count = decide([0.0] * segments, used, total, ratio)
    expected = 0
    while expected < segments - 1 and over(used, total, ratio, expected):
        expected += 1
    assert count == expected
    if used / total > ratio:
        assert count >= 1


@given(ages_st, st.data(), disk_st, ratio_st)
def test_monotone_in_age(
    ages: list[float], data: st.DataObject, disk: tuple[int, int], ratio: float
) -> None:
    older = [
        age + data.draw(st.floats(0, 5 * RETENTION), label=f"older{i}")
        for i, age in enumerate(ages)
    ]
    used, total = disk
    assert decide(older, used, total, ratio) >= decide(ages, used, total, ratio)


@given(ages_st, disk_st, st.integers(0, 10 * SEGMENT), ratio_st)
def test_monotone_in_disk_use(
    ages: list[float], disk: tuple[int, int], more: int, ratio: float
) -> None:
    used, total = disk
    assume(total > 0)
    assert decide(ages, used + more, total, ratio) >= decide(ages, used, total, ratio)


def test_examples() -> None:
    hour = RETENTION
    assert decide([], 0, 0, 0.9) == 0
    assert decide([5 * hour], 0, 0, 0.9) == 0  # the only (active) segment stays
    assert decide([5 * hour, 4 * hour, 0.5 * hour, 6 * hour], 0, 100, 0.9) == 2
    assert decide([5 * hour, 0.1, 6 * hour, 7 * hour], 0, 100, 0.9) == 1  # prefix only
    assert decide([0.0] * 5, 95 * SEGMENT, 100 * SEGMENT, 0.9) == 4  # capped: one stays
    assert decide([0.0] * 10, 95 * SEGMENT, 100 * SEGMENT, 0.9) == 5
    assert decide([hour + 1, 0.0, 0.0], 50, 100, 0.9) == 1


@given(ages_st, disk_st, ratio_st)
def test_without_delete_unexpired_only_the_expired_prefix_goes_however_full(
    ages: list[float], disk: tuple[int, int], ratio: float
) -> None:
    used, total = disk
    count = segments_to_delete(
        ages,
        retention_seconds=RETENTION,
        used_bytes=used,
        total_bytes=total,
        max_used_ratio=ratio,
        segment_size=SEGMENT,
        delete_unexpired=False,
    )
    assert count == expired_prefix(ages)


# ---- the service on a real disk --------------------------------------------------------------


def full_disk(config: StoreConfig, **changes: Any) -> StoreConfig:
    """A watermark any real disk is above, and no background rounds (the test runs them)."""
    return attrs.evolve(
        config,
        disk_max_used_ratio=1e-9,
        retention_check_interval_ms=10**7,
        flush_interval_ms=10**7,
        flush_thorough_interval_ms=10**7,
        **changes,
    )


async def fill(store: MessageStore, count: int) -> list[int]:
    return [(await store.put(Message.create("t", b"x" * 3000, 0))).offset for _ in range(count)]


async def test_a_full_disk_refuses_writes_and_deletes_nothing_unexpired_by_default(
    store_config: StoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: retention deleted acked, unexpired data at the watermark, logged at INFO."""
    config = full_disk(store_config)
    async with MessageStore.open(config) as store:
        offsets = await fill(store, 80)
        segments = [s.path for s in store.commit_log.files.segments]
        assert len(segments) >= 3
        with caplog.at_level(logging.INFO):
            assert await store.retention.apply() == 0
        assert [s.path for s in store.commit_log.files.segments] == segments
        assert store.read(offsets[0]).physical_offset == offsets[0]
        assert any(
            r.levelno == logging.ERROR and "disk_full action=refuse_writes" in r.getMessage()
            for r in caplog.records
        )
        with pytest.raises(DiskFullError, match="above disk_max_used_ratio"):
            await store.put(Message.create("t", b"refused", 0))
        with pytest.raises(DiskFullError):
            await store.put_batch([Message.create("t", b"refused", 0)])
        assert store.status()["disk_full"]
        assert store.max_offset == offsets[-1] + store.read(offsets[-1]).size
        store.config = attrs.evolve(config, disk_max_used_ratio=1.0)  # space was freed
        await store.retention.apply()
        assert not store.status()["disk_full"]
        await store.put(Message.create("t", b"accepted again", 0))


async def test_forced_deletion_under_pressure_only_when_configured_and_logged(
    store_config: StoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = full_disk(store_config, delete_unexpired_under_pressure=True)
    async with MessageStore.open(config) as store:
        await fill(store, 80)
        segments = [s.path for s in store.commit_log.files.segments]
        with caplog.at_level(logging.WARNING):
            deleted = await store.retention.apply()
        assert deleted == len(segments) - 1  # all but the active one
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "retention_deleted_unexpired" in r.getMessage()
        ]
        assert len(warnings) == 1
        assert all(str(path) in warnings[0] for path in segments[:-1])
        assert store.min_offset == store.commit_log.files.segments[0].base


# ---- retention's checkpoint and a power loss --------------------------------------------------


async def test_a_power_loss_after_retention_keeps_every_queue_entry_its_checkpoint_trusts(
    store_config: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention writes a checkpoint (naming the new first segment) that also says the
    consume queues are on disk up to the dispatched records: recovery then trusts every
    entry below that and re-dispatches nothing there. Fails on the old code: the queue
    files were never fsynced before that checkpoint, so a power loss right after it
    dropped entries recovery trusted (a queue with no later record came back short,
    its next message reusing queue offsets already handed out)."""
    recorded = SyncLog(tmp_path / "sync.jsonl")
    monkeypatch.setattr(sync_log, "ACTIVE", recorded)
    config = attrs.evolve(
        store_config, flush_interval_ms=10**7, flush_thorough_interval_ms=10**7, preallocate=False
    )
    async with MessageStore.open(config) as store:
        for _ in range(40):  # a queue that takes no more records after these
            await store.put(Message.create("early", b"e" * 3000, 0))
        for _ in range(60):
            await store.put(Message.create("late", b"l" * 3000, 0))
        await store.commit_log.flush()  # the log is durable: only the queues are not
        assert await store.delete_oldest_segments(1) == 1
        survived = consume_entries(store)
        store.abandon()
    recorded.close()
    monkeypatch.setattr(sync_log, "ACTIVE", None)
    checkpoint = load_checkpoint(config.checkpoint_path)
    assert checkpoint is not None and not checkpoint.clean
    assert checkpoint.consume_queue_flushed == checkpoint.commit_log_flushed  # all trusted

    syncs = read_sync_log(recorded.path, config.data_dir)
    pristine = tmp_path / "pristine"
    shutil.copytree(config.data_dir, pristine)
    for seed in range(6):  # each a power loss that keeps some unsynced pages, drops others
        shutil.rmtree(config.data_dir)
        shutil.copytree(pristine, config.data_dir)
        apply_power_loss(config.data_dir, syncs, seed=seed, drop_unrecorded=True)
        async with MessageStore.open(config) as store:
            assert not store.recovery.durable_lost
            assert consume_entries(store) == survived, f"seed {seed}"
            store.abandon()


def consume_entries(store: MessageStore) -> dict[tuple[str, int], tuple[int, int, list[Any]]]:
    """Every queue: (min, max, entries)."""
    return {
        key: (queue.min_offset, queue.max_offset, list(queue.entries(0, 1 << 30)))
        for key, queue in store.queues.queues.items()
    }
