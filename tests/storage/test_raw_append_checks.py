"""A slave's raw append checks each whole record with one unpack of its header, hands the
records' index fields to the dispatcher, and writes chunks of a page or more with
``pwrite``: none of it may change what the slave exposes, refuses, numbers or indexes.

The reference is the walk of :func:`~storage.record.check_record` alone
(``_expose_checked``) with a dispatcher that reads every header back from the log, fed
the same chunks of the same master log: one with fillers, topic deletions (queue offsets
restart), producer-batch marks, tags and properties; sometimes with one byte damaged."""

from __future__ import annotations

import functools
import itertools
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import storage.commit_log
from storage import Message, MessageStore
from storage.commit_log import IndexFields
from storage.errors import CorruptSegmentError, OffsetOutOfRangeError
from storage.record import FLAG_PRODUCER_BATCH, encode_properties
from tests.storage.test_dispatch_from_appends import dispatcher_state, queue_state
from tests.storage.test_raw_append import (
    MasterLog,
    assert_same,
    build_master,
    chunk_sizes,
    chunks,
    config_at,
    replicate,
    snapshot,
)

TOPICS = ("orders", "audit", "x")


def master_ops() -> list[tuple[str, Any]]:
    """Puts, batches and topic deletions over three log segments or more."""
    rng = random.Random(11)
    ops: list[tuple[str, Any]] = []
    for i in range(120):
        if i in (40, 80, 100):
            ops.append(("delete", TOPICS[i % 3]))
            continue
        size = rng.choice((0, 3, 300, 1024, 2000, 4000))
        topic = rng.choice(TOPICS)
        body = bytes(rng.getrandbits(8) for _ in range(size))
        if i % 11 == 0:
            ops.append(
                (
                    "put",
                    Message(
                        topic,
                        body,
                        rng.randrange(3),
                        None,
                        encode_properties({"PRODUCER": f"p:{i}:1"}),
                        flags=FLAG_PRODUCER_BATCH,
                    ),
                )
            )
        else:
            message = Message.create(
                topic,
                body,
                rng.randrange(3),
                tags=f"t{i % 5}" if i % 2 else None,
                properties={"i": str(i)} if i % 7 == 0 else None,
            )
            ops.append(("put", message))
    return ops


async def build_deleting_master(path: Path) -> MasterLog:
    async with MessageStore.open(config_at(path)) as store:
        for kind, arg in master_ops():
            if kind == "delete":
                await store.delete_topic(arg)
            else:
                await store.put(arg)
        files = store.commit_log.files.segments
        assert len(files) >= 3, "the master must span several segments (fillers)"
        sent = [(seg.base, bytes(seg.view[: seg.wrote])) for seg in files]
        records = [(r.physical_offset, r.size) for r in store.commit_log.scan(0)]
        bounds = {0, *(o for o, _ in records), *(o + s for o, s in records)}
        bounds.update(seg.end for seg in files if seg.wrote == seg.size)
        return MasterLog(snapshot(store), sent, sorted(bounds), records)


@functools.cache
def deleting_master() -> MasterLog:
    with tempfile.TemporaryDirectory() as tmp:
        return trio.run(build_deleting_master, Path(tmp))


def damaged(master: MasterLog, at: int, mask: int) -> MasterLog:
    """The master's bytes with the byte at ``at`` (modulo the log's size) xor ``mask``."""
    total = sum(len(data) for _, data in master.sent)
    at %= total
    sent = []
    for base, data in master.sent:
        if 0 <= at < len(data):
            bad = bytearray(data)
            bad[at] ^= mask
            data = bytes(bad)
        at -= len(data)
        sent.append((base, data))
    return MasterLog(master.snapshot, sent, [], master.records)


async def feed(store: MessageStore, master: MasterLog, next_size: Callable[[], int]) -> list[Any]:
    """Send the master's chunks until one is refused; what each left visible."""
    log = store.commit_log
    trace: list[Any] = []
    for offset, chunk in chunks(master, next_size):
        try:
            end = await store.append_replicated(offset, chunk)
        except (CorruptSegmentError, OffsetOutOfRangeError) as exc:
            trace.append((type(exc).__name__, str(exc)))
            break
        trace.append((end, log.raw_pending, dict(log.next_queue_offsets)))
    trace.append((log.max_offset, log.raw_pending, dispatcher_state(store.dispatcher)))
    trace.append(queue_state(store.queues))
    return trace


def reparsing_records(store: MessageStore) -> Callable[[int], list[IndexFields]]:
    """The dispatcher's record source when every header is read back from the log."""

    def records(end: int) -> list[IndexFields]:
        return list(store.commit_log.iter_headers(store.dispatcher.offset, end))

    return records


def run_both(master: MasterLog, sizes: list[int]) -> tuple[list[Any], list[Any]]:
    """(the slave's trace, the reference's trace) for the same chunks."""

    async def main(path: Path) -> tuple[list[Any], list[Any]]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                storage.commit_log, "_expose_received", storage.commit_log._expose_checked
            )
            async with MessageStore.open(config_at(path / "reference")) as reference:
                patch.setattr(reference.dispatcher, "_records", reparsing_records(reference))
                theirs = await feed(reference, master, itertools.cycle(sizes).__next__)
        async with MessageStore.open(config_at(path / "slave")) as slave:
            ours = await feed(slave, master, itertools.cycle(sizes).__next__)
        return ours, theirs

    with tempfile.TemporaryDirectory() as tmp:
        return trio.run(main, Path(tmp))


@given(sizes=chunk_sizes)
def test_a_whole_log_applies_and_indexes_as_the_reference_does(sizes: list[int]) -> None:
    ours, theirs = run_both(deleting_master(), sizes)
    assert ours == theirs
    assert ours[-2][:2] == (deleting_master().snapshot.end, 0)


@given(
    sizes=chunk_sizes,
    at=st.integers(0, 10**6),
    mask=st.sampled_from((0x01, 0x80, 0xFF, 0x10)),
)
def test_a_damaged_byte_is_refused_where_the_reference_refuses_it(
    sizes: list[int], at: int, mask: int
) -> None:
    bad = damaged(deleting_master(), at, mask)
    ours, theirs = run_both(bad, sizes)
    assert ours == theirs


async def test_a_log_with_topic_deletions_replicates_identically(tmp_path: Path) -> None:
    master = deleting_master()
    async with MessageStore.open(config_at(tmp_path)) as slave:
        await replicate(slave, master, lambda: 5000)
        assert_same(slave, master)


async def test_a_short_or_failed_pwrite_is_completed_through_the_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big chunks go through ``pwrite``; what it leaves unwritten goes through the map."""
    master = await build_master(tmp_path / "master")
    calls: list[int] = []

    def flaky_pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        calls.append(len(data))
        if len(calls) % 3 == 0:
            raise OSError(5, "injected")
        return os.pwrite(fd, memoryview(data)[: len(data) // 2], offset)

    monkeypatch.setattr(storage.commit_log, "_pwrite", flaky_pwrite)
    async with MessageStore.open(config_at(tmp_path / "slave")) as slave:
        await replicate(slave, master, lambda: 9000)
        assert_same(slave, master)
    assert calls and min(calls) >= storage.commit_log._PWRITE_MIN
