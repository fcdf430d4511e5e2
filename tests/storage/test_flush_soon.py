"""Group commit started ahead of its waiter (``GroupCommitFlusher.flush_soon``): an
``acks=replicated`` write gets its fsync going beside the slaves' round trip."""

from __future__ import annotations

from pathlib import Path

import attrs
import trio
import trio.testing

from storage import Message, MessageStore, StoreConfig
from tests.replication.test_ha_stream import config_at


def quiet_config(path: Path) -> StoreConfig:
    """No periodic flush within a test: every fsync counted here is group commit's."""
    return attrs.evolve(
        config_at(path), flush_interval_ms=3_600_000, flush_thorough_interval_ms=3_600_000
    )


async def test_flush_soon_fsyncs_what_is_written_with_no_waiter(tmp_path: Path) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        result = await store.put(Message.create("t", b"soon", 0))
        assert store.commit_log.flushed_offset < result.end_offset
        store.group_commit.flush_soon()
        await trio.testing.wait_all_tasks_blocked()  # the flusher is in its fsync now
        await store.commit_log.flush()  # returns once that fsync is done: none of its own
        assert store.group_commit.fsyncs == 1
        assert store.commit_log.flushed_offset >= result.end_offset
        assert await store.wait_durable(result.end_offset, 10)  # answered at once


async def test_flush_soon_with_nothing_written_fsyncs_nothing(tmp_path: Path) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        result = await store.put(Message.create("t", b"x", 0))
        assert await store.wait_durable(result.end_offset, 10)
        fsyncs = store.group_commit.fsyncs
        for _ in range(3):
            store.group_commit.flush_soon()
        await trio.testing.wait_all_tasks_blocked()
        assert store.group_commit.fsyncs == fsyncs
