"""The replication knobs as one frozen value, passed whole to the master's service, its
per-slave streams and the slave's client (instead of a keyword list per constructor).

The node builds it from its ``[replication]`` config section; tests and benchmarks build
it directly. Durations are milliseconds throughout (one unit per interface).
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from replication.auth import check_secret
from replication.insync import DEFAULT_MAX_LAG_BYTES, DEFAULT_MAX_LAG_MS
from replication.tls import TlsFiles

__all__ = [
    "DEFAULT_CONFIRM_DELAY_MS",
    "DEFAULT_HEARTBEAT_MS",
    "DEFAULT_MAX_LAG_BYTES",
    "DEFAULT_MAX_LAG_MS",
    "DEFAULT_MAX_PEERS",
    "DEFAULT_PEER_TIMEOUT_MS",
    "DEFAULT_POLL_INTERVAL_MS",
    "MAX_CHUNK",
    "SLAVE_ACK_MODES",
    "ReplicationSettings",
    "check_liveness",
]

DEFAULT_HEARTBEAT_MS: Final = 1_000
"""Longest silence of a healthy end: the slave re-sends its ack, the master an empty
chunk. Well under ``DEFAULT_PEER_TIMEOUT_MS`` so a few lost turns do not cut a stream."""
DEFAULT_PEER_TIMEOUT_MS: Final = 5_000
"""Silence after which an end gives the other up and closes the connection."""
DEFAULT_POLL_INTERVAL_MS: Final = 50.0
"""How long a caught-up sender waits for an arrival before looking at the log again. The
dispatcher's arrival event is the fast path; the poll covers appends whose dispatch was
folded into another task's (that one sets the event, but possibly before we waited)."""
DEFAULT_CONFIRM_DELAY_MS: Final = 2.0
"""How long a moved confirm offset waits for a chunk to ride on before the master sends
it to a slave on its own (see ``HAConnection.confirm_moved``)."""
MAX_CHUNK: Final = 1 << 20
"""Data bytes per chunk: the size the transfer benchmark found to be the knee (see
``transfer.DEFAULT_MAX_CALL``), and the slave's receive buffer size."""
DEFAULT_COLD_DISTANCE_BYTES: Final = 64 << 20
"""Bytes behind the log end past which a range is taken as no longer in the page cache."""
DEFAULT_MAX_PEERS: Final = 64
"""Connections the master's HA port holds at once (slaves and handshakes in progress);
lowered at start to what the open-file limit leaves. A pair or a small group needs a
handful; the rest is headroom for reconnects overlapping old connections."""
SLAVE_ACK_MODES: Final = ("write", "durable")
"""``write``: ack what is applied (page cache); ``durable``: ack only what is fsynced."""


def check_liveness(heartbeat_ms: float, peer_timeout_ms: float) -> None:
    """One rule for every end of a connection: both periods positive, and the peer timeout
    longer than the heartbeat (else a healthy, idle peer would be dropped)."""
    if heartbeat_ms <= 0 or peer_timeout_ms <= 0:
        raise ValueError("heartbeat_ms and peer_timeout_ms must be positive")
    if peer_timeout_ms <= heartbeat_ms:
        raise ValueError(
            f"peer_timeout_ms ({peer_timeout_ms}) must exceed heartbeat_ms ({heartbeat_ms})"
        )


def _positive(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _not_negative(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


def _secret(_inst: Any, _attribute: attrs.Attribute, value: bytes | None) -> None:
    if value is not None:
        check_secret(value)


def _mutual_tls(_inst: Any, _attribute: attrs.Attribute, value: TlsFiles | None) -> None:
    if value is not None and not (value.cert_file and value.key_file and value.ca_file):
        raise ValueError(
            "TLS on the replication port is mutual: set tls_cert_file, tls_key_file and "
            "tls_ca_file together (each node's certificate and key, signed by the CA)"
        )


def _slave_ack_mode(_inst: Any, _attribute: attrs.Attribute, value: str) -> None:
    if value not in SLAVE_ACK_MODES:
        raise ValueError(f"slave_ack must be one of {', '.join(SLAVE_ACK_MODES)}, got {value!r}")


@attrs.frozen(kw_only=True)
class ReplicationSettings:
    """How both ends of a replication stream behave. Immutable, so one value can be shared
    by every connection and task without locking.

    Invariants (checked on construction): every period is positive, ``peer_timeout_ms``
    exceeds ``heartbeat_ms`` and ``slave_ack`` is one of :data:`SLAVE_ACK_MODES`.
    """

    heartbeat_ms: float = attrs.field(default=DEFAULT_HEARTBEAT_MS, validator=_positive)
    """Both ends: the longest silence of a healthy peer (an ack or an empty chunk)."""
    peer_timeout_ms: float = attrs.field(default=DEFAULT_PEER_TIMEOUT_MS, validator=_positive)
    """Both ends: silence after which the peer is given up."""
    max_lag_bytes: int = attrs.field(default=DEFAULT_MAX_LAG_BYTES, validator=_not_negative)
    """Master: a slave further behind than this is out of sync."""
    max_lag_ms: float = attrs.field(default=DEFAULT_MAX_LAG_MS, validator=_not_negative)
    """Master: a slave not caught up within this long is out of sync."""
    use_sendfile: bool = True
    """Master: stream segments with ``sendfile(2)``; False copies through a buffer."""
    max_chunk: int = attrs.field(default=MAX_CHUNK, validator=_positive)
    """Data bytes per chunk (master) and the receive buffer's size (slave)."""
    poll_interval_ms: float = attrs.field(default=DEFAULT_POLL_INTERVAL_MS, validator=_positive)
    """Master: how long a caught-up sender waits before looking at the log again."""
    confirm_delay_ms: float = attrs.field(default=DEFAULT_CONFIRM_DELAY_MS, validator=_not_negative)
    """Master: how long a moved confirm offset waits to ride ahead of the next chunk
    before it goes to the slave in a frame of its own (0: at once). A slave's reads
    stop at the confirm offset it heard, so this bounds how much later than the
    master a record becomes readable there on an idle stream."""
    slave_ack: str = attrs.field(default="write", validator=_slave_ack_mode)
    """Slave: ``write`` acks what is applied, ``durable`` only what its fsync covers."""
    cold_distance_bytes: int = attrs.field(
        default=DEFAULT_COLD_DISTANCE_BYTES, validator=_not_negative
    )
    """Master: a sender further than this behind the log end reads each chunk in a
    worker thread first (cold pages), so ``sendfile`` never waits for the disk on the
    event loop (see :func:`replication.master.warm_pages`)."""

    cluster_secret: bytes | None = attrs.field(default=None, validator=_secret, repr=False)
    """Both ends: the secret every member of the cluster holds; each end of a stream
    proves it to the other (:mod:`replication.auth`) before anything it says counts.
    None: no authentication (any peer that reaches the HA port is believed; logged as a
    warning at start). Kept out of ``repr`` so it never reaches a log."""
    max_peers: int = attrs.field(default=DEFAULT_MAX_PEERS, validator=_positive)
    """Master: HA connections held at once; more are closed as they arrive."""
    tls: TlsFiles | None = attrs.field(default=None, validator=_mutual_tls)
    """Both ends: mutual TLS (:mod:`replication.tls`): each end presents its certificate
    and verifies the other's against the CA; the stream takes the copy path (no
    ``sendfile``: encryption happens in user space). None: plain TCP."""
    tls_peer_names: bool = False
    """Master with ``tls``: a slave's certificate must name the node it claims to be (its
    common name or a DNS subject alternative name), so one member's certificate cannot
    pose as another member. Needs a certificate per node."""

    def __attrs_post_init__(self) -> None:
        check_liveness(self.heartbeat_ms, self.peer_timeout_ms)
        if self.tls_peer_names and self.tls is None:
            raise ValueError("tls_peer_names needs TLS on the replication port (tls)")

    @property
    def check_interval_s(self) -> float:
        """Seconds between re-evaluations of the in-sync set: a quarter of the shorter of
        the lag bound and the heartbeat, so a drop-out is seen within 25% of it."""
        return max(min(self.max_lag_ms, self.heartbeat_ms) / 4000, 0.001)
