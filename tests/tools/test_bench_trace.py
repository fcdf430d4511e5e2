"""`tidelog bench produce --trace`: the hops of a write are recorded by real node
processes and joined by offset into a per-hop breakdown (figures are not judged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench.hops import breakdown

ROOT = Path(__file__).resolve().parents[2]


def test_breakdown_joins_client_master_and_slaves_by_offset() -> None:
    """Two writes (starting at 0 and 100, ending at 100 and 200) through a master and one
    slave: every hop is the difference of the times recorded for that write's offset."""
    sends = [(0, 1.000000, 1.001000), (100, 2.000000, 2.002000)]
    master = []
    slave = []
    for start, end, base, stretch in ((0, 100, 1.0, 1), (100, 200, 2.0, 2)):
        master += [
            ("m.admit", start, base + 10e-6 * stretch),
            ("m.wait", end, base + 20e-6 * stretch),
            ("m.arrival", end, base + 30e-6 * stretch),
            ("m.send:s1", end, base + 40e-6 * stretch),
            ("m.acked:s1", end, base + 100e-6 * stretch),
            ("m.confirmed", end, base + 110e-6 * stretch),
            ("m.released", end, base + 130e-6 * stretch),
        ]
        slave += [
            ("s.received", end, base + 60e-6 * stretch),
            ("s.applied", end, base + 70e-6 * stretch),
            ("s.ack", end, base + 80e-6 * stretch),
        ]
    hops = breakdown(sends, master, {"s1": slave})
    expected = {  # the median of (x, 2x) is 1.5x
        "client_to_admit": 15,
        "admit_to_wait": 15,
        "admit_to_arrival": 30,
        "arrival_to_first_send": 15,
        "arrival_to_last_send": 15,
        "send_to_slave_received": 30,
        "slave_received_to_applied": 15,
        "slave_applied_to_ack_sent": 15,
        "ack_sent_to_master_heard": 30,
        "last_heard_to_confirmed": 15,
        "confirmed_to_released": 30,
        "released_to_client": (870 + 1740) / 2,
        "total": 1500,
    }
    assert set(hops) == {f"{name}_p50_us" for name in expected}
    for name, value in expected.items():
        assert hops[f"{name}_p50_us"] == pytest.approx(value, abs=0.01), name


def test_the_send_calls_to_the_first_and_the_last_slave_are_timed() -> None:
    """Each send's call-to-return time, named by the order the sends began: the first
    call (here 100 us, as if the woken slave ran before it returned) and the last."""
    sends = [(0, 1.0, 1.001)]
    master = [
        ("m.admit", 0, 1.0001),
        ("m.wait", 100, 1.0002),
        ("m.arrival", 100, 1.0002),
        ("m.send:s2", 100, 1.0003),
        ("m.sent:s2", 100, 1.0004),
        ("m.send:s1", 100, 1.0004),
        ("m.sent:s1", 100, 1.00041),
    ]
    hops = breakdown(sends, master, {"s1": [], "s2": []})
    assert hops["first_send_call_p50_us"] == pytest.approx(100, abs=0.01)
    assert hops["last_send_call_p50_us"] == pytest.approx(10, abs=0.01)
    assert hops["arrival_to_last_send_p50_us"] == pytest.approx(200, abs=0.01)


def test_a_leader_write_is_joined_to_its_own_end_not_to_a_later_wait() -> None:
    """An ``acks=leader`` write records no wait: its end is where the next write starts
    (the join once took the next *wait*, a second later, and printed 1 s hops)."""
    sends = [(0, 1.0, 1.0005), (100, 2.0, 2.0005)]
    master = [
        ("m.admit", 0, 1.0001),
        ("m.arrival", 100, 1.0002),
        ("m.send:s1", 100, 1.0003),
        ("m.admit", 100, 2.0001),
        ("m.wait", 200, 2.0002),
        ("m.arrival", 200, 2.0002),
        ("m.send:s1", 200, 2.0003),
    ]
    hops = breakdown(sends[:1], master, {"s1": []})
    assert hops["admit_to_arrival_p50_us"] == pytest.approx(100, abs=0.01)
    assert hops["arrival_to_first_send_p50_us"] == pytest.approx(100, abs=0.01)
    assert "admit_to_wait_p50_us" not in hops
    assert "released_to_client_p50_us" not in hops


def test_the_sync_threads_fdatasync_is_placed_among_a_durable_writes_hops() -> None:
    """The fdatasync as the sync thread timed it (recorded by the write's wait, keyed by
    its end): when it began after the admit, its call, and its end to the wait resuming."""
    sends = [(0, 1.0, 1.001)]
    master = [
        ("m.admit", 0, 1.0001),
        ("m.wait", 100, 1.0002),
        ("m.sync_began", 100, 1.00018),
        ("m.sync_ended", 100, 1.00038),
        ("m.fsynced", 100, 1.00045),
    ]
    hops = breakdown(sends, master, {})
    assert hops["admit_to_sync_began_p50_us"] == pytest.approx(80, abs=0.01)
    assert hops["sync_call_p50_us"] == pytest.approx(200, abs=0.01)
    assert hops["sync_ended_to_fsynced_p50_us"] == pytest.approx(70, abs=0.01)
    assert hops["wait_to_fsynced_p50_us"] == pytest.approx(250, abs=0.01)


def test_a_write_the_master_never_saw_counts_only_in_the_total() -> None:
    hops = breakdown([(0, 1.0, 1.0005)], [("m.admit", 50, 1.0001)], {})
    assert hops == {"total_p50_us": pytest.approx(500)}


@pytest.mark.slow
def test_bench_produce_trace_reports_every_hop_of_a_replicated_ack() -> None:
    """Real processes: a master and one slave record their hops and write them at exit."""
    trace = ["--replicas", "1", "--acks", "in_sync,replicated", "--trace", "--seconds", "0.3"]
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "produce", *trace, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    for acks in ("in_sync", "replicated"):
        for hop in (
            "client_to_admit",
            "arrival_to_first_send",
            "send_to_slave_received",
            "slave_applied_to_ack_sent",
            "ack_sent_to_master_heard",
            "confirmed_to_released",
            "released_to_client",
            "total",
        ):
            assert figures[f"trace_1024B_{acks}_{hop}_p50_us"] > 0, (acks, hop)
    assert figures["trace_1024B_replicated_wait_to_fsynced_p50_us"] > 0
    assert figures["trace_1024B_replicated_sync_call_p50_us"] > 0


def test_trace_refuses_a_node_it_did_not_start() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "produce", "--trace", "-b", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode != 0
    assert "--trace starts its own nodes" in run.stderr
