"""One thread that ends uncounted slices of every machine when their time is up.

Unicorn's own ``emu_start(timeout=...)`` stops from a thread of its own at any moment,
also in the middle of an MMIO access, which then replays (see
:meth:`.slicer.Slicer.mmio_read`). This watchdog instead calls ``Slicer.watchdog_stop``,
which takes the machine's MMIO lock first. It never waits for that lock: when an access
holds it, the stop is tried again shortly after (:data:`BUSY_RETRY_S`), so one machine whose
model is stuck inside an access cannot hold up the slices of the others.

The thread is started on demand and ends after :data:`IDLE_EXIT_S` without work; the
watchdog object owns it and joins each ended thread before it starts the next.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Protocol

BUSY_RETRY_S = 0.001
IDLE_EXIT_S = 2.0


class Stoppable(Protocol):
    def watchdog_stop(self, slice_id: int) -> bool:
        """Stop slice ``slice_id`` if it is still running; False when that cannot be
        decided now (an MMIO access is in progress): try again later."""


class SliceWatchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Stoppable, int]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None  # the running thread
        self._retired: threading.Thread | None = None  # one that left its loop, not joined yet

    def arm(self, deadline: float, machine: Stoppable, slice_id: int) -> None:
        """Call ``machine.watchdog_stop(slice_id)`` at ``deadline`` (perf_counter time)."""
        ended: threading.Thread | None = None
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), machine, slice_id))
            if self._thread is None:
                ended, self._retired = self._retired, None
                self._thread = threading.Thread(target=self._run, daemon=True, name="unicorn-watchdog")
                self._thread.start()
            self._cond.notify()
        if ended is not None:
            ended.join()  # it has left its loop (idle exit): returns at once

    @property
    def running(self) -> bool:
        with self._cond:
            return self._thread is not None

    def _run(self) -> None:
        while True:
            with self._cond:
                idle_since = time.perf_counter()
                while not self._heap:
                    if time.perf_counter() - idle_since >= IDLE_EXIT_S:
                        # decided under the lock: the next arm() starts a new thread
                        # and joins this one
                        self._retired, self._thread = self._thread, None
                        return
                    self._cond.wait(IDLE_EXIT_S)
                deadline, _, machine, slice_id = self._heap[0]
                delay = deadline - time.perf_counter()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            try:
                done = machine.watchdog_stop(slice_id)
            except Exception:  # never let one machine end the thread every machine needs
                done = True
            if not done:
                with self._cond:
                    heapq.heappush(self._heap, (time.perf_counter() + BUSY_RETRY_S, next(self._seq),
                                                machine, slice_id))


WATCHDOG = SliceWatchdog()
