"""Fault injection for chaos runs: the vocabulary a nemesis schedule speaks and the faults
behind each word.

Every fault has a clean undo: ``await fault.inject()`` / ``await fault.heal()``, or
``async with fault:`` (healed even when the body fails). Backends:

- process (:mod:`tools.faults.process`): kill, pause, pause-then-kill, restart;
- proxy (:mod:`tools.faults.proxy`, :mod:`tools.faults.mesh`): a loopback TCP proxy per
  chosen link; needs no root; partitions by grudge over a mesh of proxies, the
  node-to-etcd partition, delay and jitter, bandwidth, resets;
- loopback (:mod:`tools.faults.loopback`): the whole run in one private network
  namespace, a loopback address per node; partitions between processes that pick their
  peers' addresses themselves (elected masters); needs root;
- netns (:mod:`tools.faults.netns`): one network namespace per node on a private bridge
  (``10.213.0.0/24``); partitions by grudge (:mod:`tools.faults.topology`), loss, resets,
  bandwidth; needs root, else :class:`NamespaceUnavailable` points at the proxy backend;
- disk (:mod:`tools.faults.disk`): power loss, bit flip and truncation, ENOSPC, and
  failing (EIO) or slow fdatasync through the node's fault-injection switch (no
  device-mapper here: the node itself delays or fails the call, see
  :mod:`storage.sync_log`).
"""

from __future__ import annotations

import attrs

from tools.faults.base import Composite, Fault, describe
from tools.faults.disk import (
    BitFlip,
    FileSync,
    FillDisk,
    FsyncError,
    PowerLoss,
    SlowFsync,
    SmallTmpfs,
    Truncate,
    apply_power_loss,
    fault_env,
    power_loss_image,
    read_sync_log,
)
from tools.faults.loopback import LoopbackNetwork, LoopbackPartition
from tools.faults.mesh import MeshPartition, ProxyMesh
from tools.faults.netns import (
    NamespaceUnavailable,
    NetnsBandwidth,
    NetnsLoss,
    NetnsNetwork,
    NetnsPartition,
    NetnsReset,
    check_available,
)
from tools.faults.process import (
    Kill,
    NodeProcessTarget,
    Pause,
    PauseThenKill,
    ProcessTarget,
    Restart,
)
from tools.faults.proxy import (
    EtcdPartition,
    FaultProxy,
    ProxyBandwidth,
    ProxyPartition,
    ProxyReset,
    ProxySlow,
)

__all__ = [
    "FAULTS",
    "NEMESIS_GROUPS",
    "BitFlip",
    "Composite",
    "EtcdPartition",
    "Fault",
    "FaultKind",
    "FaultProxy",
    "FileSync",
    "FillDisk",
    "FsyncError",
    "Kill",
    "LoopbackNetwork",
    "LoopbackPartition",
    "MeshPartition",
    "NamespaceUnavailable",
    "NetnsBandwidth",
    "NetnsLoss",
    "NetnsNetwork",
    "NetnsPartition",
    "NetnsReset",
    "NetworkBackend",
    "NodeProcessTarget",
    "Pause",
    "PauseThenKill",
    "PowerLoss",
    "ProcessTarget",
    "ProxyBandwidth",
    "ProxyMesh",
    "ProxyPartition",
    "ProxyReset",
    "ProxySlow",
    "Restart",
    "SlowFsync",
    "SmallTmpfs",
    "Truncate",
    "apply_power_loss",
    "check_available",
    "describe",
    "fault_env",
    "fault_kind",
    "kill_while_partitioned",
    "network_backend",
    "parse_nemesis",
    "power_loss_image",
    "read_sync_log",
]


@attrs.frozen
class FaultKind:
    """One word of the nemesis vocabulary: what it does, which fault classes implement it
    (per backend), and whether it needs root."""

    name: str
    summary: str
    implementations: tuple[type[Fault], ...]
    needs_root: bool = False


FAULTS: dict[str, FaultKind] = {
    kind.name: kind
    for kind in (
        FaultKind(
            "kill",
            "SIGKILL a node, restart it on the same data at heal",
            (Kill, Restart, PauseThenKill),
        ),
        FaultKind("pause", "SIGSTOP a node, SIGCONT at heal", (Pause,)),
        FaultKind(
            "partition",
            "cut links between nodes: isolate one, master+one, halves, bridge, ring, one way",
            (NetnsPartition, MeshPartition, ProxyPartition, LoopbackPartition),
        ),
        FaultKind(
            "partition-etcd", "cut a node from etcd (through its etcd proxy)", (EtcdPartition,)
        ),
        FaultKind("loss", "drop a share of packets at random", (NetnsLoss,), needs_root=True),
        FaultKind(
            "reset",
            "answer TCP with RST: open connections break, new ones fail",
            (NetnsReset, ProxyReset),
        ),
        FaultKind(
            "slow",
            "added delay and jitter, or a bandwidth cap",
            (ProxySlow, ProxyBandwidth, NetnsBandwidth),
        ),
        FaultKind(
            "power-loss", "SIGKILL and lose what was not fdatasynced, page by page", (PowerLoss,)
        ),
        FaultKind(
            "corrupt",
            "flip a bit in or truncate a stopped minority replica's file",
            (BitFlip, Truncate),
        ),
        FaultKind("enospc", "fill the node's (small tmpfs) disk", (FillDisk,), needs_root=True),
        FaultKind(
            "eio",
            "the node's fdatasync fails with EIO (fault-injection switch); restart at heal",
            (FsyncError,),
        ),
        FaultKind(
            "slow-fsync", "the node's fdatasync waits first (fault-injection switch)", (SlowFsync,)
        ),
    )
}

NEMESIS_GROUPS: dict[str, tuple[str, ...]] = {
    "network": ("partition", "partition-etcd", "loss", "reset", "slow"),
    "disk": ("corrupt", "enospc", "eio", "slow-fsync"),
    "process": ("kill", "pause"),
}
"""Shorthands accepted by :func:`parse_nemesis` (``--nemesis kill,disk``)."""


def fault_kind(name: str) -> FaultKind:
    try:
        return FAULTS[name]
    except KeyError:
        raise ValueError(f"unknown fault {name!r}; known faults: {', '.join(FAULTS)}") from None


def parse_nemesis(spec: str) -> tuple[str, ...]:
    """``"kill,pause,disk"`` -> the fault names, groups expanded, order kept, no repeats;
    an unknown word is an error naming the known ones."""
    names: list[str] = []
    for word in (part.strip() for part in spec.split(",")):
        if not word:
            continue
        if word in NEMESIS_GROUPS:
            expanded = NEMESIS_GROUPS[word]
        elif word in FAULTS:
            expanded = (word,)
        else:
            known = ", ".join([*FAULTS, *NEMESIS_GROUPS])
            raise ValueError(f"unknown nemesis {word!r} in {spec!r}; choose from: {known}")
        names.extend(name for name in expanded if name not in names)
    if not names:
        raise ValueError(f"no fault named in nemesis {spec!r}; choose from: {', '.join(FAULTS)}")
    return tuple(names)


def kill_while_partitioned(partition: Fault, kill: Fault) -> Composite:
    """Partition first, then kill inside it; heal restarts the node, then the network."""
    return Composite([partition, kill], kind="kill-while-partitioned")


@attrs.frozen
class NetworkBackend:
    """Which network backend a run uses and why; a run records this in its manifest."""

    name: str  # "netns" or "proxy"
    reason: str


def network_backend(prefer: str = "netns") -> NetworkBackend:
    """Namespaces when asked for and available, else the proxy backend with the reason."""
    if prefer not in ("netns", "proxy"):
        raise ValueError(f"network backend must be 'netns' or 'proxy', got {prefer!r}")
    if prefer == "proxy":
        return NetworkBackend("proxy", "chosen")
    try:
        check_available()
    except NamespaceUnavailable as error:
        return NetworkBackend("proxy", str(error))
    return NetworkBackend("netns", "root with iproute2 and iptables")
