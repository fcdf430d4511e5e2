"""The checkpoint: how far the log and the consume queues are known to be on disk.

Fixed layout (little endian), written to a temporary file, fsynced and renamed,
so a crash leaves either the old or the new checkpoint, never a mix::

    0  u32 magic  CHECKPOINT_MAGIC
    4  u32 crc    CRC32C of bytes [8, 40)
    8  u64 commit_log_flushed   every log byte below it was fdatasynced
    16 u64 consume_queue_flushed every index entry for records below it was fdatasynced
    24 u64 written_us
    32 u32 clean   1 after a clean shutdown, 0 while the store runs
    36 u32 reserved
"""

from __future__ import annotations

import logging
import os
import struct
import time
from pathlib import Path

import attrs
from crc32c import crc32c

from storage.mapped_file import fsync_directory

log = logging.getLogger(__name__)

CHECKPOINT_MAGIC = 0x7D1E_C001
_LAYOUT = struct.Struct("<IIQQQII")


@attrs.frozen
class Checkpoint:
    commit_log_flushed: int = 0
    consume_queue_flushed: int = 0
    clean: bool = False
    written_us: int = 0

    def encode(self) -> bytes:
        raw = bytearray(
            _LAYOUT.pack(
                CHECKPOINT_MAGIC,
                0,
                self.commit_log_flushed,
                self.consume_queue_flushed,
                self.written_us or time.time_ns() // 1000,
                int(self.clean),
                0,
            )
        )
        struct.pack_into("<I", raw, 4, crc32c(raw[8:]))
        return bytes(raw)

    @classmethod
    def decode(cls, raw: bytes) -> Checkpoint | None:
        """None when the bytes are not a valid checkpoint (treated as "no checkpoint")."""
        if len(raw) != _LAYOUT.size:
            return None
        magic, crc, log_flushed, cq_flushed, written, clean, _ = _LAYOUT.unpack(raw)
        if magic != CHECKPOINT_MAGIC or crc32c(raw[8:]) != crc:
            return None
        return cls(log_flushed, cq_flushed, bool(clean), written)


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
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, checkpoint.encode())
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_directory(path.parent)
