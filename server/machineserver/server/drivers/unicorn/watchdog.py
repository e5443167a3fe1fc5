"""One thread that ends uncounted slices of every machine when their time is up.

Unicorn's own ``emu_start(timeout=...)`` stops from a thread of its own at any moment,
also in the middle of an MMIO access, which then replays (see
``UnicornMachine.mmio_access``). This watchdog instead calls
``UnicornMachine.watchdog_stop``, which takes the machine's MMIO lock first."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Protocol


class Stoppable(Protocol):
    def watchdog_stop(self, slice_id: int) -> None: ...


class SliceWatchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Stoppable, int]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, machine: Stoppable, slice_id: int) -> None:
        """Call ``machine.watchdog_stop(slice_id)`` at ``deadline`` (perf_counter time)."""
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), machine, slice_id))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="unicorn-watchdog")
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, _, machine, slice_id = self._heap[0]
                delay = deadline - time.perf_counter()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            machine.watchdog_stop(slice_id)


WATCHDOG = SliceWatchdog()
