"""Failover scenarios against a real local cluster, judged by the checker with their
unavailability measured; and a scenario the cluster cannot run is refused up front."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tools.chaos.cli import EXIT_VALID
from tools.chaos.scenarios import SCENARIOS, run_scenario, runnable_scenarios


async def test_kill_the_master_then_a_slave_loses_nothing_and_recovers(tmp_path: Path) -> None:
    out = io.StringIO()
    outcome = await run_scenario(
        "kill-master-then-slave", out=tmp_path / "run", stream=out, cluster="static"
    )
    assert outcome.exit_code == EXIT_VALID, out.getvalue()
    results = json.loads((outcome.run_dir / "results.json").read_text())
    assert results["valid"] and not results["lost"]
    recoveries = {r["fault_id"]: r for r in results["recoveries"]}
    assert set(recoveries) == {"f1", "f2"}
    # The master's kill stopped every send until it came back: a window, then recovery.
    assert results["unavailability"] and recoveries["f1"]["recovery_s"] is not None
    assert all(w["end_s"] is not None for w in results["unavailability"])
    kinds = [f["fault"] for f in results["faults"]]
    assert kinds == ["kill", "kill"]
    assert "unavailability:" in out.getvalue() and "f1 kill: recovered in" in out.getvalue()
    manifest = json.loads((outcome.run_dir / "run.json").read_text())
    assert manifest["command"].startswith("tidelog chaos scenario kill-master-then-slave ")
    assert [f["fault_id"] for f in manifest["schedule"]] == ["f1", "f2"]


async def test_a_scenario_the_cluster_cannot_run_is_refused_with_what_runs_there(
    tmp_path: Path,
) -> None:
    static = runnable_scenarios("static")
    assert "kill-master" in static and "kill-etcd-leader" not in static
    assert "kill-etcd-leader" in runnable_scenarios("failover")
    with pytest.raises(ValueError, match=r"kill-etcd-leader.*static local cluster") as info:
        await run_scenario(
            "kill-etcd-leader", out=tmp_path / "run", stream=io.StringIO(), cluster="static"
        )
    assert ", ".join(static) in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    assert set(static) < set(SCENARIOS)


async def test_kill_the_master_fails_over_to_a_new_master_without_loss(tmp_path: Path) -> None:
    """On etcd with elected masters: the master's SIGKILL makes another node master in a
    higher epoch, sends recover on it, and every acked message is on every node."""
    out = io.StringIO()
    outcome = await run_scenario("kill-master", out=tmp_path / "run", stream=out)
    assert outcome.exit_code == EXIT_VALID, out.getvalue()
    results = json.loads((outcome.run_dir / "results.json").read_text())
    assert results["valid"] and not results["lost"]
    masters = [m for m in results["master_changes"] if m["master"] is not None]
    first, last = masters[0], masters[-1]
    assert last["master"] != first["master"] and last["epoch"] > first["epoch"]
    (recovery,) = results["recoveries"]
    assert recovery["fault"] == "kill" and recovery["recovery_s"] is not None
    assert outcome.figures["quiesce"]["settled"]
    manifest = json.loads((outcome.run_dir / "run.json").read_text())
    assert manifest["cluster"] == "FailoverCluster"
