"""Cuts: truncation and restarting the log at an offset, each crash-safe at every step.

A "kill" here is :meth:`MessageStore.abandon` plus an exception at a cut step: nothing
more is flushed or checkpointed and the files are closed as a killed process leaves
them (bytes written through the maps are in the page cache). The real-process version
is in tests/e2e/test_crash.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import attrs
import pytest

from storage import Message, MessageStore, StoreConfig
from storage.cut import CutIntent, CutKind, load_cut_intent
from storage.mapped_file import MappedFile, segment_name
from storage.mapped_file_queue import MappedFileQueue
from tests.conftest import SMALL_SEGMENT
from tests.storage.test_raw_append import (
    MasterLog,
    assert_same,
    chunks,
    config_at,
    master_log,
    snapshot,
)
from tests.storage.test_recovery import assert_queues_agree_with_the_log, contents

CUT_STEPS = ["intent_saved", "log_cut", "queues_cut", "checkpoint_saved"]


class Killed(Exception):
    """Raised at a cut step to stop the store there, as a kill would."""


def kill_at(store: MessageStore, step: str) -> None:
    def hook(reached: str) -> None:
        if reached == step:
            store.abandon()
            raise Killed(step)

    store.after_cut_step = hook


def message(i: int) -> Message:
    return Message.create("t" if i % 3 else "u", f"body {i} ".encode() * 200, i % 2)


async def fill(store: MessageStore, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        await store.put(message(i))


def segment_files(config: StoreConfig) -> list[str]:
    """Segment files, without one the allocator is creating (``.tmp`` until renamed)."""
    return sorted(p.name for p in config.commit_log_dir.iterdir() if p.suffix != ".tmp")


def assert_only_the_segment_at(config: StoreConfig, start: int) -> None:
    """The log's one segment, and at most the allocator's next one prepared after it."""
    files = segment_files(config)
    assert files[:1] == [segment_name(start)]
    assert files[1:] in ([], [segment_name(start + config.segment_size)])


@pytest.fixture
def master_copy() -> MasterLog:
    """The master log test_raw_append replicates (built once per session)."""
    return master_log()


# ---- restarting the log at an offset (a slave's full resync) --------------------------


@pytest.mark.parametrize("segments_in", [0, 1, 5])
async def test_restart_log_at_leaves_an_empty_log_there_that_survives_a_restart(
    tmp_path: Path, segments_in: int
) -> None:
    config = config_at(tmp_path)
    start = segments_in * SMALL_SEGMENT
    async with MessageStore.open(config) as store:
        await fill(store, 60)  # about 2.5 segments
        await store.restart_log_at(start)
        assert store.min_offset == store.max_offset == start
        assert store.queues.queues == {}
        assert store.commit_log.next_queue_offsets == {}
        assert_only_the_segment_at(config, start)
        assert load_cut_intent(config.cut_intent_path) is None
    async with MessageStore.open(config) as store:
        assert store.min_offset == store.max_offset == start
        assert store.status()["segments"] == 1
        result = await store.put(message(0))
        assert (result.offset, result.queue_offset) == (start, 0)
    async with MessageStore.open(config) as store:
        assert [r[0] for r in contents(store)] == [start]
        assert_queues_agree_with_the_log(store)


async def test_restart_log_at_refuses_an_offset_off_a_segment_boundary(tmp_path: Path) -> None:
    config = config_at(tmp_path)
    async with MessageStore.open(config) as store:
        await fill(store, 5)
        before = contents(store)
        with pytest.raises(ValueError, match=r"segment_size 65536\), got 100"):
            await store.restart_log_at(100)
        assert contents(store) == before


async def test_full_resync_from_the_masters_second_segment_copies_it_byte_for_byte(
    tmp_path: Path, master_copy: MasterLog
) -> None:
    master = master_copy
    start = master.sent[1][0]
    config = config_at(tmp_path)
    async with MessageStore.open(config) as store:
        await fill(store, 30)  # a slave's own, unrelated history
        await store.restart_log_at(start)
    async with MessageStore.open(config) as store:  # the empty log at `start` survived
        sizes = itertools.cycle([5000, 17, 900])
        for offset, chunk in chunks(master, lambda: next(sizes), start):
            await store.append_replicated(offset, chunk)
        got = snapshot(store)
        want = master.snapshot
        assert got.segments == [s for s in want.segments if s[0] >= start]
        assert got.end == want.end
        for key, entries in got.queues.items():  # the master's entries from `start` on
            assert entries == [e for e in want.queues[key] if e[1] >= start], key
        assert got.next_queue_offsets == want.next_queue_offsets
    async with MessageStore.open(config) as store:
        assert snapshot(store).segments == got.segments
        assert_queues_agree_with_the_log(store)


async def test_a_restarted_log_from_zero_replicates_like_a_new_slave(
    tmp_path: Path, master_copy: MasterLog
) -> None:
    master = master_copy
    config = config_at(tmp_path)
    async with MessageStore.open(config) as store:
        await fill(store, 30)
        await store.restart_log_at(0)
        for offset, chunk in chunks(master, lambda: 3000, 0):
            await store.append_replicated(offset, chunk)
        assert_same(store, master)


@pytest.mark.parametrize("step", CUT_STEPS)
async def test_a_kill_at_any_step_of_a_log_restart_still_restarts_the_log(
    tmp_path: Path, step: str
) -> None:
    config = config_at(tmp_path)
    start = 7 * SMALL_SEGMENT
    async with MessageStore.open(config) as store:
        await fill(store, 80)
        await store.flush_all()
    with pytest.raises(BaseException) as caught:
        async with MessageStore.open(config) as store:
            kill_at(store, step)
            await store.restart_log_at(start)
    assert (
        caught.group_contains(Killed)
        if isinstance(caught.value, BaseExceptionGroup)
        else (isinstance(caught.value, Killed))
    )
    assert load_cut_intent(config.cut_intent_path) == CutIntent(CutKind.RESTART, start)
    async with MessageStore.open(config) as store:
        assert store.min_offset == store.max_offset == start
        assert store.queues.queues == {}
        assert_only_the_segment_at(config, start)
        result = await store.put(message(1))
        assert (result.offset, result.queue_offset) == (start, 0)
    assert load_cut_intent(config.cut_intent_path) is None


# ---- truncation ------------------------------------------------------------------------


async def build_log(
    config: StoreConfig, count: int = 200
) -> list[tuple[int, str, int, int, bytes]]:
    """A flushed log of several segments; returns its records."""
    async with MessageStore.open(config) as store:
        await fill(store, count)
        await store.flush_all()
        assert len(store.commit_log.files.segments) >= 5
        return contents(store)


def assert_cut_at(store: MessageStore, before: list, cut: int) -> None:
    assert store.max_offset == cut
    assert contents(store) == [r for r in before if r[0] < cut]
    assert_queues_agree_with_the_log(store)
    assert not store.recovery.durable_lost


@pytest.mark.parametrize("step", CUT_STEPS)
async def test_a_kill_at_any_step_of_a_truncation_still_cuts_there(
    tmp_path: Path, step: str
) -> None:
    config = config_at(tmp_path)
    before = await build_log(config)
    cut = before[len(before) // 4][0]  # in the second segment: three or more later ones go
    with pytest.raises(BaseException) as caught:
        async with MessageStore.open(config) as store:
            kill_at(store, step)
            await store.truncate(cut)
    assert (
        caught.group_contains(Killed)
        if isinstance(caught.value, BaseExceptionGroup)
        else (isinstance(caught.value, Killed))
    )
    async with MessageStore.open(config) as store:
        assert_cut_at(store, before, cut)
        result = await store.put(message(999))
        assert result.offset == cut
    assert load_cut_intent(config.cut_intent_path) is None


@pytest.mark.parametrize("deletions_done", [0, 1, 2])
async def test_a_kill_between_segment_deletions_of_a_truncation_leaves_no_gap(
    tmp_path: Path, deletions_done: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails on the old truncate (lowest first): the next start refused the gap."""
    config = config_at(tmp_path)
    before = await build_log(config)
    cut = before[len(before) // 4][0]
    store_ref: list[MessageStore] = []
    original_delete = MappedFile.delete
    deleted: list[str] = []

    def delete_then_die(segment: MappedFile) -> None:
        if len(deleted) == deletions_done and segment.path.parent == config.commit_log_dir:
            store_ref[0].abandon()
            raise Killed(f"after {deletions_done} deletions")
        original_delete(segment)
        deleted.append(segment.path.name)

    with pytest.raises(BaseException):  # noqa: B017 - trio wraps the Killed in a group
        async with MessageStore.open(attrs.evolve(config, preallocate=False)) as store:
            store_ref.append(store)
            monkeypatch.setattr(MappedFile, "delete", delete_then_die)
            await store.truncate(cut)
    monkeypatch.setattr(MappedFile, "delete", original_delete)
    assert len(deleted) == deletions_done
    async with MessageStore.open(config) as store:
        assert_cut_at(store, before, cut)


async def test_mapped_file_queue_truncate_deletes_last_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill after the first deletion of a bare MappedFileQueue.truncate (consume queues
    use it with no intent file) leaves a contiguous, loadable queue of files."""
    files = MappedFileQueue(tmp_path / "q", 4096)
    files.load()
    for base in range(0, 5 * 4096, 4096):
        files.append(MappedFile.create(files.directory, base, 4096, warm=False))
    original_delete = MappedFile.delete
    calls: list[int] = []

    def delete_once_then_die(segment: MappedFile) -> None:
        if calls:
            raise Killed("second deletion")
        calls.append(segment.base)
        original_delete(segment)

    monkeypatch.setattr(MappedFile, "delete", delete_once_then_die)
    with pytest.raises(Killed):
        files.truncate(4096 + 10)
    monkeypatch.setattr(MappedFile, "delete", original_delete)
    assert calls == [4 * 4096]
    files.close()
    reopened = MappedFileQueue(tmp_path / "q", 4096)
    reopened.load()
    assert [s.base for s in reopened.segments] == [0, 4096, 2 * 4096, 3 * 4096]
    reopened.close()
