"""The demo's automatic-failover part (part 3 of `make run`), bounded: real etcd and node
processes, the master SIGKILLed under acks=replicated, no operator."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.demo import automatic_failover


async def test_the_failover_demo_elects_keeps_every_ack_and_cuts_the_old_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verdict = await automatic_failover(tmp_path, 200)
    out = capsys.readouterr().out
    assert verdict == 0, out
    assert "elected master with no operator" in out
    assert "the producers found it on their own (yes)" in out
    assert out.count("acks checked, 0 missing") == 2, out  # both survivors
    assert "its divergent tail cut (log end" in out and "0 acks missing on it" in out
    for step in ("kill -> new master elected", "kill -> first replicated ack"):
        assert step in out
