"""The checkpoint: how far the log and the consume queues are known to be on disk, and
which commit-log segment files must exist.

Fixed layout (little endian), written to a temporary file, fsynced and renamed,
so a crash leaves either the old or the new checkpoint, never a mix::

    0  u32 magic  CHECKPOINT_MAGIC
    4  u32 crc    CRC32C of bytes [8, end)
    8  u64 commit_log_flushed   every log byte below it was fdatasynced
    16 u64 consume_queue_flushed every index entry for records below it was fdatasynced
    24 u64 written_us
    32 u32 clean   1 after a clean shutdown, 0 while the store runs
    36 u32 reserved
    40 u64 first_segment  base of the log's first segment (NO_SEGMENT: none)
    48 u64 last_segment   base of the log's last (active) segment when written

A 40-byte checkpoint (written before the segment fields existed) still reads, with no
segment fields. Every segment from ``first_segment`` to ``last_segment`` must exist at
start: a missing one was deleted or lost outside the store, and the store refuses to
start naming it. Retention writes the new ``first_segment`` before it deletes, so its
own deletions never look like a loss.
"""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path

import attrs
from crc32c import crc32c

from storage.mapped_file import replace_file_atomically

log = logging.getLogger(__name__)

CHECKPOINT_MAGIC = 0x7D1E_C001
_LAYOUT = struct.Struct("<IIQQQIIQQ")
_LAYOUT_V1 = struct.Struct("<IIQQQII")
NO_SEGMENT = (1 << 64) - 1


@attrs.frozen
class Checkpoint:
    commit_log_flushed: int = 0
    consume_queue_flushed: int = 0
    clean: bool = False
    written_us: int = 0
    first_segment: int | None = None
    """Base of the log's first segment; None: no segment (or an old checkpoint)."""
    last_segment: int | None = None
    """Base of the log's last segment when this was written."""

    def __attrs_post_init__(self) -> None:
        assert (self.first_segment is None) == (self.last_segment is None), self
        assert self.first_segment is None or self.first_segment <= (self.last_segment or 0)

    def required_segments(self, segment_size: int) -> range:
        """The bases of the segment files that must exist (empty when unknown)."""
        if self.first_segment is None or self.last_segment is None:
            return range(0)
        return range(self.first_segment, self.last_segment + segment_size, segment_size)

    def encode(self) -> bytes:
        first = NO_SEGMENT if self.first_segment is None else self.first_segment
        last = NO_SEGMENT if self.last_segment is None else self.last_segment
        raw = bytearray(
            _LAYOUT.pack(
                CHECKPOINT_MAGIC,
                0,
                self.commit_log_flushed,
                self.consume_queue_flushed,
                self.written_us or time.time_ns() // 1000,
                int(self.clean),
                0,
                first,
                last,
            )
        )
        struct.pack_into("<I", raw, 4, crc32c(raw[8:]))
        return bytes(raw)

    @classmethod
    def decode(cls, raw: bytes) -> Checkpoint | None:
        """None when the bytes are not a valid checkpoint (treated as "no checkpoint")."""
        if len(raw) == _LAYOUT.size:
            magic, crc, log_flushed, cq_flushed, written, clean, _, first, last = _LAYOUT.unpack(
                raw
            )
        elif len(raw) == _LAYOUT_V1.size:
            magic, crc, log_flushed, cq_flushed, written, clean, _ = _LAYOUT_V1.unpack(raw)
            first = last = NO_SEGMENT
        else:
            return None
        if magic != CHECKPOINT_MAGIC or crc32c(raw[8:]) != crc:
            return None
        if (first == NO_SEGMENT) != (last == NO_SEGMENT) or (first != NO_SEGMENT and first > last):
            return None
        return cls(
            log_flushed,
            cq_flushed,
            bool(clean),
            written,
            None if first == NO_SEGMENT else first,
            None if last == NO_SEGMENT else last,
        )


def load_checkpoint(path: Path) -> Checkpoint | None:
    """Read the checkpoint; None (logged) when missing or damaged: recovery then scans more."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    checkpoint = Checkpoint.decode(raw)
    if checkpoint is None:
        log.warning("checkpoint_unreadable path=%s action=full_recovery", path)
    return checkpoint


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Blocking: atomically replace the checkpoint file."""
    replace_file_atomically(path, checkpoint.encode())
