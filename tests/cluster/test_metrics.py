"""The monitoring port in-process: /metrics figures move with the node's work, /health
follows its role, and the small HTTP server stays up whatever a peer sends.

Real nodes serve in the test's trio loop on loopback (port 0 everywhere); the scrape
is a real HTTP request. The health decision itself is pure and checked on its own.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.node.health import judge_health
from cluster.node.health_http import (
    MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
    REQUEST_TIMEOUT_S,
    HttpAnswer,
    http_get,
    serve_http,
)
from cluster.node.status import NodeStatus, SlaveReplicationStatus
from cluster.protocol import Status
from tests.cluster.test_server import ANSWER_TIMEOUT, client, node_config, running, until

# ---- helpers ----------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert node.metrics_address is not None
    with trio.fail_after(ANSWER_TIMEOUT):
        answer = await http_get(*node.metrics_address, "/metrics")
    assert answer.status == 200 and answer.content_type.startswith("text/plain"), answer
    return _samples(answer.body.decode())


async def health(node: Node) -> tuple[int, dict[str, Any]]:
    assert node.metrics_address is not None
    with trio.fail_after(ANSWER_TIMEOUT):
        answer = await http_get(*node.metrics_address, "/health")
    assert answer.content_type == "application/json"
    return answer.status, json.loads(answer.body)


def _monitored(data_dir: Path, name: str = "node-1", **sections: dict[str, Any]) -> NodeConfig:
    """The test servers' node config with the monitoring port on (a free port)."""
    config = node_config(data_dir, **sections)
    return attrs.evolve(config, node=attrs.evolve(config.node, name=name, metrics_port=0))


@contextlib.asynccontextmanager
async def _master_with_slave(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """A monitored master and a monitored slave ``s1`` that follows it, once it is in sync."""
    master_config = _monitored(tmp_path / "m", replication={"ha_port": 0})
    async with running(master_config) as master:
        assert master.ha_address is not None and master.address is not None
        slave_config = _monitored(
            tmp_path / "s",
            "s1",
            replication={
                "role": "slave",
                "master_ha": "{}:{}".format(*master.ha_address),
                "master_client": "{}:{}".format(*master.address),
            },
        )
        async with running(slave_config) as slave:
            ha = master.ha
            assert ha is not None
            await until(lambda: len(ha.in_sync_slaves()) == 1)
            yield master, slave


# ---- a node's metrics ---------------------------------------------------------------------------


async def test_the_figures_move_with_writes_and_errors(tmp_path: Path) -> None:
    async with running(_monitored(tmp_path)) as node, client(node) as c:
        before = await scrape(node)
        assert before[("tidelog_role", (("role", "master"),))] == 1
        assert before[("tidelog_role", (("role", "slave"),))] == 0
        assert before[("tidelog_writable", ())] == 1
        assert before[("tidelog_epoch", ())] == node.epoch
        assert before[("tidelog_client_connections", ())] == 1

        await c.ok("create_topic", topic="t", queues=2)
        for i in range(20):
            await c.ok("send", topic="t", body=b"m%d" % i, queue=i % 2, acks="durable")
        await c.ok("send_batch", topic="t", messages=[{"body": b"b"}] * 5, acks="leader")
        missing = await c.call("send", topic="nowhere", body=b"x")
        assert missing["status"] is Status.UNKNOWN_TOPIC
        replicated = await c.call("send", topic="t", body=b"x", acks="replicated")
        assert replicated["status"] is Status.SLAVE_NOT_AVAILABLE

        after = await scrape(node)
        assert after[("tidelog_appended_messages_total", ())] == 25
        assert node.store is not None
        assert after[("tidelog_appended_bytes_total", ())] == node.store.commit_log.max_offset
        assert after[("tidelog_log_end_offset_bytes", ())] == node.store.commit_log.max_offset
        durable_waits = ("tidelog_ack_wait_seconds_count", (("acks", "durable"),))
        assert after[durable_waits] == before[durable_waits] + 20
        assert after[("tidelog_commitlog_fsync_seconds_count", ())] >= 1
        assert (
            after[("tidelog_commitlog_flush_seconds_count", ())]
            == after[("tidelog_commitlog_fsync_seconds_count", ())]
        )
        assert after[("tidelog_commitlog_fsyncs_total", ())] >= 1
        assert after[("tidelog_request_errors_total", (("status", "UNKNOWN_TOPIC"),))] == 1
        assert after[("tidelog_request_errors_total", (("status", "SLAVE_NOT_AVAILABLE"),))] == 1
        assert after[("tidelog_topics", ())] == 1
        assert after[("tidelog_consume_queues", ())] == 2
        assert ("process_open_fds", ()) in after


async def test_a_master_reports_each_slaves_lag_and_the_in_sync_set(tmp_path: Path) -> None:
    async with _master_with_slave(tmp_path) as (master, slave), client(master) as c:
        await c.ok("create_topic", topic="t", queues=1)
        for i in range(5):
            await c.ok("send", topic="t", body=b"r%d" % i, queue=0, acks="replicated")
        seen = await scrape(master)
        assert ("tidelog_replication_slave_lag_bytes", (("slave", "s1"),)) in seen
        assert ("tidelog_replication_slave_lag_seconds", (("slave", "s1"),)) in seen
        assert seen[("tidelog_replication_slave_in_sync", (("slave", "s1"),))] == 1
        assert seen[("tidelog_replication_connected_slaves", ())] == 1
        assert seen[("tidelog_ack_wait_seconds_count", (("acks", "replicated"),))] == 5
        on_slave = await scrape(slave)
        assert on_slave[("tidelog_role", (("role", "slave"),))] == 1
        assert on_slave[("tidelog_writable", ())] == 0
        assert on_slave[("tidelog_replication_connected", ())] == 1
        assert ("tidelog_replication_master_lag_bytes", ()) in on_slave
        assert await health(slave) == (200, await _health_body(slave, healthy=True))


async def _health_body(node: Node, *, healthy: bool) -> dict[str, Any]:
    _, body = await health(node)
    assert (body["status"] == "ok") is healthy and (body["reason"] is None) is healthy
    assert body["role"] == node.role.name and body["epoch"] == node.epoch
    return body


async def test_health_is_ok_on_a_serving_master_and_says_why_not_once_its_storage_failed(
    tmp_path: Path,
) -> None:
    async with running(_monitored(tmp_path)) as node:
        code, body = await health(node)
        assert code == 200
        assert body == {
            "status": "ok",
            "node": "node-1",
            "role": "master",
            "epoch": node.epoch,
            "writable": True,
            "reason": None,
        }
        assert node.store is not None
        node.store.commit_log.fail_missing("segment 0 vanished")  # what a lost file does
        code, body = await health(node)
        assert code == 503 and body["writable"] is False
        assert (
            body["reason"].startswith("storage failed:") and "segment 0 vanished" in body["reason"]
        )
        metrics = await scrape(node)
        assert metrics[("tidelog_storage_failed", ())] == 1
        assert metrics[("tidelog_writable", ())] == 0


async def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    async with running(node_config(tmp_path)) as node:
        assert node.metrics is None and node.metrics_address is None
        assert node.store is not None
        assert node.store.commit_log.on_flush.__name__ == "_ignore_flush"


# ---- the health decision (pure) ---------------------------------------------------------------


def _status(
    *,
    role: str = "master",
    writable: bool = True,
    failed: bool = False,
    disk_full: bool = False,
    replication: SlaveReplicationStatus | None = None,
    coordination: dict[str, Any] | None = None,
) -> NodeStatus:
    return NodeStatus(
        role=role,
        writable=writable,
        min_offset=0,
        max_offset=0,
        flushed_offset=0,
        replication=replication,
        node="n",
        address="127.0.0.1:1",
        epoch=3,
        topics=0,
        connections=0,
        uptime_ms=0,
        store={
            "failed": failed,
            "failure": "fsync failed" if failed else None,
            "disk_full": disk_full,
        },
        coordination=coordination,
    )


def _slave(*, connected: bool, halted: str | None = None) -> SlaveReplicationStatus:
    return SlaveReplicationStatus(
        role="slave",
        epoch=3,
        master_ha="10.0.0.1:7700",
        connected=connected,
        acked_offset=0,
        master_offset=0,
        reconnects=0,
        last_truncation=None,
        last_error="connection refused",
        halted=halted,
    )


@pytest.mark.parametrize(
    ("status", "refusal", "reason"),
    [
        (_status(), None, None),
        (_status(role="slave", writable=False, replication=_slave(connected=True)), "slave", None),
        (
            _status(role="slave", writable=False, replication=_slave(connected=False)),
            "slave",
            "not connected to the master at 10.0.0.1:7700: connection refused",
        ),
        (
            _status(role="slave", writable=False, replication=_slave(connected=True, halted="x")),
            "slave",
            "replication halted: x",
        ),
        (_status(writable=False), "a stale master (proof)", "a stale master (proof)"),
        (_status(role="fenced", writable=False), "fenced: lease", "fenced: lease"),
        (_status(role="candidate", writable=False), "no master yet", "no master yet"),
        (_status(writable=False, failed=True), None, "storage failed: fsync failed"),
        (
            _status(writable=False, disk_full=True),
            None,
            "disk full: the disk is above its watermark and writes are refused",
        ),
        (
            _status(writable=False, coordination={"may_acknowledge": False}),
            None,
            "the etcd lease is not confirmed: acknowledgements are held",
        ),
    ],
)
def test_health_names_what_stops_the_node_serving_its_role(
    status: NodeStatus, refusal: str | None, reason: str | None
) -> None:
    judged = judge_health(status, write_refusal=refusal, shutting_down=False)
    assert judged.reason == reason and judged.healthy is (reason is None)
    assert (judged.role, judged.epoch, judged.writable) == (status.role, 3, status.writable)


@given(
    role=st.sampled_from(["master", "slave", "candidate", "fenced"]),
    writable=st.booleans(),
    failed=st.booleans(),
    disk_full=st.booleans(),
    connected=st.booleans(),
    refusal=st.none() | st.text(min_size=1, max_size=10),
    shutting_down=st.booleans(),
)
def test_health_precedence(
    role: str,
    writable: bool,
    failed: bool,
    disk_full: bool,
    connected: bool,
    refusal: str | None,
    shutting_down: bool,
) -> None:
    """Shutting down, then failed storage, always win; a master-like role refusing
    writes is never healthy; a healthy node is writable or a connected slave."""
    replication = _slave(connected=connected) if role == "slave" else None
    status = _status(
        role=role, writable=writable, failed=failed, disk_full=disk_full, replication=replication
    )
    judged = judge_health(status, write_refusal=refusal, shutting_down=shutting_down)
    if shutting_down:
        assert judged.reason is not None and judged.reason.startswith("shutting down")
    elif failed:
        assert judged.reason is not None and judged.reason.startswith("storage failed")
    elif role != "slave" and refusal is not None:
        assert judged.reason == refusal
    if judged.healthy:
        assert writable or (role == "slave" and connected)


# ---- the HTTP server ----------------------------------------------------------------------------


async def _raw(port: int, request: bytes) -> bytes:
    """Send ``request`` as is; everything the server answers until it closes."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request)
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    return bytes(data)


def _broken() -> HttpAnswer:
    raise RuntimeError("a bug while reading the node")


ROUTES = {"/ok": lambda: HttpAnswer.text(200, "fine\n"), "/broken": _broken}


async def test_the_http_server_answers_what_it_serves_and_refuses_the_rest(
    nursery: trio.Nursery,
) -> None:
    _host, port = await nursery.start(serve_http, "127.0.0.1", 0, ROUTES)
    ok = await http_get("127.0.0.1", port, "/ok?x=1")
    assert (ok.status, ok.body) == (200, b"fine\n")
    missing = await http_get("127.0.0.1", port, "/metricz")
    assert missing.status == 404 and b"/broken, /ok" in missing.body
    assert (await http_get("127.0.0.1", port, "/broken")).status == 500
    posted = await _raw(port, b"POST /ok HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert posted.startswith(b"HTTP/1.1 405 ")
    head = await _raw(port, b"HEAD /ok HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert (await _raw(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    huge = b"GET /ok HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST_BYTES + 10) + b"\r\n\r\n"
    assert (await _raw(port, huge)).startswith(b"HTTP/1.1 431 ")
    assert (await http_get("127.0.0.1", port, "/ok")).status == 200  # still serving


async def test_silent_peers_are_dropped_and_never_hold_more_than_the_limit(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """Time stands still (``mock_clock``) until the test moves it past the request timeout."""
    _host, port = await nursery.start(serve_http, "127.0.0.1", 0, ROUTES)
    silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
    await trio.testing.wait_all_tasks_blocked()
    extra = await trio.open_tcp_stream("127.0.0.1", port)
    assert await extra.receive_some(1) == b""  # over the limit: closed at accept
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(REQUEST_TIMEOUT_S + 1)
    for stream in silent:  # the request timeout ends each silent one, answerless
        assert await stream.receive_some(1) == b""
        await stream.aclose()
    await extra.aclose()
    assert (await http_get("127.0.0.1", port, "/ok")).status == 200


# ---- the Grafana dashboard ----------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


async def test_the_dashboard_queries_only_metrics_a_node_exports(tmp_path: Path) -> None:
    """docs/grafana-dashboard.json cannot drift from the names: every ``tidelog_*`` it
    queries is in the scrape of a master with a slave, or of that slave."""
    queried = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for panel in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"\btidelog_\w+", target["expr"])
    }
    exported: set[str] = set()
    async with _master_with_slave(tmp_path) as (master, slave), client(master) as c:
        await c.call("send", topic="missing", body=b"x")  # one error, so its series exists
        for node in (master, slave):
            exported |= {
                re.sub(r"_(bucket|count|sum)$", "", name) for name, _ in await scrape(node)
            }
    coordination_only = {name for name in queried if name.startswith("tidelog_coordination_")}
    assert queried - coordination_only <= exported, queried - coordination_only - exported
    source = (DASHBOARD.parents[1] / "cluster" / "node" / "metrics.py").read_text(encoding="utf-8")
    assert all(f'"{name}"' in source for name in coordination_only)  # etcd-only: by name
