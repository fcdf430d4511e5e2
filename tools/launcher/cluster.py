"""A local tidelog cluster: an etcd (unless one is given) and one broker group of N
``tidelog node --etcd`` processes that elect their master, on free loopback ports.

The library behind ``tidelog cluster up``, the end-to-end tests, ``tidelog bench
failover`` and the failover demo. Process control (start, stop, kill, restart, pause,
resume) is synchronous, like :class:`tools.launcher.etcd.EtcdCluster`: a trio caller runs
``start``/``restart`` in a thread. Questions to the nodes (``statuses``, ``master``,
``wait_for_master``) are trio coroutines.

Every process is started by this object and stopped by its PID only (SIGTERM, then
SIGKILL after a bound), also when starting fails; data directories and logs stay.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from cluster.client import TidelogError, open_client
from cluster.client.tls import client_tls
from cluster.coordination.etcd import EtcdClient, EtcdError
from cluster.coordination.keys import ClusterKeys, GroupState
from tools.launcher.etcd import EtcdCluster
from tools.launcher.pki import Pki, make_pki
from tools.process import NodeProcess

__all__ = [
    "COORDINATIONS",
    "ClusterLaunchError",
    "LocalCluster",
    "NodeSettings",
    "NodeTarget",
    "NodeView",
    "acknowledging_epoch",
    "node_answer",
    "read_group_state",
]

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 2.0
"""A node that does not answer ``status`` within this is shown as not answering."""
POLL_INTERVAL_S = 0.05
STATE_FILE = "cluster.json"
TLS_DIR = "tls"
"""Under the cluster's root: the throwaway CA (``ca.pem``) and each node's certificate."""
COORDINATIONS = ("etcd", "static")
"""etcd: the nodes elect their master through etcd; static: the first node is the master
and the others its slaves, fixed roles and no etcd."""


class ClusterLaunchError(RuntimeError):
    """The cluster could not be started (or a node restarted), with the reason and log."""


async def node_answer(
    address: str,
    op: str,
    timeout_s: float = STATUS_TIMEOUT_S,
    *,
    tls: ssl.SSLContext | None = None,
    **fields: Any,
) -> dict[str, Any] | None:
    """``op``'s answer from the node at ``address`` itself (never another node), or None
    when it cannot answer (killed, paused, starting). ``tls``: the client port speaks
    TLS (a context trusting the cluster's CA)."""
    with trio.move_on_after(timeout_s):
        try:
            async with open_client(
                address,
                request_timeout=timeout_s,
                connect_timeout=timeout_s,
                failover_timeout=0.0,
                tls=tls,
            ) as client:
                return await client.call(op, **fields)
        except (TidelogError, OSError):
            return None
    return None


def acknowledging_epoch(status: Mapping[str, Any] | None) -> int | None:
    """The epoch a node acknowledges writes in, from its ``status`` (None: it does not).

    With etcd the HA loop's role and fencing deadline decide; without, the static role.
    """
    if not status:
        return None
    coordination = status.get("coordination")
    if coordination:
        if coordination.get("role") == "master" and coordination.get("may_acknowledge"):
            return int(coordination.get("epoch") or 0)
        return None
    if status.get("role") == "master" and status.get("writable"):
        return int(status.get("epoch") or 0)
    return None


@attrs.frozen
class NodeSettings:
    """What one node of a :class:`LocalCluster` runs with beyond what every node gets.

    Empty fields fall back to the cluster's: ``etcd_endpoints`` (this node's etcd URLs,
    e.g. one fault proxy per member so a fault can cut this node alone from etcd),
    ``host`` (the address it listens on and advertises, e.g. a loopback address of its
    own in a private network namespace), ``command_prefix`` (words its command runs
    under: ``setpriv --regid G``, ``ip netns exec NS``). ``env`` adds to the
    environment it inherits (the fault-injection switches such as
    ``TIDELOG_FAULT_SYNC_LOG``); ``args`` go after the cluster's ``node_args``;
    ``master_ha`` is the replication address a slave of a static group dials instead of
    the master's own (e.g. through a fault proxy).
    """

    env: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    etcd_endpoints: tuple[str, ...] = ()
    host: str | None = None
    command_prefix: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    master_ha: str | None = None


@attrs.frozen
class NodeView:
    """One node as the launcher sees it: its process and its ``status`` answer."""

    name: str
    address: str
    pid: int | None
    running: bool
    status: Mapping[str, Any] | None
    """The node's ``status`` answer (None: it did not answer)."""

    @property
    def coordination(self) -> Mapping[str, Any]:
        return (self.status or {}).get("coordination") or {}

    @property
    def role(self) -> str:
        if not self.running:
            return "stopped"
        if self.status is None:
            return "no answer"
        return str(self.coordination.get("role") or self.status.get("role"))

    @property
    def is_master(self) -> bool:
        """A master that may acknowledge now (not one past its fencing deadline)."""
        return acknowledging_epoch(self.status) is not None

    @property
    def epoch(self) -> int | None:
        return (self.status or {}).get("epoch")

    @property
    def log_end(self) -> int | None:
        return (self.status or {}).get("max_offset")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "pid": self.pid,
            "running": self.running,
            "role": self.role,
            "epoch": self.epoch,
            "log_end": self.log_end,
            "recorded_in_sync": self.coordination.get("recorded_in_sync"),
            "may_acknowledge": self.coordination.get("may_acknowledge"),
        }


@attrs.define
class LocalCluster:
    """One broker group of ``replicas`` node processes (and the etcd it uses), all under
    ``root``: node ``<node_prefix>i`` keeps its data in ``root/<name>`` and its log in
    ``root/<name>.log``.

    ``coordination="etcd"`` (the default): the nodes elect their master. With
    ``etcd_endpoints`` they use that etcd; else ``etcd_members`` members are started (3 to
    test etcd's own faults), each with ``etcd_args``. ``coordination="static"``: no etcd;
    the first node is the master (replication on ``ha_port``; 0: the port the master
    bound, read from its status and kept for its restarts) and the others its slaves.
    ``tls``: both ports of every node speak TLS with certificates of a throwaway CA made
    in ``root/tls`` at start (:mod:`tools.launcher.pki`): clients verify the node's
    certificate against ``root/tls/ca.pem`` and need none of their own; the replication
    port is mutual TLS, and a master takes a slave only if its certificate names the
    node it claims to be (``tls_peer_names``). ``node_args`` go to every node; ``host`` and
    ``command_prefix`` are every node's defaults; ``node_settings`` holds what differs per
    node (:class:`NodeSettings`), read when a node is first started.

    Use as a context manager, or ``start`` / ``stop``; ``stop`` is safe to call twice and
    after a failed start. A caller that must act between etcd and the nodes (to put fault
    proxies in front of etcd, say) calls ``start_etcd``, fills ``node_settings``, then
    ``start_nodes``, and stops the cluster itself if one of them fails. One owner drives
    process control; the coroutines may run from any task of one trio run.
    """

    root: Path
    replicas: int = 3
    etcd_endpoints: tuple[str, ...] = ()
    etcd_members: int = 1
    etcd_args: tuple[str, ...] = ()
    cluster_name: str = "tidelog"
    group: str = "g1"
    min_insync_replicas: int = 1
    node_args: tuple[str, ...] = ()
    host: str | None = None
    command_prefix: tuple[str, ...] = ()
    new_session: bool = False
    log_level: str = "WARNING"
    start_timeout_s: float = 30.0
    etcd: EtcdCluster | None = None
    nodes: dict[str, NodeProcess] = attrs.field(factory=dict)
    coordination: str = attrs.field(default="etcd", validator=attrs.validators.in_(COORDINATIONS))
    node_prefix: str = "node-"
    ha_port: int = 0
    """static: the master's replication port (0: the one it binds, set by ``start_nodes``)."""
    node_settings: dict[str, NodeSettings] = attrs.field(factory=dict)
    tls: bool = False
    pki: Pki | None = None
    """With ``tls``: the CA and the nodes' certificates, made by ``start_nodes``."""
    _client_tls: ssl.SSLContext | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"a cluster needs at least one node, got replicas={self.replicas}")
        if self.etcd_members < 1:
            raise ValueError(
                f"etcd needs at least one member, got etcd_members={self.etcd_members}"
            )
        if self.etcd_endpoints and self.etcd_members != 1:
            raise ValueError(
                "etcd_members applies to the etcd this cluster starts, not to given endpoints"
            )
        if self.coordination == "static" and (self.etcd_endpoints or self.etcd_members != 1):
            raise ValueError(
                "a static group runs without etcd: drop etcd_endpoints and etcd_members, "
                "or use coordination='etcd'"
            )
        if not 0 <= self.min_insync_replicas < max(self.replicas, 2):
            raise ValueError(
                f"min_insync_replicas={self.min_insync_replicas} cannot be met by "
                f"{self.replicas} node(s): use 0 to {self.replicas - 1}"
            )

    @property
    def endpoints(self) -> list[str]:
        """The etcd client URLs of the cluster (a node's own ``etcd_endpoints`` aside)."""
        if self.etcd_endpoints:
            return list(self.etcd_endpoints)
        return self.etcd.endpoints if self.etcd is not None else []

    @property
    def names(self) -> list[str]:
        """Every node's name, in order (known before the nodes start)."""
        return [f"{self.node_prefix}{index}" for index in range(1, self.replicas + 1)]

    def address(self, name: str) -> str:
        return self.nodes[name].address

    def data_dir(self, name: str) -> Path:
        return self.root / name

    @property
    def addresses(self) -> list[str]:
        """Client addresses of every node: a client's bootstrap list."""
        return [node.address for node in self.nodes.values()]

    @property
    def ca_file(self) -> Path | None:
        """With ``tls``: the CA certificate a client trusts (``--tls-ca``)."""
        return self.pki.ca_file if self.pki is not None else None

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        """With ``tls``: a client's context for the nodes (trusting :attr:`ca_file`)."""
        if self._client_tls is None and self.pki is not None:
            self._client_tls = client_tls(str(self.pki.ca_file))
        return self._client_tls

    def start(self) -> LocalCluster:
        """Start etcd (unless endpoints were given, or the group is static) and every node;
        returns once each node listens. Everything started is stopped again if any of it
        fails."""
        try:
            self.start_etcd()
            self.start_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def start_etcd(self) -> None:
        """Start the etcd the nodes use, when this cluster runs one (see :meth:`start`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.coordination == "etcd" and not self.etcd_endpoints and self.etcd is None:
            self.etcd = EtcdCluster(
                self.root / "etcd",
                size=self.etcd_members,
                extra_args=self.etcd_args,
                new_session=self.new_session,
            ).start()

    def start_nodes(self) -> None:
        """Start every node not started yet; returns once each listens. A static group's
        master starts first (its slaves name its address; a caller may start it alone
        with :meth:`start_node` to learn ``ha_port`` first); the other nodes start side
        by side, each start waiting for its interpreter to load and listen."""
        self._prepare()
        names = [name for name in self.names if name not in self.nodes]
        if self.coordination == "static" and self.names[0] in names:
            self.start_node(names[0])
            names = names[1:]
        for name in names:
            self.nodes[name] = self._node(name)
        if not names:
            return
        with concurrent.futures.ThreadPoolExecutor(len(names)) as starters:
            for started in [starters.submit(self._start_node, name) for name in names]:
                started.result()

    def start_node(self, name: str) -> NodeProcess:
        """Start node ``name`` alone and return it once it listens: the first time (for
        a caller that brings nodes up one by one, to let one win the first election,
        say), or again after a stop or kill, as :meth:`restart`. A static group's slave
        needs its master started first."""
        if name not in self.names:
            raise KeyError(f"no node {name!r} in this cluster; nodes: {self.names}")
        if name in self.nodes:
            self.restart(name)
            return self.nodes[name]
        self._prepare()
        master = self.names[0]
        static = self.coordination == "static"
        if static and name != master and master not in self.nodes:
            raise ClusterLaunchError(f"{name} is a slave of {master}: start {master} first")
        self.nodes[name] = self._node(name)
        self._start_node(name)
        if static and name == master and not self.ha_port:
            self.ha_port = self._bound_ha_port(name)
            self.nodes[name].extra_args = self._args(name)  # a restart keeps the port
        return self.nodes[name]

    def _prepare(self) -> None:
        """Checks and files every first start needs: the settings, the root, the PKI."""
        self._check_node_settings()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tls and self.pki is None:
            self.pki = self._make_pki()

    def _check_node_settings(self) -> None:
        unknown = sorted(set(self.node_settings) - set(self.names))
        if unknown:
            raise ValueError(f"node_settings for unknown nodes {unknown}; nodes: {self.names}")
        for name, settings in self.node_settings.items():
            if self.coordination == "static" and settings.etcd_endpoints:
                raise ValueError(f"{name}: a static group uses no etcd (etcd_endpoints given)")
            slave = self.coordination == "static" and name != self.names[0]
            if settings.master_ha is not None and not slave:
                raise ValueError(f"{name}: master_ha is for the slaves of a static group")

    def _role_args(self, name: str, settings: NodeSettings) -> list[str]:
        if self.coordination == "etcd":
            return [
                "--etcd", ",".join(settings.etcd_endpoints or self.endpoints),
                "--cluster", self.cluster_name,
                "--group", self.group,
                "--ha-port", "0",
                "--min-insync-replicas", str(self.min_insync_replicas),
            ]  # fmt: skip
        master = self.names[0]
        if name == master:
            return [
                "--ha-port", str(self.ha_port),
                "--min-insync-replicas", str(self.min_insync_replicas),
            ]  # fmt: skip
        master_host = self.nodes[master].host
        return [
            "--role", "slave",
            "--master-ha", settings.master_ha or f"{master_host}:{self.ha_port}",
            "--master-client", self.address(master),
        ]  # fmt: skip

    def _make_pki(self) -> Pki:
        """A CA and a certificate per node naming its name and the address it listens on."""
        addresses = {}
        for name in self.names:
            host = self.node_settings.get(name, NodeSettings()).host or self.host
            addresses[name] = ["127.0.0.1", *([host] if host and host != "127.0.0.1" else [])]
        return make_pki(self.root / TLS_DIR, self.names, addresses=addresses)

    def _tls_env(self, name: str) -> dict[str, str]:
        """Both ports on TLS with the node's certificate; the HA port mutual, and a slave
        must be the node its certificate names. Clients need no certificate."""
        if self.pki is None:
            return {}
        cert, key = (str(path) for path in self.pki.ends[name])
        return {
            "TIDELOG_SERVER_TLS_CERT_FILE": cert,
            "TIDELOG_SERVER_TLS_KEY_FILE": key,
            "TIDELOG_REPLICATION_TLS_CERT_FILE": cert,
            "TIDELOG_REPLICATION_TLS_KEY_FILE": key,
            "TIDELOG_REPLICATION_TLS_CA_FILE": str(self.pki.ca_file),
            "TIDELOG_REPLICATION_TLS_PEER_NAMES": "true",
        }

    def _bound_ha_port(self, name: str) -> int:
        """The replication port node ``name`` bound (asked ``--ha-port 0``), from its
        status: no port is picked ahead and lost to another process meanwhile. Asked from
        a trio run of its own in a worker thread, so any caller (a trio thread too) may
        start the cluster."""
        ask = functools.partial(self._wait_ha_address, name)
        with concurrent.futures.ThreadPoolExecutor(1) as asker:
            ha_address = asker.submit(trio.run, ask).result()
        return int(ha_address.rpartition(":")[2])

    async def _wait_ha_address(self, name: str) -> str:
        last: dict[str, Any] | None = None
        with trio.move_on_after(self.start_timeout_s):
            while True:
                last = await node_answer(self.address(name), "status", tls=self.client_tls)
                ha_address = ((last or {}).get("replication") or {}).get("ha_address")
                if ha_address:
                    return str(ha_address)
                await trio.sleep(POLL_INTERVAL_S)
        raise ClusterLaunchError(
            f"{name} did not report its replication address within {self.start_timeout_s}s "
            f"(its last status: {last}); see {self.root / f'{name}.log'}"
        )

    def _args(self, name: str) -> list[str]:
        settings = self.node_settings.get(name, NodeSettings())
        return [*self._role_args(name, settings), *self.node_args, *settings.args]

    def _node(self, name: str) -> NodeProcess:
        settings = self.node_settings.get(name, NodeSettings())
        return NodeProcess(
            self.data_dir(name),
            name=name,
            extra_args=self._args(name),
            env={**self._tls_env(name), **settings.env} or None,
            log_level=self.log_level,
            host=settings.host or self.host,
            command_prefix=settings.command_prefix or self.command_prefix,
            log_path=self.root / f"{name}.log",
            new_session=self.new_session,
        )

    def _start_node(self, name: str) -> None:
        try:
            self.nodes[name].start(self.start_timeout_s)
        except RuntimeError as exc:
            raise ClusterLaunchError(str(exc)) from None
        log.info("node started name=%s pid=%s address=%s", name, self.pid(name), self.address(name))

    def pid(self, name: str) -> int | None:
        return self.nodes[name].pid

    def running(self, name: str) -> bool:
        return self.nodes[name].is_running()

    def kill(self, name: str) -> None:
        """SIGKILL one node: a crash, nothing flushed."""
        self.nodes[name].kill()

    def stop_node(self, name: str, timeout_s: float = 30.0) -> int:
        """SIGTERM one node and wait: a clean shutdown (a master resigns first)."""
        return self.nodes[name].stop(timeout_s)

    def restart(self, name: str) -> None:
        """Start a stopped or killed node again on its data directory and client port."""
        node = self.nodes[name]
        # a killed node can look alive to one poll while another thread polls it too (a
        # chaos run's master observer does): wait for its exit before refusing
        if node.is_running() and not node.exited():
            raise ClusterLaunchError(f"{name} is still running (pid {self.pid(name)})")
        self._start_node(name)

    def pause(self, name: str) -> None:
        """SIGSTOP one node (it keeps its sockets and lease until the lease runs out)."""
        self.nodes[name].pause()

    def resume(self, name: str) -> None:
        self.nodes[name].resume()

    def target(self, name: str) -> NodeTarget:
        """Node ``name`` as the process faults act on it (:class:`NodeTarget`)."""
        if name not in self.nodes:
            raise KeyError(f"no node {name!r} started; nodes: {self.names}")
        return NodeTarget(self, name)

    def stop(self, *, kill: bool = False) -> None:
        """Stop every node (SIGTERM, then SIGKILL after a bound; with ``kill``, SIGKILL at
        once: a harness done with the cluster needs no clean shutdown) and the etcd this
        object started, all by PID. Data and logs stay under ``root``."""
        for name, node in self.nodes.items():
            if kill:
                node.kill()
                continue
            try:
                node.stop(timeout=15.0)
            except RuntimeError as exc:  # ignored SIGTERM: killed by stop() already
                log.warning("node stop name=%s: %s", name, exc)
        if self.etcd is not None:
            self.etcd.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- questions to the nodes ------------------------------------------------------------

    async def view(self, name: str) -> NodeView:
        node = self.nodes[name]
        running = node.is_running()
        status = await node_answer(node.address, "status", tls=self.client_tls) if running else None
        return NodeView(name, node.address, node.pid, running, status)

    async def views(self) -> list[NodeView]:
        """Every node's view, asked concurrently, in name order."""
        found: dict[str, NodeView] = {}

        async def one(name: str) -> None:
            found[name] = await self.view(name)

        async with trio.open_nursery() as nursery:
            for name in self.nodes:
                nursery.start_soon(one, name)
        return [found[name] for name in self.nodes]

    async def master(self) -> str | None:
        """The name of the one node that is an acknowledging master now (None: no node,
        or more than one, says so)."""
        masters = [view.name for view in await self.views() if view.is_master]
        return masters[0] if len(masters) == 1 else None

    async def wait_for_master(
        self, timeout_s: float = 30.0, *, other_than: str | None = None
    ) -> str:
        """Wait until exactly one node is an acknowledging master (other than
        ``other_than``); return its name. Another process's state offers no event to
        wait on: a bounded poll. Raises TimeoutError naming what each node said."""
        last: list[NodeView] = []
        with trio.move_on_after(timeout_s):
            while True:
                last = await self.views()
                masters = [view.name for view in last if view.is_master]
                if len(masters) == 1 and masters[0] != other_than:
                    return masters[0]
                await trio.sleep(POLL_INTERVAL_S)
        seen = ", ".join(f"{view.name}: {view.role}" for view in last)
        raise TimeoutError(f"no single master within {timeout_s}s ({seen})")

    async def group_state(self, timeout_s: float = STATUS_TIMEOUT_S) -> GroupState | None:
        """The group's state record as etcd holds it now (epoch, master, recorded in-sync
        set), read linearizably; None when there is none yet or etcd does not answer."""
        return await read_group_state(self.endpoints, self.cluster_name, self.group, timeout_s)

    async def wait_group_state(
        self, what: str, condition: Callable[[GroupState], bool], timeout_s: float = 30.0
    ) -> GroupState:
        """Return the group state as soon as etcd records one for which ``condition``
        holds: read once, then follow etcd's watch of the key from the next revision (no
        polling, no change missed). TimeoutError naming ``what`` and the last state."""
        key = ClusterKeys(self.cluster_name).state(self.group)
        last: GroupState | None = None
        with trio.move_on_after(timeout_s):
            async with EtcdClient(self.endpoints, request_timeout_s=STATUS_TIMEOUT_S) as etcd:
                listing = await etcd.range(key)
                if listing.kvs:
                    last = GroupState.decode(key, listing.kvs[0].value)
                    if condition(last):
                        return last
                async with etcd.watch(key, start_revision=listing.revision + 1) as watch:
                    async for event in watch:
                        if event.kv.value:
                            last = GroupState.decode(key, event.kv.value)
                            if condition(last):
                                return last
        raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}; last state {last}")

    # ---- the state file of a detached cluster ------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What ``tidelog cluster status|down`` need to find this cluster again."""
        etcd = self.etcd
        return {
            "format": 1,
            "root": str(self.root),
            "cluster": self.cluster_name,
            "group": self.group,
            "tls": (
                {"ca_file": str(self.ca_file), "client": "tls", "ha": "mutual"}
                if self.ca_file is not None
                else None
            ),
            "etcd": {
                "endpoints": self.endpoints,
                "managed": etcd is not None,
                "pids": [m.pid for m in etcd.members if m.pid] if etcd is not None else [],
                "members": [
                    {
                        "name": m.name,
                        "client_url": m.client_url,
                        "pid": m.pid,
                        "data_dir": str(m.data_dir),
                        "log": str(m.log_path),
                    }
                    for m in (etcd.members if etcd is not None else [])
                ],
            },
            "nodes": [
                {
                    "name": name,
                    "address": node.address,
                    "pid": node.pid,
                    "data_dir": str(node.data_dir),
                    "log": str(node.log_path),
                }
                for name, node in self.nodes.items()
            ],
        }

    def write_state(self) -> Path:
        path = self.root / STATE_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.describe(), indent=2) + "\n")
        os.replace(temporary, path)
        return path


@attrs.frozen
class NodeTarget:
    """One node of a :class:`LocalCluster` as the process faults see it
    (``tools.faults.ProcessTarget``): its PID while it runs, and a restart through the
    cluster, on the same data directory and client port. Calls come from one trio run."""

    cluster: LocalCluster
    name: str

    @property
    def pid(self) -> int | None:
        return self.cluster.pid(self.name) if self.cluster.running(self.name) else None

    async def restart(self) -> None:
        await trio.to_thread.run_sync(self.cluster.restart, self.name)

    def __repr__(self) -> str:
        return f"node:{self.name}"


async def read_group_state(
    endpoints: Sequence[str], cluster: str, group: str, timeout_s: float = STATUS_TIMEOUT_S
) -> GroupState | None:
    """``groups/<group>/state`` of ``cluster`` from etcd at ``endpoints`` (None: absent,
    or no endpoint answered within ``timeout_s``)."""
    if not endpoints:
        return None
    key = ClusterKeys(cluster).state(group)
    with trio.move_on_after(timeout_s):
        try:
            async with EtcdClient(list(endpoints), request_timeout_s=timeout_s) as etcd:
                stored = await etcd.get(key)
        except EtcdError:
            return None
        return GroupState.decode(stored.key, stored.value) if stored is not None else None
    return None


def read_state(root: Path) -> dict[str, Any]:
    """A detached cluster's ``cluster.json``; FileNotFoundError/ValueError say what is wrong."""
    path = root / STATE_FILE
    state = json.loads(path.read_text())
    if not isinstance(state, dict) or state.get("format") != 1 or "nodes" not in state:
        raise ValueError(f"{path} is not a cluster state file this version can read")
    return state


def process_matches(pid: int, *words: str) -> bool:
    """True when process ``pid`` exists and its command line contains every word: a PID
    from a state file is signalled only if it is still the process that was started."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return all(word in command for word in words)


def stop_pids(pids: Sequence[tuple[int, Sequence[str]]], timeout_s: float = 15.0) -> list[int]:
    """SIGTERM each (pid, words) whose process still matches, wait up to ``timeout_s``
    for them to exit, SIGKILL the rest. Returns the PIDs that were signalled."""
    import signal
    import time

    signalled = []
    for pid, words in pids:
        if process_matches(pid, *words):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in signalled):
        time.sleep(POLL_INTERVAL_S)
    for pid in signalled:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return signalled


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
