"""Issue 8: a peer that holds the cluster secret but is not a member of the group (the
master's ``peer_allowed`` membership, which the node takes from etcd) cannot make the
master stale, replicate, or count for the confirm offset; a member whose membership ends
stops counting. In one process, with a real master service and slave client over
loopback sockets; the version with etcd and real nodes is
``tests/e2e/test_ha_port_membership.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from replication.epochs import EpochHistory
from replication.master import HAService
from replication.settings import ReplicationSettings
from replication.slave import HAClient
from replication.wire import HAAuthError, slave_handshake
from storage import MessageStore
from tests.replication.test_ha_stream import config_at, fill, messages
from tools.process import wait_until

SECRET = b"0123456789abcdef-the-cluster"
SHORT_S = 10


async def test_a_non_member_with_the_secret_is_refused_and_cannot_make_the_master_stale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    members = {"slave-1"}
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(20, seed=7))
        end = master.commit_log.max_offset
        history = EpochHistory()
        history.append(1, 0)
        settings = ReplicationSettings(cluster_secret=SECRET)
        service = HAService(
            master, settings, history=history, name="m1", peer_allowed=members.__contains__
        )
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            newer = EpochHistory()
            newer.append(99999, 0)
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                with trio.fail_after(SHORT_S), pytest.raises(HAAuthError, match="not a member"):
                    await slave_handshake(sock, "intruder", 0, newer, secret=SECRET)
            await trio.testing.wait_all_tasks_blocked()
            assert service.stale is None
            assert service.ack_offsets == {}
            status = service.status()
            assert status.auth_refusals == 1
            assert status.last_auth_refusal is not None
            assert "claimed_name=intruder" in status.last_auth_refusal
            assert "[coordination] etcd" in status.last_auth_refusal
            assert any("ha_peer_refused" in r.getMessage() for r in caplog.records)

            client = HAClient(slave, "slave-1", settings)
            nursery.start_soon(client.run, "127.0.0.1", port)
            assert await service.wait_replicated(end, trio.current_time() + SHORT_S)
            nursery.cancel_scope.cancel()
        assert slave.commit_log.max_offset == end


async def test_a_slave_whose_membership_ends_stops_counting_for_the_confirm_offset(
    tmp_path: Path,
) -> None:
    members = {"slave-1"}
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(10, seed=8))
        first_end = master.commit_log.max_offset
        settings = ReplicationSettings(cluster_secret=SECRET, heartbeat_ms=50, peer_timeout_ms=500)
        service = HAService(master, settings, name="m1", peer_allowed=members.__contains__)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            nursery.start_soon(HAClient(slave, "slave-1", settings).run, "127.0.0.1", port)
            assert await service.wait_replicated(first_end, trio.current_time() + SHORT_S)
            assert set(service.in_sync_slaves()) == {"slave-1"}

            members.clear()  # etcd no longer lists it: the next judgement drops it
            with trio.fail_after(SHORT_S):
                assert await service.wait_membership_change() == frozenset()
            await fill(master, messages(5, seed=9))
            end = master.commit_log.max_offset

            async def acked_all() -> bool:  # it still streams and acks: it only does not count
                return service.ack_offsets.get("slave-1", 0) >= end

            await wait_until("slave-1 to ack the new records", acked_all, timeout=SHORT_S)
            assert service.in_sync_slaves() == {}
            assert not await service.wait_replicated(end, trio.current_time() + 0.3)
            assert service.confirm_offset == first_end
            nursery.cancel_scope.cancel()
