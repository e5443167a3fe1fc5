"""Lock-step for a QEMU machine (co-simulation): :class:`QemuLockStep`.

* **Virtual cycles** are QEMU's virtual clock in instructions: ``vclock >> shift`` under
  ``-icount shift=N,sleep=off``. Running, each instruction adds exactly ``2**shift`` ns;
  asleep (WFI with nothing pending) QEMU warps the clock straight to its next timer
  deadline. Both are QEMU's own deterministic icount rules: host timing never enters.
* **A quantum** ends at a virtual-clock deadline the plugin owns (plugin/msplugin.c,
  "Lock-step deadlines"): a QEMU timer at ``until_cycles << shift``. Icount runs the vCPU
  exactly up to the earliest timer, and a sleeping vCPU's warp stops at it too, so the VM
  stops there whether the CPU ran or slept (the plugin notes which: ``idle``). One
  gdbstub continue per quantum; the deadline stop comes back as a T02 stop reply. The
  clock at every stop is recorded by the plugin (no extra round trip to read it).
* **Inputs** (the VM stopped, before the continue): memory writes as gdbstub ``M``
  packets; IRQs set pending by the plugin from QEMU's main loop (a barrier command:
  ``armv7m_nvic_set_pending``, as a rising edge on the line would; QEMU 7.2's gdbstub
  writes skip MMIO, so an ISPR write through it never reaches the NVIC), so the core
  takes them before the quantum's first instruction and a WFI wakes; a console byte
  only when the UART's receiver is enabled and empty, written to the chardev, and then
  waited for in the UART's status register (so it is inside the guest UART before the
  quantum runs, never taken by QEMU at a host-timed moment later).
* **Exact stops**: no gdbstub debug stop ends a quantum. Between a vCPU's debug stop
  and the VM's, QEMU sees an idle vCPU and warps the virtual clock to the next timer
  (the quantum's deadline, or a device timer fired early). So while in lock-step the
  breakpoints are held by the plugin before their block (like semihosting trap sites,
  then single steps up to the site), watchpoints are checked by the plugin after each
  access (one-instruction blocks while any is set, so the hold comes right after the
  accessing instruction), and single steps run with QEMU's timers off
  (``Qqemu.sstep=0x5``, interrupts still taken) and never past the quantum's end.
  During a quantum the plugin also keeps QEMU from warping inside a timer's callback
  (its "warp guard", see msplugin.c): SysTick re-arms itself before it raises its
  interrupt, which made a sleeper's clock jump a whole period more.
* **Watched ranges** are copied by the plugin at every VM stop into a file the driver
  maps (:meth:`.gate_copies.WatchedCopies.set_ranges`): the ranges at the quantum's
  end are the copies made at its last stop, read without a gdbstub round trip (``m``
  packets when no stop ran this quantum, or the plugin cannot copy them).
* **Cost per quantum** (no inputs, no breakpoints): one gdbstub continue and its stop
  reply. The deadline stop needs no ^C (the plugin stops the VM itself), the pc and the
  instruction count at the stop come from the plugin's records (no ``p``, no QMP), the
  watched ranges from its copies.
* **Console output** is kept (:attr:`.target.QemuTarget.console_capture`) instead of
  sent as events. QEMU writes a TX byte to the chardev socket synchronously, before the
  VM stops; after a quantum the socket is read dry (its unread byte count is 0), so each
  byte lands in the quantum that sent it.
* **Breakpoints at a quantum's end**: a quantum that ends at a breakpoint's instruction
  does not report it; the next advance reports that breakpoint before running anything
  (same cycle), and the one after steps over it as a resume does.
* **Checkpoint/rollback**: a snapshot (QEMU's migration stream, :mod:`.snapshots`) kept
  in memory; rollback restarts QEMU from it (the virtual clock is in the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from machineserver.server.drivers.base import (
    Arch,
    BackendFailed,
    BadRequest,
    BarrierInput,
    BoardSpec,
    DriverError,
    LockStep,
    MachineState,
    NotSupported,
    QuantumResult,
    StopInfo,
    StopReason,
    WrongState,
)
from machineserver.server.drivers.qemu.launch import SSTEP_LIKE_RUNNING
from machineserver.server.drivers.qemu.points import PointTable
from machineserver.server.drivers.qemu.runcontrol import QemuRunControl
from machineserver.server.drivers.qemu.snapshots import SNAPSHOT_BROKEN, QemuSnapshots
from machineserver.server.drivers.qemu.target import QemuTarget, guarded
from machineserver.server.rsp import RspError

# single steps with QEMU's timers off, interrupts taken (ENABLE|NOTIMER): a step that
# ran with timers on would stop like a breakpoint, and QEMU warps the virtual clock of a
# VM whose vCPU stopped for the debugger but that has not stopped yet
SSTEP_TIMERS_OFF = b"Qqemu.sstep=0x5"
RX_TIMEOUT = 2.0  # QEMU takes a console byte from its chardev within this, or is stuck
CONSOLE_TIMEOUT = 2.0  # the console sockets are read dry within this
_STOPS = (StopReason.BREAKPOINT, StopReason.WATCHPOINT, StopReason.EXIT, StopReason.FAULT)


@dataclass(frozen=True)
class RxRegisters:
    """Where a UART model says whether its receiver can take a byte and has one."""

    enable_offset: int  # control register
    enable_mask: int  # every bit set: receiving
    status_offset: int
    full_mask: int  # set: the receive register holds a byte


# QEMU 7.2's models: CMSDK APB UART (CTRL.RXEN, STATE.RXFULL); STM32F2xx USART
# (CR1.UE|RE, SR.RXNE; a disabled one drops what it gets)
RX_REGISTERS = {
    "uart-cmsdk": RxRegisters(0x08, 0x2, 0x04, 0x2),
    "uart-stm32": RxRegisters(0x0C, (1 << 13) | (1 << 2), 0x00, 1 << 5),
}

# QEMU machines that cannot keep lock-step, and why (reported as board limits)
LOCKSTEP_BROKEN = {
    **{machine: f"lock-step needs rollback, that is snapshots: {reason}"
       for machine, reason in SNAPSHOT_BROKEN.items()},
    "sifive_e": "lock-step inputs need a Cortex-M NVIC (interrupts set pending at a barrier)",
}


def lockstep_refusal(board: BoardSpec, qemu_machine: str) -> str | None:
    """Why ``board`` cannot keep lock-step on QEMU, or None."""
    reason = LOCKSTEP_BROKEN.get(qemu_machine)
    if reason:
        return reason
    if board.arch is not Arch.ARM_CORTEX_M:
        return "lock-step inputs need a Cortex-M NVIC (interrupts set pending at a barrier)"
    console = board.peripheral(board.console) if board.console else None
    if console is not None and console.model not in RX_REGISTERS:
        return f"lock-step console input does not know the {console.model} UART's receiver"
    return None


class QemuLockStep(LockStep):
    def __init__(self, target: QemuTarget, points: PointTable, run_control: QemuRunControl,
                 snapshots: QemuSnapshots) -> None:
        self.target = target
        self.points = points
        self.run_control = run_control
        self.snapshots = snapshots
        self.active = False
        self._watch: tuple[tuple[int, int], ...] = ()
        self._checkpoint: bytes | None = None
        self._checkpoint_reported: int | None = None
        # the pc of the breakpoint stop the last advance returned: the next one resumes
        # over it; any other breakpoint at the pc is reported before running
        self._reported_break: int | None = None
        self._deadline_idle = False  # the last quantum ended at its deadline, asleep
        num_irq = 480
        nvic = next((p for p in target.board.peripherals if p.model == "nvic"), None)
        if nvic is not None:
            num_irq = int(nvic.properties.get("num_irq", num_irq))
        self.num_irq = num_irq

    # ------------------------------------------------------------------ helpers
    @property
    def shift(self) -> int:
        assert self.target.clock.shift is not None
        return self.target.clock.shift

    def cycles(self) -> int:
        return self.target.virtual_clock_ns() >> self.shift

    def _gate_ready(self) -> None:
        gate = self.target.process.gate
        if gate is None or not gate.lockstep.usable:
            raise NotSupported("lock-step needs our TCG plugin's deadlines, which this QEMU "
                               "cannot give (no plugin, or QEMU does not export the functions "
                               "it needs)")

    def _require_active(self) -> None:
        if not self.active:
            raise WrongState("the machine is not in lock-step; begin() first",
                             state=self.target.state.value, required="lockstep")

    async def _console_settled(self) -> None:
        """Every byte QEMU wrote to the console sockets delivered (and so captured)."""
        inst = self.target.process.instance
        if inst is None:
            return
        deadline = time.monotonic() + CONSOLE_TIMEOUT
        while inst.console_pending():
            if time.monotonic() > deadline:
                raise await self.target.process.fail("QEMU's console output was not read in time")
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ LockStep
    @guarded
    async def begin(self, watch: Sequence[tuple[int, int]]) -> int:
        async with self.target.op:
            target = self.target
            target.require(MachineState.HALTED)
            if target.clock.shift is None:
                raise WrongState("lock-step needs deterministic virtual time: this session "
                                 "was created without icount (MachineOptions.icount)",
                                 state=target.state.value, required="icount")
            refusal = lockstep_refusal(target.board, target.qemu_machine)
            if refusal:
                raise WrongState(f"{target.board.name} cannot keep lock-step on QEMU: {refusal}",
                                 state=target.state.value, required="lockstep")
            ranges = []
            for address, size in watch:
                if size <= 0 or target.board.region_at(address, size) is None:
                    raise BadRequest(f"watched range 0x{address:08x}+{size} is not in the "
                                     "board's memory", field="watch")
                ranges.append((address, size))
            stub = target.process.stub()
            self._gate_ready()
            await self._console_settled()
            gate = target.process.gate
            assert gate is not None
            await self.points.remove_all(stub)
            self.points.held = True
            try:
                await self._hold_points()
            except BaseException:
                self.points.held = False
                await self.points.insert_all(stub, gate)
                raise
            self._watch = tuple(ranges)
            if target.console_capture is None:
                target.console_capture = bytearray()
            self.active = True
            self._reported_break = None
            return self.cycles()

    async def _hold_points(self) -> None:
        """This QEMU ready for quanta: breakpoints and watchpoints in the plugin's gate,
        single steps with QEMU's timers off (interrupts still taken)."""
        target = self.target
        gate = target.process.gate
        assert gate is not None
        try:
            await self.points.hold_in(gate)
        except (RuntimeError, ValueError) as exc:
            raise await target.process.fail(f"lock-step: {exc}") from None
        await target.stub().request_ok(SSTEP_TIMERS_OFF)

    async def end(self) -> None:
        async with self.target.op:
            if not self.active:
                return
            self.active = False
            capture, self.target.console_capture = self.target.console_capture, None
            gate = self.target.process.gate
            self.points.held = False
            if gate is not None:
                gate.lockstep.set_deadline(None)
            if gate is not None and self.target.process.alive:
                with contextlib.suppress(DriverError, RspError, RuntimeError, OSError):
                    gate.copies.set_ranges(())
                    gate.sites.set_break_sites(())
                    gate.lockstep.set_watches(())
                    await gate.commands.run(b"f")
                    stub = self.target.stub()
                    await stub.request_ok(SSTEP_LIKE_RUNNING)
                    await self.points.insert_all(stub, gate)
            if capture:  # nothing is left over normally: each advance takes its own
                self.target.events.console_output(bytes(capture))

    @guarded
    async def advance(self, until_cycles: int, inputs: BarrierInput) -> QuantumResult:
        async with self.target.op:
            target = self.target
            self._require_active()
            target.require(MachineState.HALTED)
            stub = target.process.stub()
            self._gate_ready()
            gate = target.process.gate
            assert gate is not None
            copied = gate.copies.set_ranges(self._watch)
            now = self.cycles()
            if until_cycles < now:
                raise BadRequest(f"until_cycles {until_cycles} is behind the machine's "
                                 f"{now}", field="until_cycles")
            for segment in inputs.writes:
                if target.board.region_at(segment.address, max(1, len(segment.data))) is None:
                    raise BadRequest(f"write at 0x{segment.address:08x} is not in the board's "
                                     "memory", field="writes")
            pending: dict[int, int] = {}
            for irq in inputs.irqs:
                if not 0 <= irq < self.num_irq:
                    raise BadRequest(f"IRQ {irq} is out of range 0..{self.num_irq - 1}",
                                     field="irq")
                pending[irq // 32] = pending.get(irq // 32, 0) | 1 << (irq % 32)
            for segment in inputs.writes:
                if segment.data:
                    await stub.write_memory(segment.address, segment.data)
            if gate.commands.set_irqs(inputs.irqs):
                # the gdbstub's writes never reach the NVIC (QEMU 7.2 debug writes skip
                # MMIO): the plugin sets them pending from QEMU's main loop
                try:
                    await gate.commands.run(b"i")
                except RuntimeError as exc:
                    raise await target.process.fail(f"lock-step interrupts: {exc}") from None
            accepted = 0
            if inputs.console and await self._offer(inputs.console[0]):
                accepted = 1
            stops_before = gate.stop_records.stops  # the copies must be of a stop after the inputs
            stop = await self._run_quantum(until_cycles, now)
            if target.process.alive:
                await self._console_settled()
            capture = target.console_capture
            console = bytes(capture) if capture is not None else b""
            if capture is not None:
                capture.clear()
            idle = stop is None and self._deadline_idle
            watched: list[bytes] = []
            if target.process.alive:
                stops = gate.stop_records.stops
                copies = gate.copies.of_stop(stops) if copied and stops > stops_before else None
                if copies is not None:
                    watched = copies
                else:
                    for address, size in self._watch:
                        watched.append(await stub.read_memory(address, size))
            return QuantumResult(cycles=self.cycles(), stop=stop, console=console,
                                 accepted=accepted, watched=tuple(watched), idle=idle)

    async def _run_quantum(self, until_cycles: int, now: int) -> StopInfo | None:
        target = self.target
        gate = target.process.gate
        assert gate is not None
        reported, self._reported_break = self._reported_break, None
        if self.points.breakpoints:
            pc = await target.read_pc()
            if pc in self.points.breakpoints and pc != reported:
                self._reported_break = pc
                return StopInfo(StopReason.BREAKPOINT, pc=pc)
        self._deadline_idle = False
        if until_cycles == now:
            return None
        reached_before = gate.lockstep.deadlines_reached
        stops_before = gate.stop_records.stops

        def reached() -> bool:
            return gate.lockstep.deadlines_reached > reached_before or self.cycles() >= until_cycles

        gate.lockstep.set_deadline(until_cycles << self.shift)
        fine = self.points.watched()
        try:
            if fine:  # one instruction per block: a watchpoint's hold comes right after it
                await self._one_instruction_blocks(True)
            info = await self.run_control.run_until(reached)
        finally:
            gate.lockstep.set_deadline(None)
            if fine and target.process.alive:
                await self._one_instruction_blocks(False)
        if info.reason not in (StopReason.EXIT, StopReason.FAULT):
            # (an exit may be found at a trap site before QEMU runs at all)
            await self._stop_recorded(stops_before)
        if info.reason not in _STOPS:
            if reached():
                self._deadline_idle = (gate.lockstep.deadlines_reached > reached_before
                                       and gate.lockstep.idle_at_deadline)
                return None
            raise BackendFailed(f"lock-step quantum stopped without reaching its end ({info})")
        if info.reason is StopReason.BREAKPOINT:
            self._reported_break = info.pc
        return info

    async def _one_instruction_blocks(self, on: bool) -> None:
        out = await self.target.process.hmp("singlestep on" if on else "singlestep off")
        if out.strip():
            raise await self.target.process.fail(f"lock-step watchpoints need QEMU's HMP "
                                                 f"singlestep: {out.strip()}")

    async def _stop_recorded(self, stops_before: int) -> None:
        """The plugin records the clock in the VM's stop handlers, just before the
        gdbstub's (it is registered to run first); wait for it should it come later."""
        target = self.target
        gate = target.process.gate
        deadline = time.monotonic() + RX_TIMEOUT
        while gate is not None and target.process.alive and gate.stop_records.stops == stops_before:
            if time.monotonic() > deadline:
                raise await target.process.fail("the plugin did not record the VM's stop")
            await asyncio.sleep(0)

    async def _offer(self, byte: int) -> bool:
        """Give the console UART one byte when its receiver is enabled and empty; True
        when it took it (in the UART before this returns)."""
        target = self.target
        uart = target.board.peripheral(target.board.console)
        regs = RX_REGISTERS.get(uart.model) if uart is not None else None
        if uart is None or regs is None:
            return False
        stub = target.stub()

        async def read32(offset: int) -> int:
            return int.from_bytes(await stub.read_memory(uart.base + offset, 4), "little")

        if (await read32(regs.enable_offset) & regs.enable_mask) != regs.enable_mask:
            return False
        if await read32(regs.status_offset) & regs.full_mask:
            return False
        inst = target.process.instance
        assert inst is not None
        try:
            await inst.console_write(bytes([byte]))
        except (OSError, TimeoutError) as exc:
            raise BackendFailed(f"console write failed: {exc}") from None
        deadline = time.monotonic() + RX_TIMEOUT
        while not await read32(regs.status_offset) & regs.full_mask:
            if time.monotonic() > deadline:
                raise await target.process.fail(f"QEMU did not take a console byte in {RX_TIMEOUT} s")
            await asyncio.sleep(0)
        return True

    # ------------------------------------------------------------------ checkpoints
    async def checkpoint(self) -> None:
        self.target.require(MachineState.HALTED)
        await self._refuse_board()
        self._checkpoint = await self.snapshots.save_state()
        self._checkpoint_reported = self._reported_break

    async def rollback(self) -> None:
        if self._checkpoint is None:
            raise WrongState("no checkpoint to roll back to", state=self.target.state.value,
                             required="checkpoint")
        await self.snapshots.restore_state(self._checkpoint)
        self._reported_break = self._checkpoint_reported
        if self.active:  # a fresh QEMU: the points went into its gate (points.held)
            async with self.target.op:
                await self.target.stub().request_ok(SSTEP_TIMERS_OFF)

    async def _refuse_board(self) -> None:
        reason = SNAPSHOT_BROKEN.get(self.target.qemu_machine)
        if reason:
            raise WrongState(f"no checkpoints on {self.target.board.name}: {reason}",
                             state=self.target.state.value, required="snapshots")

