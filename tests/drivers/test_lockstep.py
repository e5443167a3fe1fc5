"""The LockStep contract (drivers/base.py), executable: one suite for every backend whose
machine class declares LockStep (the others are skipped), on mps2-an385 with real
firmware (tests/firmware) and one hand-assembled image (below).

It checks what a co-simulation coordinator relies on: the cycle counter lands exactly on
``until_cycles``; a stop ends the quantum early with the stop's cycles (a breakpoint
before its instruction runs); console output comes back in the result and never as an
event; the receiver takes one console byte per barrier, only when empty; an interrupt
raised at a barrier is taken before the quantum's first instruction and wakes a WFI; one
the guest unmasks (cpsie, msr basepri, an NVIC write) is taken right after that
instruction, at one cycle for any quantum; a
sleeping CPU's clock jumps to the target, or to its own timer's deadline; watched ranges
read after the quantum; the same calls give the same results, also after a rollback and
a replay; bad inputs are refused before anything is applied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import AsyncIterator

import pytest

from machineserver.server.drivers.base import (
    BadRequest,
    BarrierInput,
    Feature,
    LockStep,
    MachineOptions,
    MachineState,
    NotSupported,
    ProgramImage,
    QuantumResult,
    Segment,
    StopReason,
    WatchKind,
    WrongState,
)
from machineserver.server.drivers.unicorn import UnicornBackend
from tests.drivers.test_contract import BACKENDS, Rig
from tests.drivers.test_unicorn_irq_timing import HANDLER as IRQ_HANDLER
from tests.drivers.test_unicorn_irq_timing import MARK as IRQ_MARK
from tests.drivers.test_unicorn_irq_timing import program as irq_program
from tests.helpers.backends import no_qemu_left_behind, require_backend
from tests.helpers.events import Recorder
from tests.helpers.machines import board

BOARD = "mps2-an385"
SHARED = 0x20200000  # the co-simulation firmware's first shared region
DOORBELL_IRQ = 30
# co-simulation members run with deterministic virtual time (QEMU refuses lock-step without)
LOCKSTEP_OPTIONS = MachineOptions(icount=True)

# --------------------------------------------------------------------------- a WFI sleeper
# Thumb code, hand-assembled: enable IRQ 30 in the NVIC, then sleep in WFI forever; the
# IRQ 30 handler counts its calls in the word at COUNTER.
#   0x100: ldr r0, =0xE000E100 ; ldr r1, =1<<30 ; str r1, [r0] ; cpsie i
#   0x108: wfi ; b 0x108
#   0x120: ldr r0, =COUNTER ; ldr r1, [r0] ; adds r1, #1 ; str r1, [r0] ; bx lr
COUNTER = 0x20000000
RESET, WFI_AT, HANDLER = 0x100, 0x108, 0x120
SETUP_INSNS = 5  # 4 before the WFI, and the WFI
HANDLER_INSNS = 5 + 2  # the handler, then the branch back and the WFI


def sleeper_image() -> ProgramImage:
    vectors = [0] * (16 + 32)
    vectors[0], vectors[1] = 0x20001000, RESET | 1
    vectors[16 + DOORBELL_IRQ] = HANDLER | 1
    code = struct.pack("<8H", 0x4803, 0x4904, 0x6001, 0xB662, 0xBF30, 0xE7FD, 0xBF00, 0xBF00)
    code += struct.pack("<II", 0xE000E100, 1 << DOORBELL_IRQ)
    handler = struct.pack("<6H", 0x4802, 0x6801, 0x3101, 0x6001, 0x4770, 0xBF00) + struct.pack("<I", COUNTER)
    table = struct.pack(f"<{len(vectors)}I", *vectors)
    return ProgramImage((Segment(0, table), Segment(RESET, code), Segment(HANDLER, handler)), entry=RESET)


# --------------------------------------------------------------------------- fixtures


def _declares_lockstep(name: str) -> bool:
    return LockStep in BACKENDS[name].machine_class.capabilities


class LockRig(Rig):
    @property
    def lock(self) -> LockStep:
        return self.machine.capability(LockStep)

    async def counter(self) -> int:
        return int.from_bytes(await self.mem.read_memory(COUNTER, 4), "little")


@pytest.fixture(params=sorted(BACKENDS))
async def make(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    """A factory of fresh machines (OFF) of one backend that declares LockStep."""
    name = request.param
    if not _declares_lockstep(name):
        pytest.skip(f"the {name} backend does not declare LockStep")
    require_backend(name, BOARD)
    backend = BACKENDS[name]()
    made: list[LockRig] = []

    def factory() -> LockRig:
        events = Recorder()
        rig = LockRig(name, BOARD, backend.create_machine(board(BOARD), LOCKSTEP_OPTIONS, events), events)
        made.append(rig)
        return rig

    with no_qemu_left_behind():
        yield factory
        for rig in made:
            await rig.machine.power_off()
        await backend.aclose()


async def _booted(make: object, program: str | ProgramImage, watch: tuple[tuple[int, int], ...] = ()) -> LockRig:
    assert callable(make)
    rig: LockRig = make()
    await rig.machine.power_on()
    await rig.machine.load(program if isinstance(program, ProgramImage) else rig.image(program))
    assert await rig.lock.begin(watch) == 0
    return rig


async def _run(rig: LockRig, quantum: int, limit: int = 2_000_000) -> list[QuantumResult]:
    """Quanta of ``quantum`` cycles until a stop or ``limit`` cycles."""
    out: list[QuantumResult] = []
    cycles = 0
    while cycles < limit:
        result = await rig.lock.advance(cycles + quantum, BarrierInput())
        out.append(result)
        if result.stop is not None:
            break
        assert result.cycles == cycles + quantum
        cycles = result.cycles
    return out


def _console(results: list[QuantumResult]) -> bytes:
    return b"".join(r.console for r in results)


# --------------------------------------------------------------------------- cycles, exit, console


async def test_quanta_end_exactly_and_console_is_returned_not_sent(make: object) -> None:
    rig = await _booted(make, "hello")
    results = []
    for until in (1, 2, 37, 100, 101):  # odd sizes too: counted exactly, never estimated
        result = await rig.lock.advance(until, BarrierInput())
        assert (result.cycles, result.stop, result.accepted) == (until, None, 0)
        assert rig.machine.state is MachineState.HALTED
        results.append(result)
    results += await _run_from(rig, 101, 50)
    last = results[-1]
    assert last.stop is not None and last.stop.reason is StopReason.EXIT and last.stop.exit_code == 0
    assert last.cycles < 101 + 50 * len(results)  # ended early, at the exit
    assert rig.machine.state is MachineState.EXITED
    assert _console(results) == b"Hello from mps2-an385!\n"
    counters = rig.machine.counters()
    if counters.exact:
        assert counters.instructions == last.cycles  # no sleep: cycles are instructions
    # returned, never sent: no console event, no stop event
    assert bytes(rig.events.console) == b"" and rig.events.stops == []
    # one long quantum on a fresh machine: the same exit at the same cycle
    other = await _booted(make, "hello")
    once = await other.lock.advance(1_000_000, BarrierInput())
    assert once.stop == last.stop and once.cycles == last.cycles
    assert once.console == b"Hello from mps2-an385!\n"
    await rig.lock.end()
    await rig.lock.end()  # idempotent


async def _run_from(rig: LockRig, start: int, quantum: int) -> list[QuantumResult]:
    out = []
    cycles = start
    while True:
        result = await rig.lock.advance(cycles + quantum, BarrierInput())
        out.append(result)
        if result.stop is not None:
            return out
        assert result.cycles == cycles + quantum
        cycles = result.cycles


async def test_breakpoint_ends_the_quantum_before_its_instruction(make: object) -> None:
    rig = await _booted(make, "hello")
    main = rig.symbol("hello", "main")
    await rig.bp.set_breakpoint(main)
    result = await rig.lock.advance(100_000, BarrierInput())
    assert result.stop is not None and result.stop.reason is StopReason.BREAKPOINT
    assert result.stop.pc == main and await rig.pc() == main
    at = result.cycles
    assert 0 < at < 100_000
    assert rig.machine.state is MachineState.HALTED
    # a fresh machine brought to that cycle stands at main, main not yet run
    other = await _booted(make, "hello")
    assert (await other.lock.advance(at, BarrierInput())).stop is None
    assert await other.pc() == main
    # the next quantum goes on from the breakpoint (no second stop there) to the exit
    result = await rig.lock.advance(100_000, BarrierInput())
    assert result.stop is not None and result.stop.reason is StopReason.EXIT
    assert result.console == b"Hello from mps2-an385!\n"
    assert rig.events.stops == []


async def test_watchpoint_and_fault_stops_are_returned(make: object) -> None:
    rig = await _booted(make, "fault")
    result = await rig.lock.advance(200_000, BarrierInput())
    assert result.stop is not None and result.stop.reason in (StopReason.EXIT, StopReason.FAULT)
    assert result.console.startswith(b"about to fault\n")
    assert rig.events.stops == [] and bytes(rig.events.console) == b""

    rig = await _booted(make, sleeper_image())
    await rig.wp.set_watchpoint(COUNTER, 4, WatchKind.WRITE)
    result = await rig.lock.advance(1_000, BarrierInput(irqs=(DOORBELL_IRQ,)))
    assert result.stop is not None and result.stop.reason is StopReason.WATCHPOINT
    assert result.stop.watch_address == COUNTER
    assert result.cycles < 1_000
    assert rig.events.stops == []


# --------------------------------------------------------------------------- console input


async def test_console_input_one_byte_per_barrier_when_rx_is_empty(make: object) -> None:
    rig = await _booted(make, "echo")
    # before the firmware enabled its receiver: refused
    first = await rig.lock.advance(0, BarrierInput(console=b"x"))
    assert (first.cycles, first.accepted) == (0, 0)
    ready = b""
    cycles = 0
    while b"echo ready\n" not in ready:
        cycles += 2_000
        result = await rig.lock.advance(cycles, BarrierInput())
        ready += result.console
        assert result.stop is None and cycles < 200_000
    # a quantum of 0 cycles: the byte waits in the receiver, so a second one is refused
    took = await rig.lock.advance(cycles, BarrierInput(console=b"hi"))
    assert (took.accepted, took.cycles) == (1, cycles)
    refused = await rig.lock.advance(cycles, BarrierInput(console=b"X"))
    assert refused.accepted == 0
    cycles += 5_000
    result = await rig.lock.advance(cycles, BarrierInput(console=b"i"))
    assert result.accepted == 0  # the 'h' was still there at the barrier
    echoed = result.console
    for byte in b"i\nq":  # then one byte per barrier, each read by the firmware in time
        cycles += 5_000
        result = await rig.lock.advance(cycles, BarrierInput(console=bytes([byte])))
        echoed += result.console
        if result.stop is not None:
            break
        assert result.accepted == 1
    while result.stop is None:
        cycles += 5_000
        result = await rig.lock.advance(cycles, BarrierInput())
        echoed += result.console
    assert echoed == b"hi\nbye\n"
    assert result.stop.reason is StopReason.EXIT
    assert bytes(rig.events.console) == b""


# --------------------------------------------------------------------------- interrupts, sleep, watch


async def test_irq_at_a_barrier_wakes_wfi_before_the_first_instruction(make: object) -> None:
    rig = await _booted(make, sleeper_image(), watch=((COUNTER, 4),))
    asleep = await rig.lock.advance(1_000, BarrierInput())
    assert (asleep.cycles, asleep.stop) == (1_000, None)  # the clock jumped
    assert asleep.idle or not _idle_is_exact(rig)
    assert asleep.watched == (bytes(4),)
    assert await rig.pc() == WFI_AT + 2
    # the handler's first instruction is a breakpoint: taken at the barrier's cycle
    await rig.bp.set_breakpoint(HANDLER)
    hit = await rig.lock.advance(2_000, BarrierInput(irqs=(DOORBELL_IRQ,)))
    assert hit.stop is not None and hit.stop.reason is StopReason.BREAKPOINT
    assert (hit.stop.pc, hit.cycles) == (HANDLER, 1_000)  # exception entry costs nothing
    woke = await rig.lock.advance(2_000, BarrierInput())
    assert (woke.cycles, woke.stop) == (2_000, None)
    assert woke.idle or not _idle_is_exact(rig)
    assert woke.watched == (struct.pack("<I", 1),)
    await rig.bp.clear_breakpoint(HANDLER)
    # asleep again, woken again: one call of the handler per raise
    again = await rig.lock.advance(3_000, BarrierInput(irqs=(DOORBELL_IRQ,)))
    assert again.watched == (struct.pack("<I", 2),) and (again.idle or not _idle_is_exact(rig))
    counters = rig.machine.counters()
    if counters.exact:
        assert counters.instructions == SETUP_INSNS + 2 * HANDLER_INSNS
    # no interrupt: the sleeper sleeps through whole quanta, running nothing
    for until in (4_000, 50_000, 50_001):
        quiet = await rig.lock.advance(until, BarrierInput())
        assert (quiet.cycles, quiet.watched) == (until, (struct.pack("<I", 2),))
        assert quiet.idle or not _idle_is_exact(rig)
    if counters.exact:
        assert rig.machine.counters().instructions == counters.instructions
    # an interrupt raised while PRIMASK is set is pending, not taken -- where the backend's
    # debug interface can set PRIMASK (QEMU 7.2's gdbstub has no primask register)
    if "primask" in rig.regs.register_names():
        await rig.regs.write_register("primask", 1)
        masked = await rig.lock.advance(60_000, BarrierInput(irqs=(DOORBELL_IRQ,)))
        assert masked.watched == (struct.pack("<I", 2),)  # PRIMASK: not taken


async def test_barrier_writes_land_before_the_quantum_and_watched_ranges_follow(make: object) -> None:
    rig = await _booted(make, sleeper_image(), watch=((SHARED, 8), (COUNTER, 4)))
    result = await rig.lock.advance(500, BarrierInput(writes=(Segment(SHARED, b"pingpong"),)))
    assert result.watched == (b"pingpong", bytes(4))
    assert await rig.mem.read_memory(SHARED, 8) == b"pingpong"
    result = await rig.lock.advance(600, BarrierInput(writes=(Segment(SHARED + 4, b"PONG"),),
                                                      irqs=(DOORBELL_IRQ,)))
    assert result.watched == (b"pingPONG", struct.pack("<I", 1))


async def test_systick_wakes_the_sleeper_at_its_exact_cycle(make: object) -> None:
    """Quanta of any size: the same exit at the same cycle, the same output."""
    outcomes = set()
    for quantum in (3_001, 10_000, 77_777):
        rig = await _booted(make, "systick")
        results = await _run(rig, quantum)
        last = results[-1]
        assert last.stop is not None and last.stop.reason is StopReason.EXIT, last
        assert _console(results) == b"ticks=10\n"
        assert any(r.idle for r in results[:-1]) or quantum > last.cycles
        outcomes.add((last.cycles, last.stop.pc))
        await rig.machine.power_off()
    assert len(outcomes) == 1, outcomes


# --------------------------------------------------------------------------- determinism


def _idle_is_exact(rig: LockRig) -> bool:
    """Whether the backend's QuantumResult.idle is exact (Unicorn's is; QEMU reads its idle
    check when the deadline fires, which can depend on host timing: a hint there)."""
    return rig.backend == "unicorn"


async def _script(rig: LockRig, plan: list[tuple[int, BarrierInput]]) -> list[QuantumResult]:
    """The results of ``plan``'s calls, without ``idle``: a hint, not part of the
    deterministic result (see QuantumResult.idle)."""
    return [dataclasses.replace(await rig.lock.advance(until, inputs), idle=False) for until, inputs in plan]


async def test_same_calls_same_results_and_rollback_replays_them(make: object) -> None:
    plan = [(c, BarrierInput()) for c in range(10_000, 110_000, 10_000)] + [(300_000, BarrierInput())]
    plan[3] = (plan[3][0], BarrierInput(writes=(Segment(SHARED, b"\x01\x02"),), irqs=(DOORBELL_IRQ,)))
    straight = await _script(await _booted(make, "systick", watch=((SHARED, 2),)), plan)
    assert _console(straight) == b"ticks=10\n"
    again = await _script(await _booted(make, "systick", watch=((SHARED, 2),)), plan)
    assert again == straight

    rig = await _booted(make, "systick", watch=((SHARED, 2),))
    head = await _script(rig, plan[:2])
    await rig.lock.checkpoint()
    first_try = await _script(rig, plan[2:6])
    await rig.lock.rollback()
    assert rig.machine.counters().instructions <= straight[1].cycles
    replay = await _script(rig, plan[2:])
    assert head + replay == straight
    assert first_try == straight[2:6]
    # a rollback after the machine exited brings it back too
    await rig.lock.rollback()
    assert rig.machine.state is MachineState.HALTED
    assert await _script(rig, plan[2:]) == straight[2:]


async def test_rollback_restores_memory_registers_and_the_uart(make: object) -> None:
    rig = await _booted(make, "echo", watch=((SHARED, 4),))
    await rig.lock.advance(50_000, BarrierInput(writes=(Segment(SHARED, b"keep"),)))
    await rig.lock.checkpoint()
    regs = await rig.regs.read_registers()
    await rig.lock.advance(50_000, BarrierInput(console=b"a"))  # waits in the receiver
    await rig.mem.write_memory(SHARED, b"lost")
    await rig.lock.advance(90_000, BarrierInput(writes=(Segment(SHARED, b"gone"),)))
    await rig.lock.rollback()
    assert await rig.mem.read_memory(SHARED, 4) == b"keep"
    assert await rig.regs.read_registers() == regs
    assert rig.machine.counters().instructions <= 50_000
    result = await rig.lock.advance(90_000, BarrierInput())
    assert result.console == b""  # the byte fed after the checkpoint is gone with it
    assert result.watched == (b"keep",)


async def test_a_cancelled_quantum_leaves_the_machine_halted_and_usable(make: object) -> None:
    rig = await _booted(make, "crc32")  # ~55 M instructions: a long quantum
    task = asyncio.ensure_future(rig.lock.advance(60_000_000, BarrierInput()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.machine.state is MachineState.HALTED
    at = rig.machine.counters().instructions
    assert 0 < at < 60_000_000
    result = await rig.lock.advance(60_000_000, BarrierInput())  # goes on to the end
    assert result.stop is not None and result.stop.reason is StopReason.EXIT
    assert b"crc32=0x80f45f04\n" in result.console


# --------------------------------------------------------------------------- refusals


async def test_bad_inputs_are_refused_before_anything_is_applied(make: object) -> None:
    assert callable(make)
    rig: LockRig = make()
    with pytest.raises(WrongState):
        await rig.lock.begin(())  # off
    await rig.machine.power_on()
    await rig.machine.load(sleeper_image())
    with pytest.raises(WrongState):
        await rig.lock.advance(10, BarrierInput())  # not begun
    with pytest.raises(WrongState):
        await rig.lock.rollback()  # no checkpoint
    with pytest.raises(BadRequest) as bad:
        await rig.lock.begin([(0x9000_0000, 4)])
    assert bad.value.field == "watch"
    await rig.lock.begin([(SHARED, 4)])
    await rig.lock.advance(100, BarrierInput())
    with pytest.raises(BadRequest) as bad:
        await rig.lock.advance(99, BarrierInput())
    assert bad.value.field == "until_cycles"
    for irq in (-1, 1000):
        with pytest.raises(BadRequest) as bad:
            await rig.lock.advance(200, BarrierInput(writes=(Segment(SHARED, b"nope"),), irqs=(irq,)))
        assert bad.value.field == "irq"
    with pytest.raises(BadRequest) as bad:
        await rig.lock.advance(200, BarrierInput(writes=(Segment(0x9000_0000, b"x"),)))
    assert bad.value.field == "writes"
    result = await rig.lock.advance(200, BarrierInput())
    assert result.watched == (bytes(4),) and result.cycles == 200  # nothing was applied
    assert rig.machine.state is MachineState.HALTED


# --------------------------------------------------------------------------- unicorn only


async def test_unicorn_riscv_boards_have_no_lockstep_and_say_why() -> None:
    backend = UnicornBackend()
    machine = backend.create_machine(board("sifive_e"), MachineOptions(), Recorder())
    assert not machine.has(LockStep)
    with pytest.raises(NotSupported, match="PLIC"):
        machine.capability(LockStep)
    info = backend.probe()
    assert Feature.LOCKSTEP in info.features
    assert "PLIC" in info.board_limits["sifive_e"][Feature.LOCKSTEP]
    assert Feature.LOCKSTEP not in info.board_limits.get(BOARD, {})
    assert board(BOARD).name == BOARD


# --------------------------------------------------------------------------- interrupts the guest unmasks


@pytest.mark.parametrize("unmask", ["cpsie", "msr_basepri", "nvic_ispr"])
async def test_an_interrupt_the_guest_unmasks_is_taken_right_after_at_one_cycle(make: object, unmask: str) -> None:
    """IRQ 30 pending while masked, then ``cpsie i`` / ``msr basepri`` / an NVIC ISPR write
    mid-quantum: the handler's first instruction is reached right after that instruction,
    at the same cycle for any quantum (and on every backend: mixed co-simulations agree)."""
    prog = irq_program(unmask)
    outcomes = set()
    for quantum in (1_000, 10_000, 100_000):
        rig = await _booted(make, prog.image, watch=((IRQ_MARK, 8),))
        await rig.bp.set_breakpoint(IRQ_HANDLER)
        results = await _run(rig, quantum)
        hit = results[-1]
        assert hit.stop is not None and (hit.stop.reason, hit.stop.pc) == (StopReason.BREAKPOINT, IRQ_HANDLER)
        outcomes.add(hit.cycles)
        await rig.bp.clear_breakpoint(IRQ_HANDLER)
        after = await rig.lock.advance(hit.cycles + 1_000, BarrierInput())
        assert after.watched == (struct.pack("<II", 0, 1),)  # r2 = 0: before the next instruction
        await rig.machine.power_off()
    assert outcomes == {prog.handler_at_instructions}
