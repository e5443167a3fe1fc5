"""The thread a Unicorn machine in lock-step runs its long quanta on (see :mod:`.lockstep`).

A quantum too long for the event loop used to get a thread of its own: creating, starting
and joining one cost ~1 ms, more than the emulation of a 100k-instruction quantum. A
:class:`QuantumThread` is started at the first long quantum and kept: each quantum is
handed over through a queue and its end comes back to the awaiting event loop through
``call_soon_threadsafe`` (tens of microseconds both ways). One job at a time (the machine's
lock-step part awaits each). The thread ends when its machine leaves lock-step
(:meth:`QuantumThread.close`) or after :data:`IDLE_EXIT_S` without work, so a machine
dropped without ``end()`` leaves no thread behind for long; the next job starts a new one.
Its name does not start with ``unicorn-``: an idle one emulates nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable

IDLE_EXIT_S = 5.0  # an idle thread ends after this long; the next quantum starts another


class QuantumThread:
    """Runs jobs (``fn()`` that never raises) one at a time on one long-lived thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._guard = threading.Lock()
        # the running thread's queue (None: no thread); a None job tells it to end
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] | None = None

    def submit(self, fn: Callable[[], None]) -> asyncio.Future[None]:
        """Run ``fn`` on the thread; the future (of the running loop) is done when it returned."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def job() -> None:
            try:
                fn()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(finished)

        with self._guard:
            jobs = self._jobs
            if jobs is None:
                jobs = queue.SimpleQueue()
                thread = threading.Thread(target=self._main, args=(jobs,), name=self._name, daemon=True)
                thread.start()  # RuntimeError when no thread can be started: nothing queued
                self._jobs = jobs
            jobs.put(job)
        return done

    def close(self) -> None:
        """The thread ends once the job it runs (if any) has returned."""
        with self._guard:
            jobs, self._jobs = self._jobs, None
        if jobs is not None:
            jobs.put(None)

    def _main(self, jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while True:
            try:
                job = jobs.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._guard:  # a job queued meanwhile is taken below, not lost
                    if jobs.empty():
                        if self._jobs is jobs:
                            self._jobs = None
                        return
                continue
            if job is None:
                return
            job()


async def settle(done: asyncio.Future[None], timeout: float) -> bool:
    """Wait up to ``timeout`` for ``done``, also when the caller is cancelled meanwhile (its
    CancelledError is raised afterwards): a caller never leaves a job running behind it
    while believing it stopped. True when it is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    cancelled: asyncio.CancelledError | None = None
    while not done.done():
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            await asyncio.wait({done}, timeout=left)
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled
    return done.done()
