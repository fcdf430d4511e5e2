"""The cut intent: a small file that makes a truncation or a log restart crash-safe.

A cut changes several files (segments deleted from the end, the kept tail zeroed,
consume queues cut, the checkpoint lowered). Before the first of those changes the
store writes this file; after the last one it removes it. A start that finds it
finishes the cut before loading anything, so a kill between any two steps leaves a
log that recovery brings to exactly the state the cut asked for.

Fixed layout (little endian), written to a temporary file, fsynced and renamed::

    0  u32 magic  CUT_MAGIC
    4  u32 crc    CRC32C of bytes [8, 24)
    8  u32 kind   1 = truncate (the log ends at ``offset``), 2 = restart (the log is
                  empty and starts at ``offset``)
    12 u32 reserved (0)
    16 u64 offset
"""

from __future__ import annotations

import enum
import struct
from pathlib import Path

import attrs
from crc32c import crc32c

from storage.errors import CorruptSegmentError
from storage.mapped_file import fsync_directory, replace_file_atomically

CUT_MAGIC = 0x7D1E_C0C7
_LAYOUT = struct.Struct("<IIIIQ")


class CutKind(enum.IntEnum):
    TRUNCATE = 1
    """Everything at or past ``offset`` goes; the log ends there."""
    RESTART = 2
    """Everything goes; the log is empty and its next record lands at ``offset``."""


@attrs.frozen
class CutIntent:
    kind: CutKind
    offset: int

    def encode(self) -> bytes:
        raw = bytearray(_LAYOUT.pack(CUT_MAGIC, 0, int(self.kind), 0, self.offset))
        struct.pack_into("<I", raw, 4, crc32c(raw[8:]))
        return bytes(raw)

    @classmethod
    def decode(cls, raw: bytes) -> CutIntent | None:
        """None when the bytes are not a whole, valid intent."""
        if len(raw) != _LAYOUT.size:
            return None
        magic, crc, kind, _reserved, offset = _LAYOUT.unpack(raw)
        if magic != CUT_MAGIC or crc32c(raw[8:]) != crc or kind not in CutKind._value2member_map_:
            return None
        return cls(CutKind(kind), offset)


def load_cut_intent(path: Path) -> CutIntent | None:
    """Blocking: the pending cut, or None. A damaged file cannot be guessed at: refuse."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    intent = CutIntent.decode(raw)
    if intent is None:
        raise CorruptSegmentError(
            f"{path}: unreadable cut intent (a truncation was under way); the log past the "
            "cut cannot be trusted: restore this node from a replica"
        )
    return intent


def save_cut_intent(path: Path, intent: CutIntent) -> None:
    """Blocking: durably record ``intent`` (temporary file, fsync, rename, fsync the dir)."""
    replace_file_atomically(path, intent.encode())


def clear_cut_intent(path: Path) -> None:
    """Blocking: the cut is complete; durably forget it."""
    path.unlink(missing_ok=True)
    fsync_directory(path.parent)
