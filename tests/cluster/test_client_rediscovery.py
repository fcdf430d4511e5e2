"""The client finding its way in a cluster: connections it leaves behind are closed, and
(once nodes serve ``metadata``) a lost or demoted master is found again.

In-process nodes in this test's trio loop; tests synchronise on events and on
``wait_all_tasks_blocked``, never on sleeps.
"""

from __future__ import annotations

from pathlib import Path

from cluster.client import open_client
from tests.cluster.test_client_producer import serving
from tests.cluster.test_node import no_garbage_collection
from tests.cluster.test_server import until

# ---- connections left behind ---------------------------------------------------------------


async def test_leaving_an_open_client_closes_its_socket(tmp_path: Path) -> None:
    """Leaving ``open_client`` cancels the client's nursery and its connections at once; the
    reader's socket used to stay open until garbage collection (the close came after the
    cancelled read loop and never ran). Fails on the old code: 5 connections stay open."""
    with no_garbage_collection():
        async with serving(tmp_path / "node") as (node, address):
            assert node.server is not None
            for _ in range(5):
                async with open_client(address) as client:
                    await client.admin.status()
            await until(lambda: node.server is not None and node.server.connections == 0)
