"""etcd fixtures for the coordination tests: a real etcd on free loopback ports.

``etcd_endpoints``: one single-member etcd shared by a test module (tests isolate by key
prefix via ``key_prefix``). ``private_etcd``: an etcd of the test's own, for tests that
stop, kill or compact it. Every member is stopped by its PID, even when a test fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.launcher import EtcdCluster


@contextlib.contextmanager
def _running(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """``cluster`` started, and stopped by PID on exit even when starting failed halfway
    (a member may be up while another could not start)."""
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with _running(EtcdCluster(tmp_path_factory.mktemp("etcd"))) as cluster:
        yield cluster


@pytest.fixture
def etcd_endpoints(etcd_cluster: EtcdCluster) -> list[str]:
    return etcd_cluster.endpoints


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, so tests sharing an etcd never see each other."""
    return f"/test/{request.node.name}/"


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    with _running(EtcdCluster(tmp_path / "etcd")) as cluster:
        yield cluster


@pytest.fixture
def etcd_three(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A three-member etcd of the test's own, to test etcd's own faults."""
    with _running(EtcdCluster(tmp_path / "etcd3", size=3)) as cluster:
        yield cluster
