"""The local etcd launcher: real etcd processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import pytest

from tools.launcher import EtcdCluster, EtcdLaunchError, etcd_binary


def _put(url: str, key: str, value: str) -> None:
    body = {
        "key": base64.b64encode(key.encode()).decode(),
        "value": base64.b64encode(value.encode()).decode(),
    }
    httpx.post(f"{url}/v3/kv/put", json=body, timeout=5).raise_for_status()


def _get(url: str, key: str) -> str | None:
    body = {"key": base64.b64encode(key.encode()).decode()}
    answer = httpx.post(f"{url}/v3/kv/range", json=body, timeout=5).json()
    kvs = answer.get("kvs")
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_one_member_starts_healthy_and_stops_by_pid(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path)
    try:
        cluster.start()
        (member,) = cluster.members
        assert member.is_healthy()
        assert cluster.endpoints == [member.client_url]
        assert member.client_url.startswith("http://127.0.0.1:")
        pid = member.pid
        assert pid is not None and _pid_alive(pid)
        _put(member.client_url, "/k", "v")
        assert member.log_path.exists()
    finally:
        cluster.stop()
    assert member.process is not None and member.process.returncode is not None
    cluster.stop()  # idempotent


def test_a_restarted_member_keeps_its_data_and_ports(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path) as cluster:
        (member,) = cluster.members
        _put(member.client_url, "/k", "kept")
        url = member.client_url
        member.kill()
        assert not member.is_healthy()
        cluster.restart(member)
        assert member.client_url == url
        assert _get(url, "/k") == "kept"


def test_three_members_survive_the_loss_of_their_leader(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path, size=3) as cluster:
        assert len(set(cluster.endpoints)) == 3
        _put(cluster.endpoints[0], "/k", "replicated")
        leader = cluster.leader()
        leader.kill()
        survivors = [m for m in cluster.members if m is not leader]
        cluster.wait_healthy(survivors, 20)
        assert cluster.leader() in survivors
        assert _get(survivors[0].client_url, "/k") == "replicated"
        cluster.restart(leader)
        assert _get(leader.client_url, "/k") == "replicated"


def test_a_member_that_cannot_start_raises_with_its_log(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, extra_args=("--no-such-flag",))
    with pytest.raises(EtcdLaunchError, match="exited with code"):
        cluster.start()
    assert all(not m.is_running() for m in cluster.members)


def test_size_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one member"):
        EtcdCluster(tmp_path, size=0)


def test_binary_override_must_be_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDELOG_ETCD_BIN", str(tmp_path / "missing-etcd"))
    with pytest.raises(EtcdLaunchError, match="TIDELOG_ETCD_BIN"):
        etcd_binary()
    monkeypatch.delenv("TIDELOG_ETCD_BIN")
    assert os.access(etcd_binary(), os.X_OK)
