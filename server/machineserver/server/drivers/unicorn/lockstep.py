"""Lock-step on Unicorn (Cortex-M boards): quanta of exact virtual cycles for co-simulation.

``advance(until)`` runs counted slices (:mod:`.slicer`: exact instruction counts, no
Python per instruction) that end exactly at ``until``, at the machine's own timer
deadlines (SysTick) and on a grid of :data:`~.slicer.SLICE_COUNT` cycles counted from
reset, so that where a slice ends depends only on virtual time, never on the host (a
debugger call waiting for the lock does not cut a slice short here, see
``Slicer.deterministic``).

Cycle rules shared with the QEMU backend: exception entry costs 0 cycles; an interrupt
raised at a barrier is taken before the first instruction of the quantum; WFI counts as
one instruction; a breakpoint stops *before* its instruction runs. Asleep in WFI, the
CPU stays asleep from quantum to quantum (``CortexM.sleep_mark``: the instruction count
at which it went to sleep, so anything run meanwhile ends the sleep) and its clock jumps
to ``until``, or to the SysTick deadline when that comes first; it wakes when a pending
exception would preempt the active ones (PRIMASK and BASEPRI keep it from being taken,
not from waking the CPU). A pending interrupt made deliverable by the guest itself (an
NVIC write, ``cpsie``, ``msr primask/basepri``, an exception return) is taken right after
that instruction, as in a run and in QEMU (:mod:`.slicer`), so where a slice or a quantum
ends never decides when it is taken: a replay to an earlier cycle after a rollback goes
through the same states as the original quantum.

Checkpoints keep registers, core peripherals, UARTs, the clock, and the RAM pages that
differ from the previous checkpoint (a :class:`~.snapshot_pages.PageTracker` of its own:
pages are compared in place, copied raw, never packed; a rollback writes back only the
pages that differ).

Cost per quantum (a co-simulation's speed when one worker hosts every member and calls
their ``advance`` one after another). A quantum of up to :data:`INLINE_CYCLES` runs on the
caller's event loop (~0.2 ms at most, the bound on how long it blocks that loop, also with
emulation in the server's process); a longer one runs on the machine's
:class:`~.quantum_thread.QuantumThread`, started once and kept (no thread per quantum).
Inputs, the quantum and the result are done in one hold of the machine's lock, and the
watched ranges are copied from the board's memory as the engine sees it
(:attr:`~.context.BoardInstance.ram`), not read through the engine.

RISC-V boards have no lock-step: there is no PLIC model, so an interrupt line cannot be
raised on them (:data:`RISCV_REASON`).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from machineserver.server.drivers.base import (
    BackendFailed,
    BadRequest,
    BarrierInput,
    LockStep,
    MachineState,
    QuantumResult,
    StopInfo,
    StopReason,
    WrongState,
)
from machineserver.server.drivers.unicorn.arch import JsonState
from machineserver.server.drivers.unicorn.breakpoints import UnicornBreakpoints
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext, driver_errors
from machineserver.server.drivers.unicorn.cortexm import CortexM
from machineserver.server.drivers.unicorn.quantum_thread import QuantumThread, settle
from machineserver.server.drivers.unicorn.run_control import JOIN_TIMEOUT_S, UnicornRunControl
from machineserver.server.drivers.unicorn.slicer import SLICE_COUNT, Slicer
from machineserver.server.drivers.unicorn.snapshot_format import Pages
from machineserver.server.drivers.unicorn.snapshot_pages import Changes, PageTracker

RISCV_REASON = ("the unicorn backend has no PLIC model for RISC-V boards, so a co-simulation "
                "cannot raise an interrupt line on them")
INLINE_CYCLES = 50_000  # quanta up to this many cycles run on the event loop (~0.2 ms at most)
STALLS = 4  # slices in a row that move no cycle before the quantum is called stuck


class _ContextEngine(Protocol):
    """Unicorn's CPU context calls (2.1.4): ~2 us to save, ~0.5 us to restore, against
    ~40 us for the named registers. A context goes back into the engine it came from
    only (another engine aborts the process): checkpoints keep a reference to theirs."""

    def context_save(self) -> object: ...

    def context_restore(self, context: object) -> None: ...


@dataclass(frozen=True)
class _Checkpoint:
    """One machine state inside the machine (never leaves it)."""

    instance: weakref.ref[BoardInstance]
    cpu: object  # Unicorn's own context: restored into the same engine only
    core: JsonState
    uarts: dict[str, JsonState]
    instructions: int
    cycles: int
    exact: bool
    resume_at: int | None
    pages: tuple[Pages, ...]  # the RAM, raw (see PageTracker: its baseline)


class UnicornLockStep(LockStep):
    def __init__(self, ctx: MachineContext, slicer: Slicer, run_control: UnicornRunControl,
                 breakpoints: UnicornBreakpoints) -> None:
        self._ctx = ctx
        self._slicer = slicer
        self._run_control = run_control
        self._breakpoints = breakpoints
        # the watched ranges as (index in board.memory and BoardInstance.ram, offset, size)
        self._watch: tuple[tuple[int, int, int], ...] = ()
        self._thread = QuantumThread(f"lockstep-{ctx.board.name}")
        self._active = False
        self._console = bytearray()
        # the pc of the breakpoint the last quantum stopped at: the next one steps off it
        self._resume_at: int | None = None
        self._pages = PageTracker(())  # sized at the first checkpoint
        self._checkpoint: _Checkpoint | None = None

    # ------------------------------------------------------------------ for the machine
    def leave(self) -> None:
        """Out of lock-step (end, power_off): console output as events again."""
        if self._active:
            self._active = False
            self._ctx.console.divert(None)
        self._resume_at = None
        self._thread.close()

    def forget(self) -> None:
        """The machine's state is gone (power_off): so is the checkpoint."""
        self.leave()
        self._checkpoint = None

    # ------------------------------------------------------------------ LockStep
    async def begin(self, watch: Sequence[tuple[int, int]]) -> int:
        ctx = self._ctx
        ctx.require(MachineState.HALTED)
        ranges = []
        for address, size in watch:
            region = ctx.board.region_at(address, size) if size > 0 else None
            if region is None:
                raise BadRequest(f"watched range 0x{address:x}+{size} is not in the memory of board "
                                 f"{ctx.board.name}", field="watch")
            ranges.append((ctx.board.memory.index(region), address - region.base, size))
        await self._run_control.halt()  # a run that ended by itself: join its worker
        self._watch = tuple(ranges)
        if not self._active:
            self._console = bytearray()
            ctx.console.divert(self._console)
            self._active = True
        self._resume_at = None
        return ctx.clock.cycles

    async def end(self) -> None:
        self.leave()

    async def advance(self, until_cycles: int, inputs: BarrierInput) -> QuantumResult:
        ctx = self._ctx
        if not self._active:
            raise WrongState("the machine is not in lock-step: begin() first", state=ctx.state.value,
                             required="lock-step")
        ctx.require(MachineState.HALTED)
        now = ctx.clock.cycles
        if until_cycles < now:
            raise BadRequest(f"until_cycles {until_cycles} is before the machine's cycle counter "
                             f"({now})", field="until_cycles")
        self._check_inputs(inputs)
        await self._run_control.halt()  # a run that ended by itself: join its worker
        ctx.halt_request.clear()
        inst = ctx.instance
        assert inst is not None  # HALTED
        with ctx.lock, driver_errors("apply barrier inputs"):  # free: nothing runs
            accepted = self._apply(inst, inputs)
        ctx.state = MachineState.RUNNING
        self._slicer.deterministic = True
        outcome: list[QuantumResult | BaseException] = []

        def body() -> None:
            try:
                outcome.append(self._quantum(until_cycles, accepted))
            except Exception as exc:  # handed to the caller
                outcome.append(exc)

        try:
            if until_cycles - now <= INLINE_CYCLES:
                body()
            else:
                await self._on_thread(body)
        finally:
            self._slicer.deterministic = False
            if ctx.state == MachineState.RUNNING:
                ctx.state = MachineState.HALTED
        if not outcome or isinstance(outcome[0], BaseException):
            ctx.state = MachineState.FAILED
            reason = f"the unicorn lock-step quantum failed: {outcome[0]!r}" if outcome else \
                "the unicorn lock-step quantum did not end"
            ctx.events.failed(reason)
            raise BackendFailed(reason)
        return outcome[0]

    async def _on_thread(self, body: Callable[[], None]) -> None:
        """``body()`` on the machine's quantum thread. Cancelled: the quantum is asked to
        halt and awaited (the machine is left HALTED and usable); one that does not end
        within JOIN_TIMEOUT_S leaves the machine FAILED and its thread abandoned."""
        ctx = self._ctx
        try:
            done = self._thread.submit(body)
        except RuntimeError as exc:  # no thread can be started
            raise BackendFailed(f"cannot start the unicorn lock-step thread: {exc}") from None
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            ctx.halt_request.set()
            if not await settle(done, JOIN_TIMEOUT_S):
                ctx.state = MachineState.FAILED
                ctx.events.failed("the unicorn lock-step worker did not stop")
                self._thread.close()  # it ends when (if) the quantum returns
                self._thread = QuantumThread(f"lockstep-{ctx.board.name}")
            raise

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, inputs: BarrierInput) -> None:
        """Refuse a bad input before anything is applied."""
        ctx = self._ctx
        for seg in inputs.writes:
            if seg.data and ctx.board.region_at(seg.address, len(seg.data)) is None:
                raise BadRequest(f"write of {len(seg.data)} bytes at 0x{seg.address:x} is not in the "
                                 f"memory of board {ctx.board.name}", field="writes")
        inst = ctx.instance
        num_irq = inst.core.num_irq if inst is not None and isinstance(inst.core, CortexM) else 0
        for irq in inputs.irqs:
            if not 0 <= irq < num_irq:
                raise BadRequest(f"irq {irq} is not an external interrupt of board {ctx.board.name} "
                                 f"(0..{num_irq - 1})", field="irq")

    def _apply(self, inst: BoardInstance, inputs: BarrierInput) -> int:
        """Memory writes, then interrupts set pending, then one console byte offered."""
        core = inst.core
        assert isinstance(core, CortexM)  # lock-step is provided on Cortex-M boards only
        for seg in inputs.writes:
            if seg.data:
                inst.uc.mem_write(seg.address, seg.data)
                inst.uc.ctl_remove_cache(seg.address, seg.address + len(seg.data))  # code, maybe
        for irq in inputs.irqs:
            core.scs.pending |= 1 << (16 + irq)
        if not inputs.console:
            return 0
        uart = inst.console_uart(self._ctx.board.console)
        if uart is None or not uart.can_receive():
            return 0
        uart.feed(inputs.console[:1])
        return 1

    # ------------------------------------------------------------------ the quantum
    def _quantum(self, until: int, accepted: int) -> QuantumResult:
        """Run to ``until`` exactly or a stop, and read the result, in one hold of the
        lock. The machine's state is published here."""
        ctx = self._ctx
        try:
            with ctx.lock, driver_errors("run a lock-step quantum"):
                stop, idle = self._run_to(until)
                if stop is None and ctx.halt_request.is_set():
                    inst = ctx.instance
                    stop = StopInfo(StopReason.HALT, pc=inst.core.pc() if inst is not None else 0)
                ctx.state = (MachineState.EXITED if stop is not None and stop.reason == StopReason.EXIT
                             else MachineState.FAULTED if stop is not None and stop.reason == StopReason.FAULT
                             else MachineState.HALTED)
                self._resume_at = stop.pc if stop is not None and stop.reason == StopReason.BREAKPOINT else None
                return self._result(ctx.instance, stop, idle, accepted)
        finally:
            ctx.gate.skip_at = None

    def _run_to(self, until: int) -> tuple[StopInfo | None, bool]:
        ctx, slicer = self._ctx, self._slicer
        clock = ctx.clock
        inst = ctx.instance
        assert inst is not None
        core = inst.core
        assert isinstance(core, CortexM)
        exceptions = core.exceptions
        core.tick(clock.cycles)
        if self._resume_at is not None and self._resume_at == core.pc() and not core.deliverable():
            self._breakpoints.step_off(self._resume_at)  # it stopped there: go on from it
        stop: StopInfo | None = None
        stalls = 0
        while clock.cycles < until and not ctx.halt_request.is_set():
            before = clock.cycles
            if core.sleep_mark is not None and core.sleep_mark == clock.instructions:
                core.tick(clock.cycles)
                if not exceptions.wakes():
                    nxt = core.deadline()
                    target = until if nxt is None or nxt <= clock.cycles else min(nxt, until)
                    clock.cycles = target
                    core.tick(target)
                    continue
            core.sleep_mark = None
            grid = (clock.cycles // SLICE_COUNT + 1) * SLICE_COUNT
            adv = slicer.advance(min(until, grid) - clock.cycles, sleep=False)
            if adv.stop is not None:
                stop = adv.stop
                break
            if adv.wfi and not exceptions.wakes():
                core.sleep_mark = clock.instructions
            stalls = stalls + 1 if clock.cycles == before else 0
            if stalls >= STALLS:
                raise BackendFailed(f"lock-step made no progress at cycle {clock.cycles} "
                                    f"(pc 0x{core.pc():08x})")
        asleep = stop is None and core.sleep_mark is not None and core.sleep_mark == clock.instructions
        return stop, asleep and not exceptions.wakes()

    def _result(self, inst: BoardInstance | None, stop: StopInfo | None, idle: bool,
                accepted: int) -> QuantumResult:
        ctx = self._ctx
        assert inst is not None
        ctx.console.flush()
        console, self._console[:] = bytes(self._console), b""
        ram = inst.ram
        watched = tuple(bytes(ram[index][offset:offset + size]) for index, offset, size in self._watch)
        return QuantumResult(cycles=ctx.clock.cycles, stop=stop, console=console, accepted=accepted,
                             watched=watched, idle=idle)

    # ------------------------------------------------------------------ checkpoints
    async def checkpoint(self) -> None:
        ctx = self._ctx
        ctx.require(MachineState.HALTED)
        await self._run_control.halt()
        await ctx.locked("take a checkpoint", self._take)

    def _take(self, inst: BoardInstance) -> None:
        ctx = self._ctx
        pages = self._tracker(inst)
        collected = pages.collect(inst.ram)
        image = pages.commit(collected, collected.changes)  # kept raw: it never leaves the machine
        self._checkpoint = _Checkpoint(
            weakref.ref(inst), cpu=cast(_ContextEngine, inst.uc).context_save(), core=inst.core.get_state(),
            uarts={name: uart.get_state() for name, uart in inst.uarts.items()},
            instructions=ctx.clock.instructions, cycles=ctx.clock.cycles, exact=ctx.clock.exact,
            resume_at=self._resume_at, pages=image)

    def _tracker(self, inst: BoardInstance) -> PageTracker:
        sizes = tuple(len(view) for view in inst.ram)
        cp = self._checkpoint
        if self._pages.sizes != sizes or cp is None or cp.instance() is not inst:
            self._pages = PageTracker(sizes)  # a new engine: compared against zeros
        return self._pages

    async def rollback(self) -> None:
        ctx = self._ctx
        ctx.require(MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED)
        cp = self._checkpoint
        if cp is None or cp.instance() is not ctx.instance:
            raise WrongState("no checkpoint to roll back to (take one with checkpoint())",
                             state=ctx.state.value, required="checkpoint")
        await self._run_control.halt()
        await ctx.locked("roll back to the checkpoint", lambda inst: self._back(inst, cp))

    def _back(self, inst: BoardInstance, cp: _Checkpoint) -> None:
        ctx, pages = self._ctx, self._pages
        none: Changes = [{} for _ in pages.sizes]
        with driver_errors("roll back"):
            # the baseline is the checkpoint's memory: only pages dirtied since are written
            if pages.apply(inst.ram, cp.pages, (pages.generation, none)):
                inst.uc.ctl_flush_tb()  # memory was written behind the engine's back
            self._slicer.forget_replay()
            if ctx.collector is not None:
                ctx.collector.forget_last()
            inst.core.set_state(cp.core)
            cast(_ContextEngine, inst.uc).context_restore(cp.cpu)
            for name, state in cp.uarts.items():
                inst.uarts[name].set_state(state)
        ctx.clock.instructions, ctx.clock.cycles, ctx.clock.exact = cp.instructions, cp.cycles, cp.exact
        self._resume_at = cp.resume_at
        self._console[:] = b""
        ctx.state = MachineState.HALTED
