"""``host:port`` addresses: one parser for the config, the client, the CLI and the launcher."""

from __future__ import annotations

__all__ = ["format_address", "is_address", "parse_address"]


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:7600"``) -> ``(host, port)``.

    Raises ``ValueError`` naming what is wrong: a missing port, a port that is not a
    number, or one outside 1..65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {address!r} must be host:port, e.g. 127.0.0.1:7600")
    if not port.isascii() or not port.isdigit():
        raise ValueError(f"address {address!r}: the port {port!r} is not a number")
    number = int(port)
    if not 0 < number <= 65535:
        raise ValueError(f"address {address!r}: invalid port {number} (must be 1..65535)")
    return host.strip("[]"), number


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
