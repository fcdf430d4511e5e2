"""The image's health check script (docker/healthcheck.py) against a real node on this
host: it speaks the wire protocol itself (so docker runs no CLI in every container every
2 s) and must say healthy exactly when the node answers ``status``."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import running_node

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "healthcheck.py"


def _check(host: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), host, str(port), "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_running_node_is_healthy(tmp_path: Path) -> None:
    with running_node(tmp_path / "node") as node:
        done = _check(node.host, node.port)
        assert done.returncode == 0, done.stderr


def test_no_node_is_unhealthy_and_says_why() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = _check("127.0.0.1", port)
    assert done.returncode == 1
    assert f"node 127.0.0.1:{port} did not answer status" in done.stderr


def test_something_else_than_a_node_is_unhealthy() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        checker = subprocess.Popen(
            [sys.executable, str(SCRIPT), "127.0.0.1", str(port), "5"],
            stderr=subprocess.PIPE,
            text=True,
        )
        connection, _ = server.accept()
        connection.close()  # hangs up without an answer
        _, stderr = checker.communicate(timeout=60)
    assert checker.returncode == 1
    assert f"node 127.0.0.1:{port} did not answer status" in stderr  # closed or reset
