"""The node around its server: roles, topic sync, restarts and signals, in-process."""

from __future__ import annotations

import gc
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from cluster.node import Node, serve_until_signalled
from tests.cluster.test_server import ANSWER_TIMEOUT, client, node_config, running, until


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


async def test_restart_on_the_same_data_dir_keeps_topics_and_messages(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    async with running(config) as node, client(node) as c:
        await c.ok("create_topic", topic="keep", queues=2)
        await c.ok("create_topic", topic="empty", queues=5)
        for i in range(30):
            await c.ok("send", topic="keep", body=b"m%d" % i, queue=i % 2, tags=f"t{i}")
    assert json.loads((tmp_path / "topics.json").read_text())["version"] == 1
    async with running(config) as node, client(node) as c:
        listed = await c.ok("list_topics")
        assert listed["topics"] == [{"topic": "empty", "queues": 5}, {"topic": "keep", "queues": 2}]
        page = await c.ok("pull", topic="keep", queue=1, offset=0, max_messages=100)
        assert [m["body"] for m in page["messages"]] == [b"m%d" % i for i in range(1, 30, 2)]
        assert [m["tags"] for m in page["messages"]] == [f"t{i}" for i in range(1, 30, 2)]
        more = await c.ok("send", topic="keep", body=b"after", queue=0)
        assert more["queue_offset"] == 15


async def test_serve_until_signalled_shuts_down_on_sigterm(tmp_path: Path) -> None:
    ready: list[tuple[str, int]] = []

    def on_ready(host: str, port: int) -> None:
        ready.append((host, port))
        os.kill(os.getpid(), signal.SIGTERM)

    with trio.fail_after(ANSWER_TIMEOUT):
        await serve_until_signalled(node_config(tmp_path), on_ready=on_ready)
    assert len(ready) == 1 and ready[0][1] > 0
    checkpoint = tmp_path / "store" / "checkpoint"
    assert checkpoint.exists()
