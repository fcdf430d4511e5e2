"""NodeProcess, the child-process handle every launcher builds on: a node that dies
before it listens is reported as exited, with its exit code and the end of its stderr."""

from __future__ import annotations

import subprocess
import sys
import threading
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


def test_a_killed_node_is_seen_exited_while_another_thread_polls_it(tmp_path: Path) -> None:
    """A chaos run's master observer polls each node from another thread; a poll that
    meets the other thread's poll answers "running", and a restart after a kill refused
    ("n1 is still running": seed 242 kept its master down 35 s). ``exited`` waits."""
    node = NodeProcess(tmp_path / "data")
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"], text=True)
    node.process = child
    try:
        child.kill()
        held: threading.Lock = child._waitpid_lock  # type: ignore[attr-defined]
        held.acquire()  # what another thread's poll holds meanwhile
        assert node.is_running()  # the quick look is fooled
        threading.Timer(0.2, held.release).start()  # that poll ends a moment later
        assert node.exited(timeout_s=10.0)
        assert not node.is_running()
    finally:
        child.kill()
        child.wait()
