"""Partitions between local processes on one loopback, inside a private network namespace
the harness process enters for the whole run.

Why: a node advertises the replication address it listens on, so a proxy cannot be put
between two elected nodes; and the per-node namespaces of :mod:`tools.faults.netns` cannot
reach an etcd or a harness on the host's loopback. Here every process of the run (the
harness, etcd, the nodes) shares one private namespace: the harness re-runs itself under
:func:`private_network_command` (``unshare --net``), so nothing the run does touches the
host's network or firewall, and it all vanishes with the run's processes.

Node ``i`` listens on ``127.0.1.i`` and runs with its own group id (``setpriv``); an
iptables SNAT rule by owner gives its outgoing connections that same source address. A
grudge (:mod:`tools.faults.topology`) is then plain DROP rules on source and destination
in a chain of our own hooked into INPUT. The harness (source ``127.0.0.1``) and etcd are
never cut. Needs root, ``ip``, ``iptables`` and ``setpriv``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from typing import Final

import trio

from tools.faults.base import Fault
from tools.faults.netns import NamespaceUnavailable, run
from tools.faults.topology import Grudge

__all__ = [
    "CHAIN",
    "PRIVATE_NETWORK_ENV",
    "LoopbackNetwork",
    "LoopbackPartition",
    "check_available",
    "in_private_network",
    "private_network_command",
]

PRIVATE_NETWORK_ENV: Final = "TIDELOG_PRIVATE_NETWORK"
CHAIN: Final = "TIDELOG_FAULTS"
FIRST_GID: Final = 61000
PREFIX: Final = "127.0.1."
MAX_NODES: Final = 200


def check_available() -> None:
    """Raise :class:`NamespaceUnavailable` saying why, unless root with the tools."""
    if os.geteuid() != 0:
        raise NamespaceUnavailable(
            f"partitions on the failover cluster need root (euid={os.geteuid()})"
        )
    for tool in ("unshare", "ip", "iptables", "setpriv"):
        if shutil.which(tool) is None:
            raise NamespaceUnavailable(
                f"partitions on the failover cluster need '{tool}' "
                "(apt-get install util-linux iproute2 iptables)"
            )


def private_network_command(argv: Sequence[str]) -> list[str]:
    """``argv`` run in a fresh network namespace with only ``lo`` (up), with
    ``TIDELOG_PRIVATE_NETWORK=1`` to be passed in its environment by the caller
    (:data:`PRIVATE_NETWORK_ENV`). The same PID all along (``unshare`` and ``sh`` exec),
    so a signal to it reaches ``argv``; the namespace ends with its last process."""
    check_available()
    return ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


def in_private_network() -> bool:
    """Whether this process was started by :func:`private_network_command`'s caller."""
    return os.environ.get(PRIVATE_NETWORK_ENV) == "1"


class LoopbackNetwork:
    """The nodes' addresses, group ids and SNAT rules in the private namespace, and the
    rules the partitions add. Calls come from tasks of one trio run, in a process started
    under :func:`private_network_command`."""

    def __init__(self, names: Sequence[str]) -> None:
        if not names or len(names) > MAX_NODES or len(set(names)) != len(names):
            raise ValueError(f"want 1 to {MAX_NODES} distinct node names, got {list(names)}")
        self.names = list(names)

    def address(self, name: str) -> str:
        """The loopback address node ``name`` listens on and sends from."""
        return f"{PREFIX}{self.names.index(name) + 1}"

    def gid(self, name: str) -> int:
        return FIRST_GID + self.names.index(name) + 1

    def command_prefix(self, name: str) -> list[str]:
        """Run the node under its own group id, which its SNAT rule matches."""
        return ["setpriv", "--regid", str(self.gid(name)), "--clear-groups"]

    async def setup(self) -> None:
        """Our chain hooked first into INPUT, and one SNAT rule per node."""
        await iptables("-N", CHAIN)
        await iptables("-I", "INPUT", "1", "-j", CHAIN)
        for name in self.names:
            await iptables(
                "-t", "nat", "-A", "POSTROUTING", "-o", "lo",
                "-m", "owner", "--gid-owner", str(self.gid(name)),
                "-j", "SNAT", "--to-source", self.address(name),
            )  # fmt: skip

    async def heal_all(self) -> None:
        """Drop every partition rule (only our chain is flushed)."""
        await iptables("-F", CHAIN)


async def iptables(*args: str) -> None:
    await run(["iptables", "-w", *args])


class LoopbackPartition(Fault):
    """Apply a grudge: each node drops what it receives from the nodes it holds a grudge
    against (a symmetric grudge cuts both ways). ``heal()`` deletes exactly these rules."""

    kind = "partition"

    def __init__(self, network: LoopbackNetwork, grudge: Grudge) -> None:
        super().__init__()
        for node, dropped in grudge.items():
            for name in (node, *dropped):
                if name not in network.names:
                    raise ValueError(f"unknown node {name!r}; nodes: {network.names}")
        self.network = network
        self.grudge = {node: frozenset(dropped) for node, dropped in grudge.items() if dropped}
        self.added: list[list[str]] = []

    def fields(self) -> dict[str, object]:
        cuts = ";".join(f"{node}<-{','.join(sorted(d))}" for node, d in sorted(self.grudge.items()))
        return {"backend": "loopback", "drops": cuts}

    def rules(self) -> Iterable[list[str]]:
        for node, dropped in sorted(self.grudge.items()):
            for other in sorted(dropped):
                yield [
                    "-s", self.network.address(other), "-d", self.network.address(node),
                    "-j", "DROP",
                ]  # fmt: skip

    async def _inject(self) -> None:
        try:
            for rule in self.rules():
                await iptables("-A", CHAIN, *rule)
                self.added.append(rule)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._heal()
            raise

    async def _heal(self) -> None:
        while self.added:
            await iptables("-D", CHAIN, *self.added.pop())
