"""Run a node as a real child process: start it, learn its port, stop it cleanly or kill it.

Used by the benchmarks and the end-to-end tests; the local-cluster launcher in
``tools/`` builds on it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from cluster.client import open_client

READY = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+)")


class NodeProcess:
    """A ``tidelog node`` child. ``start()`` returns once it listens (or raises with its stderr)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        name: str = "node-1",
        port: int = 0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_level: str = "WARNING",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.name = name
        self.port = port
        self.extra_args = list(extra_args)
        self.env = env
        self.log_level = log_level
        self.process: subprocess.Popen[str] | None = None
        self.host = "127.0.0.1"
        self._stderr: list[str] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> NodeProcess:
        command = [
            sys.executable, "-m", "tools.cli", "--log-level", self.log_level, "node",
            "--name", self.name, "--port", str(self.port), "--data-dir", str(self.data_dir),
            *self.extra_args,
        ]  # fmt: skip
        env = dict(os.environ, **(self.env or {}))
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        ready = threading.Event()
        line_holder: list[str] = []

        def read_ready() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                if READY.search(line):
                    line_holder.append(line)
                    ready.set()
                    return
            ready.set()

        threading.Thread(target=read_ready, daemon=True).start()
        if not ready.wait(timeout) or not line_holder:
            self.kill()
            raise RuntimeError(
                f"node {self.name} did not start within {timeout}s; stderr:\n"
                + "".join(self._stderr[-40:])
            )
        match = READY.search(line_holder[0])
        assert match is not None
        self.host, self.port = match["host"], int(match["port"])
        return self

    def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: a clean shutdown (flush, checkpoint). Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"node {self.name} ignored SIGTERM for {timeout}s") from None

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed by the node."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


async def node_status(address: str) -> dict[str, Any]:
    """The node's ``status`` answer, on a fresh connection (the node may have restarted)."""
    async with open_client(address) as client:
        return await client.admin.status()


async def wait_until(
    what: str,
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 15.0,
    interval: float = 0.02,
) -> None:
    """Poll ``check`` until it is true; raise ``TimeoutError`` naming ``what`` after
    ``timeout`` seconds. Another process's state offers no event to wait on, so this is
    the one bounded poll that tests, benchmarks and the demo share."""
    with trio.move_on_after(timeout):
        while not await check():
            await trio.sleep(interval)
        return
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
