"""A consumer group of three `tidelog consume --group` processes on a real node, one
SIGKILLed mid-stream: its queues move to the two others once its session runs out,
nothing is skipped, and every message seen twice is one the killed member printed
after its last commit (a run ending at the last offset it printed in that queue).
Prints the rebalance time (kill to the first message of a moved queue) as a figure."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

import trio

from cluster.client import open_client
from tests.helpers import CLI, running_node
from tools.process import wait_until

QUEUES: Final = 6
SESSION_TIMEOUT_MS: Final = 1500


class Seen:
    """What the consumer processes printed, as ``(member, time, queue, offset, body)``;
    reader threads add, the test waits on conditions over it."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, float, int, int, str]] = []
        self._changed = threading.Condition()

    def add(self, member: str, shown: dict[str, Any]) -> None:
        with self._changed:
            self.lines.append(
                (member, time.monotonic(), shown["queue"], shown["queue_offset"], shown["body"])
            )
            self._changed.notify_all()

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 30) -> None:
        with self._changed:
            if not self._changed.wait_for(check, timeout):
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def bodies(self, member: str | None = None) -> list[str]:
        with self._changed:
            return [line[4] for line in self.lines if member in (None, line[0])]


@contextmanager
def consumer(name: str, address: str, seen: Seen, log: Path) -> Iterator[subprocess.Popen[str]]:
    """A `tidelog consume --group g` process whose JSON lines go into ``seen``; killed by
    its PID on exit."""
    command = [
        *CLI, "--log-level", "INFO", "consume", "t", "--group", "g", "-b", address, "--json",
        "--session-timeout-ms", str(SESSION_TIMEOUT_MS), "--commit-interval-ms", "100",
        "--wait-ms", "200",
    ]  # fmt: skip
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            seen.add(name, json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(5)


async def describe(address: str) -> dict[str, Any]:
    async with open_client(address) as client:
        return await client.call_master("describe_group", group="g")


async def settled(address: str, members: int) -> dict[str, Any]:
    """Wait until the group has ``members`` live members holding every queue (each
    holds its whole target: no hand-over under way)."""
    latest: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal latest
        latest = await describe(address)
        listed = latest.get("members", [])
        held = [q for m in listed for q in m["held"]]
        settled = all(m["held"] == m["assignment"] for m in listed)
        return settled and len(listed) == members and len(held) == QUEUES

    await wait_until(f"{members} members holding the {QUEUES} queues", check, timeout=30)
    return latest


async def produce(address: str, start: int, count: int, pause_s: float = 0.0) -> None:
    async with open_client(address) as client:
        producer = client.producer()
        for n in range(start, start + count):
            assert (await producer.send("t", f"m{n}".encode(), acks="durable")).outcome == "ok"
            if pause_s:
                await trio.sleep(pause_s)  # a steady stream, not a synchronisation


def test_a_killed_member_s_queues_move_and_nothing_is_skipped(tmp_path: Path) -> None:
    seen = Seen()
    with running_node(tmp_path / "node") as node, ExitStack() as stack:
        address = node.address

        async def create() -> None:
            async with open_client(address) as client:
                await client.admin.create_topic("t", QUEUES)

        trio.run(create)
        processes = {
            name: stack.enter_context(consumer(name, address, seen, tmp_path / f"{name}.log"))
            for name in ("a", "b", "c")
        }
        before = trio.run(settled, address, 3)
        (a_member,) = [m for m in before["members"] if f"-{processes['a'].pid}-" in m["member"]]
        a_queues = {q["queue"] for q in a_member["assignment"]}
        trio.run(produce, address, 0, 300)
        seen.wait_for("the first 300 messages", lambda: len(set(seen.bodies())) >= 300)
        assert {line[2] for line in seen.lines if line[0] == "a"} == a_queues

        stream = threading.Thread(target=trio.run, args=(produce, address, 300, 300, 0.004))
        stream.start()
        try:
            a_before = len(seen.bodies("a"))
            seen.wait_for("a mid-stream", lambda: len(seen.bodies("a")) >= a_before + 15)
            processes["a"].kill()
            killed_at = time.monotonic()
            processes["a"].wait()
        finally:
            stream.join(60)
        after = trio.run(settled, address, 2)
        seen.wait_for("all 600 messages", lambda: len(set(seen.bodies())) >= 600)

    everything = {f"m{n}" for n in range(600)}
    assert set(seen.bodies()) == everything  # nothing skipped
    assert {q["queue"] for m in after["members"] for q in m["held"]} == set(range(QUEUES))
    moved_first = min(
        when for member, when, queue, _, _ in seen.lines
        if member != "a" and queue in a_queues and when > killed_at
    )  # fmt: skip
    print(
        f"rebalance_after_kill_s={moved_first - killed_at:.2f} session_timeout_ms={SESSION_TIMEOUT_MS}"
    )
    # At least once, and duplicates only from the killed member's uncommitted window:
    # per queue, a run from its last commit up to the last offset it printed there.
    printed: dict[tuple[int, int], list[str]] = {}
    for member, _, queue, offset, _ in seen.lines:
        printed.setdefault((queue, offset), []).append(member)
    twice = {key: who for key, who in printed.items() if len(who) > 1}
    for (queue, offset), who in sorted(twice.items()):
        assert who.count("a") == 1 and len(who) == 2, (queue, offset, who)
    a_last: dict[int, int] = {}
    for member, _, queue, offset, _ in seen.lines:
        if member == "a":
            a_last[queue] = max(a_last.get(queue, -1), offset)
    for queue in {q for q, _ in twice}:
        offsets = sorted(o for q, o in twice if q == queue)
        assert offsets == list(range(offsets[0], a_last[queue] + 1)), (queue, offsets)
    print(f"duplicates={len(twice)} of {len(seen.bodies('a'))} printed by the killed member")
