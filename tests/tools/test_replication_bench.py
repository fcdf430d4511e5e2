"""The catch-up bench runs end to end at a tiny size: every figure is reported, none is judged."""

from __future__ import annotations

import math
from pathlib import Path

from tools.bench.replication import parse_size, run_catchup_bench

MODES = ("catchup_sendfile", "catchup_copy", "raw_sendfile", "raw_copy")


async def test_catchup_bench_reports_every_figure(tmp_path: Path) -> None:
    messages: list[str] = []
    figures = await run_catchup_bench(
        tmp_path,
        3 * (1 << 20) + 12_345,  # not a multiple of the chunk: a short last chunk
        chunk=256 * 1024,
        progress=messages.append,
        segment_size=1 << 20,  # several segments: chunks restart at each file
        repeats=1,
        cold=True,
        verify=True,  # the receiver's CRC must match the log's, or the bench raises
    )
    for mode in (*MODES, "catchup_sendfile_cold", "catchup_copy_cold"):
        for figure in ("mb_per_s", "master_cpu_s_per_gib", "receiver_cpu_s_per_gib"):
            assert math.isfinite(figures[f"{mode}_{figure}"]), (mode, figure)
    for mode in ("catchup_sendfile", "catchup_copy"):
        assert f"{mode}_max_loop_stall_ms" in figures
    assert "disk_read_cold_mb_per_s" in figures
    assert figures["catchup_bytes"] == 3 * (1 << 20) + 12_345
    assert messages
    assert list(tmp_path.iterdir()) == []  # the segment files are cleaned up


def test_parse_size() -> None:
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5MiB") == 3 << 19
    assert parse_size("64KiB") == 65_536
    assert parse_size("1000") == 1000
