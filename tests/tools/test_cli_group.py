"""`tidelog consume --group`, `tidelog group list|describe|reset` as real commands on a
real node: a group resumes where it committed, describe shows lag, reset is refused
while a member is live and moves the group's positions once none is."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from typing import Any

import trio

from cluster.client import open_client
from tests.helpers import CLI, running_node, tidelog
from tools.process import wait_until


def test_group_commands(tmp_path: Path) -> None:
    with running_node(tmp_path / "node") as node:
        b = ["-b", node.address]
        trio.run(produce, node.address, 0, 6)
        first = tidelog("consume", "t", "--group", "g", "--count", "6", *b)
        assert first.returncode == 0, first.stderr
        assert sorted(first.stdout.split()) == [f"m{n}" for n in range(6)]
        trio.run(produce, node.address, 6, 1)
        resumed = tidelog("consume", "t", "--group", "g", "--count", "1", *b)
        assert resumed.stdout.split() == ["m6"]  # where the group left off

        listed = json.loads(tidelog("group", "list", "--json", *b).stdout)
        assert listed == [{"group": "g", "members": 0, "generation": 4, "topics": ["t"]}]
        described = tidelog("group", "describe", "g", *b)
        assert described.returncode == 0, described.stderr
        assert described.stdout.splitlines()[1].split() == [
            *("TOPIC", "QUEUE", "OFFSET", "END_OFFSET", "LAG", "MEMBER")
        ]
        offsets = trio.run(describe, node.address)["offsets"]
        assert sum(o["offset"] for o in offsets) == 7 and {o["lag"] for o in offsets} == {0}

        member = subprocess.Popen(
            [*CLI, "consume", "t", "--group", "g", "--session-timeout-ms", "500", *b],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            trio.run(members_become, node.address, 1)
            busy = tidelog("group", "reset", "g", "--topic", "t", "--to-earliest", *b)
            assert busy.returncode == 2 and "GROUP_HAS_MEMBERS" in busy.stderr
            assert "stop its consumers first" in busy.stderr
        finally:
            member.kill()
            member.wait()
        trio.run(members_become, node.address, 0)  # its session ran out
        reset = tidelog("group", "reset", "g", "--topic", "t", "--to-offset", "1", *b)
        assert reset.returncode == 0, reset.stderr
        expected = sum(max(0, o["end_offset"] - 1) for o in offsets)
        again = tidelog("consume", "t", "--group", "g", "--json", "--count", str(expected), *b)
        shown = [json.loads(line) for line in again.stdout.splitlines()]
        assert len(shown) == expected and all(m["queue_offset"] >= 1 for m in shown)


async def produce(address: str, start: int, count: int) -> None:
    async with open_client(address) as client:
        await client.admin.create_topic("t", 2, exist_ok=True)
        producer = client.producer()
        for n in range(start, start + count):
            assert (await producer.send("t", f"m{n}".encode())).outcome == "ok"


async def describe(address: str) -> dict[str, Any]:
    async with open_client(address) as client:
        return await client.checked("describe_group", group="g")


async def members_become(address: str, count: int) -> None:
    async def check() -> bool:
        return len((await describe(address))["members"]) == count

    await wait_until(f"{count} live member(s) in group g", check)


def test_group_reset_to_a_time(tmp_path: Path) -> None:
    """group reset --to-time puts each queue at its first message stored at or after the
    time (as consume --from-time): the group then reads exactly what came since; a time
    relative to now (-1d) takes every queue back to its start."""
    with running_node(tmp_path / "node") as node:
        b = ["-b", node.address]
        since_us = trio.run(produce_before_and_after, node.address)
        since = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
            microseconds=since_us
        )
        reset = tidelog("group", "reset", "g", "--topic", "t", "--to-time", since.isoformat(), *b)
        assert reset.returncode == 0, reset.stderr
        read = tidelog("consume", "t", "--group", "g", "--count", "3", *b)
        assert read.returncode == 0, read.stderr
        assert sorted(read.stdout.split()) == ["m3", "m4", "m5"]
        back = tidelog("group", "reset", "g", "--topic", "t", "--to-time", "-1d", "--json", *b)
        assert back.returncode == 0, back.stderr
        assert {o["offset"] for o in json.loads(back.stdout)["offsets"]} == {0}
        everything = tidelog("consume", "t", "--group", "g", "--count", "6", *b)
        assert sorted(everything.stdout.split()) == [f"m{n}" for n in range(6)]
        bad = tidelog("group", "reset", "g", "--topic", "t", "--to-time", "yesterday", *b)
        assert bad.returncode == 2 and "is not a time" in bad.stderr


async def produce_before_and_after(address: str) -> int:
    """m0-m2, then m3-m5 over two queues; the store time of m3 (later than m0-m2's)."""
    async with open_client(address) as client:
        await client.admin.create_topic("t", 2)
        producer = client.producer(acks="durable")
        before = [await producer.send("t", f"m{n}".encode(), queue=n % 2) for n in range(3)]
        after = [await producer.send("t", f"m{n}".encode(), queue=n % 2) for n in range(3, 6)]
        stored_us = [r.store_us for r in before + after]
        assert all(isinstance(us, int) for us in stored_us)
        assert max(r.store_us or 0 for r in before) < (after[0].store_us or 0)
        return after[0].store_us or 0
