"""KeyedWakeups against a model: a wake releases exactly the tasks parked on its key, and
the table holds exactly the keys someone is parked on (cancelled waiters leave no lot)."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from storage.waiters import KeyedWakeups

KEYS = st.integers(0, 3)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("park"), KEYS),
        st.tuples(st.just("wake"), KEYS),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(st.just("wake_even"), st.just(0)),
    ),
    max_size=40,
)


@given(OPS)
def test_a_wake_releases_exactly_the_tasks_parked_on_its_key(
    ops: list[tuple[str, int]],
) -> None:
    async def run() -> None:
        wakeups: KeyedWakeups[int] = KeyedWakeups()
        parked: dict[int, tuple[int, trio.CancelScope]] = {}  # task number -> (key, scope)
        released: set[int] = set()
        expected: set[int] = set()

        async def park(number: int, key: int, task_status: trio.TaskStatus[None]) -> None:
            with parked[number][1]:
                task_status.started()
                await wakeups.wait(key)
                released.add(number)

        async with trio.open_nursery() as nursery:
            for step, (op, arg) in enumerate(ops):
                if op == "park":
                    parked[step] = (arg, trio.CancelScope())
                    await nursery.start(park, step, arg)
                elif op == "wake":
                    woken = [n for n, (key, _) in parked.items() if key == arg]
                    assert wakeups.wake(arg) == len(woken)
                    expected.update(woken)
                    for number in woken:
                        del parked[number]
                elif op == "wake_even":
                    woken = [n for n, (key, _) in parked.items() if key % 2 == 0]
                    assert wakeups.wake_where(lambda key: key % 2 == 0) == len(woken)
                    expected.update(woken)
                    for number in woken:
                        del parked[number]
                elif parked:  # cancel the arg-th parked task
                    number = sorted(parked)[arg % len(parked)]
                    parked.pop(number)[1].cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert released == expected
                keys = {key for key, _ in parked.values()}
                assert len(wakeups) == len(keys)
                for key in range(4):
                    assert wakeups.parked(key) == sum(1 for k, _ in parked.values() if k == key)
            for _key, scope in parked.values():
                scope.cancel()
        assert len(wakeups) == 0

    trio.run(run)


async def test_waking_a_key_nobody_waits_on_leaves_nothing_behind() -> None:
    wakeups: KeyedWakeups[str] = KeyedWakeups()
    assert wakeups.wake("nobody") == 0
    assert not wakeups and wakeups.parked("nobody") == 0
