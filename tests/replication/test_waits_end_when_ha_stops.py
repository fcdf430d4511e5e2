"""A write waiting for slave acks is answered when the HA service stops (a coordinated
master stepping down closes its HA port, and with it the task that expires deadlines)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from replication.master import HAService
from storage import MessageStore
from tests.replication.test_ha_stream import config_at, fill, messages

BOUND_S = 10


async def test_a_replicated_wait_ends_when_the_ha_service_stops(tmp_path: Path) -> None:
    """Fails on the old code (the wait outlives its deadline: TooSlowError): a coordinated
    master that steps down closes its HA port, which stopped the confirm offset's
    deadline timer with it, so a write's replicated wait parked there never ended, its
    client got no answer and its connection never closed. Now the waits parked, and any
    later one, answer False (the write's FLUSH_SLAVE_TIMEOUT) once the service stops."""
    async with MessageStore.open(config_at(tmp_path / "master")) as master:
        await fill(master, messages(3, seed=1))
        end = master.commit_log.max_offset
        service = HAService(master)
        parked = trio.Event()
        answers: list[bool] = []
        async with trio.open_nursery() as nursery:
            serving = trio.CancelScope()

            async def serve(*, task_status: trio.TaskStatus[int]) -> None:
                with serving:
                    await service.serve("127.0.0.1", 0, task_status=task_status)

            async def wait_for_slaves() -> None:
                answers.append(await service.wait_replicated(end, trio.current_time() + 3600))
                parked.set()

            await nursery.start(serve)
            nursery.start_soon(wait_for_slaves)
            await trio.testing.wait_all_tasks_blocked()
            serving.cancel()  # the port closes, as Coordinator._close_ha_port does
            with trio.fail_after(BOUND_S):
                await parked.wait()
                later = await service.wait_replicated(end, trio.current_time() + 3600)
        assert answers == [False]
        assert later is False
        assert service.replicated_now(0)  # what was confirmed stays confirmed
