"""Debugging on top of sessions: breakpoints and watchpoints (kept per session and
re-applied whenever the machine is (re)loaded), registers, memory, disassembly
(capstone), symbols, and who controls a session's Attach streams.

The breakpoints a user sets (through the API) are records: stored in the ``breakpoints``
table when set, deleted when cleared or with their session, and loaded at start, so a
restarted server has them again and applies them at the next power-on. Those a GDB or
Attach client set (``Breakpoint.client``) live and die with that connection and are
never stored. Hit counts are not stored: they count since the server started.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, overload

import capstone

from machineserver.server.core import audit
from machineserver.server.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from machineserver.server.core.models import now
from machineserver.server.core.sessions import TABLE as SESSIONS
from machineserver.server.core.sessions import LiveSession, SessionManager, driver_errors
from machineserver.server.core.symbols import SymbolTable
from machineserver.server.drivers.base import (
    Arch,
    Breakpoints,
    Feature,
    Machine,
    MachineState,
    MemoryAccess,
    RegisterAccess,
    StopInfo,
    StopReason,
    WatchKind,
    Watchpoints,
)

MAX_MEMORY_BYTES = 1 << 20


class BreakpointKind(enum.StrEnum):
    SOFTWARE = "software"
    HARDWARE = "hardware"
    WATCH_READ = "watch_read"
    WATCH_WRITE = "watch_write"
    WATCH_ACCESS = "watch_access"

    @property
    def watch(self) -> WatchKind | None:
        return {
            BreakpointKind.WATCH_READ: WatchKind.READ,
            BreakpointKind.WATCH_WRITE: WatchKind.WRITE,
            BreakpointKind.WATCH_ACCESS: WatchKind.ACCESS,
        }.get(self)


@dataclass(frozen=True)
class Location:
    """Exactly one of the three is set."""

    address: int | None = None
    symbol: str = ""
    file_line: str = ""


@dataclass(frozen=True)
class SourcePosition:
    function: str = ""
    file: str = ""
    line: int = 0


@dataclass
class Breakpoint:
    id: int
    kind: BreakpointKind
    address: int
    size: int
    location: Location
    source: SourcePosition
    hit_count: int = 0
    client: str = ""  # the Attach client that set it, if any


BREAKPOINTS = "breakpoints"


def breakpoint_row(session_id: str, bp: Breakpoint) -> dict[str, object]:
    """A user breakpoint as a record (no hit count, no client: neither is kept)."""
    t = now()
    data = {"id": bp.id, "kind": bp.kind.value, "address": bp.address, "size": bp.size,
            "location": asdict(bp.location), "source": asdict(bp.source)}
    return {"id": f"{session_id}/{bp.id}", "session": session_id, "create_time": t, "update_time": t, "data": data}


def breakpoint_from_row(data: dict[str, Any]) -> Breakpoint:
    return Breakpoint(int(data["id"]), BreakpointKind(data["kind"]), int(data["address"]), int(data["size"]),
                      Location(**data["location"]), SourcePosition(**data["source"]))


@dataclass
class DebugState:
    breakpoints: dict[int, Breakpoint] = field(default_factory=dict)
    next_id: int = 1
    controller: str = ""  # Attach client id holding control


@dataclass(frozen=True)
class DisassembledInstruction:
    address: int
    raw: bytes
    mnemonic: str
    operands: str
    symbol: str
    source: SourcePosition


class Debugger:
    def __init__(self, sessions: SessionManager) -> None:
        self.sessions = sessions
        self._state: dict[str, DebugState] = {}
        sessions.power_on_hooks.append(self._reapply)
        sessions.stop_hooks.append(self._count_hit)
        sessions.delete_hooks.append(self.forget)
        sessions.breakpoint_probes.append(
            lambda live, pc: any(bp.address == pc and bp.kind.watch is None
                                 for bp in self._state.get(live.id, DebugState()).breakpoints.values()))

    def state(self, live: LiveSession) -> DebugState:
        return self._state.setdefault(live.id, DebugState())

    def forget(self, live: LiveSession) -> None:
        self._state.pop(live.id, None)
        self.sessions.db.delete_where(BREAKPOINTS, "session = ?", [live.id])

    def load(self) -> None:
        """The stored user breakpoints of every session (at start, after the sessions).
        Rows of sessions that are gone are deleted; those of a session kept but not
        loaded (its board config unreadable now) stay for a server that can load it."""
        db = self.sessions.db
        for row in db.rows(BREAKPOINTS, order_by="session, create_time, id"):
            live = self.sessions.find(row["session"])
            if live is None:
                if db.get(SESSIONS, row["session"]) is None:
                    db.delete(BREAKPOINTS, row["id"])
                continue
            bp = breakpoint_from_row(row["data"])
            st = self.state(live)
            st.breakpoints[bp.id] = bp
            st.next_id = max(st.next_id, bp.id + 1)

    # ------------------------------------------------------------------ symbols

    @overload
    def symbols(self, live: LiveSession, *, required: Literal[True] = ...) -> SymbolTable: ...
    @overload
    def symbols(self, live: LiveSession, *, required: bool) -> SymbolTable | None: ...

    def symbols(self, live: LiveSession, *, required: bool = True) -> SymbolTable | None:
        if not live.record.program:
            if required:
                raise FailedPrecondition(f"session {live.id} has no program loaded")
            return None
        prog = self.sessions.programs.by_id(live.record.program, "program")
        _, symbols = self.sessions.programs.load(prog)
        if symbols is None and required:
            raise FailedPrecondition(f"program {prog.name} ({prog.format}) has no symbols; upload the ELF")
        return symbols

    def position(self, live: LiveSession, address: int) -> SourcePosition:
        symbols = self.symbols(live, required=False)
        if symbols is None:
            return SourcePosition()
        func = symbols.function_at(address)
        line = symbols.line_at(address)
        return SourcePosition(
            function=func.name if func else "",
            file=line.file if line else "",
            line=line.line if line else 0,
        )

    def resolve(self, live: LiveSession, loc: Location, field_name: str = "location") -> int:
        if loc.address is not None:
            return loc.address
        if loc.symbol:
            return self.symbols(live).lookup(loc.symbol).address
        if loc.file_line:
            return self.symbols(live).address_of_line(loc.file_line)
        raise InvalidArgument(field_name, "give an address, a symbol or file:line")

    def resolve_query(self, live: LiveSession, *, symbol: str = "", address: int | None = None,
                      file_line: str = "") -> tuple[str, int, int, int, SourcePosition]:
        """(symbol, address, size, offset, source) for a name, an address or file:line."""
        symbols = self.symbols(live)
        if symbol:
            sym = symbols.lookup(symbol)
            return sym.name, sym.address, sym.size, 0, self.position(live, sym.address)
        if file_line:
            address = symbols.address_of_line(file_line)
        if address is None:
            raise InvalidArgument("query", "give a symbol, an address or file:line")
        hit = symbols.symbol_at(address)
        if hit is None:
            if file_line:
                return "", address, 0, 0, self.position(live, address)
            raise NotFound("symbol at address", f"0x{address:08x}")
        sym, offset = hit
        return sym.name, address, sym.size, offset, self.position(live, address)

    # ------------------------------------------------------------------ breakpoints

    async def set_breakpoint(
        self, live: LiveSession, loc: Location, kind: BreakpointKind, size: int, client: str = ""
    ) -> Breakpoint:
        watch = kind.watch
        if watch is not None:
            size = size or 4
            if size not in (1, 2, 4, 8):
                raise InvalidArgument("size", "watchpoints watch 1, 2, 4 or 8 bytes")
            live.feature(Feature.WATCHPOINTS)
        else:
            size = 0
            live.feature(Feature.BREAKPOINTS)
        address = self.resolve(live, loc)
        if address < 0 or address >= 1 << 32:
            raise InvalidArgument("location.address", "must be a 32-bit address")
        audit.note(address=address, **({"length": size} if size else {}))  # a watchpoint's size
        st = self.state(live)
        for bp in st.breakpoints.values():
            if bp.address == address and bp.kind == kind and bp.size == size:
                audit.note(resource=f"{live.record.name}/breakpoints/{bp.id}")
                return bp  # idempotent
        bp = Breakpoint(st.next_id, kind, address, size, loc, self.position(live, address), client=client)
        audit.note(resource=f"{live.record.name}/breakpoints/{bp.id}")
        if live.machine is not None and live.state.value != "off":
            await self._apply(live, bp)
        st.breakpoints[bp.id] = bp
        st.next_id += 1
        if not client:  # a user's: kept across restarts
            self.sessions.db.put(BREAKPOINTS, breakpoint_row(live.id, bp))
        return bp

    async def clear_breakpoint(self, live: LiveSession, bp_id: int) -> None:
        st = self.state(live)
        bp = st.breakpoints.get(bp_id)
        if bp is None:
            raise NotFound("breakpoint", str(bp_id))
        audit.note(resource=f"{live.record.name}/breakpoints/{bp.id}", address=bp.address,
                   **({"length": bp.size} if bp.size else {}))
        if live.machine is not None and live.state.value != "off":
            await self._remove(live, bp)
        del st.breakpoints[bp_id]
        if not bp.client:
            self.sessions.db.delete(BREAKPOINTS, f"{live.id}/{bp.id}")

    def list_breakpoints(self, live: LiveSession) -> list[Breakpoint]:
        return sorted(self.state(live).breakpoints.values(), key=lambda b: b.id)

    async def clear_client_breakpoints(self, live: LiveSession, client: str) -> None:
        for bp in self.list_breakpoints(live):
            if bp.client == client:
                await self.clear_breakpoint(live, bp.id)

    async def _apply(self, live: LiveSession, bp: Breakpoint, machine: Machine | None = None) -> None:
        machine = machine or live.require_machine("set a breakpoint")
        with driver_errors(live):
            if bp.kind.watch is not None:
                await machine.capability(Watchpoints).set_watchpoint(bp.address, bp.size, bp.kind.watch)
            else:
                await machine.capability(Breakpoints).set_breakpoint(
                    bp.address, hardware=bp.kind is BreakpointKind.HARDWARE)

    async def _remove(self, live: LiveSession, bp: Breakpoint) -> None:
        machine = live.require_machine("clear a breakpoint")
        with driver_errors(live):
            if bp.kind.watch is not None:
                await machine.capability(Watchpoints).clear_watchpoint(bp.address, bp.size, bp.kind.watch)
            else:
                await machine.capability(Breakpoints).clear_breakpoint(bp.address)

    async def _reapply(self, live: LiveSession) -> None:
        """A power-on hook: the session is not HALTED yet (still OFF or FAILED), so the
        breakpoints go to the new machine directly."""
        assert live.machine is not None
        for bp in self.list_breakpoints(live):
            await self._apply(live, bp, live.machine)

    def _count_hit(self, live: LiveSession, info: StopInfo) -> None:
        for bp in self.state(live).breakpoints.values():
            if info.reason is StopReason.BREAKPOINT and bp.kind.watch is None and bp.address == info.pc:
                bp.hit_count += 1
            elif (
                info.reason is StopReason.WATCHPOINT
                and bp.kind.watch is not None
                and info.watch_address is not None
                and bp.address <= info.watch_address < bp.address + bp.size
            ):
                bp.hit_count += 1

    # ------------------------------------------------------------------ registers and memory

    async def read_registers(self, live: LiveSession, names: list[str]) -> dict[str, int]:
        await self.sessions.ops.settled(live)
        machine = live.require_inspectable("read registers")
        live.feature(Feature.REGISTERS)
        with driver_errors(live):
            return await machine.capability(RegisterAccess).read_registers(names or None)

    async def write_register(self, live: LiveSession, name: str, value: int) -> int:
        await self.sessions.ops.settled(live)
        machine = live.require_inspectable("write a register")
        live.feature(Feature.REGISTERS)
        if not name:
            raise InvalidArgument("register", "is required")
        if value >= 1 << 32:
            raise InvalidArgument("value", f"0x{value:x} does not fit the 32-bit register {name}")
        with driver_errors(live):
            registers = machine.capability(RegisterAccess)
            names = list(registers.register_names())
            audit.note(resource=f"{live.record.name}/registers/{name}", register=name, length=4,
                       **({"address": names.index(name)} if name in names else {}))
            await registers.write_register(name, value)
            return (await registers.read_registers([name]))[name]

    async def read_memory(self, live: LiveSession, address: int, size: int) -> bytes:
        await self.sessions.ops.settled(live)
        memory = self._memory(live, "read memory")
        _check_range(address, size)
        with driver_errors(live):
            return await memory.read_memory(address, size)

    async def write_memory(self, live: LiveSession, address: int, data: bytes) -> int:
        await self.sessions.ops.settled(live)
        audit.note(resource=live.record.name, address=address, length=len(data))
        memory = self._memory(live, "write memory")
        _check_range(address, len(data), "data")
        with driver_errors(live):
            await memory.write_memory(address, data)
        return len(data)

    def _memory(self, live: LiveSession, action: str) -> MemoryAccess:
        """The machine's memory, in any powered state; while it runs only where the
        backend can reach memory without stopping it (MemoryAccess.access_while_running:
        Unicorn between slices, not QEMU's all-stop gdbstub)."""
        machine = live.require_machine(action)
        live.feature(Feature.MEMORY)
        with driver_errors(live):
            memory = machine.capability(MemoryAccess)
        if live.state is MachineState.RUNNING and not memory.access_while_running:
            raise FailedPrecondition(
                f"cannot {action}: session {live.id} is running, and backend {live.record.backend} "
                "reaches memory only while the machine is stopped; pause it first",
                state=live.state.value, required="halted, exited or faulted")
        return memory

    # ------------------------------------------------------------------ disassembly

    async def disassemble(self, live: LiveSession, loc: Location | None, count: int) -> list[DisassembledInstruction]:
        count = count or 16
        if not 1 <= count <= 1000:
            raise InvalidArgument("count", "must be between 1 and 1000")
        live.require_inspectable("disassemble")
        if loc is None or (loc.address is None and not loc.symbol and not loc.file_line):
            regs = await self.read_registers(live, ["pc"])
            address = regs["pc"]
        else:
            address = self.resolve(live, loc)
        region = live.board.region_at(address)
        if region is None:
            raise InvalidArgument("location", f"0x{address:08x} is not in the board's memory")
        size = min(count * 4, region.end - address)
        code = await self.read_memory(live, address, size)
        md = _capstone_for(live.board.arch)
        symbols = self.symbols(live, required=False)
        out: list[DisassembledInstruction] = []
        for insn in md.disasm(code, address):
            sym = ""
            if symbols is not None and (hit := symbols.symbol_at(insn.address)) is not None:
                sym = hit[0].name if hit[1] == 0 else f"{hit[0].name}+{hit[1]}"
            out.append(DisassembledInstruction(
                insn.address, bytes(insn.bytes), insn.mnemonic, insn.op_str, sym,
                self.position(live, insn.address),
            ))
            if len(out) == count:
                break
        return out

    # ------------------------------------------------------------------ control of Attach streams

    def take_control(self, live: LiveSession, client: str) -> bool:
        st = self.state(live)
        if not st.controller or st.controller == client:
            st.controller = client
            return True
        return False

    def release_control(self, live: LiveSession, client: str) -> None:
        st = self.state(live)
        if st.controller == client:
            st.controller = ""


def _check_range(address: int, size: int, field_name: str = "size") -> None:
    if size <= 0:
        raise InvalidArgument(field_name, "must be at least 1 byte")
    if size > MAX_MEMORY_BYTES:
        raise InvalidArgument(field_name, f"at most {MAX_MEMORY_BYTES} bytes per call")
    if address < 0 or address + size > 1 << 32:
        raise InvalidArgument("address", "the range must lie in the 32-bit address space")


def _capstone_for(arch: Arch) -> capstone.Cs:
    if arch is Arch.ARM_CORTEX_M:
        md = capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB | capstone.CS_MODE_MCLASS)
    elif arch is Arch.RISCV32:
        md = capstone.Cs(capstone.CS_ARCH_RISCV, capstone.CS_MODE_RISCV32 | capstone.CS_MODE_RISCVC)
    else:  # pragma: no cover - Arch is closed
        raise Unimplemented("disassemble", f"no disassembler for {arch}")
    return md


# ---------------------------------------------------------------------- source-level stepping


class StepMode(enum.StrEnum):
    INTO = "into"
    OVER = "over"
    OUT = "out"


@dataclass(frozen=True)
class FrameInfo:
    level: int
    pc: int
    cfa: int
    source: SourcePosition


# DWARF register numbers -> our register names, and the stack pointer's number
_DWARF_REGS = {
    Arch.ARM_CORTEX_M: [f"r{i}" for i in range(13)] + ["sp", "lr", "pc"],
    Arch.RISCV32: [f"x{i}" for i in range(32)],
}
_DWARF_SP = {Arch.ARM_CORTEX_M: 13, Arch.RISCV32: 2}
_RISCV_CALLS = {"jal", "jalr", "c.jal", "c.jalr", "call"}


class LineStepper:
    """Backtraces (DWARF CFI) and stepping by source line, on top of the Debugger and
    the session's instruction stepping; temporary breakpoints never touch the user's."""

    def __init__(self, debugger: Debugger) -> None:
        self.debugger = debugger
        self.sessions = debugger.sessions

    async def backtrace(self, live: LiveSession, max_frames: int = 64) -> list[FrameInfo]:
        live.require_inspectable("unwind the stack")
        symbols = self.debugger.symbols(live)
        if not symbols.frames.available:
            raise FailedPrecondition("the program has no DWARF call-frame information (build with -g)")
        arch = live.board.arch
        names = _DWARF_REGS[arch]
        values = await self.debugger.read_registers(live, [*names, "pc"] if arch is Arch.RISCV32 else names)
        regs = {i: values[n] for i, n in enumerate(names)}
        pc = values["pc"]
        frames: list[FrameInfo] = []
        prev_cfa = -1
        for level in range(max_frames or 64):
            where = pc if level == 0 else pc - 1  # a caller's pc is after its call
            rule = symbols.frames.rule_at(where)
            cfa = (regs[rule.cfa_register] + rule.cfa_offset) & 0xFFFFFFFF if rule and rule.cfa_register in regs else 0
            frames.append(FrameInfo(level, pc, cfa, self.debugger.position(live, where)))
            if rule is None or not cfa or (cfa == prev_cfa and level):
                break
            caller = dict(regs)
            try:
                for reg, offset in rule.saved.items():
                    raw = await self.debugger.read_memory(live, (cfa + offset) & 0xFFFFFFFF, 4)
                    caller[reg] = int.from_bytes(raw, "little")
            except InvalidArgument:
                break
            caller[_DWARF_SP[arch]] = cfa
            ret = caller.get(rule.return_register, 0)
            if ret == 0 or (arch is Arch.ARM_CORTEX_M and ret >= 0xFFFFFFF0):
                break  # the bottom of the stack, or an exception return (EXC_RETURN)
            regs, pc, prev_cfa = caller, ret & ~1, cfa
        return frames

    async def step_line(self, live: LiveSession, mode: StepMode, timeout: float | None) -> StopInfo:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else 30.0)
        live.require_halted("step a line")
        symbols = self.debugger.symbols(live)
        if not symbols.has_lines:
            raise FailedPrecondition("the program has no line information (build with -g)")
        if mode is StepMode.OUT:
            frames = await self.backtrace(live, 2)
            if len(frames) < 2:
                raise FailedPrecondition("no caller frame to return to")
            return await self._run_to(live, frames[1].pc, deadline)
        pc = (await self.debugger.read_registers(live, ["pc"]))["pc"]
        start = symbols.line_at(pc)
        if start is None:
            raise FailedPrecondition(f"no source line for pc 0x{pc:08x}; step by instruction")
        start_func = symbols.function_at(pc)
        while True:
            if loop.time() > deadline:
                raise DeadlineExceeded(f"line {start.file}:{start.line} did not end in time; the session is halted")
            call_size = await self._call_size(live, pc) if mode is StepMode.OVER else 0
            stop = await (self._run_to(live, pc + call_size, deadline) if call_size else self.sessions.step(live, 1))
            if stop.reason is not StopReason.STEP:
                return stop
            pc = stop.pc
            line = symbols.line_at(pc)
            if line is None or (line.file, line.line) == (start.file, start.line):
                continue
            if symbols.is_line_start(pc) or symbols.function_at(pc) != start_func:
                return stop

    async def _call_size(self, live: LiveSession, pc: int) -> int:
        """The size of the call instruction at pc, or 0 when it is not a call."""
        code = await self.debugger.read_memory(live, pc, 4)
        insn = next(_capstone_for(live.board.arch).disasm(code, pc, 1), None)
        if insn is None:
            return 0
        if live.board.arch is Arch.ARM_CORTEX_M:
            return int(insn.size) if insn.mnemonic in ("bl", "blx") else 0
        is_call = insn.mnemonic in _RISCV_CALLS and not insn.op_str.startswith(("zero", "x0"))
        return int(insn.size) if is_call else 0

    async def _run_to(self, live: LiveSession, address: int, deadline: float) -> StopInfo:
        """Run until pc reaches address (a temporary breakpoint), or an earlier stop."""
        machine = live.require_halted("run to an address")
        user_has_one = any(b.address == address and b.kind.watch is None
                           for b in self.debugger.list_breakpoints(live))
        if not user_has_one:
            with driver_errors(live):
                await machine.capability(Breakpoints).set_breakpoint(address)
            live.temporary_breakpoints.add(address)
        try:
            await self.sessions.run(live)
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            try:
                stop = await self.sessions.ops.wait_for_stop(live, remaining)
            except DeadlineExceeded:
                await self.sessions.pause(live, "halted: the step did not end in time")
                raise
            except asyncio.CancelledError:  # the caller went away: never leave it running
                await self.sessions.ops.halt_for_gone_caller(live, "halted: the step's caller went away")
                raise
        finally:
            live.temporary_breakpoints.discard(address)
            if not user_has_one and live.machine is machine and live.state.value != "off":
                with driver_errors(live):
                    await machine.capability(Breakpoints).clear_breakpoint(address)
        return stop
