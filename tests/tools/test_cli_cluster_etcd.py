"""`tidelog cluster up --etcd-members 3` as real processes: three etcd members and three
nodes; `cluster status` names every member, its health and etcd's leader; with the leader
SIGKILLed, status shows it down (with the error that says why) and the others running;
`cluster down` stops the remaining members and the nodes by PID."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import cluster_dir_cleaned, tidelog
from tools.cli_cluster import etcd_summary
from tools.launcher.cluster import pid_alive, process_matches
from tools.launcher.etcd import EtcdEndpointHealth


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    """The cluster's directory; whatever a failed test left running is stopped by PID."""
    with cluster_dir_cleaned(tmp_path / "cluster") as root:
        yield root


def status_json(data: Path) -> dict[str, object]:
    status = tidelog("cluster", "status", "--data", str(data), "--json")
    assert status.returncode == 0, status.stderr
    answer = json.loads(status.stdout)
    assert isinstance(answer, dict)
    return answer


def test_three_etcd_members_status_shows_health_and_leader_down_stops_all(data: Path) -> None:
    up = tidelog("cluster", "up", "--etcd-members", "3", "--data", str(data), "--detach", "--json")
    assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout.splitlines()[0])
    members = summary["etcd"]["members"]
    assert [m["name"] for m in members] == ["etcd-1", "etcd-2", "etcd-3"]
    assert len(set(summary["etcd"]["endpoints"])) == 3
    etcd_pids = [m["pid"] for m in members]
    node_pids = [node["pid"] for node in summary["nodes"]]
    assert all(pid_alive(pid) for pid in etcd_pids + node_pids)

    status = status_json(data)
    health = status["etcd"]["health"]  # type: ignore[index]
    assert [row["member"] for row in health] == ["etcd-1", "etcd-2", "etcd-3"]
    assert all(row["running"] and row["healthy"] for row in health)
    leaders = [row for row in health if row["leader"]]
    assert len(leaders) == 1
    group = status["group"]
    assert isinstance(group, dict) and group["master"] == summary["master"]

    # SIGKILL etcd's leader: status names it as down, the two others run on
    old_leader = leaders[0]
    os.kill(old_leader["pid"], signal.SIGKILL)
    after = status_json(data)
    rows = {row["member"]: row for row in after["etcd"]["health"]}  # type: ignore[index]
    assert rows[old_leader["member"]]["running"] is False
    assert rows[old_leader["member"]]["healthy"] is False
    assert rows[old_leader["member"]]["error"]
    survivors = [row for name, row in rows.items() if name != old_leader["member"]]
    assert all(row["running"] for row in survivors)
    plain = tidelog("cluster", "status", "--data", str(data))
    assert "of 3 member(s) healthy" in plain.stdout
    assert f"{old_leader['endpoint']}: ConnectError" in plain.stdout  # why it is not healthy

    down = tidelog("cluster", "down", "--data", str(data), "--json")
    assert down.returncode == 0, down.stderr
    stopped = json.loads(down.stdout)
    alive_etcd = [pid for pid in etcd_pids if pid != old_leader["pid"]]
    assert sorted(stopped["etcd_stopped"]) == sorted(alive_etcd)
    assert sorted(stopped["nodes_stopped"]) == sorted(node_pids)
    everything = etcd_pids + node_pids
    assert not [pid for pid in everything if pid_alive(pid) and process_matches(pid, str(data))]
    assert not (data / "cluster.json").exists()


def test_etcd_members_must_be_an_odd_size_and_not_with_an_external_etcd(data: Path) -> None:
    even = tidelog("cluster", "up", "--etcd-members", "2", "--data", str(data))
    assert even.returncode == 2 and "use 1, 3 or 5" in even.stderr
    both = tidelog(
        "cluster", "up", "--etcd-members", "3", "--etcd", "http://127.0.0.1:2379",
        "--data", str(data),
    )  # fmt: skip
    assert both.returncode == 2 and "drop one of the two" in both.stderr
    assert not (data / "cluster.json").exists()


def test_the_live_view_summarises_etcd_in_one_line() -> None:
    health = [
        EtcdEndpointHealth("http://127.0.0.1:1", True, False),
        EtcdEndpointHealth("http://127.0.0.1:2", True, True),
        EtcdEndpointHealth("http://127.0.0.1:3", False, False, error="ConnectError"),
    ]
    assert etcd_summary(health) == "etcd: 2 of 3 healthy, leader http://127.0.0.1:2"
    down = [EtcdEndpointHealth("http://127.0.0.1:1", False, False, error="ConnectError")]
    assert etcd_summary(down) == "etcd: 0 of 1 healthy, no leader answering"
