"""The node's request log: a key=value line per request when on, nothing when off."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.server.request_log import REQUEST_LOGGER, enable_request_log, logged
from tests.cluster.test_server import client, node_config, running

LINE = re.compile(
    r"request peer=127\.0\.0\.1:\d+ op=(\w+) topic=(\S+) status=(\w+) bytes=(\d+) "
    r"duration_us=(\d+)"
)


@pytest.fixture
def request_log() -> Iterator[None]:
    """The request log on for one test, off again after it."""
    enable_request_log()
    try:
        yield
    finally:
        logging.getLogger(REQUEST_LOGGER).setLevel(logging.NOTSET)


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str, int]]:
    found = []
    for record in caplog.records:
        if record.name == REQUEST_LOGGER:
            match = LINE.fullmatch(record.getMessage())
            assert match is not None, record.getMessage()
            op, topic, status, size, _duration = match.groups()
            found.append((op, topic, status, int(size)))
    return found


async def test_every_request_gets_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, request_log: None
) -> None:
    caplog.set_level(logging.WARNING)  # the root stays quiet; the request log is on by itself
    caplog.handler.setLevel(logging.DEBUG)
    async with running(node_config(tmp_path)) as node, client(node) as c:
        await c.ok("create_topic", topic="t", queues=1)
        await c.ok("send", topic="t", body=b"x" * 100)  # durable: answered later
        await c.ok("pull", topic="t", queue=0, offset=1, wait_ms=1)  # a long poll: later
        await c.call("pull", topic="nope", queue=0, offset=0)
        await c.ok("status")
    seen = lines(caplog)
    assert [(op, topic, status) for op, topic, status, _size in seen] == [
        ("create_topic", "t", "OK"),
        ("send", "t", "OK"),
        ("pull", "t", "OK"),
        ("pull", "nope", "UNKNOWN_TOPIC"),
        ("status", "-", "OK"),
    ]
    # The answer's frame size; 0 for a request that raised (the connection answers it).
    assert [size > 0 for *_request, size in seen] == [True, True, True, False, True]


async def test_off_by_default_and_then_the_handler_is_not_wrapped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.setLevel(logging.DEBUG)
    async with running(node_config(tmp_path)) as node, client(node) as c:
        assert node.handler is not None
        assert logged(node.handler, "peer") is node.handler  # nothing per request when off
        await c.ok("create_topic", topic="t", queues=1)
        await c.ok("send", topic="t", body=b"x")
    assert lines(caplog) == []
