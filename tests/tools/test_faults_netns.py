"""Network-namespace faults with real processes: a TCP echo server in one namespace,
clients in others; each fault is shown to hold and to heal, and teardown to leave
nothing behind. Needs root with iproute2 and iptables (CI runs as root)."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tools.faults import kill_while_partitioned, netns
from tools.faults.netns import (
    NamespaceUnavailable,
    NetnsBandwidth,
    NetnsLoss,
    NetnsNetwork,
    NetnsPartition,
    NetnsReset,
    NodeNet,
    check_available,
    open_tcp_stream_in,
)
from tools.faults.process import Kill
from tools.faults.topology import isolate, one_way

try:
    check_available()
    UNAVAILABLE = ""
except NamespaceUnavailable as error:
    UNAVAILABLE = str(error)

needs_netns = pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE)

PORT = 7000  # every namespace has its own port space: no collision is possible

ECHO_SERVER = """
import socket, sys, threading
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

CLIENT = """
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = bytes(range(256)) * (size // 256)
started = time.monotonic()
try:
    conn = socket.create_connection((host, port), timeout=1.0)
    conn.settimeout(10.0)
    conn.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
    print("ok" if received == payload else "short", time.monotonic() - started)
except ConnectionRefusedError:
    print("refused", 0)
except ConnectionResetError:
    print("reset", 0)
except (TimeoutError, socket.timeout):
    print("timeout", 0)
"""

UDP_SENDER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    sock.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


@asynccontextmanager
async def network(*names: str) -> AsyncIterator[NetnsNetwork]:
    async with NetnsNetwork.open(names) as net:
        yield net
    assert_nothing_left(net.run_id)


def assert_nothing_left(run_id: str) -> None:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert run_id not in namespaces
    assert run_id not in links


@asynccontextmanager
async def echo_server(net: NetnsNetwork, node: str) -> AsyncIterator[NodeNet]:
    process = subprocess.Popen(
        net.command(node, [sys.executable, "-c", ECHO_SERVER, str(PORT)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(30):
            ready = await trio.to_thread.run_sync(process.stdout.readline, abandon_on_cancel=True)
        assert ready.strip() == "ready"
        yield net.node(node)
    finally:
        process.kill()  # by its own PID: `ip netns exec` execs the command
        process.wait()


async def client(
    net: NetnsNetwork, node: str, server: NodeNet, size: int = 1024
) -> tuple[str, float]:
    output = await net.in_node(
        node, [sys.executable, "-c", CLIENT, server.address, str(PORT), str(size)]
    )
    outcome, elapsed_s = output.split()
    return outcome, float(elapsed_s)


@needs_netns
async def test_isolating_a_node_cuts_it_off_and_heal_restores_it() -> None:
    async with network("a", "b", "c") as net, echo_server(net, "a") as server:
        assert (await client(net, "b", server))[0] == "ok"
        async with NetnsPartition(net, isolate(["a", "b", "c"], "a")):
            assert (await client(net, "b", server))[0] == "timeout"
            assert (await client(net, "c", server))[0] == "timeout"
            assert await net.dropped_packets("a") > 0
        assert (await client(net, "b", server))[0] == "ok"
        assert (await client(net, "c", server))[0] == "ok"


@needs_netns
async def test_a_partition_between_others_leaves_a_link_alone() -> None:
    async with network("a", "b", "c") as net, echo_server(net, "a") as server:
        async with NetnsPartition(net, one_way(["c"], ["a"])):
            assert (await client(net, "c", server))[0] == "timeout"
            assert (await client(net, "b", server))[0] == "ok"
        assert (await client(net, "c", server))[0] == "ok"


@needs_netns
async def test_reset_refuses_tcp_and_heals() -> None:
    async with network("a", "b") as net, echo_server(net, "a") as server:
        async with NetnsReset(net, receivers=["a"], senders=["b"]):
            assert (await client(net, "b", server))[0] == "refused"
        assert (await client(net, "b", server))[0] == "ok"


@needs_netns
async def test_loss_drops_some_but_not_all_packets() -> None:
    async with network("a", "b") as net:
        loss = NetnsLoss(net, ["a"], senders=["b"], probability=0.5)
        await loss.inject()
        await net.in_node(
            "b", [sys.executable, "-c", UDP_SENDER, net.node("a").address, "9", "400"]
        )
        dropped = await net.dropped_packets("a")
        assert 0 < dropped < 400  # both ends have probability 2 * 0.5**400
        await loss.heal()
        rules = await net.in_node("a", ["iptables", "-S", netns.CHAIN])
        assert rules.strip() == f"-N {netns.CHAIN}"  # heal deleted exactly what it added


@needs_netns
async def test_bandwidth_cap_slows_a_transfer_and_heals() -> None:
    size, bits_per_s = 200 * 1024, 2_000_000
    async with network("a", "b") as net, echo_server(net, "a") as server:
        async with NetnsBandwidth(net, ["b"], bits_per_s=bits_per_s):
            outcome, elapsed_s = await client(net, "b", server, size)
            assert outcome == "ok"
            assert elapsed_s >= 0.6 * size * 8 / bits_per_s
        assert "tbf" not in await net.in_node("b", ["tc", "qdisc", "show", "dev", "eth0"])
        assert (await client(net, "b", server, size))[0] == "ok"


UDP_RECEIVER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
sock.recv(16)
print("received", flush=True)
"""


@needs_netns
async def test_one_way_partition_drops_one_direction_only() -> None:
    async with network("a", "c") as net, NetnsPartition(net, one_way(["c"], ["a"])):
        # a stops hearing c
        await net.in_node("c", [sys.executable, "-c", UDP_SENDER, net.node("a").address, "9", "20"])
        assert await net.dropped_packets("a") == 20
        receiver = subprocess.Popen(
            net.command("c", [sys.executable, "-c", UDP_RECEIVER, "9000"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert receiver.stdout is not None
            with trio.fail_after(30):
                ready = await trio.to_thread.run_sync(
                    receiver.stdout.readline, abandon_on_cancel=True
                )
                assert ready.strip() == "ready"
                await net.in_node(
                    "a", [sys.executable, "-c", UDP_SENDER, net.node("c").address, "9000", "20"]
                )
                assert (
                    await trio.to_thread.run_sync(receiver.stdout.readline, abandon_on_cancel=True)
                ).strip() == "received"
        finally:
            receiver.kill()
            receiver.wait()
        assert await net.dropped_packets("c") == 0


@needs_netns
async def test_the_harness_connects_from_inside_a_namespace() -> None:
    async with network("a", "client") as net, echo_server(net, "a") as server:
        stream = await open_tcp_stream_in(net, "client", server.address, PORT)
        async with stream:
            await stream.send_all(b"from the harness")
            received = b""
            with trio.fail_after(10):
                while len(received) < 16:
                    received += await stream.receive_some()
            assert received == b"from the harness"
            async with NetnsPartition(net, isolate(["a", "client"], "a")):
                await stream.send_all(b"lost?")
                with trio.move_on_after(1.0) as silent:
                    await stream.receive_some()
                assert silent.cancelled_caught
                assert await net.dropped_packets("a") > 0
            with trio.fail_after(30):  # TCP retransmits once healed
                assert await stream.receive_some() == b"lost?"


class FailsOnSecondNode(NetnsNetwork):
    async def _build_node(self, node: NodeNet) -> None:
        if node.index == 1:
            raise RuntimeError("injected setup failure")
        await super()._build_node(node)


@needs_netns
async def test_a_failed_setup_deletes_what_it_created() -> None:
    run_id = f"fail{secrets.token_hex(3)}"
    with pytest.raises(RuntimeError, match="injected"):
        await FailsOnSecondNode.create(["a", "b"], run_id=run_id)
    assert_nothing_left(run_id)


def test_unavailable_namespaces_point_at_the_proxy_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(NamespaceUnavailable, match="proxy backend"):
        check_available()


def test_bad_node_names_are_refused() -> None:
    with pytest.raises(ValueError, match="must match"):
        NetnsNetwork(["Bad Name"])
    with pytest.raises(ValueError, match="unique"):
        NetnsNetwork(["a", "a"])


REPO = Path(__file__).resolve().parents[2]


class NamespacedNode:
    """A real ``tidelog node`` inside a namespace, as a process-fault target."""

    def __init__(self, net: NetnsNetwork, node: str, data_dir: Path) -> None:
        self.net, self.node, self.data_dir = net, node, data_dir
        self.process: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"{self.net.node(self.node).address}:{PORT}"

    @property
    def pid(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.pid

    async def restart(self) -> None:
        if self.process is not None:
            await trio.to_thread.run_sync(self.process.wait)
        argv = [
            sys.executable, "-m", "tools.cli", "--log-level", "WARNING", "node", "--name",
            self.node, "--host", self.net.node(self.node).address, "--port", str(PORT),
            "--data-dir", str(self.data_dir),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            self.net.command(self.node, argv), stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        assert self.process.stdout is not None
        with trio.fail_after(60):
            line = await trio.to_thread.run_sync(
                self.process.stdout.readline, abandon_on_cancel=True
            )
        assert "listening on" in line, line

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


async def status_from(net: NetnsNetwork, node: str, address: str) -> str | None:
    """`tidelog status` run inside ``node``'s namespace; None when it got no answer
    within a few seconds (the process is then killed by trio)."""
    argv = [sys.executable, "-m", "tools.cli", "status", "--json", "--bootstrap", address]
    with trio.move_on_after(5):
        result = await trio.run_process(
            net.command(node, argv), capture_stdout=True, capture_stderr=True, check=False, cwd=REPO
        )
        return result.stdout.decode() if result.returncode == 0 else None
    return None


@needs_netns
async def test_a_real_node_killed_while_partitioned_comes_back_reachable(tmp_path: Path) -> None:
    async with network("a", "client") as net:
        node = NamespacedNode(net, "a", tmp_path / "a")
        try:
            await node.restart()
            assert await status_from(net, "client", node.address) is not None
            partition = NetnsPartition(net, isolate(["a", "client"], "a"))
            async with kill_while_partitioned(partition, Kill(node)):
                assert node.pid is None
                assert await status_from(net, "client", node.address) is None
                assert await net.dropped_packets("a") > 0
            assert node.pid is not None  # restarted on the same data, then healed
            assert await status_from(net, "client", node.address) is not None
        finally:
            node.stop()
