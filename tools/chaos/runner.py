"""``tidelog chaos run``: a local cluster (or ``--bootstrap``), the workload and the nemesis,
then heal, quiesce, the final drain and digests, ``run.json``, and the checker's verdict.

The run folder gets ``history.jsonl`` (:mod:`tools.chaos.history`), ``run.json`` (seed, git
revision, settings, versions, the schedule, the command that reproduces it),
``results.json`` and ``report.html`` (:func:`tools.chaos.cli.run_check`). The exit code is
the checker's: 0 valid, 1 anomalies, 2 unreadable.

The runner talks to the cluster through :class:`ChaosCluster` only, so the cluster behind
it is one adapter: :class:`StaticCluster` (``--cluster static``: a master and two slaves
with fixed roles, their replication links through fault proxies, so ``partition`` works),
:class:`FailoverCluster` (``--cluster failover``: etcd and nodes that elect their master,
each node's etcd link through fault proxies), both a :class:`tools.launcher.LocalCluster`
that starts, restarts and stops their processes, or :class:`RemoteCluster` over a cluster
given by ``--bootstrap`` (no faults, no digests).
"""

from __future__ import annotations

import abc
import functools
import json
import logging
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol, Self, TextIO

import attrs
import trio

from cluster.client import TidelogError, open_client
from cluster.client.errors import lone_error_as_itself
from cluster.protocol import Status
from tools.chaos.cli import run_check
from tools.chaos.history import HistoryWriter
from tools.chaos.live import ProgressView
from tools.chaos.nemesis import Nemesis, ScheduledFault, draw_schedule, observe_master
from tools.chaos.workload import (
    NodeView,
    Recorder,
    WorkloadSettings,
    consume,
    digest,
    drain,
    produce,
)
from tools.faults import (
    FAULTS,
    BitFlip,
    Composite,
    EtcdPartition,
    Fault,
    FaultProxy,
    FsyncError,
    Kill,
    MeshPartition,
    NamespaceUnavailable,
    Pause,
    PowerLoss,
    ProxyMesh,
    SlowFsync,
    fault_env,
    parse_nemesis,
)
from tools.faults.loopback import (
    PRIVATE_NETWORK_ENV,
    LoopbackNetwork,
    LoopbackPartition,
    in_private_network,
    private_network_command,
)
from tools.faults.process import sigkill
from tools.faults.topology import isolate
from tools.launcher.cluster import LocalCluster, NodeSettings, acknowledging_epoch, node_answer
from tools.launcher.etcd import EtcdCluster, EtcdMember, free_loopback_port
from tools.process import NodeProcess

__all__ = [
    "ChaosCluster",
    "FailoverCluster",
    "RemoteCluster",
    "RunOutcome",
    "RunSettings",
    "StaticCluster",
    "acknowledging_epoch",
    "needs_private_network",
    "run_chaos",
]

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S: Final = 1.0
QUIESCE_TIMEOUT_S: Final = 30.0
DRAIN_TIMEOUT_S: Final = 60.0
RECOVERY_WAIT_S: Final = 30.0
"""After the last heal, how long sends may take to succeed again before the run ends."""
STOP_GRACE_S: Final = 15.0
"""How long producers get to finish the send in flight once asked to stop."""


class ChaosCluster(Protocol):
    """What a chaos run needs of a cluster. Calls come from tasks of one trio run.

    ``names`` is fixed for the run; ``address``/``data_dir`` may change only across a
    restart. ``fault(kind, targets, seed)`` builds (not injects) a fault of a kind listed
    in ``supported_faults``.
    """

    @property
    def names(self) -> Sequence[str]: ...

    def address(self, name: str) -> str: ...

    def data_dir(self, name: str) -> Path | None: ...

    def supported_faults(self) -> frozenset[str]: ...

    def fault(self, kind: str, targets: Sequence[str], seed: int) -> Fault: ...

    async def master(self) -> tuple[str | None, int | None]: ...

    async def status(self, name: str) -> dict[str, Any] | None: ...


async def _status_of(address: str) -> dict[str, Any] | None:
    """The node's own OK status answer, or None when it gives none within STATUS_TIMEOUT_S."""
    answer = await node_answer(address, "status", STATUS_TIMEOUT_S)
    return answer if answer is not None and answer["status"] is Status.OK else None


async def _master_of(cluster: ChaosCluster) -> tuple[str | None, int | None]:
    """The node answering as a writable master (the highest epoch if several do)."""
    found: list[tuple[int, str]] = []

    async def ask(name: str) -> None:
        epoch = acknowledging_epoch(await cluster.status(name))
        if epoch is not None:
            found.append((epoch, name))

    async with trio.open_nursery() as nursery:
        for name in cluster.names:
            nursery.start_soon(ask, name)
    if not found:
        return None, None
    epoch, name = max(found)
    return name, epoch


class CorruptReplica(Fault):
    """Stop a replica, flip one seeded bit in the written part of its newest commit-log
    segment, and restart it on that data at heal: a corrupted minority replica must never
    serve or lead with the bad record (the checker's digests and drains see it if it does).
    """

    kind = "corrupt"

    def __init__(self, cluster: LocalCluster, name: str, *, seed: int) -> None:
        super().__init__()
        self.cluster, self.name = cluster, name
        self.target = cluster.target(name)
        self.seed = seed
        self.flip: BitFlip | None = None

    def fields(self) -> dict[str, object]:
        return {"node": self.name, **(self.flip.fields() if self.flip else {})}

    async def _inject(self) -> None:
        status = await _status_of(self.cluster.address(self.name))
        if not status:
            raise RuntimeError(f"{self.name} does not answer: cannot learn its log end")
        if status.get("role") == "master":
            raise RuntimeError(f"refusing to corrupt {self.name}: it is the master")
        end = int(status["max_offset"])
        await sigkill(self.target)
        directory = self.cluster.data_dir(self.name) / "store" / "commitlog"
        bases = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        base = max((b for b in bases if b < end), default=None)
        if base is None:
            await self.target.restart()
            raise RuntimeError(f"{self.name} holds no written record to corrupt")
        self.flip = BitFlip(
            directory / f"{base:020d}", seed=self.seed, start=0, end=end - base, target=self.target
        )
        await self.flip.inject()

    async def _heal(self) -> None:
        await self.target.restart()


class _LocalNodes(abc.ABC):
    """What the local clusters share: a :class:`LocalCluster` of ``tidelog node`` processes
    named n1..nN under ``root`` (which starts, restarts and stops them, by PID), each with
    its fault-injection switch on (a chaos run is never a normal run): it records its
    syncs for power loss and obeys its disk control file. The subclass starts them and
    names its ``FAULTS``."""

    FAULTS: ClassVar[frozenset[str]]

    def __init__(self, root: Path, **cluster_options: Any) -> None:
        """``cluster_options`` go to :class:`LocalCluster` (replicas, coordination...)."""
        self.local = local = LocalCluster(root, node_prefix="n", **cluster_options)
        self.root = root
        self._names = local.names
        for name in self._names:
            env = fault_env(self.sync_log(name), self.disk_control(name))
            local.node_settings[name] = NodeSettings(env=env)

    @property
    def nodes(self) -> Mapping[str, NodeProcess]:
        """The started nodes' processes, by name."""
        return self.local.nodes

    def configure(self, name: str, **changes: Any) -> None:
        """Change node ``name``'s :class:`NodeSettings` before it starts."""
        self.local.node_settings[name] = attrs.evolve(self.local.node_settings[name], **changes)

    def sync_log(self, name: str) -> Path:
        """Where node ``name`` records its fdatasyncs (beside its data dir, not in it)."""
        return self.root / f"{name}.sync.jsonl"

    def disk_control(self, name: str) -> Path:
        """The file the eio and slow-fsync faults write for node ``name``."""
        return self.root / f"{name}.disk.json"

    def disk_fault(self, kind: str, target: str, seed: int) -> Fault | None:
        """power-loss (torn sectors included), eio or slow-fsync on ``target``; None for
        other kinds. The node restarts at heal after a power loss or EIO."""
        if kind == "power-loss":
            return PowerLoss(
                self.local.target(target),
                self.local.data_dir(target),
                self.sync_log(target),
                seed=seed,
                tear=True,
            )
        if kind == "eio":
            return FsyncError(self.disk_control(target), target=self.local.target(target))
        if kind == "slow-fsync":
            delay_ms = 50 + seed % 451  # 50..500 ms, from the fault's own seed
            return SlowFsync(self.disk_control(target), delay_ms=delay_ms)
        return None

    def process_fault(self, kind: str, target: str) -> Fault | None:
        """kill or pause (pause-past-lease too: the scenario holds it) on ``target``; None
        for other kinds. A killed node restarts at heal through the cluster."""
        if kind == "kill":
            return Kill(self.local.target(target))
        if kind in ("pause", "pause-past-lease"):
            return Pause(self.local.target(target))
        return None

    def kill_all(self) -> None:
        """Kill every node by its PID (their logs stay in ``root``: ``<name>.log``), and
        stop the etcd the cluster started."""
        self.local.stop(kill=True)

    @property
    def names(self) -> Sequence[str]:
        return self._names

    def address(self, name: str) -> str:
        return self.local.address(name)

    def data_dir(self, name: str) -> Path | None:
        return self.local.data_dir(name)

    def supported_faults(self) -> frozenset[str]:
        return self.FAULTS

    async def status(self, name: str) -> dict[str, Any] | None:
        if not self.local.running(name):
            return None
        return await _status_of(self.local.address(name))

    async def master(self) -> tuple[str | None, int | None]:
        return await _master_of(self)

    @classmethod
    @asynccontextmanager
    async def started(
        cls, root: Path, nursery: trio.Nursery, **options: Any
    ) -> AsyncIterator[Self]:
        """The cluster started, every process of it killed by its PID at exit."""
        cluster = cls(root, **options)
        try:
            await cluster.start(nursery)
            yield cluster
        finally:
            cluster.kill_all()

    @abc.abstractmethod
    async def start(self, nursery: trio.Nursery) -> None:
        """Start the cluster's processes (and its proxies, in ``nursery``)."""

    @abc.abstractmethod
    def fault(self, kind: str, targets: Sequence[str], seed: int) -> Fault:
        """The fault ``kind`` on ``targets``; ValueError for a kind this cluster lacks."""


class StaticCluster(_LocalNodes):
    """A master and slaves as ``tidelog node`` processes with static roles (a static
    :class:`LocalCluster`), each slave's replication link to the master through a fault
    proxy (so ``partition`` cuts it).

    There is no automatic failover: a killed master is restarted at heal on the same data
    and ports. Disk faults: eio and slow-fsync. No power-loss: with no failover the
    master comes back as master with only its own disk, so its unsynced acks would be gone
    by design (power-loss runs on the failover cluster). Use as ``async with
    StaticCluster.started(root, nursery) as cluster``; every process is killed by its PID
    on exit, even on failure.
    """

    FAULTS: ClassVar[frozenset[str]] = frozenset(
        {"kill", "pause", "partition", "corrupt", "eio", "slow-fsync"}
    )

    def __init__(self, root: Path, *, replicas: int = 3, min_insync_replicas: int = 1) -> None:
        assert replicas >= 2, replicas
        super().__init__(
            root,
            replicas=replicas,
            coordination="static",
            min_insync_replicas=min_insync_replicas,
        )
        self.mesh: ProxyMesh | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the proxies (in ``nursery``) and the nodes; prefer :meth:`started`, which
        also kills them at exit. A caller of this must call :meth:`kill_all` itself."""
        master, *slaves = self._names
        self.local.ha_port = free_loopback_port()
        self.mesh = ProxyMesh(
            {master: ("127.0.0.1", self.local.ha_port)},
            links=[(slave, master) for slave in slaves],
        )
        await self.mesh.start(nursery)
        for slave in slaves:
            self.configure(slave, master_ha=self.mesh.address(slave, master))
        await trio.to_thread.run_sync(self.local.start_nodes)

    def fault(self, kind: str, targets: Sequence[str], seed: int) -> Fault:
        if kind == "corrupt":
            (target,) = targets
            if target == self._names[0]:
                raise ValueError(f"corrupt acts on a minority replica, not the master {target}")
            return CorruptReplica(self.local, target, seed=seed)
        if kind == "partition":
            assert self.mesh is not None
            return MeshPartition(self.mesh, isolate(self._names, *targets))
        if kind in self.FAULTS:
            (target,) = targets
            fault = self.process_fault(kind, target) or self.disk_fault(kind, target, seed)
            if fault is not None:
                return fault
        raise ValueError(
            f"fault {kind!r} is not available on a static cluster; "
            f"it supports {', '.join(sorted(self.FAULTS))}"
        )


class KillEtcdLeader(Fault):
    """SIGKILL the member etcd reports as its raft leader; ``heal()`` restarts it on its
    data (a three-member etcd keeps a quorum meanwhile)."""

    kind = "kill-etcd-leader"

    def __init__(self, etcd: EtcdCluster) -> None:
        super().__init__()
        self.etcd = etcd
        self.member: EtcdMember | None = None

    def fields(self) -> dict[str, object]:
        return {"member": self.member.name if self.member else None}

    async def _inject(self) -> None:
        self.member = await trio.to_thread.run_sync(self.etcd.leader)
        await trio.to_thread.run_sync(self.member.kill)

    async def _heal(self) -> None:
        assert self.member is not None
        member = self.member
        await trio.to_thread.run_sync(lambda: self.etcd.restart(member))


class Switchover(Fault):
    """Ask the master to hand over to ``to`` (the admin ``switchover`` op); it returns once
    the new master is elected or the op fails. Nothing to heal."""

    kind = "switchover"

    def __init__(self, master_address: str, group: str, to: str | None) -> None:
        super().__init__()
        self.master_address, self.group, self.to = master_address, group, to

    def fields(self) -> dict[str, object]:
        return {"master": self.master_address, "to": self.to}

    async def _inject(self) -> None:
        fields: dict[str, Any] = {"group": self.group, "timeout_ms": 10_000}
        if self.to is not None:
            fields["to"] = self.to
        async with open_client(self.master_address, request_timeout=15.0) as client:
            await client.checked("switchover", **fields)

    async def _heal(self) -> None:
        return None


class FailoverCluster(_LocalNodes):
    """etcd and ``tidelog node --etcd`` processes that elect their master (automatic
    failover), a :class:`LocalCluster`; each node reaches every etcd member through a fault
    proxy of its own, so ``partition-etcd`` cuts one node from etcd while it keeps its
    peers and clients.

    Faults: kill, pause, pause-past-lease (a pause; the scenario holds it past the lease),
    partition-etcd, kill-etcd-leader (needs ``etcd_members=3``), switchover (targets: the
    master, then the node to hand over to), corrupt (a non-master), and the disk faults of
    every local cluster: power-loss, eio, slow-fsync (each node runs with its
    fault-injection switch on). ``partition`` (between nodes) needs a
    :class:`LoopbackNetwork`: the run must have entered its private network first
    (:func:`tools.faults.loopback.private_network_command`, root), each node then listens
    and sends on an address of its own. Every process is stopped by its PID at exit, even
    on failure.
    """

    FAULTS: ClassVar[frozenset[str]] = frozenset(
        {"kill", "pause", "pause-past-lease", "partition-etcd", "kill-etcd-leader", "switchover",
         "corrupt", "power-loss", "eio", "slow-fsync", "partition"}
    )  # fmt: skip
    GROUP: Final = "g1"

    def __init__(
        self,
        root: Path,
        *,
        replicas: int = 3,
        etcd_members: int = 3,
        min_insync_replicas: int = 1,
        private_network: bool = False,
    ) -> None:
        super().__init__(
            root,
            replicas=replicas,
            etcd_members=etcd_members,
            group=self.GROUP,
            min_insync_replicas=min_insync_replicas,
        )
        self.etcd_proxies: dict[str, list[FaultProxy]] = {}
        self.network = LoopbackNetwork(self._names) if private_network else None

    @property
    def etcd(self) -> EtcdCluster:
        assert self.local.etcd is not None, "etcd starts with the cluster"
        return self.local.etcd

    async def start(self, nursery: trio.Nursery) -> None:
        """Start etcd, the proxies (in ``nursery``) and the nodes; then wait for a master."""
        if self.network is not None:
            await self.network.setup()
        await trio.to_thread.run_sync(self.local.start_etcd)
        for name in self._names:
            proxies = []
            for member in self.etcd.members:
                proxy = FaultProxy("127.0.0.1", member.client_port, name=f"{name}->{member.name}")
                await nursery.start(proxy.serve)
                proxies.append(proxy)
            self.etcd_proxies[name] = proxies
            endpoints = tuple(f"http://127.0.0.1:{proxy.port}" for proxy in proxies)
            self.configure(name, etcd_endpoints=endpoints)
            if self.network is not None:
                self.configure(
                    name,
                    host=self.network.address(name),
                    command_prefix=tuple(self.network.command_prefix(name)),
                )
        await trio.to_thread.run_sync(self.local.start_nodes)
        with trio.fail_after(QUIESCE_TIMEOUT_S):
            while (await self.master())[0] is None:
                await trio.sleep(0.1)

    def fault(self, kind: str, targets: Sequence[str], seed: int) -> Fault:
        if kind == "partition-etcd":
            parts = [EtcdPartition(proxy) for proxy in self.etcd_proxies[targets[0]]]
            return Composite(parts, kind="partition-etcd")
        if kind == "kill-etcd-leader":
            if self.local.etcd_members < 3:
                raise ValueError("kill-etcd-leader needs a three-member etcd (etcd_members=3)")
            return KillEtcdLeader(self.etcd)
        if kind == "switchover":
            to = targets[1] if len(targets) > 1 else None
            return Switchover(self.address(targets[0]), self.GROUP, to)
        if kind == "corrupt":
            return CorruptReplica(self.local, targets[0], seed=seed)
        if kind == "partition":
            if self.network is None:
                raise ValueError(
                    "partition on the failover cluster needs its private network "
                    "(private_network=True; a chaos run asks for it when its nemesis has "
                    "partition)"
                )
            return LoopbackPartition(self.network, isolate(self._names, *targets))
        if kind in self.FAULTS:
            fault = self.process_fault(kind, targets[0]) or self.disk_fault(kind, targets[0], seed)
            if fault is not None:
                return fault
        raise ValueError(
            f"fault {kind!r} is not available on the failover cluster; "
            f"it supports {', '.join(sorted(self.FAULTS))}"
        )


BUILT_IN_FAULTS: Final[dict[str, frozenset[str]]] = {
    "static": StaticCluster.FAULTS,
    "failover": FailoverCluster.FAULTS,
}
"""The fault kinds each kind of local cluster (``--cluster``) can make."""


class RemoteCluster:
    """A running cluster given by ``--bootstrap``: the workload and the drain, no faults
    (the harness did not start its processes) and no digests (no data dirs)."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = list(addresses)
        self._names = list(addresses)

    @property
    def names(self) -> Sequence[str]:
        return self._names

    def address(self, name: str) -> str:
        return name

    def data_dir(self, name: str) -> Path | None:
        return None

    def supported_faults(self) -> frozenset[str]:
        return frozenset()

    def fault(self, kind: str, targets: Sequence[str], seed: int) -> Fault:
        raise ValueError(
            "a --bootstrap cluster was not started by this run: the nemesis cannot act on it"
        )

    async def status(self, name: str) -> dict[str, Any] | None:
        return await _status_of(name)

    async def master(self) -> tuple[str | None, int | None]:
        return await _master_of(self)


@attrs.frozen
class RunSettings:
    """Everything that defines a run; ``run.json`` records it and :meth:`command` rebuilds
    the command line that reproduces it."""

    duration_s: float = 120.0
    nemesis: tuple[str, ...] = ("kill", "pause", "partition")
    acks: str = "replicated"
    seed: int = 7
    out: Path | None = None
    bootstrap: tuple[str, ...] = ()
    replicas: int = 3
    producers: int = 4
    queues: int = 4
    min_insync_replicas: int = 1
    quiet_s: tuple[float, float] = (2.0, 5.0)
    hold_s: tuple[float, float] = (2.0, 6.0)
    cluster: str = attrs.field(
        default="static", validator=attrs.validators.in_(("static", "failover"))
    )
    """static: a master and slaves with fixed roles; failover: etcd and elected masters."""
    scenario: str | None = None
    fixed_schedule: tuple[ScheduledFault, ...] = ()
    """A scenario's own schedule, used instead of one drawn from the seed."""

    def command(self, out: Path) -> str:
        if self.scenario is not None:
            return shlex.join(
                ["tidelog", "chaos", "scenario", self.scenario, "--acks", self.acks,
                 "--seed", str(self.seed), "--cluster", self.cluster, "--out", str(out)]
            )  # fmt: skip
        words = [
            "tidelog", "chaos", "run", "--duration", f"{self.duration_s:g}",
            "--nemesis", ",".join(self.nemesis) if self.nemesis else "none",
            "--acks", self.acks, "--seed", str(self.seed), "--out", str(out),
            "--producers", str(self.producers), "--queues", str(self.queues),
            "--cluster", self.cluster,
        ]  # fmt: skip
        if self.bootstrap:
            words += ["--bootstrap", ",".join(self.bootstrap)]
        return shlex.join(words)

    def workload(self, run_dir: Path) -> WorkloadSettings:
        """A cluster this run started is fresh; on a ``--bootstrap`` cluster the topic is the
        run folder's own, so messages of earlier runs never reach the drain."""
        own = re.sub(r"[^A-Za-z0-9._-]", "-", run_dir.resolve().name)
        topic = f"chaos-{own}"[:64] if self.bootstrap else "chaos"
        return WorkloadSettings(
            topic=topic, queues=self.queues, producers=self.producers, acks=self.acks
        )


@attrs.frozen
class RunOutcome:
    """What a run produced: its folder, the checker's exit code, and the run's figures."""

    run_dir: Path
    exit_code: int
    figures: dict[str, Any]


def _git_revision() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def source_revision() -> dict[str, Any]:
    """The code a run starts with: ``git_revision`` (HEAD) and ``git_dirty`` (tracked files
    changed in the working tree: the revision alone then does not name the code that
    ran). Taken at the start: a tree that moves during a long run must not be credited."""
    revision = _git_revision()
    dirty: bool | None = None
    if revision is not None:
        try:
            done = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            )
            dirty = bool(done.stdout.strip()) if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            dirty = None
    return {"git_revision": revision, "git_dirty": dirty}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("tidelog", "trio", "hypothesis", "plotly"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def default_run_dir(seed: int) -> Path:
    return Path("chaos-runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}"


def write_manifest(
    run_dir: Path,
    settings: RunSettings,
    schedule: Sequence[ScheduledFault],
    extra: dict[str, Any],
) -> Path:
    """``run.json``: seed, revision, settings, versions, schedule, the reproducing command.
    ``extra`` comes last: a run passes the revision it started with (:func:`source_revision`)."""
    manifest = {
        "seed": settings.seed,
        "git_revision": _git_revision(),
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in attrs.asdict(settings, recurse=False).items()
        },
        "versions": _versions(),
        "schedule": [planned.to_json() for planned in schedule],
        "command": settings.command(run_dir),
        "argv": sys.argv,
        **extra,
    }
    path = run_dir / "run.json"
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return path


async def _create_topic(bootstrap: Sequence[str], topic: str, queues: int) -> None:
    """Create the run's topic on the master (following NOT_MASTER), waiting for one."""
    with trio.fail_after(QUIESCE_TIMEOUT_S):
        while True:
            try:
                async with open_client(list(bootstrap), request_timeout=5.0) as client:
                    response = await client.call("create_topic", topic=topic, queues=queues)
                    hint = response.get("master")
                    if hint and response["status"].value == "NOT_MASTER":
                        async with open_client(hint) as master:
                            await master.admin.create_topic(topic, queues, exist_ok=True)
                        return
                    if response["status"].value in ("OK", "TOPIC_EXISTS"):
                        return
            except TidelogError as exc:
                log.info("create_topic_retry error=%s", exc)
            await trio.sleep(0.2)


async def quiesce(cluster: ChaosCluster, timeout_s: float = QUIESCE_TIMEOUT_S) -> dict[str, Any]:
    """Wait (bounded) for a master whose replicas all hold its log up to its confirm offset
    and whose confirm offset reached its log end; returns what was seen last."""
    seen: dict[str, Any] = {"master": None, "settled": False}
    with trio.move_on_after(timeout_s):
        while True:
            master, _epoch = await cluster.master()
            if master is not None:
                statuses = {name: await cluster.status(name) for name in cluster.names}
                mine = statuses[master] or {}
                end = int(mine.get("max_offset", 0))
                confirm = int((mine.get("replication") or {}).get("confirm_offset", end))
                ends = {n: (s or {}).get("max_offset") for n, s in statuses.items()}
                replication = {n: (s or {}).get("replication") for n, s in statuses.items()}
                seen = {
                    "master": master,
                    "end": end,
                    "confirm": confirm,
                    "ends": ends,
                    "replication": replication,
                }
                if confirm >= end and all(e == end for e in ends.values()):
                    seen["settled"] = True
                    return seen
            await trio.sleep(0.1)
    return seen


async def run_chaos(
    settings: RunSettings,
    *,
    out: TextIO | None = None,
    cluster_factory: Callable[[Path, trio.Nursery], Any] | None = None,
    before_drain: Callable[[ChaosCluster], Awaitable[None]] | None = None,
    live: bool = True,
) -> RunOutcome:
    """Run one chaos run and judge it; see the module doc.

    ``cluster_factory(root, nursery)`` returns an async context manager yielding a
    :class:`ChaosCluster` (default: a :class:`StaticCluster`); ``before_drain`` acts on the
    cluster after quiescing (tests use it to destroy data and prove the checker fails).
    """
    out = out or sys.stdout
    run_dir = Path(settings.out) if settings.out else default_run_dir(settings.seed)
    schedule = list(settings.fixed_schedule)
    kinds = tuple(dict.fromkeys(planned.kind for planned in schedule)) or settings.nemesis
    if cluster_factory is None and not settings.bootstrap:
        _check_kinds(kinds, BUILT_IN_FAULTS[settings.cluster], f"the {settings.cluster} cluster")
    if (run_dir / "history.jsonl").exists():
        raise ValueError(
            f"{run_dir} already holds a run (history.jsonl): give another --out, or remove "
            "that folder to run again there"
        )
    if needs_private_network(settings, kinds, cluster_factory) and not in_private_network():
        if before_drain is not None:
            raise ValueError("a run in a private network cannot take before_drain")
        return await _run_in_private_network(settings, run_dir, out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not schedule and kinds:
        schedule = draw_schedule(
            settings.seed,
            settings.duration_s,
            kinds,
            quiet_s=settings.quiet_s,
            hold_s=settings.hold_s,
        )
    workload = settings.workload(run_dir)
    extra: dict[str, Any] = {"run_dir": str(run_dir), **source_revision()}
    writer = HistoryWriter(run_dir / "history.jsonl")
    with lone_error_as_itself():
        figures = await _run_cluster(
            settings, run_dir, kinds, schedule, workload, writer, extra, out,
            cluster_factory, before_drain, live,
        )  # fmt: skip
    extra["figures"] = figures
    write_manifest(run_dir, settings, schedule, extra)
    exit_code = await trio.to_thread.run_sync(lambda: run_check(run_dir, out=out))
    if (run_dir / "results.json").is_file():
        figures["summary"] = run_summary(run_dir)
        print(format_summary(figures["summary"]), file=out)
    return RunOutcome(run_dir, exit_code, figures)


async def _run_in_private_network(settings: RunSettings, run_dir: Path, out: TextIO) -> RunOutcome:
    """Run this same run (its reproducing command) in a process of its own inside a fresh
    network namespace, copying its output to ``out``; this process's network is never
    changed. Cancelled, the child gets SIGINT (it stops its own processes by PID)."""
    words = shlex.split(settings.command(run_dir))
    assert words[0] == "tidelog", words
    try:
        command = private_network_command([sys.executable, "-m", "tools.cli", *words[1:]])
    except NamespaceUnavailable as exc:
        raise ValueError(str(exc)) from None
    env = {**os.environ, PRIVATE_NETWORK_ENV: "1"}
    print(f"running in a private network namespace: {shlex.join(command)}", file=out)
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process,
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                check=False,
                env=env,
                deliver_cancel=_interrupt,
            )
        )
        assert process.stdout is not None
        async for chunk in process.stdout:
            out.write(chunk.decode(errors="replace"))
    figures: dict[str, Any] = {}
    manifest = run_dir / "run.json"
    if manifest.is_file():
        figures = json.loads(manifest.read_text(encoding="utf-8")).get("figures", {})
    if (run_dir / "results.json").is_file():
        figures["summary"] = run_summary(run_dir)
    assert process.returncode is not None
    return RunOutcome(run_dir, process.returncode, figures)


async def _interrupt(process: trio.Process) -> None:
    """Ask a child run to stop (SIGINT: it heals and stops its processes), then kill it."""
    process.send_signal(signal.SIGINT)
    with trio.move_on_after(STOP_GRACE_S * 4):
        await process.wait()
        return
    process.kill()


def needs_private_network(
    settings: RunSettings, kinds: Sequence[str], cluster_factory: object | None
) -> bool:
    """A run of the built-in failover cluster with partitions between its nodes runs in a
    private network namespace (:mod:`tools.faults.loopback`)."""
    return (
        cluster_factory is None
        and not settings.bootstrap
        and settings.cluster == "failover"
        and "partition" in kinds
    )


def _check_kinds(kinds: Sequence[str], supported: frozenset[str], cluster: str) -> None:
    unsupported = sorted(set(kinds) - supported)
    if unsupported:
        raise ValueError(
            f"nemesis {', '.join(unsupported)} not available on {cluster}; it supports "
            f"{', '.join(sorted(supported)) or 'no faults'}"
        )


def _percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The figures a run is quoted by: duration, acked, faults by kind, master changes,
    lost, recovery p50/p99 (from results.json and run.json)."""
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    manifest_path = run_dir / "run.json"
    manifest = (
        json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    )
    figures = manifest.get("figures", {})
    faults: dict[str, int] = {}
    refused = 0
    for window in results.get("faults", []):
        if not window.get("started", True):
            refused += 1  # could not be injected: it is no fault of the run
            continue
        faults[window["fault"]] = faults.get(window["fault"], 0) + 1
    recoveries = [
        r["recovery_s"] for r in results.get("recoveries", []) if r["recovery_s"] is not None
    ]
    return {
        "valid": results["valid"],
        "duration_s": figures.get("duration_s"),
        "acked": sum(q["acked"] for q in results.get("queues", [])),
        "faults": faults,
        "faults_refused": refused,
        "master_changes": max(len(results.get("master_changes", [])) - 1, 0),
        "lost": len(results.get("lost", [])),
        "never_recovered": sum(r["recovery_s"] is None for r in results.get("recoveries", [])),
        "recovery_p50_s": _percentile(recoveries, 0.50),
        "recovery_p99_s": _percentile(recoveries, 0.99),
    }


def format_summary(summary: dict[str, Any]) -> str:
    def seconds(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f} s"

    faults = ", ".join(f"{kind} {count}" for kind, count in sorted(summary["faults"].items()))
    refused = (
        f" (+{summary['faults_refused']} that could not start)"
        if summary.get("faults_refused")
        else ""
    )
    return (
        f"run: {summary['duration_s']} s, {summary['acked']} acked, faults: {faults or 'none'}"
        f"{refused}, "
        f"{summary['master_changes']} master changes, lost {summary['lost']}, recovery p50 "
        f"{seconds(summary['recovery_p50_s'])} p99 {seconds(summary['recovery_p99_s'])}"
    )


async def _run_cluster(
    settings: RunSettings,
    run_dir: Path,
    kinds: Sequence[str],
    schedule: Sequence[ScheduledFault],
    workload: WorkloadSettings,
    writer: HistoryWriter,
    extra: dict[str, Any],
    out: TextIO,
    cluster_factory: Callable[[Path, trio.Nursery], Any] | None,
    before_drain: Callable[[ChaosCluster], Awaitable[None]] | None,
    live: bool,
) -> dict[str, Any]:
    """Start the cluster, run the phases, drain; returns the run's figures."""
    private_network = needs_private_network(settings, kinds, cluster_factory)
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        if settings.bootstrap:
            cluster: ChaosCluster = RemoteCluster(settings.bootstrap)
            extra["cluster"] = "bootstrap"
        else:
            kind = FailoverCluster if settings.cluster == "failover" else StaticCluster
            options: dict[str, Any] = {}
            if private_network:
                options["private_network"] = True
                extra["network"] = "a private network namespace, a loopback address per node"
            factory = cluster_factory or (
                lambda root, n: kind.started(
                    root,
                    n,
                    replicas=settings.replicas,
                    min_insync_replicas=settings.min_insync_replicas,
                    **options,
                )
            )
            cluster = await stack.enter_async_context(factory(run_dir / "nodes", nursery))
            extra["cluster"] = type(cluster).__name__
        try:
            _check_kinds(kinds, cluster.supported_faults(), extra["cluster"])
        except ValueError:
            writer.close()
            raise
        bootstrap = [cluster.address(name) for name in cluster.names]
        await _create_topic(bootstrap, workload.topic, workload.queues)
        recorder = Recorder(writer)
        figures = await _run_phases(
            recorder, cluster, bootstrap, workload, schedule, settings, live, out
        )
        if before_drain is not None:
            await before_drain(cluster)
        await _final_reads(recorder, cluster, workload, figures)
        writer.close()
        nursery.cancel_scope.cancel()
    return figures


async def _run_phases(
    recorder: Recorder,
    cluster: ChaosCluster,
    bootstrap: Sequence[str],
    workload: WorkloadSettings,
    schedule: Sequence[ScheduledFault],
    settings: RunSettings,
    live: bool,
    out: TextIO,
) -> dict[str, Any]:
    """Workload, nemesis, observer and progress view for ``duration_s``; then heal."""
    names = {cluster.address(name): name for name in cluster.names}
    nemesis = Nemesis(recorder, cluster, schedule, sequential=not settings.fixed_schedule)
    current_master: list[str | None] = [None]
    view = ProgressView(recorder, nemesis, current_master, settings.duration_s, out, enabled=live)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observe_master, recorder, cluster, current_master)
        nursery.start_soon(view.run)
        with trio.CancelScope() as workers_scope:
            async with trio.open_nursery() as workers:
                for index in range(workload.producers):
                    workers.start_soon(
                        produce, recorder, bootstrap, workload, index, settings.seed, names, stop
                    )
                if workload.consumers:
                    for queue in range(workload.queues):
                        workers.start_soon(
                            consume, recorder, bootstrap, workload, queue, names, stop
                        )
                try:
                    with trio.move_on_after(settings.duration_s):
                        await nemesis.run()
                        await trio.sleep_forever()
                finally:
                    await nemesis.heal_all()
                await _until_sends_succeed(recorder, workload.producers)
                stop.set()  # each worker finishes its operation in flight, then returns
                workers_scope.deadline = trio.current_time() + STOP_GRACE_S
        nursery.cancel_scope.cancel()
    view.finish()
    stats = recorder.stats
    return {
        "duration_s": round(recorder.now_s(), 3),
        "sends": stats.invoked,
        "acked": stats.acked,
        "failed": stats.failed,
        "unknown": stats.unknown,
        "faults_started": len(nemesis.done) + len(nemesis.active),
        "faults": [planned.kind for planned in schedule],
        "nemesis_errors": nemesis.errors,
    }


async def _until_sends_succeed(recorder: Recorder, producers: int) -> None:
    """After the heal, let the workload run until sends succeed again (bounded), so the
    last fault's recovery is measured instead of cut off by the end of the run."""
    target = recorder.stats.acked + producers
    with trio.move_on_after(RECOVERY_WAIT_S):
        while recorder.stats.acked < target:
            await trio.sleep(0.05)


async def _final_reads(
    recorder: Recorder, cluster: ChaosCluster, workload: WorkloadSettings, figures: dict[str, Any]
) -> None:
    """Quiesce, then drain every queue on every node and digest every node's log."""
    settled = await quiesce(cluster)
    figures["quiesce"] = settled
    master = settled.get("master")
    current, _epoch = await cluster.master()
    master = current or master
    # The observer has stopped: record the master the drain relies on.
    recorder.record("info", "observer", "master", {"master": master, "epoch": _epoch})
    nodes = [
        NodeView(
            name,
            cluster.address(name),
            "master" if name == master else "replica",
            cluster.data_dir(name),
        )
        for name in sorted(cluster.names, key=lambda n: n != master)
    ]
    await drain(recorder, nodes, workload.topic, workload.queues, timeout_s=DRAIN_TIMEOUT_S)
    if master is None:
        return
    master_status = await cluster.status(master) or {}
    confirm = int((master_status.get("replication") or {}).get("confirm_offset", 0))
    start = int(master_status.get("min_offset", 0))
    ends: dict[str, int] = {}
    for name in cluster.names:
        status = await cluster.status(name) or {}
        ends[name] = int(status.get("max_offset", 0))
    await digest(recorder, nodes, confirm, start, lambda name: ends[name])


def parse_kinds(spec: str) -> tuple[str, ...]:
    """``--nemesis``: the fault vocabulary (:func:`tools.faults.parse_nemesis`, groups
    expanded) plus the cluster-level kinds of the local clusters (``kill-etcd-leader``,
    ``switchover``, ``pause-past-lease``)."""
    cluster_kinds = frozenset().union(*BUILT_IN_FAULTS.values())
    words = [word.strip() for word in spec.split(",") if word.strip()]
    own = [word for word in words if word in cluster_kinds and word not in FAULTS]
    rest = ",".join(word for word in words if word not in own)
    parsed = parse_nemesis(rest) if rest else ()
    return tuple(dict.fromkeys([*parsed, *own]))


def settings_from_args(
    *,
    duration_s: float,
    nemesis: str,
    acks: str,
    seed: int,
    out: str | None,
    bootstrap: str | None,
    producers: int = 4,
    queues: int = 4,
    cluster: str = "static",
) -> RunSettings:
    """Validated settings from the command line; a bad value raises ValueError naming it."""
    if duration_s <= 0:
        raise ValueError(f"--duration must be positive seconds, got {duration_s:g}")
    kinds = () if nemesis in ("", "none") else parse_kinds(nemesis)
    addresses = tuple(a for a in (bootstrap or "").split(",") if a)
    if addresses and kinds:
        raise ValueError(
            "--bootstrap runs against a cluster this run did not start: the nemesis cannot "
            "act on it; add --nemesis none"
        )
    return RunSettings(
        duration_s=duration_s,
        nemesis=kinds,
        acks=acks,
        seed=seed,
        out=Path(out) if out else None,
        bootstrap=addresses,
        producers=producers,
        queues=queues,
        cluster=cluster,
    )
