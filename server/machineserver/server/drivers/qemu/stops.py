"""What a stop reply from QEMU's gdbstub means: StopInfo, and the few follow-ups a stop
needs before it can be reported (a watchpoint's access completed, a semihosting trap's
operation read)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from machineserver.server.drivers.base import StopInfo, StopReason
from machineserver.server.drivers.qemu import semihosting
from machineserver.server.drivers.qemu.gdbstub import refusals_ignored, refused
from machineserver.server.drivers.qemu.points import PointTable
from machineserver.server.drivers.qemu.target import QemuTarget
from machineserver.server.rsp import RspError, State, StopReply

SIGINT, SIGTRAP = 2, 5
STEP_TIMEOUT = 5.0  # one instruction
# single steps with interrupts masked and timers stopped (QEMU's default flags), for
# completing a watched access: an interrupt taken instead would leave it undone
SSTEP_MASKED = b"Qqemu.sstep=0x7"
SSTEP_NORMAL = b"Qqemu.sstep=0x1"


class StopDecoder:
    def __init__(self, target: QemuTarget, points: PointTable) -> None:
        self.target = target
        self.points = points

    @staticmethod
    def ended(reply: StopReply, pc: int) -> StopInfo:
        """A ``W``/``X`` reply: the program ended and QEMU with it."""
        if reply.kind == "W":
            return StopInfo(StopReason.EXIT, pc=pc, exit_code=reply.signal)
        return StopInfo(StopReason.FAULT, pc=pc, message=f"QEMU was killed by signal {reply.signal}")

    def plain(self, reply: StopReply, pc: int, default: StopReason) -> StopInfo:
        """A stop that needs no follow-up: a user breakpoint, an interrupt, a step."""
        if reply.signal != SIGTRAP:
            return StopInfo(StopReason.HALT, pc=pc)
        if pc in self.points.breakpoints and default is not StopReason.STEP:
            return StopInfo(StopReason.BREAKPOINT, pc=pc)
        return StopInfo(default, pc=pc)

    async def watchpoint(self, reply: StopReply,
                         step: Callable[[], Awaitable[StopReply]]) -> StopInfo | StopReply:
        """QEMU 7.2 reports a watchpoint *before* the access (pc at the accessing
        instruction; continuing or stepping re-triggers it). As gdb does for such
        "non-steppable" watchpoints: ``step`` it with the watchpoints out (interrupts
        masked for that one step), put them back. The stop then reads like a data
        breakpoint: after the access, with the new value. Returns the step's reply instead
        when the step ended the program.

        ``step`` is the executor's single step (one a stop request does not cut short),
        which interrupts a step that does not finish and collects its stop reply: the
        gdbstub takes the requests that put things back only once no stop reply is owed.
        When the step failed with the reply still owed (a stuck or lost QEMU) nothing is
        put back: its error goes on to the boundary."""
        assert reply.watch is not None
        access, address = reply.watch
        stub = self.target.stub()
        await self.points.remove_watchpoints(stub)
        with refusals_ignored():
            await stub.request_ok(SSTEP_MASKED)
        try:
            after = await step()
        finally:
            if stub.state is State.IDLE:
                with refusals_ignored():
                    await stub.request_ok(SSTEP_NORMAL)
                await self.points.insert_watchpoints(stub)
        if after.exited:
            return after
        pc = await self.target.read_pc()
        value = None
        with refusals_ignored():
            data = await stub.read_memory(address, self.points.watch_size(address))
            value = int.from_bytes(data, "little")
        return StopInfo(StopReason.WATCHPOINT, pc=pc, watch_address=address, watch_value=value,
                        watch_access=access)

    async def semihosting_exit(self, pc: int) -> StopInfo | None:
        """At a trap site (checked by the caller): the exit the semihosting call there
        makes, or None when it is another call."""
        stub = self.target.stub()
        arch = self.target.arch
        operation = await self.target.read_register(semihosting.OPERATION_REGISTER[arch])
        argument = await self.target.read_register(semihosting.ARGUMENT_REGISTER[arch])

        async def read(address: int, size: int) -> bytes | None:
            try:
                return await stub.read_memory(address, size)
            except RspError as exc:
                if not refused(exc):
                    raise
                return None

        code = await semihosting.exit_code(operation, argument, read)
        if code is None:
            return None
        return StopInfo(StopReason.EXIT, pc=pc, exit_code=code)
