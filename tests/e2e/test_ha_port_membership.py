"""Issue 8: on a group run by etcd, a peer that holds the cluster secret but is not a
member of the group in etcd can neither make the master stale nor count for
``acks=replicated``. Real etcd, real ``tidelog node --etcd`` processes.

Before the membership check, the secret was all a peer needed: a hello claiming epoch
99999 made the master refuse every write, and with the real slave paused out of the
in-sync set a fake slave that acked every chunk made ``acks=replicated`` answer ``ok``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster.client import open_client
from cluster.protocol import Status
from replication.epochs import EpochHistory
from replication.transfer import receive_chunk_into
from replication.wire import HAAuthError, pack_ack, send_all, slave_handshake
from tools.launcher import EtcdCluster
from tools.process import NodeProcess, node_status, wait_until

SECRET = "e2e-cluster-secret-0123456789abcdef"
TOPIC = "members"
WAIT_S = 30.0


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def _start(stack: ExitStack, root: Path, name: str, etcd: EtcdCluster) -> NodeProcess:
    process = NodeProcess(
        root / name,
        name=name,
        extra_args=["--etcd", ",".join(etcd.endpoints), "--ha-port", "0"],
        env={
            "TIDELOG_REPLICATION_CLUSTER_SECRET": SECRET,
            # a paused slave leaves the in-sync set within a second
            "TIDELOG_REPLICATION_MAX_LAG_MS": "1000",
        },
    )
    stack.callback(process.kill)
    return process.start()


async def _status(node: NodeProcess) -> dict[str, Any]:
    with trio.fail_after(5):
        return await node_status(node.address)


async def _master_of(nodes: list[NodeProcess]) -> NodeProcess:
    found: list[NodeProcess] = []

    async def one_master() -> bool:
        found.clear()
        for node in nodes:
            with contextlib.suppress(OSError, trio.TooSlowError):
                coordination = (await _status(node)).get("coordination") or {}
                if coordination.get("role") == "master" and coordination.get("may_acknowledge"):
                    found.append(node)
        return len(found) == 1

    await wait_until("one acknowledging master", one_master, timeout=WAIT_S)
    return found[0]


async def _recorded_in_sync(master: NodeProcess, names: set[str]) -> None:
    async def recorded() -> bool:
        coordination = (await _status(master)).get("coordination") or {}
        return set(coordination.get("recorded_in_sync") or ()) == names

    await wait_until(f"recorded in-sync set {sorted(names)}", recorded, timeout=WAIT_S)


async def _send(master: NodeProcess, body: bytes, acks: str) -> dict[str, Any]:
    async with open_client(master.address) as client:
        return await client.call(
            "send", topic=TOPIC, body=body, queue=0, acks=acks, timeout_ms=2000
        )


async def _connect(ha_address: str) -> trio.socket.SocketType:
    host, _, port = ha_address.rpartition(":")
    sock = trio.socket.socket()
    await sock.connect((host, int(port)))
    return sock


async def _intruder(ha_address: str, history: EpochHistory | None = None) -> str:
    """A peer with the secret, named like no member: hello (claiming ``history``), then
    ack every chunk without storing it. Returns why it was refused."""
    sock = await _connect(ha_address)
    with sock:
        try:
            with trio.fail_after(10):
                await slave_handshake(sock, "intruder", 0, history, secret=SECRET.encode())
        except HAAuthError as exc:
            return str(exc)
        buffer = memoryview(bytearray(1 << 21))
        while (header := await receive_chunk_into(sock, buffer)) is not None:
            await send_all(sock, pack_ack(header.offset + header.length))
    return "not refused"


async def test_a_secret_holding_non_member_can_neither_stop_writes_nor_confirm_them(
    tmp_path: Path, stack: ExitStack
) -> None:
    etcd = stack.enter_context(EtcdCluster(tmp_path / "etcd"))
    nodes = [_start(stack, tmp_path, name, etcd) for name in ("n1", "n2")]
    master = await _master_of(nodes)
    slave = next(node for node in nodes if node is not master)
    await _recorded_in_sync(master, {"n1", "n2"})
    async with open_client(master.address) as client:
        await client.admin.create_topic(TOPIC, 1)
    ha_address = str((await _status(master))["replication"]["ha_address"])
    assert (await _send(master, b"both in sync", "replicated"))["status"] is Status.OK

    # A hello claiming a far newer epoch, with the right secret.
    newer = EpochHistory()
    newer.append(99999, 0)
    refusal = await _intruder(ha_address, newer)
    assert "not a member" in refusal, refusal
    status = await _status(master)
    assert status["writable"] is True and status["replication"]["stale"] is None
    assert (await _send(master, b"still writable", "replicated"))["status"] is Status.OK

    # With the real slave paused out of the in-sync set, a fake slave that would ack
    # every chunk must not make a replicated write OK.
    assert slave.process is not None
    slave.pause()
    try:
        await _recorded_in_sync(master, {master.name})
        async with trio.open_nursery() as nursery:
            outcome: list[str] = []

            async def intrude() -> None:
                outcome.append(await _intruder(ha_address))

            async def refused_or_streaming() -> bool:
                slaves = (await _status(master))["replication"]["slaves"]
                return bool(outcome) or "intruder" in {slave["name"] for slave in slaves}

            nursery.start_soon(intrude)
            await wait_until("the intruder refused or streaming", refused_or_streaming)
            answer = await _send(master, b"nobody stored this", "replicated")
            nursery.cancel_scope.cancel()
        assert answer["status"] is not Status.OK, answer
        assert outcome and "not a member" in outcome[0], outcome
    finally:
        slave.resume()
    await _recorded_in_sync(master, {"n1", "n2"})
    assert (await _send(master, b"real slave back", "replicated"))["status"] is Status.OK
    assert master.stop() == 0
    assert "ha_peer_refused" in master.stderr and "claimed_name=intruder" in master.stderr
