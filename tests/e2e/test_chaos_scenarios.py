"""Failover scenarios against a real local cluster, judged by the checker with their
unavailability measured; and a scenario the cluster cannot run is refused up front."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tools.chaos.cli import EXIT_VALID
from tools.chaos.scenarios import SCENARIOS, run_scenario, static_scenarios


async def test_kill_the_master_then_a_slave_loses_nothing_and_recovers(tmp_path: Path) -> None:
    out = io.StringIO()
    outcome = await run_scenario("kill-master-then-slave", out=tmp_path / "run", stream=out)
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


async def test_a_scenario_that_needs_failover_is_refused_with_what_runs_here(
    tmp_path: Path,
) -> None:
    runnable = static_scenarios()
    assert "kill-master" in runnable and "kill-etcd-leader" not in runnable
    with pytest.raises(ValueError, match=r"kill-etcd-leader.*cannot do") as info:
        await run_scenario("kill-etcd-leader", out=tmp_path / "run", stream=io.StringIO())
    assert ", ".join(runnable) in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    assert set(runnable) < set(SCENARIOS)
