"""`tidelog cluster up --detach`, `cluster status` and `cluster down` as real processes:
the command returns with the cluster running, status shows one master and its slaves,
down stops every process it started by PID and the state file goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import cluster_dir_cleaned
from tools.launcher.cluster import pid_alive, process_matches, read_state

TIMEOUT_S = 90


def tidelog(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=dict(os.environ, TIDELOG_BOOTSTRAP=""),
    )


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    """The cluster's directory; whatever a failed test left running is stopped by PID."""
    with cluster_dir_cleaned(tmp_path / "cluster") as root:
        yield root


def test_up_detach_status_down(data: Path) -> None:
    up = tidelog("cluster", "up", "--replicas", "3", "--data", str(data), "--detach", "--json")
    assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout.splitlines()[0])
    names = [node["name"] for node in summary["nodes"]]
    assert names == ["node-1", "node-2", "node-3"] and summary["master"] in names
    pids = [node["pid"] for node in summary["nodes"]] + summary["etcd"]["pids"]
    assert all(pid_alive(pid) for pid in pids)
    assert read_state(data)["nodes"] == summary["nodes"]

    again = tidelog("cluster", "up", "--data", str(data), "--detach")
    assert again.returncode == 2 and "still running" in again.stderr

    status = tidelog("cluster", "status", "--data", str(data), "--json")
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["nodes"]
    assert sorted(row["role"] for row in rows) == ["master", "slave", "slave"]
    assert {row["epoch"] for row in rows} == {1}
    assert all(row["in_sync"] for row in rows)

    down = tidelog("cluster", "down", "--data", str(data), "--json")
    assert down.returncode == 0, down.stderr
    stopped = json.loads(down.stdout)
    assert sorted(stopped["nodes_stopped"] + stopped["etcd_stopped"]) == sorted(pids)
    assert not [pid for pid in pids if pid_alive(pid) and process_matches(pid, str(data))]
    assert not (data / "cluster.json").exists()
    assert (data / "node-1").is_dir()  # the data stays

    gone = tidelog("cluster", "status", "--data", str(data))
    assert gone.returncode == 2 and "cluster up --detach" in gone.stderr
