"""Operating replication: durable slave acks (in process), and as real `tidelog node`
processes on loopback a slave frozen with SIGSTOP leaving and rejoining the in-sync set,
and a slave that was down across segment roll-overs catching up from disk.

The process tests set the ``[replication]`` and ``[store]`` knobs through a TOML
``--config`` file (small lag bound and segments keep them fast) and wait by bounded
polling of ``status`` (the helpers of ``test_replication_e2e``), never a fixed sleep.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster.client import open_client
from cluster.protocol import Status
from replication.master import HAService
from replication.settings import ReplicationSettings
from replication.slave import HAClient
from storage import Message, MessageStore, StoreConfig
from tests.conftest import SMALL_SEGMENT
from tests.e2e.test_replication_e2e import (
    _segments,
    _send,
    _wait_caught_up,
    _wait_slaves,
)
from tools.process import NodeProcess, node_status, wait_until

DEADLINE = 10.0
SEGMENT = 1 << 20

# ---- durable acks, in process ----------------------------------------------------------------


def _lazy_flush_config(path: Path) -> StoreConfig:
    """Background flushes far apart: whatever is fsynced during the test, an ack made it."""
    return StoreConfig(
        data_dir=path,
        segment_size=SMALL_SEGMENT,
        max_message_size=16 * 1024,
        consume_queue_entries=64,
        flush_interval_ms=600_000,
        flush_thorough_interval_ms=600_000,
        retention_check_interval_ms=3_600_000,
    )


async def _acks_with_flushed(tmp_path: Path, slave_ack: str) -> tuple[list[tuple[int, int]], int]:
    """Replicate a few rounds to a slave in ``slave_ack`` mode; return each ack sent as
    (acked offset, the slave's flushed offset at that moment) and the master's end."""
    async with (
        MessageStore.open(_lazy_flush_config(tmp_path / "master")) as master,
        MessageStore.open(_lazy_flush_config(tmp_path / "slave")) as slave,
    ):
        service = HAService(master)
        client = HAClient(slave, "s1", ReplicationSettings(slave_ack=slave_ack))
        seen: list[tuple[int, int]] = []
        send_ack = client._send_ack

        async def recording_send_ack(sock: trio.socket.SocketType, offset: int) -> None:
            seen.append((offset, slave.commit_log.flushed_offset))
            await send_ack(sock, offset)

        client._send_ack = recording_send_ack  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.serve, "127.0.0.1", 0)
            nursery.start_soon(client.run, "127.0.0.1", port)
            for round_ in range(5):
                for i in range(20):
                    await master.put(Message.create("ops", b"%d:%d" % (round_, i) * 200))
                end = master.commit_log.max_offset
                assert await service.wait_replicated(end, trio.current_time() + DEADLINE)
            nursery.cancel_scope.cancel()
        return seen, end


async def test_durable_slave_acks_only_what_its_fsync_covers(tmp_path: Path) -> None:
    seen, end = await _acks_with_flushed(tmp_path / "durable", "durable")
    assert seen and max(offset for offset, _ in seen) == end
    assert all(offset <= flushed for offset, flushed in seen), seen
    # The contrast that makes the check mean something: acks after write run ahead.
    seen, _ = await _acks_with_flushed(tmp_path / "write", "write")
    assert any(offset > flushed for offset, flushed in seen), seen


def test_unknown_slave_ack_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="slave_ack must be one of write, durable"):
        ReplicationSettings(slave_ack="fsync")


# ---- real processes ----------------------------------------------------------------------------


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def _config_file(root: Path) -> Path:
    """Small segments (roll-overs after a few sends), a 500 ms lag bound and a peer
    timeout long enough that a frozen slave stays connected, and so listed, while the
    test looks at it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "node.toml"
    path.write_text(
        f"[store]\nsegment_size = {SEGMENT}\nmax_message_size = 65536\n\n"
        "[replication]\nmax_lag_ms = 500\nheartbeat_ms = 100\npeer_timeout_ms = 30000\n"
    )
    return path


def _start(stack: ExitStack, root: Path, name: str, args: list[str]) -> NodeProcess:
    process = NodeProcess(root / name, name=name, extra_args=args)
    stack.callback(process.kill)
    return process.start()


async def _cluster(
    stack: ExitStack, root: Path, *slaves: str
) -> tuple[NodeProcess, list[NodeProcess]]:
    """A master (``min_insync_replicas=1``) and ``slaves``, all connected."""
    config = str(_config_file(root))
    master = _start(
        stack, root, "master", ["--config", config, "--ha-port", "0", "--min-insync-replicas", "1"]
    )
    ha_address = (await node_status(master.address))["replication"]["ha_address"]
    slave_args = [
        "--config", config, "--role", "slave", "--master-ha", ha_address,
        "--master-client", master.address,
    ]  # fmt: skip
    started = [_start(stack, root, name, slave_args) for name in slaves]
    await _wait_slaves(master, len(slaves))
    return master, started


def _names(replication: dict[str, Any], key: str) -> set[str]:
    return {entry["name"] for entry in replication[key]}


async def test_frozen_slave_leaves_the_in_sync_set_and_rejoins(
    tmp_path: Path, stack: ExitStack
) -> None:
    master, (steady, frozen) = await _cluster(stack, tmp_path, "slave-a", "slave-b")
    assert frozen.process is not None
    async with open_client(master.address) as client:
        await client.admin.create_topic("rep", 1)
        assert (await _send(client, b"both", "replicated"))["status"] is Status.OK
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            # The first write waits for slave-b until it lags past max_lag_ms (500 ms),
            # then slave-a alone confirms it.
            assert (await _send(client, b"frozen 0", "replicated"))["status"] is Status.OK

            async def dropped_out() -> bool:
                replication = (await node_status(master.address))["replication"]
                return _names(replication, "out_of_sync") == {"slave-b"} and _names(
                    replication, "in_sync"
                ) == {"slave-a"}

            await wait_until("slave-b out of sync", dropped_out)
            for i in range(1, 20):  # slave-b no longer holds acks=replicated back
                sent = await _send(client, b"frozen %d" % i, "replicated")
                assert sent["status"] is Status.OK
        finally:
            frozen.process.send_signal(signal.SIGCONT)

        end = (await node_status(master.address))["max_offset"]

        async def rejoined() -> bool:
            replication = (await node_status(master.address))["replication"]
            return _names(replication, "in_sync") == {"slave-a", "slave-b"} and all(
                entry["ack_offset"] == end for entry in replication["in_sync"]
            )

        await wait_until("slave-b back in sync at the master's end", rejoined)
        assert (await _send(client, b"both again", "replicated"))["status"] is Status.OK
    end = await _wait_caught_up(master, steady, frozen)

    for node in (frozen, steady, master):
        assert node.stop() == 0, node.stderr
    expected = _segments(master, end)
    assert expected
    assert _segments(steady, end) == expected
    assert _segments(frozen, end) == expected


async def test_slave_down_across_rollovers_catches_up_from_disk(
    tmp_path: Path, stack: ExitStack
) -> None:
    master, (slave,) = await _cluster(stack, tmp_path, "slave-a")
    body = bytes(range(256)) * 128  # 32 KiB: 32 records fill a segment
    async with open_client(master.address) as client:
        await client.admin.create_topic("rep", 2)
        assert (await _send(client, b"before", "replicated"))["status"] is Status.OK
        await _wait_caught_up(master, slave)
        assert slave.stop() == 0, slave.stderr
        await _wait_slaves(master, 0)
        for i in range(120):  # ~3.8 MiB while the slave is down: several roll-overs
            assert (await _send(client, body + b"%d" % i, "leader"))["status"] is Status.OK
        assert (await _send(client, b"last", "durable"))["status"] is Status.OK

        restarted = _start(stack, tmp_path, "slave-a", slave.extra_args)
        await _wait_slaves(master, 1)
        assert (await _send(client, b"after", "replicated"))["status"] is Status.OK
        end = await _wait_caught_up(master, restarted)

    for node in (restarted, master):
        assert node.stop() == 0, node.stderr
    expected = _segments(master, end)
    assert len(expected) >= 4, sorted(expected)
    assert _segments(restarted, end) == expected
