"""A write's ack wait is answered by the ack policy the node held when the write was
appended, also when it waited in its connection's queue behind an earlier write
(``cluster/server/connection.py``, ``QUEUED_ACKS``) while the node's role changed.

The HA loop swaps the policy when a master's term ends and it follows the new master
(``cluster/node/coordinated.py``: ``SlaveAcks``, then ``handler.set_acks``). A slave's
wait is the standalone one, which answers a fsynced ``replicated`` write OK: read at the
queued wait's turn, it acknowledged writes no slave held, which the handshake with the
new master then cuts (promises 1 and 5)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import trio
import trio.testing

from cluster.node.acks import ReplicatedAcks, SlaveAcks, StandaloneAcks
from cluster.node.handler import NodeRequestHandler
from cluster.protocol import Status
from replication.epochs import EpochFile, EpochHistory
from replication.settings import ReplicationSettings
from replication.slave import HAClient, SlaveReplication
from storage import MessageStore
from tests.cluster.test_server import Raw, node_config, running, until
from tests.replication.test_ha_stream import config_at, replicated, serving
from tools.faults.proxy import Direction, FaultProxy


@contextlib.asynccontextmanager
async def master_with_a_held_slave(
    tmp_path: Path,
) -> AsyncIterator[tuple[MessageStore, NodeRequestHandler, FaultProxy, Raw, trio.Nursery]]:
    """A node serving one slave through a fault proxy, its first write replicated, under
    a replicated ack policy, with the slave's side of the stream held from then on: the
    node's writes wait for acks that do not come until the test lets them through
    (``proxy.hold(frozenset())``). Yields the node's store and handler, the proxy, a raw
    client connection with topic ``t`` made, and the nursery the slave runs in."""
    async with (
        running(node_config(tmp_path / "node")) as node,
        MessageStore.open(config_at(tmp_path / "slave")) as slave_store,
    ):
        store, handler = node.store, node.handler
        assert store is not None and handler is not None
        async with serving(store) as (service, ha_port, nursery):
            proxy = FaultProxy("127.0.0.1", ha_port)
            proxy_port = await nursery.start(proxy.serve)
            nursery.start_soon(HAClient(slave_store, "s1").run, "127.0.0.1", proxy_port)
            raw = await Raw.connect(node)
            await raw.send("create_topic", topic="t", queues=1)
            await raw.send("send", topic="t", body=b"first", acks="leader")
            assert {a["status"] for a in (await raw.recv_n(2)).values()} == {Status.OK}
            assert await replicated(service, store.commit_log.max_offset)
            # An elected master's policy (CoordinatedAcks wraps this one).
            handler.set_acks(ReplicatedAcks(StandaloneAcks(store), service, 1))
            proxy.hold(Direction.parse("from_target"))  # the slave hears nothing more
            yield store, handler, proxy, raw, nursery


async def test_a_queued_replicated_wait_keeps_the_policy_its_write_was_appended_under(
    tmp_path: Path,
) -> None:
    async with master_with_a_held_slave(tmp_path) as (store, handler, proxy, raw, nursery):
        first = await raw.send("send", topic="t", body=b"w1", acks="replicated", timeout_ms=1000)
        second = await raw.send("send", topic="t", body=b"w2", acks="replicated", timeout_ms=1000)
        # Both appended (a put can wait on a thread, which one idle point does not cover),
        # then the second queued behind the first.
        await until(lambda: store.queue_offsets("t", 0)[1] == 3)
        await trio.testing.wait_all_tasks_blocked()
        # The term ends: the HA loop has the node follow the new master (coordinated.py).
        follower = SlaveReplication(
            store,
            "m",
            "127.0.0.1:1",
            ReplicationSettings(),
            history=EpochHistory(),
            epoch_file=EpochFile.in_dir(tmp_path),
        )
        handler.set_acks(SlaveAcks(StandaloneAcks(store), follower))
        answers = await raw.recv_n(2)
        assert answers[first]["status"] is Status.FLUSH_SLAVE_TIMEOUT
        assert answers[second]["status"] is Status.FLUSH_SLAVE_TIMEOUT, (
            "a replicated write no slave acknowledged must not be answered OK"
        )
        proxy.hold(frozenset())
        nursery.cancel_scope.cancel()
