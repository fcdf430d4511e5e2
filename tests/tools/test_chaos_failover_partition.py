"""Partitions between elected nodes: ``isolate-master-with-slave`` on the failover cluster
(RocketMQ #7017, #6662), run by the real command (its private network namespace needs a
process with no thread yet). Long: ``make chaos``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import CLI
from tools.chaos.history import read_history

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "setpriv")),
        reason="needs root, ip, iptables and setpriv",
    ),
]


def test_isolating_the_master_with_one_slave_loses_no_ack(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        *CLI, "chaos", "scenario", "isolate-master-with-slave", "--cluster", "failover",
        "--out", str(run_dir),
    ]  # fmt: skip
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:  # SIGINT first: the run stops its own nodes by PID
            run.send_signal(signal.SIGINT)
            try:
                run.wait(60)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
    assert run.returncode == 0, output
    # The run re-ran itself in its private network: its output is said once, by the child.
    assert output.count("scenario isolate-master-with-slave:") == 1, output
    assert output.count("unavailability:") == 1, output
    assert "running in a private network namespace: unshare --net" in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["valid"] and not results["lost"]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["network"].startswith("a private network namespace")
    (started,) = [
        e.value
        for e in read_history(run_dir / "history.jsonl")
        if e.f == "nemesis" and e.type == "ok" and e.value["action"] == "start"
    ]
    assert started["details"]["backend"] == "loopback"
    alone = next(n for n in ("n1", "n2", "n3") if n not in started["targets"])
    # The node left alone hears neither of the other two, and they do not hear it.
    assert f"{alone}<-" in started["details"]["drops"]
