"""`tidelog bench scale` runs end to end with tiny numbers (figures are not judged)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools.bench.scale import ScaleSettings, producer_queues


def test_bench_scale_reports_every_figure_and_acks_messages() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "scale", "--json", "--seconds", "0.2",
         "--queues", "6", "--producers", "3", "--polls", "5", "--poll-connections", "2"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    for workload in ("scale_single_queue", "scale_many_queues", "scale_parked"):
        assert figures[f"{workload}_acked"] > 0, workload
        assert figures[f"{workload}_msgs_per_s"] > 0, workload
        for side in ("client", "node"):  # CPU ticks are 10 ms: a short run may count none
            assert figures[f"{workload}_{side}_cpu_us_per_msg"] >= 0, (workload, side)
    for ratio in ("scale_ratio", "scale_parked_ratio", "scale_parked_vs_many_queues_ratio"):
        assert figures[ratio] > 0, ratio
    for ratio in ("scale_node_cpu_ratio", "scale_parked_node_cpu_ratio"):
        assert ratio in figures  # NaN when a short run counted no CPU tick
    assert figures["scale_parked_polls_answered_with_messages"] == 0  # nobody writes there
    assert figures["node_rss_peak_mib"] >= figures["node_rss_anon_peak_mib"] > 0
    assert (figures["queues"], figures["producers"], figures["parked_polls"]) == (6, 3, 5)


@pytest.mark.parametrize(("producers", "queues"), [(3, 10), (200, 1000), (7, 7), (9, 4), (1, 1)])
def test_the_producers_together_write_every_queue(producers: int, queues: int) -> None:
    plans = [producer_queues(i, producers, queues) for i in range(producers)]
    assert sorted({q for plan in plans for q in plan}) == list(range(queues))
    sizes = [len(plan) for plan in plans]
    assert max(sizes) - min(sizes) <= 1


def test_settings_refuse_a_queue_count_a_topic_cannot_have() -> None:
    with pytest.raises(ValueError, match="--queues must be from 1 to 1024"):
        ScaleSettings(queues=2000)
    with pytest.raises(ValueError, match="--producers"):
        ScaleSettings(producers=0)
