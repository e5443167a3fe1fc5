"""A recorder of a driver's MachineEvents, for tests that drive a Machine directly
(below the API): it keeps the console bytes, the stops and the failures, and lets a test
wait for the next one on a condition, never by sleeping."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from machineserver.server.drivers.base import StopInfo


class Recorder:
    """MachineEvents that records everything (called from the driver's threads)."""

    def __init__(self) -> None:
        self.console = bytearray()
        self.stops: list[StopInfo] = []
        self.failures: list[str] = []
        self._cond = threading.Condition()

    def console_output(self, data: bytes) -> None:
        with self._cond:
            self.console += data
            self._cond.notify_all()

    def stopped(self, info: StopInfo) -> None:
        with self._cond:
            self.stops.append(info)
            self._cond.notify_all()

    def failed(self, reason: str) -> None:
        with self._cond:
            self.failures.append(reason)
            self._cond.notify_all()

    def _wait(self, pred: Callable[[], object], timeout: float) -> bool:
        with self._cond:
            return bool(self._cond.wait_for(pred, timeout))

    async def wait_stop(self, n: int = 1, wait_s: float = 20.0) -> StopInfo:
        """The n-th stop (1-based), once it came; fails on a driver failure or timeout."""
        ok = await asyncio.to_thread(self._wait, lambda: len(self.stops) >= n or self.failures, wait_s)
        assert not self.failures, self.failures
        assert ok, f"no stop after {wait_s}s; console={bytes(self.console)!r}"
        return self.stops[n - 1]

    async def wait_console(self, text: bytes, wait_s: float = 20.0) -> None:
        ok = await asyncio.to_thread(self._wait, lambda: text in self.console, wait_s)
        assert ok, f"{text!r} not seen; console={bytes(self.console)!r}"
