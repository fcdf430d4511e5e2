"""A slave whose ``master_ha`` names a node's client port says so, in its status and log,
instead of ``bad master hello magic 0x000000ed`` every two seconds (issue 15)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cluster.protocol import Status, encode_frame, error_response
from replication.wire import answered_like_a_client_port
from tests.cluster.test_server import node_config, running, until


def test_a_client_ports_error_frame_is_recognised_and_ha_frames_are_not() -> None:
    frame = encode_frame(error_response(0, Status.FRAME_TOO_LARGE, "frame of 1414285395 B"))
    assert answered_like_a_client_port(frame[:8])
    for magic in (0x544C484E, 0x544C4858, 0x544C484D):  # challenge, refusal, hello
        assert not answered_like_a_client_port(magic.to_bytes(4, "big") + b"\x00\x04")
    assert not answered_like_a_client_port(b"\x00\x00\x00\xed")  # too short to tell


async def test_a_slave_pointed_at_a_client_port_says_what_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fails on the old code: last_error was ``HAProtocolError('bad master hello magic
    0x000000ed (want 0x544c484e)')``."""
    caplog.set_level(logging.WARNING, logger="replication.slave")
    async with running(node_config(tmp_path / "master")) as master:
        assert master.address is not None
        client_port = "{}:{}".format(*master.address)
        slave_config = node_config(
            tmp_path / "slave", replication={"role": "slave", "master_ha": client_port}
        )
        async with running(slave_config) as slave:
            assert slave.slave is not None
            follower = slave.slave
            await until(lambda: follower.last_error is not None)
            assert follower.last_error is not None
            assert f"{client_port} answered like a tidelog client port, not an HA port" in (
                follower.last_error
            )
            assert "point master_ha at the master's HA port (replication.ha_port)" in (
                follower.last_error
            )
    assert any("answered like a tidelog client port" in r.getMessage() for r in caplog.records)
