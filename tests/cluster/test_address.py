"""The one host:port parser (cluster.protocol.address) and the places that use it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.node.config import ReplicationSection
from cluster.protocol import ProtocolError, Status, make_request
from cluster.protocol.address import format_address, is_address, parse_address


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:7600", ("127.0.0.1", 7600)),
        ("localhost:1", ("localhost", 1)),
        ("node-1.example:65535", ("node-1.example", 65535)),
        ("[::1]:7600", ("::1", 7600)),
        ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
    ],
)
def test_valid_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected
    assert is_address(address)


@pytest.mark.parametrize(
    ("address", "names"),
    [
        ("localhost", "has no port"),
        ("localhost:", "has no port after ':'"),
        ("[::1]", "has no port"),
        ("[::1", "no closing ']'"),
        (":7600", "has no host"),
        ("[]:7600", "has no host"),
        ("host:0", "invalid port 0 (must be 1..65535)"),
        ("host:99999", "invalid port 99999 (must be 1..65535)"),
        ("[::1]:65536", "invalid port 65536"),
        ("host:http", "the port 'http' is not a number"),
        ("host:-1", "the port '-1' is not a number"),
        ("host:٣", "the port '٣' is not a number"),  # a digit for str.isdigit, not a port
    ],
)
def test_invalid_addresses_say_what_is_wrong(address: str, names: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_address(address)
    assert names in str(error.value)
    assert repr(address) in str(error.value)
    assert not is_address(address)


@given(
    host=st.one_of(
        st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
        st.ip_addresses().map(str),
    ),
    port=st.integers(1, 65535),
)
def test_format_then_parse_roundtrips(host: str, port: int) -> None:
    assert parse_address(format_address(host, port)) == (host, port)


def test_node_config_names_what_is_wrong_with_an_address() -> None:
    with pytest.raises(ValueError, match=r"master_ha .*invalid port 99999"):
        ReplicationSection(role="slave", master_ha="127.0.0.1:99999")
    with pytest.raises(ValueError, match=r"master_client .*has no port"):
        ReplicationSection(role="slave", master_ha="127.0.0.1:7601", master_client="localhost")


def test_repoint_request_names_what_is_wrong_with_an_address() -> None:
    with pytest.raises(ProtocolError) as error:
        make_request("repoint", 1, master_ha="127.0.0.1:0")
    assert error.value.status is Status.BAD_REQUEST
    assert error.value.field == "master_ha"
    assert "invalid port 0" in error.value.message
