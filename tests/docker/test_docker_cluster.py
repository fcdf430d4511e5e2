"""tidelog in docker, for real: the image, one node's health and clean stop, and the
compose cluster (etcd and three nodes on a subnet of our own) surviving the loss of its
master and a partition with every acknowledged message readable.

Traffic goes only to containers these tests create; everything they create (containers,
networks, volumes, iptables rules) is removed by id at the end, also on failure, and the
end checks that nothing of the project is left.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from cluster.client import open_client
from tests.docker.conftest import free_host_ports, free_subnet
from tools.docker.cluster import ClusterSettings, DockerCluster
from tools.docker.engine import Engine, EngineError
from tools.docker.images import BuildResult

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOPIC = "orders"
QUEUES = 4
HA_PORT = 7700


def _docker(engine: Engine, *args: str, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], env=engine.env, capture_output=True, text=True, check=False
    )
    if check and done.returncode != 0:
        raise EngineError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@pytest.fixture
def solo_label() -> str:
    return f"tidelog-test-solo-{os.getpid()}"


@pytest.fixture
def solo_cleanup(docker_engine: Engine, solo_label: str) -> Iterator[None]:
    """Removes, by id, every container the test labelled, even when it failed."""
    yield
    ids = _docker(
        docker_engine, "ps", "--all", "--quiet", "--filter", f"label={solo_label}"
    ).split()
    for ident in ids:
        _docker(docker_engine, "rm", "--force", "--volumes", ident, check=False)
    assert not _docker(
        docker_engine, "ps", "--all", "--quiet", "--filter", f"label={solo_label}"
    ).split()


def test_image_runs_tidelog_and_etcd_as_a_non_root_user(
    docker_engine: Engine,
    tidelog_image: BuildResult,
    image_cleanup: None,
    solo_label: str,
    solo_cleanup: None,
) -> None:
    run = ["run", "--rm", "--network", "none", "--label", solo_label]
    assert _docker(docker_engine, *run, tidelog_image.tag, "--version").startswith("tidelog ")
    assert "etcd Version" in _docker(docker_engine, *run, tidelog_image.tag, "etcd", "--version")
    uid = _docker(docker_engine, *run, "--entrypoint", "id", tidelog_image.tag, "-u").strip()
    assert uid != "0"
    config = json.loads(_docker(docker_engine, "image", "inspect", tidelog_image.tag))[0]["Config"]
    assert "/var/lib/tidelog" in config["Volumes"]
    assert config["Healthcheck"]["Test"][-1] == "health"
    log.info(
        "image tag=%s size_bytes=%d build_s=%.1f",
        tidelog_image.tag,
        tidelog_image.size_bytes,
        tidelog_image.build_s,
    )


def test_single_node_turns_healthy_and_stops_cleanly_on_docker_stop(
    docker_engine: Engine,
    tidelog_image: BuildResult,
    image_cleanup: None,
    solo_label: str,
    solo_cleanup: None,
) -> None:
    ident = _docker(
        docker_engine,
        "run",
        "--detach",
        "--network",
        "none",
        "--label",
        solo_label,
        tidelog_image.tag,
        "node",
        "--name",
        "solo",
    ).strip()
    deadline = time.monotonic() + 90
    health = ""
    while health != "healthy":
        health = _docker(
            docker_engine, "inspect", "--format", "{{.State.Health.Status}}", ident
        ).strip()
        assert time.monotonic() < deadline, (
            f"node not healthy: {health}; logs: {_docker(docker_engine, 'logs', ident)}"
        )
        time.sleep(0.2)
    started = time.monotonic()
    _docker(docker_engine, "stop", "--time", "10", ident)
    took_s = time.monotonic() - started
    state = json.loads(_docker(docker_engine, "inspect", ident))[0]["State"]
    logs = subprocess.run(
        ["docker", "logs", ident],
        env=docker_engine.env,
        capture_output=True,
        text=True,
        check=False,
    )
    output = logs.stdout + logs.stderr
    # Exit code 0 (not 137): the node stopped on SIGTERM itself, before docker's SIGKILL.
    assert state["ExitCode"] == 0, f"exit code {state['ExitCode']}; logs: {output[-3000:]}"
    assert "node_stopped name=solo" in output, output[-3000:]
    log.info("docker_stop took_s=%.2f", took_s)


@pytest.fixture(scope="module")
def cluster(docker_engine: Engine, tidelog_image: BuildResult) -> Iterator[DockerCluster]:
    ports = free_host_ports(4)
    settings = ClusterSettings(
        project=f"tidelog-test-{os.getpid()}",
        image=tidelog_image.tag,
        subnet=free_subnet(docker_engine),
        node_ports=(ports[0], ports[1], ports[2]),
        etcd_port=ports[3],
        max_lag_ms=2000,
    )
    docker_cluster = DockerCluster(docker_engine, settings)
    try:
        up_s = docker_cluster.up()
        log.info("compose_up_to_healthy took_s=%.1f", up_s)
        yield docker_cluster
    finally:
        removed = docker_cluster.down()
        log.info("compose_down removed=%s", removed)
        assert docker_cluster.leftovers() == [], (
            "containers, networks or volumes of the test project are left"
        )
        rules = subprocess.run(
            ["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True, check=False
        )
        assert "tidelog-docker-partition" not in rules.stdout


async def _status(address: str) -> dict[str, Any]:
    async with open_client(address) as client:
        return await client.admin.status()


async def _produce(address: str, count: int, tag: str, acks: str) -> dict[tuple[int, int], bytes]:
    """Send ``count`` messages; returns the acknowledged ones by (queue, queue offset)."""
    acked: dict[tuple[int, int], bytes] = {}
    async with open_client(address) as client:
        producer = client.producer()
        for index in range(count):
            body = f"{tag}-{index}".encode()
            result = await producer.send(TOPIC, body, key=f"k{index % 16}", acks=acks)
            assert result.ok, f"send {body!r} at acks={acks}: {result}"
            assert result.queue is not None and result.queue_offset is not None
            acked[(result.queue, result.queue_offset)] = body
    return acked


async def _read_all(address: str, expected: dict[tuple[int, int], bytes]) -> None:
    """Read the topic from the node at ``address`` until every expected message was seen
    with its body; fails naming what is missing."""
    seen: dict[tuple[int, int], bytes] = {}
    async with open_client(address, failover_timeout=5.0) as client:
        with trio.move_on_after(60):
            async with client.consumer(TOPIC, start="earliest") as consumer:
                async for message in consumer:
                    seen[(message.queue, message.queue_offset)] = message.body
                    if all(key in seen for key in expected):
                        break
    missing = {key: body for key, body in expected.items() if seen.get(key) != body}
    assert not missing, (
        f"{len(missing)} acknowledged messages not readable on {address}: {sorted(missing)[:10]}"
    )


async def _wait_for(
    predicate_address: str, check: Any, what: str, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Poll a node's status until ``check(status)`` holds (an event, not a sleep)."""
    with trio.move_on_after(timeout_s):
        while True:
            status = await _status(predicate_address)
            if check(status):
                return status
            await trio.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s; last status: {status}")


def _in_sync(status: dict[str, Any]) -> set[str]:
    return {peer["name"] for peer in status["replication"]["in_sync"]}


async def test_compose_cluster_keeps_every_acked_message_through_master_loss_and_partition(
    cluster: DockerCluster,
) -> None:
    settings = cluster.settings
    node1, node2, node3 = (settings.client_address(name) for name in ("node1", "node2", "node3"))
    assert {info.service: info.health for info in cluster.status()} == {
        "etcd1": "healthy",
        "node1": "healthy",
        "node2": "healthy",
        "node3": "healthy",
    }
    await _wait_for(node1, lambda s: _in_sync(s) == {"node2", "node3"}, "both slaves in sync")

    async with open_client(node1) as client:
        await client.admin.create_topic(TOPIC, queues=QUEUES)
    acked = await _produce(node1, 200, "before", acks="replicated")

    # The master's container dies (SIGKILL). Static roles: node2 is promoted, node3 follows it.
    killed_at = time.monotonic()
    await trio.to_thread.run_sync(cluster.kill, "node1")
    async with open_client(node2) as client:
        await client.checked("promote", ha_port=HA_PORT)
    async with open_client(node3) as client:
        await client.checked("repoint", master_ha=f"node2:{HA_PORT}", master_client="node2:7600")
    await _wait_for(node2, lambda s: "node3" in _in_sync(s), "node3 in sync with the new master")
    acked |= await _produce(node2, 1, "first-after", acks="replicated")
    log.info("docker_master_loss_to_first_replicated_ack took_s=%.2f", time.monotonic() - killed_at)
    acked |= await _produce(node2, 100, "after", acks="replicated")
    await _read_all(node2, acked)
    await _read_all(node3, acked)

    # A partition between the two survivors: node3 falls out of the in-sync set, the master
    # goes on alone (acks=leader), and once healed node3 catches up with every message.
    await trio.to_thread.run_sync(cluster.block, "node2", "node3")
    acked |= await _produce(node2, 50, "partitioned", acks="leader")
    await _wait_for(node2, lambda s: "node3" not in _in_sync(s), "node3 leaving the in-sync set")
    await trio.to_thread.run_sync(cluster.unblock, "node2", "node3")
    master = await _wait_for(node2, lambda s: "node3" in _in_sync(s), "node3 back in sync")
    await _wait_for(node3, lambda s: s["max_offset"] >= master["max_offset"], "node3 caught up")
    acked |= await _produce(node2, 20, "healed", acks="replicated")
    await _read_all(node3, acked)

    # A container cut off the network and put back keeps its address and names.
    address = cluster.address("node3")
    await trio.to_thread.run_sync(cluster.isolate, "node3")
    await trio.to_thread.run_sync(cluster.heal, "node3")
    assert cluster.address("node3") == address
    await trio.to_thread.run_sync(cluster.wait_healthy, "node3")
    await _read_all(node3, acked)
