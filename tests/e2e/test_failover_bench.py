"""`tidelog bench failover --kills 1 --json` as a real process (etcd, three nodes, one
master SIGKILL under acks=replicated): it reports the kill-to-new-master and the
kill-to-first-replicated-ack percentiles with the lease settings, loses no ack, and
leaves no process of its cluster behind."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

FIGURES = (
    "kill_to_new_master_p50_s",
    "kill_to_new_master_p99_s",
    "kill_to_first_replicated_ack_p50_s",
    "kill_to_first_replicated_ack_p99_s",
)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in command:
                found.append(int(entry.name))
    return found


def test_bench_failover_reports_percentiles_and_loses_nothing(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tools.cli", "bench", "failover", "--kills", "1", "--json"]
    run = subprocess.run(
        [*command, "--dir", str(tmp_path)], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout)
    assert figures["kills"] == 1
    for name in FIGURES:
        assert math.isfinite(figures[name]) and figures[name] > 0, (name, figures)
    assert figures["acked_lost"] == 0 and figures["acked_messages"] > 0
    assert figures["lease_ttl_s"] >= 2
    assert not list(tmp_path.iterdir())  # its temporary cluster directory is gone
    assert processes_mentioning(str(tmp_path)) == []  # every node and etcd stopped
