"""Running the program: resume QEMU through its gdbstub and turn what stops it into one
StopInfo. Run control (:mod:`.runcontrol`) runs :meth:`Executor.run` in the background
for ``run()`` and :meth:`Executor.advance` for ``step(count)``.

* **Only the gdbstub** resumes and stops QEMU (``c``, ``s``, ^C), never QMP stop/cont:
  QEMU's gdbstub sends a stop reply for *every* VM stop, which would desync the protocol.
* **Counted runs** (``advance``): a count of :data:`GATE_MIN` or more runs as one
  continue through the plugin's instruction gate (:mod:`.gate`): the plugin counts every
  executed instruction and holds the vCPU at a block boundary once the count is near;
  the executor then sends ^C and the VM stops exactly there. Above :data:`COARSE_MIN` a
  first run with QEMU's normal blocks (up to 512 instructions) stops fewer than 512
  short; the rest runs with one-instruction blocks (HMP ``singlestep on``), which stops
  on the exact count. Smaller counts, and machines without the plugin, single-step
  through the gdbstub (0.3 ms a step), checking for a stop request between steps.
* **Semihosting traps** (:mod:`.semihosting`): the plugin stops QEMU before a block
  that holds a trap (or, without it, a hidden breakpoint stops it at the trap); the
  executor single-steps up to the trap, and there reads the call: an exit ends the run
  (EXIT, QEMU kept alive, state EXITED); any other call is single-stepped (QEMU
  performs it) and the run goes on. A resume from a trap site does the same.
* **Stopping early**: :meth:`Executor.request_stop` (pause, cancellation, an edit while
  running) sends ^C when QEMU is running, or makes the loop stop before it resumes
  QEMU again; the stop comes back as a HALT. The stream stays in sync: a request that
  was sent is always answered before the executor returns.
* **Deaths** while waiting are delivered here (see :meth:`.process.QemuProcess.death_result`).
* **The pc at a stop** comes from the plugin's record of the VM's stop
  (:attr:`.gate.StopRecords.pc`, made before the stop reply) when it keeps one:
  no register read per stop. A lock-step quantum (``run`` with ``reached``) and no
  breakpoints reads no pc before it resumes either: a semihosting trap at the pc is held
  by the plugin before it runs, like one reached later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from machineserver.server.drivers.base import (
    MachineState,
    StopInfo,
    StopReason,
)
from machineserver.server.drivers.qemu.gate_channel import WATCH_WRITE
from machineserver.server.drivers.qemu.points import PointTable
from machineserver.server.drivers.qemu.semihosting import TrapSites
from machineserver.server.drivers.qemu.stops import SIGINT, SIGTRAP, STEP_TIMEOUT, StopDecoder
from machineserver.server.drivers.qemu.target import QemuTarget
from machineserver.server.rsp import RspClosed, RspTimeout, StopReply

STOP_TIMEOUT = 5.0  # a stop reply after ^C
GATE_MIN = 16  # from this count on, a counted run is cheaper than single steps
COARSE_MIN = 1024  # from this count on, first a run with QEMU's normal blocks
BLOCK_MAX = 512  # the most instructions in one TCG block


class Executor:
    def __init__(self, target: QemuTarget, points: PointTable, traps: TrapSites) -> None:
        self.target = target
        self.points = points
        self.traps = traps
        self.decoder = StopDecoder(target, points)
        self._stop_requested = False
        self._in_flight = False  # a resume was sent and its stop reply is owed
        self._interrupt_sent = False
        self._interrupt_sent_event = asyncio.Event()
        self._fine_blocks = True  # HMP "singlestep on" works on this QEMU
        self._stops_at_resume: int | None = None  # the gate's VM stops before the last resume
        # lock-step: whether the quantum's end is reached (single steps, which run with
        # QEMU's timers off, check it before each step: they never pass the end)
        self._reached: Callable[[], bool] | None = None

    # ------------------------------------------------------------------ stopping early
    def request_stop(self) -> None:
        """Stop as soon as possible (any task): ^C to a running QEMU, or no more resumes."""
        self._stop_requested = True
        self._interrupt()

    def _interrupt(self) -> None:
        """^C, once per resume, while its stop reply is owed. Never raises: on a connection
        that is gone or BROKEN there is nothing to stop, and the wait for the stop reply
        raises instead; a stop reply that just came makes the client send nothing."""
        if self._in_flight and not self._interrupt_sent and self.target.process.alive:
            stub = self.target.stub()
            if stub.closed:
                return
            self._interrupt_sent = True
            self._interrupt_sent_event.set()
            stub.interrupt()

    def prepare(self) -> None:
        """Forget an old stop request; call synchronously before starting ``run`` or
        ``advance`` in a task (a request made after this counts for it)."""
        self._stop_requested = False

    # ------------------------------------------------------------------ entry points
    async def run(self, reached: Callable[[], bool] | None = None) -> StopInfo:
        """Run until something stops the program: a breakpoint, watchpoint, exit, fault
        or a stop request (HALT); ``reached``: lock-step, whether the plugin's deadline has
        stopped the VM (then a HALT too, never resumed past)."""
        self._reached = reached
        with self.target.process.waiting():
            try:
                return self._conclude(await self._run(reached))
            except RspClosed:
                return self._conclude(await self.target.process.death_result())
            finally:
                self._reached = None

    async def advance(self, count: int) -> StopInfo:
        """Execute ``count`` instructions (>= 1), or fewer if something stops the program
        first; STEP when all ran."""
        with self.target.process.waiting():
            try:
                return self._conclude(await self._advance(count))
            except RspClosed:
                return self._conclude(await self.target.process.death_result())

    def _conclude(self, info: StopInfo) -> StopInfo:
        target = self.target
        target.last_pc = info.pc
        if target.state in (MachineState.EXITED, MachineState.FAULTED, MachineState.FAILED) \
                and target.end is not None and target.end is info:
            return info  # QEMU ended with the program (process.ended / death_result)
        if info.reason is StopReason.EXIT:
            target.end, target.state = info, MachineState.EXITED
        elif info.reason is StopReason.FAULT:
            target.end, target.state = info, MachineState.FAULTED
        else:
            target.end, target.state = None, MachineState.HALTED
        return info

    # ------------------------------------------------------------------ loops
    async def _run(self, reached: Callable[[], bool] | None) -> StopInfo:
        # a quantum without breakpoints resumes without looking at the pc first (a trap
        # there is held by the plugin before it runs)
        fast = (reached is not None and not self.points.breakpoints
                and (not self.traps.sites or self.traps.gate is not None))
        first = True
        while True:
            if self._stop_requested or (reached is not None and reached()):
                return StopInfo(StopReason.HALT, pc=await self._stop_pc())
            pc = -1 if first and fast else await self._stop_pc()
            first = False
            if pc in self.traps or pc in self.points.breakpoints:
                # QEMU would stop at once on a breakpoint at the pc: step off it first
                info = await self._step_from(pc)
                if info is not None:
                    return info
                continue
            reply = await self._resume(b"c", hold_after=self._gate_holds())
            site = self.traps.pending()
            hit = await self._watch_hit()
            if hit is not None:
                return hit
            if site is not None and self._plain(reply, SIGINT):
                info, _ = await self._approach(site, None)
            else:
                info = await self._settle(reply, StopReason.HALT)
            if info is not None:
                return info

    async def _advance(self, count: int) -> StopInfo:
        remaining = count
        pc = await self.target.read_pc()
        while True:
            if remaining <= 0:
                return StopInfo(StopReason.STEP, pc=pc)
            if self._stop_requested:
                return StopInfo(StopReason.HALT, pc=pc)
            gate = self.target.process.gate
            if (remaining < GATE_MIN or gate is None or not gate.usable
                    or pc in self.traps or pc in self.points.breakpoints):
                info = await self._step_from(pc)
                remaining -= 1
                if info is not None:
                    return info
                pc = await self.target.read_pc()
                if remaining > 0 and pc in self.points.breakpoints:
                    return StopInfo(StopReason.BREAKPOINT, pc=pc)
                continue
            reply, executed = await self._counted(remaining)
            remaining -= executed
            site = self.traps.pending()
            if site is not None and self._plain(reply, SIGINT):
                info, steps = await self._approach(site, remaining)
                remaining -= steps
                if info is not None:
                    return info
            elif not self._plain(reply, SIGINT) or self._stop_requested:
                info = await self._settle(reply, StopReason.HALT)
                if info is not None:
                    return info
            # else: the gate's hold; the rest in the next round
            pc = await self.target.read_pc()

    @staticmethod
    def _plain(reply: StopReply, signal: int) -> bool:
        return not reply.exited and reply.watch is None and reply.signal == signal

    def _gate_holds(self) -> int | None:
        """The gate's hold count, to answer its holds (trap sites) while resumed."""
        gate = self.target.process.gate
        return gate.holds if gate is not None and gate.usable else None

    async def _approach(self, site: int, budget: int | None) -> tuple[StopInfo | None, int]:
        """The plugin stopped QEMU at the start of a block that ends with the trap at
        ``site``: single-step up to it (at most ``budget`` steps). The loop then takes
        the trap. A stop on the way (a breakpoint, an interrupt taken elsewhere...) ends
        the approach; the trap, translated again, is caught again later. Returns the
        stop to report, if any, and the steps made."""
        start = pc = await self.target.read_pc()
        steps = 0
        if pc in self.points.breakpoints and (self._reached is None or not self._reached()):
            return StopInfo(StopReason.BREAKPOINT, pc=pc), steps  # held before it ran
        while start <= pc < site and (budget is None or steps < budget) and not self._stop_requested:
            if self._reached is not None and self._reached():
                break
            reply = await self._single()
            steps += 1
            hit = await self._watch_hit()
            if hit is not None:
                return hit, steps
            if not self._plain(reply, SIGTRAP):
                return await self._settle(reply, StopReason.STEP), steps
            pc = await self.target.read_pc()
            if self._reached is not None and self._reached():
                break  # a breakpoint here is reported by the next quantum, before it runs
            if pc in self.points.breakpoints and (budget is None or steps < budget):
                return StopInfo(StopReason.BREAKPOINT, pc=pc), steps
        return None, steps

    async def _watch_hit(self) -> StopInfo | None:
        """Lock-step: the watchpoint the plugin saw hit (after the access), if any."""
        gate = self.target.process.gate
        if not self.points.held or gate is None:
            return None
        hit = gate.lockstep.take_hit()
        if hit is None:
            return None
        address, _, access = hit
        pc = await self.target.read_pc()
        data = await self.target.stub().read_memory(address, self.points.watch_size(address))
        return StopInfo(StopReason.WATCHPOINT, pc=pc, watch_address=address,
                        watch_value=int.from_bytes(data, "little"),
                        watch_access="write" if access & WATCH_WRITE else "read")

    async def _step_from(self, pc: int) -> StopInfo | None:
        """One instruction from ``pc`` (a semihosting trap there is handled: an exit
        ends the program, another call is performed): None when it simply ran, else
        the stop it made."""
        if pc in self.traps and await self.traps.is_trap(self.target.stub(), pc):
            exit_info = await self.decoder.semihosting_exit(pc)
            if exit_info is not None:
                return exit_info
            reply = await self.traps.perform(pc, self._single)
        else:
            gate = self.target.process.gate
            held = self.points.held and gate is not None and pc in gate.sites.break_sites
            if held:
                assert gate is not None
                gate.sites.pass_trap(pc)  # the step runs the instruction at a held breakpoint
            try:
                reply = await self._single()
            finally:
                if held and gate is not None:
                    gate.sites.pass_trap(None)
        hit = await self._watch_hit()
        if hit is not None:
            return hit
        if self._plain(reply, SIGTRAP):
            return None
        return await self._settle(reply, StopReason.STEP)

    async def _settle(self, reply: StopReply, default: StopReason) -> StopInfo | None:
        """The StopInfo for a stop reply; None for a stop at a semihosting trap (the
        loop goes on from there)."""
        if reply.exited:
            return await self.target.process.ended(self.decoder.ended(reply, self.target.last_pc))
        if reply.watch is not None and self.points.watchpoints:
            outcome = await self.decoder.watchpoint(reply, self._unstoppable_single)
            return outcome if isinstance(outcome, StopInfo) else await self._settle(outcome, default)
        pc = await self._stop_pc()
        if reply.signal == SIGTRAP and pc in self.traps and pc not in self.points.breakpoints:
            return None  # a hidden breakpoint: the loop takes the trap there
        return self.decoder.plain(reply, pc, default)

    async def _stop_pc(self) -> int:
        """The pc now: the plugin's record of the VM's last stop when that stop came
        after the last resume (nothing has run or changed the pc since: the caller has
        just had its stop reply), else read through the gdbstub."""
        gate = self.target.process.gate
        if (gate is not None and self._stops_at_resume is not None and gate.stop_records.recorded
                and gate.stop_records.stops > self._stops_at_resume):
            pc = gate.stop_records.pc
            self.target.last_pc = pc
            return pc
        return await self.target.read_pc()

    def _resuming(self) -> None:
        gate = self.target.process.gate
        self._stops_at_resume = gate.stop_records.stops if gate is not None else None

    # ------------------------------------------------------------------ resuming QEMU
    async def _resume(self, packet: bytes, *, hold_after: int | None = None) -> StopReply:
        """Resume QEMU and wait for its stop reply; ``hold_after``: the gate's hold count
        before resuming (a hold is answered with ^C)."""
        stub = self.target.stub()
        gate = self.target.process.gate
        self._resuming()
        await stub.send_continue(packet)
        self._in_flight, self._interrupt_sent = True, False
        self._interrupt_sent_event.clear()
        self.target.clock.started()
        if self._stop_requested:
            self._interrupt()
        reply_task = asyncio.ensure_future(stub.wait_stop(None))
        hold = (asyncio.ensure_future(gate.wait_hold(hold_after))
                if hold_after is not None and gate is not None else None)
        interrupted = asyncio.ensure_future(self._interrupt_sent_event.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {reply_task, interrupted}
            if hold is not None:
                waiting.add(hold)
            while not reply_task.done() and not interrupted.done():
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if hold is not None and hold in done:
                    waiting.discard(hold)
                    if hold.exception() is None:
                        self._interrupt()  # the gate holds the vCPU: stop the VM there
            if not reply_task.done():  # ^C sent: QEMU must answer now
                try:
                    await asyncio.wait_for(asyncio.shield(reply_task), STOP_TIMEOUT)
                except TimeoutError:
                    reply_task.cancel()
                    raise RspTimeout(f"QEMU did not stop within {STOP_TIMEOUT} s of ^C") from None
            return reply_task.result()
        finally:
            self._in_flight = False
            self.target.clock.stopped()
            for helper in (hold, interrupted, reply_task):
                if helper is not None and not helper.done():
                    helper.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await helper

    async def _single(self, *, stoppable: bool = True) -> StopReply:
        """One gdbstub single step. A step that does not finish (a ``wfi`` with nothing
        to wake it) is interrupted: HALT; either way its stop reply is collected (the
        gdbstub takes no other request while it is owed). ``stoppable``: a stop request
        interrupts the step too; not so for the step that completes a watched access
        (stopped before the access, it would be reported again on the next resume)."""
        stub = self.target.stub()
        self._resuming()
        await stub.send_continue(b"s")
        self._in_flight, self._interrupt_sent = stoppable, False
        self._interrupt_sent_event.clear()
        self.target.clock.started()
        try:
            if self._stop_requested:
                self._interrupt()
            try:
                return await stub.wait_stop(STEP_TIMEOUT)
            except RspTimeout:
                self._in_flight = True
                self._interrupt()
                return await stub.wait_stop(STOP_TIMEOUT)
        finally:
            self._in_flight = False
            self.target.clock.stopped()

    async def _unstoppable_single(self) -> StopReply:
        return await self._single(stoppable=False)

    async def _counted(self, remaining: int) -> tuple[StopReply, int]:
        """One counted continue toward ``remaining`` instructions: the stop reply and how
        many instructions ran."""
        gate = self.target.process.gate
        assert gate is not None
        fine = remaining < COARSE_MIN and self._fine_blocks
        if fine and not await self._one_instruction_blocks(True):
            fine = False
        start = gate.executed
        # hold at the end of the block that passes the limit: at most a block beyond it
        gate.arm(start + remaining - (1 if fine else BLOCK_MAX))
        try:
            reply = await self._resume(b"c", hold_after=gate.holds)
        finally:
            gate.disarm()
            if fine and self.target.process.alive:
                await self._one_instruction_blocks(False)
        return reply, gate.executed - start

    async def _one_instruction_blocks(self, on: bool) -> bool:
        """HMP ``singlestep``: QEMU translates one instruction per block (False when this
        QEMU has no such command)."""
        out = await self.target.process.hmp("singlestep on" if on else "singlestep off")
        if out.strip():  # it answers nothing when it works
            self._fine_blocks = False
            return False
        return True
