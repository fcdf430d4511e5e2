"""The checker proves it can fail: every anomaly, hand-made, is caught; clean histories pass."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import attrs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.tools.test_chaos_histories import HistoryBuilder, clean_history
from tools.chaos.checker import ERROR_KINDS, CheckResult, check
from tools.chaos.cli import format_verdict
from tools.chaos.history import CORRUPT_READ_PREFIX, Event, HistoryError, read_history
from tools.chaos.report import render_report
from tools.chaos.results import write_results

Q = "chaos:0"
CHUNKS = ["aa", "bb"]


def _clean_base() -> HistoryBuilder:
    """Two producers and one consumer on one queue, everything acked and read in order."""
    history = HistoryBuilder()
    history.master("n1", 1)
    history.send("producer-0", Q, "producer-0:0", 0)
    history.send("producer-1", Q, "producer-1:0", 1)
    history.send("producer-0", Q, "producer-0:1", 2)
    history.poll("consumer-0", Q, 0, [(0, "producer-0:0"), (1, "producer-1:0")])
    history.poll("consumer-0", Q, 2, [(2, "producer-0:1")])
    return history


LOG = [(0, "producer-0:0"), (1, "producer-1:0"), (2, "producer-0:1")]


def _finish(
    history: HistoryBuilder, master_log=LOG, replica_log=LOG, replica_chunks=CHUNKS
) -> None:
    history.drain(Q, "n1", "master", list(master_log))
    history.drain(Q, "n2", "replica", list(replica_log))
    history.digest("n1", "master", 2048, CHUNKS)
    history.digest("n2", "replica", 2048, list(replica_chunks))


def _errors(result: CheckResult) -> set[str]:
    return {k.kind for k in result.errors()}


def test_clean_history_passes() -> None:
    history = _clean_base()
    _finish(history)
    result = check(history.events)
    assert result.valid, result.errors()
    assert _errors(result) == set()
    assert result.queues[0].acked == 3
    assert result.queues[0].lost == 0
    assert result.kind("replica_unchecked").count == 0


def test_lost_tail_is_caught_from_acks_not_from_reads() -> None:
    """The acked tail nobody read is lost: a checker bounded by the highest read would miss it."""
    history = _clean_base()
    history.send("producer-1", Q, "producer-1:1", 3)
    ack_line = history.events[-1].line
    _finish(history)  # nobody read offset 3 and the drains end at 2
    result = check(history.events)
    assert not result.valid
    lost = result.kind("lost")
    assert lost.count == 1
    assert "producer-1:1" in lost.examples[0].summary
    [point] = result.lost
    assert point.position == "postfix"
    assert point.missing_on == ("n1", "n2")
    assert point.line == ack_line
    assert lost.examples[0].lines == (ack_line,)


def test_lost_positions_prefix_middle_postfix_and_per_node() -> None:
    history = HistoryBuilder()
    for i in range(5):
        history.send("producer-0", Q, f"producer-0:{i}", i)
    master = [(1, "producer-0:1"), (3, "producer-0:3")]
    replica = [(0, "producer-0:0"), (1, "producer-0:1"), (3, "producer-0:3")]
    history.drain(Q, "n1", "master", master)
    history.drain(Q, "n2", "replica", replica)
    result = check(history.events)
    positions = {p.message: (p.position, p.missing_on) for p in result.lost}
    assert positions == {
        "producer-0:0": ("prefix", ("n1",)),
        "producer-0:2": ("middle", ("n1", "n2")),
        "producer-0:4": ("postfix", ("n1", "n2")),
    }
    assert result.kind("lost").count == 3
    assert not result.valid


def test_durable_loss_excused_only_when_the_master_disk_was_lost() -> None:
    def run(disk_lost_on: str | None) -> CheckResult:
        history = HistoryBuilder()
        history.master("n1", 1)
        history.send("producer-0", Q, "producer-0:0", 0, acks="durable")
        history.send("producer-0", Q, "producer-0:1", 1, acks="durable")
        if disk_lost_on:
            history.nemesis("f1", "disk", "start", [disk_lost_on], disk_lost=True)
            history.nemesis("f1", "disk", "stop", [disk_lost_on])
        history.master("n2", 2)
        history.drain(Q, "n2", "master", [(0, "producer-0:0")])
        return check(history.events)

    plain = run(None)
    assert not plain.valid and plain.kind("lost").count == 1
    slave_disk = run("n3")
    assert not slave_disk.valid and slave_disk.kind("lost").count == 1
    master_disk = run("n1")
    assert master_disk.valid, master_disk.errors()
    assert master_disk.kind("lost_excused").count == 1
    assert master_disk.master_disk_lost_s is not None


def test_an_in_sync_loss_fails_the_run_even_when_the_master_disk_was_lost() -> None:
    """``in_sync`` holds a write on every in-sync slave: the master's disk is not its excuse."""
    history = HistoryBuilder()
    history.master("n1", 1)
    history.send("producer-0", Q, "producer-0:0", 0, acks="in_sync")
    history.send("producer-0", Q, "producer-0:1", 1, acks="in_sync")
    history.nemesis("f1", "disk", "start", ["n1"], disk_lost=True)
    history.nemesis("f1", "disk", "stop", ["n1"])
    history.master("n2", 2)
    history.drain(Q, "n2", "master", [(0, "producer-0:0")])
    result = check(history.events)
    assert not result.valid and result.kind("lost").count == 1


def test_leader_loss_is_reported_as_rpo_not_failure() -> None:
    history = HistoryBuilder()
    history.send("producer-0", Q, "producer-0:0", 0, acks="leader")
    history.send("producer-0", Q, "producer-0:1", 1, acks="leader")
    history.wait(2.0)
    history.send("producer-0", Q, "producer-0:2", 2, acks="leader")
    history.drain(Q, "n1", "master", [(0, "producer-0:0")])
    result = check(history.events)
    assert result.valid, result.errors()
    assert result.kind("lost_leader").count == 2
    assert result.rpo.messages == 2
    assert result.rpo.span_s > 2.0


def test_replicated_loss_fails_even_beside_leader_loss() -> None:
    history = HistoryBuilder()
    history.send("producer-0", Q, "producer-0:0", 0, acks="leader")
    history.send("producer-0", Q, "producer-0:1", 1, acks="replicated")
    history.drain(Q, "n1", "master", [])
    result = check(history.events)
    assert not result.valid
    assert result.kind("lost").count == 1
    assert result.kind("lost_leader").count == 1


def _caught(kind: str, history: HistoryBuilder) -> CheckResult:
    result = check(history.events)
    assert kind in _errors(result), result.errors()
    assert not result.valid
    summary = result.kind(kind)
    assert summary.examples and all(summary.examples[0].lines)
    return result


def test_duplicate() -> None:
    history = _clean_base()
    _finish(history, master_log=[*LOG, (3, "producer-1:0")])
    _caught("duplicate", history)


def test_inconsistent_offsets() -> None:
    history = _clean_base()
    swapped = [(0, "producer-0:0"), (1, "producer-0:1"), (2, "producer-0:1")]
    _finish(history, replica_log=swapped)
    result = _caught("inconsistent_offsets", history)
    assert "offset 1" in result.kind("inconsistent_offsets").examples[0].summary


def test_offset_mismatch() -> None:
    history = HistoryBuilder()
    history.send("producer-0", Q, "producer-0:0", 0)
    history.drain(Q, "n1", "master", [(0, "producer-1:9"), (1, "producer-0:0")])
    _caught("offset_mismatch", history)


def test_unexpected() -> None:
    history = _clean_base()
    _finish(history, master_log=[*LOG, (3, "phantom:1")])
    result = _caught("unexpected", history)
    assert "phantom:1" in result.kind("unexpected").examples[0].summary


def test_aborted_read() -> None:
    history = _clean_base()
    history.send("producer-1", Q, "producer-1:1", outcome="fail", error="NOT_MASTER")
    _finish(
        history, master_log=[*LOG, (3, "producer-1:1")], replica_log=[*LOG, (3, "producer-1:1")]
    )
    _caught("aborted_read", history)


def test_a_read_refused_as_corrupt_is_caught_and_other_failed_reads_are_not() -> None:
    history = _clean_base()
    value = {"queue": Q, "offset": 3}
    history.add("invoke", "consumer-0", "poll", value)
    history.add("fail", "consumer-0", "poll", value, node="n2", error="NOT_MASTER")
    history.add("invoke", "consumer-0", "poll", value)
    error = f"{CORRUPT_READ_PREFIX}a record of queue chaos:1 in a page of chaos:0"
    history.add("fail", "consumer-0", "poll", value, node="n2", error=error)
    _finish(history)
    result = _caught("corrupt_read", history)
    assert result.kind("corrupt_read").count == 1
    assert "from n2" in result.kind("corrupt_read").examples[0].summary


def test_recovered_and_indeterminate_are_not_errors() -> None:
    history = _clean_base()
    history.send("producer-1", Q, "producer-1:1", outcome="info", error="FLUSH_SLAVE_TIMEOUT")
    history.send("producer-1", Q, "producer-1:2", outcome="info", error="timeout")
    history.invoke_send("producer-0", Q, "producer-0:2")  # the producer crashed mid-send
    full = [*LOG, (3, "producer-1:1")]
    _finish(history, master_log=full, replica_log=full)
    result = check(history.events)
    assert result.valid, result.errors()
    assert result.kind("recovered").count == 1
    assert result.kind("indeterminate").count == 2


def test_vanished_read() -> None:
    """An unknown send read by a consumer, then gone from the final log: read past confirm."""
    history = _clean_base()
    history.send("producer-1", Q, "producer-1:1", outcome="info", error="FLUSH_SLAVE_TIMEOUT")
    history.poll("consumer-0", Q, 3, [(3, "producer-1:1")])
    _finish(history)
    result = _caught("vanished_read", history)
    assert result.kind("lost").count == 0  # never acked: only the read is wrong
    assert (
        "consumer-0 read producer-1:1 at offset 3"
        in result.kind("vanished_read").examples[0].summary
    )


def test_vanished_read_is_not_judged_after_the_master_disk_was_lost() -> None:
    history = _clean_base()
    history.send("producer-1", Q, "producer-1:1", outcome="info", error="timeout")
    history.poll("consumer-0", Q, 3, [(3, "producer-1:1")])
    history.nemesis("f1", "disk", "start", ["n1"], disk_lost=True)
    history.nemesis("f1", "disk", "stop", ["n1"])
    _finish(history)
    assert check(history.events).valid


def test_poll_skip() -> None:
    history = _clean_base()
    history.send("producer-0", Q, "producer-0:2", 3)
    history.send("producer-0", Q, "producer-0:3", 4)
    history.poll("consumer-0", Q, 3, [(4, "producer-0:3")])
    full = [*LOG, (3, "producer-0:2"), (4, "producer-0:3")]
    _finish(history, master_log=full, replica_log=full)
    result = _caught("poll_skip", history)
    assert "consumer-0" in result.kind("poll_skip").examples[0].summary


def test_nonmonotonic_poll() -> None:
    history = _clean_base()
    history.poll("consumer-0", Q, 3, [(1, "producer-1:0")])
    _finish(history)
    _caught("nonmonotonic_poll", history)


def test_nonmonotonic_send() -> None:
    history = HistoryBuilder()
    history.send("producer-0", Q, "producer-0:0", 1)
    history.send("producer-0", Q, "producer-0:1", 0)
    history.drain(Q, "n1", "master", [(0, "producer-0:1"), (1, "producer-0:0")])
    _caught("nonmonotonic_send", history)


def test_realtime_order_across_producers() -> None:
    history = HistoryBuilder()
    history.send("producer-0", Q, "producer-0:0", 1)  # acked before producer-1 sends
    history.send("producer-1", Q, "producer-1:0", 0)
    history.drain(Q, "n1", "master", [(0, "producer-1:0"), (1, "producer-0:0")])
    result = _caught("realtime_order", history)
    assert result.kind("nonmonotonic_send").count == 0


def test_concurrent_sends_may_take_either_order() -> None:
    history = HistoryBuilder()
    history.invoke_send("producer-0", Q, "producer-0:0")
    history.invoke_send("producer-1", Q, "producer-1:0")
    history.complete_send("producer-0", Q, "producer-0:0", offset=1)
    history.complete_send("producer-1", Q, "producer-1:0", offset=0)
    history.drain(Q, "n1", "master", [(0, "producer-1:0"), (1, "producer-0:0")])
    result = check(history.events)
    assert "realtime_order" not in _errors(result)


@pytest.mark.parametrize(
    ("replica_chunks", "end", "words"),
    [
        (["aa", "XX"], None, "bytes [1024, 2048) differ"),
        (CHUNKS, 1500, "short of the confirm offset 2048"),
    ],
)
def test_replica_divergence(replica_chunks: list[str], end: int | None, words: str) -> None:
    history = _clean_base()
    history.drain(Q, "n1", "master", LOG)
    history.digest("n1", "master", 2048, CHUNKS)
    history.digest("n2", "replica", 2048, replica_chunks, end=end)
    result = _caught("replica_divergence", history)
    assert words in result.kind("replica_divergence").examples[0].summary


def test_missing_master_drain_fails_instead_of_passing_silently() -> None:
    history = _clean_base()
    history.drain(Q, "n1", "master", LOG[:1], end=False)
    _caught("incomplete_drain", history)


def test_a_run_that_acked_nothing_fails() -> None:
    history = HistoryBuilder()
    history.send("producer-0", Q, "producer-0:0", outcome="fail")
    history.drain(Q, "n1", "master", [])
    _caught("nothing_acked", history)


def test_availability_windows_and_recovery_time() -> None:
    history = HistoryBuilder(step_s=0.1)
    history.master("n1", 1)
    history.send("producer-0", Q, "producer-0:0", 0)
    history.nemesis("f1", "kill", "start", ["n1"])  # t=0.4
    history.send("producer-0", Q, "producer-0:1", outcome="info")  # invoke t=0.6
    history.send("producer-0", Q, "producer-0:2", outcome="fail")
    history.master("n2", 2)
    history.send("producer-0", Q, "producer-0:3", 1)  # ok at t=1.2
    history.nemesis("f1", "kill", "stop", ["n1"])
    history.nemesis("f2", "pause", "start", ["n3"])
    history.nemesis("f2", "pause", "stop", ["n3"])
    history.send("producer-0", Q, "producer-0:4", outcome="fail")  # never recovered
    history.drain(Q, "n2", "master", [(0, "producer-0:0"), (1, "producer-0:3")])
    result = check(history.events)
    first, last = result.unavailability
    assert (first.start_s, first.end_s, first.fault_id) == (0.6, 1.2, "f1")
    assert first.duration_s == pytest.approx(0.6)
    assert last.end_s is None and last.fault_id == "f2"
    recoveries = {r.fault_id: r for r in result.recoveries}
    assert recoveries["f1"].recovery_s == pytest.approx(0.6)
    assert recoveries["f1"].windows == 1
    assert recoveries["f2"].recovery_s is None
    assert [m.master for m in result.master_changes] == ["n1", "n2"]
    assert [f.fault for f in result.faults] == ["kill", "pause"]


def test_a_window_opened_by_a_send_in_flight_belongs_to_the_fault_it_failed_under() -> None:
    """A send invoked before the fault and failing after it opens the fault's window: the
    fault must not read as "recovered in 0 s" (it did on the old code, the window having
    gone to the fault before, or to none)."""
    history = HistoryBuilder(step_s=0.1)
    history.master("n1", 1)
    history.send("producer-0", Q, "producer-0:0", 0)
    history.nemesis("f0", "pause", "start", ["n3"])
    history.nemesis("f0", "pause", "stop", ["n3"])
    history.invoke_send("producer-0", Q, "producer-0:1")  # in flight when f1 starts
    history.nemesis("f1", "kill", "start", ["n1"])
    history.wait(1.0)
    history.complete_send("producer-0", Q, "producer-0:1", outcome="info")
    history.master("n2", 2)
    history.send("producer-0", Q, "producer-0:2", 1)
    history.nemesis("f1", "kill", "stop", ["n1"])
    history.drain(Q, "n2", "master", [(0, "producer-0:0"), (1, "producer-0:2")])
    result = check(history.events)
    (window,) = result.unavailability
    assert window.fault_id == "f1"
    recoveries = {r.fault_id: r for r in result.recoveries}
    assert recoveries["f0"].windows == 0 and recoveries["f0"].recovery_s == 0.0
    assert recoveries["f1"].windows == 1
    recovery_s = recoveries["f1"].recovery_s
    assert recovery_s is not None and recovery_s > 1.0
    assert recovery_s == pytest.approx(window.duration_s)


def test_a_fault_that_could_not_start_is_no_fault_window_owner() -> None:
    """A refused start (the nemesis records it as info) injected nothing: the send failures
    after it belong to the fault actually in force, and it has no recovery of its own."""
    history = HistoryBuilder(step_s=0.1)
    history.master("n1", 1)
    history.send("producer-0", Q, "producer-0:0", 0)
    history.nemesis("f1", "kill", "start", ["n1"])
    refused = {"fault": "corrupt", "action": "start", "fault_id": "f2", "targets": ["n1"]}
    history.add("invoke", "nemesis", "nemesis", refused)
    history.add("info", "nemesis", "nemesis", refused, error="refusing to corrupt n1")
    history.send("producer-0", Q, "producer-0:1", outcome="fail")
    history.send("producer-0", Q, "producer-0:2", 1)
    history.nemesis("f1", "kill", "stop", ["n1"])
    history.drain(Q, "n1", "master", [(0, "producer-0:0"), (1, "producer-0:2")])
    result = check(history.events)
    assert [(f.fault_id, f.started) for f in result.faults] == [("f1", True), ("f2", False)]
    (window,) = result.unavailability
    assert window.fault_id == "f1"
    assert [r.fault_id for r in result.recoveries] == ["f1"]
    assert "1 (+1 that could not start) faults" in format_verdict(result)
    assert "1 fault(s) (+1 that could not start)" in render_report(history.events, result, {})


def test_malformed_send_value_names_its_line() -> None:
    history = HistoryBuilder()
    history.add("invoke", "producer-0", "send", {"queue": Q, "acks": "replicated"})
    with pytest.raises(HistoryError, match=r"history line 1: send invoke needs value.message"):
        check(history.events)


def test_a_timeout_recorded_as_fail_is_refused() -> None:
    history = HistoryBuilder()
    history.send("producer-0", Q, "producer-0:0", outcome="fail", error="FLUSH_SLAVE_TIMEOUT")
    with pytest.raises(
        HistoryError, match=r"history line 2: send failed with 'FLUSH_SLAVE_TIMEOUT'"
    ):
        check(history.events)


def test_results_json_round_trips(tmp_path) -> None:
    history = _clean_base()
    history.send("producer-1", Q, "producer-1:1", 3)
    _finish(history)
    result = check(history.events)
    path = write_results(tmp_path, result)
    data = json.loads(path.read_text())
    assert data["valid"] is False
    lost = next(k for k in data["kinds"] if k["kind"] == "lost")
    assert lost["count"] == 1 and lost["error"] is True


# --- generated histories --------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32), st.integers(10, 120), st.integers(1, 3))
def test_generated_clean_histories_pass(seed: int, steps: int, queues: int) -> None:
    result = check(clean_history(seed, steps=steps, queues=queues).events)
    assert result.valid, [(k.kind, k.examples[:1]) for k in result.errors()]


def test_a_generated_history_obeys_the_reader(tmp_path) -> None:
    history = clean_history(7, steps=200)
    path = tmp_path / "history.jsonl"
    history.write(path)
    assert read_history(path) == history.events


Injection = Callable[[list[Event]], bool]


def _value(event: Event) -> dict:
    return event.value


def _replace(events: list[Event], index: int, **value: object) -> None:
    events[index] = attrs.evolve(events[index], value=events[index].value | value)


def _master_drain(events: list[Event]) -> int | None:
    return next(
        (
            i
            for i, e in enumerate(events)
            if e.f == "drain" and e.type == "ok" and e.value["role"] == "master"
        ),
        None,
    )


def _acked(events: list[Event]) -> list[int]:
    return [i for i, e in enumerate(events) if e.f == "send" and e.type == "ok"]


def _inject_lost(events: list[Event]) -> bool:
    acked = _acked(events)
    if not acked:
        return False
    message = events[acked[0]].value["message"]
    for i, e in enumerate(events):
        if (
            e.f == "drain"
            and e.type == "ok"
            and e.value["queue"] == events[acked[0]].value["queue"]
        ):
            _replace(events, i, messages=[m for m in e.value["messages"] if m[1] != message])
    return True


def _append_to_master_drain(
    events: list[Event], message_of: Callable[[list[Event]], str | None]
) -> bool:
    message = message_of(events)
    if message is None:
        return False
    i = _master_drain(events)
    assert i is not None
    messages = events[i].value["messages"]
    _replace(events, i, messages=[*messages, [len(messages) + 1000, message]])
    return True


def _inject_duplicate(events: list[Event]) -> bool:
    i = _master_drain(events)
    assert i is not None
    messages = events[i].value["messages"]
    if not messages:
        return False
    _replace(events, i, messages=[*messages, [messages[-1][0] + 1, messages[0][1]]])
    return True


def _inject_inconsistent(events: list[Event]) -> bool:
    i = _master_drain(events)
    assert i is not None
    messages = events[i].value["messages"]
    if not messages:
        return False
    _replace(events, i, messages=[*messages, [messages[0][0], "phantom:0"]])
    return True


def _inject_offset_mismatch(events: list[Event]) -> bool:
    acked = _acked(events)
    if not acked:
        return False
    _replace(events, acked[0], offset=events[acked[0]].value["offset"] + 10_000)
    return True


def _failed_message(events: list[Event]) -> str | None:
    return next((e.value["message"] for e in events if e.f == "send" and e.type == "fail"), None)


def _inject_vanished(events: list[Event]) -> bool:
    read = [
        (e.value["queue"], m[1])
        for e in events
        if e.f == "poll" and e.type == "ok"
        for m in e.value["messages"]
    ]
    if not read:
        return False
    queue, message = read[-1]
    for i, e in enumerate(events):
        if e.f == "drain" and e.type == "ok" and e.value["queue"] == queue:
            _replace(events, i, messages=[m for m in e.value["messages"] if m[1] != message])
    return True


def _inject_poll_skip(events: list[Event]) -> bool:
    for i, e in enumerate(events):
        if e.f == "poll" and e.type == "ok" and len(e.value["messages"]) >= 2:
            _replace(events, i, messages=e.value["messages"][1:])
            return True
    return False


def _inject_nonmonotonic_poll(events: list[Event]) -> bool:
    for i, e in enumerate(events):
        if e.f == "poll" and e.type == "ok" and e.value["messages"]:
            _replace(events, i, messages=[e.value["messages"][0], *e.value["messages"]])
            return True
    return False


def _later_acked_pair(events: list[Event], same_producer: bool) -> tuple[int, int] | None:
    acked = _acked(events)
    for a in acked:
        for b in acked:
            ea, eb = events[a], events[b]
            same = ea.process == eb.process
            if b > a and ea.value["queue"] == eb.value["queue"] and same == same_producer:
                invoke_b = max(
                    i
                    for i in range(b)
                    if events[i].process == eb.process and events[i].type == "invoke"
                )
                if invoke_b > a:
                    return a, b
    return None


def _swap_offsets(events: list[Event], same_producer: bool) -> bool:
    pair = _later_acked_pair(events, same_producer)
    if pair is None:
        return False
    a, b = pair
    offset_a, offset_b = events[a].value["offset"], events[b].value["offset"]
    _replace(events, a, offset=offset_b)
    _replace(events, b, offset=offset_a)
    return True


def _inject_divergence(events: list[Event]) -> bool:
    i = next(
        i
        for i, e in enumerate(events)
        if e.f == "digest" and e.type == "ok" and e.value["role"] == "replica"
    )
    _replace(events, i, chunks=["0" * 16, *events[i].value["chunks"][1:]])
    return True


def _inject_incomplete_drain(events: list[Event]) -> bool:
    if not _acked(events):
        return False
    queue = events[_acked(events)[0]].value["queue"]
    for i, e in enumerate(events):
        if (
            e.f == "drain"
            and e.type == "ok"
            and e.value["role"] == "master"
            and e.value["queue"] == queue
        ):
            _replace(events, i, end=False)
    return True


def _inject_corrupt_read(events: list[Event]) -> bool:
    """A poll answered with records the client refused (a CRC failure)."""
    for i, e in enumerate(events):
        if e.f == "poll" and e.type == "ok":
            value = {k: v for k, v in e.value.items() if k != "messages"}
            error = f"{CORRUPT_READ_PREFIX}record at queue offset 3 fails its CRC"
            events[i] = attrs.evolve(e, type="fail", value=value, error=error)
            return True
    return False


def _inject_nothing_acked(events: list[Event]) -> bool:
    for i in _acked(events):
        events[i] = attrs.evolve(events[i], type="info", error="timeout")
    return True


INJECTIONS: dict[str, Injection] = {
    "lost": _inject_lost,
    "duplicate": _inject_duplicate,
    "inconsistent_offsets": _inject_inconsistent,
    "offset_mismatch": _inject_offset_mismatch,
    "unexpected": lambda events: _append_to_master_drain(events, lambda _: "phantom:1"),
    "aborted_read": lambda events: _append_to_master_drain(events, _failed_message),
    "vanished_read": _inject_vanished,
    "poll_skip": _inject_poll_skip,
    "nonmonotonic_poll": _inject_nonmonotonic_poll,
    "nonmonotonic_send": lambda events: _swap_offsets(events, same_producer=True),
    "realtime_order": lambda events: _swap_offsets(events, same_producer=False),
    "replica_divergence": _inject_divergence,
    "corrupt_read": _inject_corrupt_read,
    "incomplete_drain": _inject_incomplete_drain,
    "nothing_acked": _inject_nothing_acked,
}


def test_every_error_kind_has_an_injection() -> None:
    assert set(INJECTIONS) == set(ERROR_KINDS)


@pytest.mark.parametrize("kind", sorted(INJECTIONS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(seed=st.integers(0, 2**32), steps=st.integers(30, 150))
def test_one_injected_anomaly_is_always_caught(kind: str, seed: int, steps: int) -> None:
    events = copy.deepcopy(clean_history(seed, steps=steps, queues=1, producers=2).events)
    assume(INJECTIONS[kind](events))
    result = check(events)
    assert not result.valid
    assert result.kind(kind).count >= 1, [(k.kind, k.count) for k in result.errors()]
