"""``status.replication`` names the replicated offset beside the confirm offset.

The confirm offset bounds reads; the replicated offset releases ``in_sync`` and
``replicated`` acks and stays behind while fewer than ``min_insync_replicas`` slaves
are in sync. Before it was reported, a master whose acks stalled that way showed a
confirm offset that moved and no sign of why no write was answered. In process:
stores, HAService and an HAClient over loopback, virtual time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from cluster.node.acks import ReplicatedAcks, StandaloneAcks
from cluster.node.status import MasterReplicationStatus, to_wire
from storage import MessageStore
from tests.replication.test_ha_stream import config_at, fill, messages
from tests.replication.test_replication_lag import client, serving, until_confirmed


@pytest.fixture
def mock_clock() -> Iterator[trio.testing.MockClock]:
    """Virtual time, as in :mod:`tests.replication.test_replication_lag`."""
    yield trio.testing.MockClock(autojump_threshold=0.005)


async def test_the_status_shows_the_replicated_offset_behind_the_confirm_offset(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Fails on the old code: the map had no ``replicated_offset``."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
        serving(master) as (service, port, nursery),
    ):
        acks = ReplicatedAcks(StandaloneAcks(master), service, min_insync_replicas=2)
        nursery.start_soon(client(slave, "s1").run, "127.0.0.1", port)
        await fill(master, messages(12, seed=5))
        end = master.commit_log.max_offset
        await until_confirmed(service, end)  # one slave in sync: readable...

        shown = acks.status()
        assert shown["confirm_offset"] == end
        assert shown["replicated_offset"] == service.replicated_offset < end  # ...not acked
        keys = list(shown)
        assert keys.index("replicated_offset") == keys.index("confirm_offset") + 1
        replication = to_wire(
            MasterReplicationStatus.of(
                acks.ack_status(),
                role="master",
                ha_address=f"127.0.0.1:{port}",
                epoch=None,
                epoch_start=None,
                stale=None,
            )
        )
        assert replication["replicated_offset"] == shown["replicated_offset"]
        assert replication["confirm_offset"] == end
