"""Chaos runs against the compose cluster: the chaos runner's cluster adapter whose nemesis
acts on containers, judged by the same checker as local runs.

Faults: ``kill`` (``docker kill``; heal: ``docker start``), ``pause`` (``docker pause`` /
``unpause``) and ``partition`` (DROP rules in ``DOCKER-USER`` between the container
addresses of the two sides, lifted at heal). Nodes are addressed through their published
host ports (stable across restarts). Data directories are the volumes' folders on the host,
so the run's commit-log digests cover the containers' logs too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import trio

from tools.chaos.runner import _master_of, _status_of
from tools.docker.cluster import NODE_SERVICES, DockerCluster
from tools.faults.base import Fault
from tools.faults.topology import isolate

__all__ = ["ContainerKill", "ContainerPartition", "ContainerPause", "DockerChaosCluster"]


class _ContainerFault(Fault):
    """A fault acting on one node's container (a compose service) of ``cluster``."""

    def __init__(self, cluster: DockerCluster, service: str) -> None:
        super().__init__()
        self.cluster, self.service = cluster, service

    def fields(self) -> dict[str, object]:
        return {"container": self.service}


class ContainerKill(_ContainerFault):
    """SIGKILL a node's container; heal starts it again on the same volume."""

    kind = "kill"

    async def _inject(self) -> None:
        await trio.to_thread.run_sync(self.cluster.kill, self.service)

    async def _heal(self) -> None:
        await trio.to_thread.run_sync(self.cluster.start, self.service)


class ContainerPause(_ContainerFault):
    """Freeze a node's container (cgroup freezer); heal thaws it."""

    kind = "pause"

    async def _inject(self) -> None:
        await trio.to_thread.run_sync(self.cluster.pause, self.service)

    async def _heal(self) -> None:
        await trio.to_thread.run_sync(self.cluster.unpause, self.service)


class ContainerPartition(Fault):
    """Cut every pair of containers that ``reachable`` says cannot talk (both ways)."""

    kind = "partition"

    def __init__(self, cluster: DockerCluster, reachable: dict[str, frozenset[str]]) -> None:
        super().__init__()
        self.cluster = cluster
        names = sorted(reachable)
        self.pairs = [
            (a, b) for i, a in enumerate(names) for b in names[i + 1 :] if b not in reachable[a]
        ]

    def fields(self) -> dict[str, object]:
        return {"cut": ",".join(f"{a}|{b}" for a, b in self.pairs)}

    async def _inject(self) -> None:
        for a, b in self.pairs:
            await trio.to_thread.run_sync(self.cluster.block, a, b)

    async def _heal(self) -> None:
        for a, b in self.pairs:
            await trio.to_thread.run_sync(self.cluster.unblock, a, b)


class DockerChaosCluster:
    """The chaos runner's view of a running compose cluster (``ChaosCluster`` protocol).
    Calls come from tasks of one trio run; docker commands run in threads."""

    FAULTS: Final = frozenset({"kill", "pause", "partition"})

    def __init__(self, cluster: DockerCluster) -> None:
        self.cluster = cluster
        self._data_dirs: dict[str, Path] = {}

    @classmethod
    @asynccontextmanager
    async def started(cls, cluster: DockerCluster) -> AsyncIterator[DockerChaosCluster]:
        """Bring the compose cluster up, yield the adapter, remove everything at exit."""
        try:
            await trio.to_thread.run_sync(cluster.up)
            adapter = cls(cluster)
            await trio.to_thread.run_sync(adapter._find_data_dirs)
            yield adapter
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(cluster.down)

    @classmethod
    @asynccontextmanager
    async def attached(cls, cluster: DockerCluster) -> AsyncIterator[DockerChaosCluster]:
        """The adapter on a compose cluster that is up already (its owner takes it down);
        faults the run leaves are healed by the runner."""
        adapter = cls(cluster)
        await trio.to_thread.run_sync(adapter._find_data_dirs)
        yield adapter

    def _find_data_dirs(self) -> None:
        for service in NODE_SERVICES:
            mounts = self.cluster.inspect(service)["Mounts"]
            (volume,) = (m["Name"] for m in mounts if m["Destination"] == "/var/lib/tidelog")
            inspected = json.loads(self.cluster.docker("volume", "inspect", volume))[0]
            self._data_dirs[service] = Path(inspected["Mountpoint"]) / "data"

    @property
    def names(self) -> Sequence[str]:
        return NODE_SERVICES

    def address(self, name: str) -> str:
        return self.cluster.settings.client_address(name)

    def data_dir(self, name: str) -> Path | None:
        return self._data_dirs.get(name)

    def supported_faults(self) -> frozenset[str]:
        return self.FAULTS

    def fault(self, kind: str, targets: Sequence[str], seed: int) -> Fault:
        if kind == "kill":
            (target,) = targets
            return ContainerKill(self.cluster, target)
        if kind == "pause":
            (target,) = targets
            return ContainerPause(self.cluster, target)
        if kind == "partition":
            return ContainerPartition(self.cluster, isolate(list(NODE_SERVICES), *targets))
        raise ValueError(
            f"fault {kind!r} is not available on the docker cluster; it supports "
            f"{', '.join(sorted(self.FAULTS))}"
        )

    async def status(self, name: str) -> dict[str, Any] | None:
        return await _status_of(self.address(name))

    async def master(self) -> tuple[str | None, int | None]:
        return await _master_of(self)
