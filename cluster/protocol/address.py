"""``host:port`` addresses: one parser for the config, the client, the CLI and the launcher."""

from __future__ import annotations

__all__ = ["format_address", "is_address", "parse_address"]

_EXAMPLE = "use host:port, e.g. 127.0.0.1:7600 or [::1]:7600"


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:7600"``) -> ``(host, port)``.

    Raises ``ValueError`` naming what is wrong: a missing host or port, a port that is
    not a number, or one outside 1..65535.
    """
    if not isinstance(address, str):
        raise ValueError(f"address must be a text string host:port, got {type(address).__name__}")
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise ValueError(f"address {address!r}: the IPv6 host has no closing ']'; {_EXAMPLE}")
        host, rest = address[1:close], address[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"address {address!r} has no port; {_EXAMPLE}")
        port = rest[1:]
    else:
        host, sep, port = address.rpartition(":")
        if not sep:
            raise ValueError(f"address {address!r} has no port; {_EXAMPLE}")
    if not host:
        raise ValueError(f"address {address!r} has no host; {_EXAMPLE}")
    if not port:
        raise ValueError(f"address {address!r} has no port after ':'; {_EXAMPLE}")
    if not port.isascii() or not port.isdigit():
        raise ValueError(f"address {address!r}: the port {port!r} is not a number")
    number = int(port)
    if not 0 < number <= 65535:
        raise ValueError(f"address {address!r}: invalid port {number} (must be 1..65535)")
    return host, number


def is_address(value: str) -> bool:
    """True when :func:`parse_address` accepts ``value``."""
    try:
        parse_address(value)
    except ValueError:
        return False
    return True


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address` (brackets an IPv6 host)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
