"""Group commit's fast path: the fdatasync starts from the call that asks for it and its
end wakes the acknowledged writes from a loop callback. Whatever the path, no durable
wait is answered before the fdatasync covering its bytes has returned."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from storage import Message, MessageStore, StorageFailedError, StoreConfig
from storage.mapped_file import MappedFile


def quiet_config(path: Path) -> StoreConfig:
    """No periodic flush within a test: every fdatasync here is group commit's."""
    return StoreConfig(
        data_dir=path,
        segment_size=1024 * 1024,
        max_message_size=16 * 1024,
        consume_queue_entries=64,
        flush_interval_ms=3_600_000,
        flush_thorough_interval_ms=3_600_000,
        retention_check_interval_ms=3_600_000,
    )


@attrs.define
class SyncGate:
    """Holds every segment fdatasync until :meth:`open` (the real call follows), and
    counts them; ``error`` makes the held ones fail instead (a failing disk)."""

    entered: threading.Event = attrs.field(factory=threading.Event)
    released: threading.Event = attrs.field(factory=threading.Event)
    syncs: int = 0
    error: int | None = None

    def open(self) -> None:
        self.released.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncGate]:
    gate = SyncGate()
    real_sync = MappedFile.sync

    def held_sync(segment: MappedFile) -> None:
        gate.syncs += 1
        gate.entered.set()
        if not gate.released.wait(timeout=30):
            raise AssertionError("the test never released the held fdatasync")
        if gate.error is not None:
            raise OSError(gate.error, "injected by the test")
        real_sync(segment)

    monkeypatch.setattr(MappedFile, "sync", held_sync)
    try:
        yield gate
    finally:
        gate.open()  # never leave the store's sync thread waiting


async def test_flush_now_starts_the_fdatasync_before_the_loop_runs_again(
    tmp_path: Path, gate: SyncGate
) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        result = await store.put(Message.create("t", b"now", 0))
        store.group_commit.flush_now()
        # Blocking the loop on purpose: no task (no flusher) may run before the fsync begins.
        assert gate.entered.wait(timeout=30)
        gate.open()
        assert await store.wait_durable(result.end_offset, 30)
        assert gate.syncs == 1


async def test_no_durable_answer_before_its_fdatasync_returns(
    tmp_path: Path, gate: SyncGate
) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        result = await store.put(Message.create("t", b"held", 0))
        answers: list[bool] = []

        async def wait() -> None:
            answers.append(await store.wait_durable(result.end_offset, 30))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.to_thread.run_sync(gate.entered.wait, 30)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []  # the fdatasync is held: no answer yet
            assert store.commit_log.flushed_offset < result.end_offset
            gate.open()
        assert answers == [True]
        assert store.commit_log.flushed_offset >= result.end_offset


async def test_writes_during_an_fdatasync_share_the_next_one(
    tmp_path: Path, gate: SyncGate
) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        first = await store.put(Message.create("t", b"first", 0))
        answers: dict[str, bool] = {}

        async def wait(name: str, end_offset: int) -> None:
            answers[name] = await store.wait_durable(end_offset, 30)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "first", first.end_offset)
            await trio.to_thread.run_sync(gate.entered.wait, 30)
            later = [await store.put(Message.create("t", b"later", 0)) for _ in range(3)]
            for index, result in enumerate(later):
                nursery.start_soon(wait, f"later{index}", result.end_offset)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == {}  # the first fsync is held; the later writes wait behind it
            gate.open()
        assert answers == dict.fromkeys(["first", "later0", "later1", "later2"], True)
        assert gate.syncs == 2  # one for the first write, one for the three that came during it
        assert store.commit_log.flushed_offset == later[-1].end_offset


async def test_a_cut_waits_for_the_fdatasync_in_flight(tmp_path: Path, gate: SyncGate) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        kept = await store.put(Message.create("t", b"kept", 0))
        await store.put(Message.create("t", b"cut", 0))
        store.group_commit.flush_now()
        await trio.to_thread.run_sync(gate.entered.wait, 30)
        cut_done = trio.Event()

        async def cut() -> None:
            await store.truncate(kept.end_offset)
            cut_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut)
            await trio.testing.wait_all_tasks_blocked()
            assert not cut_done.is_set()  # the fdatasync it would race still runs
            gate.open()
        assert store.commit_log.max_offset == kept.end_offset
        assert store.commit_log.flushed_offset <= kept.end_offset


async def test_a_failed_fdatasync_answers_no_waiter_and_none_later(
    tmp_path: Path, gate: SyncGate
) -> None:
    async with MessageStore.open(quiet_config(tmp_path)) as store:
        result = await store.put(Message.create("t", b"lost", 0))
        gate.error = errno.EIO
        gate.open()
        with pytest.raises(StorageFailedError, match="fdatasync of the commit log failed"):
            await store.wait_durable(result.end_offset, 30)
        assert store.commit_log.flushed_offset < result.end_offset
        with pytest.raises(StorageFailedError):
            await store.wait_durable(result.end_offset, 30)
        store.group_commit.flush_now()  # a failed log starts no fdatasync again
        await trio.testing.wait_all_tasks_blocked()
        assert gate.syncs == 1
