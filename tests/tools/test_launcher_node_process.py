"""NodeProcess, the child-process handle every launcher builds on: a node that dies
before it listens is reported as exited, with its exit code and the end of its stderr."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tools.process import NodeProcess

CRASH = (sys.executable, "-c", "raise RuntimeError('boom before listening')")
"""A command prefix whose Python raises at once: a child that exits with a traceback."""


@pytest.mark.parametrize("to_file", [False, True], ids=["pipes", "log-file"])
def test_a_node_that_exits_before_listening_says_so_with_its_code_and_stderr(
    tmp_path: Path, to_file: bool
) -> None:
    """Used to say "did not start within 30.0s", as if it had hung."""
    log_path = tmp_path / "node.log" if to_file else None
    node = NodeProcess(tmp_path / "data", command_prefix=CRASH, log_path=log_path)
    with pytest.raises(RuntimeError) as raised:
        node.start(timeout=30.0)
    message = str(raised.value)
    assert "node node-1 exited with code 1 before it listened" in message
    assert "did not start within" not in message
    assert "Traceback (most recent call last)" in message
    assert message.rstrip().endswith("RuntimeError: boom before listening")
    assert not node.is_running()


def test_a_bad_argument_names_the_exit_code_of_the_refusal(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", extra_args=["--no-such-flag"])
    with pytest.raises(RuntimeError, match=r"exited with code 2 before it listened") as raised:
        node.start(timeout=30.0)
    assert "unrecognized arguments: --no-such-flag" in str(raised.value)
