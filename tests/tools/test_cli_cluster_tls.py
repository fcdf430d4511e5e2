"""`tidelog cluster up --tls` as real processes: a throwaway CA and one certificate per
node in DIR/tls, both ports of every node on TLS (clients: the node's certificate;
replication: mutual, peer names checked). Clients with `--tls-ca DIR/tls/ca.pem` produce
and consume at acks=replicated (so the slave replicates over TLS), a plain client is told
to add `--tls-ca`, `cluster status` asks the nodes over TLS, `admin switchover --tls-ca`
hands mastership over, and `cluster down` stops every process by its PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import cluster_dir_cleaned
from tools.launcher.cluster import pid_alive, process_matches

TIMEOUT_S = 90


def tidelog(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIDELOG_")}
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=environment,
    )


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    """The cluster's directory; whatever a failed test left running is stopped by PID."""
    with cluster_dir_cleaned(tmp_path / "cluster") as root:
        yield root


def test_up_tls_serves_clients_with_the_ca_and_refuses_plain_ones(data: Path) -> None:
    up = tidelog("cluster", "up", "--replicas", "2", "--data", str(data), "--tls", "--detach", "--json")  # fmt: skip
    assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout.splitlines()[0])
    ca = data / "tls" / "ca.pem"
    assert summary["tls"] == {"ca_file": str(ca), "client": "tls", "ha": "mutual"}
    assert ca.is_file() and (data / "tls" / "node-1.pem").is_file()
    assert (data / "tls" / "node-2.key").stat().st_mode & 0o077 == 0  # keys: owner only
    pids = [node["pid"] for node in summary["nodes"]] + summary["etcd"]["pids"]
    addresses = {node["name"]: node["address"] for node in summary["nodes"]}
    master = addresses[summary["master"]]
    bootstrap = ["-b", ",".join(addresses.values()), "--tls-ca", str(ca)]

    created = tidelog("topic", "create", "orders", "--queues", "1", *bootstrap)
    assert created.returncode == 0, created.stderr
    produced = tidelog("produce", "orders", "--acks", "replicated", *bootstrap, stdin="one\ntwo\n")
    assert produced.returncode == 0, produced.stderr
    consumed = tidelog("consume", "orders", "--from", "earliest", "--count", "2", *bootstrap)
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout.splitlines() == ["one", "two"]

    plain = tidelog("status", "-b", master)
    assert plain.returncode == 2
    assert "speaks TLS only" in plain.stderr and "--tls-ca" in plain.stderr

    status = tidelog("status", "-b", master, "--tls-ca", str(ca), "--json")
    assert status.returncode == 0, status.stderr
    secured = json.loads(status.stdout)["tls"]
    assert secured == {"client": "tls", "ha": "mutual", "peer_names": True}

    cluster_status = tidelog("cluster", "status", "--data", str(data), "--json")
    assert cluster_status.returncode == 0, cluster_status.stderr
    rows = json.loads(cluster_status.stdout)["nodes"]
    assert sorted(row["role"] for row in rows) == ["master", "slave"]
    assert all(row["in_sync"] for row in rows)

    other = next(name for name in addresses if name != summary["master"])
    switched = tidelog("admin", "switchover", "--to", other, *bootstrap, "--json")
    assert switched.returncode == 0, switched.stderr
    assert json.loads(switched.stdout)["master"] == other

    down = tidelog("cluster", "down", "--data", str(data), "--json")
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if pid_alive(pid) and process_matches(pid, str(data))]
    assert not (data / "cluster.json").exists()
