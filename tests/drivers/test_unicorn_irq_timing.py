"""Unicorn: a pending interrupt the guest itself makes deliverable is taken right after the
instruction that does it (``cpsie i``, ``msr primask/basepri``, an NVIC ISPR write), as
on hardware and in QEMU, never at the end of the slice it happened in.

Hand-assembled mps2-an385 images (:func:`program`): IRQ 30 is enabled and pended while
masked, a delay loop runs, then one *unmasking* instruction; the instruction after it
(``movs r2, #1``) marks that the main program went on, and the handler stores r2 into
MARK and counts its calls in COUNT. So MARK reads 0 exactly when the handler ran before
the instruction after the unmasking one, whatever the backend's slices are; the
instruction count at the handler's first instruction (a breakpoint) is checked exactly
where counts are exact (icount, steps, lock-step). After the handler the program counts
in r2 forever, so a late interrupt would show in MARK as well.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

import pytest

from machineserver.server.drivers.base import (
    BarrierInput,
    LockStep,
    Machine,
    MachineOptions,
    ProgramImage,
    Segment,
    StopReason,
)
from machineserver.server.drivers.unicorn import UnicornBackend
from machineserver.server.drivers.unicorn.cortexm import unmask_sites
from tests.helpers.events import Recorder
from tests.helpers.machines import Parts, board

BOARD = "mps2-an385"
IRQ = 30
ISER, ISPR, IPR = 0xE000E100, 0xE000E200, 0xE000E400
MARK, COUNT = 0x20000000, 0x20000004
RESET, HANDLER = 0x100, 0x400
DELAY = 1_200  # delay loop iterations: the unmasking instruction runs at cycle ~2.4 k


# --------------------------------------------------------------------------- a tiny assembler


class Thumb:
    """Thumb code at ``base`` with a literal pool after it (ldr rd, =value)."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.halfwords: list[int | tuple[int, int]] = []  # (rd, literal) to patch
        self.literals: list[int] = []
        self.instructions = 0

    @property
    def here(self) -> int:
        return self.base + 2 * len(self.halfwords)

    def op(self, *halfwords: int) -> int:
        """One instruction (one or two halfwords); returns its address."""
        at = self.here
        self.halfwords.extend(halfwords)
        self.instructions += 1
        return at

    def ldr(self, rd: int, value: int) -> int:
        at = self.here
        if value not in self.literals:
            self.literals.append(value)
        self.halfwords.append((rd, value))
        self.instructions += 1
        return at

    def assemble(self) -> bytes:
        end = self.base + 2 * len(self.halfwords)
        pool = (end + 3) & ~3
        out = bytearray()
        for i, hw in enumerate(self.halfwords):
            if isinstance(hw, tuple):
                rd, value = hw
                pc = (self.base + 2 * i + 4) & ~3
                offset = pool + 4 * self.literals.index(value) - pc
                assert 0 <= offset < 1024 and offset % 4 == 0
                hw = 0x4800 | rd << 8 | offset // 4
            out += struct.pack("<H", hw)
        out += bytes(pool - end)
        return bytes(out) + b"".join(struct.pack("<I", v) for v in self.literals)


# The unmasking instructions under test: how each one masks IRQ 30 first, and unmasks it.
UNMASKS = ("cpsie", "msr_primask", "msr_basepri", "nvic_ispr")


@dataclass(frozen=True)
class Program:
    image: ProgramImage
    unmask_at: int  # address of the unmasking instruction
    resume_at: int  # the next one: where the handler returns to
    handler_at_instructions: int  # instructions retired when the handler's first one is reached


def program(unmask: str) -> Program:
    """Mask IRQ 30 (PRIMASK, BASEPRI, or not yet pending), enable and pend it (but for
    nvic_ispr), delay, unmask; then count in r2 forever. The handler stores r2 at MARK."""
    code = Thumb(RESET)
    code.op(0x2400)  # movs r4, #0
    code.ldr(0, ISER)
    code.ldr(1, 1 << IRQ)
    code.op(0x6001)  # str r1, [r0]: enabled
    if unmask == "msr_basepri":
        code.ldr(0, IPR + IRQ)
        code.op(0x2380)  # movs r3, #0x80: IRQ 30's priority
        code.op(0x7003)  # strb r3, [r0]
        code.op(0x2340)  # movs r3, #0x40
        code.op(0xF383, 0x8811)  # msr basepri, r3: 0x80 is masked
    elif unmask in ("cpsie", "msr_primask"):
        code.op(0xB672)  # cpsid i
    code.ldr(0, ISPR)
    if unmask != "nvic_ispr":
        code.op(0x6001)  # str r1, [r0]: pending, masked
    code.op(0x2200)  # movs r2, #0
    code.ldr(5, DELAY)
    loop = code.op(0x3D01)  # subs r5, #1
    code.op(0xD100 | ((loop - code.here - 4) // 2) & 0xFF)  # bne loop
    before = code.instructions + 2 * (DELAY - 1)  # the loop ran DELAY times
    unmask_at = code.here
    code.op(*{"cpsie": (0xB662,), "msr_primask": (0xF384, 0x8810),  # msr primask, r4 (0)
              "msr_basepri": (0xF384, 0x8811),  # msr basepri, r4 (0)
              "nvic_ispr": (0x6001,)}[unmask])  # str r1, [r0]: pending, deliverable
    resume_at = code.op(0x2201)  # movs r2, #1: must not run before the handler
    spin = code.op(0x3201)  # adds r2, #1
    code.op(0xE000 | ((spin - code.here - 4) // 2) & 0x7FF)  # b spin

    handler = Thumb(HANDLER)
    handler.ldr(0, MARK)
    handler.op(0x6002)  # str r2, [r0]
    handler.op(0x6841)  # ldr r1, [r0, #4]
    handler.op(0x3101)  # adds r1, #1
    handler.op(0x6041)  # str r1, [r0, #4]
    handler.op(0x4770)  # bx lr

    vectors = [0] * (16 + 32)
    vectors[0], vectors[1] = 0x20001000, RESET | 1
    vectors[16 + IRQ] = HANDLER | 1
    image = ProgramImage((Segment(0, struct.pack(f"<{len(vectors)}I", *vectors)),
                          Segment(RESET, code.assemble()), Segment(HANDLER, handler.assemble())),
                         entry=RESET)
    return Program(image, unmask_at, resume_at, before + 1)


async def machine(prog: Program, *, icount: bool) -> tuple[Machine, Parts, Recorder]:
    rec = Recorder()
    m = UnicornBackend().create_machine(board(BOARD), MachineOptions(icount=icount), rec)
    await m.power_on()
    await m.load(prog.image)
    return m, Parts(m), rec


async def reg(parts: Parts, name: str) -> int:
    return (await parts.regs.read_registers([name]))[name]


async def stacked_pc(parts: Parts) -> int:
    """The return address in the exception frame (in a handler, before it pushed anything)."""
    return await word(parts, await reg(parts, "sp") + 24)


async def word(parts: Parts, address: int) -> int:
    return int.from_bytes(await parts.mem.read_memory(address, 4), "little")


# --------------------------------------------------------------------------- the image itself


def test_the_unmasking_sites_are_found_in_the_image() -> None:
    for unmask in UNMASKS:
        prog = program(unmask)
        size = 2 if unmask in ("cpsie", "nvic_ispr") else 4
        sites = unmask_sites(prog.image.segments)
        if unmask == "nvic_ispr":
            assert sites == []  # an MMIO write: no code hook needed
        else:
            assert prog.unmask_at + size in sites
    # cpsid (masking) and data that only looks like an MSR's first half are no sites
    assert unmask_sites([Segment(0x100, struct.pack("<4H", 0xB672, 0xF384, 0x0000, 0xBF00))]) == []
    assert unmask_sites([Segment(0x101, struct.pack("<H", 0xB662))]) == []  # odd: not code


# --------------------------------------------------------------------------- run, step


@pytest.mark.parametrize("unmask", UNMASKS)
async def test_a_run_takes_the_interrupt_right_after_the_unmasking_instruction(unmask: str) -> None:
    prog = program(unmask)
    for icount in (True, False):  # counted slices (exact) and uncounted ones
        m, parts, rec = await machine(prog, icount=icount)
        try:
            await parts.bp.set_breakpoint(HANDLER)
            await parts.run.run()
            stop = await rec.wait_stop()
            assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, HANDLER)
            assert await reg(parts, "r2") == 0  # the next instruction has not run
            assert await stacked_pc(parts) == prog.resume_at  # the unmasking one has retired
            if icount:
                assert m.counters().exact
                assert m.counters().instructions == prog.handler_at_instructions
            await parts.bp.clear_breakpoint(HANDLER)
            await parts.run.run()
            await asyncio.sleep(0.05)
            await parts.run.pause()
            assert (await word(parts, MARK), await word(parts, COUNT)) == (0, 1)
            assert await reg(parts, "r2") > 1  # the main program goes on
        finally:
            await m.power_off()


@pytest.mark.parametrize("unmask", UNMASKS)
async def test_a_step_takes_the_interrupt_right_after_the_unmasking_instruction(unmask: str) -> None:
    prog = program(unmask)
    m, parts, _ = await machine(prog, icount=False)
    try:
        # one step over the unmasking instruction and one more: the handler's first
        stop = await parts.run.step(prog.handler_at_instructions + 1)
        assert stop.reason is StopReason.STEP
        assert stop.pc == HANDLER + 2 and await reg(parts, "r2") == 0
        assert m.counters().instructions == prog.handler_at_instructions + 1
        # the same, one instruction at a time from the unmasking one
        await m.reset()
        await parts.run.step(prog.handler_at_instructions - 1)
        assert await reg(parts, "pc") == prog.unmask_at
        stop = await parts.run.step(1)
        assert stop.pc == HANDLER  # taken at once: its first instruction is next
        stop = await parts.run.step(6 + 1)  # the handler (its return too), then movs r2, #1
        assert await word(parts, MARK) == 0 and await word(parts, COUNT) == 1
        assert await reg(parts, "r2") == 1
    finally:
        await m.power_off()


async def test_an_exception_return_takes_a_pending_interrupt_it_unmasks() -> None:
    """Tail-chaining: an interrupt pended inside a higher-priority handler is taken at
    that handler's return, before the main program's next instruction."""
    code = Thumb(RESET)
    code.ldr(0, ISER)
    code.ldr(1, (1 << IRQ) | (1 << (IRQ - 1)))
    code.op(0x6001)  # str r1, [r0]: IRQs 29 and 30 enabled
    code.ldr(0, IPR + IRQ)
    code.op(0x2380)  # movs r3, #0x80
    code.op(0x7003)  # strb r3, [r0]: IRQ 30 less urgent than IRQ 29 (priority 0)
    code.ldr(0, ISPR)
    code.ldr(1, 1 << (IRQ - 1))
    code.op(0x2200)  # movs r2, #0
    code.op(0x6001)  # str r1, [r0]: IRQ 29 taken at once
    code.op(0x2201)  # movs r2, #1
    code.op(0xE7FE)  # b .
    high = Thumb(0x300)  # IRQ 29: pend IRQ 30 (cannot preempt), return
    high.ldr(0, ISPR)
    high.ldr(1, 1 << IRQ)
    high.op(0x6001)
    high.op(0x4770)
    handler = Thumb(HANDLER)  # IRQ 30: r2 at MARK
    handler.ldr(0, MARK)
    handler.op(0x6002)
    handler.op(0x4770)
    vectors = [0] * (16 + 32)
    vectors[0], vectors[1] = 0x20001000, RESET | 1
    vectors[16 + IRQ - 1], vectors[16 + IRQ] = 0x300 | 1, HANDLER | 1
    image = ProgramImage((Segment(0, struct.pack(f"<{len(vectors)}I", *vectors)),
                          Segment(RESET, code.assemble()), Segment(0x300, high.assemble()),
                          Segment(HANDLER, handler.assemble())), entry=RESET)
    m, parts, rec = await machine(Program(image, 0, 0, 0), icount=True)
    try:
        await parts.bp.set_breakpoint(HANDLER)
        await parts.run.run()
        stop = await rec.wait_stop()
        assert stop.pc == HANDLER and await reg(parts, "r2") == 0
        assert m.counters().instructions == code.instructions - 2 + 4  # main up to the str, IRQ 29
    finally:
        await m.power_off()


# --------------------------------------------------------------------------- lock-step


async def _lockstep_machine(prog: Program) -> tuple[Machine, Parts, LockStep]:
    m, parts, _ = await machine(prog, icount=True)
    lock = m.capability(LockStep)
    await lock.begin(((MARK, 8),))
    return m, parts, lock


@pytest.mark.parametrize("unmask", UNMASKS)
async def test_lockstep_takes_it_at_the_same_cycle_for_any_quantum(unmask: str) -> None:
    prog = program(unmask)
    outcomes = set()
    for quantum in (1_000, 10_000, 100_000, 777):
        m, parts, lock = await _lockstep_machine(prog)
        try:
            await parts.bp.set_breakpoint(HANDLER)
            cycles = 0
            while True:
                result = await lock.advance(cycles + quantum, BarrierInput())
                if result.stop is not None:
                    break
                cycles = result.cycles
            assert (result.stop.reason, result.stop.pc) == (StopReason.BREAKPOINT, HANDLER)
            assert result.cycles == prog.handler_at_instructions
            assert await stacked_pc(parts) == prog.resume_at
            outcomes.add(result.cycles)
            result = await lock.advance(200_000, BarrierInput())
            assert result.watched == (struct.pack("<II", 0, 1),)
        finally:
            await m.power_off()
    assert outcomes == {prog.handler_at_instructions}


@pytest.mark.parametrize("unmask", UNMASKS)
async def test_lockstep_replay_to_an_earlier_cycle_gives_the_straight_state(unmask: str) -> None:
    """The coordinator's exact halt: roll back, replay to an earlier cycle Ts, then go on
    to the quantum's end. A slice boundary at Ts must not change when the interrupt is
    taken, whichever side of the unmasking instruction Ts falls on."""
    prog = program(unmask)
    at = prog.handler_at_instructions
    quantum = 100_000
    m, parts, lock = await _lockstep_machine(prog)
    try:
        await lock.checkpoint()
        straight = await lock.advance(quantum, BarrierInput())
        regs = await parts.regs.read_registers()
        assert straight.watched[0][:8] == struct.pack("<II", 0, 1)
        for ts in (at - 2, at - 1, at, at + 1, at + 3, at + 50, quantum // 2):
            await lock.rollback()
            head = await lock.advance(ts, BarrierInput())
            assert head.cycles == ts and head.stop is None
            rest = await lock.advance(quantum, BarrierInput())
            assert (rest.cycles, rest.stop, rest.watched) == (straight.cycles, None, straight.watched), ts
            assert await parts.regs.read_registers() == regs, ts
    finally:
        await m.power_off()
