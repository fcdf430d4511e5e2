"""A segment file deleted behind the store's back: noticed at runtime (writes stop, an
ERROR names the file) and at start (the store refuses, naming the file), unless
retention deleted it and recorded so."""

from __future__ import annotations

import logging
import re

import attrs
import pytest

from storage import Message, MessageStore, StorageFailedError, StoreConfig
from storage.checkpoint import load_checkpoint
from storage.errors import SegmentMissingError
from storage.mapped_file import segment_name


def quiet(config: StoreConfig) -> StoreConfig:
    return attrs.evolve(config, flush_interval_ms=10**7, flush_thorough_interval_ms=10**7)


def message(i: int) -> Message:
    return Message.create("t", f"body {i} ".encode() * 300, i % 2)


async def fill(store: MessageStore, count: int) -> None:
    for i in range(count):
        await store.put(message(i))


async def test_the_oldest_segment_deleted_while_running_stops_writes_and_the_next_start(
    store_config: StoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: nothing noticed, and after a restart the log silently began later."""
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        await fill(store, 80)
        await store.flush_all()
        assert len(store.commit_log.files.segments) >= 3
        oldest = store.commit_log.files.first
        assert oldest is not None
        oldest.path.unlink()
        with caplog.at_level(logging.ERROR), pytest.raises(StorageFailedError) as failed:
            await store.flush_all()
        assert f"{oldest.path} was deleted while in use" in str(failed.value)
        assert any(
            r.levelno == logging.ERROR and str(oldest.path) in r.getMessage()
            for r in caplog.records
        )
        with pytest.raises(StorageFailedError):
            await store.put(message(999))
        assert store.status()["failed"]
    with pytest.raises(SegmentMissingError, match=re.escape(str(oldest.path))):
        async with MessageStore.open(config):
            raise AssertionError("started without its oldest segment")


async def test_the_active_segment_deleted_while_running_is_never_acknowledged(
    store_config: StoreConfig,
) -> None:
    """Before: durable acks went on into the deleted file, and a restart lost them all."""
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        await fill(store, 40)
        await store.flush_all()  # the checkpoint names the active segment
        active = store.commit_log.files.last
        assert active is not None
        active.path.unlink()
        result = await store.put(message(1000))
        with pytest.raises(StorageFailedError, match=re.escape(f"{active.path} was deleted")):
            await store.wait_durable(result.end_offset, 30)
        with pytest.raises(StorageFailedError):
            await store.put(message(1001))
    with pytest.raises(SegmentMissingError, match=re.escape(str(active.path))):
        async with MessageStore.open(config):
            raise AssertionError("started without its active segment")


async def test_a_segment_cut_short_while_running_stops_writes(store_config: StoreConfig) -> None:
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        await fill(store, 10)
        active = store.commit_log.files.last
        assert active is not None
        result = await store.put(message(11))
        with open(active.path, "r+b") as f:
            f.truncate(active.size * 2)
        with pytest.raises(StorageFailedError, match="cut short"):
            await store.wait_durable(result.end_offset, 30)


async def test_segments_retention_deleted_are_no_loss(store_config: StoreConfig) -> None:
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        await fill(store, 80)
        deleted = await store.delete_oldest_segments(2)
        assert deleted == 2
        start = store.min_offset
    async with MessageStore.open(config) as store:
        assert store.min_offset == start
        checkpoint = load_checkpoint(config.checkpoint_path)
        assert checkpoint is not None and checkpoint.first_segment == start


async def test_a_kill_between_retentions_checkpoint_and_its_deletion_finishes_it(
    store_config: StoreConfig,
) -> None:
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        await fill(store, 80)
        second = store.commit_log.files.segments[1].base
        # What retention writes before it deletes, then a kill.
        await store._save_checkpoint(clean=False, first_segment=second)
        store.abandon()
    assert (config.commit_log_dir / segment_name(0)).exists()
    async with MessageStore.open(config) as store:
        assert store.min_offset == second
        assert not (config.commit_log_dir / segment_name(0)).exists()
