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
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from cluster.client import open_client

READY = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+)")
EXIT_WAIT_S = 5.0
"""How long a child that closed its output without listening gets to exit (and its
stderr to be read whole) before the start error is raised."""


EXIT_GRACE_S = 2.0
"""How long a restart waits for a killed node's exit to be seen before refusing."""


class NodeProcess:
    """A ``tidelog node`` child. ``start()`` returns once it listens (or raises with its stderr).

    Invariant: the process this object signals is the one it started (by PID); ``start``
    may be called again after ``stop``/``kill`` (a restart on the same data directory and
    client port). Options for the local cluster launcher: ``host`` (``--host``),
    ``command_prefix`` (e.g. ``ip netns exec NS``), ``log_path`` (stdout and stderr go to
    that file instead of pipes, so the node outlives a parent that exits: ``cluster up
    --detach``) and ``new_session`` (a terminal's Ctrl-C reaches the parent only, which
    then stops the node in order). One owner drives it; not thread-safe.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        name: str = "node-1",
        port: int = 0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_level: str = "WARNING",
        host: str | None = None,
        command_prefix: Sequence[str] = (),
        log_path: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.name = name
        self.port = port
        self.extra_args = list(extra_args)
        self.env = env
        self.log_level = log_level
        self.process: subprocess.Popen[str] | None = None
        self.bind_host = host
        self.host = host or "127.0.0.1"
        self.command_prefix = list(command_prefix)
        self.log_path = log_path
        self.new_session = new_session
        self._stderr: list[str] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def is_running(self) -> bool:
        """A quick look: ``Popen.poll`` answers "running" while another thread is polling
        the same child, so a caller about to act on "not running" uses :meth:`exited`."""
        return self.process is not None and self.process.poll() is None

    def exited(self, timeout_s: float = EXIT_GRACE_S) -> bool:
        """Whether the process has exited (waiting up to ``timeout_s`` for it): a
        blocking ``wait`` is not fooled by another thread's concurrent ``poll``."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def command(self) -> list[str]:
        host = ["--host", self.bind_host] if self.bind_host else []
        return [
            *self.command_prefix,
            sys.executable, "-m", "tools.cli", "--log-level", self.log_level, "node",
            "--name", self.name, "--port", str(self.port), "--data-dir", str(self.data_dir),
            *host, *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> NodeProcess:
        if self.is_running():
            raise RuntimeError(f"node {self.name} is already running (pid {self.pid})")
        env = dict(os.environ, **(self.env or {}))
        self._stderr = []
        if self.log_path is not None:
            return self._start_logging_to_file(env, timeout)
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=self.new_session,
        )
        drainer = threading.Thread(target=self._drain_stderr, daemon=True)
        drainer.start()
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
        if ready.wait(timeout) and line_holder:
            self._ready(line_holder[0])
            return self
        # stdout ended without the ready line: the node is exiting (or it is just slow)
        exit_code = self._exit_code_soon() if ready.is_set() else None
        self.kill()
        drainer.join(EXIT_WAIT_S)  # the whole of stderr, up to the exit
        raise RuntimeError(
            self._not_started(timeout, exit_code) + "; stderr:\n" + "".join(self._stderr[-40:])
        )

    def _exit_code_soon(self) -> int | None:
        """The exit code of a child that closed its output, once it has exited (None if
        it still runs after EXIT_WAIT_S)."""
        assert self.process is not None
        try:
            return self.process.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return None

    def _not_started(self, timeout: float, exit_code: int | None) -> str:
        if exit_code is None:
            return f"node {self.name} did not start within {timeout}s"
        return f"node {self.name} exited with code {exit_code} before it listened"

    def _ready(self, line: str) -> None:
        match = READY.search(line)
        assert match is not None
        self.host, self.port = match["host"], int(match["port"])

    def _start_logging_to_file(self, env: dict[str, str], timeout: float) -> NodeProcess:
        """Start with stdout and stderr appended to ``log_path``; wait for the ready line
        written after this start. A file offers no event: a bounded poll."""
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            start_at = log_file.tell()
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
                start_new_session=self.new_session,
            )
        deadline = time.monotonic() + timeout
        written = ""
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as log_file:
                log_file.seek(start_at)
                written = log_file.read().decode("utf-8", "replace")
            for line in written.splitlines():
                if READY.search(line):
                    self._ready(line)
                    return self
            if not self.is_running():
                break
            time.sleep(0.02)
        exit_code = self.process.poll()
        self.kill()
        if exit_code is not None:  # what it wrote before exiting, all of it
            with self.log_path.open("rb") as log_file:
                log_file.seek(start_at)
                written = log_file.read().decode("utf-8", "replace")
        raise RuntimeError(
            f"{self._not_started(timeout, exit_code)}; its log {self.log_path}:\n"
            + "\n".join(written.splitlines()[-40:])
        )

    def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        if self.log_path is not None:
            try:
                return self.log_path.read_text(errors="replace")
            except FileNotFoundError:
                return ""
        return "".join(self._stderr)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: a clean shutdown (flush, checkpoint). Returns the exit code.
        A paused (SIGSTOPped) node is resumed first so the SIGTERM can land."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
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

    def pause(self) -> None:
        """SIGSTOP: the process freezes (a long GC pause, a VM stall) until :meth:`resume`."""
        if not self.is_running():
            raise RuntimeError(f"node {self.name} is not running")
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.is_running():
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)

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
