"""Helpers several test modules share: the ``tidelog`` CLI as a subprocess and real node
processes and local clusters that are always stopped by their PID, even when the test fails."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import pytest
import trio

from tools.launcher import LocalCluster
from tools.launcher.cluster import read_state, stop_pids
from tools.process import READY, NodeProcess

CLI: Final = [sys.executable, "-m", "tools.cli"]


def tidelog(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``tidelog ARGS`` to completion (60 s at most), capturing its text output."""
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


@contextlib.contextmanager
def running_node(data_dir: Path) -> Iterator[NodeProcess]:
    """A ``tidelog node`` on ``data_dir`` with free ports; killed by its PID on exit."""
    process = NodeProcess(data_dir).start()
    try:
        yield process
    finally:
        process.kill()


@contextlib.asynccontextmanager
async def started(cluster: LocalCluster) -> AsyncIterator[LocalCluster]:
    """``cluster`` started (its etcd and nodes); stopped on exit, every process by its PID."""
    try:
        await trio.to_thread.run_sync(cluster.start)
        yield cluster
    finally:
        await trio.to_thread.run_sync(cluster.stop)


@contextlib.contextmanager
def cluster_dir_cleaned(root: Path) -> Iterator[Path]:
    """``root`` for a ``tidelog cluster up``; on exit, whatever its state file still names
    (nodes, etcd members) is stopped by PID, so a failed test leaves nothing running."""
    try:
        yield root
    finally:
        try:
            state = read_state(root)
        except (OSError, ValueError):  # never started, or its state is gone: nothing runs
            state = {"nodes": [], "etcd": {"pids": []}}
        stop_pids([(n["pid"], ("tools.cli", n["data_dir"])) for n in state["nodes"]])
        stop_pids([(pid, ("etcd", str(root))) for pid in state["etcd"]["pids"]])


@contextlib.contextmanager
def node_with_file_limit(
    data_dir: Path,
    nofile: int,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """A ``tidelog node`` whose open-file limit is ``nofile`` (set in the child before it
    runs), its client ``host:port`` and its stderr lines (read by a thread as they come);
    killed by its PID on exit."""

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    command = [
        *CLI, "--log-level", "INFO", "node", "--name", "limited", "--port", "0", *extra_args,
        "--data-dir", str(data_dir),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_files,
        env=None if env is None else {**os.environ, **env},
    )
    stderr: list[str] = []
    assert process.stdout is not None and process.stderr is not None
    threading.Thread(target=lambda: stderr.extend(process.stderr or ()), daemon=True).start()
    try:
        for line in process.stdout:
            if match := READY.search(line):
                break
        else:
            pytest.fail("the node did not start:\n" + "".join(stderr))
        yield process, f"{match['host']}:{match['port']}", stderr
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
