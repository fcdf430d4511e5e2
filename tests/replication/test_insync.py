"""The in-sync decision (``replication.insync``), without sockets or clocks: properties
over random ack/append/time histories, plus the cases the HA service relies on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.insync import InSyncSet

MAX_BYTES = 1_000
MAX_MS = 500

# One step of a history: the master appends, time passes, or a slave acks some of the
# outstanding bytes (0 = a heartbeat repeating its offset).
steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 800)),
        st.tuples(st.just("wait"), st.integers(1, 400)),
        st.tuples(st.just("ack"), st.integers(0, 1_000)),
    ),
    max_size=40,
)


def play(history: list[tuple[str, int]]) -> tuple[InSyncSet, int, float]:
    """Run a history for slave ``s`` against a fresh set; return (set, master end, now)."""
    insync = InSyncSet(MAX_BYTES, MAX_MS)
    end, now = 0, 0.0
    insync.add("s", 0, end, now)
    ack = 0
    for kind, amount in history:
        if kind == "append":
            end += amount
        elif kind == "wait":
            now += amount / 1000
        else:
            ack = min(end, ack + amount)
            insync.ack("s", ack, end, now)
    return insync, end, now


@given(steps, st.integers(1, 5_000))
def test_silence_never_brings_a_slave_back(history: list[tuple[str, int]], wait_ms: int) -> None:
    """Monotone in time: with no ack and no append, an out-of-sync slave stays out."""
    insync, end, now = play(history)
    if not insync.is_in_sync("s", end, now):
        assert not insync.is_in_sync("s", end, now + wait_ms / 1000)


@given(steps)
def test_a_silent_lagging_slave_drops_out_after_max_lag_ms(history: list[tuple[str, int]]) -> None:
    insync, end, now = play(history)
    if insync.slaves["s"].ack_offset < end:
        assert not insync.is_in_sync("s", end, now + (MAX_MS + 1) / 1000)
    else:  # nothing outstanding: silence is the heartbeat's business, not the lag's
        assert insync.is_in_sync("s", end, now + 3600)


@given(steps)
def test_catching_up_brings_a_slave_back(history: list[tuple[str, int]]) -> None:
    insync, end, now = play(history)
    later = now + 10 * MAX_MS / 1000
    insync.ack("s", end, end, later)
    assert insync.is_in_sync("s", end, later)
    assert insync.in_sync(end, later) == {"s": end}
    lag = insync.lags(end, later)[0]
    assert (lag.lag_bytes, lag.lag_ms, lag.in_sync) == (0, 0.0, True)


@given(steps, st.integers(0, 2_000))
def test_a_further_ack_never_hurts(history: list[tuple[str, int]], extra: int) -> None:
    """Monotone in the ack: acking more (at the same moment) never drops a slave."""
    insync, end, now = play(history)
    before = insync.is_in_sync("s", end, now)
    insync.ack("s", min(end, insync.slaves["s"].ack_offset + extra), end, now)
    assert insync.is_in_sync("s", end, now) or not before


@given(steps)
def test_byte_lag_bound(history: list[tuple[str, int]]) -> None:
    insync, end, now = play(history)
    if end - insync.slaves["s"].ack_offset > MAX_BYTES:
        assert not insync.is_in_sync("s", end, now)


def test_steady_ack_behind_a_moving_end_counts_as_caught_up() -> None:
    """Under load an ack rarely equals the end when it lands; reaching the end of the
    previous ack still proves the slave keeps up (Kafka's rule)."""
    insync = InSyncSet(MAX_BYTES, MAX_MS)
    insync.add("s", 0, 0, 0.0)
    end = 0
    for tick in range(1, 100):
        previous_end = end
        end += 100
        insync.ack("s", previous_end, end, tick * 0.1)  # always one step behind
        assert insync.is_in_sync("s", end, tick * 0.1)


def test_slower_than_the_producers_drops_out_despite_acking() -> None:
    insync = InSyncSet(10**9, MAX_MS)
    insync.add("s", 0, 0, 0.0)
    end = ack = 0
    for tick in range(1, 20):
        end += 200
        ack += 100  # never reaches where the master was at its previous ack
        insync.ack("s", ack, end, tick * 0.1)
    assert not insync.is_in_sync("s", end, 1.9)
    assert insync.lags(end, 1.9)[0].lag_ms > MAX_MS


def test_add_and_remove() -> None:
    insync = InSyncSet(MAX_BYTES, MAX_MS)
    insync.add("a", 500, 500, 0.0)
    insync.add("b", 0, 500, 0.0)  # a new slave gets max_lag_ms to catch up
    assert insync.in_sync(500, 0.1) == {"a": 500, "b": 0}
    assert insync.in_sync(500, 1.0) == {"a": 500}
    insync.add("b", 500, 500, 1.0)  # reconnects caught up
    assert insync.in_sync(500, 1.0) == {"a": 500, "b": 500}
    insync.remove("a")
    insync.remove("a")  # idempotent
    insync.ack("a", 600, 600, 1.1)  # a late frame of a removed slave is ignored
    assert insync.in_sync(500, 1.1) == {"b": 500}
    assert not insync.is_in_sync("a", 500, 1.1)
    assert [lag.name for lag in insync.lags(500, 1.1)] == ["b"]
    insync.add("c", 0, 5_000, 1.1)  # too far behind to count even at once
    assert "c" not in insync.in_sync(5_000, 1.1)


def test_acks_never_move_back() -> None:
    insync = InSyncSet(MAX_BYTES, MAX_MS)
    insync.add("s", 0, 100, 0.0)
    insync.ack("s", 100, 100, 0.1)
    insync.ack("s", 50, 100, 0.2)
    assert insync.slaves["s"].ack_offset == 100


def test_rejects_negative_bounds() -> None:
    with pytest.raises(ValueError):
        InSyncSet(-1, 10)
    with pytest.raises(ValueError):
        InSyncSet(10, -1)


@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 3_000)), max_size=12),
    st.lists(st.tuples(st.integers(0, 3_000), st.integers(0, 2_000)), max_size=12),
    st.frozensets(st.sampled_from("abcd")),
)
def test_count_in_sync_is_the_size_of_the_in_sync_set(
    slaves: list[tuple[str, int]], history: list[tuple[int, int]], members: frozenset[str]
) -> None:
    """The admit's count agrees with :meth:`InSyncSet.in_sync` over any history, with and
    without a membership filter, at the edge of ``max_lag_ms`` too."""
    insync = InSyncSet(MAX_BYTES, MAX_MS)
    end, now = 0, 0.0
    for name, ack in slaves:
        insync.add(name, min(ack, end), end, now)
    for grow, wait_ms in history:
        end += grow
        now += wait_ms / 1000
        for name in sorted(insync.slaves)[: grow % 3]:
            insync.ack(name, end - grow // 2, end, now)
    for later_ms in (0, MAX_MS, MAX_MS + 1):
        at = now + later_ms / 1000
        in_sync = insync.in_sync(end, at)
        assert insync.count_in_sync(end, at) == len(in_sync)
        assert insync.count_in_sync(end, at, members.__contains__) == len(
            [name for name in in_sync if name in members]
        )
