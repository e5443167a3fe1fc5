"""What every part of a gdbremote machine shares: the one RSP connection to the remote
(:class:`~machineserver.server.rsp.RspClient`), the machine's state, the request lock,
the breakpoint/watchpoint table, and the error boundary (:func:`guarded`).

What the library's errors mean here. A plain :class:`RspError` is the remote *refusing*
a request (``Exx`` or an empty "unsupported" reply): a part turns it into BadRequest or
NotSupported. Every other kind says the connection cannot be used any more:

===================  ==================================================================
RspClosed            the remote hung up (a board unplugged, a simulator ended)
RspTimeout           no answer in time: the remote is stuck
RspProtocolError     garbage, a reply nobody asked for, NAKs without end: BROKEN
RspStateError        the client went BROKEN before (or a driver bug)
===================  ==================================================================

Each makes the machine FAILED with the reason (``MachineEvents.failed``, once), and the
call gets BackendFailed. A BROKEN connection is not reconnected behind the caller's back
(what the remote did with the request whose reply went astray is unknown); power_on
connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from machineserver.server.drivers.base import (
    Arch,
    BackendFailed,
    BoardSpec,
    MachineEvents,
    MachineState,
    WatchKind,
    WrongState,
)
from machineserver.server.rsp import RspClient, RspError, RspStateError, State
from machineserver.server.rsp.targetdesc import RegisterMap

SOFTWARE, HARDWARE = 0, 1  # Z/z types
WATCH_TYPE = {WatchKind.WRITE: 2, WatchKind.READ: 3, WatchKind.ACCESS: 4}
REQUEST_TIMEOUT = 5.0
INSPECTABLE = (MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED)


def refused(exc: RspError) -> bool:
    """The remote answered with a refusal (the connection itself is fine)."""
    return type(exc) is RspError


@contextlib.contextmanager
def refusals_ignored() -> Iterator[None]:
    try:
        yield
    except RspError as exc:
        if not refused(exc):
            raise


@dataclass
class PointTable:
    """The user's breakpoints (address -> inserted as hardware) and watchpoints. They
    outlive a connection: a power-on inserts them again."""

    breakpoints: dict[int, bool] = field(default_factory=dict)
    watchpoints: set[tuple[int, int, WatchKind]] = field(default_factory=set)

    def watch_size(self, address: int) -> int:
        return next((size for addr, size, _ in self.watchpoints if addr == address), 4)


class RemoteLink:
    """The connection and the machine state the parts share."""

    def __init__(self, board: BoardSpec, events: MachineEvents) -> None:
        self.board = board
        self.arch = board.arch
        self.events = events
        self.client: RspClient | None = None
        self.regmap: RegisterMap | None = None
        self.state = MachineState.OFF
        self.failure = ""
        self.op = asyncio.Lock()  # one sequence of requests at a time
        self.points = PointTable()
        self.steps = 0  # instructions executed by single steps (the only ones counted)
        self.last_pc = 0
        self.x_packets = False  # the remote takes X (binary memory writes)

    # ------------------------------------------------------------------ state

    def stub(self) -> RspClient:
        if self.state is MachineState.FAILED:
            raise BackendFailed(f"the remote target failed: {self.failure}")
        if self.client is None or self.state is MachineState.OFF:
            raise WrongState("the machine is powered off", state=self.state.value, required="halted")
        return self.client

    def require(self, *states: MachineState, action: str) -> None:
        if self.state is MachineState.FAILED:
            raise BackendFailed(f"the remote target failed: {self.failure}")
        if self.state not in states:
            needed = " or ".join(s.value for s in states)
            raise WrongState(f"cannot {action} while {self.state.value} (needs {needed})",
                             state=self.state.value, required=needed)

    def require_inspectable(self, action: str) -> None:
        self.require(*INSPECTABLE, action=action)
        if self.state is MachineState.EXITED:
            # a 'W' stop reply: the remote's program (and, for a QEMU, the remote itself) has
            # ended; the stub closes the connection or soon will
            raise WrongState(f"cannot {action}: the remote ended with the program (it answered "
                             "'W'); power on again to reconnect", state=self.state.value, required="halted")

    def fail(self, reason: str) -> BackendFailed:
        """FAILED with ``reason``, reported once; returns the error for the caller."""
        if self.state is not MachineState.FAILED:
            self.state = MachineState.FAILED
            self.failure = reason
            self.events.failed(reason)
        return BackendFailed(f"the remote target failed: {self.failure}")

    def unusable(self, exc: RspError) -> BackendFailed:
        if isinstance(exc, RspStateError) and exc.state is not State.BROKEN:
            return self.fail(f"the driver used the connection out of turn (a driver bug): {exc}")
        return self.fail(f"lost the remote target: {exc}")

    # ------------------------------------------------------------------ registers

    def reg_number(self, name: str) -> int:
        assert self.regmap is not None
        reg = self.regmap.resolve(name)
        if reg is None:
            raise BackendFailed(f"the remote's register set has no {name}")
        return reg.number

    async def read_register(self, name: str) -> int:
        data = await self.stub().read_register(self.reg_number(name))
        return int.from_bytes(data, "little")

    async def write_register(self, name: str, value: int) -> None:
        assert self.regmap is not None
        reg = self.regmap.resolve(name)
        assert reg is not None
        await self.stub().write_register(reg.number, value.to_bytes(reg.size, "little"))

    async def read_pc(self) -> int:
        self.last_pc = await self.read_register("pc")
        return self.last_pc

    def breakpoint_kind(self, address: int, low: bytes | None) -> int:
        """Z0/Z1 "kind": 2 for Thumb; on RISC-V 4, or 2 for a compressed instruction."""
        if self.arch is Arch.ARM_CORTEX_M:
            return 2
        return 2 if low is not None and low[0] & 3 != 3 else 4


_P = ParamSpec("_P")
_T = TypeVar("_T")


class HasLink(Protocol):
    link: RemoteLink


_H = TypeVar("_H", bound=HasLink)


def guarded(
    func: Callable[Concatenate[_H, _P], Awaitable[_T]],
) -> Callable[Concatenate[_H, _P], Coroutine[Any, Any, _T]]:
    """The error boundary of a part's method: an RSP error that is not a refusal makes
    the machine FAILED and raises BackendFailed; a refusal that reaches here (a part did
    not expect one) is BackendFailed without failing the machine."""

    @functools.wraps(func)
    async def wrapper(self: _H, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await func(self, *args, **kwargs)
        except RspError as exc:
            if refused(exc):
                raise BackendFailed(f"the remote target refused: {exc}") from None
            raise self.link.unusable(exc) from None

    return wrapper


async def insert_breakpoint(link: RemoteLink, stub: RspClient, address: int, hardware: bool) -> bool:
    """Insert one; returns whether it went in as a hardware breakpoint."""
    low = None
    if link.arch is Arch.RISCV32:
        with refusals_ignored():
            low = await stub.read_memory(address, 2)
    kind = link.breakpoint_kind(address, low)
    if not hardware:
        try:
            await stub.insert_point(SOFTWARE, address, kind)
            return False
        except RspError as exc:
            if not refused(exc):
                raise
    await stub.insert_point(HARDWARE, address, kind)
    return True
