"""Epochs in the HA handshake: a node that comes back from a lost term cuts the tail the
new master never had and ends byte-identical to it; a clean prefix is kept; a master
that meets a slave from a newer epoch stops serving and acknowledging; and the hello
codecs round-trip and reject malformed input."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from replication.epochs import EpochEntry, EpochFile, EpochHistory
from replication.slave import HAClient
from replication.wire import (
    EPOCH_ENTRY_SIZE,
    MASTER_HELLO_SIZE,
    MAX_EPOCH_ENTRIES,
    SLAVE_HELLO_FIXED,
    HAProtocolError,
    MasterHello,
    SlaveHello,
    pack_epochs,
    pack_master_hello,
    pack_slave_hello,
    unpack_epochs,
    unpack_master_hello,
    unpack_slave_hello,
)
from storage import MessageStore
from tests.replication.test_ha_stream import (
    assert_identical,
    config_at,
    fill,
    log_bytes,
    messages,
    replicated,
    serving,
)

DEADLINE = 10.0


def history(*pairs: tuple[int, int]) -> EpochHistory:
    return EpochHistory(EpochEntry(epoch, start) for epoch, start in pairs)


async def save(file: EpochFile, value: EpochHistory) -> None:
    await trio.to_thread.run_sync(file.save, value)


async def load(file: EpochFile) -> EpochHistory:
    return await trio.to_thread.run_sync(file.load)


async def replicate_once(
    master: MessageStore,
    master_history: EpochHistory,
    slave: MessageStore,
    slave_history: EpochHistory,
    slave_file: EpochFile,
) -> HAClient:
    """Serve ``master`` to one epoch-aware client until it holds the master's whole log,
    then tear both ends down (the slave is disconnected when this returns)."""
    async with serving(master, history=master_history) as (service, port, nursery):
        client = HAClient(slave, "peer", history=slave_history, epoch_file=slave_file)
        nursery.start_soon(client.run, "127.0.0.1", port)
        assert await replicated(service, master.commit_log.max_offset)
        assert service.stale is None
    return client


async def test_divergent_tail_is_cut_and_replaced_by_the_new_masters_log(
    tmp_path: Path,
) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "a")) as a,
        MessageStore.open(config_at(tmp_path / "b")) as b,
    ):
        a_file, b_file = EpochFile.in_dir(tmp_path / "a"), EpochFile.in_dir(tmp_path / "b")
        # Epoch 1: A is master and B replicates all it has.
        a_history = history((1, 0))
        await save(a_file, a_history)
        b_history = await load(b_file)
        await fill(a, messages(60, seed=10))
        common = a.commit_log.max_offset
        common_segments = len(a.commit_log.files.segments)
        await replicate_once(a, a_history, b, b_history, b_file)
        assert b.commit_log.max_offset == common
        assert await load(b_file) == history((1, 0))  # B adopted epoch 1

        # A keeps writing in epoch 1 while cut off: a tail B never gets (several segments).
        await fill(a, messages(80, seed=11))
        a_end = a.commit_log.max_offset
        assert len(a.commit_log.files.segments) > common_segments

        # B is elected for epoch 2 and writes different records.
        b_history.append(2, b.commit_log.max_offset)
        await save(b_file, b_history)
        await fill(b, messages(50, seed=12))
        assert b.commit_log.max_offset != a_end

        # A comes back as B's slave: cut to the common prefix, then catch up.
        client = await replicate_once(b, b_history, a, a_history, a_file)
        assert client.last_truncation == (a_end, common)
        assert client.master_history == history((1, 0), (2, common))
        assert_identical(b, a)
        assert log_bytes(a) == log_bytes(b)
        assert a_history == b_history
        assert await load(a_file) == history((1, 0), (2, common))


async def test_clean_prefix_is_kept_and_learns_the_newer_epoch(tmp_path: Path) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "a")) as a,
        MessageStore.open(config_at(tmp_path / "b")) as b,
    ):
        b_file = EpochFile.in_dir(tmp_path / "b")
        a_history = history((1, 0))
        b_history = EpochHistory()
        await fill(a, messages(30, seed=20))
        await replicate_once(a, a_history, b, b_history, b_file)
        prefix = b.commit_log.max_offset
        # A writes more in epoch 1, then (re-elected) starts epoch 2 and writes again.
        await fill(a, messages(30, seed=21))
        a_history.append(2, a.commit_log.max_offset)
        epoch2 = a.commit_log.max_offset
        await fill(a, messages(30, seed=22))

        truncations: list[int] = []
        original = b.truncate

        async def recording_truncate(offset: int) -> None:
            truncations.append(offset)
            await original(offset)

        b.truncate = recording_truncate  # type: ignore[method-assign]
        client = await replicate_once(a, a_history, b, b_history, b_file)
        assert truncations == []
        assert client.last_truncation is None
        assert b.commit_log.max_offset > prefix
        assert_identical(a, b)
        assert await load(b_file) == history((1, 0), (2, epoch2))


async def test_stale_master_refuses_the_newer_slave_and_stops_acknowledging(
    tmp_path: Path,
) -> None:
    async with (
        MessageStore.open(config_at(tmp_path / "old")) as old_master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(old_master, messages(20, seed=30))
        end = old_master.commit_log.max_offset
        slave_history = history((1, 0), (3, 0))  # the slave already follows epoch 3
        async with serving(old_master, history=history((1, 0), (2, 0))) as (service, port, _):
            assert service.status().stale is None
            woke: list[bool] = []
            parked = trio.Event()

            async def producer() -> None:
                parked.set()
                woke.append(await service.wait_replicated(end))  # no deadline

            async with trio.open_nursery() as waiters:
                waiters.start_soon(producer)
                await parked.wait()
                client = HAClient(slave, "s1", history=slave_history)
                with pytest.raises(HAProtocolError, match="refused"):
                    await client.run("127.0.0.1", port)
            assert woke == [False]  # the parked wait was answered, not left hanging
            assert service.stale is not None and "slave_epoch=3" in service.stale
            assert "master_epoch=2" in service.stale
            assert not await service.wait_replicated(1)  # at once, no deadline needed
            status = service.status()
            assert status.epoch == 2
            assert status.stale == service.stale
            assert status.slaves == {}
            assert service.ack_offsets == {}
        assert slave.commit_log.max_offset == 0  # nothing was streamed
        assert slave_history == history((1, 0), (3, 0))  # nor adopted


async def test_slave_with_records_but_no_history_is_refused(tmp_path: Path) -> None:
    """Its records could be anyone's: the epoch-aware master will not guess."""
    async with (
        MessageStore.open(config_at(tmp_path / "master")) as master,
        MessageStore.open(config_at(tmp_path / "slave")) as slave,
    ):
        await fill(master, messages(10, seed=40))
        await fill(slave, messages(5, seed=41))
        async with serving(master, history=history((1, 0))) as (service, port, _):
            with pytest.raises(HAProtocolError, match="refused"):
                await HAClient(slave, "s1", history=EpochHistory()).run("127.0.0.1", port)
            assert service.stale is None
            assert service.ack_offsets == {}


# ---- codecs -----------------------------------------------------------------------------------


def test_hellos_round_trip_with_and_without_epochs() -> None:
    full = history((1, 0), (2, 150), (7, (1 << 64) - 1))
    hello = unpack_slave_hello(pack_slave_hello("s-ü", 1234, full))
    assert hello == SlaveHello("s-ü", 1234, full.entries, followed_epoch=7)
    assert hello.history == full
    assert unpack_slave_hello(pack_slave_hello("s", 0)) == SlaveHello("s", 0)
    assert len(pack_slave_hello("s", 0)) == SLAVE_HELLO_FIXED + 1

    master = unpack_master_hello(pack_master_hello(99, 40, full))
    assert master == MasterHello(99, 40, full.entries)
    assert master.history == full
    # Without a history the master's hello is exactly its fixed part (what an
    # epoch-unaware reader of MASTER_HELLO_SIZE bytes expects).
    assert len(pack_master_hello(5, 5)) == MASTER_HELLO_SIZE
    assert unpack_master_hello(pack_master_hello(5, 0)) == MasterHello(5, 0)
    assert unpack_epochs(pack_epochs(full), 3) == full.entries


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00" * SLAVE_HELLO_FIXED + b"s", "magic"),
        (pack_slave_hello("s", 0)[:-1], "ends inside the name"),
        (pack_slave_hello("s", 0)[:5], "shorter"),
        (pack_slave_hello("s", 0, history((1, 0)))[:-1], "need 12 bytes"),
        (pack_slave_hello("s", 0, history((1, 0))) + b"x", "need 12 bytes"),
        (pack_slave_hello("s", 0)[:-1] + b"\xff", "not UTF-8"),
    ],
    ids=["magic", "name", "fixed", "short-epochs", "trailing", "utf8"],
)
def test_malformed_slave_hello_is_rejected(data: bytes, match: str) -> None:
    with pytest.raises(HAProtocolError, match=match):
        unpack_slave_hello(data)


def test_malformed_epochs_and_master_hello_are_rejected() -> None:
    good = bytearray(pack_slave_hello("s", 0, history((1, 0))))
    good[4:6] = (1).to_bytes(2, "big")  # version 1: before epochs
    with pytest.raises(HAProtocolError, match="version"):
        unpack_slave_hello(good)
    too_many = bytearray(pack_slave_hello("s", 0))
    count_at = SLAVE_HELLO_FIXED - 6  # the u16 count, before the u32 followed epoch
    too_many[count_at : count_at + 2] = (MAX_EPOCH_ENTRIES + 1).to_bytes(2, "big")
    with pytest.raises(HAProtocolError, match="more than"):
        unpack_slave_hello(too_many)
    out_of_order = pack_epochs(history((2, 0))) + pack_epochs(history((1, 5)))
    with pytest.raises(HAProtocolError, match="out of order"):
        unpack_epochs(out_of_order, 2)
    backwards = pack_epochs(history((1, 50))) + pack_epochs(history((2, 10)))
    with pytest.raises(HAProtocolError, match="out of order"):
        unpack_epochs(backwards, 2)
    with pytest.raises(HAProtocolError, match="shorter"):
        unpack_master_hello(pack_master_hello(1, 0)[:-1])
    with pytest.raises(HAProtocolError, match="need"):
        unpack_master_hello(pack_master_hello(1, 0, history((1, 0)))[: -EPOCH_ENTRY_SIZE // 2])
    with pytest.raises(HAProtocolError, match="past its end"):
        unpack_master_hello(pack_master_hello(1, 2))
    with pytest.raises(HAProtocolError, match="magic"):
        unpack_master_hello(pack_slave_hello("s" * 20, 0)[:MASTER_HELLO_SIZE])
    with pytest.raises(ValueError, match="do not fit"):
        pack_epochs(EpochHistory(EpochEntry(e, e) for e in range(MAX_EPOCH_ENTRIES + 1)))
    with pytest.raises(ValueError, match="u32"):
        pack_epochs(history((1 << 32, 0)))
