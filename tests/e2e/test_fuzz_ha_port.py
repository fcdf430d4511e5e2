"""Hostile peers on the replication port of a real master, bounded and seeded.

A master and its slave share a cluster secret; meanwhile many connections send the HA
port garbage: random bytes, old-protocol hellos claiming huge epochs, challenges with
hostile names and flags, wrong proofs followed by hellos claiming newer epochs or
impossible log ends, handshakes cut short, and a wrong-secret handshake that would ack
everything. Replicated sends interleave. Afterwards the master is still the master
(never made stale), every replicated ack reads back on the master and the slave, the
real slave is still the only one connected, and neither log holds a traceback.
"""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from cluster.client import open_client
from cluster.protocol import Status
from replication.auth import NONCE_SIZE, PROOF_SIZE
from replication.epochs import EpochHistory
from replication.wire import (
    HAAuthError,
    HAProtocolError,
    pack_challenge,
    pack_proof,
    pack_slave_hello,
    slave_handshake,
)
from tools.process import NodeProcess, node_status, wait_until

SEED = 8_0708
PEERS = 240
"""Hostile connections in all."""
AT_ONCE = 24
REPLICATED = 80
SECRET = "fuzz-cluster-secret-0123456789abcdef"
PEER_TIMEOUT_MS = 1_500
CLOSE_S = 15
ENV = {
    "TIDELOG_REPLICATION_CLUSTER_SECRET": SECRET,
    "TIDELOG_REPLICATION_PEER_TIMEOUT_MS": str(PEER_TIMEOUT_MS),
    "TIDELOG_REPLICATION_HEARTBEAT_MS": "300",
}


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def _history(*epochs: int) -> EpochHistory:
    history = EpochHistory()
    for epoch in epochs:
        history.append(epoch, 0)
    return history


def _old_hello(rng: random.Random) -> bytes:
    epoch = rng.choice([99_999, 2**32 - 1, 2])
    return (
        struct.pack("!IHHQHHI", 0x544C4853, rng.choice([1, 2, 3]), 1, 0, 4, 1, epoch)
        + b"evil"
        + struct.pack("!IQ", epoch, 0)
    )


def _challenge(rng: random.Random) -> bytes:
    name = rng.choice(["slave-1", "evil", "x" * 255, "\u202e", "slave-1\x00"])
    return pack_challenge(name, rng.randbytes(NONCE_SIZE), rng.random() < 0.7, master=False)


def _hostile_challenge_fields(rng: random.Random) -> bytes:
    name_len = rng.choice([0, 256, 65535])
    flags = rng.randrange(1 << 16)
    return struct.pack(f"!IHH{NONCE_SIZE}sH", 0x544C4853, 4, flags, bytes(NONCE_SIZE), name_len)


def _challenge_then_wrong_proof(rng: random.Random) -> bytes:
    hello = pack_slave_hello("slave-1", rng.choice([0, 2**63, 2**64 - 1]), _history(1, 99_999))
    proof = pack_proof(rng.randbytes(PROOF_SIZE))
    return _challenge(rng) + proof + hello


def _random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 300))


def _cut_short(rng: random.Random) -> bytes:
    whole = _challenge_then_wrong_proof(rng)
    return whole[: rng.randrange(1, len(whole))]


GARBAGE: list[Callable[[random.Random], bytes]] = [
    _old_hello,
    _challenge,
    _hostile_challenge_fields,
    _challenge_then_wrong_proof,
    _random_bytes,
    _cut_short,
]


async def _hostile_peer(host: str, port: int, rng: random.Random, tally: dict[str, int]) -> None:
    """Send one piece of garbage (or a wrong-secret handshake claiming epoch 99999) and
    wait for the master to close the connection."""
    sock = trio.socket.socket()
    with sock:
        await sock.connect((host, port))
        if rng.random() < 0.2:
            with (
                trio.fail_after(CLOSE_S),
                contextlib.suppress(HAAuthError, HAProtocolError, OSError),
            ):
                await slave_handshake(
                    sock, "slave-1", 0, _history(99_999), secret=b"not-the-secret-0123456789"
                )
                tally["accepted"] += 1  # must never happen
            tally["handshakes"] += 1
            return
        with contextlib.suppress(OSError):
            await sock.send(rng.choice(GARBAGE)(rng))
        with trio.fail_after(CLOSE_S), contextlib.suppress(OSError):
            while await sock.recv(4096):
                continue
        tally["garbage"] += 1


async def test_hostile_peers_on_the_ha_port_change_nothing(
    tmp_path: Path, stack: ExitStack
) -> None:
    master = NodeProcess(tmp_path / "master", name="master", extra_args=["--ha-port", "0"], env=ENV)
    stack.callback(master.kill)
    master.start()
    ha_address = (await node_status(master.address))["replication"]["ha_address"]
    slave_args = ["--role", "slave", "--master-ha", ha_address, "--master-client", master.address]
    slave = NodeProcess(tmp_path / "slave", name="slave-1", extra_args=slave_args, env=ENV)
    stack.callback(slave.kill)
    slave.start()

    async def one_slave() -> bool:
        return len((await node_status(master.address))["replication"]["slaves"]) == 1

    await wait_until("the slave connected", one_slave)
    host, _, port = ha_address.rpartition(":")
    tally = {"garbage": 0, "handshakes": 0, "accepted": 0}
    acked: dict[int, bytes] = {}
    rng = random.Random(SEED)
    async with open_client(master.address) as client:
        await client.admin.create_topic("fuzz", 1)

        async def produce() -> None:
            for i in range(REPLICATED):
                body = b"replicated-%d" % i
                sent = await client.call(
                    "send", topic="fuzz", body=body, queue=0, acks="replicated"
                )
                assert sent["status"] is Status.OK, sent
                acked[sent["queue_offset"]] = body

        async def attack() -> None:
            limit = trio.Semaphore(AT_ONCE)

            async def one(seed: int) -> None:
                async with limit:
                    await _hostile_peer(host, int(port), random.Random(seed), tally)

            async with trio.open_nursery() as peers:
                for _ in range(PEERS):
                    peers.start_soon(one, rng.randrange(1 << 32))

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                nursery.start_soon(produce)
    assert tally["garbage"] + tally["handshakes"] == PEERS and tally["accepted"] == 0
    assert len(acked) == REPLICATED

    status = await node_status(master.address)
    assert status["writable"] is True and status["replication"]["stale"] is None
    assert [s["name"] for s in status["replication"]["slaves"]] == ["slave-1"]
    end = status["max_offset"]

    async def caught_up() -> bool:
        return (await node_status(slave.address))["max_offset"] == end

    await wait_until("the slave caught up", caught_up)
    for node in (master, slave):
        async with open_client(node.address) as client:
            page = await client.checked("pull", topic="fuzz", queue=0, offset=0, max_messages=1024)
            assert {m["queue_offset"]: m["body"] for m in page["messages"]} == acked
    assert slave.stop() == 0 and master.stop() == 0
    for node in (master, slave):
        assert "Traceback" not in node.stderr and "crashed" not in node.stderr, node.stderr
    assert "ha_peer_refused" in master.stderr
