"""A gdbremote machine: any GDB server (a QEMU started elsewhere with ``-gdb``,
OpenOCD, pyOCD or a J-Link GDB server in front of a board, Renode, SkyEye, MachineServer's
own GDB bridge) as a session. One module per part: :mod:`.link` (the connection, state,
error boundary), :mod:`.runcontrol`, :mod:`.registers`, :mod:`.memory`, :mod:`.points`,
:mod:`.console`, :mod:`.snapshots`, :mod:`.probe` (what the remote can do).

* **power_on** connects (``gdbremote.target``: ``HOST:PORT`` or ``unix:/path``), shakes
  hands (qSupported), reads target.xml (refusing a remote whose registers are not the
  board's arch: BadImage naming both; a remote without ``qXfer:features:read`` is
  refused too: its register numbering would be a guess), stops a running target (^C),
  probes hardware breakpoints, watchpoints, ``X`` and ``qRcmd`` without changing its
  state, inserts the session's breakpoints and watchpoints. HALTED after.
* **load** writes each segment (``X`` or ``M``), verifies it with ``qCRC`` (reading
  back where the remote has no qCRC), then resets (see below), and for Cortex-M sets SP
  and PC from the vector table just written (RISC-V: PC to the entry).
* **reset** asks the remote's monitor (``reset halt``: OpenOCD, ``system_reset``: QEMU)
  the first time, checks that it worked (the target halted at the reset vector), and
  remembers which command did. Without one that works, a core reset by hand (Cortex-M:
  SP and PC from the vector table, xPSR's Thumb bit; RISC-V: PC to the reset vector or
  entry); details() then says peripherals were not reset.
* **Coverage** is lacked: a remote target gives no execution trace.
* **counters**: instructions counted only for single steps (``exact=False``).
"""

from __future__ import annotations

import asyncio
import contextlib

from machineserver.server.drivers.base import (
    REMOTE_CONSOLE,
    REMOTE_TARGET,
    Arch,
    BackendFailed,
    BadImage,
    BadRequest,
    BoardSpec,
    Breakpoints,
    ConsoleInput,
    Counters,
    Coverage,
    HostFootprint,
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
from machineserver.server.drivers.gdbremote.console import ConsoleEndpoint, RemoteConsoleInput, parse_endpoint
from machineserver.server.drivers.gdbremote.link import REQUEST_TIMEOUT, RemoteLink, refused
from machineserver.server.drivers.gdbremote.memory import RemoteMemory, write_memory
from machineserver.server.drivers.gdbremote.points import RemoteBreakpoints, RemoteWatchpoints, insert_all
from machineserver.server.drivers.gdbremote.probe import Abilities, probe
from machineserver.server.drivers.gdbremote.registers import RemoteRegisters
from machineserver.server.drivers.gdbremote.runcontrol import RemoteRunControl
from machineserver.server.drivers.gdbremote.snapshots import RemoteSnapshots
from machineserver.server.rsp import RspClient, RspError
from machineserver.server.rsp.codec import gdb_crc32
from machineserver.server.rsp.targetdesc import fetch_register_map

TARGET_KEY = REMOTE_TARGET  # "HOST:PORT", "tcp:HOST:PORT" (the core's normal form) or "unix:/path"
CONSOLE_KEY = REMOTE_CONSOLE
XML_REGISTERS = {Arch.ARM_CORTEX_M: "arm", Arch.RISCV32: None}
ARCH_WORDS = {Arch.ARM_CORTEX_M: "arm", Arch.RISCV32: "riscv"}
# monitor commands that reset and halt, in the order tried: OpenOCD, QEMU, pyOCD/J-Link
RESET_COMMANDS = ("reset halt", "system_reset", "reset")
NO_COVERAGE = ("a GDB remote target gives no execution trace; single-stepping the program "
               "to fake coverage is refused")


class RemoteFootprint(HostFootprint):
    """No processes of ours: the remote runs elsewhere (or is someone else's)."""


class GdbRemoteMachine(Machine):
    capabilities = (RunControl, RegisterAccess, MemoryAccess, Breakpoints, Watchpoints,
                    ConsoleInput, Snapshots, Coverage, HostFootprint)

    def __init__(self, board: BoardSpec, options: MachineOptions, events: MachineEvents) -> None:
        super().__init__()
        self.board = board
        self.target = options.extra.get(TARGET_KEY, "")
        if not self.target:
            raise BadRequest(f"a gdbremote session needs {TARGET_KEY} (HOST:PORT or unix:/path)",
                             field="extra")
        console_spec = options.extra.get(CONSOLE_KEY, "")
        self.link = RemoteLink(board, events)
        self.run_control = RemoteRunControl(self.link)
        self.registers = RemoteRegisters(self.link)
        self.console = ConsoleEndpoint(console_spec, events) if console_spec else None
        if console_spec:
            parse_endpoint(console_spec)
        self.provide(self.run_control, self.registers, RemoteMemory(self.link),
                     RemoteBreakpoints(self.link, self.run_control),
                     RemoteWatchpoints(self.link, self.run_control),
                     RemoteSnapshots(self.link, self.registers), RemoteFootprint())
        if self.console is not None:
            self.provide(RemoteConsoleInput(self.console))
        else:
            self.lack(ConsoleInput, f"no console endpoint: the session's {CONSOLE_KEY} option is empty")
        self.lack(Coverage, NO_COVERAGE)
        self._details: dict[str, str] = {"target": self.target,
                                         "snapshots": "soft (registers and RAM; no peripheral state)",
                                         "coverage": f"unavailable: {NO_COVERAGE}",
                                         "counters": "instructions counted for single steps only"}
        self._reset_command: str | None = None  # the monitor command that reset it
        self._reset_tried = False

    @property
    def state(self) -> MachineState:
        return self.link.state

    def details(self) -> dict[str, str]:
        return dict(self._details)

    # ------------------------------------------------------------------ power

    async def _connect(self) -> RspClient:
        xml = XML_REGISTERS[self.board.arch]
        if self.target.startswith("unix:"):
            return await RspClient.connect_unix(self.target[5:], xml_registers=xml)
        host, _, port = self.target.removeprefix("tcp:").rpartition(":")
        if not host or not port.isdigit():
            raise BadRequest(f"{TARGET_KEY} {self.target!r} is not HOST:PORT or unix:/path", field="extra")
        return await RspClient.connect_tcp(host.strip("[]"), int(port), xml_registers=xml)

    async def power_on(self) -> None:
        if self.link.state not in (MachineState.OFF, MachineState.FAILED):
            return
        await self.power_off()
        try:
            client = await self._connect()
        except RspError as exc:
            raise BackendFailed(f"cannot reach the remote target {self.target}: {exc}") from None
        self.link.client = client
        try:
            await self._set_up(client)
            if self.console is not None:
                await self.console.open()
        except BaseException as exc:
            await self.power_off()
            if isinstance(exc, RspError):
                raise BackendFailed(f"the remote target {self.target} failed at power-on: {exc}") from None
            raise
        self.link.state = MachineState.HALTED

    async def _set_up(self, client: RspClient) -> None:
        self._details["qSupported"] = ";".join(
            f"{k}={v}" if v not in ("+", "-", "?") else f"{k}{v}" for k, v in client.features.items())
        if not client.supports("qXfer:features:read"):
            raise BadImage(f"the remote target {self.target} offers no target description "
                           "(qXfer:features:read): its register numbering would be a guess")
        regmap = await fetch_register_map(self.board.arch, client.read_xfer)
        word = ARCH_WORDS[self.board.arch]
        theirs = regmap.architecture or ",".join(regmap.features)
        if word not in theirs.lower() or "pc" not in regmap.regs:
            raise BadImage(f"the remote target is {theirs or 'of an unknown architecture'}, "
                           f"the board {self.board.name} is {self.board.arch.value}")
        self.link.regmap = regmap
        self._details["registers"] = (f"{len(regmap.regs)} (target.xml "
                                      f"{', '.join(f for f in regmap.features if f)})")
        reply = await client.halt_reason()
        if reply.exited:
            raise BackendFailed(f"the remote target has no live program ({reply.kind}{reply.signal:02x})")
        # an all-stop GDB server halts its target when a debugger connects (QEMU stops
        # the VM, OpenOCD halts the core): '?' answers with that stop
        self.link.state = MachineState.HALTED
        pc = await self.link.read_pc()
        found = await probe(self.link, client, pc)
        self.link.x_packets = found.x_packets
        self._report(found)
        await insert_all(self.link, client)

    def _report(self, found: Abilities) -> None:
        self._details["hardware_breakpoints"] = found.hardware_breakpoints
        if found.watch_kinds:
            self._details["watchpoints"] = ", ".join(found.watch_kinds)
        else:
            self._details["watchpoints"] = f"no: {found.watch_refusal}"
            self.lack(Watchpoints, f"the remote target refuses watchpoints: {found.watch_refusal}")
        self._details["memory_writes"] = "X (binary)" if found.x_packets else "M (hex)"
        self._details["monitor_reset"] = ("untested (qRcmd exists; tried at the first reset)"
                                          if found.monitor == "yes" else found.monitor)

    async def power_off(self) -> None:
        await self.run_control.stop_watching()
        client, self.link.client = self.link.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if self.console is not None:
            with contextlib.suppress(Exception):
                await self.console.close()
        self.link.state = MachineState.OFF
        self.link.failure = ""

    # ------------------------------------------------------------------ program

    async def load(self, image: ProgramImage) -> None:
        if image.arch is not None and image.arch is not self.board.arch:
            raise BadImage(f"the image is {image.arch.value}, the board {self.board.name} is "
                           f"{self.board.arch.value}")
        try:
            async with self.link.op:
                self.link.require_inspectable("load a program")
                stub = self.link.stub()
                await self._monitor_reset(stub)
                for seg in image.segments:
                    await self._write_verified(stub, seg.address, seg.data)
                await self._core_reset(stub, image.entry)
        except RspError as exc:
            if refused(exc):
                raise BadImage(f"the remote target refused the program: {exc}") from None
            raise self.link.unusable(exc) from None
        self._entry = image.entry

    async def _write_verified(self, stub: RspClient, address: int, data: bytes) -> None:
        await write_memory(self.link, stub, address, data)
        try:
            ok = await stub.crc(address, len(data)) == gdb_crc32(data)
        except RspError as exc:
            if not refused(exc):
                raise
            ok = await stub.read_memory(address, len(data)) == data
        if not ok:
            raise BadImage(f"the segment at 0x{address:08x} ({len(data)} bytes) did not verify: "
                           "the remote holds other bytes there (flash without vFlashWrite?)")

    async def reset(self) -> None:
        try:
            async with self.link.op:
                if self.link.state is MachineState.RUNNING:
                    raise BadRequest("pause the machine before a reset")
                self.link.require_inspectable("reset")
                stub = self.link.stub()
                await self._monitor_reset(stub)
                await self._core_reset(stub, getattr(self, "_entry", None))
        except RspError as exc:
            raise self.link.unusable(exc) if not refused(exc) else BackendFailed(str(exc)) from None

    async def _monitor_reset(self, stub: RspClient) -> None:
        """The remote's own reset through its monitor, by the command that worked before
        (the first time, each of RESET_COMMANDS until one halts the target at reset)."""
        if self._details.get("monitor_reset", "").startswith("no"):
            return
        commands = (self._reset_command,) if self._reset_command else RESET_COMMANDS
        if self._reset_tried and self._reset_command is None:
            return
        self._reset_tried = True
        for command in commands:
            assert command is not None
            try:
                said = await stub.monitor(command, timeout=REQUEST_TIMEOUT)
            except RspError as exc:
                if not refused(exc):
                    raise
                continue
            if "unknown" in said.lower() or "error" in said.lower() or "invalid" in said.lower():
                continue
            if await self._at_reset(stub):
                self._reset_command = command
                self._details["monitor_reset"] = f"yes: monitor {command}"
                return
        self._details["monitor_reset"] = (f"no: none of {', '.join(RESET_COMMANDS)} reset the target; "
                                          "core reset by hand, peripherals not reset")

    async def _at_reset(self, stub: RspClient) -> bool:
        """Whether the target sits at its reset vector (the reset may land a moment later)."""
        if self.board.arch is not Arch.ARM_CORTEX_M:
            return True
        for _ in range(20):
            vector = int.from_bytes(await stub.read_memory(self.board.vector_table + 4, 4), "little")
            if await self.link.read_pc() == vector & ~1:
                return True
            await asyncio.sleep(0.01)
        return False

    async def _core_reset(self, stub: RspClient, entry: int | None) -> None:
        """SP and PC from the vector table (Cortex-M; xPSR with only the Thumb bit), or
        the PC to the entry (RISC-V); the counters start again."""
        if self.board.arch is Arch.ARM_CORTEX_M:
            table = await stub.read_memory(self.board.vector_table, 8)
            sp, pc = int.from_bytes(table[:4], "little"), int.from_bytes(table[4:], "little")
            await self.link.write_register("sp", sp)
            await self.link.write_register("pc", pc & ~1)
            await self.link.write_register("xpsr", 1 << 24)
            self.link.last_pc = pc & ~1
        else:
            start = entry if entry is not None else self.board.reset_vector
            if start is not None:
                await self.link.write_register("pc", start)
                self.link.last_pc = start
        if self._reset_command is None:
            self._details["reset"] = "core only (registers from the vector table); peripherals not reset"
        else:
            self._details["reset"] = f"monitor {self._reset_command}, then SP/PC from the vector table"
        self.link.steps = 0
        self.link.state = MachineState.HALTED

    def counters(self) -> Counters:
        return Counters(instructions=self.link.steps, virtual_time_ns=0, exact=False)
