"""Epoch histories: which master wrote which part of the log, and where two logs diverge.

Every master term has an epoch number and the physical offset at which its first
record went (its start offset). A node keeps the list of (epoch, start offset) for
every term its log holds records of, in ``<data_dir>/epochs``. One master per epoch
means a record is identified by (epoch, offset): two nodes that both hold records of
epoch ``e`` hold the same bytes up to where the shorter of the two stops. So comparing
histories, without reading a single record, tells a returning node where its log
stops agreeing with the master's (Kafka's leader-epoch truncation, KIP-101/KIP-279).

The history and the decision are sans-IO; :class:`EpochFile` is the blocking file
(callers run it through ``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import attrs
from crc32c import crc32c

from storage.mapped_file import replace_file_atomically


class EpochHistoryError(ValueError):
    """An entry would break the history's order (a bug in the caller, or a bad file)."""


class EpochFileError(Exception):
    """The epoch file exists but cannot be trusted; the message says what is wrong."""


@attrs.frozen
class EpochEntry:
    """Epoch ``epoch`` began at physical offset ``start_offset``.

    ``led`` says this node was the master of that term (it began it) rather than
    learning it from a master's stream. It is not part of the entry's identity (two
    histories holding the same term compare equal whoever led it), but it decides what
    a slave's history proves: only a term learned from a master shows that a master of
    that epoch exists (see :func:`followed_epoch`).
    """

    epoch: int
    start_offset: int
    led: bool = attrs.field(default=False, eq=False, kw_only=True)


class EpochHistory:
    """The (epoch, start offset) entries of one log, oldest first.

    Invariants, checked on every :meth:`append`: epochs strictly increase (one master
    per epoch, and a newer master has a newer epoch) and start offsets never decrease
    (a term that wrote nothing leaves an entry with the same start as the next one).
    """

    def __init__(self, entries: Iterable[EpochEntry] = ()) -> None:
        self._entries: list[EpochEntry] = []
        for entry in entries:
            self.append(entry.epoch, entry.start_offset, led=entry.led)

    @property
    def entries(self) -> tuple[EpochEntry, ...]:
        return tuple(self._entries)

    @property
    def current(self) -> EpochEntry | None:
        """The newest entry: the epoch the next record of this log belongs to."""
        return self._entries[-1] if self._entries else None

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EpochHistory) and self._entries == other._entries

    def __repr__(self) -> str:
        pairs = ", ".join(f"({e.epoch}, {e.start_offset})" for e in self._entries)
        return f"EpochHistory([{pairs}])"

    def append(self, epoch: int, start_offset: int, *, led: bool = False) -> None:
        """Record that ``epoch`` starts at ``start_offset`` (``led``: this node began it);
        raise if that breaks the order."""
        if epoch < 0 or start_offset < 0:
            raise EpochHistoryError(f"epoch {epoch} at {start_offset}: both must be >= 0")
        last = self.current
        if last is not None and epoch <= last.epoch:
            raise EpochHistoryError(
                f"epoch {epoch} is not newer than the current epoch {last.epoch}"
            )
        if last is not None and start_offset < last.start_offset:
            raise EpochHistoryError(
                f"epoch {epoch} starts at {start_offset}, before epoch {last.epoch} "
                f"(at {last.start_offset})"
            )
        self._entries.append(EpochEntry(epoch, start_offset, led=led))

    def truncate(self, end_offset: int) -> None:
        """Forget the epochs that start at or past ``end_offset`` (the log was cut there).

        Done together with cutting the log, so that the history never names a term
        whose records are gone (Kafka's ``truncateFromEnd``).
        """
        self._entries = [e for e in self._entries if e.start_offset < end_offset]

    def find(self, epoch: int) -> int | None:
        """Index of the newest entry whose epoch is ``epoch`` or older, or None."""
        found = None
        for index, entry in enumerate(self._entries):
            if entry.epoch > epoch:
                break
            found = index
        return found

    def end_offset_for(self, epoch: int, log_end: int) -> tuple[int, int] | None:
        """Kafka's ``endOffsetForEpoch``: (the newest epoch <= ``epoch``, where it ends).

        A term ends where the next one starts; the current term ends at ``log_end``.
        The end never exceeds ``log_end`` (an entry may be ahead of a lagging log).
        None when every known epoch is newer than ``epoch``.
        """
        index = self.find(epoch)
        if index is None:
            return None
        entries = self._entries
        end = entries[index + 1].start_offset if index + 1 < len(entries) else log_end
        return entries[index].epoch, min(end, log_end)

    def first_start(self, log_end: int) -> int:
        """Where the first epoch starts; ``log_end`` for a log that never had an epoch.

        Bytes below it were written before this log knew any epoch.
        """
        return self._entries[0].start_offset if self._entries else log_end


def followed_epoch(history: EpochHistory) -> int | None:
    """The newest epoch this node learned from a master's stream (not one it led), or
    None: what a slave's history proves about which masters exist."""
    learned = [e.epoch for e in history.entries if not e.led]
    return learned[-1] if learned else None


def leader_is_stale(followed: int | None, leader: EpochHistory) -> bool:
    """A follower that learned a newer epoch than the leader's current one from some
    master has seen a newer master: this leader lost its term and must not serve (one
    master per epoch). Terms the follower led itself prove nothing of the kind: a
    demoted master, or a copy of a data dir started on its own, is in a term of its own
    that no master holds, and its records there are a divergent tail to cut."""
    theirs = leader.current
    return followed is not None and (theirs is None or followed > theirs.epoch)


def largest_common_epoch(local: EpochHistory, leader: EpochHistory) -> int | None:
    """The newest term in both histories, or None. A term is the pair (epoch, start
    offset): two nodes that each began an epoch of the same number on their own (a copy
    of a data dir started alone, a master restarted meanwhile) hold different terms,
    told apart by where they start."""
    common = {(e.epoch, e.start_offset) for e in local.entries} & {
        (e.epoch, e.start_offset) for e in leader.entries
    }
    return max((epoch for epoch, _start in common), default=None)


def divergence_point(
    local: EpochHistory, local_end: int, leader: EpochHistory, leader_end: int
) -> int:
    """Where a follower must cut its log so that what it keeps is a prefix of the leader's.

    The rule (Kafka's leader-epoch truncation): take the **largest epoch both histories
    hold**; both logs hold the same records of it (one master per epoch), from its start
    up to where the shorter of the two stops. So the cut is the **smaller of the two end
    offsets of that epoch**, each being the start of the next epoch in that history or,
    for the current epoch, that log's end. Kafka reaches the same epoch in rounds (the
    follower asks with its newest epoch, the leader answers with its newest epoch not
    above it, and so on); with both histories at hand it is one intersection.

    With **no common epoch**, the logs can only share what both wrote before either knew
    an epoch: the cut is the lowest first start (an empty history's is its log end), so
    ``0`` when a history's first epoch starts at 0. The result never exceeds
    ``local_end``: it is ``local_end`` exactly when the follower's log is a prefix.

    Worked example (Kafka's KIP-279 fast fail-over): the follower was master of epoch 4
    and lost it before replicating its writes; meanwhile epochs 3 and 5 happened::

        follower  [(1, 0), (2, 100), (4, 150)]            log end 180
        leader    [(1, 0), (2, 100), (3, 120), (5, 130)]  log end 200

    Common epochs are 1 and 2; the largest is 2. It ends at 150 on the follower (where
    epoch 4 starts) and at 120 on the leader (where epoch 3 starts): the follower cuts
    at 120, dropping its records of epoch 2 beyond 120 and all of epoch 4, then fetches
    from 120.
    """
    assert local_end >= 0 and leader_end >= 0, (local_end, leader_end)
    epoch = largest_common_epoch(local, leader)
    if epoch is None:
        return min(local_end, local.first_start(local_end), leader.first_start(leader_end))
    mine = local.end_offset_for(epoch, local_end)
    theirs = leader.end_offset_for(epoch, leader_end)
    assert mine is not None and theirs is not None  # both hold ``epoch``
    return min(mine[1], theirs[1])


# ---- the file ----------------------------------------------------------------------------

EPOCH_FILE_MAGIC = 0x7D1E_E901
EPOCH_FILE_MAGIC_V2 = 0x7D1E_E902
"""Layout 2: each entry also carries a flags byte (bit 0: this node led the term).
Written only when some entry is led, so a history of learned terms keeps layout 1."""
"""Magic of the epoch file; the low byte is the layout version (1)."""
_HEADER = struct.Struct("<III")  # magic, count, crc
_ENTRY = struct.Struct("<IQ")  # epoch, start offset
_ENTRY_V2 = struct.Struct("<IQB")  # epoch, start offset, flags
_LED = 0x01
MAX_EPOCH = 0xFFFF_FFFF
MAX_OFFSET = 0xFFFF_FFFF_FFFF_FFFF
FILE_NAME = "epochs"


def encode_history(history: EpochHistory) -> bytes:
    """The file's bytes: header, then 12 bytes per entry (see docs/format.md)."""
    for entry in history.entries:
        if entry.epoch > MAX_EPOCH or entry.start_offset > MAX_OFFSET:
            raise EpochHistoryError(f"{entry} does not fit the file's u32 epoch / u64 offset")
    if any(e.led for e in history.entries):
        magic = EPOCH_FILE_MAGIC_V2
        entries = b"".join(
            _ENTRY_V2.pack(e.epoch, e.start_offset, _LED if e.led else 0) for e in history.entries
        )
    else:
        magic = EPOCH_FILE_MAGIC
        entries = b"".join(_ENTRY.pack(e.epoch, e.start_offset) for e in history.entries)
    count = struct.pack("<I", len(history))
    crc = crc32c(entries, crc32c(count))
    return _HEADER.pack(magic, len(history), crc) + entries


def decode_history(raw: bytes, path: Path) -> EpochHistory:
    """Parse the file's bytes; raise :class:`EpochFileError` naming ``path`` and the fault."""
    advice = "restore it from a replica's copy or remove it to rejoin as an empty slave"
    if len(raw) < _HEADER.size:
        raise EpochFileError(f"{path}: {len(raw)} bytes, shorter than the header; {advice}")
    magic, count, crc = _HEADER.unpack_from(raw)
    if magic not in (EPOCH_FILE_MAGIC, EPOCH_FILE_MAGIC_V2):
        raise EpochFileError(f"{path}: bad magic 0x{magic:08x}, not an epoch file; {advice}")
    layout = _ENTRY if magic == EPOCH_FILE_MAGIC else _ENTRY_V2
    expected = _HEADER.size + count * layout.size
    if len(raw) != expected:
        raise EpochFileError(
            f"{path}: {len(raw)} bytes but {count} entries need {expected}; {advice}"
        )
    if crc32c(raw[_HEADER.size :], crc32c(raw[4:8])) != crc:
        raise EpochFileError(f"{path}: CRC mismatch (torn or corrupt file); {advice}")
    if layout is _ENTRY:
        entries = (EpochEntry(*fields) for fields in _ENTRY.iter_unpack(raw[_HEADER.size :]))
    else:
        entries = (
            EpochEntry(epoch, start, led=bool(flags & _LED))
            for epoch, start, flags in _ENTRY_V2.iter_unpack(raw[_HEADER.size :])
        )
    try:
        return EpochHistory(entries)
    except EpochHistoryError as exc:
        raise EpochFileError(f"{path}: entries out of order ({exc}); {advice}") from exc


@attrs.define
class EpochFile:
    """``<data_dir>/epochs``: blocking load and atomic replace of a node's history."""

    path: Path

    @classmethod
    def in_dir(cls, data_dir: Path) -> EpochFile:
        return cls(data_dir / FILE_NAME)

    def load(self) -> EpochHistory:
        """The stored history; empty when there is no file yet (a node that never had an
        epoch). A damaged file raises: guessing could keep a divergent tail."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return EpochHistory()
        return decode_history(raw, self.path)

    def save(self, history: EpochHistory) -> None:
        """Replace the file atomically: write a temporary file, fdatasync it, rename it
        over the old one and fsync the directory, so a crash leaves the old or the new."""
        replace_file_atomically(self.path, encode_history(history))
