"""The etcd-coordinated master never acknowledges an ``in_sync`` write with fewer than
``min_insync_replicas`` slaves holding it, even once a slave's removal is recorded.

Its writes wait for the HA service and then for every *counted* member, and a shrink of
the recorded set counts once committed: on the old code a write admitted with two
recorded slaves was answered ``OK`` as soon as the removal of the one that dropped out
was recorded, held by one slave of the two the group requires. In process, against a
real etcd, with slaves run by the test (as :mod:`tests.cluster.test_node_coordination`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from cluster.coordination.ha_loop import HaRole
from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.node.coordinated import wait_until
from replication.epochs import EpochFile, EpochHistory
from replication.settings import ReplicationSettings
from replication.slave import SlaveReplication
from storage import MessageStore, StoreConfig
from tests.cluster.test_node_coordination import _cluster_name, _join_group
from tests.e2e.test_failover import call
from tests.replication.test_replication_lag import PausableStore


@pytest.fixture
async def node(
    tmp_path: Path, etcd_endpoints: list[str], request: pytest.FixtureRequest
) -> AsyncIterator[Node]:
    """A coordinated master whose group requires two in-sync slaves."""
    config = NodeConfig.create(
        tmp_path / "solo",
        node={"name": "solo", "port": 0},
        replication={"ha_port": 0, "min_insync_replicas": 2},
        coordination={"etcd": ",".join(etcd_endpoints), "cluster": _cluster_name(request)},
    )
    node = Node(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        assert node.coordinator is not None
        with trio.fail_after(10):
            while node.coordinator.loop.role is not HaRole.MASTER:
                await node.coordinator.loop.wait_role_change()
        yield node
        node.request_shutdown()


def _follower(
    store: MessageStore, name: str, node: Node, data_dir: Path, history: EpochHistory
) -> SlaveReplication:
    """A slave of ``node`` run by the test; ``history`` is its epoch history (the same
    object across restarts, as a node keeps it)."""
    assert node.coordinator is not None
    data_dir.mkdir(exist_ok=True)
    return SlaveReplication(
        store,
        name,
        node.coordinator.ha_address,
        ReplicationSettings(),
        history=history,
        epoch_file=EpochFile.in_dir(data_dir),
    )


async def test_a_recorded_removal_after_admission_does_not_release_the_write(
    node: Node, tmp_path: Path, store_config: StoreConfig
) -> None:
    """Fails on the old code: the write was answered OK once the removal of the slave
    that disconnected was recorded. Now it is answered once that slave is back and
    acknowledged it."""
    assert node.address is not None and node.coordinator is not None and node.ha is not None
    coordinator, loop, ha = node.coordinator, node.coordinator.loop, node.ha
    address = f"{node.address[0]}:{node.address[1]}"
    await call(address, "create_topic", topic="t", queues=1)
    await _join_group(coordinator, "a")
    await _join_group(coordinator, "b")

    def progressed(ready: Callable[[], bool]) -> Awaitable[bool]:
        return wait_until(coordinator.progress, ready, trio.current_time() + 10)

    async with (
        MessageStore.open(store_config) as store_a,
        MessageStore.open(attrs.evolve(store_config, data_dir=tmp_path / "b-store")) as store_b,
        trio.open_nursery() as nursery,
    ):
        pausable = PausableStore(store_b)
        b_scope = trio.CancelScope()
        b_history = EpochHistory()

        async def run_b() -> None:
            with b_scope:
                await _follower(store_b, "b", node, tmp_path / "b", b_history).run()

        nursery.start_soon(_follower(store_a, "a", node, tmp_path / "a", EpochHistory()).run)
        nursery.start_soon(run_b)
        with trio.fail_after(10):
            while loop.in_sync is None or not {"a", "b"} <= loop.in_sync.recorded:
                await loop.next_view()
        first = await call(address, "send", topic="t", body=b"both", queue=0, acks="in_sync")
        assert first["status"] == "OK", first

        pausable.pause()  # b stays connected but holds nothing new
        answered: list[dict[str, Any]] = []
        done = trio.Event()

        async def send() -> None:
            answered.append(
                await call(
                    address,
                    "send",
                    timeout_s=30,
                    topic="t",
                    body=b"admitted with two",
                    queue=0,
                    acks="in_sync",
                    timeout_ms=20_000,
                )
            )
            done.set()

        end = ha.store.commit_log.max_offset
        nursery.start_soon(send)
        assert await progressed(lambda: ha.store.commit_log.max_offset > end)
        end = ha.store.commit_log.max_offset
        assert await progressed(lambda: ha.ack_offsets.get("a", -1) >= end)
        b_scope.cancel()  # b disconnects without the write
        with trio.fail_after(10):  # its removal is recorded: it no longer counts
            while loop.in_sync is None or "b" in loop.in_sync.recorded:
                await loop.next_view()
            while "b" in loop.counted_in_sync():
                await loop.next_view()
        await trio.testing.wait_all_tasks_blocked()
        assert answered == [], "acknowledged with one slave of the two the group requires"

        pausable.resume()
        nursery.start_soon(_follower(store_b, "b", node, tmp_path / "b", b_history).run)
        with trio.fail_after(20):
            await done.wait()
        [answer] = answered
        assert answer["status"] == "OK", answer
        assert ha.ack_offsets.get("b", -1) >= end  # released once b held it again
        nursery.cancel_scope.cancel()
