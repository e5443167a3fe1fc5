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
from collections.abc import AsyncIterator, Callable

import pytest

from machineserver.server.drivers.base import (
    WATCH_SIZES,
    Backend,
    BadImage,
    BadRequest,
    Capability,
    DriverError,
    Machine,
    MachineOptions,
    MachineState,
    NotSupported,
    ProgramImage,
    Segment,
    StopReason,
    WatchKind,
    WrongState,
    features_of,
)
from machineserver.server.drivers.qemu import QemuBackend
from machineserver.server.drivers.unicorn import UnicornBackend
from tests.helpers.backends import require_backend
from tests.helpers.events import Recorder
from tests.helpers.firmware import elf_symbol, firmware
from tests.helpers.machines import Parts, board, cancel, elf_image

CASES = [("unicorn", "mps2-an385"), ("unicorn", "sifive_e"), ("qemu", "mps2-an385"), ("qemu", "sifive_e")]
UNMAPPED = 0x9000_0000  # no board here maps it
BACKENDS: dict[str, Callable[[], Backend]] = {"unicorn": UnicornBackend, "qemu": QemuBackend}


class Rig(Parts):
    """One backend's machine on one board, its parts at hand, and its events."""

    def __init__(self, backend: str, board_name: str, machine: Machine, events: Recorder) -> None:
        super().__init__(machine)
        self.backend = backend
        self.board = board_name
        self.events = events

    def image(self, program: str) -> ProgramImage:
        return elf_image(firmware(self.board, program))

    def symbol(self, program: str, name: str) -> int:
        return elf_symbol(self.board, program, name)

    async def boot(self, program: str) -> None:
        """Power on and load ``program``."""
        await self.machine.power_on()
        await self.machine.load(self.image(program))

    async def pc(self) -> int:
        return (await self.regs.read_registers(["pc"]))["pc"]

    @property
    def ram(self) -> int:
        return next(r for r in board(self.board).memory if r.kind == "ram").base


@pytest.fixture(params=CASES, ids=[f"{b}-{board}" for b, board in CASES])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    backend_name, board_name = request.param
    require_backend(backend_name, board_name)
    backend = BACKENDS[backend_name]()
    why_not = backend.board_support(board(board_name))
    if why_not:
        pytest.fail(f"{backend_name} cannot run {board_name} here: {why_not}")
    events = Recorder()
    machine = backend.create_machine(board(board_name), MachineOptions(), events)
    try:
        yield Rig(backend_name, board_name, machine, events)
    finally:
        await machine.power_off()
        await backend.aclose()


# --------------------------------------------------------------------------- parts


async def test_every_declared_capability_has_a_part(rig: Rig) -> None:
    machine_class = type(rig.machine)
    assert machine_class.capabilities, "a machine declares its capabilities"
    info = BACKENDS[rig.backend]().probe()
    limits = info.board_limits.get(rig.board, {})
    for iface in machine_class.capabilities:
        assert issubclass(iface, Capability)
        if iface.feature is not None and iface.feature in limits and not rig.machine.has(iface):
            with pytest.raises(NotSupported):  # a board the backend names as lacking it
                rig.machine.capability(iface)
            continue
        part = rig.machine.capability(iface)
        assert isinstance(part, iface)
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
    assert isinstance(await _driver_error(lambda: rig.run.run()), WrongState)
    assert isinstance(await _driver_error(lambda: rig.run.step(1)), WrongState)
    assert isinstance(await _driver_error(lambda: rig.regs.read_registers(["pc"])), WrongState)
    assert isinstance(await _driver_error(lambda: rig.mem.read_memory(rig.ram, 4)), WrongState)
    assert isinstance(await _driver_error(lambda: rig.snap.save_state()), WrongState)
    assert isinstance(await _driver_error(lambda: rig.console.console_input(b"x")), DriverError)

    await rig.boot("hello")
    bad = await _driver_error(lambda: rig.regs.read_registers(["no_such_register"]))
    assert isinstance(bad, BadRequest) and bad.field == "name"
    bad = await _driver_error(lambda: rig.mem.read_memory(0xFFFF_FFF0, 64))
    assert isinstance(bad, BadRequest) and bad.field in ("address", "size")
    bad = await _driver_error(lambda: rig.mem.read_memory(UNMAPPED, 4))
    assert isinstance(bad, BadRequest) and bad.field == "address"
    bad = await _driver_error(lambda: rig.run.step(0))
    assert isinstance(bad, BadRequest) and bad.field == "count"
    bad = await _driver_error(lambda: rig.snap.restore_state(b"certainly not a snapshot"))
    assert isinstance(bad, (BadRequest, DriverError))
    other_arch = "sifive_e" if rig.board != "sifive_e" else "mps2-an385"
    foreign = elf_image(firmware(other_arch, "hello"))
    assert isinstance(await _driver_error(lambda: machine.load(foreign)), BadImage)
    empty = ProgramImage((Segment(rig.ram, b""),))
    assert isinstance(await _driver_error(lambda: machine.load(empty)), BadImage)

    await rig.run.run()
    assert isinstance(await _driver_error(lambda: rig.run.step(1)), WrongState)
    await rig.events.until(lambda: bool(rig.events.stops))
    # still usable after every refusal
    assert machine.state is MachineState.EXITED
    assert rig.events.stops[-1].reason is StopReason.EXIT


# --------------------------------------------------------------------------- points


async def test_clearing_what_is_not_set_is_a_no_op(rig: Rig) -> None:
    main = rig.symbol("hello", "main")
    await rig.bp.clear_breakpoint(main)  # before power-on
    await rig.wp.clear_watchpoint(rig.ram, 4, WatchKind.WRITE)
    await rig.boot("hello")
    await rig.bp.clear_breakpoint(main)
    await rig.wp.clear_watchpoint(rig.ram, 4, WatchKind.WRITE)
    await rig.bp.set_breakpoint(main)
    await rig.bp.set_breakpoint(main)  # twice: a no-op
    await rig.bp.clear_breakpoint(main)
    await rig.bp.clear_breakpoint(main)  # cleared already: a no-op
    await rig.run.run()
    await rig.events.until(lambda: bool(rig.events.stops))
    assert rig.events.stops[0].reason is StopReason.EXIT  # the cleared breakpoint did not fire


async def test_watchpoint_sizes_agree(rig: Rig) -> None:
    await rig.boot("hello")
    address = rig.ram
    for size in WATCH_SIZES:
        await rig.wp.set_watchpoint(address, size, WatchKind.WRITE)
        await rig.wp.clear_watchpoint(address, size, WatchKind.WRITE)
    for size in (0, 3, 5, 16, -1):
        bad = await _driver_error(lambda s=size: rig.wp.set_watchpoint(address, s, WatchKind.WRITE))
        assert isinstance(bad, BadRequest) and bad.field == "size", (size, bad)


async def test_breakpoints_survive_reset_and_load(rig: Rig) -> None:
    main = rig.symbol("hello", "main")
    await rig.bp.set_breakpoint(main)  # set while off
    await rig.boot("hello")
    await rig.machine.reset()
    await rig.machine.load(rig.image("hello"))
    await rig.run.run()
    await rig.events.until(lambda: bool(rig.events.stops))
    stop = rig.events.stops[0]
    assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, main)


# --------------------------------------------------------------------------- stops


async def test_each_stop_is_reported_exactly_once(rig: Rig) -> None:
    main = rig.symbol("hello", "main")
    await rig.boot("hello")
    await rig.bp.set_breakpoint(main)
    await rig.run.run()
    await rig.events.until(lambda: bool(rig.events.stops))
    await asyncio.sleep(0.2)  # the thing under test: no second report comes later
    assert [s.reason for s in rig.events.stops] == [StopReason.BREAKPOINT]
    assert rig.machine.state is MachineState.HALTED

    stepped = await rig.run.step(1)  # returned, never also an event
    assert stepped.reason is StopReason.STEP
    paused = await rig.run.pause()  # halted already: where it is, as a HALT
    assert paused.reason is StopReason.HALT and paused.pc == stepped.pc
    assert len(rig.events.stops) == 1

    await rig.bp.clear_breakpoint(main)
    await rig.run.run()
    await rig.events.until(lambda: len(rig.events.stops) == 2)
    await asyncio.sleep(0.2)
    assert [s.reason for s in rig.events.stops] == [StopReason.BREAKPOINT, StopReason.EXIT]
    assert rig.events.stops[1].exit_code == 0
    assert rig.machine.state is MachineState.EXITED
    assert not rig.events.failures


async def test_a_step_that_reaches_the_exit_returns_it_once(rig: Rig) -> None:
    await rig.boot("hello")
    stop = await rig.run.step(10_000_000)  # hello exits after a few hundred instructions
    assert stop.reason is StopReason.EXIT and stop.exit_code == 0
    await asyncio.sleep(0.2)
    assert rig.events.stops == []  # returned, not also sent
    assert rig.machine.state is MachineState.EXITED
    assert b"Hello from" in rig.events.console


async def test_pause_returns_the_halt_and_sends_no_event(rig: Rig) -> None:
    await rig.boot("echo")  # waits for console input forever
    await rig.run.run()
    await asyncio.sleep(0.1)  # let it run
    stop = await rig.run.pause()
    assert stop.reason is StopReason.HALT
    assert rig.machine.state is MachineState.HALTED
    assert stop.pc == await rig.pc()
    assert rig.events.stops == []


# --------------------------------------------------------------------------- after the end


async def test_registers_and_memory_stay_readable_after_exit(rig: Rig) -> None:
    await rig.boot("hello")
    ram = rig.ram
    await rig.mem.write_memory(ram, b"\xa5\x5a\xa5\x5a")
    await rig.run.run()
    await rig.events.until(lambda: bool(rig.events.stops))
    assert rig.machine.state is MachineState.EXITED
    regs = await rig.regs.read_registers(None)
    assert "pc" in regs and regs["sp" if "sp" in regs else "x2"] != 0
    assert len(await rig.mem.read_memory(ram, 64)) == 64
    await rig.machine.reset()  # and it comes back
    assert rig.machine.state is MachineState.HALTED
    await rig.run.run()
    await rig.events.until(lambda: len(rig.events.stops) == 2)
    assert rig.events.stops[1].reason is StopReason.EXIT


# --------------------------------------------------------------------------- cancellation


async def test_a_cancelled_long_step_leaves_the_machine_halted(rig: Rig) -> None:
    await rig.boot("echo")  # polls the UART forever: a 10^9 step would take long
    task = asyncio.create_task(rig.run.step(10**9))
    await asyncio.sleep(0.3)
    assert not task.done()
    await cancel(task, 5)
    assert rig.machine.state is MachineState.HALTED
    pc = await rig.pc()
    stop = await rig.run.step(1)
    assert stop.reason is StopReason.STEP and stop.pc != 0 and pc != 0
    await rig.run.run()
    assert rig.machine.state is MachineState.RUNNING
    assert (await rig.run.pause()).reason is StopReason.HALT
    assert rig.events.stops == [] and not rig.events.failures


async def test_power_off_is_idempotent(rig: Rig) -> None:
    await rig.machine.power_off()  # never powered on
    await rig.boot("echo")
    await rig.run.run()
    await rig.machine.power_off()  # while running
    await rig.machine.power_off()
    assert rig.machine.state is MachineState.OFF


async def test_snapshots_in_a_row_without_running_between(rig: Rig) -> None:
    """Two saves of a halted machine with nothing run between give the same state (QEMU
    leaves a migrated VM in "postmigrate" and will not migrate it again: it answers from the
    first save). A write between them: Unicorn saves it; QEMU refuses with WrongState and
    the machine stays usable; after a step both save again."""
    await rig.boot("hello")
    first = await rig.snap.save_state()
    assert await rig.snap.save_state() == first
    assert rig.machine.state is MachineState.HALTED and not rig.events.failures
    await rig.mem.write_memory(rig.ram, b"\x5a\xa5")
    if rig.backend == "qemu":
        assert isinstance(await _driver_error(lambda: rig.snap.save_state()), WrongState)
    else:
        assert await rig.snap.save_state() != first
    assert await rig.mem.read_memory(rig.ram, 2) == b"\x5a\xa5"
    await rig.run.step(1)
    after = await rig.snap.save_state()
    await rig.mem.write_memory(rig.ram, b"\x00\x00")
    await rig.snap.restore_state(after)
    assert await rig.mem.read_memory(rig.ram, 2) == b"\x5a\xa5"  # the write is in the later save
    assert rig.machine.state is MachineState.HALTED and not rig.events.failures
