"""``tidelog chaos scenario NAME``: the failover scenarios of a replicated log, each a fixed
short schedule run by :func:`tools.chaos.runner.run_chaos` and judged by the checker, which
measures the unavailability each fault caused (results.json ``recoveries`` and
``unavailability``).

A scenario names the fault kinds it needs; a cluster adapter that lacks one (the static
cluster has no etcd, no leases, no switchover; a node without the fault-injection sync log
cannot lose power faithfully) refuses the scenario with a sentence saying what is missing,
instead of running something weaker under the scenario's name.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TextIO

import attrs

from tools.chaos.nemesis import ScheduledFault
from tools.chaos.runner import (
    BUILT_IN_FAULTS,
    ChaosCluster,
    RunOutcome,
    RunSettings,
    needs_private_network,
    run_chaos,
)
from tools.faults.loopback import in_private_network

__all__ = ["SCENARIOS", "Scenario", "run_scenario", "scenario_settings"]

LEASE_MARGIN_S: Final = 3.0
"""A pause "past the lease" holds the master this long beyond the default lease TTL."""


@attrs.frozen
class Scenario:
    """One named scenario: what it does, its faults (``at_s``/``hold_s`` fixed), and how long
    the workload runs (long enough after the last heal to see recovery)."""

    name: str
    summary: str
    faults: tuple[ScheduledFault, ...]
    duration_s: float

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(planned.kind for planned in self.faults)


def _fault(
    fault_id: str, at_s: float, kind: str, target: str, hold_s: float, seed: int = 0
) -> ScheduledFault:
    return ScheduledFault(fault_id, at_s, kind, target, hold_s, seed)


def _lease_ttl_s() -> float:
    from cluster.coordination.settings import CoordinationSettings

    return float(CoordinationSettings().lease_ttl_s)


def _scenarios() -> dict[str, Scenario]:
    pause_s = _lease_ttl_s() + LEASE_MARGIN_S
    scenarios = [
        Scenario(
            "kill-master",
            "SIGKILL the master; a new master must take writes and no acked message be lost",
            (_fault("f1", 3.0, "kill", "master", 5.0),),
            15.0,
        ),
        Scenario(
            "pause-master",
            f"SIGSTOP the master for {pause_s:g} s, past its lease; it must not ack as a "
            "stale master once resumed",
            (_fault("f1", 3.0, "pause-past-lease", "master", pause_s),),
            10.0 + pause_s,
        ),
        Scenario(
            "partition-master-etcd",
            "cut the master from etcd: it must fence itself before another is elected",
            (_fault("f1", 3.0, "partition-etcd", "master", 8.0),),
            18.0,
        ),
        Scenario(
            "isolate-master-with-slave",
            "the master and one slave cut from the rest (RocketMQ #7017, #6662)",
            (_fault("f1", 3.0, "partition", "master+slave", 6.0),),
            15.0,
        ),
        Scenario(
            "kill-master-then-slave",
            "SIGKILL the master, then a slave while the master is still down",
            (
                _fault("f1", 3.0, "kill", "master", 8.0),
                _fault("f2", 5.0, "kill", "slave", 4.0),
            ),
            18.0,
        ),
        Scenario(
            "three-rapid-failovers",
            "SIGKILL whoever is master three times in quick succession",
            (
                _fault("f1", 3.0, "kill", "master", 1.5),
                _fault("f2", 6.0, "kill", "master", 1.5),
                _fault("f3", 9.0, "kill", "master", 1.5),
            ),
            16.0,
        ),
        Scenario(
            "power-loss-master",
            "the master loses power: what it had not fdatasynced is gone, page by page",
            (_fault("f1", 3.0, "power-loss", "master", 4.0, seed=1),),
            14.0,
        ),
        Scenario(
            "corrupt-minority-replica",
            "flip a bit in a stopped slave's commit log: it must never lead or serve it",
            (_fault("f1", 3.0, "corrupt", "slave", 4.0, seed=1),),
            14.0,
        ),
        Scenario(
            "kill-etcd-leader",
            "SIGKILL etcd's leader member: the cluster must keep its master and its acks",
            (_fault("f1", 3.0, "kill-etcd-leader", "any", 5.0),),
            14.0,
        ),
        Scenario(
            "switchover",
            "an operator switchover to a caught-up slave: no acked message lost, short pause",
            (_fault("f1", 3.0, "switchover", "master+slave", 1.0),),
            12.0,
        ),
    ]
    return {scenario.name: scenario for scenario in scenarios}


SCENARIOS: Final = _scenarios()


def scenario_settings(
    name: str,
    *,
    acks: str = "replicated",
    seed: int = 7,
    out: str | Path | None = None,
    cluster: str = "failover",
) -> RunSettings:
    """The run settings of scenario ``name`` (unknown name: ValueError listing them)."""
    try:
        scenario = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}") from None
    run_dir = Path(out) if out else Path("chaos-runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    return RunSettings(
        duration_s=scenario.duration_s,
        nemesis=tuple(sorted(scenario.kinds)),
        acks=acks,
        seed=seed,
        out=run_dir,
        scenario=name,
        fixed_schedule=scenario.faults,
        cluster=cluster,
    )


async def run_scenario(
    name: str,
    *,
    acks: str = "replicated",
    seed: int = 7,
    out: str | Path | None = None,
    stream: TextIO | None = None,
    cluster: str = "failover",
    cluster_factory: Callable[[Path, Any], Any] | None = None,
) -> RunOutcome:
    """Run scenario ``name``; prints the checker's verdict and the unavailability figures."""
    stream = stream or sys.stdout
    settings = scenario_settings(name, acks=acks, seed=seed, out=out, cluster=cluster)
    missing = SCENARIOS[name].kinds - BUILT_IN_FAULTS[cluster]
    if cluster_factory is None and missing:
        raise ValueError(
            f"scenario {name} needs {', '.join(sorted(missing))}, which the {cluster} local "
            f"cluster cannot do. Scenarios that run on it: "
            f"{', '.join(runnable_scenarios(cluster))}"
        )
    # A run that re-runs itself in a private network prints all of this from the child.
    delegated = (
        needs_private_network(settings, tuple(SCENARIOS[name].kinds), cluster_factory)
        and not in_private_network()
    )
    if not delegated:
        print(f"scenario {name}: {SCENARIOS[name].summary}", file=stream)
    outcome = await run_chaos(settings, out=stream, cluster_factory=cluster_factory, live=False)
    if not delegated:
        print(unavailability_summary(outcome.run_dir), file=stream)
    return outcome


def unavailability_summary(run_dir: Path) -> str:
    """One line per fault: how long sends were unavailable after it, from results.json."""
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    lines = []
    for recovery in results.get("recoveries", []):
        seconds = recovery.get("recovery_s")
        shown = "never recovered" if seconds is None else f"recovered in {seconds:.3f} s"
        lines.append(f"  {recovery['fault_id']} {recovery['fault']}: {shown}")
    windows = [w["duration_s"] for w in results.get("unavailability", []) if w["duration_s"]]
    total = sum(windows)
    lines.append(f"  unavailable {total:.3f} s in {len(windows)} window(s)")
    return "unavailability:\n" + "\n".join(lines)


def required_kinds(cluster: ChaosCluster, name: str) -> frozenset[str]:
    """The kinds scenario ``name`` needs that ``cluster`` lacks (empty: it can run)."""
    return SCENARIOS[name].kinds - cluster.supported_faults()


def runnable_scenarios(cluster: str) -> list[str]:
    """The scenarios a local cluster of this kind (static or failover) can run."""
    faults = BUILT_IN_FAULTS[cluster]
    return [name for name, scenario in SCENARIOS.items() if scenario.kinds <= faults]
