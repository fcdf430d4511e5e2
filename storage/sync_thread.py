"""A dedicated thread for the fsyncs that acknowledgements wait on.

``trio.to_thread.run_sync`` costs about 100 us per round trip on the dev VM even
for a no-op; a long-lived thread fed through a queue costs about 70 us (two
thread wake-ups). Group-commit latency is fsync plus this hand-off, so the
commit log keeps its own thread, like RocketMQ's GroupCommitService thread.

:meth:`SyncThread.submit` goes further for group commit: the request is queued from
plain (non-async) code and the answer is a callback on the event loop, so starting an
fsync costs no scheduler pass and its end wakes the acknowledged writes directly, with
no task of the flusher's own in between.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")
_STOP = object()


class SyncThread:
    """Runs blocking callables one at a time on one thread; started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while True:
            request = self._requests.get()
            if request is _STOP:
                return
            fn, done = request
            done(outcome.capture(fn))

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def submit(self, fn: Callable[[], T], on_done: Callable[[outcome.Outcome[T]], None]) -> None:
        """Queue ``fn`` for the thread and return at once; ``on_done(outcome)`` runs later
        on this trio loop (a ``run_sync_soon`` callback: it must not block or raise).
        Call from the loop's thread. If the loop has ended by then, nobody is told."""
        self._start()
        token = trio.lowlevel.current_trio_token()

        def done(result: outcome.Outcome[T]) -> None:
            try:
                token.run_sync_soon(on_done, result)
            except trio.RunFinishedError:
                return

        self._requests.put((fn, done))

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the thread and return its result (or raise its exception).

        Not cancellable once submitted, like ``trio.to_thread.run_sync``: an fsync
        cannot be taken back, and its outcome must be seen by whoever asked.
        """
        self._start()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def done(result: outcome.Outcome) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._requests.put((fn, done))
        return await trio.lowlevel.wait_task_rescheduled(
            lambda _raise_cancel: trio.lowlevel.Abort.FAILED
        )

    def stop(self, *, wait: bool = False) -> None:
        """Let the thread exit after the requests already queued; with ``wait``, block
        until it has (at most the fsyncs already queued: the owner closes the files next,
        and an fsync must not outlive its file descriptor)."""
        thread = self._thread
        if thread is not None:
            self._requests.put(_STOP)
            self._thread = None
            if wait:
                thread.join()
