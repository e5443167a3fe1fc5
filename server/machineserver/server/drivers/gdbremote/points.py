"""Breakpoints (``Z0``; ``Z1`` when asked for hardware, or when the remote refuses a
software one, e.g. in flash) and watchpoints (``Z2``/``Z3``/``Z4``) of a gdbremote
machine. Kept in the link's table: set before power-on, they go in at power-on."""

from __future__ import annotations

from machineserver.server.drivers.base import (
    WATCH_SIZES,
    Arch,
    BadRequest,
    Breakpoints,
    MachineState,
    WatchKind,
    Watchpoints,
)
from machineserver.server.drivers.gdbremote.link import (
    HARDWARE,
    SOFTWARE,
    WATCH_TYPE,
    RemoteLink,
    guarded,
    insert_breakpoint,
    refusals_ignored,
    refused,
)
from machineserver.server.drivers.gdbremote.memory import check_range
from machineserver.server.drivers.gdbremote.runcontrol import RemoteRunControl
from machineserver.server.rsp import RspClient, RspError


def connected(link: RemoteLink) -> bool:
    return link.client is not None and not link.client.closed and link.state not in (
        MachineState.OFF, MachineState.FAILED)


async def insert_all(link: RemoteLink, stub: RspClient) -> None:
    for address, hardware in list(link.points.breakpoints.items()):
        link.points.breakpoints[address] = await insert_breakpoint(link, stub, address, hardware)
    for address, size, kind in link.points.watchpoints:
        await stub.insert_point(WATCH_TYPE[kind], address, size)


class RemoteBreakpoints(Breakpoints):
    def __init__(self, link: RemoteLink, run_control: RemoteRunControl) -> None:
        self.link = link
        self.run_control = run_control

    def _code(self, address: int) -> int:
        return address & ~1 if self.link.arch is Arch.ARM_CORTEX_M else address

    @guarded
    async def set_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        check_range(address, 1)
        address = self._code(address)
        if address in self.link.points.breakpoints:
            return
        async with self.run_control.halted_for_edit(), self.link.op:
            if connected(self.link):
                try:
                    hardware = await insert_breakpoint(self.link, self.link.stub(), address, hardware)
                except RspError as exc:
                    if not refused(exc):
                        raise
                    raise BadRequest(f"the remote refused a breakpoint at 0x{address:08x}: {exc}",
                                     field="address") from None
            self.link.points.breakpoints[address] = hardware

    @guarded
    async def clear_breakpoint(self, address: int) -> None:
        address = self._code(address)
        if address not in self.link.points.breakpoints:
            return
        async with self.run_control.halted_for_edit(), self.link.op:
            hardware = self.link.points.breakpoints.pop(address)
            if connected(self.link):
                with refusals_ignored():
                    await self.link.stub().remove_point(HARDWARE if hardware else SOFTWARE, address,
                                                        self.link.breakpoint_kind(address, None))


class RemoteWatchpoints(Watchpoints):
    def __init__(self, link: RemoteLink, run_control: RemoteRunControl) -> None:
        self.link = link
        self.run_control = run_control

    @guarded
    async def set_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        if size not in WATCH_SIZES:
            raise BadRequest(f"watchpoint size must be one of {WATCH_SIZES}", field="size")
        check_range(address, size)
        if self.link.board.region_at(address, size) is None:
            raise BadRequest(f"0x{address:08x}..+{size} is not in {self.link.board.name}'s memory",
                             field="address")
        key = (address, size, kind)
        if key in self.link.points.watchpoints:
            return
        async with self.run_control.halted_for_edit(), self.link.op:
            if connected(self.link):
                try:
                    await self.link.stub().insert_point(WATCH_TYPE[kind], address, size)
                except RspError as exc:
                    if not refused(exc):
                        raise
                    raise BadRequest(f"the remote refused a {kind.value} watchpoint at 0x{address:08x}: {exc}",
                                     field="address") from None
            self.link.points.watchpoints.add(key)

    @guarded
    async def clear_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        key = (address, size, kind)
        if key not in self.link.points.watchpoints:
            return
        async with self.run_control.halted_for_edit(), self.link.op:
            self.link.points.watchpoints.discard(key)
            if connected(self.link):
                with refusals_ignored():
                    await self.link.stub().remove_point(WATCH_TYPE[kind], address, size)
