"""LocalCluster's per-node settings (environment, etcd endpoints, host, command prefix,
args) and its static groups: real node processes, each stopped by its PID."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from tools.faults import FaultProxy, Kill, fault_env
from tools.launcher import ClusterLaunchError, LocalCluster, NodeSettings
from tools.launcher.cluster import acknowledging_epoch
from tools.process import wait_until


def _command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def _environment(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_bad_per_node_settings_are_refused_naming_the_node(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="static group runs without etcd"):
        LocalCluster(tmp_path, coordination="static", etcd_endpoints=("http://127.0.0.1:1",))
    with pytest.raises(ValueError, match="'etcd', 'static'"):
        LocalCluster(tmp_path, coordination="raft")
    unknown = LocalCluster(tmp_path, node_settings={"node-9": NodeSettings()})
    with pytest.raises(ValueError, match=r"unknown nodes \['node-9'\]; nodes: \['node-1'"):
        unknown.start_nodes()
    on_master = LocalCluster(
        tmp_path, coordination="static", node_settings={"node-1": NodeSettings(master_ha="x:1")}
    )
    with pytest.raises(ValueError, match="node-1: master_ha is for the slaves"):
        on_master.start_nodes()
    etcd_in_static = LocalCluster(
        tmp_path,
        coordination="static",
        node_settings={"node-2": NodeSettings(etcd_endpoints=("http://127.0.0.1:1",))},
    )
    with pytest.raises(ValueError, match="node-2: a static group uses no etcd"):
        etcd_in_static.start_nodes()
    assert not etcd_in_static.nodes  # refused before any process started


def test_the_static_master_is_the_one_acknowledging_node() -> None:
    assert acknowledging_epoch({"role": "master", "writable": True, "epoch": 3}) == 3
    assert acknowledging_epoch({"role": "slave", "writable": False, "epoch": 3}) is None
    assert acknowledging_epoch({"role": "master", "coordination": {"role": "slave"}}) is None
    elected = {"coordination": {"role": "master", "may_acknowledge": True, "epoch": 4}}
    assert acknowledging_epoch(elected) == 4
    assert acknowledging_epoch(None) is None


async def test_a_static_group_runs_each_node_with_its_own_settings(tmp_path: Path) -> None:
    """The slave listens on a loopback address of its own, runs under a command prefix
    with the fault-injection switch in its environment; kill and restart go through the
    cluster and keep the address."""
    sync_log = tmp_path / "n2.sync.jsonl"
    cluster = LocalCluster(
        tmp_path / "group",
        replicas=2,
        coordination="static",
        node_prefix="n",
        node_settings={
            "n2": NodeSettings(
                env=fault_env(sync_log),
                host="127.0.0.2",
                command_prefix=("nice", "-n", "3"),
                args=("--metrics-port", "0"),
            )
        },
    )
    try:
        await trio.to_thread.run_sync(cluster.start)
        assert cluster.names == ["n1", "n2"] and cluster.etcd is None
        assert cluster.address("n2").startswith("127.0.0.2:")
        slave_pid = cluster.pid("n2")
        assert slave_pid is not None
        command = _command_line(slave_pid)
        assert command[command.index("--master-ha") + 1] == f"127.0.0.1:{cluster.ha_port}"
        assert command[command.index("--master-client") + 1] == cluster.address("n1")
        assert command[-2:] == ["--metrics-port", "0"]
        assert _nice(slave_pid) == _nice(os.getpid()) + 3
        assert _environment(slave_pid)["TIDELOG_FAULT_SYNC_LOG"] == str(sync_log)
        master_pid = cluster.pid("n1")
        assert master_pid is not None
        assert "TIDELOG_FAULT_SYNC_LOG" not in _environment(master_pid)
        assert await cluster.master() == "n1"

        address = cluster.address("n2")
        kill = Kill(cluster.target("n2"))
        await kill.inject()
        assert not cluster.running("n2") and (await cluster.view("n2")).role == "stopped"
        await kill.heal()  # the restart goes through the cluster
        assert cluster.running("n2") and cluster.pid("n2") != slave_pid
        assert cluster.address("n2") == address
        view = await cluster.view("n2")
        assert view.status is not None and view.role == "slave"
        with pytest.raises(ClusterLaunchError, match="n2 is still running"):
            cluster.restart("n2")
    finally:
        cluster.stop(kill=True)
    assert not cluster.running("n1") and not cluster.running("n2")
    assert (tmp_path / "group" / "n2.log").is_file()


async def test_each_node_may_reach_etcd_through_endpoints_of_its_own(tmp_path: Path) -> None:
    """node-1 talks to etcd through a proxy started between etcd and the nodes; node-2
    uses the cluster's endpoints. The group elects a master either way."""
    cluster = LocalCluster(tmp_path / "group", replicas=2)
    try:
        await trio.to_thread.run_sync(cluster.start_etcd)
        assert cluster.etcd is not None and not cluster.nodes
        member = cluster.etcd.members[0]
        proxy = FaultProxy("127.0.0.1", member.client_port, name="node-1->etcd")
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            own = (f"http://127.0.0.1:{proxy.port}",)
            cluster.node_settings["node-1"] = NodeSettings(etcd_endpoints=own)
            await trio.to_thread.run_sync(cluster.start_nodes)
            assert await cluster.wait_for_master(timeout_s=30.0) in cluster.names
            for name, endpoints in (("node-1", own[0]), ("node-2", member.client_url)):
                pid = cluster.pid(name)
                assert pid is not None
                command = _command_line(pid)
                assert command[command.index("--etcd") + 1] == endpoints
            assert proxy.connections > 0
            nursery.cancel_scope.cancel()
    finally:
        cluster.stop(kill=True)


async def test_a_static_group_over_tls_learns_the_masters_replication_port(
    tmp_path: Path,
) -> None:
    """With ``tls`` both ports of every node speak TLS with certificates of the cluster's
    throwaway CA (the slave's names its own address, 127.0.0.2, which clients dial). The
    master binds a replication port of its own choosing (``--ha-port 0``: none picked
    ahead that another process could take meanwhile); the launcher reads it from the
    master's status for the slave, and the master's restart keeps it. The master may be
    started alone first (``start_node``), the others after it (``start_nodes``)."""
    cluster = LocalCluster(
        tmp_path / "group",
        replicas=2,
        coordination="static",
        node_prefix="n",
        tls=True,
        node_settings={"n2": NodeSettings(host="127.0.0.2")},
    )

    async def in_sync() -> bool:
        status = (await cluster.view("n1")).status
        in_sync = (status or {}).get("replication", {}).get("in_sync", [])
        return [slave["name"] for slave in in_sync] == ["n2"]

    try:
        with pytest.raises(ClusterLaunchError, match="n2 is a slave of n1: start n1 first"):
            cluster.start_node("n2")
        await trio.to_thread.run_sync(cluster.start_node, "n1")  # alone: ha_port known now
        assert cluster.ha_port > 0 and list(cluster.nodes) == ["n1"]
        master_pid = cluster.pid("n1")
        assert master_pid is not None
        await trio.to_thread.run_sync(cluster.start_nodes)  # the others
        assert cluster.running("n2") and cluster.pid("n1") == master_pid
        assert cluster.ca_file == tmp_path / "group" / "tls" / "ca.pem"
        command = _command_line(master_pid)
        assert command[command.index("--ha-port") + 1] == "0"
        status = (await cluster.view("n1")).status
        assert status is not None and cluster.ha_port > 0
        assert status["replication"]["ha_address"] == f"127.0.0.1:{cluster.ha_port}"
        assert status["tls"] == {"client": "tls", "ha": "mutual", "peer_names": True}
        slave = (await cluster.view("n2")).status
        assert slave is not None and slave["tls"]["client"] == "tls"
        await wait_until("n2 in sync over mutual TLS", in_sync)

        cluster.kill("n1")
        await trio.to_thread.run_sync(cluster.restart, "n1")
        restarted_pid = cluster.pid("n1")
        assert restarted_pid is not None and restarted_pid != master_pid
        command = _command_line(restarted_pid)
        assert command[command.index("--ha-port") + 1] == str(cluster.ha_port)
        await wait_until("n2 in sync with the restarted master", in_sync)
    finally:
        cluster.stop(kill=True)
