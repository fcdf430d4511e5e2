"""The fault vocabulary: every word has implementations, every implementation speaks it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from tests.tools.test_faults_proxy import Target, connect, receive_exactly
from tools.faults import (
    FAULTS,
    NEMESIS_GROUPS,
    FaultProxy,
    Kill,
    NodeProcessTarget,
    ProxyPartition,
    fault_kind,
    kill_while_partitioned,
    netns,
    network_backend,
    parse_nemesis,
)

VOCABULARY = (
    "kill", "pause", "partition", "partition-etcd", "loss", "reset", "slow",
    "power-loss", "corrupt", "enospc", "eio", "slow-fsync",
)  # fmt: skip
SUB_KINDS = {
    "restart": "kill",
    "pause-then-kill": "kill",
    "bandwidth": "slow",
    "truncate": "corrupt",
}


def test_the_vocabulary_is_complete_and_each_implementation_names_its_word() -> None:
    assert tuple(FAULTS) == VOCABULARY
    for name, kind in FAULTS.items():
        assert kind.implementations, name
        for implementation in kind.implementations:
            spoken = implementation.kind
            assert spoken == name or SUB_KINDS.get(spoken) == name
    assert all(word in FAULTS for group in NEMESIS_GROUPS.values() for word in group)


def test_parse_nemesis_expands_groups_and_refuses_unknown_words() -> None:
    assert parse_nemesis("kill, pause,power-loss,disk") == (
        "kill", "pause", "power-loss", "corrupt", "enospc", "eio", "slow-fsync",
    )  # fmt: skip
    assert parse_nemesis("kill,process") == ("kill", "pause")
    with pytest.raises(ValueError, match=r"'flood'.*choose from: kill"):
        parse_nemesis("kill,flood")
    with pytest.raises(ValueError, match="no fault named"):
        parse_nemesis(" , ")
    with pytest.raises(ValueError, match="known faults"):
        fault_kind("meteor")


class Child:
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


async def test_kill_while_partitioned_heals_the_process_then_the_network() -> None:
    child = Child()
    child.start()
    try:
        async with trio.open_nursery() as nursery:
            target = Target()
            proxy = FaultProxy("127.0.0.1", await nursery.start(target.serve))
            await nursery.start(proxy.serve)
            stream = await connect(proxy.port)
            fault = kill_while_partitioned(ProxyPartition(proxy), Kill(NodeProcessTarget(child)))
            async with fault:
                assert child.process is not None and child.process.wait() == -9
                await stream.send_all(b"held")
                with trio.fail_after(10):
                    await proxy.wait_held()
            assert child.process.poll() is None  # restarted
            assert await receive_exactly(stream, 4) == b"held"
            nursery.cancel_scope.cancel()
    finally:
        assert child.process is not None
        child.process.kill()
        child.process.wait()


def test_the_network_backend_falls_back_to_the_proxy_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert network_backend("proxy").name == "proxy"
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    backend = network_backend()
    assert backend.name == "proxy"
    assert "root" in backend.reason
    with pytest.raises(ValueError, match="'netns' or 'proxy'"):
        network_backend("carrier-pigeon")
