"""Disk faults on real files: the power-loss transform (hypothesis), ENOSPC on a real
tmpfs, bit flips and truncations with their undo."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools.faults.disk import (
    PAGE_BYTES,
    SECTOR_BYTES,
    BitFlip,
    FileSync,
    FillDisk,
    PowerLoss,
    SmallTmpfs,
    Truncate,
    apply_power_loss,
    power_loss_image,
    read_sync_log,
)
from tools.faults.process import NodeProcessTarget


def pieces(data: bytes, size: int) -> list[tuple[int, bytes]]:
    return [(start, data[start : start + size]) for start in range(0, len(data), size)]


files = st.tuples(
    st.binary(min_size=0, max_size=5 * PAGE_BYTES),  # current content
    st.integers(0, 6 * PAGE_BYTES),  # synced_upto (may exceed the file: clamped)
    st.integers(0, 2**32),  # seed
    st.booleans(),  # tear
)


@given(files)
def test_power_loss_keeps_synced_bytes_and_each_unit_is_old_or_new(
    case: tuple[bytes, int, int, bool],
) -> None:
    current, synced_upto, seed, tear = case
    synced = min(synced_upto, len(current))
    old = current[:synced]  # append-only contract: zeros past the synced prefix
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch) / "data"
        (data_dir / "log").mkdir(parents=True)
        (data_dir / "log" / "segment").write_bytes(current)
        (data_dir / "checkpoint").write_bytes(b"replaced whole")
        sync_log = Path(scratch) / "syncs.jsonl"
        sync_log.write_text(
            json.dumps({"op": "sync", "path": "log/segment", "synced_upto": synced_upto})
            + "\n"
            + json.dumps({"op": "replace", "path": "checkpoint"})
            + "\n"
        )
        copy = Path(scratch) / "copy"
        shutil.copytree(data_dir, copy)
        syncs = read_sync_log(sync_log)
        apply_power_loss(data_dir, syncs, seed=seed, tear=tear)
        apply_power_loss(copy, syncs, seed=seed, tear=tear)
        image = (data_dir / "log" / "segment").read_bytes()
        assert image == (copy / "log" / "segment").read_bytes()  # deterministic per seed
        assert (data_dir / "checkpoint").read_bytes() == b"replaced whole"
    assert len(image) == len(current)
    assert image[:synced] == current[:synced]
    padded_old = old.ljust(len(current), b"\0")
    unit = SECTOR_BYTES if tear else PAGE_BYTES
    for start, piece in pieces(image, unit):
        if start + len(piece) <= synced:
            continue
        begin = max(start, synced)
        end = start + len(piece)
        assert image[begin:end] in (current[begin:end], padded_old[begin:end])


def test_unsynced_pages_are_each_wholly_kept_or_reverted_and_both_happen() -> None:
    current = b"".join(bytes([index + 1]) * PAGE_BYTES for index in range(8))
    seen = set()
    for seed in range(20):
        image = power_loss_image(current, 0, b"", random.Random(seed))
        for start, page in pieces(image, PAGE_BYTES):
            if page == current[start : start + PAGE_BYTES]:
                seen.add("kept")
            else:
                assert page == bytes(PAGE_BYTES)
                seen.add("reverted")
    assert seen == {"kept", "reverted"}


def test_drop_unrecorded_removes_files_whose_entry_was_never_durable(tmp_path: Path) -> None:
    (tmp_path / "created-and-recorded").write_bytes(b"\x07" * PAGE_BYTES)
    (tmp_path / "never-recorded").write_bytes(b"\x07" * PAGE_BYTES)
    syncs = {"created-and-recorded": FileSync("created-and-recorded", synced_upto=0)}
    changed = apply_power_loss(tmp_path, syncs, seed=1, drop_unrecorded=True)
    assert not (tmp_path / "never-recorded").exists()
    assert changed["never-recorded"] == PAGE_BYTES
    assert (tmp_path / "created-and-recorded").stat().st_size == PAGE_BYTES


def test_a_torn_page_mixes_sectors_of_both_states() -> None:
    current = b"\xff" * PAGE_BYTES * 64
    torn_seen = False
    for seed in range(20):
        image = power_loss_image(current, 0, b"", random.Random(seed), tear=True)
        for _, page in pieces(image, PAGE_BYTES):
            sectors = {sector for _, sector in pieces(page, SECTOR_BYTES)}
            if len(sectors) == 2:
                torn_seen = True
                assert page.startswith(b"\xff" * SECTOR_BYTES)  # a prefix was written
    assert torn_seen


def test_the_sync_log_keeps_the_last_record_and_ignores_a_torn_last_line(tmp_path: Path) -> None:
    log = tmp_path / "syncs.jsonl"
    log.write_text(
        '{"op": "sync", "path": "a", "synced_upto": 8192}\n'
        '{"op": "sync", "path": "a", "synced_upto": 4096, "t_ms": 5}\n'
        '{"op": "delete", "path": "b"}\n'
        '{"op": "sync", "path": "c", "synced_u'
    )
    syncs = read_sync_log(log)
    assert syncs["a"].synced_upto == 4096
    assert syncs["b"].deleted
    assert "c" not in syncs
    log.write_text('not json\n{"op": "sync", "path": "a", "synced_upto": 1}\n')
    with pytest.raises(ValueError, match=":1: not a JSON record"):
        read_sync_log(log)
    log.write_text('{"op": "flush", "path": "a"}\n')
    with pytest.raises(ValueError, match=r"sync\|replace\|delete"):
        read_sync_log(log)


async def test_power_loss_kills_the_process_then_rewrites_its_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    segment = data_dir / "segment"
    segment.write_bytes(b"\x01" * PAGE_BYTES * 16)
    sync_log = data_dir / "syncs.jsonl"
    sync_log.write_text(
        json.dumps({"op": "sync", "path": "segment", "synced_upto": PAGE_BYTES}) + "\n"
    )

    class Child:
        process: subprocess.Popen[bytes] | None = None

        def start(self, timeout: float = 5.0) -> None:
            self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    child = Child()
    child.start()
    try:
        fault = PowerLoss(NodeProcessTarget(child), data_dir, sync_log, seed=11)
        await fault.inject()
        assert child.process is not None and child.process.wait() == -9
        image = segment.read_bytes()
        assert image[:PAGE_BYTES] == b"\x01" * PAGE_BYTES
        assert bytes(PAGE_BYTES) in image  # some unsynced page reverted to fresh zeros
        assert fault.changed["segment"] > 0
        assert "syncs.jsonl" not in fault.changed
        await fault.heal()
        assert child.process.poll() is None  # restarted
    finally:
        assert child.process is not None
        child.process.kill()
        child.process.wait()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@needs_root
async def test_fill_disk_on_a_small_tmpfs_gives_enospc_and_heals(tmp_path: Path) -> None:
    mountpoint = tmp_path / "small"
    async with SmallTmpfs(mountpoint, 256 * 1024) as volume:
        assert str(volume) in Path("/proc/mounts").read_text()
        async with FillDisk(volume):
            with pytest.raises(OSError) as caught, open(volume / "data", "wb") as handle:
                handle.write(b"x" * 8192)
                handle.flush()
                os.fsync(handle.fileno())
            assert caught.value.errno == errno.ENOSPC
        (volume / "data").write_bytes(b"x" * 8192)  # space is back
    assert str(mountpoint) not in Path("/proc/mounts").read_text()
    assert not mountpoint.exists()


async def test_bit_flip_changes_one_bit_and_heal_restores(tmp_path: Path) -> None:
    path = tmp_path / "segment"
    original = bytes(range(256)) * 64
    path.write_bytes(original)
    async with BitFlip(path, seed=5, start=100, end=200) as fault:
        assert isinstance(fault, BitFlip)
        flipped = path.read_bytes()
        diffs = [i for i, (a, b) in enumerate(zip(flipped, original, strict=True)) if a != b]
        assert diffs == [fault.offset]
        assert fault.offset is not None and 100 <= fault.offset < 200
        assert bin(flipped[fault.offset] ^ original[fault.offset]).count("1") == 1
    assert path.read_bytes() == original
    again = BitFlip(path, seed=5, start=100, end=200)
    await again.inject()
    assert again.offset == fault.offset  # seeded: the same bit
    await again.heal()


async def test_truncate_cuts_and_heal_puts_the_tail_back(tmp_path: Path) -> None:
    path = tmp_path / "segment"
    original = os.urandom(10_000)
    path.write_bytes(original)
    async with Truncate(path, seed=3) as fault:
        assert isinstance(fault, Truncate)
        assert fault.length is not None
        assert path.read_bytes() == original[: fault.length]
    assert path.read_bytes() == original


async def test_corrupting_a_running_node_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "segment"
    path.write_bytes(b"data")

    class Running:
        pid = os.getpid()

        async def restart(self) -> None:
            raise AssertionError("not restarted in this test")

    with pytest.raises(RuntimeError, match="is running"):
        await BitFlip(path, offset=0, target=Running()).inject()
    assert path.read_bytes() == b"data"
