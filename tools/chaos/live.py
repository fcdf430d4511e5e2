"""The live progress view of a chaos run: elapsed time, operations per second, the faults
active and the current master. With ``rich`` installed it is one refreshing panel; without
it (or when the output is not a terminal) a plain line every few seconds."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, Final, TextIO

import trio

from tools.chaos.workload import Recorder

if TYPE_CHECKING:
    from tools.chaos.nemesis import Nemesis

__all__ = ["ProgressView"]

PLAIN_EVERY_S: Final = 5.0
RICH_EVERY_S: Final = 0.5


class ProgressView:
    """Reads the recorder's counters, the nemesis's active faults and the observed master;
    writes them to ``out``. One task runs :meth:`run`; :meth:`finish` ends the display."""

    def __init__(
        self,
        recorder: Recorder,
        nemesis: Nemesis,
        master: list[str | None],
        duration_s: float,
        out: TextIO,
        *,
        enabled: bool = True,
    ) -> None:
        self.recorder = recorder
        self.nemesis = nemesis
        self.master = master
        self.duration_s = duration_s
        self.out = out
        self.enabled = enabled
        self._live: Any = None
        self._last_acked = 0
        self._last_s = 0.0

    def line(self) -> str:
        now_s = self.recorder.now_s()
        stats = self.recorder.stats
        span = max(now_s - self._last_s, 1e-6)
        rate = (stats.acked - self._last_acked) / span
        self._last_acked, self._last_s = stats.acked, now_s
        faults = ", ".join(
            f"{a.planned.kind}({','.join(a.targets)})" for a in self.nemesis.active.values()
        )
        return (
            f"[{now_s:6.1f}/{self.duration_s:g}s] acked {stats.acked} ({rate:.0f}/s) "
            f"failed {stats.failed} unknown {stats.unknown} read {stats.polled} | "
            f"master {self.master[0] or '-'} | faults: {faults or 'none'}"
        )

    async def run(self) -> None:
        if not self.enabled:
            return
        use_rich = importlib.util.find_spec("rich") is not None and self.out.isatty()
        if use_rich:
            rich_live: Any = importlib.import_module("rich.live")
            self._live = rich_live.Live("", refresh_per_second=4, transient=False)
            self._live.start()
        try:
            while True:
                await trio.sleep(RICH_EVERY_S if use_rich else PLAIN_EVERY_S)
                if self._live is not None:
                    self._live.update(self.line())
                else:
                    print(self.line(), file=self.out, flush=True)
        finally:
            self.finish()

    def finish(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
