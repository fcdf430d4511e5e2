"""How a node reaches etcd and how fast leadership moves: one frozen, validated record.

The defaults aim at fast failover on one machine (a master's death is noticed within
the lease TTL, about 2 s) and obey Patroni's rule with the fencing margin included
(:func:`cluster.coordination.decisions.timing_problems`). On a real network raise
``request_timeout_s`` first, then the TTL.

etcd counts lease TTLs in whole seconds and raises any TTL below its minimum (1.5 x its
election timeout: 2 s with etcd's defaults) to that minimum, so a TTL of 1 s would
silently become 2 s; the validation refuses it for that reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import attrs

from cluster.coordination.decisions import timing_problems
from cluster.coordination.keys import ClusterKeys, check_name

__all__ = ["DEFAULT_ENDPOINTS", "MIN_LEASE_TTL_S", "CoordinationSettings"]

DEFAULT_ENDPOINTS = ("http://127.0.0.1:2379",)
MIN_LEASE_TTL_S = 2
"""etcd's smallest effective lease TTL with its default heartbeat and election timeout."""


def _endpoints(value: Iterable[str] | str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    return tuple(item.strip().rstrip("/") for item in items)


def _check_endpoints(_inst: Any, _attribute: Any, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("etcd endpoints must name at least one URL, e.g. http://127.0.0.1:2379")
    for endpoint in value:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(
                f"etcd endpoint {endpoint!r} must be http://host:port or https://host:port"
            )


def _name(kind: str) -> Any:
    def check(_inst: Any, _attribute: Any, value: str) -> None:
        check_name(kind, value)

    return check


@attrs.frozen
class CoordinationSettings:
    """Where etcd is, which cluster and group this node belongs to, and the HA timings.

    Invariant (checked at construction, with an error naming the fix):
    ``keepalive_interval_s + 2 x request_timeout_s + fencing_margin_s <= lease_ttl_s``
    and ``lease_ttl_s >= MIN_LEASE_TTL_S``.
    """

    etcd_endpoints: tuple[str, ...] = attrs.field(
        default=DEFAULT_ENDPOINTS, converter=_endpoints, validator=_check_endpoints
    )
    cluster: str = attrs.field(default="tidelog", validator=_name("cluster"))
    group: str = attrs.field(default="g1", validator=_name("group"))
    lease_ttl_s: int = 2
    keepalive_interval_s: float = 0.4
    request_timeout_s: float = 0.5
    fencing_margin_s: float = 0.2

    def __attrs_post_init__(self) -> None:
        if type(self.lease_ttl_s) is not int or self.lease_ttl_s < MIN_LEASE_TTL_S:
            raise ValueError(
                f"lease_ttl_s must be a whole number of seconds >= {MIN_LEASE_TTL_S} (etcd "
                f"raises smaller TTLs to its minimum), got {self.lease_ttl_s!r}"
            )
        problems = timing_problems(
            lease_ttl_s=self.lease_ttl_s,
            keepalive_interval_s=self.keepalive_interval_s,
            request_timeout_s=self.request_timeout_s,
            fencing_margin_s=self.fencing_margin_s,
        )
        if problems:
            raise ValueError("coordination settings: " + "; ".join(problems))

    @property
    def keys(self) -> ClusterKeys:
        return ClusterKeys(self.cluster)
