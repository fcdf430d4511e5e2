"""The committed-offsets map is rebuilt from a long ``__offsets`` queue a page at a time,
yielding to the event loop between pages: a node whose offsets log holds millions of
commits (it is never compacted) keeps serving its other clients while it re-reads them
after a start or a role change."""

from __future__ import annotations

from pathlib import Path

import trio

from cluster.client import open_client
from cluster.node import Node
from cluster.node.config import NodeConfig
from cluster.node.groups import SCAN_PAGE
from cluster.protocol import Status
from cluster.protocol.address import format_address
from tests.conftest import SMALL_SEGMENT

STORE = {"segment_size": SMALL_SEGMENT, "max_message_size": 16 * 1024, "flush_interval_ms": 20}


async def test_a_long_rebuild_of_the_offsets_map_yields_between_pages(tmp_path: Path) -> None:
    node = Node(NodeConfig.create(tmp_path, node={"port": 0, "name": "n1"}, store=STORE))
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(node.run)
        try:
            async with open_client(format_address(host, port)) as client:
                await client.admin.create_topic("t", 1)
                commits = [{"topic": "t", "queue": 0, "offset": n} for n in range(SCAN_PAGE)]
                for _ in range(3):  # three full pages of commit records, the last at SCAN_PAGE - 1
                    answer = await client.call_master("commit_offsets", group="g", offsets=commits)
                    assert answer["status"] is Status.OK, answer
            assert node.handler is not None
            groups = node.handler.groups
            groups.forget()  # as after a role change: the map is re-read from the log
            turns = 0

            async def count_turns() -> None:
                nonlocal turns
                while True:
                    turns += 1
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(count_turns)
            await groups.catch_up()
            # Three yields (one per full page); the last may resume this task first.
            assert turns >= 2, "the other task did not run while three pages were read"
            assert groups.offsets.group("g") == {("t", 0): SCAN_PAGE - 1}
        finally:
            node.request_shutdown()
            nursery.cancel_scope.cancel()
