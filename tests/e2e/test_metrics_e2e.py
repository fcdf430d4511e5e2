"""/metrics and /health of real `tidelog node` processes (``--metrics-port 0``).

The monitoring port is read from the node's ``metrics_listening`` log line; waiting for
another process's state is a bounded poll (:func:`tools.process.wait_until`). Every
process is killed by its PID at the end of its test, whatever happened.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cluster.client import Client, open_client
from cluster.node.health_http import http_get
from cluster.protocol import Status
from tests.helpers import tidelog
from tools.process import NodeProcess, node_status, wait_until

LISTENING = re.compile(r"metrics_listening host=(?P<host>\S+) port=(?P<port>\d+)")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


class Monitored:
    """A node process with its monitoring port, learnt from its log."""

    def __init__(self, process: NodeProcess) -> None:
        self.process = process
        self.monitoring: tuple[str, int] | None = None

    @property
    def address(self) -> str:
        return self.process.address

    async def learn_port(self) -> None:
        async def logged() -> bool:
            match = LISTENING.search(self.process.stderr)
            if match is not None:
                self.monitoring = (match["host"], int(match["port"]))
            return match is not None

        await wait_until(f"{self.process.name} to log its metrics port", logged)

    async def get(self, path: str) -> tuple[int, bytes]:
        assert self.monitoring is not None
        with trio.fail_after(15):
            answer = await http_get(*self.monitoring, path)
        return answer.status, answer.body

    async def scrape(self) -> Samples:
        status, body = await self.get("/metrics")
        assert status == 200, body
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    async def health(self) -> tuple[int, dict[str, Any]]:
        status, body = await self.get("/health")
        return status, json.loads(body)


async def _start(stack: ExitStack, data_dir: Path, name: str, args: list[str]) -> Monitored:
    process = NodeProcess(
        data_dir, name=name, extra_args=["--metrics-port", "0", *args], log_level="INFO"
    )
    stack.callback(process.kill)
    node = Monitored(process.start())
    await node.learn_port()
    return node


def _slave_args(master: Monitored, ha_address: str) -> list[str]:
    return ["--role", "slave", "--master-ha", ha_address, "--master-client", master.address]


async def _ha_address(node: Monitored) -> str:
    address: str = (await node_status(node.address))["replication"]["ha_address"]
    return address


async def _wait_in_sync(master: Monitored) -> None:
    async def in_sync() -> bool:
        return len((await node_status(master.address))["replication"]["in_sync"]) >= 1

    await wait_until("a slave in sync with the master", in_sync)


async def _tidelog_health(node: Monitored) -> subprocess.CompletedProcess[str]:
    """``tidelog health`` against the node's monitoring port, as a health check runs it."""
    assert node.monitoring is not None
    host, port = node.monitoring
    return await trio.to_thread.run_sync(tidelog, "health", f"{host}:{port}")


class Producer:
    """Sends acks=replicated writes until stopped; :meth:`acked` waits for a count."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.count = 0
        self._changed = trio.Event()
        self.stopped = False

    async def run(self) -> None:
        while not self.stopped:
            reply = await self.client.call(
                "send", topic="load", body=b"x" * 100, acks="replicated", timeout_ms=10_000
            )
            assert reply["status"] is Status.OK, reply
            self.count += 1
            self._changed.set()
            self._changed = trio.Event()

    async def acked(self, count: int) -> None:
        with trio.fail_after(30):
            while self.count < count:
                await self._changed.wait()


async def test_scraping_a_master_and_its_slave_during_a_produce_load(
    tmp_path: Path, stack: ExitStack
) -> None:
    master = await _start(stack, tmp_path / "m", "m", ["--ha-port", "0"])
    slave = await _start(stack, tmp_path / "s", "s", _slave_args(master, await _ha_address(master)))
    await _wait_in_sync(master)
    async with open_client(master.address) as client, trio.open_nursery() as nursery:
        await client.admin.create_topic("load", 2)
        producer = Producer(client)
        nursery.start_soon(producer.run)
        await producer.acked(20)
        first = await master.scrape()
        await producer.acked(producer.count + 50)
        second = await master.scrape()
        producer.stopped = True

    replicated = ("tidelog_ack_wait_seconds_count", (("acks", "replicated"),))
    assert second[replicated] >= first[replicated] + 50 > 50
    appended = ("tidelog_appended_messages_total", ())
    assert second[appended] >= first[appended] + 50
    assert (
        second[("tidelog_appended_bytes_total", ())] > first[("tidelog_appended_bytes_total", ())]
    )
    fsyncs = ("tidelog_commitlog_fsync_seconds_count", ())
    assert second[fsyncs] > first[fsyncs]
    assert second[("tidelog_role", (("role", "master"),))] == 1
    assert second[("tidelog_role", (("role", "slave"),))] == 0
    assert second[("tidelog_writable", ())] == 1
    assert second[("tidelog_epoch", ())] == (await node_status(master.address))["epoch"]
    assert ("tidelog_replication_slave_lag_bytes", (("slave", "s"),)) in second
    assert ("tidelog_replication_slave_lag_seconds", (("slave", "s"),)) in second
    assert second[("tidelog_replication_in_sync_slaves", ())] == 1
    replicated_at = second[("tidelog_replication_replicated_offset_bytes", ())]
    assert 0 < replicated_at <= second[("tidelog_replication_confirm_offset_bytes", ())]
    assert second[("tidelog_client_connections", ())] >= 1

    on_slave = await slave.scrape()
    assert on_slave[("tidelog_role", (("role", "slave"),))] == 1
    assert on_slave[("tidelog_appended_messages_total", ())] >= 70  # replicated appends
    assert on_slave[("tidelog_replication_connected", ())] == 1
    assert (await master.health())[0] == 200
    assert (await slave.health())[0] == 200
    healthy = await _tidelog_health(master)
    assert healthy.returncode == 0 and healthy.stdout.startswith("ok: node m is master"), healthy

    # The master gone, the slave no longer serves its role: 503, naming the master.
    master.process.kill()

    async def unhealthy() -> bool:
        return (await slave.health())[0] == 503

    await wait_until("the slave's health to turn 503", unhealthy)
    code, body = await slave.health()
    assert code == 503 and body["role"] == "slave" and body["writable"] is False
    assert body["reason"].startswith("not connected to the master at ")
    unhealthy_cli = await _tidelog_health(slave)
    assert unhealthy_cli.returncode == 1, unhealthy_cli
    assert unhealthy_cli.stdout.startswith("unavailable: node s is slave"), unhealthy_cli
    assert "not connected to the master at " in unhealthy_cli.stdout
    assert slave.process.stop() == 0, slave.process.stderr


async def test_a_stale_master_answers_503_with_the_reason(tmp_path: Path, stack: ExitStack) -> None:
    a = await _start(stack, tmp_path / "a", "a", ["--ha-port", "0"])
    a_ha = await _ha_address(a)
    b = await _start(stack, tmp_path / "b", "b", _slave_args(a, a_ha))
    c = await _start(stack, tmp_path / "c", "c", _slave_args(a, a_ha))
    await _wait_in_sync(a)
    assert (await a.health())[0] == 200
    async with open_client(b.address) as client:
        promoted = await client.checked("promote")
    async with open_client(c.address) as client:  # C follows B (epoch 2), then proves A stale
        await client.checked("repoint", master_ha=promoted["ha_address"], master_client=b.address)

        async def in_epoch_2() -> bool:
            return (await node_status(c.address))["epoch"] == 2

        await wait_until("C to follow B into epoch 2", in_epoch_2)
        await client.checked("repoint", master_ha=a_ha)

    async def a_unhealthy() -> bool:
        return (await a.health())[0] == 503

    await wait_until("A's health to turn 503", a_unhealthy)
    code, body = await a.health()
    assert code == 503 and body["writable"] is False and body["epoch"] == 1
    assert body["reason"].startswith("a stale master (reason=slave_epoch_newer"), body
    assert (await a.scrape())[("tidelog_replication_stale", ())] == 1
    assert (await b.health())[0] == 200  # the new master serves its role
    for node in (c, b, a):
        assert node.process.stop() == 0, node.process.stderr
