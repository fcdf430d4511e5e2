"""The image on the Dockerfile's default base, the official ``python:3.11-slim``.

Where no registry can be reached the other docker tests build on a debootstrap base, and
this one is skipped with the pull's error as the reason (``pytest -ra`` shows it). On a
machine with a registry it builds the image on the official base and checks it like the
other: tidelog and etcd run as a non-root user, a node turns healthy and stops cleanly on
``docker stop``. ``TIDELOG_DOCKER_REQUIRE_OFFICIAL_BASE=1`` turns the skip into a failure
(for a CI machine that must run it).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tools.docker.engine import Engine, EngineError
from tools.docker.images import DEFAULT_BASE_IMAGE, BuildResult, build_image, image_exists

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _docker(engine: Engine, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], env=engine.env, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def official_base_image(docker_engine: Engine) -> Iterator[BuildResult]:
    if not image_exists(docker_engine, DEFAULT_BASE_IMAGE):
        pulled = _docker(docker_engine, "pull", DEFAULT_BASE_IMAGE)
        if pulled.returncode != 0:
            reason = (
                f"{DEFAULT_BASE_IMAGE} cannot be pulled here (no registry reachable): "
                f"{pulled.stderr.strip()[-500:]}"
            )
            if os.environ.get("TIDELOG_DOCKER_REQUIRE_OFFICIAL_BASE") == "1":
                pytest.fail(reason, pytrace=False)
            pytest.skip(reason)
    try:
        result = build_image(
            docker_engine, tag=f"tidelog:test-slim-{os.getpid()}", base_image=DEFAULT_BASE_IMAGE
        )
    except EngineError as error:
        pytest.fail(f"the image did not build on {DEFAULT_BASE_IMAGE}: {error}", pytrace=False)
    try:
        yield result
    finally:
        _docker(docker_engine, "image", "rm", result.tag)


def test_image_on_the_official_slim_base_runs_a_node_that_stops_cleanly(
    docker_engine: Engine, official_base_image: BuildResult
) -> None:
    tag = official_base_image.tag
    assert official_base_image.base_image == DEFAULT_BASE_IMAGE
    label = f"tidelog-test-slim-{os.getpid()}"
    run = ["run", "--rm", "--network", "none", "--label", label]
    try:
        assert _docker(docker_engine, *run, tag, "--version").stdout.startswith("tidelog ")
        assert "etcd Version" in _docker(docker_engine, *run, tag, "etcd", "--version").stdout
        uid = _docker(docker_engine, *run, "--entrypoint", "id", tag, "-u").stdout.strip()
        assert uid not in ("", "0")
        started = _docker(
            docker_engine, "run", "--detach", "--network", "none", "--label", label, tag,
            "node", "--name", "slim",
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        ident = started.stdout.strip()
        deadline = time.monotonic() + 90
        while (
            health := _docker(
                docker_engine, "inspect", "--format", "{{.State.Health.Status}}", ident
            ).stdout.strip()
        ) != "healthy":
            assert time.monotonic() < deadline, f"not healthy: {health}"
            time.sleep(0.2)
        assert _docker(docker_engine, "stop", "--time", "10", ident).returncode == 0
        state = json.loads(_docker(docker_engine, "inspect", ident).stdout)[0]["State"]
        assert state["ExitCode"] == 0, _docker(docker_engine, "logs", ident).stderr[-3000:]
    finally:
        ids = _docker(
            docker_engine, "ps", "--all", "--quiet", "--filter", f"label={label}"
        ).stdout.split()
        for ident in ids:
            _docker(docker_engine, "rm", "--force", "--volumes", ident)
