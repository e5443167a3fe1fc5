"""What every part of one QEMU machine shares: the board and options, the events sink,
the run state, the control lock, the QEMU process (:mod:`.process`), the register map,
the virtual clock, and :func:`guarded`, the error boundary of every part's methods.

The parts (run control, registers, memory, breakpoints...) each hold the machine's one
:class:`QemuTarget`; none holds another part's state.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from qemu.qmp.error import QMPError

from machineserver.server.drivers.base import (
    Arch,
    BadRequest,
    BoardSpec,
    Counters,
    DriverError,
    MachineEvents,
    MachineOptions,
    MachineState,
    StopInfo,
    WrongState,
)
from machineserver.server.drivers.qemu.gdbstub import unusable_reason
from machineserver.server.drivers.qemu.process import QemuProcess
from machineserver.server.rsp import (
    CodecError,
    RspClient,
    RspClosed,
    RspError,
    RspProtocolError,
    RspStateError,
    RspTimeout,
)
from machineserver.server.rsp.targetdesc import RegisterMap

if TYPE_CHECKING:
    from machineserver.server.drivers.qemu.gate import InstructionGate
    from machineserver.server.drivers.qemu.spares import SparePool

# states in which the CPU is stopped and its registers and memory can be inspected
INSPECTABLE = (MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED)


def icount_shift(board: BoardSpec, options: MachineOptions) -> int:
    """ns per instruction = 2**shift; from options.extra["icount_shift"] or the board clock."""
    text = options.extra.get("icount_shift", "")
    if text:
        try:
            return max(0, min(10, int(text)))
        except ValueError:
            raise BadRequest("icount_shift must be an integer 0..10", field="icount_shift") from None
    mhz = board.cpu_mhz or 1.0
    return max(0, min(10, round(math.log2(1000.0 / mhz))))


class RunClock:
    """Instructions and virtual time, readable at any moment (``counters()`` is
    synchronous: it reads the plugin's shared page, no round trip), also while QEMU runs.

    * **Instructions**: the plugin's ``total`` (:attr:`.gate.InstructionGate.total`: each
      translated block adds its size when it starts), so the count moves while QEMU runs.
      With icount, each stop sets it to QEMU's own icount (the plugin's record of it at the
      VM stop, or QMP ``query-replay``), and while running the plugin's count since that
      stop is added. Without the plugin (no C compiler) and without icount nothing counts:
      0, and ``exact`` False.
    * **Virtual time**: with icount, icount << shift; without, the wall time spent running
      (QEMU's virtual clock runs at host speed).
    * **exact**: with icount, always; without, when the plugin counts. A block that an
      exception leaves mid-way (a memory fault taken by a handler, a watchpoint hit)
      counts whole there: the instructions after the faulting one in that block, a few,
      at most 512. Every stop the driver makes (a pause, breakpoint, step, counted run,
      semihosting trap, exit) is at a block boundary and counts exactly.

    The count is ``base`` plus what the current QEMU's plugin has counted since ``mark``;
    a new QEMU (power on, restore, restart) is folded in when first seen."""

    def __init__(self, shift: int | None) -> None:
        self.shift = shift
        self.instructions = 0  # the base: the count at the mark
        self.virtual_ns = 0
        self._running_since: float | None = None
        self._gate: InstructionGate | None = None  # the gate the mark is of
        self._mark = 0  # its total at the mark
        self._counting = True  # the last QEMU seen had the plugin's count

    def started(self) -> None:
        self._running_since = time.monotonic()

    def stopped(self) -> None:
        if self._running_since is not None and self.shift is None:
            self.virtual_ns += int((time.monotonic() - self._running_since) * 1e9)
        self._running_since = None

    def set(self, instructions: int, virtual_ns: int, gate: InstructionGate | None = None) -> None:
        """The count now is ``instructions``; ``gate``: the current QEMU's (None: a QEMU
        started after this call counts from its start)."""
        self.instructions, self.virtual_ns = instructions, virtual_ns
        self._gate, self._mark = gate, (gate.total or 0) if gate is not None else 0

    def _since_mark(self, gate: InstructionGate | None) -> int | None:
        """What the plugin counted since the mark (a new gate: folds the old one in);
        None when nothing counts."""
        if gate is not self._gate:
            if self._gate is not None:
                self.instructions += max(0, (self._gate.total or 0) - self._mark)
            self._gate, self._mark = gate, 0
        if gate is not None:
            self._counting = gate.counts_total
        total = gate.total if gate is not None else None
        return None if total is None else max(0, total - self._mark)

    def counters(self, process: QemuProcess) -> Counters:
        """The counts now, of ``process``'s current QEMU and those before it."""
        gate = process.gate
        if gate is None and process.instance is not None:
            self._counting = False  # a QEMU without the plugin
        virtual = self.virtual_ns
        if self.shift is None and self._running_since is not None:
            virtual += int((time.monotonic() - self._running_since) * 1e9)
        counted = self._since_mark(gate)
        exact = self.shift is not None or self._counting
        return Counters(instructions=self.instructions + (counted or 0), virtual_time_ns=virtual,
                        exact=exact)

    async def refresh(self, process: QemuProcess) -> None:
        """At a stop: with icount, the count of the stopped QEMU (the plugin's record of its
        last VM stop when it keeps one: no round trip; nothing counts while the VM is
        stopped), else QMP. Without icount the plugin's total is the count already."""
        if self.shift is None or not process.alive:
            return
        gate = process.gate
        if gate is not None and gate.stop_records.recorded and gate.stop_records.stops > 0:
            self.set(gate.stop_records.icount, gate.stop_records.icount << self.shift, gate)
            return
        info = await process.qmp("query-replay")
        if isinstance(info, dict):
            icount = int(info.get("icount", 0))
            self.set(icount, icount << self.shift, gate)


class QemuTarget:
    """One QEMU machine's shared state. ``state`` is the machine's run state; ``op``
    serialises control operations (one at a time); ``end`` is how the program ended
    while the state is EXITED or FAULTED."""

    def __init__(self, board: BoardSpec, options: MachineOptions, events: MachineEvents, *,
                 qemu_machine: str, binary: str, extra_args: Sequence[str] = (),
                 spares: SparePool | None = None) -> None:
        self.board = board
        self.options = options
        self.events = events
        self.qemu_machine = qemu_machine
        self.binary = binary
        self.state = MachineState.OFF
        self.op = asyncio.Lock()
        self.regmap: RegisterMap | None = None
        self.clock = RunClock(icount_shift(board, options) if options.icount else None)
        self.process = QemuProcess(self, extra_args, spares)
        self.last_pc = 0
        self.end: StopInfo | None = None
        # lock-step (see .lockstep): console output is kept here instead of sent as events
        self.console_capture: bytearray | None = None
        # QEMU's virtual clock (ns) while the current QEMU has not stopped yet: 0 for a
        # fresh one, the snapshot's for a restored one
        self.vclock_base = 0

    def virtual_clock_ns(self) -> int:
        """QEMU's virtual clock at its last stop (the plugin records it; see gate.py):
        instructions plus the time warped over while the CPU slept, in ns."""
        gate = self.process.gate
        if gate is not None and gate.stop_records.stops > 0:
            return gate.stop_records.vclock
        return self.vclock_base

    def console_output(self, data: bytes) -> None:
        """What QEMU's console chardevs deliver: an event, or kept for lock-step."""
        if self.console_capture is not None:
            self.console_capture += data
        else:
            self.events.console_output(data)

    @property
    def arch(self) -> Arch:
        return self.board.arch

    # ------------------------------------------------------------------ states
    def require(self, *states: MachineState) -> None:
        if self.state not in states:
            raise WrongState(
                f"the machine is {self.state.value}; this needs it "
                + " or ".join(s.value for s in states),
                state=self.state.value,
                required="|".join(s.value for s in states),
            )

    def require_inspectable(self) -> None:
        """The CPU is stopped and QEMU still holds it (HALTED, or EXITED/FAULTED with
        QEMU alive: a semihosting exit caught at its trap)."""
        self.require(*INSPECTABLE)
        if not self.process.alive:
            how = f" ({self.end.message or self.end.reason.value})" if self.end else ""
            raise WrongState(
                f"the program ended and QEMU with it{how}: its registers and memory are "
                "gone; reset or load to start again",
                state=self.state.value, required="halted")

    def report_stop(self, info: StopInfo) -> None:
        self.events.stopped(info)

    # ------------------------------------------------------------------ the gdbstub
    def stub(self) -> RspClient:
        return self.process.stub()

    def _register(self, name: str) -> tuple[int, int]:
        assert self.regmap is not None
        reg = self.regmap.resolve(name)
        assert reg is not None, name
        return reg.number, reg.size

    async def read_register(self, name: str) -> int:
        number, _ = self._register(name)
        return int.from_bytes(await self.stub().read_register(number), "little")

    async def write_register(self, name: str, value: int) -> None:
        number, size = self._register(name)
        await self.stub().write_register(number, (value & ((1 << (8 * size)) - 1))
                                         .to_bytes(size, "little"))

    async def read_pc(self) -> int:
        pc = await self.read_register("pc")
        self.last_pc = pc
        return pc


# --------------------------------------------------------------------------- the boundary


class HasTarget(Protocol):
    target: QemuTarget


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound=HasTarget)


def guarded(method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]]
            ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """The error boundary of a part's method: only DriverError leaves it (and
    CancelledError). The gdbstub or QMP not answering in time means QEMU is stuck (e.g.
    SIGSTOPped): it is killed and the machine FAILED; a lost connection means QEMU died:
    its death is classified and reported once; a gdbstub connection that cannot be
    trusted any more (BROKEN, see :mod:`.gdbstub`), a stop reply that cannot be read, and
    a refusal nobody expected are a QEMU that misbehaves: FAILED too. Each raises
    BackendFailed with the reason (WrongState when the death was the program's own end,
    already reported as a stop)."""

    @functools.wraps(method)
    async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except DriverError:
            raise
        except RspTimeout as exc:
            raise await self.target.process.fail(f"QEMU stopped answering its gdbstub ({exc})") from None
        except RspClosed:
            raise await self.target.process.connection_lost() from None
        except (RspProtocolError, RspStateError) as exc:
            raise await self.target.process.fail(unusable_reason(exc)) from None
        except RspError as exc:
            raise await self.target.process.fail(f"QEMU's gdbstub refused a request: {exc}") from None
        except CodecError as exc:  # e.g. a watchpoint address in a stop reply that is not hex
            raise await self.target.process.fail(f"QEMU's gdbstub sent what cannot be read: {exc}") from None
        except (QMPError, EOFError, OSError) as exc:
            raise await self.target.process.fail(f"QEMU's monitor failed: {exc!r}") from None

    return call

