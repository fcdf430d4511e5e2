"""Power loss, EIO and slow fsync on a real ``tidelog node`` started with its
fault-injection switch (``fault_env``): every ``durable`` ack survives a simulated power
loss that drops the bytes the node did not fdatasync; a failing fdatasync acknowledges
nothing durable until the node is restarted; a slow one delays durable acks only."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.client import open_client
from cluster.client.client import Client
from tools.faults import FsyncError, NodeProcessTarget, PowerLoss, SlowFsync, fault_env
from tools.faults.disk import apply_power_loss, read_sync_log
from tools.process import NodeProcess

TOPIC = "power"
QUEUES = 2
RARE_FLUSH = {
    # Only the group commit of durable sends fsyncs: the leader sends stay unsynced.
    "TIDELOG_STORE_FLUSH_INTERVAL_MS": "600000",
    "TIDELOG_STORE_FLUSH_THOROUGH_INTERVAL_MS": "600000",
}

Acked = dict[tuple[int, int], str]
"""(queue, queue offset) -> body of each acknowledged send."""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    env = {**fault_env(tmp_path / "sync.jsonl", tmp_path / "disk.json"), **RARE_FLUSH}
    process = NodeProcess(tmp_path / "n1", name="n1", env=env)
    try:
        yield process.start()
    finally:
        process.kill()


async def _send(client: Client, acks: str, prefix: str, count: int) -> Acked:
    producer = client.producer(acks=acks, batch_size=1)
    acked: Acked = {}
    for index in range(count):
        body = f"{prefix}-{index}-" + "x" * 300
        result = await producer.send(TOPIC, body.encode(), queue=index % QUEUES)
        assert result.outcome == "ok", (result.status, result.error)
        assert result.queue_offset is not None
        acked[(index % QUEUES, result.queue_offset)] = body
    return acked


async def _read_all(address: str) -> Acked:
    found: Acked = {}
    async with open_client(address) as client:
        for queue in range(QUEUES):
            offset = 0
            while True:
                response = await client.call(
                    "pull", topic=TOPIC, queue=queue, offset=offset, max_messages=256, wait_ms=0
                )
                assert response["status"].value == "OK", response
                messages = response["messages"]
                if not messages:
                    break
                for message in messages:
                    found[(queue, message["queue_offset"])] = bytes(message["body"]).decode()
                offset = messages[-1]["queue_offset"] + 1
    return found


async def test_every_durable_ack_survives_a_power_loss(node: NodeProcess, tmp_path: Path) -> None:
    durable: Acked = {}
    async with open_client(node.address) as client:
        await client.admin.create_topic(TOPIC, QUEUES)
        for round_ in range(3):
            await _send(client, "leader", f"leader{round_}", 40)
            durable |= await _send(client, "durable", f"durable{round_}", 20)
        await _send(client, "leader", "unsynced", 120)  # ~40 KiB past the last fsync
    data_dir = node.data_dir
    blind = tmp_path / "blind"
    target = NodeProcessTarget(node)
    fault = PowerLoss(target, data_dir, tmp_path / "sync.jsonl", seed=11, tear=True)
    await fault.inject()
    assert fault.changed, "the power loss dropped nothing: the test would prove nothing"
    syncs = read_sync_log(tmp_path / "sync.jsonl", data_dir)
    commit_log = [name for name in syncs if name.startswith("store/commitlog/")]
    assert commit_log and all(syncs[name].synced_upto > 0 for name in commit_log[:1])
    await fault.heal()
    found = await _read_all(node.address)
    missing = {key: body for key, body in durable.items() if found.get(key) != body}
    assert not missing, f"{len(missing)} of {len(durable)} durable acks lost: {sorted(missing)[:5]}"
    # Without the sync log the same transform destroys durable bytes: the log is the guard.
    shutil.copytree(data_dir, blind)
    changed = apply_power_loss(blind, {}, seed=11)
    assert any(name.startswith("store/commitlog/") for name in changed)


async def test_eio_on_fdatasync_acknowledges_nothing_durable_until_a_restart(
    node: NodeProcess, tmp_path: Path
) -> None:
    fault = FsyncError(tmp_path / "disk.json", target=NodeProcessTarget(node))
    async with open_client(node.address) as client:
        await client.admin.create_topic(TOPIC, QUEUES)
        before = await _send(client, "durable", "before", 5)
        await fault.inject()
        producer = client.producer(acks="durable", batch_size=1)
        failed = await producer.send(TOPIC, b"during-eio", queue=0)
        assert failed.outcome != "ok", "a durable ack after a failed fdatasync would be a lie"
        again = await producer.send(TOPIC, b"after-eio", queue=0)
        assert again.outcome != "ok", "the node must keep refusing until it is restarted"
    await fault.heal()
    async with open_client(node.address) as client:
        after = await _send(client, "durable", "after", 5)
    found = await _read_all(node.address)
    for key, body in (before | after).items():
        assert found.get(key) == body, key
    assert not (tmp_path / "disk.json").exists()


async def test_slow_fsync_delays_durable_acks_and_heals(node: NodeProcess, tmp_path: Path) -> None:
    delay_ms = 300
    fault = SlowFsync(tmp_path / "disk.json", delay_ms=delay_ms)
    async with open_client(node.address) as client:
        await client.admin.create_topic(TOPIC, QUEUES)
        producer = client.producer(acks="durable", batch_size=1)
        await fault.inject()
        assert json.loads((tmp_path / "disk.json").read_text()) == {"fsync_delay_ms": delay_ms}
        assert (await producer.send(TOPIC, b"slow", queue=0)).outcome == "ok"
        delayed = _faults(tmp_path / "sync.jsonl")
        assert delayed and all(r["fsync_delay_ms"] == delay_ms for r in delayed), delayed
        await fault.heal()
        assert (await producer.send(TOPIC, b"healed", queue=0)).outcome == "ok"
        assert len(_faults(tmp_path / "sync.jsonl")) == len(delayed), "healed: no more delays"


def _faults(sync_log: Path) -> list[dict[str, object]]:
    """The injected-fault records of the node's sync log."""
    lines = sync_log.read_text().splitlines()
    return [record for line in lines if (record := json.loads(line))["op"] == "fault"]
