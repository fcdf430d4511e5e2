"""Figures every benchmark reports: one percentile rule for all of them."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

__all__ = ["CpuMeter", "percentile", "process_cpu_s"]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (NaN when there are none)."""
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used (``/proc/<pid>/stat``, fields 14-15)."""
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")


@attrs.define
class CpuMeter:
    """CPU time per message of this process and of the node processes, over one workload.

    Wall-clock rates swing with whatever else the machine runs; CPU time per message
    barely does, so it is the figure to compare two builds by on a shared machine.
    """

    node_pids: Sequence[int]
    _client_s: float = 0.0
    _nodes_s: float = 0.0

    def start(self) -> None:
        self._client_s = time.process_time()
        self._nodes_s = sum(process_cpu_s(pid) for pid in self.node_pids)

    def per_message_us(self, messages: float) -> dict[str, float]:
        """``client`` and ``node`` (every node process summed) microseconds per message."""
        client_s = time.process_time() - self._client_s
        nodes_s = sum(process_cpu_s(pid) for pid in self.node_pids) - self._nodes_s
        figures = {"client": client_s / messages * 1e6 if messages else math.nan}
        if self.node_pids:
            figures["node"] = nodes_s / messages * 1e6 if messages else math.nan
        return figures
