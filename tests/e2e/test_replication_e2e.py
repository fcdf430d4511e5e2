"""End to end replication: a master and two slaves as real `tidelog node` processes on
loopback. Every port is picked by the kernel (port 0) and read back from the node (the
client port from its ready line, the HA port from ``status``). Waiting is bounded polling
of ``status`` with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster.client import Client, open_client
from cluster.node.config import ConfigError, load_node_config
from cluster.protocol import Status
from tools.process import NodeProcess, node_status, wait_until

# ---- config errors ---------------------------------------------------------------------------


def test_slave_without_master_ha_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(None, {"replication.role": "slave"}, environ={})
    assert info.value.key == "replication.master_ha"
    assert info.value.source == "override replication.role"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"replication.role": "leader"}, "replication.role"),
        ({"replication.role": "slave", "replication.master_ha": "nohost"}, "replication.master_ha"),
        (
            {"replication.role": "slave", "replication.master_ha": "h:1", "replication.ha_port": 0},
            "replication.ha_port",
        ),
        ({"replication.master_ha": "h:1"}, "replication.master_ha"),
        ({"replication.min_insync_replicas": "0"}, "replication.min_insync_replicas"),
        ({"replication.ha_port": "-2"}, "replication.ha_port"),
    ],
)
def test_replication_config_errors_name_the_key(overrides: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(None, overrides, environ={})
    assert info.value.key == key


def test_replication_settings_from_environment_and_defaults() -> None:
    default = load_node_config(None, environ={})
    assert default.replication.role == "master" and not default.replication.serves_slaves
    config = load_node_config(
        None,
        {"node.host": "127.0.0.2"},
        environ={
            "TIDELOG_REPLICATION_ROLE": "slave",
            "TIDELOG_REPLICATION_MASTER_HA": "127.0.0.1:7700",
            "TIDELOG_REPLICATION_MASTER_CLIENT": "127.0.0.1:7600",
        },
    )
    assert config.replication.is_slave and config.replication.master_ha == "127.0.0.1:7700"
    assert config.ha_host == "127.0.0.2"  # defaults to node.host


def test_cli_refuses_a_slave_without_master() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "node", "--role", "slave", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "replication.master_ha" in done.stderr


# ---- the cluster -----------------------------------------------------------------------------


async def _wait_slaves(master: NodeProcess, count: int) -> None:
    async def connected() -> bool:
        return len((await node_status(master.address))["replication"]["slaves"]) == count

    await wait_until(f"{count} slaves connected to the master", connected)


async def _wait_caught_up(master: NodeProcess, *slaves: NodeProcess) -> int:
    """Wait until every slave's log ends where the master's does; return that end."""
    end = (await node_status(master.address))["max_offset"]

    async def caught_up() -> bool:
        return all([(await node_status(s.address))["max_offset"] == end for s in slaves])

    await wait_until(f"slaves to reach the master's log end {end}", caught_up)
    return end


class Cluster:
    """A master with an HA port and slaves following it; every process killed at exit."""

    def __init__(self, root: Path, stack: ExitStack, min_insync_replicas: int) -> None:
        self.root = root
        self.stack = stack
        self.master = self._start(
            "master", ["--ha-port", "0", "--min-insync-replicas", str(min_insync_replicas)]
        )
        self.ha_address = ""

    def _start(self, name: str, args: list[str]) -> NodeProcess:
        process = NodeProcess(self.root / name, name=name, extra_args=args)
        self.stack.callback(process.kill)
        return process.start()

    async def start_slaves(self, *names: str) -> list[NodeProcess]:
        if not self.ha_address:
            self.ha_address = (await node_status(self.master.address))["replication"]["ha_address"]
        slave_args = [
            "--role", "slave", "--master-ha", self.ha_address, "--master-client", self.master.address,
        ]  # fmt: skip
        return [self._start(name, slave_args) for name in names]


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


async def _send(client: Client, body: bytes, acks: str) -> dict[str, Any]:
    """One raw send (no producer retries: the test wants the node's first answer)."""
    return await client.call("send", topic="rep", body=body, queue=0, acks=acks, timeout_ms=5000)


def _segments(node: NodeProcess, below: int) -> dict[str, bytes]:
    """The commit-log segment files holding bytes below ``below`` (not ones pre-allocated
    past the end), by name."""
    directory = node.data_dir / "store" / "commitlog"
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.name.isdigit() and int(path.name) < below
    }


async def test_replicated_acks_survive_a_slave_crash_and_catch_up(
    tmp_path: Path, stack: ExitStack
) -> None:
    cluster = Cluster(tmp_path, stack, min_insync_replicas=2)
    master = cluster.master
    first, second = await cluster.start_slaves("slave-a", "slave-b")
    await _wait_slaves(master, 2)
    async with open_client(master.address) as client:
        await client.admin.create_topic("rep", 2)
        producer = client.producer(acks="replicated", retries=0)
        results: list[Any] = []

        async def produce(task: int) -> None:
            for i in range(50):
                results.append(await producer.send("rep", f"{task}:{i}".encode() * 20))

        async with trio.open_nursery() as nursery:
            for task in range(8):
                nursery.start_soon(produce, task)
        assert [r.status for r in results if not r.ok] == []
        assert len(results) == 400

        # Acknowledged = held by both slaves: their log ends are at least there.
        await _wait_caught_up(master, first, second)

        second.kill()
        await _wait_slaves(master, 1)
        before = (await node_status(master.address))["max_offset"]
        refused = await _send(client, b"needs two slaves", "replicated")
        assert refused["status"] is Status.SLAVE_NOT_AVAILABLE
        assert (await node_status(master.address))["max_offset"] == before  # nothing appended
        for i in range(30):  # written while slave-b is down: it must catch up on them
            assert (await _send(client, b"durable %d" % i, "durable"))["status"] is Status.OK

        restarted = NodeProcess(
            second.data_dir, name="slave-b", extra_args=second.extra_args
        ).start()
        stack.callback(restarted.kill)
        await _wait_slaves(master, 2)
        assert (await _send(client, b"two again", "replicated"))["status"] is Status.OK
        end = await _wait_caught_up(master, first, restarted)

    for node in (restarted, first, master):
        assert node.stop() == 0, node.stderr
    expected = _segments(master, end)
    assert expected, "the master has no segment files"
    assert _segments(first, end) == expected
    assert _segments(restarted, end) == expected


async def test_one_insync_replica_and_writes_to_a_slave(tmp_path: Path, stack: ExitStack) -> None:
    cluster = Cluster(tmp_path, stack, min_insync_replicas=1)
    master = cluster.master
    first, second = await cluster.start_slaves("slave-a", "slave-b")
    await _wait_slaves(master, 2)
    async with open_client(master.address) as client:
        await client.admin.create_topic("rep", 1)
        assert (await _send(client, b"both", "replicated"))["status"] is Status.OK
        second.kill()
        await _wait_slaves(master, 1)
        assert (await _send(client, b"one is enough", "replicated"))["status"] is Status.OK
    await _wait_caught_up(master, first)

    status = await node_status(master.address)
    replication = status["replication"]
    assert replication["role"] == "master"
    assert replication["ha_address"] == cluster.ha_address
    assert replication["slaves"] == [{"name": "slave-a", "ack_offset": status["max_offset"]}]
    assert replication["confirm_offset"] == status["max_offset"]

    async with open_client(first.address) as client:
        refused = await _send(client, b"to a slave", "leader")
        assert refused["status"] is Status.NOT_MASTER
        assert refused["master"] == master.address
        created = await client.call("create_topic", topic="other", queues=1)
        assert created["status"] is Status.NOT_MASTER
        assert created["master"] == master.address
        slave_status = await client.checked("status")
    assert slave_status["role"] == "slave" and slave_status["writable"] is False
    assert slave_status["replication"]["connected"] is True
    assert slave_status["max_offset"] == status["max_offset"]
