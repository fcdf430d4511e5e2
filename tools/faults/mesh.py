"""Partitions without root: a :class:`~tools.faults.proxy.FaultProxy` on every directed
link of a cluster, and grudges (:mod:`tools.faults.topology`) applied to them.

Node ``a`` must reach node ``b`` at ``mesh.address("a", "b")`` (the launcher configures
each node's peers that way); a link can also end at a non-node such as ``etcd``. For a
grudge "``r`` no longer hears ``s``", the proxy ``s -> r`` holds what ``s`` sends, and the
proxy ``r -> s`` holds what ``s`` answers: bytes from ``s`` stop reaching ``r`` whoever
opened the connection, while ``r``'s own bytes still reach ``s``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import trio

from tools.faults.base import Fault
from tools.faults.proxy import Direction, FaultProxy
from tools.faults.topology import Grudge

__all__ = ["MeshPartition", "ProxyMesh"]


class ProxyMesh:
    """One proxy per directed link ``(source, destination)``.

    ``targets`` maps each destination name to the real ``(host, port)`` it listens on;
    ``links`` defaults to every ordered pair of distinct targets. Start with
    ``await mesh.start(nursery)``; proxies live as long as that nursery.
    """

    def __init__(
        self, targets: Mapping[str, tuple[str, int]], links: Iterable[tuple[str, str]] | None = None
    ) -> None:
        self.targets = dict(targets)
        if links is None:
            links = itertools.permutations(self.targets, 2)
        self.proxies: dict[tuple[str, str], FaultProxy] = {}
        for source, destination in links:
            if destination not in self.targets:
                raise ValueError(f"link {source}->{destination}: no target named {destination!r}")
            if source == destination:
                raise ValueError(f"link {source}->{destination}: a node does not proxy to itself")
            host, port = self.targets[destination]
            self.proxies[source, destination] = FaultProxy(
                host, port, name=f"{source}->{destination}"
            )

    async def start(self, nursery: trio.Nursery) -> None:
        for proxy in self.proxies.values():
            await nursery.start(proxy.serve)

    def proxy(self, source: str, destination: str) -> FaultProxy:
        try:
            return self.proxies[source, destination]
        except KeyError:
            raise ValueError(f"no proxied link {source}->{destination} in this mesh") from None

    def address(self, source: str, destination: str) -> str:
        """Where ``source`` must connect to reach ``destination``."""
        return f"127.0.0.1:{self.proxy(source, destination).port}"


class MeshPartition(Fault):
    """Apply a grudge to a :class:`ProxyMesh` (links missing from the mesh are skipped:
    nothing travels on them anyway). ``heal()`` releases exactly the holds it set."""

    kind = "partition"

    def __init__(self, mesh: ProxyMesh, grudge: Grudge) -> None:
        super().__init__()
        self.mesh = mesh
        self.grudge = {node: frozenset(dropped) for node, dropped in grudge.items() if dropped}
        self.holds: list[tuple[FaultProxy, Direction]] = []
        for receiver, senders in self.grudge.items():
            for sender in sorted(senders):
                if (sender, receiver) in mesh.proxies:
                    self.holds.append((mesh.proxies[sender, receiver], Direction.TO_TARGET))
                if (receiver, sender) in mesh.proxies:
                    self.holds.append((mesh.proxies[receiver, sender], Direction.FROM_TARGET))

    def fields(self) -> dict[str, object]:
        cuts = ";".join(f"{node}<-{','.join(sorted(d))}" for node, d in sorted(self.grudge.items()))
        return {"backend": "proxy", "drops": cuts}

    async def _inject(self) -> None:
        for proxy, direction in self.holds:
            proxy.hold(proxy.held | {direction})

    async def _heal(self) -> None:
        for proxy, direction in self.holds:
            proxy.hold(proxy.held - {direction})
