"""How fast a slave node follows a newly elected master: the follower is told by the HA
loop (``repoint``), and must try the new address at once even while it is pausing
between reconnects to the old, dead one (the pause grows to two seconds)."""

from __future__ import annotations

import socket
from pathlib import Path

import trio
import trio.testing

from replication.epochs import EpochFile, EpochHistory
from replication.settings import ReplicationSettings
from replication.slave import SlaveReplication
from storage import MessageStore, StoreConfig


def _closed_port() -> int:
    """A loopback port nobody listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_repoint_ends_the_reconnect_pause_at_once(
    tmp_path: Path, store_config: StoreConfig, mock_clock: trio.testing.MockClock
) -> None:
    # Virtual time moves only after half a second of real idleness: a loopback connect
    # never waits that long, so the follower reaching the new master without the clock
    # moving proves it did not sit out its pause (the old loop slept it through).
    mock_clock.autojump_threshold = 0.5
    async with MessageStore.open(store_config) as store:
        follower = SlaveReplication(
            store,
            "s1",
            f"127.0.0.1:{_closed_port()}",
            ReplicationSettings(),
            history=EpochHistory(),
            epoch_file=EpochFile.in_dir(tmp_path),
        )
        new_master = trio.socket.socket()
        with new_master:
            await new_master.bind(("127.0.0.1", 0))
            new_master.listen()
            port = new_master.getsockname()[1]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follower.run)
                while follower.reconnects < 1:
                    await trio.testing.wait_all_tasks_blocked()
                await trio.testing.wait_all_tasks_blocked()  # now in its pause
                paused_at = trio.current_time()
                follower.repoint(f"127.0.0.1:{port}")
                with trio.fail_after(30):
                    sock, _peer = await new_master.accept()
                sock.close()
                assert trio.current_time() == paused_at
                nursery.cancel_scope.cancel()
