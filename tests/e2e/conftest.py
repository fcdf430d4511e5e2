"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import started
from tools.launcher import LocalCluster

ETCD_TIMING = ("--heartbeat-interval", "50", "--election-timeout", "500")
"""etcd elects a new leader within about a second after losing one (defaults: 100/1000 ms)."""


@pytest.fixture
async def etcd3_cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    """Three nodes on a three-member etcd that re-elects its leader quickly; every process
    is stopped by its PID at the end, also on failure."""
    cluster = LocalCluster(tmp_path / "cluster", replicas=3, etcd_members=3, etcd_args=ETCD_TIMING)
    async with started(cluster):
        yield cluster
