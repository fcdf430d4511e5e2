"""Hand-made chaos histories for the checker and report tests (no tests here): a builder and a clean model.

:class:`HistoryBuilder` writes events exactly as a runner would (the contract in
tools/chaos/history.py); :func:`clean_history` runs a small model of producers and
consumers on queues whose every history must pass the checker.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from tools.chaos.history import Event, HistoryWriter


class HistoryBuilder:
    """Builds a list of events with increasing index and time (``step_s`` per event)."""

    def __init__(self, step_s: float = 0.01) -> None:
        self.events: list[Event] = []
        self.time_s = 0.0
        self.step_s = step_s

    def add(
        self,
        type: str,
        process: str,
        f: str,
        value: dict[str, Any],
        node: str | None = None,
        error: str | None = None,
    ) -> Event:
        self.time_s += self.step_s
        event = Event(len(self.events), round(self.time_s, 6), type, process, f, value, node, error)
        self.events.append(event)
        return event

    def wait(self, seconds: float) -> None:
        self.time_s += seconds

    def invoke_send(
        self, producer: str, queue: str, message: str, acks: str = "replicated"
    ) -> None:
        self.add("invoke", producer, "send", {"queue": queue, "message": message, "acks": acks})

    def complete_send(
        self,
        producer: str,
        queue: str,
        message: str,
        outcome: str = "ok",
        offset: int | None = None,
        acks: str = "replicated",
        error: str | None = None,
        node: str | None = "n1",
    ) -> None:
        value: dict[str, Any] = {"queue": queue, "message": message, "acks": acks}
        if outcome == "ok":
            assert offset is not None
            value |= {"offset": offset, "physical_offset": None}
        if error is None and outcome != "ok":
            error = "NOT_MASTER" if outcome == "fail" else "timeout"
        self.add(outcome, producer, "send", value, node=node, error=error)

    def send(
        self,
        producer: str,
        queue: str,
        message: str,
        offset: int | None = None,
        outcome: str = "ok",
        acks: str = "replicated",
        error: str | None = None,
    ) -> None:
        self.invoke_send(producer, queue, message, acks)
        self.complete_send(producer, queue, message, outcome, offset, acks, error)

    def poll(self, consumer: str, queue: str, offset: int, messages: list[tuple[int, str]]) -> None:
        self.add("invoke", consumer, "poll", {"queue": queue, "offset": offset})
        self.add(
            "ok",
            consumer,
            "poll",
            {"queue": queue, "offset": offset, "messages": [list(m) for m in messages]},
            node="n1",
        )

    def drain(
        self,
        queue: str,
        node: str,
        role: str,
        messages: list[tuple[int, str]],
        end: bool = True,
    ) -> None:
        value = {"queue": queue, "offset": 0, "role": role}
        self.add("invoke", "drainer", "drain", value, node=node)
        done = value | {"messages": [list(m) for m in messages], "end": end}
        self.add("ok", "drainer", "drain", done, node=node)

    def digest(
        self, node: str, role: str, confirm: int, chunks: list[str], end: int | None = None
    ) -> None:
        self.add("invoke", "drainer", "digest", {"role": role}, node=node)
        value = {
            "role": role,
            "confirm_offset": confirm,
            "start_offset": 0,
            "end_offset": confirm if end is None else end,
            "chunk_bytes": 1024,
            "chunks": chunks,
        }
        self.add("ok", "drainer", "digest", value, node=node)

    def nemesis(
        self,
        fault_id: str,
        fault: str,
        action: str,
        targets: list[str],
        disk_lost: bool = False,
    ) -> None:
        value: dict[str, Any] = {
            "fault": fault,
            "action": action,
            "fault_id": fault_id,
            "targets": targets,
        }
        if disk_lost:
            value["disk_lost"] = True
        self.add("invoke", "nemesis", "nemesis", value)
        self.add("ok", "nemesis", "nemesis", value)

    def master(self, node: str | None, epoch: int | None) -> None:
        self.add("info", "observer", "master", {"master": node, "epoch": epoch})

    def write(self, path: Any) -> None:
        """Write the events through the real writer (which re-checks every line)."""
        with HistoryWriter(path) as writer:
            for event in self.events:
                writer.append(**{k: v for k, v in attrs.asdict(event).items() if k != "index"})


@attrs.define
class _Pending:
    kind: str
    process: str
    queue: str
    payload: Any


def clean_history(
    seed: int,
    steps: int = 60,
    producers: int = 3,
    consumers: int = 2,
    queues: int = 2,
    replicas: int = 1,
) -> HistoryBuilder:
    """A valid history of a correct cluster, drawn from ``seed``.

    Sends apply (append to their queue's log) at invoke, so acks respect real time; some
    answers fail (not applied) or are unknown (applied or not); polls read forward; faults
    come and go; at the end every node drains every queue and digests match.
    """
    rng = random.Random(seed)
    history = HistoryBuilder()
    history.master("n1", 1)
    logs: dict[str, list[str]] = {f"chaos:{q}": [] for q in range(queues)}
    counters = dict.fromkeys(range(producers), 0)
    pending: dict[str, _Pending] = {}
    next_read: dict[tuple[str, str], int] = {}
    fault_open: str | None = None
    fault_count = 0
    for queue, log in sorted(logs.items()):  # a run that acked nothing would prove nothing
        message = f"producer-0:{counters[0]}"
        counters[0] += 1
        history.send("producer-0", queue, message, len(log))
        log.append(message)
    for _ in range(steps):
        choice = rng.random()
        if choice < 0.06:
            if fault_open is None:
                fault_count += 1
                fault_open = f"f{fault_count}"
                history.nemesis(
                    fault_open, rng.choice(["kill", "pause", "partition"]), "start", ["n2"]
                )
            else:
                history.nemesis(fault_open, "kill", "stop", ["n2"])
                fault_open = None
            continue
        if pending and choice < 0.45:
            process = rng.choice(sorted(pending))
            _complete(history, pending.pop(process), logs, next_read, rng)
            continue
        if choice < 0.75:
            idle = [p for p in range(producers) if f"producer-{p}" not in pending]
            if not idle:
                continue
            p = rng.choice(idle)
            process = f"producer-{p}"
            queue = rng.choice(sorted(logs))
            message = f"{process}:{counters[p]}"
            counters[p] += 1
            history.invoke_send(process, queue, message)
            outcome = rng.choices(["ok", "fail", "info"], weights=[8, 1, 1])[0]
            applied = outcome == "ok" or (outcome == "info" and rng.random() < 0.5)
            offset = None
            if applied:
                offset = len(logs[queue])
                logs[queue].append(message)
            pending[process] = _Pending("send", process, queue, (message, outcome, offset))
        else:
            idle = [c for c in range(consumers) if f"consumer-{c}" not in pending]
            if not idle:
                continue
            process = f"consumer-{rng.choice(idle)}"
            queue = rng.choice(sorted(logs))
            offset = next_read.setdefault((process, queue), 0)
            history.add("invoke", process, "poll", {"queue": queue, "offset": offset})
            pending[process] = _Pending("poll", process, queue, offset)
    for process in sorted(pending):
        _complete(history, pending.pop(process), logs, next_read, rng)
    if fault_open is not None:
        history.nemesis(fault_open, "kill", "stop", ["n2"])
    for queue, log in sorted(logs.items()):
        for node, role in [("n1", "master"), *((f"n{r + 2}", "replica") for r in range(replicas))]:
            history.drain(queue, node, role, list(enumerate(log)))
    chunks = [f"{rng.getrandbits(64):016x}" for _ in range(3)]
    history.digest("n1", "master", 3000, chunks)
    for r in range(replicas):
        history.digest(f"n{r + 2}", "replica", 3000, chunks)
    return history


def _complete(
    history: HistoryBuilder,
    op: _Pending,
    logs: dict[str, list[str]],
    next_read: dict[tuple[str, str], int],
    rng: random.Random,
) -> None:
    if op.kind == "send":
        message, outcome, offset = op.payload
        history.complete_send(op.process, op.queue, message, outcome, offset)
        return
    start = op.payload
    count = rng.randint(0, 4)
    messages = list(enumerate(logs[op.queue]))[start : start + count]
    value = {"queue": op.queue, "offset": start, "messages": [list(m) for m in messages]}
    history.add("ok", op.process, "poll", value, node="n1")
    next_read[(op.process, op.queue)] = start + len(messages)
