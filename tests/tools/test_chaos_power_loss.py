"""Power loss in chaos runs on the failover cluster (real etcd and node processes, each
node recording its fdatasyncs): the master loses what it had not synced, a slave takes
over, and the checker finds every ``replicated`` ack on every node. Long: ``make chaos``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tools.chaos.cli import EXIT_VALID
from tools.chaos.history import read_history
from tools.chaos.scenarios import run_scenario

pytestmark = pytest.mark.chaos


async def test_the_master_loses_power_and_no_replicated_ack_is_lost(tmp_path: Path) -> None:
    out = io.StringIO()
    outcome = await run_scenario("power-loss-master", out=tmp_path / "run", stream=out)
    assert outcome.exit_code == EXIT_VALID, out.getvalue()
    results = json.loads((outcome.run_dir / "results.json").read_text())
    assert results["valid"] and not results["lost"] and outcome.figures["acked"] > 0
    assert [f["fault"] for f in results["faults"]] == ["power-loss"]
    assert not outcome.figures["nemesis_errors"]
    masters = [m["master"] for m in results["master_changes"] if m["master"] is not None]
    assert len(set(masters)) >= 2, masters  # a slave took over from the powerless master
    # The power loss really dropped unsynced bytes (else the run proved nothing).
    events = read_history(outcome.run_dir / "history.jsonl")
    (started,) = [e for e in events if e.f == "nemesis" and e.type == "ok" and "details" in e.value]
    assert started.value["details"]["bytes_changed"] > 0, started.value
    # Every node ran with its fault-injection switch on and recorded its syncs.
    nodes = outcome.run_dir / "nodes"
    assert all((nodes / f"{name}.sync.jsonl").stat().st_size > 0 for name in ("n1", "n2", "n3"))
