"""Network faults through Linux network namespaces: one namespace per node, each joined by
a veth pair to a bridge that lives in a namespace of its own.

Addressing: every run uses the private subnet ``10.213.0.0/24`` (node ``i`` is
``10.213.0.{i+10}``) on its own bridge inside its own namespace. Nothing is created in the
host's namespace (the veth pairs are made directly between our namespaces), so runs
cannot collide with each other or with the host's routes, and deleting our namespaces
deletes everything we made. Names carry the run id: ``tl-<run>-<node>`` and ``tl-<run>-br``.

Faults are iptables rules in a chain of our own (``TIDELOG_FAULTS``) inside each node's
namespace, hooked first in INPUT and matching only the veth (``-i eth0``), so loopback
inside a namespace is never touched; a fault deletes exactly the rules it added, and
``heal_all`` flushes only our chain. Bandwidth caps are a tbf qdisc on the node's veth
(egress). This kernel has no netem: delay and jitter go through :mod:`tools.faults.proxy`.

Processes must be started inside a node's namespace (``network.command(node, argv)``)
and stopped by their PID before :meth:`NetnsNetwork.destroy`.
"""

from __future__ import annotations

import abc
import ctypes
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterable, Sequence

import attrs
import trio

from tools.faults.base import Fault, describe
from tools.faults.topology import Grudge

__all__ = [
    "CHAIN",
    "SUBNET",
    "NamespaceUnavailable",
    "NetnsBandwidth",
    "NetnsLoss",
    "NetnsNetwork",
    "NetnsPartition",
    "NetnsReset",
    "NodeNet",
    "check_available",
    "open_tcp_stream_in",
    "socket_in",
]

log = logging.getLogger(__name__)

SUBNET = "10.213.0.0/24"
SUBNET_PREFIX = "10.213.0."
FIRST_HOST = 10
MAX_NODES = 200
CHAIN = "TIDELOG_FAULTS"
INTERFACE = "eth0"
NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")


class NamespaceUnavailable(RuntimeError):
    """Network namespaces cannot be used here; the proxy backend must be used instead."""


def check_available() -> None:
    """Raise :class:`NamespaceUnavailable` saying why, unless root with ip, iptables, tc."""
    advice = "use the proxy backend (tools.faults.proxy) for network faults instead"
    if os.geteuid() != 0:
        raise NamespaceUnavailable(f"network namespaces need root (euid={os.geteuid()}); {advice}")
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            raise NamespaceUnavailable(
                f"'{tool}' is not installed (apt-get install iproute2 iptables); {advice}"
            )
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise NamespaceUnavailable(f"'ip netns list' failed: {probe.stderr.strip()}; {advice}")


async def run(argv: Sequence[str]) -> str:
    """Run one command without blocking trio; an error names the command and its stderr."""
    result = await trio.run_process(
        list(argv), capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"command failed (exit {result.returncode}): {' '.join(argv)}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace")


@attrs.frozen
class NodeNet:
    """One node's place in the network."""

    name: str
    namespace: str
    address: str
    index: int


class NetnsNetwork:
    """The namespaces, bridge and veths of one run, and the faults applied to them.

    Invariant: ``created`` lists every namespace this object made, in order; ``destroy``
    deletes exactly those (nothing else has a name with this run id). Create with
    ``await NetnsNetwork.create(names)`` or ``async with NetnsNetwork.open(names) as net``;
    calls come from tasks of one trio run.
    """

    def __init__(self, node_names: Sequence[str], *, run_id: str | None = None) -> None:
        if not node_names:
            raise ValueError("a network needs at least one node")
        if len(node_names) > MAX_NODES or len(set(node_names)) != len(node_names):
            raise ValueError(f"node names must be unique and at most {MAX_NODES}: {node_names}")
        for name in node_names:
            if not NODE_NAME.match(name):
                raise ValueError(f"node name {name!r} must match {NODE_NAME.pattern}")
        self.run_id = run_id or secrets.token_hex(4)
        self.bridge_namespace = f"tl-{self.run_id}-br"
        self.nodes = {
            name: NodeNet(
                name, f"tl-{self.run_id}-{name}", f"{SUBNET_PREFIX}{FIRST_HOST + index}", index
            )
            for index, name in enumerate(node_names)
        }
        self.created: list[str] = []

    @classmethod
    async def create(cls, node_names: Sequence[str], *, run_id: str | None = None) -> NetnsNetwork:
        check_available()
        network = cls(node_names, run_id=run_id)
        try:
            await network._build()
        except BaseException:
            with trio.CancelScope(shield=True):
                await network.destroy()
            raise
        return network

    @classmethod
    def open(cls, node_names: Sequence[str], *, run_id: str | None = None) -> _OpenNetwork:
        return _OpenNetwork(node_names, run_id)

    def node(self, name: str) -> NodeNet:
        try:
            return self.nodes[name]
        except KeyError:
            raise ValueError(f"no node {name!r} in this network ({sorted(self.nodes)})") from None

    def command(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``node``'s namespace (``ip netns exec`` execs, so the PID
        of the started process is the command's own)."""
        return ["ip", "netns", "exec", self.node(node).namespace, *argv]

    async def in_node(self, node: str, argv: Sequence[str]) -> str:
        return await run(self.command(node, argv))

    async def _add_namespace(self, name: str) -> None:
        await run(["ip", "netns", "add", name])
        self.created.append(name)
        await run(["ip", "-n", name, "link", "set", "lo", "up"])

    async def _build(self) -> None:
        await self._add_namespace(self.bridge_namespace)
        await run(["ip", "-n", self.bridge_namespace, "link", "add", "br0", "type", "bridge"])
        await run(["ip", "-n", self.bridge_namespace, "link", "set", "br0", "up"])
        for node in self.nodes.values():
            await self._build_node(node)
        log.info(
            "netns network created %s",
            describe({"run": self.run_id, "subnet": SUBNET, "nodes": ",".join(self.nodes)}),
        )

    async def _build_node(self, node: NodeNet) -> None:
        bridge_port = f"v{node.index}"
        await self._add_namespace(node.namespace)
        await run([
            "ip", "-n", self.bridge_namespace, "link", "add", bridge_port, "type", "veth",
            "peer", "name", INTERFACE, "netns", node.namespace,
        ])  # fmt: skip
        await run(["ip", "-n", self.bridge_namespace, "link", "set", bridge_port, "master", "br0"])
        await run(["ip", "-n", self.bridge_namespace, "link", "set", bridge_port, "up"])
        await run(
            ["ip", "-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", INTERFACE]
        )
        await run(["ip", "-n", node.namespace, "link", "set", INTERFACE, "up"])
        await self.in_node(node.name, ["iptables", "-w", "-N", CHAIN])
        await self.in_node(node.name, ["iptables", "-w", "-I", "INPUT", "1", "-j", CHAIN])

    async def destroy(self) -> None:
        """Delete every namespace we created (their veths, rules and qdiscs go with them),
        newest first; keep going past failures and raise once at the end naming them."""
        failures = []
        while self.created:
            name = self.created.pop()
            try:
                await run(["ip", "netns", "del", name])
            except RuntimeError as error:
                failures.append(str(error))
        log.info("netns network destroyed %s", describe({"run": self.run_id}))
        if failures:
            raise RuntimeError("teardown could not delete: " + "; ".join(failures))

    # -- rules ----------------------------------------------------------------------------

    async def add_rule(self, node: str, rule: Sequence[str]) -> None:
        await self.in_node(node, ["iptables", "-w", "-A", CHAIN, "-i", INTERFACE, *rule])

    async def delete_rule(self, node: str, rule: Sequence[str]) -> None:
        await self.in_node(node, ["iptables", "-w", "-D", CHAIN, "-i", INTERFACE, *rule])

    async def heal_all(self) -> None:
        """Flush our chain and remove bandwidth caps in every node namespace (nothing else)."""
        for node in self.nodes:
            await self.in_node(node, ["iptables", "-w", "-F", CHAIN])
            await self.remove_cap(node)

    async def remove_cap(self, node: str) -> None:
        """Back to the veth's default queueing; a node without a cap is left as it is."""
        listing = await self.in_node(node, ["tc", "qdisc", "show", "dev", INTERFACE, "root"])
        if "tbf" in listing:
            await self.in_node(node, ["tc", "qdisc", "del", "dev", INTERFACE, "root"])

    async def dropped_packets(self, node: str) -> int:
        """Packets our chain in ``node`` has dropped or rejected so far (rule counters)."""
        listing = await self.in_node(node, ["iptables", "-w", "-L", CHAIN, "-v", "-x", "-n"])
        total = 0
        for line in listing.splitlines()[2:]:
            fields = line.split()
            if len(fields) > 2 and fields[2] in ("DROP", "REJECT"):
                total += int(fields[0])
        return total


class _OpenNetwork:
    def __init__(self, node_names: Sequence[str], run_id: str | None) -> None:
        self.node_names, self.run_id = node_names, run_id
        self.network: NetnsNetwork | None = None

    async def __aenter__(self) -> NetnsNetwork:
        self.network = await NetnsNetwork.create(self.node_names, run_id=self.run_id)
        return self.network

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.network is not None
        with trio.CancelScope(shield=True):
            await self.network.destroy()


class _RulesFault(Fault):
    """A fault made of iptables rules; heal deletes exactly the rules it added."""

    def __init__(self, network: NetnsNetwork) -> None:
        super().__init__()
        self.network = network
        self.added: list[tuple[str, list[str]]] = []

    @abc.abstractmethod
    def rules(self) -> Iterable[tuple[str, list[str]]]:
        """The (namespace, iptables arguments) pairs this fault adds."""

    async def _inject(self) -> None:
        try:
            for node, rule in self.rules():
                await self.network.add_rule(node, rule)
                self.added.append((node, rule))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._heal()
            raise

    async def _heal(self) -> None:
        while self.added:
            node, rule = self.added.pop()
            await self.network.delete_rule(node, rule)


class NetnsPartition(_RulesFault):
    """Apply a grudge (:mod:`tools.faults.topology`): each node drops what it receives
    from the nodes it holds a grudge against. Symmetric grudges cut both ways."""

    kind = "partition"

    def __init__(self, network: NetnsNetwork, grudge: Grudge) -> None:
        super().__init__(network)
        for node, dropped in grudge.items():
            network.node(node)
            for other in dropped:
                network.node(other)
        self.grudge = {node: frozenset(dropped) for node, dropped in grudge.items() if dropped}

    def fields(self) -> dict[str, object]:
        cuts = ";".join(f"{node}<-{','.join(sorted(d))}" for node, d in sorted(self.grudge.items()))
        return {"run": self.network.run_id, "drops": cuts}

    def rules(self) -> Iterable[tuple[str, list[str]]]:
        for node, dropped in sorted(self.grudge.items()):
            for other in sorted(dropped):
                yield node, ["-s", self.network.node(other).address, "-j", "DROP"]


class NetnsLoss(_RulesFault):
    """Each receiver drops inbound packets at random with ``probability`` (from the given
    senders, or from everyone)."""

    kind = "loss"

    def __init__(
        self,
        network: NetnsNetwork,
        receivers: Iterable[str],
        *,
        probability: float,
        senders: Iterable[str] | None = None,
    ) -> None:
        super().__init__(network)
        if not 0 < probability <= 1:
            raise ValueError(f"loss probability must be in (0, 1], got {probability}")
        self.receivers = [network.node(name).name for name in receivers]
        self.senders = None if senders is None else [network.node(name).name for name in senders]
        self.probability = probability

    def fields(self) -> dict[str, object]:
        return {
            "run": self.network.run_id,
            "receivers": ",".join(self.receivers),
            "probability": self.probability,
        }

    def rules(self) -> Iterable[tuple[str, list[str]]]:
        match = ["-m", "statistic", "--mode", "random", "--probability", f"{self.probability:.6f}"]
        for receiver in self.receivers:
            everyone: list[str | None] = [None]
            sources = [s for s in (self.senders or everyone) if s != receiver]
            for sender in sources:
                source = [] if sender is None else ["-s", self.network.node(sender).address]
                yield receiver, [*source, *match, "-j", "DROP"]


class NetnsReset(_RulesFault):
    """Each receiver answers TCP from the given senders with RST: new connections are
    refused and open ones reset at their next packet."""

    kind = "reset"

    def __init__(
        self, network: NetnsNetwork, receivers: Iterable[str], senders: Iterable[str]
    ) -> None:
        super().__init__(network)
        self.receivers = [network.node(name).name for name in receivers]
        self.senders = [network.node(name).name for name in senders]

    def fields(self) -> dict[str, object]:
        return {
            "run": self.network.run_id,
            "receivers": ",".join(self.receivers),
            "senders": ",".join(self.senders),
        }

    def rules(self) -> Iterable[tuple[str, list[str]]]:
        for receiver in self.receivers:
            for sender in self.senders:
                if sender != receiver:
                    address = self.network.node(sender).address
                    yield (
                        receiver,
                        ["-p", "tcp", "-s", address, "-j", "REJECT", "--reject-with", "tcp-reset"],
                    )


class NetnsBandwidth(Fault):
    """Cap what each node sends (its veth egress) with a tbf qdisc."""

    kind = "bandwidth"

    def __init__(self, network: NetnsNetwork, nodes: Iterable[str], *, bits_per_s: int) -> None:
        super().__init__()
        if bits_per_s < 8_000:
            raise ValueError(f"a bandwidth cap must be at least 8000 bit/s, got {bits_per_s}")
        self.network = network
        self.nodes = [network.node(name).name for name in nodes]
        self.bits_per_s = bits_per_s

    def fields(self) -> dict[str, object]:
        return {
            "run": self.network.run_id,
            "nodes": ",".join(self.nodes),
            "bits_per_s": self.bits_per_s,
        }

    async def _inject(self) -> None:
        burst_bytes = max(4096, self.bits_per_s // 8 // 50)  # about 20 ms worth
        for node in self.nodes:
            await self.network.in_node(node, [
                "tc", "qdisc", "replace", "dev", INTERFACE, "root", "tbf",
                "rate", f"{self.bits_per_s}bit", "burst", str(burst_bytes), "latency", "200ms",
            ])  # fmt: skip

    async def _heal(self) -> None:
        for node in self.nodes:
            await self.network.remove_cap(node)


# -- sockets inside a namespace, for the harness itself ----------------------------------------

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns failed: {os.strerror(error)}")


def _socket_in_namespace(namespace: str, family: int, kind: int) -> socket.socket:
    """Blocking, on a dedicated thread: switch this thread into ``namespace``, make the
    socket (it stays in that namespace for life), switch back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                return socket.socket(family, kind)
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


async def socket_in(
    network: NetnsNetwork, node: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> trio.socket.SocketType:
    """A trio socket living in ``node``'s namespace, so the harness (producers, consumers,
    checkers) can talk to nodes on the private subnet from its own process. It is made on
    a short-lived thread of its own, never on trio's shared worker threads, so no thread
    is left in a foreign namespace."""
    namespace = network.node(node).namespace
    outcome: list[socket.socket | BaseException] = []
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def make() -> None:
        try:
            outcome.append(_socket_in_namespace(namespace, family, kind))
        except BaseException as error:
            outcome.append(error)
        trio.from_thread.run_sync(done.set, trio_token=token)

    threading.Thread(target=make, name=f"socket-in-{namespace}", daemon=True).start()
    await done.wait()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return trio.socket.from_stdlib_socket(result)


async def open_tcp_stream_in(
    network: NetnsNetwork, node: str, host: str, port: int
) -> trio.SocketStream:
    """Connect from inside ``node``'s namespace (for example a client namespace)."""
    sock = await socket_in(network, node)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)
