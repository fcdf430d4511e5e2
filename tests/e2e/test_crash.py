"""Real crashes: a child process appends with durable acks and is killed with SIGKILL.

Every record the child acknowledged (printed ``ACK`` for, after ``wait_durable``) must be
in the log after recovery, at its offset, byte for byte, with its queue offset; the log
must have no holes, and every record in it must be one the child wrote. The torn-tail
variant also damages the unsynced tail after the kill, as a power cut could, and checks
that recovery cuts the log exactly at the damage.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path
from typing import IO

import attrs
import pytest
import trio

from storage import DataDirLockedError, MessageStore, StoreConfig
from storage.checkpoint import load_checkpoint
from storage.mapped_file import segment_name
from storage.record import HEADER_SIZE, ScanStop, check_record
from storage.recovery import RecoveryReport
from tests.e2e.crash_child import config_for, message_for

CHILD = Path(__file__).with_name("crash_child.py")
SEGMENT = 64 * 1024
"""Small segments: a few hundred acks span several roll-overs."""
LINE_TIMEOUT = 60.0
"""Longest wait for one line of the child's output (a failure guard, never a sync)."""
SEQS_PER_RUN = 10_000_000
CHAOS = os.environ.get("HYPOTHESIS_PROFILE") == "chaos"
"""The long profile: more kills per test, and new random choices each time (printed)."""


def make_rng(seed: int) -> random.Random:
    if CHAOS:
        seed = random.SystemRandom().randrange(1 << 32)
        print(f"crash test seed: {seed}")
    return random.Random(seed)


@attrs.frozen
class Ack:
    seq: int
    offset: int
    queue_offset: int

    @property
    def size(self) -> int:
        message = message_for(self.seq)
        return HEADER_SIZE + len(message.topic) + len(message.properties) + len(message.body)

    @property
    def end(self) -> int:
        return self.offset + self.size


# ---- the child --------------------------------------------------------------------------------


def _pump(stream: queue.Queue[bytes | None], pipe: IO[bytes]) -> None:
    for line in pipe:
        stream.put(line)
    stream.put(None)


def _parse(line: bytes, acks: dict[int, Ack]) -> None:
    if not line.endswith(b"\n"):
        return  # cut off by the kill: not an acknowledgement
    if line.startswith(b"ACK "):
        seq, offset, queue_offset = map(int, line.split()[1:])
        assert seq not in acks, f"message {seq} acknowledged twice"
        acks[seq] = Ack(seq, offset, queue_offset)


def run_and_kill(data_dir: Path, run: int, min_acks: int, rng: random.Random) -> dict[int, Ack]:
    """Start the child, read acks until a random count past ``min_acks``, SIGKILL it, and
    return every ack it printed before dying."""
    stderr_path = data_dir.parent / f"child-{run}.stderr"
    acks: dict[int, Ack] = {}
    kill_after = min_acks + rng.randrange(300)
    with stderr_path.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(data_dir), str(SEGMENT), str(run * SEQS_PER_RUN)],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        lines: queue.Queue[bytes | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(lines, child.stdout), daemon=True)
        pump.start()
        try:
            ready = lines.get(timeout=LINE_TIMEOUT)
            assert ready is not None and ready.startswith(b"READY "), ready
            while len(acks) < kill_after:
                line = lines.get(timeout=LINE_TIMEOUT)
                assert line is not None, "the child exited before it was killed"
                _parse(line, acks)
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=LINE_TIMEOUT) == -signal.SIGKILL
            while (line := lines.get(timeout=LINE_TIMEOUT)) is not None:
                _parse(line, acks)  # printed before the kill landed: acknowledged too
        except BaseException:
            print(stderr_path.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            pump.join(LINE_TIMEOUT)
            assert child.stdout is not None
            child.stdout.close()
    return acks


# ---- checking ---------------------------------------------------------------------------------


@attrs.frozen
class Checked:
    log_end: int
    records: int


async def check_store(
    config: StoreConfig, acks: dict[int, Ack], *, abandon: bool = False
) -> tuple[Checked, RecoveryReport]:
    """Recover the store and check it against the acks; ``abandon`` leaves it as a crash
    would, so the next child recovers from a non-clean checkpoint."""
    async with MessageStore.open(config) as store:
        report = store.recovery
        assert not report.clean_shutdown
        # A killed process loses nothing the page cache holds, and only the log is torn
        # below: the queues never disagree with the log, so no full rebuild (a rescan of
        # the whole log, slow on a big store) is ever needed.
        assert not report.queues_rebuilt, report
        for ack in acks.values():
            record = store.read(ack.offset)
            message = message_for(ack.seq)
            assert record.queue_offset == ack.queue_offset, ack
            assert (record.topic, record.queue_id) == (message.topic, message.queue_id), ack
            assert bytes(record.body) == message.body, ack
            assert bytes(record.properties_raw) == message.properties, ack
            record.release()
        commit_log = store.commit_log
        next_queue_offset: dict[tuple[str, int], int] = {}
        by_queue: dict[tuple[str, int], list[int]] = {}
        end = commit_log.min_offset
        count = 0
        for record in commit_log.scan(commit_log.min_offset):
            # No holes: each record starts where the last ended, or at the next segment
            # when the last one's segment ended with a filler.
            if record.physical_offset != end:
                assert record.physical_offset % SEGMENT == 0, (end, record.physical_offset)
                assert record.physical_offset - end < SEGMENT
            seq = int(bytes(record.body[:20]).split(b";")[0].removeprefix(b"seq="))
            message = message_for(seq)
            key = (record.topic, record.queue_id)
            assert key == (message.topic, message.queue_id)
            assert bytes(record.body) == message.body
            assert record.queue_offset == next_queue_offset.get(key, 0), (key, seq)
            next_queue_offset[key] = record.queue_offset + 1
            by_queue.setdefault(key, []).append(record.physical_offset)
            end = record.end_offset
            count += 1
            record.release()
        assert end <= commit_log.max_offset < end + SEGMENT
        for (topic, queue_id), offsets in by_queue.items():
            got = store.get_messages(topic, queue_id, 0, max_messages=1 << 20, max_bytes=1 << 40)
            assert [q for q, _ in got.records] == list(range(len(offsets)))
            assert [r.physical_offset for _, r in got.records] == offsets
            for _q, record in got.records:
                record.release()
            assert store.queue_offsets(topic, queue_id) == (0, len(offsets))
        if abandon:
            store.abandon()
        return Checked(commit_log.max_offset, count), report


def test_sigkill_keeps_every_ack(tmp_path: Path) -> None:
    """Kill the writer six times on the same directory: recovery runs on recovered logs,
    after a clean close or (every other time) after another crash."""
    rng = make_rng(20_240_611)
    config = config_for(tmp_path / "store", SEGMENT)
    acks: dict[int, Ack] = {}
    for run, min_acks in enumerate((300, 300, 0, 300, 300, 300) * (5 if CHAOS else 1)):  # 0: early
        new = run_and_kill(config.data_dir, run, min_acks, rng)
        assert len(new) >= min_acks
        acks.update(new)
        checked, report = trio.run(partial(check_store, config, acks, abandon=run % 2 == 1))
        assert not report.durable_lost, report
        assert checked.records >= len(acks)
        assert checked.log_end >= max(ack.end for ack in acks.values())
    assert len(list(config.commit_log_dir.iterdir())) > 3, "expected roll-overs"


# ---- the torn tail ----------------------------------------------------------------------------


class RawLog:
    """The commit log's segment files read and written directly (no store open)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, offset: int) -> Path:
        return self.directory / segment_name(offset - offset % SEGMENT)

    def elements(self, start: int) -> tuple[list[tuple[int, int, bool]], int]:
        """(offset, size, is_record) of each valid record and filler from ``start``, and the
        offset where valid data ends."""
        out: list[tuple[int, int, bool]] = []
        offset = start
        while self.path(offset).exists():
            base = offset - offset % SEGMENT
            view = memoryview(self.path(offset).read_bytes())
            pos = offset - base
            try:
                while True:
                    size = check_record(view, pos, base, SEGMENT)
                    out.append((base + pos, abs(size), size > 0))
                    pos += abs(size)
                    if size < 0:
                        break
            except ScanStop as stop:
                return out, stop.offset
            offset = base + SEGMENT
        return out, offset

    def read(self, offset: int, size: int) -> bytes:
        with self.path(offset).open("rb") as f:
            f.seek(offset % SEGMENT)
            return f.read(size)

    def xor(self, offset: int, mask: bytes) -> None:
        with self.path(offset).open("r+b") as f:
            f.seek(offset % SEGMENT)
            old = f.read(len(mask))
            f.seek(offset % SEGMENT)
            f.write(bytes(a ^ b for a, b in zip(old, mask, strict=True)))

    def zero_from(self, offset: int) -> None:
        """Zero from ``offset`` to the end of its segment and every later segment."""
        while self.path(offset).exists():
            with self.path(offset).open("r+b") as f:
                f.seek(offset % SEGMENT)
                f.write(bytes(SEGMENT - offset % SEGMENT))
            offset += SEGMENT - offset % SEGMENT


def tear(log: RawLog, acked_end: int, flushed: int, rng: random.Random) -> int:
    """Damage the tail past the acked records and the checkpoint's flushed offset (bytes a
    crash could lose); return where recovery must cut the log."""
    elements, data_end = log.elements(acked_end)
    assert all(offset >= acked_end for offset, _size, _is_record in elements)
    candidates = [(o, s) for o, s, is_record in elements if is_record and o >= flushed]
    if not candidates:  # nothing unsynced was written: put garbage where the data ends
        if not log.path(data_end).exists() or data_end % SEGMENT + 16 > SEGMENT:
            return data_end
        log.xor(data_end, bytes(rng.randrange(1, 256) for _ in range(16)))
        return data_end
    offset, size = rng.choice(candidates[-8:])  # a record near the end, or the last one
    if rng.random() < 0.5:  # the bytes from a point on never reached the disk
        record = log.read(offset, size)
        last_nonzero = max(i for i, byte in enumerate(record) if byte)  # zeros must change it
        log.zero_from(offset + rng.randrange(last_nonzero + 1))
    else:  # a run of garbage inside the record
        torn_at = offset + rng.randrange(size)
        length = min(rng.randrange(1, 64), offset + size - torn_at)
        log.xor(torn_at, bytes(rng.randrange(1, 256) for _ in range(length)))
    return offset


def test_sigkill_then_torn_tail(tmp_path: Path) -> None:
    rng = make_rng(7_351)
    config = config_for(tmp_path / "store", SEGMENT)
    log = RawLog(config.commit_log_dir)
    acks: dict[int, Ack] = {}
    for run in range(20 if CHAOS else 4):
        new = run_and_kill(config.data_dir, run, 300, rng)
        acks.update(new)
        acked_end = max(ack.end for ack in acks.values())
        checkpoint = load_checkpoint(config.checkpoint_path)
        assert checkpoint is not None and not checkpoint.clean
        # The checkpoint may lag behind the acks (group commit does not write it); bytes
        # below it are fsynced for sure, so the damage goes past it as well.
        cut = tear(log, acked_end, checkpoint.commit_log_flushed, rng)
        checked, report = trio.run(check_store, config, acks)
        assert report.log_end == checked.log_end == cut, (report, cut)
        assert not report.durable_lost, report


# ---- a kill at each step of a cut --------------------------------------------------------------

CUT_STEPS = ("intent_saved", "log_cut", "queues_cut", "checkpoint_saved")


async def write_log(config: StoreConfig, count: int) -> list[tuple[int, int, int, bytes]]:
    """Write ``count`` messages and close cleanly; return (offset, end, queue offset, body)."""
    async with MessageStore.open(config) as store:
        for seq in range(count):
            await store.put(message_for(seq))
        records = []
        for record in store.commit_log.scan(store.commit_log.min_offset):
            records.append(
                (record.physical_offset, record.end_offset, record.queue_offset, bytes(record.body))
            )
            record.release()
        return records


async def log_after_recovery(
    config: StoreConfig,
) -> tuple[int, int, list[tuple[int, int, int, bytes]], RecoveryReport]:
    async with MessageStore.open(config) as store:
        records = []
        for record in store.commit_log.scan(store.commit_log.min_offset):
            records.append(
                (record.physical_offset, record.end_offset, record.queue_offset, bytes(record.body))
            )
            record.release()
        for key, queue in store.queues.queues.items():  # every entry points at its record
            for _q, offset, size, _tags in queue.entries(queue.min_offset, 1 << 30):
                assert offset + size <= store.max_offset, key
                assert store.read(offset).topic == key[0]
        return store.min_offset, store.max_offset, records, store.recovery


def kill_during_cut(config: StoreConfig, kind: str, offset: int, step: str) -> None:
    stderr_path = config.data_dir.parent / f"cut-{step}.stderr"
    with stderr_path.open("wb") as stderr:
        child = subprocess.run(
            [
                sys.executable,
                str(CHILD),
                "--cut",
                str(config.data_dir),
                str(SEGMENT),
                kind,
                str(offset),
                step,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            timeout=LINE_TIMEOUT,
            check=False,
        )
    assert child.returncode == -signal.SIGKILL, (
        child.stdout,
        stderr_path.read_text(errors="replace")[-4000:],
    )


@pytest.mark.parametrize("step", CUT_STEPS)
def test_sigkill_at_each_step_of_a_truncation(tmp_path: Path, step: str) -> None:
    config = config_for(tmp_path / "store", SEGMENT)
    records = trio.run(write_log, config, 700)
    assert records[-1][1] > 4 * SEGMENT, "the cut must delete several segments"
    cut = records[len(records) // 4][0]
    kill_during_cut(config, "truncate", cut, step)
    start, end, kept, report = trio.run(log_after_recovery, config)
    assert (start, end) == (0, cut)
    assert kept == [r for r in records if r[0] < cut]
    assert not report.durable_lost, report
    assert not config.cut_intent_path.exists()


@pytest.mark.parametrize("step", CUT_STEPS)
def test_sigkill_at_each_step_of_a_log_restart(tmp_path: Path, step: str) -> None:
    config = config_for(tmp_path / "store", SEGMENT)
    trio.run(write_log, config, 200)
    start_at = 9 * SEGMENT
    kill_during_cut(config, "restart", start_at, step)
    start, end, kept, report = trio.run(log_after_recovery, config)
    assert (start, end, kept) == (start_at, start_at, [])
    assert not report.durable_lost, report
    assert not config.cut_intent_path.exists()


# ---- a second process on the same data dir ----------------------------------------------------


def test_a_second_process_on_the_data_dir_is_refused_and_the_first_keeps_acking(
    tmp_path: Path,
) -> None:
    """Two stores on one directory lost acked data (recovery ran on the live log). Now the
    second opener is refused, naming the holder's PID, and touches nothing."""
    config = config_for(tmp_path / "store", SEGMENT)
    stderr_path = tmp_path / "holder.stderr"
    acks: dict[int, Ack] = {}
    with stderr_path.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(config.data_dir), str(SEGMENT), "0", "2"],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        lines: queue.Queue[bytes | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(lines, child.stdout), daemon=True)
        pump.start()
        try:
            ready = lines.get(timeout=LINE_TIMEOUT)
            assert ready is not None and ready.startswith(b"READY "), ready
            while len(acks) < 200:
                line = lines.get(timeout=LINE_TIMEOUT)
                assert line is not None, "the holder exited"
                _parse(line, acks)
            segments_before = {p.name for p in config.commit_log_dir.iterdir()}

            async def second_open() -> None:
                async with MessageStore.open(config):
                    raise AssertionError("a second process opened a locked data dir")

            refused = subprocess.run(
                [sys.executable, "-c", SECOND_OPENER, str(config.data_dir), str(SEGMENT)],
                capture_output=True,
                timeout=LINE_TIMEOUT,
                check=False,
                cwd=Path(__file__).parent,
            )
            assert refused.returncode == 3, refused
            assert (
                f"data dir {config.data_dir} is in use by another process (pid {child.pid})"
                in refused.stdout.decode()
            )
            with pytest.raises(DataDirLockedError):  # and in this process too
                trio.run(second_open)
            # Nothing the holder had was deleted (it may have rolled into more since).
            assert segments_before <= {p.name for p in config.commit_log_dir.iterdir()}
            wanted = len(acks) + 200
            while len(acks) < wanted:  # the holder keeps acking durable writes
                line = lines.get(timeout=LINE_TIMEOUT)
                assert line is not None, "the holder exited after the second open"
                _parse(line, acks)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=LINE_TIMEOUT)
            while (line := lines.get(timeout=LINE_TIMEOUT)) is not None:
                _parse(line, acks)
        except BaseException:
            print(stderr_path.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            pump.join(LINE_TIMEOUT)
            assert child.stdout is not None
            child.stdout.close()
    checked, report = trio.run(check_store, config, acks)
    assert not report.durable_lost
    assert checked.records >= len(acks)


SECOND_OPENER = """
import sys
from pathlib import Path
import trio
from crash_child import config_for
from storage import DataDirLockedError, MessageStore

async def main():
    async with MessageStore.open(config_for(Path(sys.argv[1]), int(sys.argv[2]))):
        sys.exit(0)

try:
    trio.run(main)
except DataDirLockedError as refused:
    print(refused)
    sys.exit(3)
"""
