"""Fixtures of the docker tests: the engine (ours, started by PID, or one that already
runs), the tidelog image built with no network, and a helper that removes by id whatever
a test created even when it fails.

The engine must start: where it cannot, every docker test fails with the reason (never a
skip), so a machine without docker cannot pass the suite unnoticed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from tools.docker.engine import Engine, EngineError
from tools.docker.images import BuildResult, build_image


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    engine = Engine()
    try:
        engine.acquire()
    except (EngineError, OSError, subprocess.SubprocessError) as error:
        pytest.fail(
            "the docker tests need a Docker engine and could not start one "
            f"(run as root with apt access, or start dockerd first): {error}",
            pytrace=False,
        )
    try:
        yield engine
    finally:
        engine.release()  # stops a daemon this or another session started, when last


@pytest.fixture(scope="session")
def tidelog_image(docker_engine: Engine) -> Iterator[BuildResult]:
    """The image built from this tree; untagged at the end (its layers stay cached)."""
    _untag_images_of_dead_runs(docker_engine)
    try:
        result = build_image(docker_engine, tag=f"tidelog:test-{os.getpid()}")
    except EngineError as error:
        pytest.fail(f"the tidelog image did not build: {error}", pytrace=False)
    try:
        yield result
    finally:
        subprocess.run(
            ["docker", "image", "rm", result.tag],
            env=docker_engine.env,
            capture_output=True,
            check=False,
        )


def _untag_images_of_dead_runs(engine: Engine) -> None:
    """``tidelog:test-<pid>`` tags left by runs that were killed before their cleanup."""
    tags = subprocess.run(
        ["docker", "image", "ls", "tidelog", "--format", "{{.Tag}}"],
        env=engine.env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    for tag in tags:
        pid = tag.removeprefix("test-")
        if tag.startswith("test-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(
                ["docker", "image", "rm", f"tidelog:{tag}"],
                env=engine.env,
                capture_output=True,
                check=False,
            )


def free_host_ports(count: int) -> list[int]:
    """Ports that were free on 127.0.0.1 a moment ago, all different."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def free_subnet(engine: Engine) -> str:
    """A /24 of 10.213.0.0/16 that no docker network of this engine uses."""
    taken: set[str] = set()
    names = subprocess.run(
        ["docker", "network", "ls", "--quiet"],
        env=engine.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if names:
        inspected = json.loads(
            subprocess.run(
                ["docker", "network", "inspect", *names],
                env=engine.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for network in inspected:
            for config in (network.get("IPAM") or {}).get("Config") or []:
                if config.get("Subnet"):
                    taken.add(config["Subnet"])
    pool = list(ipaddress.ip_network("10.213.0.0/16").subnets(new_prefix=24))[8:]
    first = os.getpid() % len(pool)  # concurrent runs start their search apart
    for subnet in pool[first:] + pool[:first]:
        if str(subnet) not in taken:
            return str(subnet)
    raise EngineError("no free /24 left in 10.213.0.0/16")
