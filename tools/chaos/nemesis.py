"""The nemesis: a fault schedule drawn from the seed, run against a cluster, every start and
stop recorded in the history; and the observer that records who is master.

:func:`draw_schedule` is pure: the same seed, duration and fault kinds give the same
schedule, which the run writes to ``run.json``. A schedule alternates quiet periods and
faults (one at a time), each fault naming the role it hits (``master``, ``slave`` or
``any``); :class:`Nemesis` resolves the role to a node when the fault starts and asks the
cluster adapter to build the fault. Every fault it started is healed at the end, even when
the run fails or is cancelled.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from tools.chaos.workload import Recorder
from tools.faults.base import Fault

if TYPE_CHECKING:
    from tools.chaos.runner import ChaosCluster

__all__ = [
    "DISK_LOST_KINDS",
    "Nemesis",
    "ScheduledFault",
    "draw_schedule",
    "observe_master",
]

log = logging.getLogger(__name__)

DISK_LOST_KINDS: Final = frozenset({"wipe"})
"""Fault kinds that destroy a node's disk contents (``disk_lost`` in the history)."""
TARGET_ROLES: Final = ("master", "slave", "any")
"""The roles a drawn schedule picks from; a scenario may also name ``master+slave``."""
OBSERVE_INTERVAL_S: Final = 0.1
ROLE_OF_KIND: Final = {"corrupt": "slave", "switchover": "master+slave"}
"""Kinds whose meaning fixes whom they hit, whatever role the schedule drew: a corrupted
replica is a minority one (never the master), a switchover goes from the master to a slave."""


@attrs.frozen
class ScheduledFault:
    """One fault of a schedule: when it starts (seconds into the run), what it is, whom it
    hits (a role, resolved at start), how long it holds, and its own seed."""

    fault_id: str
    at_s: float
    kind: str
    target: str
    hold_s: float
    seed: int

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def draw_schedule(
    seed: int,
    duration_s: float,
    kinds: Sequence[str],
    *,
    quiet_s: tuple[float, float] = (2.0, 5.0),
    hold_s: tuple[float, float] = (2.0, 6.0),
    lead_in_s: float = 2.0,
) -> list[ScheduledFault]:
    """Quiet, fault, quiet, fault... until ``duration_s``; kinds and targets from ``seed``.

    Each fault ends (its hold) at least one quiet period before the run does, so the last
    one is healed inside the run; a run too short for any fault gets an empty schedule.
    """
    if not kinds:
        raise ValueError("a nemesis schedule needs at least one fault kind")
    rng = random.Random(seed)
    schedule: list[ScheduledFault] = []
    at_s = lead_in_s
    while True:
        at_s += rng.uniform(*quiet_s)
        hold = rng.uniform(*hold_s)
        if at_s + hold + quiet_s[0] > duration_s:
            return schedule
        kind = kinds[rng.randrange(len(kinds))]
        target = TARGET_ROLES[rng.randrange(len(TARGET_ROLES))]
        schedule.append(
            ScheduledFault(
                f"f{len(schedule) + 1}", round(at_s, 3), kind, target, round(hold, 3),
                rng.randrange(1 << 31),
            )
        )  # fmt: skip
        at_s += hold


@attrs.define
class _Active:
    planned: ScheduledFault
    fault: Fault
    targets: list[str]


class Nemesis:
    """Runs a schedule against a cluster, recording each start and stop.

    One task calls :meth:`run`; :meth:`heal_all` (shielded, called by :meth:`run` on every
    exit) stops whatever is still active. ``active`` is read by the progress view.
    ``sequential`` (a drawn schedule): a fault starts no earlier than its time *and* after
    the previous one healed, so a slow start or heal (a power loss rewriting files, a
    restart) never makes two drawn faults overlap; otherwise (a scenario) each fault keeps
    its own time and they may overlap on purpose.
    """

    def __init__(
        self,
        recorder: Recorder,
        cluster: ChaosCluster,
        schedule: Sequence[ScheduledFault],
        *,
        sequential: bool = False,
    ) -> None:
        self.recorder = recorder
        self.cluster = cluster
        self.schedule = list(schedule)
        self.sequential = sequential
        self.active: dict[str, _Active] = {}
        self.done: list[str] = []
        self.errors: list[str] = []
        self._one_at_a_time = trio.Lock()
        """The history's ``nemesis`` process has one operation open at a time, so starts
        and stops of overlapping faults take turns (each still at its own time)."""

    async def run(self) -> None:
        """Every fault of the schedule in its own task (scenarios overlap faults)."""
        try:
            if self.sequential:
                for planned in self.schedule:
                    await self._one(planned)
            else:
                async with trio.open_nursery() as nursery:
                    for planned in self.schedule:
                        nursery.start_soon(self._one, planned)
        finally:
            await self.heal_all()

    async def _one(self, planned: ScheduledFault) -> None:
        delay = planned.at_s - self.recorder.now_s()
        if delay > 0:
            await trio.sleep(delay)  # the schedule itself, not a synchronisation
        await self._start(planned)
        await trio.sleep(planned.hold_s)
        await self._stop(planned.fault_id)

    async def heal_all(self) -> None:
        with trio.CancelScope(shield=True):
            for fault_id in list(self.active):
                await self._stop(fault_id)

    async def _resolve(self, planned: ScheduledFault) -> list[str]:
        master, _epoch = await self.cluster.master()
        names = list(self.cluster.names)
        rng = random.Random(planned.seed)
        others = [name for name in names if name != master]
        target = ROLE_OF_KIND.get(planned.kind, planned.target)
        if target == "master" and master is not None:
            return [master]
        if target == "master+slave" and master is not None and others:
            return [master, rng.choice(others)]
        if target == "slave" and others:
            return [rng.choice(others)]
        return [rng.choice(names)]

    async def _start(self, planned: ScheduledFault) -> None:
        with trio.CancelScope(shield=True):
            async with self._one_at_a_time:
                await self._start_now(planned)

    async def _start_now(self, planned: ScheduledFault) -> None:
        targets = await self._resolve(planned)
        value = {
            "fault": planned.kind,
            "action": "start",
            "fault_id": planned.fault_id,
            "targets": targets,
            "disk_lost": planned.kind in DISK_LOST_KINDS,
        }
        self.recorder.record("invoke", "nemesis", "nemesis", value)
        try:
            fault = self.cluster.fault(planned.kind, targets, planned.seed)
            await fault.inject()
        except Exception as exc:  # a fault that could not start is reported, never fatal
            log.warning("nemesis_start_failed fault=%s error=%s", planned.fault_id, exc)
            self.errors.append(f"{planned.fault_id} {planned.kind}: {exc}")
            self.recorder.record("info", "nemesis", "nemesis", value, error=str(exc))
            return
        self.active[planned.fault_id] = _Active(planned, fault, targets)
        self.recorder.record("ok", "nemesis", "nemesis", {**value, "details": _details(fault)})

    async def _stop(self, fault_id: str) -> None:
        with trio.CancelScope(shield=True):
            async with self._one_at_a_time:
                await self._stop_now(fault_id)

    async def _stop_now(self, fault_id: str) -> None:
        active = self.active.pop(fault_id, None)
        if active is None:
            return
        value = {
            "fault": active.planned.kind,
            "action": "stop",
            "fault_id": fault_id,
            "targets": active.targets,
            "disk_lost": False,
        }
        self.recorder.record("invoke", "nemesis", "nemesis", value)
        try:
            await active.fault.heal()
        except Exception as exc:
            log.error("nemesis_heal_failed fault=%s error=%s", fault_id, exc)
            self.errors.append(f"heal {fault_id} {active.planned.kind}: {exc}")
            self.recorder.record("info", "nemesis", "nemesis", value, error=str(exc))
            return
        self.done.append(fault_id)
        self.recorder.record("ok", "nemesis", "nemesis", value)


def _details(fault: Fault) -> dict[str, Any]:
    """What the fault did, as JSON (e.g. a power loss: how many files and bytes it
    changed), so a run shows its faults had an effect."""
    details: dict[str, Any] = {}
    for key, field in fault.fields().items():
        plain = isinstance(field, str | int | float | bool) or field is None
        details[key] = field if plain else str(field)
    return details


async def observe_master(
    recorder: Recorder, cluster: ChaosCluster, current: list[str | None]
) -> None:
    """Record a ``master`` info event whenever the master (or its epoch) changes; keeps
    ``current[0]`` up to date for the progress view. Runs until cancelled."""
    last: tuple[str | None, int | None] | None = None
    while True:
        seen = await cluster.master()
        if seen != last:
            recorder.record("info", "observer", "master", {"master": seen[0], "epoch": seen[1]})
            last = seen
            current[0] = seen[0]
        await trio.sleep(OBSERVE_INTERVAL_S)
