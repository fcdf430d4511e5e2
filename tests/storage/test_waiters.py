"""OffsetWaiters against a model, and the group-commit flusher: coverage, deadlines, failures."""

from __future__ import annotations

import errno
import math
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from storage import Message, MessageStore, StorageFailedError, StoreConfig
from storage.allocator import SegmentAllocator
from storage.checkpoint import load_checkpoint
from storage.commit_log import CommitLog
from storage.flush import GroupCommitFlusher
from storage.waiters import OffsetWaiters

WAITERS = 50


def quiet(config: StoreConfig) -> StoreConfig:
    """No background flushes: only the flush under test touches the disk."""
    return attrs.evolve(config, flush_interval_ms=10**7, flush_thorough_interval_ms=10**7)


@asynccontextmanager
async def open_log(config: StoreConfig) -> AsyncIterator[CommitLog]:
    """A bare CommitLog on real files (segments created on demand, no services)."""
    allocator = SegmentAllocator(
        config.commit_log_dir, config.segment_size, warm=False, ahead=False
    )
    log = CommitLog(config, allocator)
    await trio.to_thread.run_sync(log.files.load)
    try:
        yield log
    finally:
        log.close()


class FdatasyncSpy:
    """Wraps the real ``os.fdatasync``: counts calls, can hold them at a gate or fail them."""

    def __init__(self, real: Callable[[int], None]) -> None:
        self.real = real
        self.calls = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        """Set once a call is in progress (it may then be held at the gate)."""
        self.fail_calls: set[int] = set()
        """1-based numbers of the calls that raise EIO."""
        self.fail_all = False

    def __call__(self, fd: int) -> None:
        self.calls += 1
        number = self.calls
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=60)
        if self.fail_all or number in self.fail_calls:
            raise OSError(errno.EIO, "Input/output error (injected)")
        self.real(fd)


@pytest.fixture
def fdatasync(monkeypatch: pytest.MonkeyPatch) -> FdatasyncSpy:
    spy = FdatasyncSpy(os.fdatasync)
    monkeypatch.setattr("storage.mapped_file.os.fdatasync", spy)
    return spy


# ---- OffsetWaiters against a model -----------------------------------------------------

Op = tuple[str, int, int | None]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.integers(-2, 25), st.none() | st.integers(0, 10)),
        st.tuples(st.just("advance"), st.integers(-2, 25), st.none()),
        st.tuples(st.just("cancel"), st.integers(0, 50), st.none()),
        st.tuples(st.just("expire"), st.integers(0, 10), st.none()),
    ),
    max_size=40,
)
"""("wait", offset, deadline or None), ("advance", position, _), ("cancel", which, _),
("expire", now, _): expire is what the timer task calls when a deadline passes."""


async def run_model(ops: list[Op], factory: type[OffsetWaiters] = OffsetWaiters) -> None:
    """Apply ``ops`` to real waiters (each wait in its own task) and to a simple model:
    after every step, which waiters returned True, returned False (deadline), were
    cancelled or still wait must match, and so must the counters."""
    waiters = factory()
    position = -1
    offsets: list[int] = []
    deadlines: list[float] = []
    scopes: list[trio.CancelScope] = []
    actual: list[str] = []
    model: list[str] = []

    async def waiter(index: int, offset: int, deadline: float, scope: trio.CancelScope) -> None:
        with scope:
            reached = await waiters.wait(offset, deadline)
            actual[index] = "woken" if reached else "expired"
            return
        actual[index] = "cancelled"

    async with trio.open_nursery() as nursery:
        for op, arg, deadline in ops:
            if op == "wait":
                scope = trio.CancelScope()
                offsets.append(arg)
                deadlines.append(math.inf if deadline is None else deadline)
                scopes.append(scope)
                actual.append("pending")
                model.append("woken" if arg <= position else "pending")
                nursery.start_soon(waiter, len(offsets) - 1, arg, deadlines[-1], scope)
            elif op == "advance":
                released = [i for i, s in enumerate(model) if s == "pending" and offsets[i] <= arg]
                woken = waiters.advance(arg)
                if arg > position:
                    position = arg
                    for i in released:
                        model[i] = "woken"
                    assert woken == len(released)
                else:
                    assert woken == 0
            elif op == "expire":
                late = [i for i, s in enumerate(model) if s == "pending" and deadlines[i] <= arg]
                assert waiters.expire(arg) == len(late)
                for i in late:
                    model[i] = "expired"
            elif scopes:
                index = arg % len(scopes)
                scopes[index].cancel()
                if model[index] == "pending":
                    model[index] = "cancelled"
            await trio.testing.wait_all_tasks_blocked()

            assert actual == model
            pending = [offsets[i] for i, s in enumerate(model) if s == "pending"]
            assert len(waiters) == len(pending)
            assert waiters.pending_min == (min(pending) if pending else None)
            assert waiters.position == position
        nursery.cancel_scope.cancel()


@given(OPS)
def test_waiters_release_exactly_what_the_position_reaches(ops: list[Op]) -> None:
    trio.run(run_model, ops)


class OffByOne(OffsetWaiters):
    """A broken variant: releases only the waiters strictly below the new position."""

    def advance(self, position: int) -> int:
        woken = super().advance(position - 1)
        self._position = max(self._position, position)
        return woken


async def test_waiters_model_catches_an_off_by_one() -> None:
    """The model check is able to fail: it rejects a variant that wakes one offset late."""
    ops: list[Op] = [
        ("wait", 3, None),
        ("advance", 2, None),
        ("cancel", 5, None),
        ("wait", 1, 4),
        ("advance", 5, None),
    ]
    await run_model(ops)
    await run_model(ops, OffByOne)  # nothing sits exactly at a position here
    with pytest.raises(ExceptionGroup) as failed:  # raised inside the model's nursery
        await run_model([("wait", 3, None), ("advance", 3, None)], OffByOne)
    assert failed.group_contains(AssertionError)


async def test_cancelled_waiter_is_not_woken() -> None:
    waiters = OffsetWaiters()
    outcomes: dict[str, str] = {}

    async def wait(name: str, offset: int, scope: trio.CancelScope) -> None:
        with scope:
            await waiters.wait(offset)
            outcomes[name] = "woken"
            return
        outcomes[name] = "cancelled"

    keep, drop = trio.CancelScope(), trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "keep", 5, keep)
        nursery.start_soon(wait, "drop", 5, drop)
        await trio.testing.wait_all_tasks_blocked()
        assert len(waiters) == 2
        drop.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == {"drop": "cancelled"}
        assert len(waiters) == 1
        assert waiters.advance(5) == 1  # only the live one counts
    assert outcomes == {"drop": "cancelled", "keep": "woken"}


async def test_fail_wakes_everyone_and_later_waiters_get_it_at_once() -> None:
    waiters = OffsetWaiters()
    waiters.advance(10)
    error = StorageFailedError("fdatasync failed (injected)")
    got: dict[int, BaseException | str] = {}

    async def wait(offset: int, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await waiters.wait(offset)
            except StorageFailedError as exc:
                got[offset] = exc
                return
            got[offset] = "woken"
            return
        got[offset] = "cancelled"

    cancelled = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        for offset in (11, 12, 20, 30):
            nursery.start_soon(wait, offset, trio.CancelScope())
        nursery.start_soon(wait, 25, cancelled)
        await trio.testing.wait_all_tasks_blocked()
        cancelled.cancel()
        await trio.testing.wait_all_tasks_blocked()
        waiters.fail(error)
    assert got == {11: error, 12: error, 20: error, 30: error, 25: "cancelled"}
    assert len(waiters) == 0 and waiters.pending_min is None

    for offset in (0, 10, 11, 1000):  # even offsets already reached
        with pytest.raises(StorageFailedError) as raised:
            await waiters.wait(offset)
        assert raised.value is error
    assert waiters.advance(2000) == 0


async def test_wait_below_the_position_returns_at_once() -> None:
    waiters = OffsetWaiters()
    assert waiters.position == -1
    assert waiters.advance(7) == 0
    assert waiters.advance(3) == 0  # the position never moves back
    assert waiters.position == 7
    with trio.testing.assert_checkpoints():
        await waiters.wait(7)
    assert len(waiters) == 0


# ---- group commit --------------------------------------------------------------------


async def test_one_fsync_covers_every_waiter_that_arrived_before_it(
    store_config: StoreConfig, fdatasync: FdatasyncSpy
) -> None:
    async with open_log(store_config) as log:
        ends = [
            (await log.append(Message.create("t", b"x" * 100))).end_offset for _ in range(WAITERS)
        ]
        flusher = GroupCommitFlusher(log)
        answers: list[bool] = []

        async def waiter(end: int) -> None:
            answers.append(await flusher.wait_durable(end, trio.current_time() + 60))

        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as waiting:
                for end in ends:
                    waiting.start_soon(waiter, end)
                await trio.testing.wait_all_tasks_blocked()
                assert len(answers) == 0  # all parked: nobody flushes yet
                await nursery.start(flusher.run)
            nursery.cancel_scope.cancel()

        assert answers == [True] * WAITERS
        assert flusher.fsyncs == log.flush_count == 1 < WAITERS
        assert fdatasync.calls == 1  # one segment, one fdatasync
        assert log.flushed_offset == ends[-1]
        assert await flusher.wait_durable(ends[0], trio.current_time() - 1)  # already durable


async def test_concurrent_producers_share_fsyncs(
    store_config: StoreConfig, fdatasync: FdatasyncSpy
) -> None:
    async with MessageStore.open(quiet(store_config)) as store:
        await store.put(Message.create("t", b"warm-up"))  # the segment and queue file exist
        fsyncs_before = store.group_commit.fsyncs
        flushes_before = store.commit_log.flush_count
        answers: list[bool] = []

        async def producer(i: int) -> None:
            result = await store.put(Message.create("t", f"message {i}".encode(), i % 4))
            answers.append(await store.wait_durable(result.end_offset, 60))

        async with trio.open_nursery() as nursery:
            for i in range(WAITERS):
                nursery.start_soon(producer, i)

        assert answers == [True] * WAITERS
        fsyncs = store.group_commit.fsyncs - fsyncs_before
        flushes = store.commit_log.flush_count - flushes_before
        assert 1 <= flushes <= fsyncs < WAITERS
        assert store.commit_log.flushed_offset == store.commit_log.max_offset


async def test_deadline_gives_false_at_the_deadline(
    store_config: StoreConfig, fdatasync: FdatasyncSpy, autojump_clock: trio.testing.MockClock
) -> None:
    fdatasync.gate = threading.Event()  # the disk hangs: the fsync does not return
    async with open_log(store_config) as log:
        end = (await log.append(Message.create("t", b"slow disk"))).end_offset
        flusher = GroupCommitFlusher(log)
        returned: dict[float, tuple[bool, float]] = {}

        async def waiter(timeout: float) -> None:
            deadline = trio.current_time() + timeout
            ok = await flusher.wait_durable(end, deadline)
            returned[deadline] = (ok, trio.current_time())

        async with trio.open_nursery() as nursery:
            await nursery.start(flusher.run)
            try:  # whatever happens, let the held fsync finish so the nursery can close
                async with trio.open_nursery() as waiting:
                    for timeout in (1.0, 2.5, 7.0):
                        waiting.start_soon(waiter, timeout)
                await trio.to_thread.run_sync(fdatasync.entered.wait)
                assert fdatasync.calls == 1  # the flush is stuck in the disk
                for deadline, (ok, when) in returned.items():
                    assert ok is False
                    assert when == pytest.approx(deadline, abs=1e-6)
                assert len(returned) == 3
                assert log.flushed_offset == 0
            finally:
                fdatasync.gate.set()  # the disk answers: the next waiter is served

            assert await flusher.wait_durable(end, math.inf)
            assert log.flushed_offset == end

            now = trio.current_time()
            assert await flusher.wait_durable(end, now - 1)  # durable: no wait at all
            assert not await flusher.wait_durable(end + 1, now - 1)  # deadline passed
            assert trio.current_time() == now
            nursery.cancel_scope.cancel()


async def test_waiting_for_an_offset_not_written_yet_does_not_spin(
    store_config: StoreConfig, fdatasync: FdatasyncSpy
) -> None:
    async with open_log(store_config) as log:
        end = (await log.append(Message.create("t", b"one"))).end_offset
        flusher = GroupCommitFlusher(log)
        async with trio.open_nursery() as nursery:
            await nursery.start(flusher.run)
            assert not await flusher.wait_durable(end + 1000, trio.current_time() + 0.05)
            assert flusher.fsyncs <= 2  # not one flush attempt per loop iteration
            assert log.flush_count == 1
            later = (await log.append(Message.create("t", b"x" * 1000))).end_offset
            assert await flusher.wait_durable(later, trio.current_time() + 60)
            assert log.flushed_offset == later
            nursery.cancel_scope.cancel()


async def test_fsync_failure_fails_every_waiter_and_all_later_writes(
    store_config: StoreConfig, fdatasync: FdatasyncSpy
) -> None:
    config = quiet(store_config)
    async with MessageStore.open(config) as store:
        results = [await store.put(Message.create("t", b"a" * 200, i % 3)) for i in range(5)]
        assert await store.wait_durable(results[0].end_offset, 60)
        durable = store.commit_log.flushed_offset
        assert durable == results[-1].end_offset  # the fsync covered everything written
        more = [await store.put(Message.create("t", b"b" * 200, i % 3)) for i in range(20)]

        fdatasync.fail_all = True
        outcomes: list[object] = []

        async def waiter(end: int) -> None:
            try:
                outcomes.append(await store.wait_durable(end, 60))
            except StorageFailedError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for result in more:
                nursery.start_soon(waiter, result.end_offset)

        assert len(outcomes) == 20
        assert all(isinstance(o, StorageFailedError) for o in outcomes), outcomes
        assert store.commit_log.flushed_offset == durable  # nothing more reported durable
        assert isinstance(store.commit_log.failure, StorageFailedError)
        assert "fdatasync of the commit log failed" in str(store.commit_log.failure)

        fdatasync.fail_all = False  # the kernel "forgets" the error: still no ack
        calls = fdatasync.calls
        max_offset = store.commit_log.max_offset
        with pytest.raises(StorageFailedError):
            await store.put(Message.create("t", b"refused"))
        with pytest.raises(StorageFailedError):
            await store.put_batch([Message.create("t", b"refused")])
        with pytest.raises(StorageFailedError):
            await store.wait_durable(results[0].end_offset, 60)
        with pytest.raises(StorageFailedError):
            await store.commit_log.flush()
        with pytest.raises(StorageFailedError):
            await store.flush_all()
        assert store.commit_log.max_offset == max_offset
        assert store.commit_log.flushed_offset == durable
        assert fdatasync.calls == calls  # never retried
        assert store.status()["failed"] is True

    checkpoint = load_checkpoint(config.checkpoint_path)
    assert checkpoint is not None
    assert not checkpoint.clean
    assert checkpoint.commit_log_flushed <= durable


async def test_flush_waiting_behind_a_failed_fsync_does_not_fsync_again(
    store_config: StoreConfig, fdatasync: FdatasyncSpy
) -> None:
    """fsyncgate: after a failed fdatasync the kernel may report the next one as a success
    although the pages are gone. A flush queued behind the failed one must fail too."""
    async with open_log(store_config) as log:
        await log.append(Message.create("t", b"lost?"))
        fdatasync.gate = threading.Event()
        fdatasync.fail_calls = {1}  # the second call would "succeed"
        outcomes: list[object] = []

        async def flush() -> None:
            try:
                outcomes.append(await log.flush())
            except StorageFailedError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            try:  # whatever happens, let the held fsync finish so the nursery can close
                nursery.start_soon(flush)
                nursery.start_soon(flush)
                await trio.to_thread.run_sync(fdatasync.entered.wait)  # one is in the disk
                await trio.testing.wait_all_tasks_blocked()  # and the other at the lock
                assert fdatasync.calls == 1
            finally:
                fdatasync.gate.set()
        assert len(outcomes) == 2
        assert all(isinstance(o, StorageFailedError) for o in outcomes), outcomes
        assert fdatasync.calls == 1
        assert log.flushed_offset == 0
        assert log.flush_count == 0


async def test_rewind_answers_waiters_past_the_cut_with_false() -> None:
    """A waiter for bytes that a truncate removed must not be released later by other
    bytes written at the same offsets: it gets False at the cut."""
    waiters = OffsetWaiters()
    waiters.advance(100)
    results: dict[str, bool] = {}

    async def wait(name: str, offset: int) -> None:
        results[name] = await waiters.wait(offset)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "below", 150)
        nursery.start_soon(wait, "past", 300)
        await trio.testing.wait_all_tasks_blocked()
        assert waiters.rewind(200) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert results == {"past": False}
        waiters.advance(400)  # the log grows back past 300 with other records
    assert results == {"past": False, "below": True}
