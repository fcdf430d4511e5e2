"""The node around its server: roles, topic sync, restarts and signals, in-process."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.node import Node
from tests.cluster.test_server import client, node_config, running, until


@contextmanager
def no_garbage_collection() -> Iterator[None]:
    """Sockets left open are then seen as open: nothing closes them behind our back."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _address(node: Node) -> str:
    assert node.address is not None
    host, port = node.address
    return f"{host}:{port}"


async def test_topic_sync_closes_its_connections(tmp_path: Path) -> None:
    """A slave's topic sync rounds share one connection to the master (they used to open
    one per round, each left open until garbage collection, so a master's connection
    count swung with every round). Fails on the old code: 12 connections, not 2."""
    master_config = node_config(tmp_path / "master", replication={"ha_port": 0})
    with no_garbage_collection():
        async with running(master_config) as master:
            assert master.ha_address is not None and master.server is not None
            slave_config = node_config(
                tmp_path / "slave",
                replication={
                    "role": "slave",
                    "master_ha": "{}:{}".format(*master.ha_address),
                    "master_client": _address(master),
                },
            )
            async with running(slave_config) as slave, client(master) as watcher:
                await watcher.ok("create_topic", topic="t", queues=2)
                for _ in range(10):
                    await slave.sync_topics_now()
                assert slave.topics is not None and slave.topics.get("t") is not None
                # The watcher and the slave's one topic-sync connection, whatever the rounds.
                await until(lambda: master.server is not None and master.server.connections == 2)
                assert slave.topic_sync is not None and slave.topic_sync.rounds >= 10
