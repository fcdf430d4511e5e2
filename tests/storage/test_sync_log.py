"""The fault-injection sync log: off by default, and when on it records what each sync
made durable (segment creation, fdatasync ranges, atomic replaces) and obeys the disk
control file (an injected error or delay)."""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import sync_log
from storage.mapped_file import MappedFile, replace_file_atomically
from storage.sync_log import CONTROL_ENV, SYNC_LOG_ENV, DiskControl, SyncLog, from_environ


def _control(path: Path, fields: dict[str, object]) -> None:
    """Replace the control file by rename, as the harness does."""
    tmp = path.with_name("disk.tmp")
    tmp.write_text(json.dumps(fields))
    tmp.replace(path)


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncLog]:
    log = SyncLog(tmp_path / "sync.jsonl", tmp_path / "disk.json")
    monkeypatch.setattr(sync_log, "ACTIVE", log)
    yield log
    log.close()


def test_off_unless_the_environment_names_a_log(tmp_path: Path) -> None:
    assert from_environ({}) is None
    with pytest.raises(ValueError, match=SYNC_LOG_ENV):
        from_environ({CONTROL_ENV: str(tmp_path / "disk.json")})
    # The log's folder may not exist yet (a cluster's root before its first node starts).
    enabled = from_environ({SYNC_LOG_ENV: str(tmp_path / "nodes" / "sync.jsonl")})
    assert enabled is not None and enabled.control is None
    assert (tmp_path / "nodes" / "sync.jsonl").is_file()
    enabled.close()


def test_creation_syncs_and_replaces_are_recorded(recording: SyncLog, tmp_path: Path) -> None:
    segments = tmp_path / "commitlog"
    segments.mkdir()
    segment = MappedFile.create(segments, 0, 1 << 16, warm=False)
    try:
        segment.view[:100] = b"a" * 100
        segment.wrote = 100
        segment.sync()
        segment.view[100:150] = b"b" * 50  # written, not counted in wrote: not claimed
        segment.sync()
    finally:
        segment.close()
    replace_file_atomically(tmp_path / "checkpoint", b"state")
    path = str(segment.path)
    assert _records(recording.path) == [
        {"op": "sync", "path": path, "synced_upto": 0},
        {"op": "sync", "path": path, "synced_upto": 100},
        {"op": "sync", "path": path, "synced_upto": 100},
        {"op": "replace", "path": str(tmp_path / "checkpoint")},
    ]


def test_the_control_file_fails_or_delays_fsyncs_until_removed(
    recording: SyncLog, tmp_path: Path
) -> None:
    segment = MappedFile.create(tmp_path, 0, 1 << 16, warm=False)
    control = tmp_path / "disk.json"
    try:
        _control(control, {"fsync_error": "EIO"})
        with pytest.raises(OSError) as raised:
            segment.sync()
        assert raised.value.errno == errno.EIO and "injected" in str(raised.value)
        _control(control, {"fsync_delay_ms": 1})
        segment.sync()
        control.unlink()
        segment.sync()
    finally:
        segment.close()
    ops = [
        (r["op"], r.get("fsync_error"), r.get("fsync_delay_ms")) for r in _records(recording.path)
    ]
    assert ops == [
        ("sync", None, None),  # created
        ("fault", "EIO", 0),  # failed: no sync record follows
        ("fault", None, 1),
        ("sync", None, None),
        ("sync", None, None),  # the control file is gone: no fault
    ]


@pytest.mark.parametrize(
    "text", ['{"fsync_error": "ENOTANERRNO"}', "[1]", '{"fsync_delay_ms": -1}', "{oops"]
)
def test_a_bad_control_file_is_refused_by_name(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match=r"disk\.json"):
        DiskControl.parse(text, tmp_path / "disk.json")
