"""Idempotent sends against a real node in this test's trio loop: a retried batch that
was stored is answered with its original offsets and stored once, also when its answer
was lost on a cut connection and after the node restarted (the state is rebuilt from
the log)."""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from cluster.client import Client, SendResult, open_client
from cluster.node.idempotence import PRODUCER_SPAN, WINDOW_BATCHES
from cluster.node.idempotent_sends import IdempotentSends, SendRefused
from cluster.protocol import Status
from cluster.protocol.address import parse_address
from storage import BatchAppendResult, Message, MessageStore, StorageFailedError, StoreConfig
from tests.cluster.test_client_producer import serving
from tools.faults.proxy import Direction, FaultProxy


async def bodies(client: Client, topic: str) -> list[bytes]:
    answer = await client.checked("pull", topic=topic, queue=0, offset=0, max_messages=1000)
    return [bytes(m["body"]) for m in answer["messages"]]


async def raw_send(client: Client, **fields: Any) -> dict[str, Any]:
    return await client.call_master("send", topic="t", acks="durable", **fields)


async def test_a_resent_batch_is_answered_with_its_first_offsets(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        started = await client.call_master("init_producer")
        producer = started["producer"]
        assert started["status"] is Status.OK and 1 <= producer < 2**63
        assert started["span"] == PRODUCER_SPAN
        first = await raw_send(client, body=b"a", producer=producer, sequence=0)
        again = await raw_send(client, body=b"a", producer=producer, sequence=0)
        assert first["status"] is again["status"] is Status.OK
        assert [again[k] for k in ("offset", "queue_offset", "store_us")] == [
            first[k] for k in ("offset", "queue_offset", "store_us")
        ]
        batch = {
            "topic": "t",
            "acks": "durable",
            "producer": producer,
            "sequence": 1,
            "messages": [{"body": b"b"}, {"body": b"c", "props": {"k": "v"}}],
        }
        one = await client.call_master("send_batch", **batch)
        two = await client.call_master("send_batch", **batch)
        assert one["offsets"] == two["offsets"] and one["queue_offsets"] == two["queue_offsets"]
        assert await bodies(client, "t") == [b"a", b"b", b"c"]
        pulled = await client.checked("pull", topic="t", queue=0, offset=0, max_messages=10)
        # the producer mark is the node's: consumers see their own properties only
        assert [m.get("props") for m in pulled["messages"]] == [None, None, {"k": "v"}]


async def test_sends_that_break_the_rules_are_refused_with_why(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        producer = (await client.call_master("init_producer"))["producer"]
        await raw_send(client, body=b"x", producer=producer, sequence=5)
        overlap = await client.call_master(
            "send_batch",
            topic="t",
            producer=producer,
            sequence=4,
            messages=[{"body": b"y"}, {"body": b"z"}],
        )
        assert overlap["status"] is Status.BAD_REQUEST and "overlap" in overlap["error"]
        reserved = await raw_send(
            client, body=b"x", producer=producer, sequence=9, props={"PRODUCER": "mine"}
        )
        assert reserved["status"] is Status.BAD_REQUEST and "reserved" in reserved["error"]
        with pytest.raises(Exception, match="'sequence'"):
            await raw_send(client, body=b"x", producer=producer)
        for sequence in range(6, 6 + WINDOW_BATCHES):  # the window moves past sequence 5
            assert (await raw_send(client, body=b"w", producer=producer, sequence=sequence))[
                "status"
            ] is Status.OK
        old = await raw_send(client, body=b"x", producer=producer, sequence=5)
        assert old["status"] is Status.SEQUENCE_TOO_OLD and old["status"].outcome_unknown
        assert (await bodies(client, "t")).count(b"x") == 1


async def test_a_restarted_node_rebuilds_what_it_stored_from_the_log(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        producer = (await client.call_master("init_producer"))["producer"]
        for sequence in range(3):
            await raw_send(client, body=b"m%d" % sequence, producer=producer, sequence=sequence)
        first = await raw_send(client, body=b"m3", producer=producer, sequence=3)
    async with serving(tmp_path) as (node, address), open_client(address) as client:
        again = await raw_send(client, body=b"m3", producer=producer, sequence=3)
        assert again["status"] is Status.OK and again["offset"] == first["offset"]
        assert await bodies(client, "t") == [b"m0", b"m1", b"m2", b"m3"]
        assert node.handler is not None and node.handler.idempotence.last_rebuild is not None
        assert node.handler.idempotence.last_rebuild["batches"] == 4


async def test_a_send_whose_answer_was_lost_is_retried_and_stored_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The node stores the message and answers; the proxy keeps the answer, then resets
    the connection: the outcome is unknown to the producer, which resends the same
    batch on a new connection and gets the original offsets."""
    caplog.set_level(logging.INFO, logger="cluster.client.producer")
    async with serving(tmp_path) as (_node, address):
        proxy = FaultProxy(*parse_address(address))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            async with (
                open_client(f"127.0.0.1:{port}") as client,
                open_client(address) as direct,
            ):
                await client.admin.create_topic("t", 1)
                producer = client.producer(batch_size=1, idempotent=True)
                assert (await producer.send("t", b"before")).ok
                proxy.hold(Direction.parse("from_target"))
                results: list[SendResult] = []

                async def send() -> None:
                    results.append(await producer.send("t", b"once"))

                async with trio.open_nursery() as sending:
                    sending.start_soon(send)
                    await proxy.wait_held()  # the node's answer: the message is stored
                    stored = await bodies(direct, "t")
                    proxy.reset_open()
                    proxy.heal()
                assert stored == [b"before", b"once"]
                assert results[0].ok, results[0]
                assert "resend_idempotent" in caplog.text, "the answer was lost: it was resent"
                assert await bodies(direct, "t") == [b"before", b"once"]
                pulled = await direct.checked("pull", topic="t", queue=0, offset=1)
                assert results[0].offset == pulled["messages"][0]["offset"]
            nursery.cancel_scope.cancel()


async def test_sends_beyond_the_span_wait_their_turn_and_cancelled_ones_pass_it_on(
    tmp_path: Path,
) -> None:
    """Three spans' worth of concurrent idempotent sends: those past the span wait in
    line (woken only as the span frees). Cancelling some of the waiting ones neither
    loses the others' turns nor leaves a batch unresolved: every other send is stored."""
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        producer = client.producer(batch_size=1, idempotent=True, acks="durable")
        assert (await producer.send("t", b"start")).ok
        results: dict[int, SendResult] = {}
        total = 3 * PRODUCER_SPAN

        async def send(index: int) -> None:
            results[index] = await producer.send("t", b"%d" % index, queue=0)

        async with trio.open_nursery() as nursery:
            cancelled: list[trio.CancelScope] = []
            for index in range(total):
                if index % 7 == 3 and index > PRODUCER_SPAN:  # waiting in line: cancel it
                    cancelled.append(trio.CancelScope())
                    nursery.start_soon(_cancellable, cancelled[-1], send, index)
                else:
                    nursery.start_soon(send, index)
            await trio.testing.wait_all_tasks_blocked()
            for scope in cancelled:
                scope.cancel()
        sent = {i for i in range(total) if not (i % 7 == 3 and i > PRODUCER_SPAN)}
        assert all(results[i].ok for i in sent), [results[i] for i in sent if not results[i].ok]
        assert producer._sequences is not None and producer._sequences.unresolved == 0
        stored = await bodies(client, "t")
        assert len(stored) == len(set(stored)), "every send stored once"
        assert {b"%d" % i for i in sent} <= set(stored)


async def _cancellable(scope: trio.CancelScope, send: Any, index: int) -> None:
    with scope:
        await send(index)


async def test_an_append_cancelled_after_writing_is_still_recognised(tmp_path: Path) -> None:
    """The batch is in the log, then its request is cancelled before the append returns:
    the log written since the append started shows it, so it is landed and the resend
    is a duplicate, not a second copy (with no rebuild of the whole state)."""
    config = StoreConfig(data_dir=tmp_path / "store", segment_size=1 << 20, max_message_size=4096)
    async with MessageStore.open(config) as store:
        sends = IdempotentSends(store)
        request = [{"body": b"once", "props": None}]

        def build() -> list[Message]:
            return [Message("t", b"once", 0)]

        request_scope = trio.CancelScope()

        async def written_then_cancelled(built: list[Message]) -> BatchAppendResult:
            result = await store.put_batch(built)
            request_scope.cancel()  # the request is cancelled: written, not answered
            await trio.lowlevel.checkpoint()
            return result

        with request_scope:
            await sends.append(7, 0, request, build, written_then_cancelled)
        assert request_scope.cancelled_caught
        again = await sends.append(7, 0, request, build, store.put_batch)
        assert again.duplicate and again.offsets == [0]
        assert store.commit_log.max_offset == again.end_offset, "stored once"
        assert sends.rebuilds == 1, "only the first send's rebuild"


async def test_a_producer_started_again_with_its_id_fences_the_older_copy(
    tmp_path: Path,
) -> None:
    """Two producers share an id (a zombie and its restart): once the second one starts
    with the id, the first one's sends are refused PRODUCER_FENCED, naming what to do,
    and stay refused after a node restart (the epoch is rebuilt from the log)."""
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        await client.admin.create_topic("t", 1)
        zombie = client.producer(batch_size=1, idempotent=True)
        assert (await zombie.send("t", b"zombie-1")).ok
        assert zombie.producer_id is not None and zombie.producer_epoch == 0
        restarted = client.producer(batch_size=1, idempotent=True, producer_id=zombie.producer_id)
        assert (await restarted.send("t", b"restarted-1")).ok
        assert restarted.producer_epoch == 1
        fenced = await zombie.send("t", b"zombie-2")
        assert fenced.outcome == "failed" and fenced.status is Status.PRODUCER_FENCED
        assert fenced.error is not None and "epoch 1" in fenced.error and "stop" in fenced.error
        assert not Status.PRODUCER_FENCED.retryable
        producer_id = zombie.producer_id
    async with serving(tmp_path) as (_node, address), open_client(address) as client:
        late = await raw_send(client, body=b"zombie-3", producer=producer_id, sequence=9)
        assert late["status"] is Status.PRODUCER_FENCED, "the epoch came back from the log"
        current = await raw_send(
            client, body=b"restarted-2", producer=producer_id, sequence=1, epoch=1
        )
        assert current["status"] is Status.OK
        again = await client.call_master("init_producer", producer=producer_id, epoch=0)
        assert again["epoch"] == 2, "one above what the node remembers"
        assert await bodies(client, "t") == [b"zombie-1", b"restarted-1", b"restarted-2"]


def _store_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig(data_dir=tmp_path / "store", segment_size=1 << 20, max_message_size=4096)


async def _cancel_after_writing(sends: IdempotentSends, store: MessageStore, producer: int) -> None:
    """Another producer's append is cancelled after its records are written (as when
    the dispatcher awaits a new queue file and the connection is aborted)."""
    scope = trio.CancelScope()

    async def written_then_cancelled(built: list[Message]) -> BatchAppendResult:
        result = await store.put_batch(built)
        scope.cancel()
        await trio.lowlevel.checkpoint()
        return result

    with scope:
        await sends.append(
            producer,
            0,
            [{"body": b"other", "props": None}],
            lambda: [Message("other", b"other", 0)],
            written_then_cancelled,
        )


async def test_a_copy_arriving_while_its_batch_waits_to_be_written_is_stored_once(
    tmp_path: Path,
) -> None:
    """Batch A of producer 7 is claimed and waits before writing (put_batch awaits the
    segment allocator before its first byte); meanwhile another producer's append is
    cancelled, and a copy of A arrives (the client resent it): A must be stored once.
    Failed when a cancelled append dropped the whole state (A was stored twice)."""
    async with MessageStore.open(_store_config(tmp_path)) as store:
        sends = IdempotentSends(store)
        request = [{"body": b"A", "props": None}]

        def build() -> list[Message]:
            return [Message("t", b"A", 0)]

        allocated = trio.Event()

        async def slow_put(built: list[Message]) -> BatchAppendResult:
            await allocated.wait()  # models CommitLog._make_room awaiting the allocator
            return await store.put_batch(built)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sends.append, 7, 0, request, build, slow_put)
            await trio.testing.wait_all_tasks_blocked()
            await _cancel_after_writing(sends, store, 8)
            nursery.start_soon(sends.append, 7, 0, request, build, store.put_batch)
            await trio.testing.wait_all_tasks_blocked()
            allocated.set()
        stored = [bytes(r.body) for r in store.commit_log.scan(0) if r.topic == "t"]
        assert stored == [b"A"], f"batch A stored {len(stored)} times"
        other = await sends.append(
            8,
            0,
            [{"body": b"other", "props": None}],
            lambda: [Message("other", b"other", 0)],
            store.put_batch,
        )
        assert other.duplicate, "the cancelled append that wrote is remembered"


async def test_an_append_cancelled_before_writing_leaves_its_batch_to_a_resend(
    tmp_path: Path,
) -> None:
    """Cancelled while waiting to write: nothing is in the log, so the claim is given up
    and the resend is stored (once)."""
    async with MessageStore.open(_store_config(tmp_path)) as store:
        sends = IdempotentSends(store)
        request = [{"body": b"B", "props": None}]

        def build() -> list[Message]:
            return [Message("t", b"B", 0)]

        scope = trio.CancelScope()

        async def cancelled_before_writing(built: list[Message]) -> BatchAppendResult:
            scope.cancel()
            await trio.lowlevel.checkpoint()
            return await store.put_batch(built)

        with scope:
            await sends.append(7, 0, request, build, cancelled_before_writing)
        assert scope.cancelled_caught and store.commit_log.max_offset == 0
        again = await sends.append(7, 0, request, build, store.put_batch)
        assert not again.duplicate and again.offsets == [0]
        assert store.commit_log.max_offset == again.end_offset, "stored once"


async def test_a_bump_survives_another_producers_cancelled_append(tmp_path: Path) -> None:
    """A producer started again with its id (epoch 1) fences its zombie (epoch 0), also
    after an unrelated append was cancelled on the same master. Failed when a cancelled
    append dropped the whole state (the zombie's send was accepted)."""
    async with MessageStore.open(_store_config(tmp_path)) as store:
        sends = IdempotentSends(store)

        def build() -> list[Message]:
            return [Message("t", b"z", 0)]

        request = [{"body": b"z", "props": None}]
        await sends.append(7, 0, request, build, store.put_batch)
        assert await sends.restart(7, 0) == 1
        with pytest.raises(SendRefused) as before:
            await sends.append(7, 1, request, build, store.put_batch)
        assert before.value.status is Status.PRODUCER_FENCED
        await _cancel_after_writing(sends, store, 8)
        with pytest.raises(SendRefused) as after:
            await sends.append(7, 2, request, build, store.put_batch)
        assert after.value.status is Status.PRODUCER_FENCED


async def test_an_append_failing_after_writing_is_still_recognised(tmp_path: Path) -> None:
    """The batch is written, then indexing it fails (a queue file cannot be made): the
    error is the answer, and the resend is a duplicate, not a second copy. Failed when
    only a cancelled append looked in the log (the claim was given up, stored twice)."""
    async with MessageStore.open(_store_config(tmp_path)) as store:
        sends = IdempotentSends(store)
        request = [{"body": b"C", "props": None}]

        def build() -> list[Message]:
            return [Message("t", b"C", 0)]

        async def written_then_failed(built: list[Message]) -> BatchAppendResult:
            await store.put_batch(built)
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError):
            await sends.append(7, 0, request, build, written_then_failed)
        again = await sends.append(7, 0, request, build, store.put_batch)
        assert again.duplicate and again.offsets == [0]
        assert store.commit_log.max_offset == again.end_offset, "stored once"


async def test_a_partly_stored_batch_is_never_answered_as_a_duplicate(tmp_path: Path) -> None:
    """The disk refuses a batch's write after two of its eight records (the process's
    file size limit: a real short write, then EFBIG); recovery keeps those two whole
    records, another producer appends after them, and the first producer resends. The
    resend must not be answered as a stored duplicate: the offsets after the two would
    be the other producer's records, and six of the batch's records were never stored."""
    config = attrs.evolve(_store_config(tmp_path), segment_size=4 << 20, preallocate=False)
    body = b"b" * 1024
    request = [{"body": body, "props": None}] * 8

    def build() -> list[Message]:
        return [Message("t", body, 0) for _ in range(8)]

    async with MessageStore.open(config) as store:
        filled = await store.put_batch([Message("t", b"f" * 1024, 0) for _ in range(3000)])
        record = filled.offsets[1] - filled.offsets[0]
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (filled.end_offset + 2 * record + 300, hard))
        try:
            with pytest.raises(StorageFailedError):
                await IdempotentSends(store).append(7, 0, request, build, store.put_batch)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    async with MessageStore.open(config) as store:
        assert store.commit_log.max_offset > filled.end_offset + record, "two records kept"
        sends = IdempotentSends(store)
        other = [{"body": b"o" * 1024, "props": None}] * 8
        await sends.append(9, 0, other, lambda: [Message("t", b"o" * 1024, 0)] * 8, store.put_batch)
        with pytest.raises(SendRefused, match="only partly stored") as refused:
            await sends.append(7, 0, request, build, store.put_batch)
        assert refused.value.status is Status.INTERNAL_ERROR
