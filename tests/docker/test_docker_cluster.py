"""tidelog in docker, for real: the image, one node's health and clean stop, and the
compose cluster (etcd and three nodes on a subnet of our own) surviving the loss of its
master and a partition with every acknowledged message readable.

Traffic goes only to containers these tests create; everything they create (containers,
networks, volumes, iptables rules) is removed by id at the end, also on failure, and the
end checks that nothing of the project is left.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster.client import TidelogError, open_client
from cluster.protocol import Status
from tests.docker.conftest import free_host_ports, free_subnet
from tools.chaos.runner import RunSettings, run_chaos
from tools.docker.chaos import DockerChaosCluster
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


def _container_logs(engine: Engine, ident: str) -> str:
    done = subprocess.run(
        ["docker", "logs", ident], env=engine.env, capture_output=True, text=True, check=False
    )
    return done.stdout + done.stderr


async def test_a_node_started_before_etcd_waits_for_it_and_then_joins(
    docker_engine: Engine,
    tidelog_image: BuildResult,
    solo_label: str,
    solo_cleanup: None,
) -> None:
    """A node whose etcd does not answer yet (a user's compose file without our
    ``depends_on``, an etcd restarting) keeps running, says it retries, and is elected
    once etcd is there."""
    subnet = free_subnet(docker_engine)
    network = _docker(
        docker_engine, "network", "create", "--subnet", subnet, "--label", solo_label,
        f"tidelog-late-etcd-{os.getpid()}",
    ).strip()  # fmt: skip
    try:
        (port,) = free_host_ports(1)
        node = _docker(
            docker_engine, "run", "--detach", "--network", network, "--label", solo_label,
            "--publish", f"127.0.0.1:{port}:7600",
            "--env", "TIDELOG_COORDINATION_ETCD=http://late-etcd:2379",
            "--env", "TIDELOG_COORDINATION_ADVERTISE_HOST=container-ip",
            tidelog_image.tag, "node", "--name", "early", "--ha-port", "7700",
        ).strip()  # fmt: skip
        with trio.fail_after(60):
            while "ha cannot reach etcd node=early" not in _container_logs(docker_engine, node):
                await trio.sleep(0.2)
        assert json.loads(_docker(docker_engine, "inspect", node))[0]["State"]["Running"]
        _docker(
            docker_engine, "run", "--detach", "--network", network, "--label", solo_label,
            "--network-alias", "late-etcd",
            "--env", "ETCD_LISTEN_CLIENT_URLS=http://0.0.0.0:2379",
            "--env", "ETCD_ADVERTISE_CLIENT_URLS=http://late-etcd:2379",
            "--env", "ETCD_DATA_DIR=/var/lib/tidelog/etcd",
            tidelog_image.tag, "etcd",
        )  # fmt: skip
        address = f"127.0.0.1:{port}"
        with trio.fail_after(60):
            while True:
                coordination = (await _status(address)).get("coordination") or {}
                if coordination.get("role") == "master":
                    break
                await trio.sleep(0.2)
        assert json.loads(_docker(docker_engine, "inspect", node))[0]["RestartCount"] == 0
    finally:
        for ident in _docker(
            docker_engine, "ps", "--all", "--quiet", "--filter", f"label={solo_label}"
        ).split():
            _docker(docker_engine, "rm", "--force", "--volumes", ident, check=False)
        _docker(docker_engine, "network", "rm", network, check=False)


@pytest.fixture(scope="module")
def cluster(
    docker_engine: Engine, tidelog_image: BuildResult, request: pytest.FixtureRequest
) -> Iterator[DockerCluster]:
    """The compose cluster with its ``groups2`` profile: etcd and two broker groups of
    three nodes (one ``up`` serves the failover test on g1 and the two-group test)."""
    ports = free_host_ports(7)
    settings = ClusterSettings(
        project=f"tidelog-test-{os.getpid()}",
        image=tidelog_image.tag,
        subnet=free_subnet(docker_engine),
        groups=2,
        node_ports=tuple(ports[:6]),
        etcd_port=ports[6],
        max_lag_ms=2000,
        # The default lease (2 s TTL, 0.5 s per etcd request) is lost now and then when
        # the test machine runs many suites at once (etcd's commits took 270 ms and more,
        # a master fenced itself mid-test): a lease that tolerates such a machine.
        lease_ttl_s=4,
        keepalive_interval_s=0.8,
        etcd_request_timeout_s=1.4,
    )
    docker_cluster = DockerCluster(docker_engine, settings)
    failed_before = request.session.testsfailed
    try:
        up_s = docker_cluster.up()
        log.info("compose_up_to_healthy took_s=%.1f", up_s)
        yield docker_cluster
    finally:
        if request.session.testsfailed > failed_before:  # the containers, before they go
            log.warning("cluster_at_failure\n%s", docker_cluster.diagnose())
        removed = docker_cluster.down()
        log.info("compose_down removed=%s", removed)
        assert docker_cluster.leftovers() == [], (
            "containers, networks or volumes of the test project are left"
        )
        rules = subprocess.run(
            ["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True, check=False
        )
        assert docker_cluster.partition_comment not in rules.stdout


async def _create_topic(bootstrap: list[str], topic: str) -> None:
    """Create ``topic``; while the node's etcd request times out (its 0.5 s limit is
    short on a loaded machine, and the node answers INTERNAL_ERROR naming EtcdTimeout),
    try again, accepting a topic the timed-out attempt did record."""
    with trio.fail_after(60):
        while True:
            try:
                async with open_client(bootstrap) as client:
                    await client.admin.create_topic(topic, queues=QUEUES, exist_ok=True)
                return
            except TidelogError as error:
                if error.status is not Status.INTERNAL_ERROR or "Etcd" not in str(error):
                    raise
                log.info("create_topic_retry topic=%s error=%s", topic, error)
            await trio.sleep(0.5)


async def _status(address: str) -> dict[str, Any]:
    async with open_client(address) as client:
        return await client.admin.status()


async def _produce(
    address: str | list[str], count: int, tag: str, acks: str, topic: str = TOPIC
) -> dict[tuple[int, int], bytes]:
    """Send ``count`` messages; returns the acknowledged ones by (queue, queue offset)."""
    acked: dict[tuple[int, int], bytes] = {}
    async with open_client(address) as client:
        producer = client.producer()
        for index in range(count):
            body = f"{tag}-{index}".encode()
            result = await producer.send(topic, body, key=f"k{index % 16}", acks=acks)
            assert result.ok, f"send {body!r} at acks={acks}: {result}"
            assert result.queue is not None and result.queue_offset is not None
            acked[(result.queue, result.queue_offset)] = body
    return acked


async def _read_all(
    address: str, expected: dict[tuple[int, int], bytes], topic: str = TOPIC
) -> None:
    """Read the topic from the node at ``address`` until every expected message was seen
    with its body; fails naming what is missing."""
    seen: dict[tuple[int, int], bytes] = {}
    async with open_client(address, failover_timeout=5.0) as client:
        with trio.move_on_after(60):
            async with client.consumer(topic, start="earliest") as consumer:
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


async def _master(cluster: DockerCluster, among: tuple[str, ...], timeout_s: float = 60.0) -> str:
    """The service whose node says it is the elected master (polled: an event)."""
    with trio.move_on_after(timeout_s):
        while True:
            for service in among:
                try:
                    status = await _status(cluster.settings.client_address(service))
                except (OSError, TidelogError):
                    continue
                coordination = status.get("coordination") or {}
                if coordination.get("role") == "master" and coordination.get("may_acknowledge"):
                    return service
            await trio.sleep(0.1)
    raise AssertionError(f"no master elected among {among} within {timeout_s:.0f} s")


async def test_compose_cluster_fails_over_and_keeps_every_acked_message(
    cluster: DockerCluster,
) -> None:
    services = ("node1", "node2", "node3")
    addresses = {service: cluster.settings.client_address(service) for service in services}
    everyone = list(addresses.values())
    assert {info.service: info.health for info in cluster.status()} == {
        service: "healthy" for service in ("etcd1", *cluster.settings.node_services)
    }
    old_master = await _master(cluster, services)
    others = tuple(service for service in services if service != old_master)
    await _wait_for(
        addresses[old_master], lambda s: _in_sync(s) == set(others), "both slaves in sync"
    )

    await _create_topic(everyone, TOPIC)
    acked = await _produce(everyone, 200, "before", acks="replicated")

    # The master's container dies (SIGKILL): a slave is elected through etcd, and a
    # producer on the host finds it by itself (metadata from the survivors).
    killed_at = time.monotonic()
    await trio.to_thread.run_sync(cluster.kill, old_master)
    acked |= await _produce(everyone, 1, "first-after", acks="replicated")
    failover_s = time.monotonic() - killed_at
    new_master = await _master(cluster, others)
    (survivor,) = (service for service in others if service != new_master)
    log.info(
        "docker_failover kill_to_first_replicated_ack_s=%.2f new_master=%s", failover_s, new_master
    )
    acked |= await _produce(everyone, 100, "after", acks="replicated")
    await _read_all(addresses[new_master], acked)
    await _read_all(addresses[survivor], acked)

    # The old master's container comes back: it rejoins as a slave and catches up.
    await trio.to_thread.run_sync(cluster.start, old_master)
    await trio.to_thread.run_sync(cluster.wait_healthy, old_master)
    await _wait_for(
        addresses[new_master], lambda s: old_master in _in_sync(s), "the old master in sync"
    )
    assert await _master(cluster, services) == new_master
    await _read_all(addresses[old_master], acked)

    # A partition between the master and one slave: that slave leaves the in-sync set,
    # replicated acks go on through the other one, and once healed it catches up.
    await trio.to_thread.run_sync(cluster.block, new_master, survivor)
    acked |= await _produce(everyone, 50, "partitioned", acks="replicated")
    await _wait_for(
        addresses[new_master],
        lambda s: survivor not in _in_sync(s),
        "the cut slave leaving the in-sync set",
    )
    await trio.to_thread.run_sync(cluster.unblock, new_master, survivor)
    master = await _wait_for(
        addresses[new_master], lambda s: survivor in _in_sync(s), "the cut slave back in sync"
    )
    await _wait_for(
        addresses[survivor],
        lambda s: s["max_offset"] >= master["max_offset"],
        "the cut slave caught up",
    )
    acked |= await _produce(everyone, 20, "healed", acks="replicated")
    await _read_all(addresses[survivor], acked)

    # A container cut off the network and put back keeps its address and names.
    address = cluster.address(survivor)
    await trio.to_thread.run_sync(cluster.isolate, survivor)
    await trio.to_thread.run_sync(cluster.heal, survivor)
    assert cluster.address(survivor) == address
    await trio.to_thread.run_sync(cluster.wait_healthy, survivor)
    await _read_all(addresses[survivor], acked)


async def _metadata(address: str) -> dict[str, Any]:
    async with open_client(address) as client:
        return await client.checked("metadata")


async def _queue_ends(address: str, topic: str, queues: int) -> list[int] | None:
    """The next offset of each queue of ``topic`` on the node at ``address`` (None: the
    node does not know the topic)."""
    ends = []
    async with open_client(address) as client:
        for queue in range(queues):
            answer = await client.call(
                "pull", topic=topic, queue=queue, offset=0, max_messages=1000, wait_ms=0
            )
            if answer["status"] is Status.UNKNOWN_TOPIC:
                return None
            assert answer["status"] is Status.OK, answer
            ends.append(len(answer["messages"]))
    return ends


async def test_two_broker_groups_elect_and_fail_over_apart_with_topics_routed_by_group(
    cluster: DockerCluster,
) -> None:
    """Two broker groups share etcd: each elects its own master among its own nodes, and
    a client routes each topic to its group by the group's bootstrap addresses (the
    client holds one group's view; choosing the group is the application's routing).
    A failover in g2 leaves g1's master and epoch alone, and no group holds the other's
    messages."""
    settings = cluster.settings
    groups = {group: settings.group_services(group) for group in settings.group_names}
    bootstrap = {
        group: [settings.client_address(service) for service in services]
        for group, services in groups.items()
    }
    routes = {"ledger": "g1", "payments": "g2"}
    masters = {group: await _master(cluster, services) for group, services in groups.items()}
    for group, services in groups.items():
        metadata = await _metadata(settings.client_address(masters[group]))
        assert metadata["group"] == group
        assert {member["name"] for member in metadata["members"]} == set(services)
        assert metadata["master"]["name"] == masters[group]
    g1_epoch = (await _status(settings.client_address(masters["g1"])))["coordination"]["epoch"]

    acked: dict[str, dict[tuple[int, int], bytes]] = {}
    for topic, group in routes.items():
        await _create_topic(bootstrap[group], topic)
        acked[topic] = await _produce(bootstrap[group], 50, topic, "replicated", topic)

    # g2's master container dies: g2 elects another of its own nodes; g1 does not move.
    old_g2_master = masters["g2"]
    await trio.to_thread.run_sync(cluster.kill, old_g2_master)
    acked["payments"] |= await _produce(bootstrap["g2"], 20, "after", "replicated", "payments")
    acked["ledger"] |= await _produce(bootstrap["g1"], 20, "after", "replicated", "ledger")
    new_g2_master = await _master(cluster, tuple(s for s in groups["g2"] if s != old_g2_master))
    g1_status = await _status(settings.client_address(masters["g1"]))
    assert await _master(cluster, groups["g1"]) == masters["g1"]
    assert g1_status["coordination"]["epoch"] == g1_epoch

    for topic, group in routes.items():
        master = masters["g1"] if group == "g1" else new_g2_master
        await _read_all(settings.client_address(master), acked[topic], topic)
        other_group_master = new_g2_master if group == "g1" else masters["g1"]
        ends = await _queue_ends(settings.client_address(other_group_master), topic, QUEUES)
        assert not ends or sum(ends) == 0, f"{topic} of {group} has messages in the other group"

    await trio.to_thread.run_sync(cluster.start, old_g2_master)
    await trio.to_thread.run_sync(cluster.wait_healthy, old_g2_master)


async def test_a_ten_second_docker_chaos_run_on_the_running_cluster_is_judged_valid(
    cluster: DockerCluster, tmp_path: Path
) -> None:
    """The short run CI affords: a seeded 10 s run on group g1 of the module's cluster
    (no second ``up``) that partitions the master from its slaves, judged by the same
    checker as local runs; the partition rules are gone at the end."""
    # seed 7 draws one fault in 10 s: the master cut off from both slaves at 5 s for 2.6 s
    run = RunSettings(duration_s=10.0, nemesis=("partition",), seed=7, out=tmp_path / "run")
    outcome = await run_chaos(
        run,
        cluster_factory=lambda _root, _nursery: DockerChaosCluster.attached(cluster),
        live=False,
        out=io.StringIO(),
    )
    rules = subprocess.run(
        ["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True, check=False
    )
    assert cluster.partition_comment not in rules.stdout
    assert outcome.figures["faults_started"] >= 1
    assert outcome.figures["acked"] > 0
    assert outcome.exit_code == 0, (tmp_path / "run" / "results.json").read_text()[:3000]


@pytest.mark.chaos
async def test_short_docker_chaos_run_is_judged_valid(
    docker_engine: Engine, tidelog_image: BuildResult, tmp_path: Path
) -> None:
    """A seeded chaos run whose nemesis partitions containers (DOCKER-USER rules), judged
    by the same checker as local runs; the project is removed at the end."""
    ports = free_host_ports(4)
    settings = ClusterSettings(
        project=f"tidelog-chaos-{os.getpid()}",
        image=tidelog_image.tag,
        subnet=free_subnet(docker_engine),
        node_ports=(ports[0], ports[1], ports[2]),
        etcd_port=ports[3],
    )
    docker_cluster = DockerCluster(docker_engine, settings)
    run = RunSettings(duration_s=20.0, nemesis=("partition",), seed=11, out=tmp_path / "run")
    try:
        outcome = await run_chaos(
            run,
            cluster_factory=lambda _root, _nursery: DockerChaosCluster.started(docker_cluster),
            live=False,
            out=io.StringIO(),
        )
    finally:
        leftovers = await trio.to_thread.run_sync(docker_cluster.leftovers)
    assert leftovers == [], "the chaos run left containers, networks or volumes"
    assert outcome.figures["faults_started"] >= 1
    assert outcome.figures["acked"] > 0
    assert outcome.exit_code == 0, (tmp_path / "run" / "results.json").read_text()[:3000]
