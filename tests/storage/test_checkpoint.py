"""The checkpoint file: what is known to be on disk and which segments must exist.

A damaged or foreign file must read as "no checkpoint" (recovery then scans more),
never as a checkpoint that claims more than is true.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

SEGMENT = 1 << 20
offsets = st.integers(min_value=0, max_value=(1 << 63) - 1)
bases = st.integers(min_value=0, max_value=1 << 40).map(lambda n: n * SEGMENT)


@given(offsets, offsets, st.booleans(), st.integers(1, (1 << 63) - 1), bases, st.integers(0, 64))
def test_encode_decode_round_trip(
    log_flushed: int, queues_flushed: int, clean: bool, written_us: int, first: int, more: int
) -> None:
    checkpoint = Checkpoint(
        log_flushed, queues_flushed, clean, written_us, first, first + more * SEGMENT
    )
    assert Checkpoint.decode(checkpoint.encode()) == checkpoint


def test_a_checkpoint_without_segments_round_trips() -> None:
    checkpoint = Checkpoint(10, 5, True, 1)
    assert Checkpoint.decode(checkpoint.encode()) == checkpoint
    assert checkpoint.required_segments(SEGMENT) == range(0)


def test_required_segments_run_from_first_to_last_inclusive() -> None:
    checkpoint = Checkpoint(0, 0, False, 1, 2 * SEGMENT, 4 * SEGMENT)
    assert list(checkpoint.required_segments(SEGMENT)) == [2 * SEGMENT, 3 * SEGMENT, 4 * SEGMENT]


@given(st.data())
def test_any_flipped_byte_reads_as_no_checkpoint(data: st.DataObject) -> None:
    raw = bytearray(Checkpoint(4096, 2048, True, 7, 0, SEGMENT).encode())
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    assert Checkpoint.decode(bytes(raw)) is None


@pytest.mark.parametrize("size", [0, 1, 39, 41, 55, 57, 4096])
def test_a_file_of_the_wrong_size_is_no_checkpoint(size: int) -> None:
    assert Checkpoint.decode(b"\x01" * size) is None


def test_save_replaces_atomically_and_load_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint"
    assert load_checkpoint(path) is None
    first = Checkpoint(100, 50, False, 1, 0, 0)
    save_checkpoint(path, first)
    second = Checkpoint(200, 150, True, 2, 0, SEGMENT)
    save_checkpoint(path, second)
    assert load_checkpoint(path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"], "no temp file left"


def test_a_damaged_file_loads_as_none_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "checkpoint"
    save_checkpoint(path, Checkpoint(100, 50, True, 1))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert load_checkpoint(path) is None
    assert "checkpoint_unreadable" in caplog.text
