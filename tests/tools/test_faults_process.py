"""Process faults on real children: a plain sleeper for the signal mechanics, and a real
``tidelog node`` that is killed, restarted on the same data and still has its message."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cluster.client import open_client
from tools.faults.base import Composite
from tools.faults.process import Kill, NodeProcessTarget, Pause, PauseThenKill, Restart, _proc_state
from tools.process import NodeProcess


class Sleeper:
    """A child that waits on stdin forever; restart starts a fresh one."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 5.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        self.starts += 1

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def sleeper() -> Iterator[Sleeper]:
    child = Sleeper()
    child.start()
    try:
        yield child
    finally:
        child.kill()


async def test_pause_stops_and_heal_continues(sleeper: Sleeper) -> None:
    target = NodeProcessTarget(sleeper)
    pid = target.pid
    assert pid is not None
    async with Pause(target) as fault:
        assert fault.active
        assert _proc_state(pid) == "T"
    assert not fault.active
    assert _proc_state(pid) != "T"
    assert target.pid == pid


async def test_kill_ends_the_process_and_heal_restarts_it(sleeper: Sleeper) -> None:
    target = NodeProcessTarget(sleeper)
    first = target.pid
    fault = Kill(target)
    await fault.inject()
    assert sleeper.process is not None
    assert sleeper.process.wait() == -9
    assert target.pid is None
    await fault.heal()
    assert sleeper.starts == 2
    assert target.pid is not None and target.pid != first


async def test_pause_then_kill_kills_a_frozen_process(sleeper: Sleeper) -> None:
    target = NodeProcessTarget(sleeper)
    fault = PauseThenKill(target)
    await fault.inject()
    assert sleeper.process is not None and sleeper.process.wait() == -9
    await fault.heal()
    assert target.pid is not None


async def test_a_process_fault_on_a_stopped_target_says_so(sleeper: Sleeper) -> None:
    sleeper.kill()
    with pytest.raises(RuntimeError, match="not running"):
        await Kill(NodeProcessTarget(sleeper)).inject()


async def test_composite_heals_what_it_injected_when_a_later_part_fails(sleeper: Sleeper) -> None:
    target = NodeProcessTarget(sleeper)
    pid = target.pid
    assert pid is not None
    gone = Sleeper()  # never started: the second part fails
    composite = Composite([Pause(target), Kill(NodeProcessTarget(gone))])
    with pytest.raises(RuntimeError, match="not running"):
        await composite.inject()
    assert not composite.active
    assert _proc_state(pid) not in ("T", None)  # the pause was undone


async def test_killed_node_restarts_on_its_data(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node").start()
    try:
        async with open_client(node.address) as client:
            await client.admin.create_topic("kept", 1)
            sent = await client.producer().send(
                "kept", b"before the crash", queue=0, acks="durable"
            )
            assert sent.outcome == "ok"
        target = NodeProcessTarget(node)
        await Restart(target).inject()
        async with (
            open_client(node.address) as client,
            client.consumer("kept", queues=[0]) as consumer,
        ):
            with trio.fail_after(10):
                async for message in consumer:
                    assert message.body == b"before the crash"
                    break
    finally:
        node.kill()
