"""A short chaos run against a real local cluster (a master and two slaves as processes):
a fixed seed whose schedule kills and pauses the master and a slave must be judged valid;
and the same harness must FAIL a run whose acknowledged data is really destroyed, so a
passing verdict means something.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import trio

from cluster.client import open_client
from tools.chaos.checker import check
from tools.chaos.cli import EXIT_ANOMALIES, EXIT_VALID
from tools.chaos.history import read_history
from tools.chaos.nemesis import draw_schedule
from tools.chaos.runner import RunSettings, StaticCluster, run_chaos, settings_from_args
from tools.process import NodeProcess

SEED = 8
DURATION_S = 35.0
KINDS = ("kill", "pause")


def _results(run_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    return results


async def test_a_short_kill_and_pause_run_is_valid(tmp_path: Path) -> None:
    schedule = draw_schedule(SEED, DURATION_S, KINDS)
    assert {planned.kind for planned in schedule} == set(KINDS)
    assert any(p.kind == "kill" and p.target == "master" for p in schedule)
    out = io.StringIO()
    settings = RunSettings(duration_s=DURATION_S, nemesis=KINDS, seed=SEED, out=tmp_path / "run")
    outcome = await run_chaos(settings, out=out, live=False)

    assert outcome.exit_code == EXIT_VALID, out.getvalue()
    run_dir = outcome.run_dir
    for name in ("history.jsonl", "run.json", "results.json", "report.html"):
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["seed"] == SEED
    assert set(manifest) >= {"git_revision", "git_dirty"}  # the code the run started with
    assert manifest["command"].startswith("tidelog chaos run --duration 35 --nemesis kill,pause")
    assert [f["fault_id"] for f in manifest["schedule"]] == [p.fault_id for p in schedule]

    events = read_history(run_dir / "history.jsonl")
    result = check(events)
    assert result.valid
    assert outcome.figures["acked"] > 0
    assert result.kind("lost").count == 0
    starts = [
        e for e in events if e.f == "nemesis" and e.type == "ok" and e.value["action"] == "start"
    ]
    stops = [
        e for e in events if e.f == "nemesis" and e.type == "ok" and e.value["action"] == "stop"
    ]
    assert len(starts) == len(schedule) and len(stops) == len(schedule)
    # Every node was drained to its end and digested; the replicas match the master.
    drained = {(e.node, e.value["queue"]) for e in events if e.f == "drain" and e.value.get("end")}
    assert drained == {(n, f"chaos:{q}") for n in ("n1", "n2", "n3") for q in range(4)}
    assert {e.node for e in events if e.f == "digest" and e.type == "ok"} == {"n1", "n2", "n3"}
    assert result.kind("replica_divergence").count == 0
    # The master kill made sends unavailable and they recovered after the restart.
    kill = next(r for r in result.recoveries if r.fault == "kill")
    assert kill.recovery_s is not None
    summary = outcome.figures["summary"]
    assert summary["lost"] == 0 and summary["acked"] == outcome.figures["acked"]
    assert summary["faults"] == {"kill": 2, "pause": 2}
    assert summary["recovery_p99_s"] is not None and "recovery p50" in out.getvalue()


async def _wipe_master(cluster: Any) -> None:
    """Destroy the master's data (kill it, delete its data dir, start it empty): every
    acknowledged message is gone from the node the final drain reads as master."""
    assert isinstance(cluster, StaticCluster)
    master = cluster.nodes["n1"]
    master.kill()
    await trio.to_thread.run_sync(shutil.rmtree, master.data_dir)
    await trio.to_thread.run_sync(master.start)
    async with open_client(master.address) as client:  # topics lived in the data dir too
        await client.admin.create_topic("chaos", 4)


async def test_the_verdict_fails_when_acknowledged_data_is_destroyed(tmp_path: Path) -> None:
    out = io.StringIO()
    settings = RunSettings(duration_s=4.0, nemesis=(), seed=1, out=tmp_path / "run")
    outcome = await run_chaos(settings, out=out, live=False, before_drain=_wipe_master)

    assert outcome.exit_code == EXIT_ANOMALIES, out.getvalue()
    results = _results(outcome.run_dir)
    assert results["valid"] is False
    acked = outcome.figures["acked"]
    assert acked > 0
    lost = results["lost"]
    errors = {k["kind"] for k in results["kinds"] if k["error"] and k["count"]}
    assert "lost" in errors and errors <= {"lost", "vanished_read"}, errors
    assert len(lost) == acked  # every acked message, found from the acks alone
    assert all(point["missing_on"][0] == "n1" for point in lost)
    assert "lost" in out.getvalue() and "FAIL" in out.getvalue()


async def test_runs_against_a_running_node_each_judge_their_own_messages(tmp_path: Path) -> None:
    """``--bootstrap``: the harness did not start the node, so no nemesis and no digests;
    a second run on the same node must not read the first run's messages as unexpected."""
    node = NodeProcess(tmp_path / "solo", name="solo")
    try:
        await trio.to_thread.run_sync(node.start)
        outcomes = []
        for attempt in (1, 2):
            settings = settings_from_args(
                duration_s=2, nemesis="none", acks="durable", seed=attempt,
                out=str(tmp_path / f"run {attempt}"), bootstrap=node.address,
            )  # fmt: skip
            out = io.StringIO()
            outcomes.append((await run_chaos(settings, out=out, live=False), out.getvalue()))
        for outcome, text in outcomes:
            assert outcome.exit_code == EXIT_VALID, text
            assert outcome.figures["summary"]["acked"] > 0
        for attempt, (outcome, _text) in enumerate(outcomes, 1):
            topics = {q["queue"].split(":")[0] for q in _results(outcome.run_dir)["queues"]}
            assert topics == {f"chaos-run-{attempt}"}
    finally:
        node.kill()
