"""Shared test setup: hypothesis profiles and small-store fixtures.

Profiles: ``ci`` (default, small and deterministic) and ``chaos`` (long; select
with ``HYPOTHESIS_PROFILE=chaos``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "chaos",
    max_examples=2_000,
    stateful_step_count=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SMALL_SEGMENT = 64 * 1024
"""Tests use tiny segments so roll-overs, fillers and multi-segment scans happen often."""


@pytest.fixture
def store_config(tmp_path: Path):
    from storage import StoreConfig

    return StoreConfig(
        data_dir=tmp_path / "store",
        segment_size=SMALL_SEGMENT,
        max_message_size=16 * 1024,
        consume_queue_entries=64,
        flush_interval_ms=50,
        flush_thorough_interval_ms=200,
        retention_check_interval_ms=3_600_000,
    )
