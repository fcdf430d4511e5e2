"""Process faults on a child the harness started: kill (SIGKILL), pause/resume
(SIGSTOP/SIGCONT), restart with the same data, and pause-then-kill.

Signals go through a pidfd opened on the target's current PID, so a recycled PID can never
be hit by mistake once the pidfd is open; each fault returns only once its effect holds
(the process has exited, or the kernel reports it stopped), so callers synchronise on the
fault itself instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import trio

from tools.faults.base import Fault

__all__ = [
    "Kill",
    "NodeProcessTarget",
    "Pause",
    "PauseThenKill",
    "ProcessTarget",
    "Restart",
    "sigkill",
    "wait_exited",
    "wait_stopped",
]

STATE_POLL_S = 0.005
"""How often /proc is re-read while waiting for a stop or continue to take effect (the
kernel offers no event for a job-control stop of a process we did not start ourselves)."""


class ProcessTarget(Protocol):
    """What the faults act on: the child's current PID (``None`` when not running) and a
    way to start it again on the same data directory."""

    @property
    def pid(self) -> int | None: ...

    async def restart(self) -> None: ...


class NodeProcessTarget:
    """Adapts :class:`tools.process.NodeProcess` (or anything with ``.process`` and a
    blocking ``start()``) to :class:`ProcessTarget`; restarts run in a thread."""

    def __init__(self, node: object, *, start_timeout_s: float = 30.0) -> None:
        self.node = node
        self.start_timeout_s = start_timeout_s

    @property
    def pid(self) -> int | None:
        process = getattr(self.node, "process", None)
        if process is None or process.poll() is not None:
            return None
        return int(process.pid)

    async def restart(self) -> None:
        process = getattr(self.node, "process", None)
        if process is not None:
            await trio.to_thread.run_sync(process.wait)  # reap the killed child first
        start: Callable[..., object] = self.node.start  # type: ignore[attr-defined]
        await trio.to_thread.run_sync(lambda: start(timeout=self.start_timeout_s))

    def __repr__(self) -> str:
        return f"node:{getattr(self.node, 'name', '?')}"


def _checked_pid(target: ProcessTarget) -> int:
    pid = target.pid
    if pid is None:
        raise RuntimeError(f"process fault on {target!r}: it is not running (start it first)")
    if pid <= 1 or pid == os.getpid():
        raise RuntimeError(f"process fault refuses pid={pid}: not a child the harness started")
    return pid


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat, or None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


async def wait_stopped(pid: int, *, stopped: bool = True, timeout_s: float = 10.0) -> None:
    """Return once the process is job-control stopped (``T``), or running again."""
    with trio.fail_after(timeout_s):
        while True:
            state = _proc_state(pid)
            if state is None or (state == "T") == stopped:
                return
            await trio.sleep(STATE_POLL_S)


async def wait_exited(pidfd: int, *, timeout_s: float = 30.0) -> None:
    """A pidfd turns readable when its process exits; no polling needed."""
    with trio.fail_after(timeout_s):
        await trio.lowlevel.wait_readable(pidfd)


async def _signal(
    target: ProcessTarget, signum: signal.Signals, after: Callable[[int, int], Awaitable[None]]
) -> int:
    pid = _checked_pid(target)
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signum)
        await after(pid, pidfd)
    finally:
        os.close(pidfd)
    return pid


async def _until_exited(pid: int, pidfd: int) -> None:
    await wait_exited(pidfd)


async def _until_stopped(pid: int, pidfd: int) -> None:
    await wait_stopped(pid)


async def _until_running(pid: int, pidfd: int) -> None:
    await wait_stopped(pid, stopped=False)


async def sigkill(target: ProcessTarget) -> int:
    """SIGKILL the target and return its PID once it has exited."""
    return await _signal(target, signal.SIGKILL, _until_exited)


class Kill(Fault):
    """SIGKILL the target (a crash: nothing flushed by the process); ``heal()`` restarts
    it on the same data when ``restart_on_heal`` (the default)."""

    kind = "kill"

    def __init__(self, target: ProcessTarget, *, restart_on_heal: bool = True) -> None:
        super().__init__()
        self.target = target
        self.restart_on_heal = restart_on_heal
        self.killed_pid: int | None = None

    def fields(self) -> dict[str, object]:
        return {"target": repr(self.target), "pid": self.killed_pid}

    async def _inject(self) -> None:
        self.killed_pid = await _signal(self.target, signal.SIGKILL, _until_exited)

    async def _heal(self) -> None:
        if self.restart_on_heal:
            await self.target.restart()


class Pause(Fault):
    """SIGSTOP the target (a GC pause, a VM freeze: sockets stay open, nothing answers);
    ``heal()`` sends SIGCONT."""

    kind = "pause"

    def __init__(self, target: ProcessTarget) -> None:
        super().__init__()
        self.target = target
        self.paused_pid: int | None = None

    def fields(self) -> dict[str, object]:
        return {"target": repr(self.target), "pid": self.paused_pid}

    async def _inject(self) -> None:
        self.paused_pid = await _signal(self.target, signal.SIGSTOP, _until_stopped)

    async def _heal(self) -> None:
        if self.target.pid is None or self.target.pid != self.paused_pid:
            return  # it died or was replaced while paused: nothing left to resume
        with contextlib.suppress(ProcessLookupError):
            await _signal(self.target, signal.SIGCONT, _until_running)


class PauseThenKill(Fault):
    """Freeze the target, hold it frozen for ``paused_s`` (so its lease can lapse and
    others act), then SIGKILL it while still frozen; ``heal()`` restarts it."""

    kind = "pause-then-kill"

    def __init__(self, target: ProcessTarget, *, paused_s: float = 0.0) -> None:
        super().__init__()
        assert paused_s >= 0, paused_s
        self.target = target
        self.paused_s = paused_s
        self.pid: int | None = None

    def fields(self) -> dict[str, object]:
        return {"target": repr(self.target), "pid": self.pid, "paused_s": self.paused_s}

    async def _inject(self) -> None:
        self.pid = await _signal(self.target, signal.SIGSTOP, _until_stopped)
        await trio.sleep(self.paused_s)
        await _signal(self.target, signal.SIGKILL, _until_exited)

    async def _heal(self) -> None:
        await self.target.restart()


class Restart(Fault):
    """Kill and start again on the same data in one step (a crash-restart); nothing to
    heal afterwards."""

    kind = "restart"

    def __init__(self, target: ProcessTarget) -> None:
        super().__init__()
        self.target = target
        self.old_pid: int | None = None

    def fields(self) -> dict[str, object]:
        return {"target": repr(self.target), "old_pid": self.old_pid, "pid": self.target.pid}

    async def _inject(self) -> None:
        self.old_pid = await _signal(self.target, signal.SIGKILL, _until_exited)
        await self.target.restart()

    async def _heal(self) -> None:
        return None
