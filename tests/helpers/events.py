"""A recorder of a driver's MachineEvents, for tests that drive a Machine directly
(below the API): it keeps the console bytes, the stops and the failures, and lets a test
wait for the next one on a condition, woken by the event that makes it true.

Drivers call it from their own threads (Unicorn's workers) or from the event loop
(QEMU's): the waits run in a thread of their own, so both work."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from machineserver.server.drivers.base import StopInfo

# how often a wait re-checks a condition no event makes true (a process gone, a state)
RECHECK_S = 0.01


class Recorder:
    """MachineEvents that records everything."""

    def __init__(self) -> None:
        self.console = bytearray()
        self.stops: list[StopInfo] = []
        self.failures: list[str] = []
        self.guest_resets: list[str] = []
        self._cond = threading.Condition()
        self._returned = 0  # stops next_stop() has handed out

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

    def reset_by_guest(self, detail: str) -> None:
        with self._cond:
            self.guest_resets.append(detail)
            self._cond.notify_all()

    def _wait(self, pred: Callable[[], object], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, RECHECK_S))
            return True

    async def until(self, pred: Callable[[], object], timeout: float = 20.0) -> None:
        """Until ``pred()`` holds: a condition on what was recorded (checked at each
        event) or on anything else (re-checked every 10 ms); fails after ``timeout``."""
        ok = await asyncio.to_thread(self._wait, pred, timeout)
        assert ok, (f"still not true after {timeout} s: console={bytes(self.console)!r} "
                    f"stops={self.stops} failures={self.failures}")

    async def wait_stop(self, n: int = 1, wait_s: float = 20.0) -> StopInfo:
        """The n-th stop (1-based), once it came; fails on a driver failure or timeout."""
        ok = await asyncio.to_thread(self._wait, lambda: len(self.stops) >= n or self.failures, wait_s)
        assert not self.failures, self.failures
        assert ok, f"no stop after {wait_s}s; console={bytes(self.console)!r}"
        return self.stops[n - 1]

    async def next_stop(self, wait_s: float = 20.0) -> StopInfo:
        """The first stop that next_stop has not returned yet, once it came."""
        stop = await self.wait_stop(self._returned + 1, wait_s)
        self._returned += 1
        return stop

    async def wait_console(self, text: bytes, wait_s: float = 20.0) -> None:
        ok = await asyncio.to_thread(self._wait, lambda: text in self.console, wait_s)
        assert ok, f"{text!r} not seen; console={bytes(self.console)!r}"
