"""How the blocking client's calls cross from their threads into its event loop, cheaply.

anyio's ``BlockingPortal.call`` costs two thread handoffs per call (the caller waits for
the loop to spawn a task, then for its result) plus a task-group spawn; with many threads
each sending one message per call that crossing was most of the blocking client's CPU.
Here a call is one entry in a queue: the first call into an empty queue wakes the loop
once (``call_soon_threadsafe`` / trio's ``run_sync_soon``), the loop starts a plain task
per queued call, and each caller sleeps on a lock of its own that its task releases.

Async context managers (consumers) entered from a thread are held by a task of the
crossing too (:meth:`Crossing.hold`), so closing leaves them as well.

Closing (the ``with connect()`` block exiting) refuses new calls, ends every call still
queued or running with :class:`ClientClosedError` and leaves every held context: no
caller is left waiting.
"""

from __future__ import annotations

import _thread
import asyncio
import contextvars
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from inspect import isawaitable
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

import anyio
import sniffio

from cluster.client.errors import TidelogError

__all__ = ["ClientClosedError", "Crossing", "open_crossing"]

T = TypeVar("T")

_CLOSED_BEFORE: Final = (
    "the blocking client is closed (its `with connect()` block has exited), so this call "
    "was not made: make calls inside the block"
)
_CLOSED_DURING: Final = (
    "the blocking client closed (its `with connect()` block exited) while this call was "
    "pending; it was cancelled, so a send's outcome is unknown: keep calls inside the block"
)


class ClientClosedError(TidelogError):
    """A blocking client's call made after, or still pending when, the client closed."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class _Call:
    """One call crossing into the loop: its caller holds ``done`` locked until it ends."""

    __slots__ = ("context", "done", "error", "function", "result")

    def __init__(self, function: Callable[[], Any]) -> None:
        self.function = function
        self.context = contextvars.copy_context()  # the caller's, as anyio's portal passes it
        self.done = _thread.allocate_lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None


class Crossing:
    """The queue of calls from other threads into one event loop.

    Any thread but the loop's may :meth:`call` at any time, also while or after it closes
    (then the call raises :class:`ClientClosedError`). Only the loop runs ``_drain``,
    ``_run`` and ``_close``. Invariant: a call not yet answered is in ``_queue`` with a
    drain scheduled, or in ``_in_flight`` with a task spawned for it; closing empties
    both, so every caller is released.
    """

    def __init__(
        self,
        schedule: Callable[[Callable[[], None]], object],
        spawn: Callable[..., None],
        cancelled: type[BaseException],
    ) -> None:
        self._schedule = schedule  # thread-safe: run this callback in the loop soon
        self._spawn = spawn  # in the loop: spawn(async_fn, *args) starts a task of ours
        self._cancelled = cancelled
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._in_flight: set[_Call] = set()  # spawned, caller not yet released (loop only)
        self._drain_scheduled = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def call(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` run in the loop (awaited when it returns an
        awaitable); blocks the calling thread for its result or raises its exception."""
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "a blocking client call made from the client's own event loop thread would "
                "wait for itself forever: code running in that loop must await the async "
                "client (SyncClient.client) instead"
            )
        call = _Call((lambda: function(*args, **kwargs)) if args or kwargs else function)
        with self._lock:
            if self._closed:
                raise ClientClosedError(_CLOSED_BEFORE)
            self._queue.append(call)
            if not self._drain_scheduled:
                try:
                    self._schedule(self._drain)
                except Exception as error:  # the loop has ended without closing us
                    self._queue.remove(call)
                    raise ClientClosedError(_CLOSED_BEFORE) from error
                self._drain_scheduled = True
        call.done.acquire()
        failure = call.error
        if failure is not None:
            try:
                raise failure
            finally:
                call.error = failure = None
        return call.result

    def _drain(self) -> None:
        with self._lock:
            calls, self._queue = self._queue, []
            self._drain_scheduled = False
        self._in_flight.update(calls)
        for call in calls:
            call.context.run(self._spawn, self._run, call)

    async def _run(self, call: _Call) -> None:
        try:
            result = call.function()
            call.result = (await result) if isawaitable(result) else result
        except self._cancelled as cancelled:
            if self._closed:  # closing cancelled it
                call.error = ClientClosedError(_CLOSED_DURING)
                call.error.__cause__ = cancelled
            else:  # the call cancelled itself: its caller sees that, as from anyio's portal
                call.error = cancelled
            raise
        except BaseException as error:
            call.error = error
            if not isinstance(error, Exception):
                raise  # as anyio's portal: KeyboardInterrupt and the like end the loop too
        finally:
            self._in_flight.discard(call)
            call.done.release()

    def _release_abandoned(self) -> None:
        """After closing cancelled every task: end the calls whose task was cancelled
        before it ran (asyncio never starts such a coroutine, so its finally never ran)."""
        abandoned, self._in_flight = self._in_flight, set()
        for call in abandoned:
            call.error = ClientClosedError(_CLOSED_DURING)
            call.done.release()

    def hold(self, manager: AbstractAsyncContextManager[T]) -> AbstractContextManager[T]:
        """``manager`` entered and left from a thread, held open by a task of the loop."""
        return _Held(self, manager)

    def _close(self) -> None:
        """Refuse new calls and release the callers of queued ones; the opener then
        cancels the running ones."""
        with self._lock:
            self._closed = True
            queued, self._queue = self._queue, []
        for call in queued:
            call.error = ClientClosedError(_CLOSED_BEFORE)
            call.done.release()


class _Held(Generic[T]):
    """An async context manager entered and left from one thread. Its ``__aenter__`` and
    ``__aexit__`` run in one task of the crossing (a task group inside it needs that);
    closing the crossing cancels that task, which leaves the context then, and a later
    ``__exit__`` only returns."""

    def __init__(self, crossing: Crossing, manager: AbstractAsyncContextManager[T]) -> None:
        self._crossing = crossing
        self._manager = manager
        self._exit_info: tuple[Any, Any, Any] = (None, None, None)
        self._error: BaseException | None = None
        self._suppress: bool | None = None

    def __enter__(self) -> T:
        return self._crossing.call(self._start)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        try:
            return self._crossing.call(self._leave, (exc_type, exc, traceback))
        except ClientClosedError:  # closing leaves (or has left) the context itself
            return None

    async def _start(self) -> T:
        entered, self._leaving, self._left = anyio.Event(), anyio.Event(), anyio.Event()
        self._crossing._spawn(self._hold, entered)
        await entered.wait()
        if self._error is not None:
            raise self._error
        return self._value

    async def _hold(self, entered: anyio.Event) -> None:
        try:
            self._value = await self._manager.__aenter__()
        except BaseException as error:
            self._error = (
                error if isinstance(error, Exception) else ClientClosedError(_CLOSED_DURING)
            )
            if isinstance(error, Exception):
                return
            raise
        finally:
            entered.set()
        exit_info: tuple[Any, Any, Any] = (None, None, None)
        try:
            await self._leaving.wait()
            exit_info = self._exit_info
        except BaseException:  # cancelled: the crossing closes
            exit_info = sys.exc_info()
            raise
        finally:
            try:
                self._suppress = await self._manager.__aexit__(*exit_info)
            except Exception as error:
                self._error = error
            finally:
                self._left.set()

    async def _leave(self, exit_info: tuple[Any, Any, Any]) -> bool | None:
        self._exit_info = exit_info
        self._leaving.set()
        await self._left.wait()
        if self._error is not None:
            raise self._error
        return self._suppress


@asynccontextmanager
async def open_crossing() -> AsyncIterator[Crossing]:
    """A :class:`Crossing` into the running loop (trio or asyncio) for the ``async with``
    block; leaving it ends every pending call (:class:`ClientClosedError`) and waits for
    their tasks."""
    cancelled = anyio.get_cancelled_exc_class()
    if sniffio.current_async_library() == "trio":
        import trio  # under trio only: the blocking client runs on asyncio without it

        token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            crossing = Crossing(token.run_sync_soon, nursery.start_soon, cancelled)
            try:
                yield crossing
            finally:
                crossing._close()
                nursery.cancel_scope.cancel()
        crossing._release_abandoned()
        return

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def start_asyncio_task(async_fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        # Named in the task's context (the caller's copy) as anyio's portal does: anyio
        # asks sniffio which loop runs at every checkpoint, and without the name sniffio
        # looks for the asyncio task each time.
        sniffio.current_async_library_cvar.set("asyncio")
        tasks.add(loop.create_task(tracked(async_fn, *args)))

    async def tracked(async_fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        task = asyncio.current_task()
        try:
            await async_fn(*args)
        finally:  # cheaper than a done callback: that costs the loop a handle per task
            tasks.discard(task)

    crossing = Crossing(loop.call_soon_threadsafe, start_asyncio_task, cancelled)
    try:
        yield crossing
    finally:
        crossing._close()
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            while tasks:  # a task cancelled before it ran never reached its finally
                finished, _ = await asyncio.wait(set(tasks))
                tasks.difference_update(finished)
        crossing._release_abandoned()
