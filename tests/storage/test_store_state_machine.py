"""A real MessageStore (real files) against a plain in-memory model, driven by hypothesis.

The store stays open across steps: it lives in a trio run on a thread of its own
(:class:`StoreThread`) and every rule calls into it with ``trio.from_thread``. Clean
restarts and crash restarts are explicit rules. A crash abandons the store (no clean
shutdown), puts back the preallocated segment files that a killed process would leave
on disk, then damages what was not fsynced: the commit-log bytes past the flushed
offset (zeros from a point, a run of garbage, or lost pages) and, at times, consume-queue
entries past the checkpoint's queue offset, or the whole checkpoint.

The model is the list of records appended, in log order, and how many of them were
acknowledged durable. After every step the log, read from its start, must be exactly
the model (after a crash: exactly the prefix the damage left intact, which always holds
every durable record), and every consume queue must list exactly its records, densely.

The periodic flusher is off (rules flush), so examples replay exactly under ``ci``. The
``test_*`` functions at the end replay, step by step, scenarios the machine found.
"""

from __future__ import annotations

import bisect
import os
import random
import shutil
import struct
import tempfile
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
from hypothesis import currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from storage import Message, MessageStore, StoreConfig
from storage.checkpoint import load_checkpoint
from storage.consume_queue import ENTRY, ENTRY_SIZE
from storage.mapped_file import PAGE_SIZE, parse_segment_name, segment_name
from storage.record import BLANK_MIN, HEADER_SIZE, tags_hash

T = TypeVar("T")

TOPICS = ("orders", "audit.log", "t-3")
QUEUE_IDS = (0, 1, 2)
SMALL_SEGMENT = 64 * 1024
"""As in conftest: small segments roll over every few steps."""
KEYS = [(topic, queue_id) for topic in TOPICS for queue_id in QUEUE_IDS]
TIMEOUT = 60.0


def make_config(data_dir: Path) -> StoreConfig:
    """The ``store_config`` fixture's settings (a fixture cannot reach a state machine),
    except that the periodic flusher never fires: the rules flush, so what a crash may
    lose does not depend on timing and every example replays exactly."""
    return StoreConfig(
        data_dir=data_dir,
        segment_size=SMALL_SEGMENT,
        max_message_size=16 * 1024,
        consume_queue_entries=4,  # queue files roll over too, and are often full
        flush_interval_ms=3_600_000,
        flush_thorough_interval_ms=3_600_000,
        retention_check_interval_ms=3_600_000,
        disk_max_used_ratio=1.0,  # a nearly full test disk must not delete segments
    )


def note_event(message: str) -> None:
    """hypothesis's ``event`` (statistics), also callable from the plain regression tests."""
    if currently_in_test_context():
        event(message)


# ---- the store on its own thread ------------------------------------------------------------


class StoreThread:
    """A MessageStore opened in ``trio.run`` on a thread, kept open until :meth:`stop`."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._ready: Future[tuple[MessageStore, trio.lowlevel.TrioToken, trio.Event]] = Future()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="store", daemon=True)
        self._thread.start()
        self.store, self._token, self._stop = self._ready.result(timeout=TIMEOUT)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            else:
                self.error = exc

    async def _main(self) -> None:
        async with MessageStore.open(self.config) as store:
            stop = trio.Event()
            self._ready.set_result((store, trio.lowlevel.current_trio_token(), stop))
            await stop.wait()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def stop(self, *, crash: bool) -> tuple[int, int, set[str]]:
        """Leave the store (cleanly, or as a crash would); return its (flushed offset, end)
        and, for a crash, the names of the segment files on disk at that moment."""

        def leave() -> tuple[int, set[str]]:
            names: set[str] = set()
            if crash:  # no await between these: the snapshot is the crash's disk state
                names = {p.name for p in self.config.commit_log_dir.iterdir()}
                self.store.abandon()
            self._stop.set()
            return self.store.commit_log.max_offset, names

        end, names = self.call_sync(leave)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the store did not stop"
        if self.error is not None:
            raise self.error
        # Read after the store stopped: flushes that finished meanwhile count as durable.
        return self.store.commit_log.flushed_offset, end, names

    def kill(self) -> None:
        """Teardown after a failure: stop without any checks."""
        if self._thread.is_alive():
            try:
                self.call_sync(self.store.abandon)
                self.call_sync(self._stop.set)
            except trio.RunFinishedError:
                pass  # the store's thread already ended: nothing left to abandon or stop
            self._thread.join(TIMEOUT)


# ---- the model --------------------------------------------------------------------------------


@attrs.frozen
class Rec:
    offset: int
    size: int
    topic: str
    queue_id: int
    queue_offset: int
    body: bytes
    properties: bytes
    tags_hash: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def _snapshot_log(store: MessageStore) -> list[Rec]:
    """Every record of the log (runs on the store's thread)."""
    out = []
    commit_log = store.commit_log
    for record in commit_log.scan(commit_log.min_offset):
        out.append(
            Rec(
                record.physical_offset,
                record.size,
                record.topic,
                record.queue_id,
                record.queue_offset,
                bytes(record.body),
                bytes(record.properties_raw),
                record.tags_hash,
            )
        )
        record.release()
    return out


def _snapshot_queues(store: MessageStore) -> dict[tuple[str, int], tuple[tuple[int, int], list]]:
    """(queue offsets, [(queue offset, log offset, record's queue offset)]) of every queue."""
    out = {}
    for topic, queue_id in {*KEYS, *store.queues.queues}:
        got = store.get_messages(topic, queue_id, 0, max_messages=100_000, max_bytes=1 << 40)
        entries = [(q, r.physical_offset, r.queue_offset) for q, r in got.records]
        for _q, record in got.records:
            record.release()
        out[(topic, queue_id)] = (store.queue_offsets(topic, queue_id), entries)
    return out


@attrs.frozen
class Snapshot:
    """What the invariants compare with the model, read in one call on the store's thread."""

    log: list[Rec]
    status: dict[str, Any]
    queues: dict[tuple[str, int], tuple[tuple[int, int], list]]


def _snapshot(store: MessageStore) -> Snapshot:
    return Snapshot(_snapshot_log(store), store.status(), _snapshot_queues(store))


def _body(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


bodies = st.one_of(
    st.builds(_body, st.integers(0, 3000).map(lambda n: 3000 - n), st.integers(0, 1 << 16)),
    st.builds(_body, st.integers(0, 3000), st.integers(0, 1 << 16)),
    st.binary(max_size=40),
)
"""Mostly large (hypothesis favours small numbers, hence the mirror): 64 KiB segments
should roll over every few batches."""
messages = st.builds(
    Message.create,
    st.sampled_from(TOPICS),
    bodies,
    st.sampled_from(QUEUE_IDS),
    tags=st.one_of(st.none(), st.sampled_from(["red", "blue"])),
    properties=st.one_of(
        st.none(),
        st.dictionaries(st.sampled_from(["k", "trace-id"]), st.text(max_size=6), max_size=2),
    ),
)

_batch_sizes = st.one_of(st.integers(1, 20), st.integers(0, 19).map(lambda n: 20 - n))
batches = _batch_sizes.flatmap(lambda n: st.lists(messages, min_size=n, max_size=n))
"""1 to 20 messages, from both ends too."""


# ---- damage a crash may do -----------------------------------------------------------------


@attrs.frozen
class Crash:
    """What a crash does besides stopping the process: the damage to bytes not yet synced.

    Patterns are cycled over what they apply to: the unsynced log pages, or the consume-
    queue entries past the checkpoint's queue offset (True: lost, back to zeros).
    """

    log_damage: str = "none"
    """none, zeros (from a point to the end), garbage (a run from a point), pages."""
    where: int = 0
    """The point, in 1/2**20 of the unsynced bytes."""
    garbage: bytes = b"\xff"
    lost_pages: tuple[bool, ...] = ()
    lost_queue_entries: tuple[bool, ...] = ()
    drop_checkpoint: bool = False
    """Lose the checkpoint too (never happens, it is renamed into place): a full recovery."""
    leftovers: bool = False
    """Leave half-made files: a segment under its temporary name, empty next queue files."""


crashes = st.builds(
    Crash,
    log_damage=st.sampled_from(["none", "zeros", "garbage", "pages"]),
    where=st.integers(0, 1 << 20),
    garbage=st.binary(min_size=1, max_size=300),
    lost_pages=st.lists(st.booleans(), max_size=8).map(tuple),
    lost_queue_entries=st.lists(st.booleans(), max_size=6).map(tuple),
    drop_checkpoint=st.integers(0, 9).map(lambda n: n == 9),
    leftovers=st.booleans(),
)


class LogFiles:
    """Byte access to the commit log by log offset, across segment files (store closed)."""

    def __init__(self, directory: Path, segment_size: int) -> None:
        self.directory = directory
        self.segment_size = segment_size

    def _pieces(self, offset: int, size: int) -> list[tuple[Path, int, int]]:
        pieces = []
        while size > 0:
            base = offset - offset % self.segment_size
            pos = offset - base
            n = min(size, self.segment_size - pos)
            pieces.append((self.directory / segment_name(base), pos, n))
            offset, size = offset + n, size - n
        return pieces

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray()
        for path, pos, n in self._pieces(offset, size):
            with path.open("rb") as f:
                f.seek(pos)
                out += f.read(n)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        done = 0
        for path, pos, n in self._pieces(offset, len(data)):
            with path.open("r+b") as f:
                f.seek(pos)
                f.write(data[done : done + n])
            done += n


def survivors(model: list[Rec], changed: set[int]) -> int:
    """How many leading records a recovery keeps when the bytes at ``changed`` changed.

    The scan stops at the first changed byte of a record or of a segment filler's
    header; changes inside a filler's body (or past the last record) are never read.
    """
    if not changed:
        return len(model)
    significant = sorted(changed)

    def hit(lo: int, hi: int) -> bool:
        i = bisect.bisect_left(significant, lo)
        return i < len(significant) and significant[i] < hi

    for index, rec in enumerate(model):
        if index and model[index - 1].end != rec.offset:
            filler = model[index - 1].end  # the previous segment ends with a filler
            if hit(filler, filler + BLANK_MIN):
                return index
        if hit(rec.offset, rec.end):
            return index
    return len(model)


# ---- the machine ------------------------------------------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="tidelog-sm-"))
        self.config = make_config(self.root / "store")
        self.model: list[Rec] = []
        self.durable = 0
        """The first ``durable`` records of the model were acknowledged durable."""
        self.thread: StoreThread | None = StoreThread(self.config)
        self.restarts = 0
        self.highest = 0
        self.appended = 0
        self.writes_since_restart = 0

    @property
    def store(self) -> MessageStore:
        assert self.thread is not None
        return self.thread.store

    def teardown(self) -> None:
        note_event(f"highest segment: {min(self.highest // SMALL_SEGMENT, 5)}")
        note_event(f"appended: {self.appended // 50 * 50}+")
        note_event(f"restarts: {min(self.restarts, 5)}")
        try:
            if self.thread is not None:
                self.thread.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _next_queue_offset(self, key: tuple[str, int], pending: list[Rec]) -> int:
        return sum(1 for r in (*self.model, *pending) if (r.topic, r.queue_id) == key)

    def _record(self, message: Message, offset: int, queue_offset: int, pending: list[Rec]) -> Rec:
        key = (message.topic, message.queue_id)
        expected_queue_offset = self._next_queue_offset(key, pending)
        assert queue_offset == expected_queue_offset, (key, queue_offset, expected_queue_offset)
        size = HEADER_SIZE + len(message.topic) + len(message.properties) + len(message.body)
        return Rec(
            offset,
            size,
            message.topic,
            message.queue_id,
            queue_offset,
            message.body,
            message.properties,
            tags_hash(message.tags),
        )

    # ---- writing ------------------------------------------------------------------------

    @rule(message=messages)
    def append(self, message: Message) -> None:
        assert self.thread is not None
        result = self.thread.call(self.store.put, message)
        self.model.append(self._record(message, result.offset, result.queue_offset, []))
        self.highest = max(self.highest, result.end_offset)
        self.appended += 1
        self.writes_since_restart += 1

    @rule(batch=batches)
    def append_batch(self, batch: list[Message]) -> None:
        assert self.thread is not None
        result = self.thread.call(self.store.put_batch, batch)
        pending: list[Rec] = []
        for message, offset, queue_offset in zip(
            batch, result.offsets, result.queue_offsets, strict=True
        ):
            pending.append(self._record(message, offset, queue_offset, pending))
        assert result.end_offset == pending[-1].end
        self.model.extend(pending)
        self.highest = max(self.highest, result.end_offset)
        self.appended += len(pending)
        self.writes_since_restart += 1

    # ---- durability ---------------------------------------------------------------------

    @rule(everything=st.booleans())
    def flush(self, everything: bool) -> None:
        """What the periodic flusher does: the log and the queues with a new checkpoint
        (``flush_all``), or only the log (the checkpoint then lags behind)."""
        assert self.thread is not None
        if everything:
            self.thread.call(self.store.flush_all)
        else:
            self.thread.call(self.store.commit_log.flush)
        assert self.store.commit_log.flushed_offset == self.store.commit_log.max_offset
        self.durable = len(self.model)

    @rule()
    def wait_durable(self) -> None:
        assert self.thread is not None
        end = self.model[-1].end if self.model else 0
        assert self.thread.call(self.store.wait_durable, end, TIMEOUT)
        self.durable = len(self.model)

    # ---- reading ------------------------------------------------------------------------

    @rule(pick=st.integers(0, 1 << 16))
    def read_known(self, pick: int) -> None:
        if not self.model:
            return
        assert self.thread is not None
        rec = self.model[pick % len(self.model)]

        def read() -> Rec:
            record = self.store.read(rec.offset)
            try:
                return Rec(
                    record.physical_offset,
                    record.size,
                    record.topic,
                    record.queue_id,
                    record.queue_offset,
                    bytes(record.body),
                    bytes(record.properties_raw),
                    record.tags_hash,
                )
            finally:
                record.release()

        assert self.thread.call_sync(read) == rec

    # ---- restarts -----------------------------------------------------------------------

    def _reopen(self) -> None:
        self.thread = StoreThread(self.config)
        self.restarts += 1
        self.writes_since_restart = 0

    def _wrote(self) -> bool:
        """Restarts and truncations want something new to work on: no two in a row."""
        return self.writes_since_restart >= 2

    @precondition(_wrote)
    @rule()
    def clean_restart(self) -> None:
        assert self.thread is not None
        thread, self.thread = self.thread, None
        flushed, end, _names = thread.stop(crash=False)
        assert flushed == end, "a clean shutdown flushes everything"
        checkpoint = load_checkpoint(self.config.checkpoint_path)
        assert checkpoint is not None and checkpoint.clean
        assert checkpoint.commit_log_flushed == end
        self._reopen()
        report = self.store.recovery
        assert report.clean_shutdown
        assert not report.durable_lost
        assert not report.queues_rebuilt
        assert report.log_end == end
        self.durable = len(self.model)

    @precondition(_wrote)
    @rule(crash=crashes)
    def crash_restart(self, crash: Crash) -> None:
        assert self.thread is not None
        thread, self.thread = self.thread, None
        flushed, end, names = thread.stop(crash=True)
        durable_end = self.model[self.durable - 1].end if self.durable else 0
        assert flushed >= durable_end, ("acked durable past the flushed offset", flushed, end)
        self._restore_segment_files(names)
        changed = self._damage_log(crash, flushed, end)
        kept = survivors(self.model, changed)
        assert kept >= self.durable
        checkpoint = load_checkpoint(self.config.checkpoint_path)
        assert checkpoint is not None and not checkpoint.clean
        if crash.drop_checkpoint:
            self.config.checkpoint_path.unlink()
        else:
            self._damage_queues(crash.lost_queue_entries, checkpoint.consume_queue_flushed)
        if crash.leftovers:
            self._leave_unfinished_files()
        self._reopen()
        report = self.store.recovery
        assert not report.clean_shutdown
        assert not report.durable_lost, report
        note_event(f"crash damage: {crash.log_damage}")
        note_event(f"crash lost records: {kept < len(self.model)}")
        note_event(f"crash rebuilt queues: {report.queues_rebuilt}")
        del self.model[kept:]
        self.durable = len(self.model)  # recovery fsyncs what it keeps

    def _restore_segment_files(self, names: set[str]) -> None:
        """A killed process leaves its preallocated (never written) segments on disk; the
        abandoned store deleted them on its way out, so put them back: all zeros."""
        directory = self.config.commit_log_dir
        for name in names:
            path = directory / name
            if parse_segment_name(path) is not None and not path.exists():
                with path.open("wb") as f:
                    f.truncate(self.config.segment_size)

    def _damage_log(self, crash: Crash, flushed: int, end: int) -> set[int]:
        """Damage commit-log bytes in [flushed, end); return the offsets that changed."""
        if end <= flushed or crash.log_damage == "none":
            return set()
        files = LogFiles(self.config.commit_log_dir, self.config.segment_size)
        # Garbage may run a little past the end of the log, into the zeros after it.
        segment_size = self.config.segment_size
        limit = min(end + 64, -(-end // segment_size) * segment_size)
        before = files.read(flushed, limit - flushed)
        cut = flushed + (end - flushed - 1) * crash.where // (1 << 20)
        if crash.log_damage == "zeros":
            files.write(cut, bytes(end - cut))
        elif crash.log_damage == "garbage":
            files.write(cut, crash.garbage[: limit - cut])
        elif crash.log_damage == "pages" and any(crash.lost_pages):
            pages = range(flushed - flushed % PAGE_SIZE, end, PAGE_SIZE)
            for index, page in enumerate(pages):
                if crash.lost_pages[index % len(crash.lost_pages)]:
                    # The page reverts to what was synced: zeros past ``flushed``.
                    lo, hi = max(page, flushed), min(page + PAGE_SIZE, end)
                    files.write(lo, bytes(hi - lo))
        after = files.read(flushed, limit - flushed)
        return {flushed + i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}

    def _leave_unfinished_files(self) -> None:
        """Files a crash can leave half made: a segment still under its temporary name, and
        a queue file created before its first entry was written."""
        commit_log_dir = self.config.commit_log_dir
        (commit_log_dir / segment_name(1 << 40)).with_suffix(".tmp").write_bytes(b"junk")
        file_size = self.config.consume_queue_entries * ENTRY_SIZE
        for queue_dir in sorted(self.config.consume_queue_dir.glob("*/*")):
            files = sorted(p for p in queue_dir.iterdir() if parse_segment_name(p) is not None)
            if files and files[-1].read_bytes()[-ENTRY_SIZE:] != bytes(ENTRY_SIZE):  # full
                following = queue_dir / segment_name(int(files[-1].name) + file_size)
                following.write_bytes(bytes(file_size))

    def _damage_queues(self, lost: tuple[bool, ...], queues_flushed: int) -> None:
        """Lose consume-queue entries the checkpoint does not claim are on disk."""
        if not any(lost):
            return
        eligible = 0
        for path in sorted(self.config.consume_queue_dir.glob("*/*/*")):
            raw = bytearray(path.read_bytes())
            for pos in range(0, len(raw), ENTRY_SIZE):
                log_offset, size, _tags = ENTRY.unpack_from(raw, pos)
                if size and log_offset >= queues_flushed:
                    if lost[eligible % len(lost)]:
                        struct.pack_into("20x", raw, pos)
                    eligible += 1
            path.write_bytes(bytes(raw))

    @precondition(_wrote)
    @rule(cut=st.one_of(st.integers(0, 5), st.integers(0, 60)))  # tails, mostly short
    def truncate(self, cut: int) -> None:
        """Cut the last ``cut`` records (at a record boundary), as replication does to a
        divergent tail: the queues follow, and each queue's next record continues densely
        from what is kept."""
        assert self.thread is not None
        size = len(self.model)
        index = size - min(cut, size)
        offset = self.model[index].offset if index < size else self.model[-1].end if size else 0
        self.thread.call(self.store.truncate, offset)
        del self.model[index:]
        assert self.store.commit_log.max_offset == offset
        self.durable = len(self.model)  # truncate flushes what it keeps

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        """The log matches the model and every queue lists its records. One snapshot per
        step, taken in one call on the store's thread: each call is a thread hand-off,
        and on a loaded machine the hand-offs, not the checks, were most of the time."""
        if self.thread is None:
            return
        snapshot = self.thread.call_sync(_snapshot, self.store)
        self._log_matches_model(snapshot)
        self._queues_match_log(snapshot)

    def _log_matches_model(self, snapshot: Snapshot) -> None:
        log, status = snapshot.log, snapshot.status
        assert len(log) == len(self.model), (len(log), len(self.model))
        for got, want in zip(log, self.model, strict=True):
            assert got == want, (got.offset, want.offset)
        assert status["dispatched_offset"] == status["log_max_offset"]
        durable_end = self.model[self.durable - 1].end if self.durable else 0
        flushed = status["flushed_offset"]
        assert isinstance(flushed, int)
        assert flushed >= durable_end, ("acknowledged durable, not flushed", flushed, durable_end)

    def _queues_match_log(self, snapshot: Snapshot) -> None:
        for key, ((lo, hi), entries) in snapshot.queues.items():
            want = [r for r in self.model if (r.topic, r.queue_id) == key]
            assert lo == 0 and hi == len(want), (key, lo, hi, len(want))
            assert entries == [(i, r.offset, i) for i, r in enumerate(want)], key


TestStoreStateMachine = StoreMachine.TestCase


# ---- regressions: scenarios the machine found, replayed step by step ---------------------------


def _steps(*steps: Callable[[StoreMachine], object]) -> None:
    machine = StoreMachine()
    try:
        for step in steps:
            step(machine)
            machine.store_matches_model()
    finally:
        machine.teardown()


def _orders(count: int, body: bytes = b"m") -> list[Message]:
    return [Message.create("orders", body) for _ in range(count)]


def test_lost_queue_entry_below_kept_ones() -> None:
    """Entries past the checkpoint: some lost, the ones above them kept, and their records
    lost from the log. Recovery used to stop dropping at the first lost (empty) entry and
    kept the entries below it, pointing past the end of the log."""
    _steps(
        lambda m: m.append_batch(_orders(6)),
        lambda m: m.flush(everything=True),
        lambda m: m.append_batch(_orders(4)),
        lambda m: m.crash_restart(Crash("zeros", lost_queue_entries=(True, False))),
        lambda m: m.append_batch(_orders(3)),
    )


def test_empty_queue_file_after_a_full_one() -> None:
    """A crash between creating a queue's next file and writing its first entry, the record
    lost too: the queue used to reopen empty at the new file's start, hiding every entry."""
    _steps(
        lambda m: m.append_batch(_orders(4)),  # 4 entries: the queue's first file is full
        lambda m: m.flush(everything=True),
        lambda m: m.append(Message.create("audit.log", b"lost")),
        lambda m: m.crash_restart(Crash("zeros", leftovers=True)),
        lambda m: m.append(_orders(1)[0]),
    )


def test_durable_wait_after_truncate_fsyncs() -> None:
    """wait_durable used to acknowledge at once an offset below what had been flushed
    before a truncate, without any fsync: a crash then lost the acknowledged record."""
    _steps(
        lambda m: m.append_batch(_orders(4, b"x" * 100)),
        lambda m: m.wait_durable(),
        lambda m: m.truncate(3),
        lambda m: m.append(_orders(1, b"y" * 100)[0]),
        lambda m: m.wait_durable(),
        lambda m: m.crash_restart(Crash("zeros")),
    )


def test_survivors_counts_leading_intact_records() -> None:
    recs = [
        Rec(0, 100, "t", 0, 0, b"", b"", 0),
        Rec(100, 100, "t", 0, 1, b"", b"", 0),
        Rec(SMALL_SEGMENT, 100, "t", 0, 2, b"", b"", 0),
    ]
    assert survivors(recs, set()) == 3
    assert survivors(recs, {150}) == 1
    assert survivors(recs, {200 + BLANK_MIN}) == 3  # inside the filler's body: never read
    assert survivors(recs, {203}) == 2  # the filler's header
    assert survivors(recs, {0, SMALL_SEGMENT + 5}) == 0


def test_log_files_cross_segments(tmp_path: Path) -> None:
    for base in (0, SMALL_SEGMENT):
        (tmp_path / segment_name(base)).write_bytes(bytes(SMALL_SEGMENT))
    files = LogFiles(tmp_path, SMALL_SEGMENT)
    files.write(SMALL_SEGMENT - 2, b"abcd")
    assert files.read(SMALL_SEGMENT - 3, 6) == b"\0abcd\0"
    assert os.path.getsize(tmp_path / segment_name(SMALL_SEGMENT)) == SMALL_SEGMENT


class StoreMachineSecondShard(StoreMachine):
    """The same machine on a stream of examples of its own (see ``SHARDS``)."""


class StoreMachineThirdShard(StoreMachine):
    """The same machine on a stream of examples of its own (see ``SHARDS``)."""


TestStoreStateMachineSecondShard = StoreMachineSecondShard.TestCase
TestStoreStateMachineThirdShard = StoreMachineThirdShard.TestCase
SHARDS = (TestStoreStateMachine, TestStoreStateMachineSecondShard, TestStoreStateMachineThirdShard)
"""The examples are split over three tests, each with its own 300 s limit: on a loaded
2-core box every hand-off to the store's thread waits for the scheduler, and the whole
run took 5-10 times its quiet 30 s there (one test hit the limit). A derandomized stream
follows the machine class's source, so each subclass explores examples of its own: as
many examples of as many steps as one test ran before."""

_profile = settings.default  # the profile tests/conftest.py loaded (ci or chaos)
assert _profile is not None
_scale = 3 if _profile.max_examples < 100 else 1
"""ci's examples take well under a second: three times as many, three times as long, still
fit its budget (about 10 s per shard on 2 cores). chaos is long enough as it is."""
for _shard in SHARDS:
    _shard.settings = settings(
        _profile,
        max_examples=-(-_profile.max_examples * _scale // len(SHARDS)),
        stateful_step_count=_profile.stateful_step_count * _scale,
    )
    if os.environ.get("HYPOTHESIS_PROFILE") == "chaos":  # hours, not the suite's 300 s limit
        pytest.mark.timeout(0)(_shard)
del _shard  # pytest collects every TestCase class a module name holds
