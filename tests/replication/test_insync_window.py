"""``InSyncSet.count_window``: the in-sync count and the ends and times it stands for.

The ``acks=in_sync``/``replicated`` admit answers from the window until the set changes
(``HAService.in_sync_count``), so inside it the count must be exactly what judging
every slave again gives, at the boundaries too; outside it nothing is promised (the
admit judges again)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from replication.insync import InSyncSet
from storage import MessageStore
from tests.replication.test_ha_stream import config_at, fill, messages, serving

MAX_BYTES = 1_000
MAX_MS = 500

# Each slave: its ack's distance below the master's end when it last acked, how long
# ago (ms) it was last caught up, and whether it acked since.
slave_states = st.lists(
    st.tuples(st.integers(-200, 2_000), st.integers(0, 1_000), st.booleans()),
    min_size=0,
    max_size=4,
)


def set_with(states: list[tuple[int, int, bool]], end: int, now: float) -> InSyncSet:
    insync = InSyncSet(MAX_BYTES, MAX_MS)
    for index, (behind, caught_ms_ago, acked_since) in enumerate(states):
        name = f"s{index}"
        caught_at = now - caught_ms_ago / 1000
        insync.add(name, max(0, end - behind), end, caught_at)
        if acked_since:  # a later heartbeat at the same offset, not caught up any more
            insync.ack(name, max(0, end - behind), end + 1, caught_at)
    return insync


@given(
    slave_states,
    st.integers(0, 3_000),
    st.integers(0, 2_000),
    st.floats(0, 2.0, allow_nan=False),
)
def test_inside_the_window_the_count_is_what_judging_again_gives(
    states: list[tuple[int, int, bool]], end_delta: int, grow: int, later_s: float
) -> None:
    end, now = 5_000 + end_delta, 100.0
    insync = set_with(states, end, now)
    window = insync.count_window(end, now)
    assert window.count == insync.count_in_sync(end, now)
    assert window.holds(end, now)
    later_end, later_now = end + grow, now + later_s
    if window.holds(later_end, later_now):
        assert insync.count_in_sync(later_end, later_now) == window.count


@given(slave_states, st.integers(0, 3_000))
def test_the_window_reaches_its_byte_and_time_bounds(
    states: list[tuple[int, int, bool]], end_delta: int
) -> None:
    """Both bounds are tight where they bind: the count holds exactly at them (a window
    that stopped short would only cost a judgement, but one that ran past would be
    wrong, so the bound itself is checked on both sides)."""
    end, now = 5_000 + end_delta, 100.0
    insync = set_with(states, end, now)
    window = insync.count_window(end, now)
    if window.end_high != float("inf"):
        high = int(window.end_high)
        assert insync.count_in_sync(high, now) == window.count
        assert window.holds(high, now) and not window.holds(high + 1, now)
    assert not window.holds(end - 1, now)  # a cut lowers the end: judge again


async def test_the_admit_count_follows_acks_time_and_removal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``HAService.in_sync_count`` answered from the window agrees with judging every
    slave, as a slave is added, acks, lags out with time, and is removed."""
    async with MessageStore.open(config_at(tmp_path / "master")) as master:
        await fill(master, messages(5, seed=7))
        async with serving(master, max_lag_bytes=1 << 20, max_lag_ms=MAX_MS) as (
            service,
            _port,
            nursery,
        ):

            def judged() -> int:
                return service.insync.count_in_sync(
                    master.commit_log.max_offset, trio.current_time()
                )

            end = master.commit_log.max_offset
            service.insync.add("s", end, end, trio.current_time())
            assert service.in_sync_count() == judged() == 1
            await fill(master, messages(1, seed=8))  # outstanding now, within the bounds
            assert service.in_sync_count() == judged() == 1
            autojump_clock.jump(MAX_MS / 1000 * 1.5)  # virtual time: it lags out, no ack
            assert service.in_sync_count() == judged() == 0
            service.insync.ack("s", master.commit_log.max_offset, master.commit_log.max_offset,
                               trio.current_time())  # fmt: skip
            assert service.in_sync_count() == judged() == 1
            service.insync.remove("s")
            assert service.in_sync_count() == judged() == 0
            nursery.cancel_scope.cancel()
