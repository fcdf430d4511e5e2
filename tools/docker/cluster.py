"""A tidelog cluster in docker: ``docker/compose.yaml`` brought up as one compose project,
and the faults a chaos run needs, acting on its containers only.

``DockerCluster`` runs compose with the settings it is given (project name, host ports,
subnet, image) as environment variables, the same ones a user sets. Faults: ``kill`` /
``start`` / ``stop``, ``pause`` / ``unpause``, and two kinds of partition: ``isolate`` (a
container leaves the project network; ``heal`` puts it back at the same address and names)
and ``block`` (DROP rules in iptables' ``DOCKER-USER`` chain between two container
addresses, both ways; ``unblock`` deletes exactly those rules). ``down`` removes every
container, network and volume of the project by id, even after a failed ``up``.

Synchronous: called by pytest fixtures, the CLI and the chaos nemesis from a thread.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from tools.docker.engine import Engine, EngineError, compose_binary, ensure_compose
from tools.docker.images import DEFAULT_IMAGE, repository_root

__all__ = [
    "GROUP2_SERVICES",
    "NODE_SERVICES",
    "ClusterSettings",
    "ContainerInfo",
    "DockerCluster",
    "compose_file",
]

log = logging.getLogger(__name__)

NODE_SERVICES = ("node1", "node2", "node3")
"""The nodes of the first broker group (the only one without the ``groups2`` profile)."""
GROUP2_SERVICES = ("node4", "node5", "node6")
"""The nodes of the second broker group (profile ``groups2``)."""
_PROJECT_LABEL = "com.docker.compose.project"


def compose_file() -> Path:
    return repository_root() / "docker" / "compose.yaml"


@attrs.frozen(kw_only=True)
class ClusterSettings:
    """The compose variables of one cluster (docker/README.md documents each).

    ``groups``: 1, or 2 for the ``groups2`` profile (a second broker group of three
    nodes); ``node_ports`` holds one host port per node, three per group."""

    project: str = "tidelog"
    image: str = DEFAULT_IMAGE
    subnet: str = "10.213.7.0/24"
    bind: str = "127.0.0.1"
    groups: int = attrs.field(default=1, validator=attrs.validators.in_((1, 2)))
    node_ports: tuple[int, ...] = attrs.field()
    etcd_port: int = 2379
    etcd_members: int = 1
    min_insync_replicas: int = 1
    max_lag_ms: int = 10_000
    lease_ttl_s: int = 2
    keepalive_interval_s: float = 0.4
    etcd_request_timeout_s: float = 0.5
    group_names: tuple[str, str] = ("g1", "g2")

    @node_ports.default
    def _default_node_ports(self) -> tuple[int, ...]:
        return tuple(range(7601, 7601 + 3 * self.groups))

    @node_ports.validator
    def _check_node_ports(self, _attribute: object, ports: tuple[int, ...]) -> None:
        if len(ports) != 3 * self.groups:
            raise ValueError(f"{self.groups} group(s) need {3 * self.groups} node ports: {ports}")

    @property
    def node_services(self) -> tuple[str, ...]:
        return NODE_SERVICES + (GROUP2_SERVICES if self.groups == 2 else ())

    @property
    def profiles(self) -> tuple[str, ...]:
        return ("etcd3",) * (self.etcd_members == 3) + ("groups2",) * (self.groups == 2)

    def group_of(self, service: str) -> str:
        """The broker group of a node service."""
        return self.group_names[0] if service in NODE_SERVICES else self.group_names[1]

    def group_services(self, group: str) -> tuple[str, ...]:
        return tuple(s for s in self.node_services if self.group_of(s) == group)

    def environment(self) -> dict[str, str]:
        env = {
            "TIDELOG_DOCKER_PROJECT": self.project,
            "TIDELOG_IMAGE": self.image,
            "TIDELOG_PULL_POLICY": "never",
            "TIDELOG_SUBNET": self.subnet,
            "TIDELOG_BIND": self.bind,
            "TIDELOG_ETCD_PORT": str(self.etcd_port),
            "TIDELOG_MIN_INSYNC_REPLICAS": str(self.min_insync_replicas),
            "TIDELOG_MAX_LAG_MS": str(self.max_lag_ms),
            "TIDELOG_LEASE_TTL_S": str(self.lease_ttl_s),
            "TIDELOG_KEEPALIVE_INTERVAL_S": str(self.keepalive_interval_s),
            "TIDELOG_ETCD_REQUEST_TIMEOUT_S": str(self.etcd_request_timeout_s),
            "TIDELOG_GROUP": self.group_names[0],
            "TIDELOG_GROUP2": self.group_names[1],
        }
        for index, port in enumerate(self.node_ports, start=1):
            env[f"TIDELOG_NODE{index}_PORT"] = str(port)
        if self.etcd_members == 3:
            names = ("etcd1", "etcd2", "etcd3")
            env["TIDELOG_ETCD_INITIAL_CLUSTER"] = ",".join(f"{n}=http://{n}:2380" for n in names)
            env["TIDELOG_ETCD_ENDPOINTS"] = ",".join(f"http://{n}:2379" for n in names)
        return env

    def client_address(self, service: str) -> str:
        return f"{self.bind}:{self.node_ports[self.node_services.index(service)]}"


@attrs.frozen
class ContainerInfo:
    """One container of the project as docker sees it."""

    service: str
    container_id: str
    state: str
    health: str
    address: str


@attrs.define
class DockerCluster:
    """One compose project on ``engine``. Not safe for concurrent callers: the chaos
    nemesis and the test drive it from one thread at a time."""

    engine: Engine
    settings: ClusterSettings = attrs.field(factory=ClusterSettings)
    compose: Path = attrs.field(factory=compose_file)
    _blocks: dict[tuple[str, str], list[list[str]]] = attrs.field(factory=dict)
    _isolated: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    _ids: dict[str, str] = attrs.field(factory=dict)

    # ---- plumbing ---------------------------------------------------------------------

    @property
    def network(self) -> str:
        return f"{self.settings.project}_tidelog"

    @property
    def partition_comment(self) -> str:
        """The comment on this project's DOCKER-USER rules (``iptables -S`` shows it)."""
        return f"tidelog-docker-partition:{self.settings.project}"

    def _env(self) -> dict[str, str]:
        return {**self.engine.env, **self.settings.environment()}

    def _compose(self, *args: str, timeout_s: float = 300.0, check: bool = True) -> str:
        binary = compose_binary(self.engine.settings)
        if not binary.exists():
            binary = ensure_compose(self.engine.settings)
        profiles = [arg for name in self.settings.profiles for arg in ("--profile", name)]
        argv = [str(binary), "--file", str(self.compose), *profiles, *args]
        return _checked(argv, self._env(), timeout_s, check)

    def docker(self, *args: str, timeout_s: float = 120.0, check: bool = True) -> str:
        return _checked(["docker", *args], self.engine.env, timeout_s, check)

    # ---- lifecycle --------------------------------------------------------------------

    def up(self, timeout_s: float = 180.0) -> float:
        """Create and start everything, wait until every container is healthy; returns the
        seconds that took."""
        started = time.monotonic()
        self._ids.clear()
        try:
            self._compose(
                "up",
                "--detach",
                "--wait",
                "--wait-timeout",
                str(int(timeout_s)),
                timeout_s=timeout_s + 30,
            )
        except (EngineError, subprocess.TimeoutExpired) as error:
            raise EngineError(f"{error}\n{self.diagnose()}") from error
        took = time.monotonic() - started
        log.info("cluster_up project=%s took_s=%.1f", self.settings.project, took)
        return took

    def down(self) -> list[str]:
        """Remove every container, network and volume of the project, by id (also what a
        failed ``up`` left); lifts our iptables rules first. Returns the ids removed."""
        for a, b in list(self._blocks):
            self.unblock(a, b)
        self._ids.clear()
        self._compose(
            "down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, timeout_s=180
        )
        removed = []
        label = f"label={_PROJECT_LABEL}={self.settings.project}"
        for kind, listing, remove in (
            (
                "container",
                ["ps", "--all", "--quiet", "--filter", label],
                ["rm", "--force", "--volumes"],
            ),
            ("network", ["network", "ls", "--quiet", "--filter", label], ["network", "rm"]),
            ("volume", ["volume", "ls", "--quiet", "--filter", label], ["volume", "rm", "--force"]),
        ):
            for ident in self.docker(*listing).split():
                self.docker(*remove, ident, check=False)
                removed.append(f"{kind}:{ident}")
        return removed

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of the project that still exist."""
        label = f"label={_PROJECT_LABEL}={self.settings.project}"
        found = []
        for listing in (
            ["ps", "--all", "--quiet"],
            ["network", "ls", "--quiet"],
            ["volume", "ls", "--quiet"],
        ):
            found += self.docker(*listing, "--filter", label).split()
        return found

    # ---- inspection -------------------------------------------------------------------

    def container(self, service: str) -> str:
        """The container id of ``service`` (kept: a killed and restarted container keeps
        its id; ``up`` and ``down`` forget them)."""
        if service in self._ids:
            return self._ids[service]
        ident = self._compose("ps", "--all", "--quiet", service).strip()
        if not ident:
            raise EngineError(
                f"no container for service {service!r} in project {self.settings.project}"
            )
        self._ids[service] = ident.splitlines()[0]
        return self._ids[service]

    def inspect(self, service: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.docker("inspect", self.container(service)))
        return data[0]

    def info(self, service: str) -> ContainerInfo:
        data = self.inspect(service)
        state = data["State"]
        networks = data["NetworkSettings"]["Networks"]
        return ContainerInfo(
            service=service,
            container_id=data["Id"],
            state=state["Status"],
            health=state.get("Health", {}).get("Status", "none"),
            address=networks.get(self.network, {}).get("IPAddress", ""),
        )

    def status(self) -> list[ContainerInfo]:
        services = self._compose("ps", "--all", "--services").split()
        return [self.info(service) for service in services]

    def address(self, service: str) -> str:
        address = self.info(service).address or self._isolated.get(service, ("", ""))[0]
        if not address:
            raise EngineError(f"{service} has no address on {self.network}")
        return address

    def logs(self, service: str) -> str:
        """The container's output (stdout and stderr: the node logs to stderr)."""
        done = subprocess.run(
            ["docker", "logs", self.container(service)],
            capture_output=True,
            text=True,
            env=self.engine.env,
            timeout=60,
            check=False,
        )
        return done.stdout + done.stderr

    def diagnose(self, tail_chars: int = 2500) -> str:
        """Why a container is not healthy, for an error message: each container's state,
        exit code, OOM kill and last health check output, and the end of the log of each
        one that is not running and healthy."""
        lines = []
        label = f"label={_PROJECT_LABEL}={self.settings.project}"
        for ident in self.docker("ps", "--all", "--quiet", "--filter", label, check=False).split():
            try:
                data = json.loads(self.docker("inspect", ident))[0]
            except (EngineError, ValueError, IndexError):
                continue
            state = data["State"]
            service = data["Config"]["Labels"].get("com.docker.compose.service", ident)
            checks = (state.get("Health") or {}).get("Log") or [{}]
            health = (state.get("Health") or {}).get("Status", "none")
            lines.append(
                f"--- {service}: status={state['Status']} exit_code={state.get('ExitCode')} "
                f"oom_killed={state.get('OOMKilled')} error={state.get('Error')!r} "
                f"restarts={data.get('RestartCount')} started_at={state.get('StartedAt')} "
                f"finished_at={state.get('FinishedAt')} health={health} "
                f"last_check={str(checks[-1].get('Output', '')).strip()[-300:]!r}"
            )
            if state["Status"] == "running" and health in ("healthy", "none"):
                continue
            done = subprocess.run(
                ["docker", "logs", ident],
                capture_output=True,
                text=True,
                env=self.engine.env,
                timeout=60,
                check=False,
            )
            lines.append((done.stdout + done.stderr)[-tail_chars:])
        return "\n".join(lines)

    def wait_healthy(self, service: str, timeout_s: float = 60.0) -> float:
        """Poll docker's health status until ``healthy``; returns the seconds waited."""
        started = time.monotonic()
        while True:
            info = self.info(service)
            if info.health == "healthy":
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise EngineError(
                    f"{service} not healthy after {timeout_s:.0f} s: {info}; logs: {self.logs(service)[-2000:]}"
                )
            time.sleep(0.2)

    # ---- faults -----------------------------------------------------------------------

    def kill(self, service: str, signal: str = "KILL") -> None:
        self.docker("kill", "--signal", signal, self.container(service))

    def stop(self, service: str, timeout_s: int = 10) -> float:
        """``docker stop`` (SIGTERM, SIGKILL after ``timeout_s``); returns the seconds it took."""
        started = time.monotonic()
        self.docker(
            "stop", "--time", str(timeout_s), self.container(service), timeout_s=timeout_s + 60
        )
        return time.monotonic() - started

    def start(self, service: str) -> None:
        self.docker("start", self.container(service))

    def pause(self, service: str) -> None:
        self.docker("pause", self.container(service))

    def unpause(self, service: str) -> None:
        self.docker("unpause", self.container(service))

    def isolate(self, service: str) -> None:
        """Cut ``service`` off the project network (no traffic in or out, the host's
        published port included); ``heal`` reconnects it at the same address."""
        address = self.address(service)
        self.docker("network", "disconnect", self.network, self.container(service))
        self._isolated[service] = (address, service)

    def heal(self, service: str) -> None:
        address, alias = self._isolated.pop(service)
        self.docker(
            "network",
            "connect",
            "--ip",
            address,
            "--alias",
            alias,
            self.network,
            self.container(service),
        )

    def block(self, a: str, b: str) -> None:
        """Drop every packet between containers ``a`` and ``b`` (both ways) with rules in
        ``DOCKER-USER`` that match only their two addresses (the rules are kept, so
        ``unblock`` deletes exactly them even if an address changed meanwhile)."""
        rules = _block_rules(self.address(a), self.address(b), self.partition_comment)
        for rule in rules:
            _checked(["iptables", "-I", "DOCKER-USER", *rule], None, 30, True)
        self._blocks[(a, b)] = rules

    def unblock(self, a: str, b: str) -> None:
        for rule in self._blocks.pop((a, b), []):
            _checked(["iptables", "-D", "DOCKER-USER", *rule], None, 30, False)


def _block_rules(address_a: str, address_b: str, comment: str) -> list[list[str]]:
    return [
        [
            "-s",
            source,
            "-d",
            target,
            "-m",
            "comment",
            "--comment",
            comment,
            "-j",
            "DROP",
        ]
        for source, target in ((address_a, address_b), (address_b, address_a))
    ]


def _checked(
    argv: Sequence[str], env: Mapping[str, str] | None, timeout_s: float, check: bool
) -> str:
    done = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout_s,
        check=False,
    )
    if check and done.returncode != 0:
        raise EngineError(
            f"`{' '.join(argv)}` failed with exit code {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-3000:]}"
        )
    return done.stdout
