"""One simulated board on Unicorn: the lifecycle (power on/off, reset, load, counters,
state) and the parts it is made of, one per capability:

==================  ==========================  ===========================================
capability          part                        module
==================  ==========================  ===========================================
RunControl          UnicornRunControl           run_control.py (slices: slicer.py)
RegisterAccess      UnicornRegisters            registers.py
MemoryAccess        UnicornMemory               memory.py
Breakpoints         UnicornBreakpoints          breakpoints.py
Watchpoints         UnicornWatchpoints          watchpoints.py
ConsoleInput        UnicornConsoleInput         console.py
Snapshots           UnicornSnapshots            snapshots.py (format: snapshot_format.py)
Coverage            UnicornCoverage             coverage.py (collector: collector.py)
LockStep            UnicornLockStep             lockstep.py (Cortex-M boards only)
HostFootprint       UnicornFootprint            footprint.py
==================  ==========================  ===========================================

The parts share a :class:`~.context.MachineContext`; ``power_on`` builds its
:class:`~.context.BoardInstance` (engine, arch core, UARTs, MMIO map), ``power_off`` frees it.
"""

from __future__ import annotations

from unicorn.unicorn import UcError

from machineserver.server.drivers.base import (
    Arch,
    BackendFailed,
    BadImage,
    BadRequest,
    BoardSpec,
    Breakpoints,
    C,
    ConsoleInput,
    Counters,
    Coverage,
    HostFootprint,
    LockStep,
    Machine,
    MachineEvents,
    MachineOptions,
    MachineState,
    MemoryAccess,
    NotSupported,
    ProgramImage,
    RegisterAccess,
    RunControl,
    Snapshots,
    Watchpoints,
)
from machineserver.server.drivers.unicorn.breakpoints import UnicornBreakpoints
from machineserver.server.drivers.unicorn.console import UnicornConsoleInput
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext, driver_errors
from machineserver.server.drivers.unicorn.coverage import UnicornCoverage
from machineserver.server.drivers.unicorn.footprint import UnicornFootprint
from machineserver.server.drivers.unicorn.lockstep import RISCV_REASON, UnicornLockStep
from machineserver.server.drivers.unicorn.memory import UnicornMemory
from machineserver.server.drivers.unicorn.registers import UnicornRegisters
from machineserver.server.drivers.unicorn.run_control import UnicornRunControl
from machineserver.server.drivers.unicorn.slicer import Slicer
from machineserver.server.drivers.unicorn.snapshots import UnicornSnapshots
from machineserver.server.drivers.unicorn.watchpoints import UnicornWatchpoints


class UnicornMachine(Machine):
    capabilities = (RunControl, RegisterAccess, MemoryAccess, Breakpoints, Watchpoints, ConsoleInput,
                    Snapshots, Coverage, HostFootprint, LockStep)

    def __init__(self, board: BoardSpec, options: MachineOptions, events: MachineEvents) -> None:
        super().__init__()
        self.board = board
        self._ctx = ctx = MachineContext(board, options, events)
        self._slicer = Slicer(ctx)
        self._breakpoints = UnicornBreakpoints(ctx, self._slicer)
        self._watchpoints = UnicornWatchpoints(ctx, self._slicer)
        self._coverage = UnicornCoverage(ctx)
        self._run_control = UnicornRunControl(ctx, self._slicer, self._breakpoints)
        self.provide(self._run_control, UnicornRegisters(ctx), UnicornMemory(ctx), self._breakpoints,
                     self._watchpoints, UnicornConsoleInput(ctx),
                     UnicornSnapshots(ctx, self._slicer, self._run_control), self._coverage,
                     UnicornFootprint(self._run_control))
        self._lockstep: UnicornLockStep | None = None
        self._missing: dict[type, str] = {}
        if board.arch == Arch.ARM_CORTEX_M:
            self._lockstep = UnicornLockStep(ctx, self._slicer, self._run_control, self._breakpoints)
            self.provide(self._lockstep)
        else:
            self._missing[LockStep] = RISCV_REASON

    def capability(self, iface: type[C]) -> C:
        reason = self._missing.get(iface)
        if reason is not None:
            raise NotSupported(f"board {self.board.name}: {reason}")
        return super().capability(iface)

    @property
    def state(self) -> MachineState:
        return self._ctx.state

    def counters(self) -> Counters:
        return self._ctx.counters()

    async def power_on(self) -> None:
        ctx = self._ctx
        if ctx.state != MachineState.OFF:
            return
        with ctx.lock:
            try:
                inst = BoardInstance.build(ctx.board, self._slicer, ctx.console)
            except UcError as exc:
                raise BadRequest(f"cannot build board {ctx.board.name!r} on Unicorn: {exc}",
                                 field="board") from None
            try:
                with driver_errors("power on"):
                    self._slicer.bind(inst)
                    self._breakpoints.install(inst)
                    self._watchpoints.install(inst)
                    self._coverage.attach(inst)
                    ctx.clock.reset()
                    inst.core.reset(None)
            except BaseException:
                self._unbind()
                inst.release()
                raise
            ctx.instance = inst
            ctx.state = MachineState.HALTED

    def _unbind(self) -> None:
        self._coverage.detach()
        self._breakpoints.forget_hooks()
        self._watchpoints.forget_hooks()
        self._slicer.unbind()

    async def power_off(self) -> None:
        ctx = self._ctx
        if ctx.state == MachineState.OFF:
            return
        try:
            await self._run_control.halt()
        except BackendFailed:
            return  # FAILED: a worker may still be inside the engine, which is kept
        with ctx.lock:
            inst, ctx.instance = ctx.instance, None
            if self._lockstep is not None:
                self._lockstep.forget()
            self._unbind()
            ctx.state = MachineState.OFF
            if inst is not None:
                inst.release()

    async def reset(self) -> None:
        self._ctx.require_on()
        await self._run_control.halt()
        self._reset_now()

    def _reset_now(self) -> None:
        ctx = self._ctx
        with ctx.lock, driver_errors("reset"):
            self._slicer.reset_board()
            ctx.state = MachineState.HALTED

    async def load(self, image: ProgramImage) -> None:
        ctx = self._ctx
        board = ctx.board
        ctx.require_on()
        if image.arch is not None and image.arch != board.arch:
            raise BadImage(f"the image is for {image.arch.value}, the board "
                           f"{board.name} is {board.arch.value}")
        if not any(seg.data for seg in image.segments):
            raise BadImage("the image has no data to load")
        regions = ", ".join(f"{r.name} 0x{r.base:08x}-0x{r.end - 1:08x}" for r in board.memory)
        for seg in image.segments:
            if seg.data and board.region_at(seg.address, len(seg.data)) is None:
                raise BadImage(
                    f"segment 0x{seg.address:08x}-0x{seg.address + len(seg.data) - 1:08x} "
                    f"({len(seg.data)} bytes) is outside the memory of board {board.name} "
                    f"({regions})")
        await self._run_control.halt()
        ctx.image = image
        self._reset_now()
