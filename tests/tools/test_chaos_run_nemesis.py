"""The nemesis against real in-process faults (partitions of real loopback proxies): every
start and stop is recorded as the history contract says, overlapping faults take turns in
the history, and whatever is active when the run ends is healed and recorded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from tools.chaos.checker import check
from tools.chaos.history import Event, HistoryWriter, read_history
from tools.chaos.nemesis import Nemesis, ScheduledFault, observe_master
from tools.chaos.workload import Recorder
from tools.faults import Fault, FaultProxy, ProxyPartition


class SlowPartition(ProxyPartition):
    """A partition that takes a while to set up, as a kill waiting for its process to exit
    does: its start is still open when the next fault is due."""

    async def _inject(self) -> None:
        await trio.sleep(0.2)
        await super()._inject()


class ProxiedNodes:
    """Two "nodes" that are loopback proxies (to a closed port: nothing travels anyway);
    ``partition`` holds a node's proxy. Enough of a ChaosCluster for the nemesis."""

    def __init__(self, proxies: dict[str, FaultProxy]) -> None:
        self.proxies = proxies
        self.made: list[Fault] = []

    @property
    def names(self) -> Sequence[str]:
        return sorted(self.proxies)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.proxies[name].port}"

    def data_dir(self, name: str) -> Path | None:
        return None

    def supported_faults(self) -> frozenset[str]:
        return frozenset({"partition"})

    def fault(self, kind: str, targets: Sequence[str], seed: int) -> Fault:
        if kind != "partition":
            raise ValueError(f"no {kind} here")
        (target,) = targets
        fault = SlowPartition(self.proxies[target])
        self.made.append(fault)
        return fault

    async def master(self) -> tuple[str | None, int | None]:
        return "a", 1

    async def status(self, name: str) -> dict[str, Any] | None:
        return None


class WatchedRecorder(Recorder):
    """The run's recorder, which also wakes a test waiting for the next event recorded."""

    def __init__(self, writer: HistoryWriter) -> None:
        super().__init__(writer)
        self._recorded = trio.Event()

    def record(self, *args: Any, **kwargs: Any) -> Event:
        event = super().record(*args, **kwargs)
        self._recorded.set()
        self._recorded = trio.Event()
        return event

    async def next_event(self) -> None:
        await self._recorded.wait()


def _nemesis_events(path: Path) -> list[tuple[str, str, str]]:
    return [
        (e.type, e.value["fault_id"], e.value["action"])
        for e in read_history(path)
        if e.f == "nemesis"
    ]


async def test_overlapping_faults_take_turns_and_all_heal(tmp_path: Path) -> None:
    proxies = {name: FaultProxy("127.0.0.1", 9, name=name) for name in ("a", "b")}
    async with trio.open_nursery() as nursery:
        for proxy in proxies.values():
            await nursery.start(proxy.serve)
        cluster = ProxiedNodes(proxies)
        history = tmp_path / "history.jsonl"
        with HistoryWriter(history) as writer:
            recorder = WatchedRecorder(writer)
            schedule = [
                ScheduledFault("f1", 0.0, "partition", "master", 0.3, 1),
                ScheduledFault("f2", 0.1, "partition", "slave", 0.1, 2),
                ScheduledFault("f3", 0.2, "explode", "any", 0.1, 3),
                ScheduledFault("f4", 0.3, "partition", "slave", 60.0, 4),
            ]
            nemesis = Nemesis(recorder, cluster, schedule)
            master: list[str | None] = [None]
            nursery.start_soon(observe_master, recorder, cluster, master)
            # f4 holds 60 s: the run ends while it is active, once f1 and f2 healed and f3
            # failed (on those events: a fixed time is one a loaded machine can overrun).
            async with trio.open_nursery() as run:
                run.start_soon(nemesis.run)
                with trio.fail_after(30):
                    while not (
                        set(nemesis.active) == {"f4"}
                        and {"f1", "f2"} <= set(nemesis.done)
                        and nemesis.errors
                    ):
                        await recorder.next_event()
                run.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    events = _nemesis_events(history)
    # Every invoke is followed by its own completion: one nemesis operation open at a time.
    assert len(events) == 14 and _paired(events)
    started = {f for t, f, a in events if t == "ok" and a == "start"}
    stopped = {f for t, f, a in events if t == "ok" and a == "stop"}
    assert started == stopped == {"f1", "f2", "f4"}
    assert ("info", "f3", "start") in events  # an unknown kind is reported, not fatal
    details = [
        e.value["details"]
        for e in read_history(history)
        if e.f == "nemesis" and e.type == "ok" and e.value["action"] == "start"
    ]
    assert len(details) == 3 and all(d["mode"] == "blackhole" for d in details), details
    assert nemesis.errors and "explode" in nemesis.errors[0]
    assert not nemesis.active and all(not fault.active for fault in cluster.made)
    assert all(not proxy.held for proxy in proxies.values())
    assert master == ["a"]
    windows = {w.fault_id: w for w in check(read_history(history)).faults}
    assert set(windows) == {"f1", "f2", "f3", "f4"} and windows["f4"].stop_s is not None


def _paired(events: list[tuple[str, str, str]]) -> bool:
    """Each invoke is directly followed by a completion of the same fault and action."""
    pairs = list(zip(events[::2], events[1::2], strict=True))
    return all(i[0] == "invoke" and c[0] in ("ok", "info") and i[1:] == c[1:] for i, c in pairs)


async def test_a_drawn_schedule_never_overlaps_even_when_a_start_is_slow(tmp_path: Path) -> None:
    """A sequential nemesis (drawn schedules) starts a fault only after the previous one
    healed; a scenario's nemesis keeps each fault's own time. f1's start (0.2 s) outlasts
    the gap before f2 is due: in a drawn run two faults would otherwise hold together (two
    power losses at once took a failover run's quorum down)."""
    schedule = [
        ScheduledFault("f1", 0.0, "partition", "master", 0.05, 1),
        ScheduledFault("f2", 0.1, "partition", "slave", 0.05, 2),
    ]

    async def order(sequential: bool, name: str) -> list[tuple[str, str, str]]:
        proxies = {node: FaultProxy("127.0.0.1", 9, name=node) for node in ("a", "b")}
        async with trio.open_nursery() as nursery:
            for proxy in proxies.values():
                await nursery.start(proxy.serve)
            history = tmp_path / f"{name}.jsonl"
            with HistoryWriter(history) as writer:
                nemesis = Nemesis(
                    Recorder(writer), ProxiedNodes(proxies), schedule, sequential=sequential
                )
                await nemesis.run()
            nursery.cancel_scope.cancel()
        return [e for e in _nemesis_events(history) if e[0] == "ok"]

    assert await order(True, "drawn") == [
        ("ok", "f1", "start"), ("ok", "f1", "stop"), ("ok", "f2", "start"), ("ok", "f2", "stop"),
    ]  # fmt: skip
    overlapping = await order(False, "scenario")
    assert overlapping[:2] == [("ok", "f1", "start"), ("ok", "f2", "start")]


async def test_corrupt_hits_a_slave_and_switchover_goes_master_to_slave(tmp_path: Path) -> None:
    """Whatever role a drawn schedule gave them (they were refused when it drew the
    master for a corruption, or a slave as the switchover's source)."""
    proxies = {node: FaultProxy("127.0.0.1", 9, name=node) for node in ("a", "b")}
    schedule = [
        ScheduledFault("f1", 0.0, "corrupt", "master", 0.0, 1),
        ScheduledFault("f2", 0.0, "switchover", "slave", 0.0, 2),
    ]
    with HistoryWriter(tmp_path / "history.jsonl") as writer:
        nemesis = Nemesis(Recorder(writer), ProxiedNodes(proxies), schedule, sequential=True)
        targets = [await nemesis._resolve(planned) for planned in schedule]
    assert targets == [["b"], ["a", "b"]]  # "a" is the master
