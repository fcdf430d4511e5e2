"""Epoch histories, the truncation decision, and the epoch file.

Logs are modelled as lists of epoch tags, one per offset: with one master per epoch, a
record is identified by (epoch, offset), so two model logs agree wherever their tags do.
Tag 0 marks records written before the log knew any epoch (assumed common to all nodes).
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.epochs import (
    EPOCH_FILE_MAGIC,
    EpochEntry,
    EpochFile,
    EpochFileError,
    EpochHistory,
    EpochHistoryError,
    decode_history,
    divergence_point,
    encode_history,
    followed_epoch,
    leader_is_stale,
)


@attrs.define
class Node:
    """A model log (epoch tag per offset) and its history."""

    log: list[int] = attrs.field(factory=list)
    history: EpochHistory = attrs.field(factory=EpochHistory)

    def write(self, epoch: int, count: int) -> None:
        """A term of ``epoch`` writing ``count`` records here (0: pre-epoch records)."""
        if epoch and (self.history.current is None or self.history.current.epoch != epoch):
            self.history.append(epoch, len(self.log))
        self.log += [epoch] * count

    def copy(self) -> Node:
        return Node(list(self.log), EpochHistory(self.history.entries))

    def truncate(self, offset: int) -> None:
        del self.log[offset:]
        self.history.truncate(offset)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def cut(follower: Node, leader: Node) -> int:
    return divergence_point(follower.history, len(follower.log), leader.history, len(leader.log))


counts = st.integers(0, 4)


@st.composite
def failovers(draw: st.DrawFn) -> tuple[Node, Node]:
    """Two nodes that shared a history, then went separate ways as a failover makes them.

    Shared: pre-epoch records and some terms. The master of the last shared term wrote
    on; each node got some of those records (both get a prefix of the same sequence).
    Then every newer epoch went to exactly one side: the follower's are the terms of a
    deposed master whose writes never reached the other side.
    """
    epochs = sorted(draw(st.sets(st.integers(1, 99), max_size=9)))
    shared = draw(st.integers(0, len(epochs)))
    base = Node()
    base.write(0, draw(counts))
    for epoch in epochs[:shared]:
        base.write(epoch, draw(counts))
    follower, leader = base.copy(), base.copy()
    last = epochs[shared - 1] if shared else 0
    follower.write(last, draw(counts))
    leader.write(last, draw(counts))
    for epoch in epochs[shared:]:
        (leader if draw(st.booleans()) else follower).write(epoch, draw(counts))
    return follower, leader


@st.composite
def histories(draw: st.DrawFn) -> EpochHistory:
    """Any valid history, up to the file's limits (u32 epochs, u64 offsets)."""
    h = EpochHistory()
    start = draw(st.integers(0, 2**40))
    for epoch in sorted(draw(st.sets(st.integers(0, 2**32 - 1), max_size=12))):
        start += draw(st.one_of(st.just(0), st.integers(0, 2**40)))
        h.append(epoch, start)
    return h


# ---- the decision ----------------------------------------------------------------------------


@given(failovers())
def test_truncated_follower_is_the_longest_prefix_of_the_leader(nodes: tuple[Node, Node]) -> None:
    follower, leader = nodes
    point = cut(follower, leader)
    assert 0 <= point <= len(follower.log)
    assert follower.log[:point] == leader.log[:point]
    assert point == common_prefix(follower.log, leader.log), "no needless truncation"


@given(failovers())
def test_truncation_is_idempotent(nodes: tuple[Node, Node]) -> None:
    follower, leader = nodes
    point = cut(follower, leader)
    follower.truncate(point)
    assert cut(follower, leader) == point == len(follower.log)


@given(failovers())
def test_after_truncation_and_catch_up_the_follower_equals_the_leader(
    nodes: tuple[Node, Node],
) -> None:
    follower, leader = nodes
    follower.truncate(cut(follower, leader))
    newest = follower.history.current.epoch if follower.history.current else -1
    for entry in leader.history.entries:  # what the HA client adopts from the master
        if entry.epoch > newest:
            follower.history.append(entry.epoch, entry.start_offset)
    follower.log = follower.log + leader.log[len(follower.log) :]
    assert follower.log == leader.log
    assert follower.history == leader.history
    assert cut(follower, leader) == len(leader.log)


@given(failovers(), st.data())
def test_a_follower_that_is_a_prefix_is_not_truncated(
    nodes: tuple[Node, Node], data: st.DataObject
) -> None:
    _, leader = nodes
    end = data.draw(st.integers(0, len(leader.log)), label="follower end")
    knows_empty_terms = data.draw(st.booleans(), label="knows terms starting at its end")
    follower = Node(
        leader.log[:end],
        EpochHistory(
            e
            for e in leader.history.entries
            if e.start_offset < end or (knows_empty_terms and e.start_offset == end)
        ),
    )
    assert cut(follower, leader) == end


def history(*pairs: tuple[int, int]) -> EpochHistory:
    return EpochHistory(EpochEntry(epoch, start) for epoch, start in pairs)


def test_kip101_leader_failover_keeps_the_follower_log() -> None:
    """KIP-101 scenario 1: the follower holds m1, m2 of epoch 0, as the leader does; the
    high-watermark rule would cut m2, the epoch rule keeps it."""
    assert divergence_point(history((0, 0)), 2, history((0, 0)), 2) == 2


def test_kip101_replica_divergence() -> None:
    """KIP-101 scenario 2: A wrote m1, m2 in epoch 0, B got only m1, became leader in epoch 1
    and wrote m3 at offset 1. A asks for epoch 0's end: 1 (where epoch 1 starts)."""
    a, b = history((0, 0)), history((0, 0), (1, 1))
    assert divergence_point(a, 2, b, 2) == 1


def test_kip279_fast_failover_needs_the_largest_common_epoch() -> None:
    """KIP-279: the follower's newest epoch (4) is unknown to the leader; Kafka answers
    with epoch 3, the follower asks again with its epoch 2, and cuts at 120."""
    follower = history((1, 0), (2, 100), (4, 150))
    leader = history((1, 0), (2, 100), (3, 120), (5, 130))
    assert leader.end_offset_for(4, 200) == (3, 130)
    assert follower.end_offset_for(3, 180) == (2, 150)
    assert divergence_point(follower, 180, leader, 200) == 120


def test_follower_ahead_in_the_same_epoch_cuts_to_the_leader_end() -> None:
    assert divergence_point(history((0, 0)), 8, history((0, 0)), 5) == 5


def test_no_common_epoch() -> None:
    assert divergence_point(history((1, 0)), 50, history((2, 0)), 80) == 0
    assert divergence_point(history((1, 30)), 50, history((2, 10)), 80) == 10
    assert divergence_point(EpochHistory(), 50, history((2, 40)), 80) == 40, "pre-epoch base"
    assert divergence_point(EpochHistory(), 50, EpochHistory(), 0) == 0


def test_stale_leader() -> None:
    assert leader_is_stale(followed_epoch(history((1, 0), (3, 5))), history((1, 0), (2, 4)))
    assert not leader_is_stale(followed_epoch(history((1, 0), (2, 4))), history((1, 0), (2, 4)))
    assert not leader_is_stale(followed_epoch(EpochHistory()), history((1, 0)))
    # A term the follower led itself proves no newer master exists: it is its own tail.
    own = EpochHistory([EpochEntry(1, 0), EpochEntry(3, 5, led=True)])
    assert followed_epoch(own) == 1
    assert not leader_is_stale(followed_epoch(own), history((1, 0), (2, 4)))


# ---- the history -----------------------------------------------------------------------------


def test_history_invariants_are_enforced() -> None:
    h = history((1, 0), (2, 10))
    assert h.current == EpochEntry(2, 10)
    h.append(3, 10)  # a term that wrote nothing
    with pytest.raises(EpochHistoryError, match="not newer"):
        h.append(3, 20)
    with pytest.raises(EpochHistoryError, match="before epoch 3"):
        h.append(4, 9)
    with pytest.raises(EpochHistoryError):
        h.append(-1, 0)
    assert h == history((1, 0), (2, 10), (3, 10))


def test_end_offset_for() -> None:
    h = history((1, 0), (3, 10), (4, 25))
    assert h.end_offset_for(0, 40) is None
    assert h.end_offset_for(1, 40) == (1, 10)
    assert h.end_offset_for(2, 40) == (1, 10)
    assert h.end_offset_for(3, 40) == (3, 25)
    assert h.end_offset_for(9, 40) == (4, 40)
    assert h.end_offset_for(3, 20) == (3, 20), "never past the log end"


def test_truncate_drops_terms_starting_at_or_past_the_cut() -> None:
    h = history((1, 0), (2, 10), (3, 10), (4, 20))
    h.truncate(10)
    assert h == history((1, 0))


# ---- the file --------------------------------------------------------------------------------


def test_layout_worked_example() -> None:
    """The example in docs/format.md."""
    raw = encode_history(history((1, 0), (3, 4096)))
    assert raw.hex(" ", 4) == (
        "01e91e7d 02000000 88e388c3"  # magic, count = 2, crc
        " 01000000 00000000 00000000"  # epoch 1 at offset 0
        " 03000000 00100000 00000000"  # epoch 3 at offset 4096
    )
    assert int.from_bytes(raw[:4], "little") == EPOCH_FILE_MAGIC


@given(histories())
def test_file_round_trip(tmp_path_factory: pytest.TempPathFactory, h: EpochHistory) -> None:
    epoch_file = EpochFile.in_dir(tmp_path_factory.mktemp("epochs"))
    epoch_file.save(h)
    assert epoch_file.load() == h


def test_missing_file_is_an_empty_history(tmp_path: Path) -> None:
    assert EpochFile.in_dir(tmp_path).load() == EpochHistory()


def test_every_damaged_byte_is_detected(tmp_path: Path) -> None:
    raw = encode_history(history((1, 0), (3, 4096), (7, 1 << 33)))
    path = tmp_path / "epochs"
    for pos in range(len(raw)):
        damaged = bytearray(raw)
        damaged[pos] ^= 0x5A
        path.write_bytes(damaged)
        with pytest.raises(EpochFileError, match=str(path)):
            EpochFile(path).load()


@pytest.mark.parametrize("size", [0, 5, 12, 23, 35])
def test_torn_file_is_detected(tmp_path: Path, size: int) -> None:
    raw = encode_history(history((1, 0), (3, 4096), (7, 1 << 33)))
    (tmp_path / "epochs").write_bytes(raw[:size])
    with pytest.raises(EpochFileError):
        EpochFile.in_dir(tmp_path).load()


def test_entries_out_of_order_with_a_valid_crc_are_refused(tmp_path: Path) -> None:
    good = encode_history(history((5, 0), (6, 10)))
    swapped = good[:12] + good[24:36] + good[12:24]
    from crc32c import crc32c

    crc = crc32c(swapped[12:], crc32c(swapped[4:8])).to_bytes(4, "little")
    with pytest.raises(EpochFileError, match="out of order"):
        decode_history(swapped[:8] + crc + swapped[12:], tmp_path / "epochs")


def test_save_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    epoch_file = EpochFile.in_dir(tmp_path)
    old, new = history((1, 0)), history((1, 0), (2, 99))
    (tmp_path / "epochs.tmp").write_bytes(b"leftover of a crash")
    epoch_file.save(old)
    assert epoch_file.load() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs"]

    def crash(*_args: object) -> None:
        raise OSError("crash before the rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="crash"):
        epoch_file.save(new)
    assert epoch_file.load() == old, "a crash before the rename leaves the old history"
    monkeypatch.undo()
    epoch_file.save(new)
    assert epoch_file.load() == new


def test_led_terms_survive_the_file_and_a_history_without_them_keeps_layout_1(
    tmp_path: Path,
) -> None:
    led = EpochHistory([EpochEntry(1, 0), EpochEntry(2, 4096, led=True)])
    epoch_file = EpochFile.in_dir(tmp_path)
    epoch_file.save(led)
    loaded = epoch_file.load()
    assert loaded == led and [e.led for e in loaded.entries] == [False, True]
    assert int.from_bytes(epoch_file.path.read_bytes()[:4], "little") == EPOCH_FILE_MAGIC + 1
    epoch_file.save(history((1, 0)))
    assert int.from_bytes(epoch_file.path.read_bytes()[:4], "little") == EPOCH_FILE_MAGIC


def test_terms_of_one_epoch_number_begun_apart_are_not_common() -> None:
    """A copy of a data dir started on its own begins epoch 2 where the copy ends; the
    master, restarted meanwhile, began its own epoch 2 elsewhere: only epoch 1 is shared."""
    copy = EpochHistory([EpochEntry(1, 0), EpochEntry(2, 100, led=True)])
    master = history((1, 0), (2, 160))
    assert divergence_point(copy, 180, master, 300) == 100
