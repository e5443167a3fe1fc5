"""Run control on Unicorn: run, pause and step, on one worker thread this part owns.

``run()`` starts a worker thread that runs slices (:mod:`.slicer`) until the machine stops
by itself (breakpoint, watchpoint, exit, fault: reported through ``events.stopped``) or a
pause is requested (then :meth:`UnicornRunControl.pause` returns the stop; no event).
Between slices the worker yields the machine's lock to waiting debugger calls
(:class:`~.context.HandOffLock`).

``step(count)`` runs counted slices of at most ``count`` instructions in all: inline on
the event loop for a few instructions (microseconds), else on a worker thread, with the
machine RUNNING meanwhile. Its stop is returned, never sent as an event.

Every worker is joined by its owner (this part). Cancelling the task that awaits
``step()`` or ``pause()`` requests a pause, waits for the worker to end, leaves the machine
HALTED (or EXITED/FAULTED when that came first) and re-raises CancelledError. A worker
that does not end within :data:`JOIN_TIMEOUT_S` is stuck inside the engine or a model: the
machine goes FAILED (``events.failed``, once) and its engine is kept, not freed, while that
thread may still be inside it; once the thread ends, ``reset()`` or ``power_off()`` work
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from machineserver.server.drivers.base import (
    BackendFailed,
    BadRequest,
    MachineState,
    RunControl,
    StopInfo,
    StopReason,
    WrongState,
    kept_stop,
)
from machineserver.server.drivers.unicorn.breakpoints import UnicornBreakpoints
from machineserver.server.drivers.unicorn.context import MachineContext
from machineserver.server.drivers.unicorn.slicer import Slicer

JOIN_TIMEOUT_S = 10.0  # how long a pause waits for the worker before calling it stuck
STUCK_RETRY_S = 0.5  # how long later calls wait for a worker already found stuck
SYNC_STEP_LIMIT = 64  # steps up to this many instructions run inline (microseconds)
IDLE_POLL_S = 0.02  # a run loop asleep in WFI with no timer looks at its UARTs this often


class Worker:
    """One emulation thread (a run, or a long step) and the future its owner awaits."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self._target()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        self.thread.join(1.0)  # it has nothing left to do but return
        if not self._done.done():
            self._done.set_result(None)

    @property
    def native_id(self) -> int | None:
        return self.thread.native_id if self.thread.is_alive() else None

    async def wait(self, timeout: float | None) -> bool:
        """Until the thread has ended (True) or ``timeout`` passed (False). Cancelling the
        caller cancels the wait, not the thread."""
        if asyncio.get_running_loop() is self._loop:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._done), timeout)
        else:  # awaited from another event loop: its future cannot be awaited here
            await asyncio.to_thread(self.thread.join, timeout)
        if not self.thread.is_alive():
            self.thread.join()  # ended: returns at once
        return not self.thread.is_alive()

    async def settle(self, timeout: float) -> bool:
        """Like :meth:`wait`, but a cancelled caller goes on waiting (up to ``timeout``)
        and gets its CancelledError afterwards: the thread is never left running behind a
        caller that believes it stopped it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                ended = await self.wait(max(deadline - loop.time(), 0.0))
                break
            except asyncio.CancelledError as exc:
                cancelled = exc
        if cancelled is not None:
            raise cancelled
        return ended


class UnicornRunControl(RunControl):
    def __init__(self, ctx: MachineContext, slicer: Slicer, breakpoints: UnicornBreakpoints) -> None:
        self._ctx = ctx
        self._slicer = slicer
        self._breakpoints = breakpoints
        self._worker: Worker | None = None
        self._stuck = False  # the current worker outlived a join once
        self._last_stop: StopInfo | None = None
        # the worker publishing its stop vs the owner declaring it stuck: one wins
        self._finish_guard = threading.Lock()
        self._failure = ""

    def worker_thread_id(self) -> int | None:
        """The native id of the thread emulating now, if any (HostFootprint)."""
        worker = self._worker
        return worker.native_id if worker is not None else None

    # ------------------------------------------------------------------ for the machine
    async def halt(self) -> StopInfo | None:
        """Stop the worker, if there is one, and join it: afterwards no thread is inside
        the engine. Returns where the worker stopped (None: there was none). BackendFailed
        when it does not end in time (the machine is FAILED then)."""
        worker = self._worker
        if worker is None:
            return None
        self._ctx.halt_request.set()
        self._ctx.wake.set()
        if not await worker.settle(STUCK_RETRY_S if self._stuck else JOIN_TIMEOUT_S):
            self._declare_stuck()
            raise BackendFailed(self._failure)
        if self._worker is worker:
            self._worker, self._stuck = None, False
            self._ctx.worker_stuck = False
        return self._last_stop

    def _declare_stuck(self) -> None:
        ctx = self._ctx
        with self._finish_guard:
            first = not self._stuck
            self._stuck = ctx.worker_stuck = True
            if first:
                self._failure = (f"the unicorn worker thread did not stop within {JOIN_TIMEOUT_S:g} s "
                                 "(stuck inside the emulator or a peripheral model); its engine is "
                                 "kept until that thread ends")
                ctx.state = MachineState.FAILED
        if first:
            ctx.events.failed(self._failure)

    def _finish(self, stop: StopInfo) -> bool:
        """The worker's last word (lock held): the state the stop leaves. False when the
        worker was declared stuck meanwhile (its stop is then nobody's)."""
        ctx = self._ctx
        with self._finish_guard:
            if self._stuck or ctx.state != MachineState.RUNNING:
                return False
            if stop.reason == StopReason.EXIT:
                ctx.state = MachineState.EXITED
            elif stop.reason == StopReason.FAULT:
                ctx.state = MachineState.FAULTED
            else:
                ctx.state = MachineState.HALTED
            self._last_stop = stop
            return True

    def _fail(self, reason: str) -> None:
        """The worker hit an error of ours (not the guest's): FAILED, reported once."""
        ctx = self._ctx
        with self._finish_guard:
            if self._stuck:
                return
            ctx.state = MachineState.FAILED
            self._failure = reason
        ctx.events.failed(reason)

    def _start(self, target: Callable[[], None], name: str) -> Worker:
        """A new worker (the machine is RUNNING already)."""
        self._last_stop = None
        try:
            self._worker = Worker(target, name)
        except RuntimeError as exc:  # no thread can be started
            self._ctx.state = MachineState.HALTED
            raise BackendFailed(f"cannot start the unicorn worker thread: {exc}") from None
        return self._worker

    def _halt_here(self) -> StopInfo:
        inst = self._ctx.instance
        return StopInfo(StopReason.HALT, pc=inst.core.pc() if inst is not None else 0)

    # ------------------------------------------------------------------ RunControl
    async def run(self) -> None:
        ctx = self._ctx
        if ctx.state == MachineState.RUNNING:
            return
        ctx.require(MachineState.HALTED)
        await self.halt()  # a worker that ended by itself: join it
        with ctx.lock:
            inst = ctx.instance
            assert inst is not None  # HALTED
            self._breakpoints.step_off(inst.core.pc())
        self._ctx.halt_request.clear()
        ctx.wake.clear()
        ctx.state = MachineState.RUNNING
        self._start(self._run_loop, f"unicorn-{ctx.board.name}")

    def _run_loop(self) -> None:
        ctx = self._ctx
        stop: StopInfo | None = None
        try:
            while stop is None and not self._ctx.halt_request.is_set():
                with ctx.lock.worker_turn():
                    advance = self._slicer.advance(None)
                stop = advance.stop
                if advance.idle and stop is None:
                    ctx.wake.wait(IDLE_POLL_S)
                    ctx.wake.clear()
            with ctx.lock:
                ctx.console.flush()
                paused = stop is None
                stop = self._halt_here() if stop is None else stop
                published = self._finish(stop)
        except Exception as exc:
            self._fail(f"unicorn run loop failed: {exc!r}")
            return
        if published and not paused:  # pause() returns a paused stop itself
            ctx.events.stopped(stop)

    async def stop_reached(self) -> StopInfo | None:
        stop = self._last_stop
        if self._ctx.state in (MachineState.EXITED, MachineState.FAULTED) and stop is not None \
                and stop.reason in (StopReason.EXIT, StopReason.FAULT):
            return stop
        return None

    async def pause(self) -> StopInfo:
        ctx = self._ctx
        ctx.require(MachineState.HALTED, MachineState.RUNNING, MachineState.EXITED, MachineState.FAULTED)
        if ctx.state == MachineState.RUNNING:
            stop = await self.halt()
            if stop is not None:
                return stop
        if ctx.state == MachineState.FAILED:  # the worker failed (reported) instead of stopping
            raise BackendFailed(self._failure)
        return await ctx.locked("read the pc", lambda inst: StopInfo(StopReason.HALT, pc=inst.core.pc()))

    async def step(self, count: int = 1) -> StopInfo:
        ctx = self._ctx
        ctx.require(MachineState.HALTED)
        if count < 1:
            raise BadRequest("count must be at least 1", field="count")
        await self.halt()
        self._ctx.halt_request.clear()
        ctx.state = MachineState.RUNNING
        if count <= SYNC_STEP_LIMIT:  # no await until it is done: nobody sees RUNNING
            stop = self._step_body(count)
            if stop is None:
                raise BackendFailed(self._failure)
            return stop
        result: list[StopInfo] = []

        def body() -> None:
            stop = self._step_body(count)
            if stop is not None:
                result.append(stop)

        worker = self._start(body, f"unicorn-{ctx.board.name}-step")
        try:
            await worker.wait(None)
        except asyncio.CancelledError:
            with contextlib.suppress(BackendFailed):  # FAILED then; the caller was cancelled
                await self.halt()
            if result and (kept := kept_stop(result[0])) is not None:
                return kept  # it had stopped by itself first: that stop is not lost
            raise
        await self.halt()  # joins
        if not result:
            raise WrongState(f"the step did not complete: {self._failure or 'stopped meanwhile'}",
                             state=ctx.state.value, required="halted")
        return result[0]

    def _step_body(self, count: int) -> StopInfo | None:
        """Run ``count`` instructions (fewer when something stops the machine, a pause is
        requested, or it sleeps with nothing to wake it); publish the state. None when it
        failed (the machine is FAILED, reported)."""
        ctx = self._ctx
        try:
            with ctx.lock:
                inst = ctx.instance
                assert inst is not None
                self._breakpoints.step_off(inst.core.pc())
            remaining, stalls = count, 0
            stop: StopInfo | None = None
            try:
                while remaining > 0 and stop is None and not self._ctx.halt_request.is_set():
                    with ctx.lock.worker_turn():
                        advance = self._slicer.advance(remaining)
                    stop = advance.stop
                    remaining -= advance.executed
                    stalls = stalls + 1 if advance.executed == 0 else 0
                    if advance.idle or stalls > 3:
                        break
            finally:
                ctx.gate.skip_at = None
            with ctx.lock:
                if stop is None:
                    reason = StopReason.HALT if self._ctx.halt_request.is_set() and remaining > 0 else StopReason.STEP
                    stop = StopInfo(reason, pc=inst.core.pc())
                return stop if self._finish(stop) else None
        except Exception as exc:
            self._fail(f"unicorn step failed: {exc!r}")
            return None
