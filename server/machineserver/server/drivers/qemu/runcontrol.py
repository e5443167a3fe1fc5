"""Run control for a QEMU machine: run, pause, step (see :mod:`.execution` for how the
program is run and stopped).

``run()`` starts :meth:`Executor.run` in a background task and returns; its stop is
reported as an event, unless a pause (or a quiet halt for an edit, reset or load)
collects it. ``step()`` waits for :meth:`Executor.advance`. Both ``step()`` and
``pause()`` are cancellable: the cancelled caller's stop request makes the executor stop
QEMU (^C) and answer every request it sent, so the machine is left HALTED (or EXITED /
FAULTED when that came first) with the gdbstub stream in sync; then CancelledError goes
on to the caller. A cancelled pause's stop, which nobody returns, is reported as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from machineserver.server.drivers.base import (
    BadRequest,
    DriverError,
    MachineState,
    RunControl,
    StopInfo,
    StopReason,
    WrongState,
    kept_stop,
)
from machineserver.server.drivers.qemu.execution import STOP_TIMEOUT, Executor
from machineserver.server.drivers.qemu.points import PointTable
from machineserver.server.drivers.qemu.semihosting import TrapSites
from machineserver.server.drivers.qemu.stops import STEP_TIMEOUT
from machineserver.server.drivers.qemu.target import QemuTarget, guarded

# how long a cancelled step may take to stop before QEMU counts as stuck
CANCEL_GRACE = STEP_TIMEOUT + STOP_TIMEOUT + 2.0


class QemuRunControl(RunControl):
    def __init__(self, target: QemuTarget, points: PointTable, traps: TrapSites) -> None:
        self.target = target
        self.executor = Executor(target, points, traps)
        self._task: asyncio.Task[None] | None = None
        self._collectors: list[asyncio.Future[StopInfo]] = []  # want the running stop

    # ------------------------------------------------------------------ RunControl
    @guarded
    async def run(self) -> None:
        async with self.target.op:
            self.target.require(MachineState.HALTED)
            self.start()

    @guarded
    async def pause(self) -> StopInfo:
        async with self.target.op:
            if self.target.state is MachineState.HALTED:
                return StopInfo(StopReason.HALT, pc=await self.target.read_pc())
            self.target.require(MachineState.RUNNING)
            return await self._collect()

    @guarded
    async def step(self, count: int = 1) -> StopInfo:
        if count < 1:
            raise BadRequest("count must be at least 1", field="count")
        async with self.target.op:
            self.target.require(MachineState.HALTED)
            self.target.process.stub()  # QEMU is there (BackendFailed otherwise)
            self.executor.prepare()
            job = asyncio.ensure_future(self._advance(count))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                self.executor.request_stop()
                await self._settle_cancelled(job)
                if job.done() and not job.cancelled() and job.exception() is None and (
                        kept := kept_stop(job.result())) is not None:
                    return kept  # it had stopped by itself first: that stop is not lost
                raise

    async def run_until(self, reached: Callable[[], bool]) -> StopInfo:
        """Lock-step (:mod:`.lockstep`; the caller holds ``op``, the machine HALTED):
        run until a stop, or until ``reached()`` says the plugin's deadline stopped the
        VM (then a HALT). Cancellable like :meth:`step`."""
        self.executor.prepare()
        job = asyncio.ensure_future(self._run_until(reached))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            self.executor.request_stop()
            await self._settle_cancelled(job)
            raise

    @guarded
    async def _run_until(self, reached: Callable[[], bool]) -> StopInfo:
        info = await self.executor.run(reached)
        await self.target.clock.refresh(self.target.process)
        return info

    # ------------------------------------------------------------------ stepping
    @guarded
    async def _advance(self, count: int) -> StopInfo:
        info = await self.executor.advance(count)
        await self.target.clock.refresh(self.target.process)
        return info

    async def _settle_cancelled(self, job: asyncio.Future[StopInfo]) -> None:
        """Wait (through further cancellations) for a step asked to stop; one that
        does not stop in time is a stuck QEMU."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_GRACE
        while not job.done():
            try:
                await asyncio.wait_for(asyncio.shield(job), max(0.0, deadline - loop.time()))
            except asyncio.CancelledError:
                continue
            except TimeoutError:
                await self.target.process.fail("QEMU did not stop after its caller cancelled a step")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([job], timeout=CANCEL_GRACE)
                break
            except DriverError:
                break
        if job.done() and not job.cancelled():
            job.exception()  # retrieved: the caller gets CancelledError, not this

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        """Resume a HALTED machine in the background (the caller holds ``op``)."""
        self.target.state = MachineState.RUNNING
        self.executor.prepare()
        self._task = asyncio.get_running_loop().create_task(self._background())

    async def _background(self) -> None:
        try:
            info = await self._run_program()
        except DriverError as exc:
            for fut in self._take_collectors():
                fut.set_exception(exc)
            return
        collectors = self._take_collectors()
        for fut in collectors:
            fut.set_result(info)
        if not collectors:
            self.target.report_stop(info)

    @guarded
    async def _run_program(self) -> StopInfo:
        info = await self.executor.run()
        await self.target.clock.refresh(self.target.process)
        return info

    def _take_collectors(self) -> list[asyncio.Future[StopInfo]]:
        waiting = [f for f in self._collectors if not f.done()]
        self._collectors.clear()
        return waiting

    async def _collect(self) -> StopInfo:
        """Stop the running program and take its stop (not reported as an event)."""
        task = self._task
        if task is None or task.done():
            raise WrongState("the machine is not running", state=self.target.state.value,
                             required="running")
        fut: asyncio.Future[StopInfo] = asyncio.get_running_loop().create_future()
        self._collectors.append(fut)
        self.executor.request_stop()
        return await fut

    async def halt_quietly(self) -> None:
        """Stop a running machine without reporting the stop (reset, load, restore;
        the caller holds ``op``)."""
        if self.target.state is MachineState.RUNNING and self._task is not None:
            with contextlib.suppress(DriverError):
                await self._collect()

    @contextlib.asynccontextmanager
    async def halted_for_edit(self) -> AsyncIterator[None]:
        """Breakpoints and watchpoints can be edited while the machine runs: QEMU's
        gdbstub takes packets only while the VM is stopped (all-stop mode), so a running
        machine is stopped quietly, edited, and resumed. A real stop that raced the
        request is reported instead of resumed over. The caller holds ``op``."""
        resume = False
        if self.target.state is MachineState.RUNNING and self._task is not None:
            info = await self._collect()
            # read afresh (annotated: mypy would keep the state narrowed from before the await)
            state: MachineState = self.target.state
            if info.reason is StopReason.HALT and state is MachineState.HALTED:
                resume = True
            else:
                self.target.report_stop(info)
        try:
            yield
        finally:
            if resume and self.target.state is MachineState.HALTED and self.target.process.alive:
                self.start()

    async def abandon(self) -> None:
        """Forget a background run (power off, restart): cancel it, fail its collectors."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for fut in self._take_collectors():
            fut.set_exception(WrongState("the machine was powered off or restarted",
                                         state=self.target.state.value, required="running"))
