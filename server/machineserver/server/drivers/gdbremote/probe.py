"""What a remote target can do, found out at power-on without changing its state: each
probe inserts a breakpoint or watchpoint and removes it again at once. Results go to
the machine's details() and to ``Machine.lack`` for what it lacks."""

from __future__ import annotations

from dataclasses import dataclass, field

from machineserver.server.drivers.base import BoardSpec
from machineserver.server.drivers.gdbremote.link import HARDWARE, RemoteLink, refusals_ignored, refused
from machineserver.server.rsp import RspClient, RspError

WATCH_KINDS = (("write", 2), ("read", 3), ("access", 4))


@dataclass
class Abilities:
    hardware_breakpoints: str = "untested"  # "yes" | "no: ..."
    watch_kinds: list[str] = field(default_factory=list)
    watch_refusal: str = ""
    x_packets: bool = False
    monitor: str = "untested"  # "yes" (qRcmd answered) | "no: ..."


def _ram_address(board: BoardSpec) -> int | None:
    region = next((r for r in board.memory if r.kind == "ram" and r.writable), None)
    return None if region is None else region.base


async def probe(link: RemoteLink, stub: RspClient, pc: int) -> Abilities:
    found = Abilities()
    kind = link.breakpoint_kind(pc, None)
    try:
        await stub.insert_point(HARDWARE, pc, kind)
        with refusals_ignored():
            await stub.remove_point(HARDWARE, pc, kind)
        found.hardware_breakpoints = "yes"
    except RspError as exc:
        if not refused(exc):
            raise
        found.hardware_breakpoints = f"no: Z1 refused ({exc})"
    address = _ram_address(link.board)
    if address is None:
        found.watch_refusal = "the board has no RAM region to probe watchpoints at"
    else:
        for name, ztype in WATCH_KINDS:
            try:
                await stub.insert_point(ztype, address, 4)
                with refusals_ignored():
                    await stub.remove_point(ztype, address, 4)
                found.watch_kinds.append(name)
            except RspError as exc:
                if not refused(exc):
                    raise
                found.watch_refusal = found.watch_refusal or f"Z{ztype} refused ({exc})"
    try:  # a zero-length X: whether the remote takes binary writes (writes nothing)
        found.x_packets = await stub.request(b"X%x,0:" % (address or 0)) == b"OK"
    except RspError as exc:
        if not refused(exc):
            raise
    try:  # qRcmd "help" (changes nothing): does the remote have a monitor at all
        await stub.monitor("help")
        found.monitor = "yes"
    except RspError as exc:
        if not refused(exc):
            raise
        found.monitor = f"no: qRcmd refused ({exc})"
    return found
