"""The driver contract (drivers/base.py), executable: one suite, every driver.

Each test runs against every backend on an Arm and a RISC-V board, with real firmware
(tests/firmware) on a real Unicorn and a real QEMU. What it checks is what base.py
promises to the core, so that the core can treat every backend alike:

* a machine provides a part for every capability it declares, and the features the
  backend reports are among them;
* only DriverError subclasses escape (bad registers, addresses, sizes, counts, states,
  images and snapshot blobs);
* clearing a breakpoint or watchpoint that is not set is a no-op; watchpoint sizes are
  WATCH_SIZES everywhere;
* each stop is reported exactly once: stops while running as one event, the stops that
  step() and pause() return never as events;
* registers and memory stay readable after the program exits;
* a long step stops when its caller is cancelled, leaving the machine halted and usable;
* breakpoints survive reset() and load(); power_off() is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from machineserver.server.core.boards import load_shipped_boards
from machineserver.server.core.images import ImageFormat, parse_image
from machineserver.server.drivers.base import (
    WATCH_SIZES,
    Backend,
    BadImage,
    BadRequest,
    Breakpoints,
    Capability,
    ConsoleInput,
    DriverError,
    Machine,
    MachineOptions,
    MachineState,
    MemoryAccess,
    ProgramImage,
    RegisterAccess,
    RunControl,
    Segment,
    Snapshots,
    StopInfo,
    StopReason,
    WatchKind,
    Watchpoints,
    WrongState,
    features_of,
)
from machineserver.server.drivers.qemu import QemuBackend
from machineserver.server.drivers.unicorn import UnicornBackend

FIRMWARE = Path(__file__).resolve().parents[1] / "firmware"
CASES = [("unicorn", "mps2-an385"), ("unicorn", "sifive_e"), ("qemu", "mps2-an385"), ("qemu", "sifive_e")]
UNMAPPED = 0x9000_0000  # no board here maps it
BACKENDS: dict[str, Callable[[], Backend]] = {"unicorn": UnicornBackend, "qemu": QemuBackend}


class Recorder:
    """MachineEvents, callable from any thread; tests await conditions on it."""

    def __init__(self) -> None:
        self.console = bytearray()
        self.stops: list[StopInfo] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def console_output(self, data: bytes) -> None:
        with self._lock:
            self.console += data

    def stopped(self, info: StopInfo) -> None:
        with self._lock:
            self.stops.append(info)

    def failed(self, reason: str) -> None:
        with self._lock:
            self.failures.append(reason)

    async def until(self, cond: Callable[[], bool], limit: float = 20.0) -> None:
        deadline = time.monotonic() + limit
        while not cond():
            assert time.monotonic() < deadline, (
                f"timed out: stops={self.stops} failures={self.failures} console={bytes(self.console)!r}")
            await asyncio.sleep(0.005)


@dataclass
class Rig:
    backend: str
    board: str
    machine: Machine
    events: Recorder

    def elf(self, program: str) -> Path:
        path = FIRMWARE / "build" / self.board / f"{program}.elf"
        if not path.exists():
            pytest.fail(f"{path} is not built: scripts/test builds tests/firmware first")
        return path

    def image(self, program: str) -> ProgramImage:
        return parse_image(self.elf(program).read_bytes(), ImageFormat.ELF).image

    def symbol(self, program: str, name: str) -> int:
        with self.elf(program).open("rb") as f:
            symtab = ELFFile(f).get_section_by_name(".symtab")
            found = symtab.get_symbol_by_name(name)  # type: ignore[union-attr]
            assert found, f"no symbol {name} in {program}"
            return int(found[0]["st_value"]) & ~1

    async def load(self, program: str) -> None:
        await self.machine.power_on()
        await self.machine.load(self.image(program))

    @property
    def run_control(self) -> RunControl:
        return self.machine.capability(RunControl)

    @property
    def registers(self) -> RegisterAccess:
        return self.machine.capability(RegisterAccess)

    @property
    def memory(self) -> MemoryAccess:
        return self.machine.capability(MemoryAccess)

    @property
    def breakpoints(self) -> Breakpoints:
        return self.machine.capability(Breakpoints)

    @property
    def watchpoints(self) -> Watchpoints:
        return self.machine.capability(Watchpoints)

    async def pc(self) -> int:
        return (await self.registers.read_registers(["pc"]))["pc"]


@pytest.fixture(params=CASES, ids=[f"{b}-{board}" for b, board in CASES])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    backend_name, board_name = request.param
    backend = BACKENDS[backend_name]()
    board = load_shipped_boards()[board_name]
    why_not = backend.board_support(board)
    if why_not:
        pytest.fail(f"{backend_name} cannot run {board_name} here: {why_not}")
    events = Recorder()
    machine = backend.create_machine(board, MachineOptions(), events)
    try:
        yield Rig(backend_name, board_name, machine, events)
    finally:
        await machine.power_off()
        await backend.aclose()


def _ram_address(rig: Rig) -> int:
    board = load_shipped_boards()[rig.board]
    ram = next(r for r in board.memory if r.kind == "ram")
    return ram.base


# --------------------------------------------------------------------------- parts


async def test_every_declared_capability_has_a_part(rig: Rig) -> None:
    machine_class = type(rig.machine)
    assert machine_class.capabilities, "a machine declares its capabilities"
    for iface in machine_class.capabilities:
        assert issubclass(iface, Capability)
        part = rig.machine.capability(iface)
        assert isinstance(part, iface)
    info = BACKENDS[rig.backend]().probe()
    assert info.available
    assert info.features <= features_of(machine_class)


# --------------------------------------------------------------------------- errors


async def _driver_error(call: Callable[[], object]) -> DriverError:
    """Awaits the call; it must raise a DriverError (and nothing else)."""
    try:
        result = call()
        if asyncio.iscoroutine(result):
            await result
    except DriverError as exc:
        return exc
    raise AssertionError("the call did not raise")


async def test_only_driver_errors_escape(rig: Rig) -> None:
    machine = rig.machine
    # off: state errors, never AttributeError on a missing emulator
    assert isinstance(await _driver_error(lambda: rig.run_control.run()), WrongState)
    assert isinstance(await _driver_error(lambda: rig.run_control.step(1)), WrongState)
    assert isinstance(await _driver_error(lambda: rig.registers.read_registers(["pc"])), WrongState)
    assert isinstance(await _driver_error(lambda: rig.memory.read_memory(_ram_address(rig), 4)), WrongState)
    assert isinstance(await _driver_error(lambda: machine.capability(Snapshots).save_state()), WrongState)
    assert isinstance(await _driver_error(lambda: machine.capability(ConsoleInput).console_input(b"x")),
                      DriverError)

    await rig.load("hello")
    bad = await _driver_error(lambda: rig.registers.read_registers(["no_such_register"]))
    assert isinstance(bad, BadRequest) and bad.field == "name"
    bad = await _driver_error(lambda: rig.memory.read_memory(0xFFFF_FFF0, 64))
    assert isinstance(bad, BadRequest) and bad.field in ("address", "size")
    bad = await _driver_error(lambda: rig.memory.read_memory(UNMAPPED, 4))
    assert isinstance(bad, BadRequest) and bad.field == "address"
    bad = await _driver_error(lambda: rig.run_control.step(0))
    assert isinstance(bad, BadRequest) and bad.field == "count"
    bad = await _driver_error(lambda: machine.capability(Snapshots).restore_state(b"certainly not a snapshot"))
    assert isinstance(bad, (BadRequest, DriverError))
    other_arch = "sifive_e" if rig.board != "sifive_e" else "mps2-an385"
    foreign = parse_image((FIRMWARE / "build" / other_arch / "hello.elf").read_bytes(), ImageFormat.ELF).image
    assert isinstance(await _driver_error(lambda: machine.load(foreign)), BadImage)
    empty = ProgramImage((Segment(_ram_address(rig), b""),))
    assert isinstance(await _driver_error(lambda: machine.load(empty)), BadImage)

    await rig.run_control.run()
    assert isinstance(await _driver_error(lambda: rig.run_control.step(1)), WrongState)
    await rig.events.until(lambda: bool(rig.events.stops))
    # still usable after every refusal
    assert machine.state is MachineState.EXITED
    assert rig.events.stops[-1].reason is StopReason.EXIT


# --------------------------------------------------------------------------- points


async def test_clearing_what_is_not_set_is_a_no_op(rig: Rig) -> None:
    main = rig.symbol("hello", "main")
    await rig.breakpoints.clear_breakpoint(main)  # before power-on
    await rig.watchpoints.clear_watchpoint(_ram_address(rig), 4, WatchKind.WRITE)
    await rig.load("hello")
    await rig.breakpoints.clear_breakpoint(main)
    await rig.watchpoints.clear_watchpoint(_ram_address(rig), 4, WatchKind.WRITE)
    await rig.breakpoints.set_breakpoint(main)
    await rig.breakpoints.set_breakpoint(main)  # twice: a no-op
    await rig.breakpoints.clear_breakpoint(main)
    await rig.breakpoints.clear_breakpoint(main)  # cleared already: a no-op
    await rig.run_control.run()
    await rig.events.until(lambda: bool(rig.events.stops))
    assert rig.events.stops[0].reason is StopReason.EXIT  # the cleared breakpoint did not fire


async def test_watchpoint_sizes_agree(rig: Rig) -> None:
    await rig.load("hello")
    address = _ram_address(rig)
    for size in WATCH_SIZES:
        await rig.watchpoints.set_watchpoint(address, size, WatchKind.WRITE)
        await rig.watchpoints.clear_watchpoint(address, size, WatchKind.WRITE)
    for size in (0, 3, 5, 16, -1):
        bad = await _driver_error(lambda s=size: rig.watchpoints.set_watchpoint(address, s, WatchKind.WRITE))
        assert isinstance(bad, BadRequest) and bad.field == "size", (size, bad)


async def test_breakpoints_survive_reset_and_load(rig: Rig) -> None:
    main = rig.symbol("hello", "main")
    await rig.breakpoints.set_breakpoint(main)  # set while off
    await rig.load("hello")
    await rig.machine.reset()
    await rig.machine.load(rig.image("hello"))
    await rig.run_control.run()
    await rig.events.until(lambda: bool(rig.events.stops))
    stop = rig.events.stops[0]
    assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, main)


# --------------------------------------------------------------------------- stops


async def test_each_stop_is_reported_exactly_once(rig: Rig) -> None:
    main = rig.symbol("hello", "main")
    await rig.load("hello")
    await rig.breakpoints.set_breakpoint(main)
    await rig.run_control.run()
    await rig.events.until(lambda: bool(rig.events.stops))
    await asyncio.sleep(0.2)  # the thing under test: no second report comes later
    assert [s.reason for s in rig.events.stops] == [StopReason.BREAKPOINT]
    assert rig.machine.state is MachineState.HALTED

    stepped = await rig.run_control.step(1)  # returned, never also an event
    assert stepped.reason is StopReason.STEP
    paused = await rig.run_control.pause()  # halted already: where it is, as a HALT
    assert paused.reason is StopReason.HALT and paused.pc == stepped.pc
    assert len(rig.events.stops) == 1

    await rig.breakpoints.clear_breakpoint(main)
    await rig.run_control.run()
    await rig.events.until(lambda: len(rig.events.stops) == 2)
    await asyncio.sleep(0.2)
    assert [s.reason for s in rig.events.stops] == [StopReason.BREAKPOINT, StopReason.EXIT]
    assert rig.events.stops[1].exit_code == 0
    assert rig.machine.state is MachineState.EXITED
    assert not rig.events.failures


async def test_a_step_that_reaches_the_exit_returns_it_once(rig: Rig) -> None:
    await rig.load("hello")
    stop = await rig.run_control.step(10_000_000)  # hello exits after a few hundred instructions
    assert stop.reason is StopReason.EXIT and stop.exit_code == 0
    await asyncio.sleep(0.2)
    assert rig.events.stops == []  # returned, not also sent
    assert rig.machine.state is MachineState.EXITED
    assert b"Hello from" in rig.events.console


async def test_pause_returns_the_halt_and_sends_no_event(rig: Rig) -> None:
    await rig.load("echo")  # waits for console input forever
    await rig.run_control.run()
    await asyncio.sleep(0.1)  # let it run
    stop = await rig.run_control.pause()
    assert stop.reason is StopReason.HALT
    assert rig.machine.state is MachineState.HALTED
    assert stop.pc == await rig.pc()
    assert rig.events.stops == []


# --------------------------------------------------------------------------- after the end


async def test_registers_and_memory_stay_readable_after_exit(rig: Rig) -> None:
    await rig.load("hello")
    ram = _ram_address(rig)
    await rig.memory.write_memory(ram, b"\xa5\x5a\xa5\x5a")
    await rig.run_control.run()
    await rig.events.until(lambda: bool(rig.events.stops))
    assert rig.machine.state is MachineState.EXITED
    regs = await rig.registers.read_registers(None)
    assert "pc" in regs and regs["sp" if "sp" in regs else "x2"] != 0
    assert len(await rig.memory.read_memory(ram, 64)) == 64
    await rig.machine.reset()  # and it comes back
    assert rig.machine.state is MachineState.HALTED
    await rig.run_control.run()
    await rig.events.until(lambda: len(rig.events.stops) == 2)
    assert rig.events.stops[1].reason is StopReason.EXIT


# --------------------------------------------------------------------------- cancellation


async def test_a_cancelled_long_step_leaves_the_machine_halted(rig: Rig) -> None:
    await rig.load("echo")  # polls the UART forever: a 10^9 step would take long
    task = asyncio.create_task(rig.run_control.step(10**9))
    await asyncio.sleep(0.3)
    assert not task.done()
    started = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert task.cancelled()
    assert time.monotonic() - started < 5
    assert rig.machine.state is MachineState.HALTED
    pc = await rig.pc()
    stop = await rig.run_control.step(1)
    assert stop.reason is StopReason.STEP and stop.pc != 0 and pc != 0
    await rig.run_control.run()
    assert rig.machine.state is MachineState.RUNNING
    assert (await rig.run_control.pause()).reason is StopReason.HALT
    assert rig.events.stops == [] and not rig.events.failures


async def test_power_off_is_idempotent(rig: Rig) -> None:
    await rig.machine.power_off()  # never powered on
    await rig.load("echo")
    await rig.run_control.run()
    await rig.machine.power_off()  # while running
    await rig.machine.power_off()
    assert rig.machine.state is MachineState.OFF
