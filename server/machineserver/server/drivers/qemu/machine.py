"""A QEMU machine: one ``qemu-system-*`` child process per powered-on machine, and the
parts that drive it, one module per capability:

================  =====================================================================
lifecycle         this module: power on/off, reset, load, counters
process, deaths   :mod:`.process` (the QEMU process, its deaths), :mod:`.instance` (its
                  sockets), :mod:`.target` (what the parts share; the error boundary)
gdbstub           :mod:`machineserver.server.rsp` (the server's one RSP client), and
                  :mod:`.gdbstub` (what its errors mean for a machine)
run control       :mod:`.runcontrol` (run/pause/step), :mod:`.execution` (resuming and
                  stopping QEMU), :mod:`.stops` (stop replies), :mod:`.gate` (counted runs)
breakpoints       :mod:`.breakpoints` (breakpoints and watchpoints), :mod:`.points` (the
                  table)
semihosting       :mod:`.semihosting` (trap sites: exits caught before QEMU ends)
registers         :mod:`.registers` (:mod:`.regs`: the register map)
memory            :mod:`.memory`
snapshots         :mod:`.snapshots` (the migrate stream and our header)
coverage          :mod:`.coverage` (:mod:`.blocktable`: the plugin's table; :mod:`.tracering`: its trace ring)
lock-step         :mod:`.lockstep` (co-simulation: quanta to a virtual-clock deadline)
console input     :mod:`.console`
host footprint    :mod:`.footprint`
================  =====================================================================

The lifecycle:

* **Process**: started halted (``-S``) with ``-nodefaults -nographic -monitor none``,
  semihosting on (``target=native``, its console output on a second chardev that is
  forwarded like the UART), our TCG plugin (:mod:`.plugin`: the instruction gate, plus a
  coverage table when asked), and ``-icount shift=N,sleep=off`` when the options ask for
  deterministic time. See :mod:`.instance` for the sockets, :mod:`.launch` for the start
  and where its time goes. A board in demand has a warm spare QEMU ready (:mod:`.spares`):
  power-on then takes it instead of waiting for QEMU to start.
* **Loading**: the image's segments are written over the gdbstub (``M`` packets; QEMU's
  debug writes go into flash/ROM too; QEMU 7.2 has no ``X``), its semihosting trap sites
  found, then a QMP ``system_reset``: the Cortex-M core reads SP and PC from the vector
  table exactly as at power-up, peripherals are reset. On RISC-V the PC is then set to
  the image's entry (QEMU's reset PC is the MROM stub). No restart, no temp files.
  ``reset()`` writes the loaded image again (as the Unicorn backend does: a vector table
  the program or a debugger overwrote in RAM is restored) and resets; other memory keeps
  its contents. Not ``-kernel`` / ``-device loader``: a machine is powered on before its
  program is known (and a spare is started before its machine is), and QEMU 7.2 cannot
  add a loader later (``device_add loader``: not hotpluggable). What it costs, measured
  here: ~0.2 ms for the test firmware (< 1 KB), ~40-50 ms for a 256 KiB image.
* **After the program ends**: a semihosting exit caught at its trap leaves QEMU alive and
  halted there (EXITED; ``reset()``/``load()`` go on in it). When QEMU itself ended (an
  exit it performed, a lockup, a failure) ``reset()`` or ``load()`` start a fresh QEMU
  (and ``reset()`` reloads the last image).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from qemu.qmp import EventListener

from machineserver.server.drivers.base import (
    Arch,
    BadImage,
    BadRequest,
    BoardSpec,
    Breakpoints,
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
    ProgramImage,
    RegisterAccess,
    RunControl,
    Snapshots,
    Watchpoints,
)
from machineserver.server.drivers.qemu.breakpoints import QemuBreakpoints, QemuWatchpoints
from machineserver.server.drivers.qemu.console import QemuConsole
from machineserver.server.drivers.qemu.coverage import QemuCoverage
from machineserver.server.drivers.qemu.footprint import QemuFootprint
from machineserver.server.drivers.qemu.gdbstub import refused
from machineserver.server.drivers.qemu.lockstep import QemuLockStep
from machineserver.server.drivers.qemu.memory import QemuMemory
from machineserver.server.drivers.qemu.points import PointTable
from machineserver.server.drivers.qemu.registers import QemuRegisters
from machineserver.server.drivers.qemu.runcontrol import QemuRunControl
from machineserver.server.drivers.qemu.semihosting import TrapSites, find_trap_sites
from machineserver.server.drivers.qemu.snapshots import SNAPSHOT_BROKEN, QemuSnapshots
from machineserver.server.drivers.qemu.spares import SparePool
from machineserver.server.drivers.qemu.target import QemuTarget, guarded
from machineserver.server.rsp import RspError

__all__ = ["BINARIES", "SNAPSHOT_BROKEN", "QemuMachine"]

log = logging.getLogger(__name__)

BINARIES = {Arch.ARM_CORTEX_M: "qemu-system-arm", Arch.RISCV32: "qemu-system-riscv32"}
RESET_TIMEOUT = 5.0


class QemuMachine(Machine):
    """``binary`` and ``extra_args`` (appended to QEMU's command line) are for embedding
    and tests, never reachable from the API. ``spares``: the backend's warm QEMUs (see
    :mod:`.spares`); without it every QEMU is started on demand."""

    capabilities = (RunControl, RegisterAccess, MemoryAccess, Breakpoints, Watchpoints,
                    ConsoleInput, Snapshots, Coverage, HostFootprint, LockStep)

    def __init__(self, board: BoardSpec, options: MachineOptions, events: MachineEvents, *,
                 binary: str | None = None, extra_args: Sequence[str] = (),
                 spares: SparePool | None = None) -> None:
        super().__init__()
        qemu_machine = board.backend_machines.get("qemu")
        if not qemu_machine:
            raise BadRequest(f"board {board.name} names no QEMU machine", field="board")
        self.target = QemuTarget(board, options, events, qemu_machine=qemu_machine,
                                 binary=binary or BINARIES[board.arch], extra_args=extra_args,
                                 spares=spares)
        self.points = PointTable(board.arch)
        self.traps = TrapSites(board.arch, self.points)
        self.run_control = QemuRunControl(self.target, self.points, self.traps)
        self.coverage = QemuCoverage(enabled=options.extra.get("coverage") == "1",
                                     trace=options.extra.get("coverage_trace") != "off")
        self._find_traps = options.extra.get("semihosting_traps", "on") != "off"
        self._image: ProgramImage | None = None
        snapshots = QemuSnapshots(self.target, self.traps, self._restore)
        self.lockstep = QemuLockStep(self.target, self.points, self.run_control, snapshots)
        self.provide(
            self.run_control,
            QemuRegisters(self.target),
            QemuMemory(self.target),
            QemuBreakpoints(self.target, self.points, self.run_control),
            QemuWatchpoints(self.target, self.points, self.run_control),
            QemuConsole(self.target),
            snapshots,
            self.coverage,
            QemuFootprint(self.target.process),
            self.lockstep,
        )

    @property
    def state(self) -> MachineState:
        return self.target.state

    def counters(self) -> Counters:
        return self.target.clock.counters(self.target.process)

    # ------------------------------------------------------------------ lifecycle
    @guarded
    async def power_on(self) -> None:
        async with self.target.op:
            self.target.require(MachineState.OFF, MachineState.FAILED)
            self._image = None
            self.target.clock.set(0, 0)
            self.traps.forget()
            await self._start()
            await self.target.read_pc()

    async def power_off(self) -> None:
        target = self.target
        if target.state is MachineState.OFF and target.process.instance is None:
            return
        target.state, target.end = MachineState.OFF, None  # first: a waiter sees "off"
        self.lockstep.active, target.console_capture = False, None
        self.points.held = False
        try:
            await self.run_control.abandon()
            await target.process.stop()
        except Exception:  # power_off never raises; the process is gone either way
            log.exception("power_off: cleaning up QEMU failed")
            await target.process.stop(kill=True)
        self.points.clear()
        self.traps.forget()
        self._image = None
        self.coverage.discard()

    @guarded
    async def reset(self) -> None:
        async with self.target.op:
            self.target.require(MachineState.HALTED, MachineState.RUNNING, MachineState.EXITED,
                                MachineState.FAULTED, MachineState.FAILED)
            if self.target.process.alive:
                await self.run_control.halt_quietly()
            else:
                await self._start()
            if self._image is not None:
                await self._write_image(self._image)
                await self.traps.install(self.target.stub(), self.target.process.gate, self.traps.sites)
            await self._system_reset()

    @guarded
    async def load(self, image: ProgramImage) -> None:
        if image.arch is not None and image.arch != self.target.arch:
            raise BadImage(f"the program is for {image.arch}, the board is {self.target.arch}")
        if not any(segment.data for segment in image.segments):
            raise BadImage("the image holds no bytes")
        async with self.target.op:
            self.target.require(MachineState.HALTED, MachineState.RUNNING, MachineState.EXITED,
                                MachineState.FAULTED)
            if self.target.process.alive:
                await self.run_control.halt_quietly()
            else:
                await self._start()
            await self._write_image(image)
            traps = find_trap_sites(image, self.target.arch) if self._find_traps else ()
            await self.traps.install(self.target.stub(), self.target.process.gate, traps)
            self._image = image
            await self._system_reset()

    # ------------------------------------------------------------------ helpers
    async def _start(self, incoming: bytes | None = None) -> None:
        """A fresh QEMU (halted, every point in it), replacing any old one."""
        await self.run_control.abandon()
        await self.target.process.start(coverage=await self.coverage.next_table(), incoming=incoming)
        self.target.vclock_base = 0  # a restore sets its own
        await self.points.insert_all(self.target.stub(), self.target.process.gate)
        self.target.state, self.target.end = MachineState.HALTED, None

    async def _restore(self, stream: bytes) -> None:
        """Snapshots' restart: a new QEMU from a migration stream."""
        await self._start(incoming=stream)

    async def _write_image(self, image: ProgramImage) -> None:
        stub = self.target.stub()
        for seg in image.segments:
            try:
                await stub.write_memory(seg.address, seg.data)
            except RspError as exc:
                if not refused(exc):
                    raise
                raise BadImage(f"cannot write {len(seg.data)} bytes at 0x{seg.address:08x}: {exc}") from None

    async def _system_reset(self) -> None:
        """QMP system_reset, waited for; the pc set where the image wants it."""
        target = self.target
        inst = target.process.instance
        assert inst is not None and inst.qmp is not None
        listener = EventListener(("RESET",))
        with inst.qmp.listen(listener):
            await target.process.qmp("system_reset")
            try:
                await asyncio.wait_for(listener.get(), RESET_TIMEOUT)
            except TimeoutError:
                raise await target.process.fail(f"QEMU did not reset in {RESET_TIMEOUT} s") from None
        entry = self._image.entry if self._image is not None else None
        if entry is not None:
            if target.arch is Arch.RISCV32:
                await target.write_register("pc", entry)
            elif await target.read_pc() == 0:
                # no reset vector in the image (a raw blob): start at its entry point
                await target.write_register("pc", entry & ~1)
        await target.read_pc()
        await target.clock.refresh(target.process)
        target.state, target.end = MachineState.HALTED, None
