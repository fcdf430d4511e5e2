"""A node's configuration: one frozen attrs class per TOML section, loaded in layers.

Precedence, lowest first: built-in defaults, the TOML file, ``TIDELOG_<SECTION>_<KEY>``
environment variables, then ``overrides`` (the CLI's flags, as dotted keys such as
``"node.port"``). Every value is checked against its field's type and range before the
node starts, and an error names where the value came from, its full dotted key, what was
received and what is allowed: a node that starts with a typo in its config and silently
uses a default is worse than one that refuses to start.

The ``store`` section holds every :class:`storage.StoreConfig` field except
``data_dir``, which is always ``<node.data_dir>/store``. Its keys are read from
``StoreConfig`` itself, so a knob added to storage is configurable here at once.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from cluster.coordination.settings import CoordinationSettings
from cluster.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_FRAME_SIZE_LIMIT,
    MAX_QUEUES,
    MIN_MAX_FRAME_SIZE,
)
from cluster.protocol.address import parse_address
from replication.auth import check_secret, read_secret_file
from replication.settings import (
    DEFAULT_HEARTBEAT_MS,
    DEFAULT_MAX_LAG_BYTES,
    DEFAULT_MAX_LAG_MS,
    DEFAULT_MAX_PEERS,
    DEFAULT_PEER_TIMEOUT_MS,
    SLAVE_ACK_MODES,
    ReplicationSettings,
)
from replication.tls import TlsFiles, check_files
from storage.config import StoreConfig

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "CoordinationSection",
    "NodeConfig",
    "NodeSection",
    "ReplicationSection",
    "ServerSection",
    "TopicsSection",
    "load_node_config",
]

ENV_PREFIX: Final = "TIDELOG_"
STORE_SUBDIR: Final = "store"
TOPICS_FILE: Final = "topics.json"
MAX_LAG_BYTES_LIMIT: Final = 1 << 50
"""Upper bound of ``replication.max_lag_bytes`` (1 PiB): larger is a typo, not a policy."""
_NODE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ConfigError(Exception):
    """A configuration value that cannot be used; the message says where, what and why.

    ``source`` is the file, environment variable or flag the value came from, ``key``
    the full dotted key (``"server.max_connections"``).
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


# ---- validators: they raise ValueError("<field> ..."), the convention StoreConfig uses --------


def _between(low: int, high: int) -> Callable[[Any, attrs.Attribute, int], None]:
    def check(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be between {low} and {high}, got {value}")

    return check


def _node_name(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if _NODE_NAME.fullmatch(value) is None:
        raise ValueError(
            f"{attribute.name} must be 1 to 64 characters from A-Z a-z 0-9 . _ - starting with "
            f"a letter or digit (it appears in logs, status and file names), got {value!r}"
        )


def _non_empty(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


# ---- sections --------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class NodeSection:
    """Who the node is and where it listens and keeps its data."""

    name: str = attrs.field(default="node-1", validator=_node_name)
    host: str = attrs.field(default="127.0.0.1", validator=_non_empty)
    port: int = attrs.field(default=7600, validator=_between(0, 65535))
    """0 picks a free port; the node reports the one it bound."""
    metrics_port: int = attrs.field(default=-1, validator=_between(-1, 65535))
    """HTTP ``/metrics`` (Prometheus) and ``/health`` on ``host``: -1 (the default) off,
    0 a free port (logged as ``metrics_listening``)."""
    data_dir: Path = attrs.field(default=Path("data"), converter=Path)
    """Holds ``store/`` (the log) and ``topics.json``."""


@attrs.frozen(kw_only=True)
class ServerSection:
    """Limits of the client server: they bound what one client can make the node hold."""

    max_frame_size: int = attrs.field(
        default=DEFAULT_MAX_FRAME_SIZE, validator=_between(MIN_MAX_FRAME_SIZE, MAX_FRAME_SIZE_LIMIT)
    )
    max_connections: int = attrs.field(default=10_000, validator=_between(1, 1_000_000))
    """At most this many client connections; lowered at start to what the process's
    open-file limit (``ulimit -n``) leaves after a reserve for the node's own files."""
    max_inflight_per_connection: int = attrs.field(default=1024, validator=_between(1, 65_536))
    """Requests of one connection being served or answered but not yet sent; past it the
    server stops reading that connection (TCP backpressure) instead of buffering."""
    shutdown_grace_ms: int = attrs.field(default=5000, validator=_between(0, 600_000))
    """How long a shutdown lets in-flight requests finish before closing connections."""
    max_connection_response_bytes: int = attrs.field(
        default=32 << 20, validator=_between(64 << 10, 1 << 32)
    )
    """Answers of one connection queued but not yet sent, in bytes: past it the server
    stops reading that connection's requests until the client reads (backpressure), so
    a client that pipelines large pulls and never reads cannot grow the node's memory."""
    max_buffered_response_bytes: int = attrs.field(
        default=512 << 20, validator=_between(64 << 10, 1 << 40)
    )
    """The same bound for all connections together."""
    max_buffered_request_bytes: int = attrs.field(
        default=256 << 20, validator=_between(64 << 10, 1 << 40)
    )
    """Bytes of large request frames being received, all connections together: a frame
    over 64 KiB reserves its size before its body is read, and waits (its connection is
    not read) while the budget is spent."""
    idle_timeout_ms: int = attrs.field(default=600_000, validator=_between(100, 86_400_000))
    """A connection with no request in flight that sends nothing for this long is closed
    (as Kafka's ``connections.max.idle.ms``): idle clients do not hold file descriptors
    forever. Clients reconnect on their next request."""
    tls_cert_file: str = ""
    """Client port: this node's certificate (PEM, chain included); with ``tls_key_file``
    the port speaks TLS only. Empty: plain TCP."""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    """Client port with TLS: also require client certificates signed by this CA."""

    def __attrs_post_init__(self) -> None:
        if self.tls is not None:  # loaded now: a wrong file stops the start, naming the key
            check_files(self.tls, mutual=False)

    @property
    def tls(self) -> TlsFiles | None:
        """The client port's TLS files, or None for plain TCP."""
        files = TlsFiles(
            cert_file=self.tls_cert_file, key_file=self.tls_key_file, ca_file=self.tls_ca_file
        )
        return files if files.enabled else None


@attrs.frozen(kw_only=True)
class TopicsSection:
    """How topics come to exist."""

    auto_create: bool = False
    """Create an unknown topic on its first send (with ``default_queues``) instead of
    answering ``UNKNOWN_TOPIC``. Off by default: a typo should not create a topic."""
    default_queues: int = attrs.field(default=4, validator=_between(1, MAX_QUEUES))


_ROLES: Final = ("master", "slave")


def _check_address(name: str, value: str) -> None:
    """A ``host:port`` setting, checked by the protocol's one address parser."""
    try:
        parse_address(value)
    except ValueError as exc:
        raise ValueError(f"{name} must be host:port with a port in 1..65535: {exc}") from None


def _one_of(choices: tuple[str, ...]) -> Callable[[Any, attrs.Attribute, str], None]:
    def check(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(choices)}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class ReplicationSection:
    """The node's place in a master/slave pair (RocketMQ style: the role is configured,
    not elected).

    A master opens the HA port (slaves stream its log from there) only when ``ha_port``
    is set: -1 (the default) means no slaves, so ``acks=replicated`` is refused; 0 picks
    a free port (reported in ``status``). A slave needs ``master_ha`` to replicate from
    and refuses writes with ``NOT_MASTER``, naming ``master_client`` so clients can
    resend without a lookup.
    """

    role: str = attrs.field(default="master", validator=_one_of(_ROLES))
    ha_host: str = ""
    """Where a master's HA listener binds; empty: the same host as ``node.host``."""
    ha_port: int = attrs.field(default=-1, validator=_between(-1, 65535))
    master_ha: str = ""
    """A slave's master HA address, ``"host:port"``."""
    master_client: str = ""
    """The master's client address ``"host:port"``: the hint a slave's ``NOT_MASTER`` carries."""
    min_insync_replicas: int = attrs.field(default=1, validator=_between(1, 255))
    """Connected slaves a master needs to accept ``acks=replicated`` (checked before
    appending, so a refused write is safe to resend)."""
    use_sendfile: bool = True
    """Master: stream segments with ``sendfile(2)`` (zero copy). False reads them into a
    buffer and sends that: the fallback for file systems or sandboxes where sendfile
    fails or is slow, kept behind a switch so it can be chosen without a code change."""
    max_lag_bytes: int = attrs.field(
        default=DEFAULT_MAX_LAG_BYTES, validator=_between(0, MAX_LAG_BYTES_LIMIT)
    )
    """Master: a slave further behind than this is out of sync (no longer holds back
    ``acks=replicated``)."""
    max_lag_ms: int = attrs.field(default=DEFAULT_MAX_LAG_MS, validator=_between(1, 3_600_000))
    """Master: a slave not caught up within this long is out of sync."""
    heartbeat_ms: int = attrs.field(default=DEFAULT_HEARTBEAT_MS, validator=_between(1, 600_000))
    """Both ends: the longest silence of a healthy peer (an ack or an empty chunk)."""
    peer_timeout_ms: int = attrs.field(
        default=DEFAULT_PEER_TIMEOUT_MS, validator=_between(1, 3_600_000)
    )
    """Both ends: silence after which the peer is given up; must exceed ``heartbeat_ms``
    or a healthy but idle peer would be dropped between two heartbeats."""
    slave_ack: str = attrs.field(default="write", validator=_one_of(SLAVE_ACK_MODES))
    """Slave: ``write`` acks what it has applied (in its page cache), ``durable`` only
    what its own fsync covers, so an acknowledged write survives the master and the
    slave losing power together (at one fsync per applied chunk)."""
    cluster_secret: str = attrs.field(default="", repr=False)
    """The secret every node of the cluster shares (at least 16 bytes): both ends of a
    replication stream prove they hold it before either believes the other. Prefer
    ``cluster_secret_file`` or ``TIDELOG_REPLICATION_CLUSTER_SECRET`` to writing it in
    a config file others can read. Empty (with no file): the HA port believes anyone
    who reaches it, and the node logs a warning saying so."""
    cluster_secret_file: str = ""
    """A file holding the cluster secret (surrounding whitespace ignored), read at start."""
    max_peers: int = attrs.field(default=DEFAULT_MAX_PEERS, validator=_between(1, 10_000))
    """Master: replication connections held at once (slaves and handshakes); lowered to
    what the open-file limit leaves; more are closed as they arrive."""
    tls_cert_file: str = ""
    """HA port: mutual TLS with ``tls_key_file`` and ``tls_ca_file`` (all three, on
    every node): each end presents its certificate and verifies the other's against
    the CA. Empty: plain TCP (the cluster secret still authenticates)."""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    tls_peer_names: bool = False
    """Master with TLS: a slave's certificate must name the node it claims to be (common
    name or DNS subject alternative name), so one member's certificate cannot pose as
    another. Needs a certificate per node."""

    def __attrs_post_init__(self) -> None:
        # Cross-field rules; each message starts with the key to blame (see _build).
        if self.tls is not None:
            check_files(self.tls, mutual=True)
        elif self.tls_peer_names:
            raise ValueError(
                "tls_peer_names needs TLS on the HA port: set tls_cert_file, tls_key_file "
                "and tls_ca_file"
            )
        if self.cluster_secret and self.cluster_secret_file:
            raise ValueError(
                "cluster_secret_file and cluster_secret are both set: keep one (the file "
                "keeps the secret out of the config and the environment)"
            )
        self._secret()  # a missing file or a short secret stops the start, naming the key
        if self.peer_timeout_ms <= self.heartbeat_ms:
            raise ValueError(
                f"peer_timeout_ms must exceed heartbeat_ms ({self.heartbeat_ms}), got "
                f"{self.peer_timeout_ms}: a peer silent between two heartbeats is healthy"
            )
        for name in ("master_ha", "master_client"):
            value = getattr(self, name)
            if value:
                _check_address(name, value)
        if self.role == "slave":
            if not self.master_ha:
                raise ValueError(
                    "master_ha must be set (host:port of the master's HA port) when role is slave"
                )
            if self.ha_port != -1:
                raise ValueError(f"ha_port is only for a master (role=master), got {self.ha_port}")
        elif self.master_ha or self.master_client:
            name = "master_ha" if self.master_ha else "master_client"
            raise ValueError(f"{name} is only for a slave (role=slave); a master leaves it empty")

    def _secret(self) -> bytes | None:
        """The cluster secret from wherever it is configured; ValueError naming the key."""
        if self.cluster_secret_file:
            try:
                return read_secret_file(self.cluster_secret_file)
            except ValueError as exc:
                raise ValueError(f"cluster_secret_file is unusable: {exc}") from None
        if not self.cluster_secret:
            return None
        try:
            return check_secret(self.cluster_secret.encode())
        except ValueError as exc:
            raise ValueError(f"cluster_secret is unusable: {exc}") from None

    @property
    def is_slave(self) -> bool:
        return self.role == "slave"

    @property
    def settings(self) -> ReplicationSettings:
        """The stream knobs of this section as the one value replication takes."""
        return ReplicationSettings(
            heartbeat_ms=self.heartbeat_ms,
            peer_timeout_ms=self.peer_timeout_ms,
            max_lag_bytes=self.max_lag_bytes,
            max_lag_ms=self.max_lag_ms,
            use_sendfile=self.use_sendfile,
            slave_ack=self.slave_ack,
            cluster_secret=self._secret(),
            max_peers=self.max_peers,
            tls=self.tls,
            tls_peer_names=self.tls_peer_names,
        )

    @property
    def tls(self) -> TlsFiles | None:
        """The HA port's TLS files, or None for plain TCP."""
        files = TlsFiles(
            cert_file=self.tls_cert_file, key_file=self.tls_key_file, ca_file=self.tls_ca_file
        )
        return files if files.enabled else None

    @property
    def serves_slaves(self) -> bool:
        """A master with an HA listener (and so replicated acks and bounded reads)."""
        return self.role == "master" and self.ha_port >= 0


_COORDINATION_DEFAULTS: Final = CoordinationSettings()


@attrs.frozen(kw_only=True)
class CoordinationSection:
    """Automatic failover through etcd (see :mod:`cluster.coordination`).

    ``etcd`` empty (the default): no etcd, the role is the configured one
    (``[replication] role``, promote and repoint by hand). Set, the role comes from the
    group's election: the static role keys are then refused (they contradict it), the
    node needs an HA port, and ``[replication] min_insync_replicas`` is what the group's
    first election records.
    """

    etcd: str = ""
    """Comma-separated etcd endpoints, ``http://host:port[,http://host:port...]``."""
    cluster: str = _COORDINATION_DEFAULTS.cluster
    group: str = _COORDINATION_DEFAULTS.group
    lease_ttl_s: int = _COORDINATION_DEFAULTS.lease_ttl_s
    keepalive_interval_s: float = _COORDINATION_DEFAULTS.keepalive_interval_s
    request_timeout_s: float = _COORDINATION_DEFAULTS.request_timeout_s
    fencing_margin_s: float = _COORDINATION_DEFAULTS.fencing_margin_s
    priority: int = attrs.field(default=0, validator=_between(-1000, 1000))
    """Breaks ties between equally good candidates: higher wins."""
    advertise_host: str = ""
    """The host other nodes and clients reach this node at, published in etcd with the
    client and HA ports. Empty (the default): the listen host (``[node] host``, and
    ``[replication] ha_host`` for the HA port). Required when that is a wildcard
    (``0.0.0.0``, ``::``), which nobody can connect to."""

    def __attrs_post_init__(self) -> None:
        if self.enabled:
            self.settings  # noqa: B018 -- builds and so validates the whole section

    @property
    def enabled(self) -> bool:
        return bool(self.etcd.strip())

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.etcd.split(",") if part.strip())

    @property
    def settings(self) -> CoordinationSettings:
        """The HA loop's settings (ValueError naming the key when one is wrong)."""
        try:
            return CoordinationSettings(
                etcd_endpoints=self.endpoints,
                cluster=self.cluster,
                group=self.group,
                lease_ttl_s=self.lease_ttl_s,
                keepalive_interval_s=self.keepalive_interval_s,
                request_timeout_s=self.request_timeout_s,
                fencing_margin_s=self.fencing_margin_s,
            )
        except ValueError as exc:
            raise ValueError(str(exc)) from None


def _store_for(data_dir: Path, **fields: Any) -> StoreConfig:
    return StoreConfig(data_dir=data_dir / STORE_SUBDIR, **fields)


@attrs.frozen(kw_only=True)
class NodeConfig:
    """Everything a node needs; build it with :func:`load_node_config` or :meth:`create`."""

    node: NodeSection
    store: StoreConfig
    server: ServerSection = attrs.field(factory=ServerSection)
    topics: TopicsSection = attrs.field(factory=TopicsSection)
    replication: ReplicationSection = attrs.field(factory=ReplicationSection)
    coordination: CoordinationSection = attrs.field(factory=CoordinationSection)

    def __attrs_post_init__(self) -> None:
        expected = self.node.data_dir / STORE_SUBDIR
        if self.store.data_dir != expected:
            raise ValueError(
                f"store.data_dir must be {expected} (<node.data_dir>/{STORE_SUBDIR}), "
                f"got {self.store.data_dir}"
            )
        problem = coordination_conflict(self.coordination, self.replication)
        if problem is not None:
            raise ValueError(problem)
        unpublishable = advertise_problem(self.node, self.replication, self.coordination)
        if unpublishable is not None:
            raise ValueError(unpublishable[1])

    @property
    def coordinated(self) -> bool:
        """The role comes from etcd's election (``[coordination] etcd`` is set)."""
        return self.coordination.enabled

    @classmethod
    def create(
        cls,
        data_dir: Path,
        *,
        node: Mapping[str, Any] | None = None,
        store: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
        topics: Mapping[str, Any] | None = None,
        replication: Mapping[str, Any] | None = None,
        coordination: Mapping[str, Any] | None = None,
    ) -> NodeConfig:
        """A config from Python values (tests, embedding); no environment, no file."""
        node_section = NodeSection(data_dir=data_dir, **(node or {}))
        return cls(
            node=node_section,
            store=_store_for(node_section.data_dir, **(store or {})),
            server=ServerSection(**(server or {})),
            topics=TopicsSection(**(topics or {})),
            replication=ReplicationSection(**(replication or {})),
            coordination=CoordinationSection(**(coordination or {})),
        )

    @property
    def ha_host(self) -> str:
        """The HA listener's host: ``replication.ha_host``, else ``node.host``."""
        return self.replication.ha_host or self.node.host

    @property
    def advertised_host(self) -> str:
        """The host this node publishes for its client port (etcd, ``metadata``)."""
        return self.coordination.advertise_host or self.node.host

    @property
    def advertised_ha_host(self) -> str:
        """The host this node publishes for its HA port."""
        return self.coordination.advertise_host or self.ha_host

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    @property
    def topics_path(self) -> Path:
        return self.node.data_dir / TOPICS_FILE


def coordination_conflict(
    coordination: CoordinationSection, replication: ReplicationSection
) -> str | None:
    """Why these two sections contradict each other, or None. With etcd the election
    decides the role, so the static role keys cannot be set, and the node needs an HA
    port (slaves stream from whoever is elected)."""
    if not coordination.enabled:
        return None
    static = [
        flag
        for flag, is_set in (
            ("replication.role=slave (--role)", replication.role == "slave"),
            ("replication.master_ha (--master-ha)", bool(replication.master_ha)),
            ("replication.master_client (--master-client)", bool(replication.master_client)),
        )
        if is_set
    ]
    if static:
        return (
            f"coordination.etcd (--etcd) and {', '.join(static)} contradict each other: with "
            "etcd the group elects its master; drop the static role setting(s) or --etcd"
        )
    if replication.ha_port < 0:
        return (
            "coordination.etcd (--etcd) needs replication.ha_port (--ha-port; 0 picks a free "
            "port): every node may become master and serve slaves"
        )
    return None


def advertise_problem(
    node: NodeSection, replication: ReplicationSection, coordination: CoordinationSection
) -> tuple[str, str] | None:
    """The dotted key and why this node cannot publish where it is reached, or None.
    With etcd a node publishes its addresses for the others and for clients; a wildcard
    listen address (all interfaces) names no host anyone can connect to."""
    if not coordination.enabled:
        return None
    advertised = coordination.advertise_host
    if advertised:
        if _is_wildcard(advertised):
            return "coordination.advertise_host", (
                f"coordination.advertise_host (--advertise-host) is {advertised!r}, a wildcard "
                "nobody can connect to: give the address other nodes and clients reach this "
                "node at"
            )
        return None
    for key, flag, host in (
        ("node.host", "--host", node.host),
        ("replication.ha_host", "--ha-host", replication.ha_host),
    ):
        if host and _is_wildcard(host):
            return key, (
                f"{key} ({flag}) is {host!r}, a wildcard listen address, and with "
                "coordination.etcd this node publishes its address in etcd for other nodes "
                "and clients, who "
                "cannot connect to a wildcard: pass --advertise-host "
                "(coordination.advertise_host) with the address they reach this node at"
            )
    return None


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False  # a name: resolved by whoever connects


# ---- the schema the loader reads: section -> key -> type --------------------------------------


def _field_types(cls: type, skip: frozenset[str] = frozenset()) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in attrs.fields(cls) if f.name not in skip}


_SECTIONS: Final[dict[str, dict[str, type]]] = {
    "node": _field_types(NodeSection),
    "store": _field_types(StoreConfig, frozenset({"data_dir"})),
    "server": _field_types(ServerSection),
    "topics": _field_types(TopicsSection),
    "replication": _field_types(ReplicationSection),
    "coordination": _field_types(CoordinationSection),
}
_ALL_KEYS: Final = [f"{section}.{key}" for section, keys in _SECTIONS.items() for key in keys]

_TYPE_NAMES: Final[dict[type, str]] = {
    int: "an integer",
    float: "a number",
    bool: "a boolean (true or false)",
    str: "a string",
    Path: "a path (string)",
}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _suggest(key: str, candidates: list[str]) -> str:
    """ "did you mean 'x'?" for a close match (by dotted key, then by bare name), else the
    list of what is allowed."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        by_name = {c.rsplit(".", 1)[-1]: c for c in candidates}
        names = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_name), n=1, cutoff=0.6)
        close = [by_name[names[0]]] if names else []
    if close:
        return f"did you mean {close[0]!r}?"
    return f"known keys: {', '.join(candidates)}"


def _unknown(source: str, key: str) -> ConfigError:
    """An unknown key or section, with the closest known one when there is one."""
    section, dot, _name = key.partition(".")
    if not dot:
        return ConfigError(source, key, f"keys belong in a section ({_suggest(key, _ALL_KEYS)})")
    if section not in _SECTIONS:
        return ConfigError(
            source,
            key,
            f"unknown section [{section}]; sections are {', '.join(_SECTIONS)} "
            f"({_suggest(key, _ALL_KEYS)})",
        )
    own = [f"{section}.{k}" for k in _SECTIONS[section]]
    close = difflib.get_close_matches(key, own, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else _suggest(key, _ALL_KEYS)
    return ConfigError(source, key, f"unknown key ({hint})")


def _coerce(source: str, key: str, kind: type, value: Any, *, text: bool) -> Any:
    """``value`` as ``kind``. TOML and Python values must already have the type (a quoted
    number in a TOML file is a mistake worth reporting); text from the environment or a
    flag (``text``) is parsed."""
    if text and isinstance(value, str) and kind is not str:
        return _parse_text(source, key, kind, value)
    ok = (
        (kind is bool and type(value) is bool)
        or (kind is int and type(value) is int)
        or (kind is float and type(value) in (int, float) and math.isfinite(value))
        or (kind is str and type(value) is str)
        or (kind is Path and isinstance(value, str | Path))
    )
    if not ok:
        raise ConfigError(
            source, key, f"must be {_TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__})"
        )
    if kind is Path:
        return Path(value)
    return float(value) if kind is float else value


def _parse_text(source: str, key: str, kind: type, text: str) -> Any:
    """Environment variables and flags arrive as text: parse them to the field's type."""
    stripped = text.strip()
    if kind is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
    elif kind is Path:
        if stripped:
            return Path(stripped)
    else:
        try:
            value = kind(stripped)
        except ValueError:
            value = None  # not a kind: reported below with what is allowed
        if value is not None and (kind is not float or math.isfinite(value)):
            return value
    allowed = "true/false, yes/no, on/off or 1/0" if kind is bool else _TYPE_NAMES[kind]
    raise ConfigError(source, key, f"must be {allowed}, got {text!r}")


# ---- the layers ------------------------------------------------------------------------------


@attrs.frozen
class _Layer:
    """One source of settings: dotted key -> (value, where it came from)."""

    values: dict[str, tuple[Any, str]]
    text: bool
    """Values are text to parse (environment, flags), not typed (TOML)."""


def _from_file(path: Path) -> _Layer:
    source = f"config file {path}"
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(source, "(file)", "no such file") from None
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"is not valid TOML: {exc}") from None
    values: dict[str, tuple[Any, str]] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise _unknown(source, section)
        if not table and section not in _SECTIONS:
            raise _unknown(source, f"{section}.")
        for key, value in table.items():
            values[f"{section}.{key}"] = (value, source)
    return _Layer(values, text=False)


def _from_environ(environ: Mapping[str, str]) -> _Layer:
    """``TIDELOG_<SECTION>_<KEY>`` for the known sections; other ``TIDELOG_*`` names are
    left alone (the CLI may have its own), but a known section with an unknown key is an
    error, so ``TIDELOG_SERVER_MAX_CONECTIONS`` does not pass unnoticed."""
    values: dict[str, tuple[Any, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section in _SECTIONS and key:
            values[f"{section}.{key}"] = (value, f"environment variable {name}")
    return _Layer(values, text=True)


def _from_overrides(overrides: Mapping[str, Any]) -> _Layer:
    return _Layer({key: (value, f"override {key}") for key, value in overrides.items()}, text=True)


def _typed(layers: list[_Layer]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Merge the layers (later wins), check every key and type; return values and sources."""
    values: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    sources: dict[str, str] = {}
    for layer in layers:
        for key, (value, source) in layer.values.items():
            section, _, name = key.partition(".")
            kind = _SECTIONS.get(section, {}).get(name)
            if kind is None:
                raise _unknown(source, key)
            values[section][name] = _coerce(source, key, kind, value, text=layer.text)
            sources[key] = source
    return values, sources


def _build(
    section: str, factory: Callable[..., Any], values: dict[str, Any], sources: dict[str, str]
) -> Any:
    """Build a section; a range error from its validators names the key and its source."""
    try:
        return factory(**values)
    except ValueError as exc:
        message = str(exc)
        name = message.split(" ", 1)[0]
        key = f"{section}.{name}" if name in _SECTIONS[section] else section
        # A cross-field error (role=slave without master_ha) blames a key nobody set:
        # name the source of the section's other settings instead of "defaults".
        source = sources.get(key) or next(
            (where for k, where in sources.items() if k.startswith(f"{section}.")), "defaults"
        )
        raise ConfigError(source, key, message) from None


def load_node_config(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Defaults < TOML file at ``path`` < ``TIDELOG_<SECTION>_<KEY>`` in ``environ``
    (default ``os.environ``) < ``overrides`` (dotted keys; text values are parsed).

    Raises :class:`ConfigError` naming the source, the dotted key and what is allowed.
    """
    layers = [
        _from_file(path) if path is not None else _Layer({}, text=False),
        _from_environ(os.environ if environ is None else environ),
        _from_overrides(overrides or {}),
    ]
    values, sources = _typed(layers)
    coordination = _build("coordination", CoordinationSection, values["coordination"], sources)
    if coordination.enabled and "node.name" not in sources:
        # With etcd the name identifies the member: the default "node-1" would collide
        # across nodes, so an unset name defaults to the data directory's name.
        values["node"]["name"] = _name_from_dir(values["node"].get("data_dir", Path("data")))
    node = _build("node", NodeSection, values["node"], sources)
    store = _build("store", lambda **kw: _store_for(node.data_dir, **kw), values["store"], sources)
    replication = _build("replication", ReplicationSection, values["replication"], sources)
    problem = None
    if coordination.enabled and "replication.role" in sources and not replication.master_ha:
        problem = (
            f"coordination.etcd (--etcd) and replication.role={replication.role} (--role, "
            f"from {sources['replication.role']}) contradict each other: with etcd the group "
            "elects its master; drop the role setting or --etcd"
        )
    problem = problem or coordination_conflict(coordination, replication)
    if problem is not None:
        source = sources.get("coordination.etcd", "defaults")
        raise ConfigError(source, "coordination.etcd", problem)
    unpublishable = advertise_problem(node, replication, coordination)
    if unpublishable is not None:
        key, problem = unpublishable
        raise ConfigError(sources.get(key, "defaults"), key, problem)
    return NodeConfig(
        node=node,
        store=store,
        server=_build("server", ServerSection, values["server"], sources),
        topics=_build("topics", TopicsSection, values["topics"], sources),
        replication=replication,
        coordination=coordination,
    )


def _name_from_dir(data_dir: Path) -> str:
    """A member name from the data directory's last component (its resolved name when
    that is ``.``), cut to the node-name rule; ``node-1`` if nothing usable is left."""
    raw = Path(data_dir).resolve().name
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", raw).lstrip("._-")[:64]
    return cleaned or "node-1"
