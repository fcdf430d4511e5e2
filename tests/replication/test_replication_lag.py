"""In-sync membership and heartbeats end to end: in-process stores, HAService and
HAClient over loopback, virtual time (a MockClock that jumps when the loop idles).

A slave whose applying is paused (its store's ``append_replicated`` parks on an event)
must leave the in-sync set after ``max_lag_ms``, replicated writes must go on with the
other slave alone, and the paused one must come back once it has caught up. Silent
peers are dropped on both ends after ``peer_timeout_ms``; idle but live streams are not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from cluster.node.acks import ReplicatedAcks
from cluster.protocol import Acks, Status
from cluster.server import RequestError
from replication.master import HAService
from replication.settings import ReplicationSettings
from replication.slave import HAClient
from replication.wire import (
    HAProtocolError,
    slave_handshake,
)
from storage import MessageStore
from tests.replication.test_ha_auth import answer_as_master
from tests.replication.test_ha_stream import assert_identical, config_at, fill, messages

MAX_LAG_MS = 500
HEARTBEAT_MS = 100
PEER_TIMEOUT_MS = 1_000
DEADLINE = 30.0
SETTINGS = ReplicationSettings(
    max_lag_ms=MAX_LAG_MS, heartbeat_ms=HEARTBEAT_MS, peer_timeout_ms=PEER_TIMEOUT_MS
)


@pytest.fixture
def mock_clock() -> Iterator[trio.testing.MockClock]:
    """Virtual time that jumps once the loop has been idle for 5 ms of real time: long
    enough for loopback bytes and store threads to land (so a jump never fakes a
    timeout), short enough that seconds of protocol time pass in a blink."""
    yield trio.testing.MockClock(autojump_threshold=0.005)


class PausableStore:
    """Make a store's ``append_replicated`` park while paused: a slave that stops
    applying (a stuck disk, a stopped process) but whose connection stays up."""

    def __init__(self, store: MessageStore) -> None:
        self.resumed = trio.Event()
        self.resumed.set()
        original = store.append_replicated

        async def append_replicated(offset: int, data: bytes | memoryview) -> int:
            await self.resumed.wait()
            return await original(offset, data)

        store.append_replicated = append_replicated  # type: ignore[method-assign]

    def pause(self) -> None:
        self.resumed = trio.Event()

    def resume(self) -> None:
        self.resumed.set()


class AlwaysDurable:
    """The group-commit half of the ack policy, already satisfied (not under test)."""

    async def wait(self, acks: Acks, end_offset: int, timeout: float) -> tuple[Status, None]:
        await trio.lowlevel.checkpoint()
        return Status.OK, None

    def holds(self, acks: Acks, end_offset: int) -> bool:
        return True


@asynccontextmanager
async def serving(master: MessageStore) -> AsyncIterator[tuple[HAService, int, trio.Nursery]]:
    service = HAService(master, SETTINGS)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(service.serve, "127.0.0.1", 0)
        yield service, port, nursery
        nursery.cancel_scope.cancel()


def client(store: MessageStore, name: str) -> HAClient:
    return HAClient(store, name, SETTINGS)


async def until_in_sync(service: HAService, want: set[str]) -> None:
    while set(service.in_sync_slaves()) != want:
        await service.wait_membership_change()


async def until_confirmed(service: HAService, offset: int) -> None:
    """Wait, on the service's own report of each advance (no polling), until the confirm
    offset (consumers' read limit) reached ``offset``."""
    while service.confirm_offset < offset:
        moved = trio.Event()
        service.on_confirm_moved = moved.set
        try:
            await moved.wait()
        finally:
            service.on_confirm_moved = None


async def until_acked(service: HAService, name: str, offset: int) -> None:
    """Wait, on the in-sync set's own progress (no polling), until ``name`` acked
    ``offset``: a slave rejoins the set once it reaches the end the master had at its
    previous ack, which may be before a later write's end."""
    moved = trio.Event()

    def observer() -> None:
        moved.set()

    service.insync.observers.append(observer)
    try:
        while service.ack_offsets.get(name, -1) < offset:
            await moved.wait()
            moved = trio.Event()
    finally:
        service.insync.observers.remove(observer)


async def test_paused_slave_drops_out_and_rejoins(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "fast")) as fast,
        MessageStore.open(config_at(tmp_path / "slow")) as slow,
    ):
        await fill(master, messages(20, seed=1))
        pausable = PausableStore(slow)
        async with serving(master) as (service, port, nursery):
            acks = ReplicatedAcks(AlwaysDurable(), service, min_insync_replicas=2)
            nursery.start_soon(client(fast, "fast").run, "127.0.0.1", port)
            nursery.start_soon(client(slow, "slow").run, "127.0.0.1", port)
            end = master.commit_log.max_offset
            assert await service.wait_replicated(end, trio.current_time() + DEADLINE)
            await until_in_sync(service, {"fast", "slow"})
            acks.admit(Acks.REPLICATED)

            pausable.pause()
            await fill(master, messages(60, seed=2))
            end = master.commit_log.max_offset
            # max_lag_ms counts from the last time the slave held the master's end: its
            # last ack before these writes. Virtual time may have moved on since (the
            # clock jumps whenever the loop idles, which a loaded machine makes happen at
            # other points), so the writes' own time is not that start.
            caught_up_at = service.insync.slaves["slow"].caught_up_time
            assert caught_up_at <= trio.current_time()
            # The confirm offset moves on once the stuck slave stops holding it back...
            await until_confirmed(service, end)
            waited_ms = (trio.current_time() - caught_up_at) * 1000
            assert MAX_LAG_MS <= waited_ms <= MAX_LAG_MS + HEARTBEAT_MS
            assert service.in_sync_slaves() == {"fast": end}
            # ...but no ack: one slave holds it of the two required (see
            # test_acks_after_admission)
            assert service.replicated_offset < end
            lags = service.status().lags
            assert [s.name for s in lags.in_sync] == ["fast"]
            [out] = lags.out_of_sync
            assert out.name == "slow" and out.lag_bytes > 0 and out.lag_ms >= MAX_LAG_MS
            assert "slow" in service.ack_offsets  # still connected: heartbeats keep it
            with pytest.raises(RequestError) as refused:
                acks.admit(Acks.REPLICATED)
            assert refused.value.status is Status.SLAVE_NOT_AVAILABLE
            assert [s["name"] for s in acks.status()["out_of_sync"]] == ["slow"]

            # ...and later writes are confirmed by the in-sync slave alone, at once.
            await fill(master, messages(10, seed=3))
            end = master.commit_log.max_offset
            start = trio.current_time()
            await until_confirmed(service, end)
            assert trio.current_time() - start < MAX_LAG_MS / 1000

            pausable.resume()
            await until_in_sync(service, {"fast", "slow"})
            await until_acked(service, "slow", end)
            assert await service.wait_replicated(end, trio.current_time() + DEADLINE)
            assert service.in_sync_slaves() == {"fast": end, "slow": end}
            assert service.status().lags.out_of_sync == ()
            acks.admit(Acks.REPLICATED)
            assert_identical(master, slow)
            assert_identical(master, fast)


async def test_idle_stream_stays_up_on_heartbeats(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(5, seed=4))
        async with serving(master) as (service, port, nursery):
            nursery.start_soon(client(slave, "s1").run, "127.0.0.1", port)
            end = master.commit_log.max_offset
            assert await service.wait_replicated(end, trio.current_time() + DEADLINE)
            connection = service.connections["s1"]
            # Three peer timeouts with nothing to send: only heartbeats keep both ends up.
            await trio.sleep(3 * PEER_TIMEOUT_MS / 1000)
            assert service.connections["s1"] is connection
            state = service.insync.slaves["s1"]
            assert trio.current_time() - state.last_ack_time <= 2 * HEARTBEAT_MS / 1000
            assert service.in_sync_slaves() == {"s1": end}


def assert_dropped_in_time(start: float) -> None:
    """A silent peer was given up ``peer_timeout_ms`` after ``start``, within a heartbeat.

    Compared as deadlines (start plus the timeout, as the watch computes its own) rather
    than as the difference of two virtual times, which can fall an ulp short: after the
    clock jumped to 0.65 s during the setup (a loaded machine makes such jumps), the
    drop exactly at its deadline measured 999.9999999999999 ms."""
    now = trio.current_time()
    assert start + PEER_TIMEOUT_MS / 1000 <= now, (start, now)
    assert now <= start + (PEER_TIMEOUT_MS + HEARTBEAT_MS) / 1000, (start, now)


async def test_master_drops_a_silent_slave(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with MessageStore.open(config_at(tmp_path / "master")) as master:
        await fill(master, messages(5, seed=5))
        async with serving(master) as (service, port, _nursery):
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                end = master.commit_log.max_offset
                hello, _master_name = await slave_handshake(sock, "mute", end)
                assert hello.stream_from == end
                start = trio.current_time()
                assert "mute" in service.ack_offsets
                while "mute" in service.ack_offsets:  # never acks, never heartbeats
                    await service.wait_membership_change()
                assert_dropped_in_time(start)


async def test_slave_gives_up_a_silent_master(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A master that answers the hello and then sends nothing, not even a heartbeat."""
    async with MessageStore.open(config_at(tmp_path / "slave")) as slave:
        listener = trio.socket.socket()
        with listener:
            await listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]

            async def mute_master() -> None:
                sock, _ = await listener.accept()
                with sock:
                    await answer_as_master(sock, 0, 0)
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(mute_master)
                start = trio.current_time()
                with pytest.raises(HAProtocolError, match="sent nothing"):
                    await client(slave, "s1").run("127.0.0.1", port)
                assert_dropped_in_time(start)
                nursery.cancel_scope.cancel()


async def test_lag_bench_reports_every_figure(tmp_path: Path) -> None:
    """The lag bench end to end at a tiny load (a real slave process): keys, not values."""
    from tools.bench.replication import run_lag_bench

    figures = await run_lag_bench(tmp_path, seconds=0.3, rate=500)
    assert figures["lag_messages"] > 0
    assert 0 < figures["lag_p50_us"] <= figures["lag_p99_us"] <= figures["lag_max_us"]
    assert figures["lag_message_bytes"] == 1024
