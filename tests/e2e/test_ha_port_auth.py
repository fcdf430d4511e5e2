"""Issue 8 points 7 and 8 against real ``tidelog node`` processes: the replication port
believes only peers that prove the cluster secret.

On the old code (HA protocol 3, no secret) a 40-byte hello claiming epoch 99999 made
the master refuse every write until a restart, and a peer naming itself ``slave-1``
that acked every chunk made ``acks=replicated`` answer ``ok`` while the real slave was
paused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
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
from tools.process import NodeProcess, node_status, wait_until

SECRET = "e2e-cluster-secret-0123456789abcdef"
WRONG = "e2e-another-secret-fedcba9876543210"
OLD_HELLO_CLAIMING_EPOCH_99999 = (
    struct.pack("!IHHQHHI", 0x544C4853, 3, 1, 0, 4, 1, 99999)
    + b"evil"
    + struct.pack("!IQ", 99999, 0)
)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def _node(
    stack: ExitStack, root: Path, name: str, secret: str | None, args: list[str]
) -> NodeProcess:
    env = {"TIDELOG_REPLICATION_CLUSTER_SECRET": secret} if secret else {}
    process = NodeProcess(root / name, name=name, extra_args=args, env=env)
    stack.callback(process.kill)
    return process.start()


async def _ha_address(master: NodeProcess) -> str:
    return str((await node_status(master.address))["replication"]["ha_address"])


def _slave_args(master: NodeProcess, ha_address: str) -> list[str]:
    return ["--role", "slave", "--master-ha", ha_address, "--master-client", master.address]


async def _connect(ha_address: str) -> trio.socket.SocketType:
    host, _, port = ha_address.rpartition(":")
    sock = trio.socket.socket()
    await sock.connect((host, int(port)))
    return sock


async def _send(address: str, body: bytes, acks: str, timeout_ms: int = 5000) -> dict[str, Any]:
    async with open_client(address) as client:
        return await client.call(
            "send", topic="auth", body=body, queue=0, acks=acks, timeout_ms=timeout_ms
        )


async def test_a_hello_claiming_a_newer_epoch_without_the_secret_leaves_the_master_writable(
    tmp_path: Path, stack: ExitStack
) -> None:
    master = _node(stack, tmp_path, "master", SECRET, ["--ha-port", "0"])
    ha_address = await _ha_address(master)
    async with open_client(master.address) as client:
        await client.admin.create_topic("auth", 1)
    sock = await _connect(ha_address)
    with sock:
        await sock.send(OLD_HELLO_CLAIMING_EPOCH_99999)
        # The version-4 header, then the close (a reset: the hello's tail was left unread).
        with trio.fail_after(10), contextlib.suppress(ConnectionResetError):
            while await sock.recv(4096):
                continue
    history = EpochHistory()
    history.append(99999, 0)
    sock = await _connect(ha_address)
    with sock, trio.fail_after(10), pytest.raises(HAAuthError, match="no cluster secret"):
        await slave_handshake(sock, "evil", 0, history)

    answer = await _send(master.address, b"still the master", "durable")
    assert answer["status"] is Status.OK, answer
    status = await node_status(master.address)
    assert status["writable"] is True and status["replication"]["stale"] is None
    assert master.stop() == 0
    assert "ha_peer_refused peer=127.0.0.1:" in master.stderr
    assert "HA protocol 3" in master.stderr


async def test_a_fake_slave_without_the_secret_cannot_confirm_replicated_writes(
    tmp_path: Path, stack: ExitStack
) -> None:
    """The real ``slave-1`` (right secret) works; paused, a fake ``slave-1`` that would
    ack everything is refused, so ``acks=replicated`` does not answer ``ok``."""
    master = _node(stack, tmp_path, "master", SECRET, ["--ha-port", "0"])
    ha_address = await _ha_address(master)
    slave = _node(stack, tmp_path, "slave-1", SECRET, _slave_args(master, ha_address))
    async with open_client(master.address) as client:
        await client.admin.create_topic("auth", 1)

    async def connected() -> bool:
        return len((await node_status(master.address))["replication"]["slaves"]) == 1

    await wait_until("slave-1 connected", connected)
    assert (await _send(master.address, b"with the real slave", "replicated"))[
        "status"
    ] is Status.OK

    refusals: list[str] = []

    async def fake_slave(secret: bytes | None) -> None:
        """Hello as slave-1, then ack every chunk at its end without storing it."""
        sock = await _connect(ha_address)
        with sock:
            try:
                _hello, _name = await slave_handshake(sock, "slave-1", 1 << 20, secret=secret)
            except HAAuthError as exc:
                refusals.append(str(exc))
                return
            buffer = memoryview(bytearray(1 << 21))
            while (header := await receive_chunk_into(sock, buffer)) is not None:
                await send_all(sock, pack_ack(header.offset + header.length))

    assert slave.process is not None
    os.kill(slave.process.pid, signal.SIGSTOP)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_slave, None)
            nursery.start_soon(fake_slave, WRONG.encode())
            answer = await _send(master.address, b"nobody stored this", "replicated", 2000)
            nursery.cancel_scope.cancel()
        assert answer["status"] is not Status.OK, answer
        assert len(refusals) == 2
        assert any("no cluster secret" in r for r in refusals)
        assert any("authentication failed" in r for r in refusals)
    finally:
        os.kill(slave.process.pid, signal.SIGCONT)
    await wait_until("slave-1 connected again", connected)
    assert (await _send(master.address, b"real slave back", "replicated"))["status"] is Status.OK


async def test_a_slave_with_a_wrong_secret_is_refused_and_says_why(
    tmp_path: Path, stack: ExitStack
) -> None:
    master = _node(stack, tmp_path, "master", SECRET, ["--ha-port", "0"])
    ha_address = await _ha_address(master)
    slave = _node(stack, tmp_path, "slave-1", WRONG, _slave_args(master, ha_address))

    async def refused() -> bool:
        error = (await node_status(slave.address))["replication"]["last_error"]
        return error is not None and "authentication failed" in error

    await wait_until("the slave's status to say why it is refused", refused)
    status = await node_status(slave.address)
    assert status["replication"]["connected"] is False
    assert "cluster_secret" in status["replication"]["last_error"]
    assert (await node_status(master.address))["replication"]["slaves"] == []
    assert slave.stop() == 0 and master.stop() == 0
    assert "ha_peer_refused peer=127.0.0.1:" in master.stderr
    assert "claimed_name=slave-1" in master.stderr and "secrets differ" in master.stderr
    assert "ha_auth_refused" in slave.stderr and "secrets differ" in slave.stderr
