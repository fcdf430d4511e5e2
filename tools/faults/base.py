"""The shape every fault shares: ``inject()`` starts it, ``heal()`` undoes it, and
``async with fault:`` does both, healing even when the body fails or is cancelled.

A fault logs one line per transition with key=value fields, so a run's log says what
was done to whom and when it was undone.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from types import TracebackType

import trio

__all__ = ["Composite", "Fault", "describe"]

log = logging.getLogger("tools.faults")


def describe(fields: dict[str, object]) -> str:
    """``key=value`` pairs in a stable order, for log lines and reports."""
    return " ".join(f"{key}={value}" for key, value in fields.items())


class Fault(abc.ABC):
    """One fault with a clean undo.

    Invariants: ``active`` is true exactly between a successful ``inject()`` and the
    ``heal()`` that follows; ``heal()`` on a fault that is not active does nothing, so a
    cleanup path may always call it. Calls come from tasks of one trio run; a fault is
    not meant to be injected twice at once.
    """

    kind: str = "fault"

    def __init__(self) -> None:
        self.active = False

    def fields(self) -> dict[str, object]:
        """What this fault acts on, for the log (subclasses add their targets)."""
        return {}

    @abc.abstractmethod
    async def _inject(self) -> None:
        """Make the fault hold (called once per activation)."""

    @abc.abstractmethod
    async def _heal(self) -> None:
        """Undo exactly what :meth:`_inject` did."""

    async def inject(self) -> None:
        if self.active:
            raise RuntimeError(f"{self.kind} fault is already active ({describe(self.fields())})")
        await self._inject()
        self.active = True
        log.info("fault injected kind=%s %s", self.kind, describe(self.fields()))

    async def heal(self) -> None:
        if not self.active:
            return
        await self._heal()
        self.active = False
        log.info("fault healed kind=%s %s", self.kind, describe(self.fields()))

    async def __aenter__(self) -> Fault:
        await self.inject()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True):
            await self.heal()


class Composite(Fault):
    """Several faults as one: injected in order, healed in reverse order (for instance
    kill-while-partitioned = ``Composite([partition, kill])``). If one fails to inject,
    the ones already injected are healed before the error propagates."""

    kind = "composite"

    def __init__(self, parts: Sequence[Fault], *, kind: str | None = None) -> None:
        super().__init__()
        assert parts, "a composite fault needs at least one part"
        self.parts = list(parts)
        if kind is not None:
            self.kind = kind

    def fields(self) -> dict[str, object]:
        return {"parts": ",".join(part.kind for part in self.parts)}

    async def _inject(self) -> None:
        done: list[Fault] = []
        try:
            for part in self.parts:
                await part.inject()
                done.append(part)
        except BaseException:
            with trio.CancelScope(shield=True):
                for part in reversed(done):
                    await part.heal()
            raise

    async def _heal(self) -> None:
        for part in reversed(self.parts):
            await part.heal()
