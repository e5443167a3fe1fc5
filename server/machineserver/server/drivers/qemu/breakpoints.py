"""Breakpoints and watchpoints of a QEMU machine (the parts; the table of what is set is
:class:`.points.PointTable`).

They can be set in any state: kept in the table, and put into QEMU when one runs (a
fresh QEMU gets them all, see :meth:`PointTable.insert_all`). While the machine runs,
QEMU's gdbstub takes no packets (all-stop mode): the edit stops it quietly, edits, and
resumes it (:meth:`.runcontrol.QemuRunControl.halted_for_edit`).
"""

from __future__ import annotations

from machineserver.server.drivers.base import (
    WATCH_SIZES,
    BadRequest,
    Breakpoints,
    WatchKind,
    Watchpoints,
)
from machineserver.server.drivers.qemu.gdbstub import refusals_ignored, refused
from machineserver.server.drivers.qemu.points import WATCH_TYPE, PointTable
from machineserver.server.drivers.qemu.runcontrol import QemuRunControl
from machineserver.server.drivers.qemu.target import QemuTarget, guarded
from machineserver.server.rsp import RspError


def check_range(address: int, size: int) -> None:
    """An address range inside the 32-bit address space (BadRequest otherwise)."""
    if address < 0 or address >= 1 << 32:
        raise BadRequest(f"address 0x{address:x} is outside the 32-bit space", field="address")
    if size < 0 or address + size > 1 << 32:
        raise BadRequest("the range runs past the 32-bit address space", field="size")


class QemuBreakpoints(Breakpoints):
    def __init__(self, target: QemuTarget, points: PointTable, run_control: QemuRunControl) -> None:
        self.target = target
        self.points = points
        self.run_control = run_control

    @guarded
    async def set_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        check_range(address, 1)
        address = self.points.code_address(address)
        async with self.target.op:
            if address in self.points.breakpoints:
                return
            if self.points.held:
                await self._held_changed(address=address, hardware=hardware)
                return
            async with self.run_control.halted_for_edit():
                if self.target.process.alive:
                    try:
                        await self.points.insert_breakpoint(self.target.stub(), address, hardware)
                    except RspError as exc:
                        if not refused(exc):
                            raise
                        raise BadRequest(f"cannot set a breakpoint at 0x{address:08x}: {exc}",
                                         field="address") from None
                self.points.breakpoints[address] = hardware

    @guarded
    async def clear_breakpoint(self, address: int) -> None:
        address = self.points.code_address(address)
        async with self.target.op:
            if address not in self.points.breakpoints:
                return
            if self.points.held:
                await self._held_changed(address=address, hardware=None)
                return
            async with self.run_control.halted_for_edit():
                hardware = self.points.breakpoints.pop(address)
                if self.target.process.alive:
                    await self.points.remove_breakpoint(self.target.stub(), address, hardware)


    async def _held_changed(self, *, address: int, hardware: bool | None) -> None:
        """Lock-step (halted between quanta): the gate holds the breakpoints; set
        (``hardware`` given) or clear the one at ``address`` there."""
        if hardware is None:
            self.points.breakpoints.pop(address, None)
        else:
            self.points.breakpoints[address] = hardware
        await held_changed(self.target, self.points)


async def held_changed(target: QemuTarget, points: PointTable) -> None:
    """Put the table into the gate again after an edit in lock-step."""
    gate = target.process.gate
    if target.process.alive and gate is not None:
        try:
            await points.hold_in(gate)
        except (RuntimeError, ValueError) as exc:
            raise BadRequest(f"the lock-step gate cannot take the points: {exc}",
                             field="address") from None


class QemuWatchpoints(Watchpoints):
    def __init__(self, target: QemuTarget, points: PointTable, run_control: QemuRunControl) -> None:
        self.target = target
        self.points = points
        self.run_control = run_control

    @guarded
    async def set_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        if size not in WATCH_SIZES:
            raise BadRequest(f"watchpoint size must be one of {WATCH_SIZES}", field="size")
        check_range(address, size)
        if self.target.board.region_at(address, size) is None:
            raise BadRequest(f"0x{address:08x}..+{size} is not in {self.target.board.name}'s memory",
                             field="address")
        key = (address, size, kind)
        async with self.target.op:
            if key in self.points.watchpoints:
                return
            if self.points.held:
                self.points.watchpoints.add(key)
                await held_changed(self.target, self.points)
                return
            async with self.run_control.halted_for_edit():
                if self.target.process.alive:
                    try:
                        await self.target.stub().insert_point(WATCH_TYPE[kind], address, size)
                    except RspError as exc:
                        if not refused(exc):
                            raise
                        raise BadRequest(f"cannot set a watchpoint at 0x{address:08x}: {exc}",
                                         field="address") from None
                self.points.watchpoints.add(key)

    @guarded
    async def clear_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        key = (address, size, kind)
        async with self.target.op:
            if key not in self.points.watchpoints:
                return
            if self.points.held:
                self.points.watchpoints.discard(key)
                await held_changed(self.target, self.points)
                return
            async with self.run_control.halted_for_edit():
                self.points.watchpoints.discard(key)
                if self.target.process.alive:
                    with refusals_ignored():  # QEMU refuses to remove what it lacks: fine
                        await self.target.stub().remove_point(WATCH_TYPE[kind], address, size)
