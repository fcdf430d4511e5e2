"""Judge a chaos history against the promises of docs/design.md, from the history alone.

Pure: :func:`check` takes the events of :mod:`tools.chaos.history` and returns a
:class:`CheckResult`; nothing here touches a node. What each anomaly means:

- ``lost``: acknowledged (send ``ok``) and absent from the master's final drain of its
  queue, from the producers' own acks (never bounded by the highest offset read). Each
  lost message is classed per producer and queue as ``prefix`` (before the producer's first
  surviving ack), ``middle`` or ``postfix`` (after its last surviving ack, or none survived),
  and lists the replicas whose drains lack it too. It fails the run at ``replicated`` and ``in_sync`` (every fault a run injects leaves an
  in-sync copy alive); at
  ``durable`` unless the master's disk was destroyed after the send (then ``lost_excused``);
  at ``leader`` it is ``lost_leader``, reported as the RPO (messages and time span).
- ``duplicate``: one message read at two queue offsets. ``inconsistent_offsets``: one
  offset holding two messages (reads and acks). ``offset_mismatch``: read at another offset
  than its ack said. ``unexpected``: read but never sent to that queue. ``aborted_read``:
  its send certainly failed, yet it was read. ``vanished_read``: a consumer read a message
  the master's final log lacks (it read past the confirm offset, or the log lost it; not
  judged once the master's disk was destroyed). ``recovered`` (not an error): an unknown send
  later read; ``indeterminate`` (not an error): an unknown send never read.
- ``poll_skip`` / ``nonmonotonic_poll``: a consumer's reads of a queue jump forward past an
  offset / go back or repeat. ``nonmonotonic_send``: a producer's acked offsets on a queue
  do not increase. ``realtime_order``: send A was acked before send B was invoked on the
  same queue, yet offset(A) >= offset(B).
- ``replica_divergence``: a replica's commit-log digest differs from the master's below the
  confirm offset, or it holds less than that.
- ``corrupt_read``: a poll or drain answer failed the client's record checks (CRC, sizes,
  another topic or queue, a gap in queue offsets): a node served bytes it must never
  serve. The reader keeps going, so the other checks still run.
- ``incomplete_drain``: the master's final drain of a queue with acked sends never finished,
  so loss cannot be judged (fails the run). ``nothing_acked``: no send was acknowledged, so
  the run tested nothing (fails the run).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from tools.chaos.history import CORRUPT_READ_PREFIX, Event, HistoryError, is_uncertain_error

__all__ = [
    "ERROR_KINDS",
    "INFO_KINDS",
    "Anomaly",
    "CheckResult",
    "FaultRecovery",
    "FaultWindow",
    "KindSummary",
    "LostPoint",
    "MasterChange",
    "QueueStats",
    "Rpo",
    "UnavailabilityWindow",
    "check",
]

ERROR_KINDS: Final = (
    "lost",
    "duplicate",
    "inconsistent_offsets",
    "offset_mismatch",
    "unexpected",
    "aborted_read",
    "vanished_read",
    "poll_skip",
    "nonmonotonic_poll",
    "nonmonotonic_send",
    "realtime_order",
    "replica_divergence",
    "corrupt_read",
    "incomplete_drain",
    "nothing_acked",
)
INFO_KINDS: Final = (
    "lost_excused",
    "lost_leader",
    "recovered",
    "indeterminate",
    "replica_unchecked",
)
MAX_EXAMPLES: Final = 5


@attrs.frozen
class Anomaly:
    """One finding: its kind, queue (if any), a sentence, and the history lines behind it."""

    kind: str
    queue: str | None
    summary: str
    lines: tuple[int, ...]


@attrs.frozen
class KindSummary:
    """All findings of one kind: whether it fails the run, how many, the first few."""

    kind: str
    error: bool
    count: int
    examples: tuple[Anomaly, ...]


@attrs.frozen
class LostPoint:
    """One acknowledged message missing from the master's final drain."""

    queue: str
    message: str
    producer: str
    acks: str
    ack_time_s: float
    position: str  # prefix | middle | postfix
    verdict: str  # lost | lost_excused | lost_leader
    missing_on: tuple[str, ...]  # nodes whose complete drain lacks it (master first)
    line: int


@attrs.frozen
class QueueStats:
    """Operation counts of one queue."""

    queue: str
    sends: int
    acked: int
    failed: int
    unknown: int
    read_distinct: int
    drained_on_master: int
    lost: int


@attrs.frozen
class FaultWindow:
    """A nemesis fault from its start invoke to its stop completion (None: never stopped).
    ``started`` is False when the fault could not be injected (its start did not succeed):
    it caused nothing, so no unavailability is laid at its door."""

    fault_id: str
    fault: str
    targets: tuple[str, ...]
    start_s: float
    stop_s: float | None
    line: int
    started: bool = True


@attrs.frozen
class UnavailabilityWindow:
    """From the first failed or unknown send after a success to the next success."""

    start_s: float
    end_s: float | None  # None: no send succeeded afterwards
    first_line: int
    end_line: int | None
    fault_id: str | None  # the latest fault started when its first failure was seen

    @property
    def duration_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s


@attrs.frozen
class FaultRecovery:
    """Recovery time of one fault: its first unavailability window's length (0: none)."""

    fault_id: str
    fault: str
    windows: int
    recovery_s: float | None  # None: never recovered
    unavailable_s: float | None  # all its windows together; None when one never closed


@attrs.frozen
class MasterChange:
    time_s: float
    master: str | None
    epoch: int | None
    line: int


@attrs.frozen
class Rpo:
    """Messages lost at ``leader`` acks and the ack-time span they cover."""

    messages: int
    span_s: float


@attrs.frozen
class CheckResult:
    """The verdict and everything the report shows. ``valid`` iff no error kind was found."""

    valid: bool
    events: int
    end_s: float  # time of the last event
    ack_levels: tuple[str, ...]
    kinds: tuple[KindSummary, ...]
    queues: tuple[QueueStats, ...]
    lost: tuple[LostPoint, ...]
    rpo: Rpo
    faults: tuple[FaultWindow, ...]
    recoveries: tuple[FaultRecovery, ...]
    unavailability: tuple[UnavailabilityWindow, ...]
    master_changes: tuple[MasterChange, ...]
    master_disk_lost_s: float | None

    def kind(self, name: str) -> KindSummary:
        """The summary of one kind (every kind of ERROR_KINDS and INFO_KINDS is present)."""
        for summary in self.kinds:
            if summary.kind == name:
                return summary
        raise KeyError(name)

    def errors(self) -> tuple[KindSummary, ...]:
        return tuple(k for k in self.kinds if k.error and k.count)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data for ``results.json`` (durations included)."""
        data = attrs.asdict(self, recurse=True)
        data["unavailability"] = [
            {**attrs.asdict(w), "duration_s": w.duration_s} for w in self.unavailability
        ]
        return data


# --- reading the operations out of the events ---------------------------------------------


@attrs.frozen
class _Op:
    invoke: Event
    completion: Event | None

    @property
    def outcome(self) -> str:
        """ok | fail | info; an operation never completed counts as info (unknown)."""
        return "info" if self.completion is None else self.completion.type

    @property
    def end_s(self) -> float | None:
        return None if self.completion is None else self.completion.time_s


@attrs.frozen
class _Read:
    queue: str
    offset: int
    message: str
    line: int
    node: str | None
    process: str


def _field(event: Event, key: str, kind: type | tuple[type, ...]) -> Any:
    value = event.value.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HistoryError(
            f"history line {event.line}: {event.f} {event.type} needs value.{key} "
            f"({getattr(kind, '__name__', kind)}), got {value!r}"
        )
    return value


def _messages(event: Event) -> list[tuple[int, str]]:
    raw = _field(event, "messages", list)
    out = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or type(item[0]) is not int
            or not isinstance(item[1], str)
        ):
            raise HistoryError(
                f"history line {event.line}: each of value.messages must be "
                f"[queue_offset, message], got {item!r}"
            )
        out.append((item[0], item[1]))
    return out


def _pair_ops(events: Sequence[Event]) -> list[_Op]:
    ops: list[_Op] = []
    open_ops: dict[str, Event] = {}
    for event in events:
        if event.f == "master":
            continue
        if event.type == "invoke":
            if event.process in open_ops:
                raise HistoryError(
                    f"history line {event.line}: process {event.process!r} invokes while "
                    f"line {open_ops[event.process].line} is open"
                )
            open_ops[event.process] = event
        else:
            invoke = open_ops.pop(event.process, None)
            if invoke is None or invoke.f != event.f:
                raise HistoryError(
                    f"history line {event.line}: {event.type} completes no open {event.f} "
                    f"of process {event.process!r}"
                )
            ops.append(_Op(invoke, event))
    ops.extend(_Op(invoke, None) for invoke in open_ops.values())
    ops.sort(key=lambda op: op.invoke.index)
    return ops


class _Findings:
    def __init__(self) -> None:
        self.by_kind: dict[str, list[Anomaly]] = defaultdict(list)

    def add(self, kind: str, queue: str | None, summary: str, *lines: int) -> None:
        self.by_kind[kind].append(Anomaly(kind, queue, summary, tuple(sorted(set(lines)))))

    def summaries(self) -> tuple[KindSummary, ...]:
        out = []
        for kind in (*ERROR_KINDS, *INFO_KINDS):
            found = self.by_kind.get(kind, [])
            out.append(
                KindSummary(kind, kind in ERROR_KINDS, len(found), tuple(found[:MAX_EXAMPLES]))
            )
        return tuple(out)


@attrs.frozen
class _Send:
    op: _Op
    queue: str
    message: str
    acks: str
    offset: int | None  # the acked offset (ok only)

    @property
    def producer(self) -> str:
        return self.op.invoke.process


def _sends(ops: Iterable[_Op]) -> dict[str, _Send]:
    sends: dict[str, _Send] = {}
    for op in ops:
        if op.invoke.f != "send":
            continue
        queue = _field(op.invoke, "queue", str)
        message = _field(op.invoke, "message", str)
        acks = _field(op.invoke, "acks", str)
        offset = None
        if (
            op.completion is not None
            and op.completion.type == "fail"
            and is_uncertain_error(op.completion.error)
        ):
            raise HistoryError(
                f"history line {op.completion.line}: send failed with {op.completion.error!r}, "
                "whose outcome is unknown: it must be recorded as info"
            )
        if op.completion is not None and op.completion.type == "ok":
            offset = _field(op.completion, "offset", int)
        if message in sends:
            raise HistoryError(
                f"history line {op.invoke.line}: message {message!r} was already sent on "
                f"line {sends[message].op.invoke.line}; every value must be unique"
            )
        sends[message] = _Send(op, queue, message, acks, offset)
    return sends


# --- the checks -----------------------------------------------------------------------------


def check(events: Sequence[Event]) -> CheckResult:
    """Judge one whole history (as :func:`tools.chaos.history.read_history` returns it)."""
    ops = _pair_ops(events)
    sends = _sends(ops)
    findings = _Findings()
    poll_reads = _check_polls(ops, findings)
    drains, complete = _collect_drains(ops)
    drain_reads = [read for reads in drains.values() for read in reads]
    all_reads = poll_reads + drain_reads
    _check_reads(sends, all_reads, findings)
    _check_send_order(events, sends, findings)
    masters = _master_changes(events)
    faults = _fault_windows(ops)
    disk_lost_s = _master_disk_lost_s(ops, masters)
    present, replicas = _final_logs(drains, complete, findings)
    lost = _check_lost(sends, present, replicas, complete, disk_lost_s, findings)
    _check_vanished(poll_reads, present, disk_lost_s, findings)
    _check_digests(ops, findings)
    _check_corrupt_reads(ops, findings)
    if not any(send.offset is not None for send in sends.values()):
        findings.add("nothing_acked", None, "no send was acknowledged: the run tested nothing")
    injected = [fault for fault in faults if fault.started]
    windows = _unavailability(sends.values(), injected)
    kinds = findings.summaries()
    leader_lost = [p for p in lost if p.verdict == "lost_leader"]
    span = (
        max(p.ack_time_s for p in leader_lost) - min(p.ack_time_s for p in leader_lost)
        if leader_lost
        else 0.0
    )
    return CheckResult(
        valid=not any(k.error and k.count for k in kinds),
        events=len(events),
        end_s=events[-1].time_s if events else 0.0,
        ack_levels=tuple(sorted({s.acks for s in sends.values()})),
        kinds=kinds,
        queues=_queue_stats(sends, all_reads, drains, complete, lost),
        lost=tuple(lost),
        rpo=Rpo(len(leader_lost), span),
        faults=tuple(faults),
        recoveries=_recoveries(injected, windows),
        unavailability=tuple(windows),
        master_changes=tuple(masters),
        master_disk_lost_s=disk_lost_s,
    )


def _check_corrupt_reads(ops: Iterable[_Op], findings: _Findings) -> None:
    """Every read whose answer the client refused as damaged or misplaced records."""
    for op in ops:
        done = op.completion
        if op.invoke.f not in ("poll", "drain") or done is None or done.type != "fail":
            continue
        if done.error is not None and done.error.startswith(CORRUPT_READ_PREFIX):
            queue = done.value.get("queue") if isinstance(done.value, dict) else None
            where = f" from {done.node}" if done.node else ""
            findings.add(
                "corrupt_read",
                queue if isinstance(queue, str) else None,
                f"a {op.invoke.f}{where} got records that fail the client's checks: "
                f"{done.error[len(CORRUPT_READ_PREFIX) :]}",
                done.line,
            )


def _check_polls(ops: Iterable[_Op], findings: _Findings) -> list[_Read]:
    """Each consumer reads each queue forward, one offset after the other."""
    reads: list[_Read] = []
    expected: dict[tuple[str, str], int] = {}
    for op in ops:
        if op.invoke.f != "poll" or op.completion is None or op.completion.type != "ok":
            continue
        event = op.completion
        queue = _field(event, "queue", str)
        start = _field(event, "offset", int)
        key = (event.process, queue)
        next_offset = expected.setdefault(key, start)
        for offset, message in _messages(event):
            reads.append(_Read(queue, offset, message, event.line, event.node, event.process))
            if offset > next_offset:
                findings.add(
                    "poll_skip",
                    queue,
                    f"{event.process} read offset {offset} after expecting {next_offset}: "
                    f"skipped {offset - next_offset} offset(s)",
                    event.line,
                )
            elif offset < next_offset:
                findings.add(
                    "nonmonotonic_poll",
                    queue,
                    f"{event.process} read offset {offset} ({message}) after having read "
                    f"up to {next_offset - 1}",
                    event.line,
                )
            expected[key] = next_offset = max(next_offset, offset + 1)
    return reads


def _collect_drains(
    ops: Iterable[_Op],
) -> tuple[dict[tuple[str, str, str], list[_Read]], set[tuple[str, str, str]]]:
    """Reads of the final drains keyed by (role, node, queue), and which ones finished."""
    drains: dict[tuple[str, str, str], list[_Read]] = defaultdict(list)
    complete: set[tuple[str, str, str]] = set()
    for op in ops:
        if op.invoke.f != "drain":
            continue
        queue = _field(op.invoke, "queue", str)
        role = _field(op.invoke, "role", str)
        node = op.invoke.node or "?"
        key = (role, node, queue)
        drains.setdefault(key, [])
        if op.completion is None or op.completion.type != "ok":
            continue
        event = op.completion
        for offset, message in _messages(event):
            drains[key].append(_Read(queue, offset, message, event.line, node, event.process))
        if event.value.get("end") is True:
            complete.add(key)
    return drains, complete


def _check_reads(sends: dict[str, _Send], reads: Sequence[_Read], findings: _Findings) -> None:
    offsets_of: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)  # (q, msg) -> off -> line
    values_at: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)  # (q, off) -> msg -> line
    for send in sends.values():
        if send.offset is not None:
            line = send.op.completion.line if send.op.completion else send.op.invoke.line
            values_at[(send.queue, send.offset)].setdefault(send.message, line)
    read_messages: dict[tuple[str, str], int] = {}
    for read in reads:
        offsets_of[(read.queue, read.message)].setdefault(read.offset, read.line)
        values_at[(read.queue, read.offset)].setdefault(read.message, read.line)
        read_messages.setdefault((read.queue, read.message), read.line)
    for (queue, message), offsets in offsets_of.items():
        if len(offsets) > 1:
            findings.add(
                "duplicate",
                queue,
                f"{message} read at offsets {sorted(offsets)}",
                *offsets.values(),
            )
        acked = sends.get(message)
        if acked is not None and acked.queue == queue and acked.offset is not None:
            wrong = {o: line for o, line in offsets.items() if o != acked.offset}
            if wrong:
                ack_line = acked.op.completion.line if acked.op.completion else 0
                findings.add(
                    "offset_mismatch",
                    queue,
                    f"{message} acked at offset {acked.offset} but read at {sorted(wrong)}",
                    ack_line,
                    *wrong.values(),
                )
    for (queue, offset), messages in values_at.items():
        if len(messages) > 1:
            findings.add(
                "inconsistent_offsets",
                queue,
                f"offset {offset} holds {len(messages)} messages: {sorted(messages)[:4]}",
                *messages.values(),
            )
    for (queue, message), line in read_messages.items():
        sent = sends.get(message)
        if sent is None or sent.queue != queue:
            findings.add("unexpected", queue, f"{message} was read but never sent to {queue}", line)
        elif sent.op.outcome == "fail":
            fail_line = sent.op.completion.line if sent.op.completion else 0
            findings.add(
                "aborted_read",
                queue,
                f"{message} was read though its send failed ({sent.op.completion and sent.op.completion.error})",
                line,
                fail_line,
            )
        elif sent.op.outcome == "info":
            findings.add(
                "recovered",
                queue,
                f"{message}: unknown send, later read",
                sent.op.invoke.line,
                line,
            )
    for send in sends.values():
        if send.op.outcome == "info" and (send.queue, send.message) not in read_messages:
            findings.add(
                "indeterminate",
                send.queue,
                f"{send.message}: unknown send ({send.op.completion.error if send.op.completion else 'never completed'}), never read",
                send.op.invoke.line,
            )


def _check_send_order(
    events: Sequence[Event], sends: dict[str, _Send], findings: _Findings
) -> None:
    """Real-time order per queue and offset order per producer, in one pass over the events."""
    by_invoke = {send.op.invoke.index: send for send in sends.values()}
    by_ok = {
        send.op.completion.index: send
        for send in sends.values()
        if send.op.completion is not None and send.offset is not None
    }
    highest: dict[str, _Send] = {}  # per queue: the acked send with the highest offset so far
    seen_at_invoke: dict[str, _Send] = {}
    last_of_producer: dict[tuple[str, str], _Send] = {}
    for event in events:
        invoked = by_invoke.get(event.index)
        if invoked is not None and invoked.queue in highest:
            seen_at_invoke[invoked.message] = highest[invoked.queue]
        acked = by_ok.get(event.index)
        if acked is None:
            continue
        assert acked.offset is not None
        before = seen_at_invoke.get(acked.message)
        if before is not None and before.offset is not None and before.offset >= acked.offset:
            findings.add(
                "realtime_order",
                acked.queue,
                f"{before.message} was acked at offset {before.offset} before {acked.message} "
                f"was sent, yet {acked.message} got offset {acked.offset}",
                before.op.completion.line if before.op.completion else 0,
                acked.op.invoke.line,
                event.line,
            )
        key = (acked.producer, acked.queue)
        previous = last_of_producer.get(key)
        if previous is not None and previous.offset is not None and previous.offset >= acked.offset:
            findings.add(
                "nonmonotonic_send",
                acked.queue,
                f"{acked.producer} got offset {acked.offset} for {acked.message} after "
                f"offset {previous.offset} for {previous.message}",
                previous.op.completion.line if previous.op.completion else 0,
                event.line,
            )
        last_of_producer[key] = acked
        top = highest.get(acked.queue)
        if top is None or (top.offset is not None and acked.offset > top.offset):
            highest[acked.queue] = acked


def _master_changes(events: Iterable[Event]) -> list[MasterChange]:
    changes: list[MasterChange] = []
    for event in events:
        if event.f != "master":
            continue
        master = event.value.get("master")
        epoch = event.value.get("epoch")
        if master is not None and not isinstance(master, str):
            raise HistoryError(f"history line {event.line}: value.master must be a node or null")
        if epoch is not None and type(epoch) is not int:
            raise HistoryError(f"history line {event.line}: value.epoch must be an int or null")
        if not changes or changes[-1].master != master or changes[-1].epoch != epoch:
            changes.append(MasterChange(event.time_s, master, epoch, event.line))
    return changes


def _master_at(masters: Sequence[MasterChange], time_s: float) -> str | None:
    times = [m.time_s for m in masters]
    position = bisect.bisect_right(times, time_s)
    return masters[position - 1].master if position else None


def _fault_windows(ops: Iterable[_Op]) -> list[FaultWindow]:
    starts: dict[str, _Op] = {}
    stops: dict[str, _Op] = {}
    for op in ops:
        if op.invoke.f != "nemesis":
            continue
        fault_id = _field(op.invoke, "fault_id", str)
        action = _field(op.invoke, "action", str)
        if action == "start":
            starts[fault_id] = op
        elif action == "stop":
            stops[fault_id] = op
        else:
            raise HistoryError(
                f"history line {op.invoke.line}: nemesis action must be start or stop, got {action!r}"
            )
    windows = []
    for fault_id, op in starts.items():
        stop = stops.get(fault_id)
        targets = _field(op.invoke, "targets", list)
        windows.append(
            FaultWindow(
                fault_id=fault_id,
                fault=_field(op.invoke, "fault", str),
                targets=tuple(str(t) for t in targets),
                start_s=op.invoke.time_s,
                stop_s=None if stop is None else _end_or_invoke_s(stop),
                line=op.invoke.line,
                started=op.outcome == "ok",
            )
        )
    windows.sort(key=lambda w: (w.start_s, w.line))
    return windows


def _end_or_invoke_s(op: _Op) -> float:
    return op.invoke.time_s if op.end_s is None else op.end_s


def _master_disk_lost_s(ops: Iterable[_Op], masters: Sequence[MasterChange]) -> float | None:
    """When a nemesis first destroyed the disk of the node that was master then."""
    for op in ops:
        if op.invoke.f != "nemesis" or op.invoke.value.get("disk_lost") is not True:
            continue
        master = _master_at(masters, op.invoke.time_s)
        if master is not None and master in _field(op.invoke, "targets", list):
            return op.invoke.time_s
    return None


def _final_logs(
    drains: dict[tuple[str, str, str], list[_Read]],
    complete: set[tuple[str, str, str]],
    findings: _Findings,
) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, set[str]]]]]:
    """Per queue: the messages of the master's finished drains, and each replica's."""
    present: dict[str, set[str]] = {}
    replicas: dict[str, list[tuple[str, set[str]]]] = defaultdict(list)
    for (role, node, queue), reads in sorted(drains.items()):
        if (role, node, queue) not in complete:
            if role != "master":
                findings.add(
                    "replica_unchecked", queue, f"the drain of {queue} on {node} never finished"
                )
            continue
        messages = {read.message for read in reads}
        if role == "master":
            present[queue] = present.get(queue, set()) | messages
        else:
            replicas[queue].append((node, messages))
    return present, replicas


def _check_vanished(
    poll_reads: Sequence[_Read],
    present: dict[str, set[str]],
    disk_lost_s: float | None,
    findings: _Findings,
) -> None:
    """A consumer saw a message the final log does not hold: it read past the confirm offset."""
    if disk_lost_s is not None:
        return  # the master's disk was destroyed: its loss is judged as lost_excused
    seen: set[tuple[str, str]] = set()
    for read in poll_reads:
        final = present.get(read.queue)
        if final is None or read.message in final or (read.queue, read.message) in seen:
            continue
        seen.add((read.queue, read.message))
        findings.add(
            "vanished_read",
            read.queue,
            f"{read.process} read {read.message} at offset {read.offset} from "
            f"{read.node or 'an unknown node'}, but the final log of {read.queue} lacks it",
            read.line,
        )


def _check_lost(
    sends: dict[str, _Send],
    present: dict[str, set[str]],
    replicas: dict[str, list[tuple[str, set[str]]]],
    complete: set[tuple[str, str, str]],
    disk_lost_s: float | None,
    findings: _Findings,
) -> list[LostPoint]:
    acked_queues = sorted({s.queue for s in sends.values() if s.offset is not None})
    masters_of = {
        queue: sorted(n for (r, n, q) in complete if r == "master" and q == queue)
        for queue in acked_queues
    }
    lost: list[LostPoint] = []
    for queue in acked_queues:
        if queue not in present:
            findings.add(
                "incomplete_drain",
                queue,
                f"no finished drain of {queue} on the master: loss cannot be judged",
            )
            continue
        by_producer: dict[str, list[_Send]] = defaultdict(list)
        for send in sends.values():
            if send.queue == queue and send.offset is not None:
                by_producer[send.producer].append(send)
        for producer, acked in sorted(by_producer.items()):
            acked.sort(key=lambda s: s.op.invoke.index)
            kept = [i for i, s in enumerate(acked) if s.message in present[queue]]
            for i, send in enumerate(acked):
                if send.message in present[queue]:
                    continue
                position = (
                    "postfix"
                    if not kept or i > kept[-1]
                    else ("prefix" if i < kept[0] else "middle")
                )
                point = _lost_point(send, position, disk_lost_s, masters_of[queue], replicas[queue])
                lost.append(point)
                findings.add(
                    point.verdict,
                    queue,
                    f"{send.message} acked ({send.acks}) at offset {send.offset} by {producer}, "
                    f"missing after the final drain ({position}; missing on {', '.join(point.missing_on)})",
                    point.line,
                )
    return lost


def _lost_point(
    send: _Send,
    position: str,
    disk_lost_s: float | None,
    masters: Sequence[str],
    replicas: Sequence[tuple[str, set[str]]],
) -> LostPoint:
    if send.acks == "leader":
        verdict = "lost_leader"
    elif (
        send.acks == "durable" and disk_lost_s is not None and disk_lost_s >= send.op.invoke.time_s
    ):
        verdict = "lost_excused"
    else:
        verdict = "lost"
    missing_on = (*masters, *(node for node, messages in replicas if send.message not in messages))
    completion = send.op.completion
    assert completion is not None
    return LostPoint(
        queue=send.queue,
        message=send.message,
        producer=send.producer,
        acks=send.acks,
        ack_time_s=completion.time_s,
        position=position,
        verdict=verdict,
        missing_on=tuple(missing_on),
        line=completion.line,
    )


def _check_digests(ops: Iterable[_Op], findings: _Findings) -> None:
    digests: list[Event] = [
        op.completion
        for op in ops
        if op.invoke.f == "digest" and op.completion is not None and op.completion.type == "ok"
    ]
    masters = [d for d in digests if d.value.get("role") == "master"]
    if not masters:
        if digests:
            findings.add(
                "replica_divergence",
                None,
                "replica digests were recorded but none of the master: nothing to compare to",
                *(d.line for d in digests),
            )
        else:
            findings.add("replica_unchecked", None, "no commit-log digest was recorded")
        return
    master = masters[-1]
    confirm = _field(master, "confirm_offset", int)
    for digest in digests:
        if digest.value.get("role") == "master":
            continue
        problem = _compare_digest(master, digest, confirm)
        if problem:
            findings.add(
                "replica_divergence", None, f"{digest.node}: {problem}", master.line, digest.line
            )


def _compare_digest(master: Event, replica: Event, confirm: int) -> str | None:
    for key in ("start_offset", "chunk_bytes"):
        if _field(replica, key, int) != _field(master, key, int):
            return f"{key} {replica.value[key]} differs from the master's {master.value[key]}: not comparable"
    start = _field(master, "start_offset", int)
    chunk = _field(master, "chunk_bytes", int)
    end = _field(replica, "end_offset", int)
    if end < confirm:
        return f"holds the log only up to {end}, short of the confirm offset {confirm}"
    mine = _field(replica, "chunks", list)
    theirs = _field(master, "chunks", list)
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            low = start + i * chunk
            return f"bytes [{low}, {min(low + chunk, confirm)}) differ from the master's"
    if len(mine) != len(theirs):
        return f"{len(mine)} chunk digests against the master's {len(theirs)}"
    return None


def _unavailability(
    sends: Iterable[_Send], faults: Sequence[FaultWindow]
) -> list[UnavailabilityWindow]:
    ends: list[tuple[float, int, bool, float, int]] = []  # end time, line, ok?, invoke time, line
    for send in sends:
        completion = send.op.completion
        end_s = completion.time_s if completion is not None else float("inf")
        end_line = completion.line if completion is not None else send.op.invoke.line
        ends.append(
            (end_s, end_line, send.op.outcome == "ok", send.op.invoke.time_s, send.op.invoke.line)
        )
    ends.sort()
    windows: list[UnavailabilityWindow] = []
    fault_starts = [f.start_s for f in faults]
    open_at: tuple[float, int, float] | None = None
    last_ok_s = 0.0
    for end_s, end_line, ok, invoke_s, invoke_line in ends:
        if ok:
            if open_at is not None:
                windows.append(_window(open_at, end_s, end_line, faults, fault_starts))
                open_at = None
            last_ok_s = end_s
        elif open_at is None:
            # The window starts with the failing send (it may have been in flight before
            # the fault began) but belongs to the fault in force when its failure was seen.
            seen_s = end_s if end_s != float("inf") else invoke_s
            open_at = (max(invoke_s, last_ok_s), invoke_line, seen_s)
    if open_at is not None:
        windows.append(_window(open_at, None, None, faults, fault_starts))
    return windows


def _window(
    open_at: tuple[float, int, float],
    end_s: float | None,
    end_line: int | None,
    faults: Sequence[FaultWindow],
    fault_starts: Sequence[float],
) -> UnavailabilityWindow:
    """A window from its start to ``end_s``, attributed to the latest fault started when
    its first failure was seen (``open_at[2]``), not when that send was invoked."""
    position = bisect.bisect_right(fault_starts, open_at[2])
    fault_id = faults[position - 1].fault_id if position else None
    return UnavailabilityWindow(open_at[0], end_s, open_at[1], end_line, fault_id)


def _recoveries(
    faults: Sequence[FaultWindow], windows: Sequence[UnavailabilityWindow]
) -> tuple[FaultRecovery, ...]:
    out = []
    for fault in faults:
        mine = [w for w in windows if w.fault_id == fault.fault_id]
        durations = [w.duration_s for w in mine]
        total = (
            None
            if any(d is None for d in durations)
            else sum(d for d in durations if d is not None)
        )
        first = durations[0] if durations else 0.0
        out.append(FaultRecovery(fault.fault_id, fault.fault, len(mine), first, total))
    return tuple(out)


def _queue_stats(
    sends: dict[str, _Send],
    reads: Sequence[_Read],
    drains: dict[tuple[str, str, str], list[_Read]],
    complete: set[tuple[str, str, str]],
    lost: Sequence[LostPoint],
) -> tuple[QueueStats, ...]:
    queues = sorted({s.queue for s in sends.values()} | {r.queue for r in reads})
    out = []
    for queue in queues:
        mine = [s for s in sends.values() if s.queue == queue]
        drained = set()
        for (role, _node, q), drain_reads in drains.items():
            if role == "master" and q == queue and (role, _node, q) in complete:
                drained |= {r.message for r in drain_reads}
        out.append(
            QueueStats(
                queue=queue,
                sends=len(mine),
                acked=sum(s.op.outcome == "ok" for s in mine),
                failed=sum(s.op.outcome == "fail" for s in mine),
                unknown=sum(s.op.outcome == "info" for s in mine),
                read_distinct=len({r.message for r in reads if r.queue == queue}),
                drained_on_master=len(drained),
                lost=sum(p.queue == queue for p in lost),
            )
        )
    return tuple(out)
