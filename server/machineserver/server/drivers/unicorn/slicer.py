"""The Unicorn run engine: one emulation slice at a time (the :class:`~.arch.CoreHost` the
cores call back into). :mod:`.run_control` drives it from its worker thread.

Slices. Emulation runs in slices of one ``emu_start`` each; the GIL is released inside
Unicorn, so many machines run side by side. Between slices (and only there, never per
instruction) the machine advances timers, delivers interrupts, flushes console bytes, and
checks for a pause request. Slices are at most ~10 ms of host time, so a pause takes
effect within about one slice.

Virtual time. Unicorn's ``count=`` makes every instruction call a native counting hook,
which costs ~6x in speed on 2.1.4 (measured: ~1.6 G instr/s without, ~0.24 G with). So a
slice is *counted* (it ends after a given number of instructions) only when something
depends on time: a stepping request, an armed timer (SysTick enabled, CLINT mtimecmp set),
or ``MachineOptions.icount``; then the slice ends exactly at the next timer deadline and
SysTick/mtime readings are exact. Otherwise a slice runs uncounted, ended by the watchdog
after 10 ms. Either way, the instructions a slice executed are counted exactly by the
native block counter (:mod:`.blockcount`, a C block hook on every engine: ~1.6x on a
tight CRC loop, ~1.04x on a UART-polling one; scripts/bench ``counts``), which also takes
the watchdog's stop (a flag its hook acts on, so every stop is synchronous). Without a C
compiler there is no block counter: a counted slice then reads Unicorn's own counter
(:mod:`.counter`) and an uncounted one is *estimated* (host time x a nominal rate), and
``counters().exact`` turns False. Virtual cycles = instructions + cycles skipped while the
CPU sleeps in WFI.

Interrupts the guest makes deliverable. An interrupt is taken between slices (and on an
exception return, inside the interrupt hook), so the instruction that makes a pending
interrupt deliverable ends its slice, and the interrupt is taken right after it, as on
hardware and in QEMU (never up to a slice later: where slices end must not decide when
an interrupt is taken, or a co-simulation's replay to an earlier cycle would differ):

* an MMIO write (NVIC ISER/ISPR/STIR, ICSR PENDSVSET/PENDSTSET, a priority, a peripheral
  raising its line) after which :meth:`ArchCore.deliverable` holds ends the slice right
  after its instruction (:meth:`mmio_write`): in a counted slice through Unicorn's own
  instruction limit (:meth:`.counter.EmuCounter.stop_after_current`: exact, nothing
  replayed); in an uncounted one by a stop inside the access, which Unicorn answers by
  restarting the instruction: its access is answered from ``_replay`` (no second side
  effect) and the slicer completes that one instruction on its own (:meth:`_finish_access`);
* a CPS/MSR that clears PRIMASK/FAULTMASK or lowers BASEPRI: a code hook on the
  instruction after each such instruction of the loaded image ends the slice there when
  an interrupt is deliverable (:meth:`.cortexm.CortexM.watch_unmasking`;
  :meth:`end_slice_here`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from unicorn import unicorn_const as ucc
from unicorn.unicorn import UcError

from machineserver.server.drivers.base import Arch, ProgramImage, StopInfo, StopReason
from machineserver.server.drivers.unicorn.arch import Engine
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext
from machineserver.server.drivers.unicorn.cortexm import CortexM
from machineserver.server.drivers.unicorn.replay import instruction_size, memory_operand_address
from machineserver.server.drivers.unicorn.semihosting import semihost_call
from machineserver.server.drivers.unicorn.watchdog import WATCHDOG

SLICE_COUNT = 2_000_000  # instructions per counted slice (~8 ms at ~240 M/s)
SLICE_TIMEOUT_US = 10_000  # host time per uncounted slice
NOMINAL_IPS = 1_500_000_000  # estimate for uncounted slices (crc32 on this host: 1.5-1.9 G/s)
MIN_SLICE_S = 0.001  # a slice runs at least this long before it yields to a waiting call
UNTIL = 0xFFFFFFFF  # odd: never a PC on Thumb or RISC-V

T = TypeVar("T")
# an MMIO access: (address, size, value written or None for a read)
AccessKey = tuple[int, int, int | None]


@dataclass(frozen=True)
class Advance:
    """What one :meth:`Slicer.advance` did."""

    stop: StopInfo | None  # the machine stopped (breakpoint, watchpoint, exit, fault)
    executed: int  # instructions (exact in a counted slice, estimated otherwise)
    idle: bool  # asleep in WFI with nothing that could wake it but console input
    # asleep in WFI with nothing to take, left to the caller (``advance(..., sleep=False)``)
    wfi: bool = False


class Slicer:
    """Runs slices on the powered board of one machine (bound at power_on). Every
    method but :meth:`watchdog_stop` runs with the machine's lock held."""

    def __init__(self, ctx: MachineContext) -> None:
        self._ctx = ctx
        self._cpu_hz = int(ctx.board.cpu_mhz * 1_000_000)
        self._replay_arch = "arm" if ctx.board.arch == Arch.ARM_CORTEX_M else "riscv"
        self._inst: BoardInstance | None = None
        self._mmio_lock = threading.RLock()
        self._tb_counted: bool | None = None  # how the cached translated blocks were made
        self._reset_requested = False
        # per slice
        self._in_slice = False
        self._counted = False
        self._slice_cycles = 0
        self._slice_insns0 = 0  # the block counter's reading at the slice's start
        self._slice_t0 = 0.0
        self._slice_deadline = 0.0
        self._slice_id = 0
        # lock-step (see lockstep.py): where a slice ends may not depend on host timing
        self.deterministic = False
        self._stop_pending = False
        self._hit: StopInfo | None = None
        self._fault_addr: int | None = None
        self._extra = 0
        # MMIO replay protection (see mmio_read)
        self._last_access: tuple[AccessKey, int | None] | None = None
        self._replay: tuple[AccessKey, int | None] | None = None
        # an uncounted slice was stopped inside an MMIO write that made an interrupt
        # deliverable: its instruction is completed after the slice (_finish_access)
        self._finish_pending = False
        # the image whose CPS/MSR sites are hooked (see CortexM.watch_unmasking)
        self._unmask_image: ProgramImage | None = None

    # ------------------------------------------------------------------ binding
    def bind(self, inst: BoardInstance) -> None:
        """Run on this instance from now on (power_on)."""
        self._inst = inst
        self._tb_counted = None
        self._reset_requested = False
        self._unmask_image = None
        self.forget_replay()
        inst.uc.hook_add(ucc.UC_HOOK_MEM_UNMAPPED, self._on_unmapped)

    def unbind(self) -> None:
        self._inst = None

    def _bound(self) -> BoardInstance:
        inst = self._inst
        if inst is None:
            raise RuntimeError("the slicer runs on a powered-on machine only")
        return inst

    def forget_replay(self) -> None:
        """The next MMIO access is not a replay (reset, snapshot restore)."""
        self._replay = self._last_access = None

    def reset_board(self) -> None:
        """Reset the board (as Machine.reset) and forget per-slice memory."""
        self.forget_replay()
        self._reset_requested = False
        self._ctx.reset_board(self._bound())

    # ------------------------------------------------------------------ CoreHost
    @property
    def cpu_hz(self) -> int:
        return self._cpu_hz

    def now_cycles(self) -> int:
        clock = self._ctx.clock
        if not self._in_slice:
            return clock.cycles
        inst = self._bound()
        counter = inst.counter
        if self._counted and counter.available:
            return self._slice_cycles + max(counter.read() - 1, 0)
        if inst.blocks is not None:  # the blocks entered so far, in full
            return self._slice_cycles + inst.blocks.instructions - self._slice_insns0
        return self._slice_cycles + int((time.perf_counter() - self._slice_t0) * NOMINAL_IPS)

    def hook_stop(self, info: StopInfo) -> None:
        if self._hit is None:
            self._hit = info
        self._bound().uc.emu_stop()

    def end_slice_here(self) -> None:
        if self._in_slice:
            self._bound().uc.emu_stop()  # from a code hook: before this instruction runs

    def guard(self, action: Callable[[], object]) -> None:
        self._guarded(action, None)

    def _guarded(self, action: Callable[[], T], default: T) -> T:
        """Run a model/hook function; never let an exception reach Unicorn."""
        try:
            return action()
        except Exception as exc:
            inst = self._inst
            pc = inst.core.pc() if inst is not None else 0
            self.hook_stop(StopInfo(StopReason.FAULT, pc=pc, message=f"internal model error: {exc!r}"))
            return default

    def mmio_read(self, address: int, size: int, read: Callable[[], int]) -> int:
        """Every MMIO callback goes through here (and :meth:`mmio_write`). It ends the
        slice *synchronously*, before the access has any effect, when the slice is over
        (:meth:`_slice_over`); otherwise it performs the access under ``_mmio_lock``.

        Why: Unicorn 2.1.4 checks a stop request inside the memory helper of an MMIO
        access and then restarts the instruction (PC left at it, register writeback
        undone), so an asynchronous ``emu_stop`` landing during a UART write would replay
        the write and print the byte twice. So slices are never stopped by Unicorn's own
        ``timeout``: the watchdog thread takes ``_mmio_lock`` before it calls ``emu_stop``
        (:meth:`watchdog_stop`), and an access that finds a stop pending skips its side
        effect and is re-executed, once, in the next slice. A stop that still lands between
        an access and Unicorn's check (the callback has returned, but the C helper has not
        looked yet) is recognised after the slice: the instruction at pc is that very
        access (:meth:`_check_replay`), and its re-execution is answered from ``_replay``
        without a second side effect.

        A synchronous stop keeps counts exact: the access's instruction has not retired
        and runs first in the next slice. So counted slices end there too when the run
        control asks for a halt (a pause, a cancelled step): a long step through code that
        polls a UART pauses at its next access, not after its ~2 M instructions.
        """
        result = self._access((address, size, None), read, 0)
        return result if result is not None else 0

    def mmio_write(self, address: int, size: int, value: int, write: Callable[[], None]) -> None:
        self._access((address, size, value), write, None)

    def _access(self, key: AccessKey, fn: Callable[[], int | None], default: int | None) -> int | None:
        with self._mmio_lock:
            if self._in_slice and self._slice_over():
                self._bound().uc.emu_stop()
                return default
            replay, self._replay = self._replay, None
            if replay is not None and replay[0] == key:
                return replay[1]  # the interrupted access again: its effect happened already
            result = self._guarded(fn, default)
            self._last_access = (key, result)
            if key[2] is not None and self._in_slice and self._hit is None:
                self._guarded(partial(self._interrupt_after_write, key, result), None)
            return result

    def _interrupt_after_write(self, key: AccessKey, result: int | None) -> None:
        """After a write's side effect (in a slice): when an interrupt is deliverable now,
        end the slice right after this instruction, so the interrupt is taken there."""
        inst = self._bound()
        if not inst.core.deliverable():
            return
        if self._counted and inst.counter.stop_after_current():
            return  # the next instruction's counting hook ends the slice: nothing replayed
        # Unicorn restarts an instruction stopped inside its access: its access will be
        # answered from _replay, and _finish_access completes it after the slice
        self._replay = (key, result)
        self._finish_pending = True
        inst.uc.emu_stop()

    def _finish_access(self, inst: BoardInstance, counted: bool) -> UcError | None:
        """Run the one instruction a stop inside its MMIO write left unfinished (its access
        answered from ``_replay``), outside the slice: an uncounted slice ends right after
        it as a counted one does. Blocks cached before end nowhere: the instruction's own
        are dropped, translated for this one run (ending at the next instruction), and
        dropped again so no later slice ends there."""
        core, uc, gate = inst.core, inst.uc, self._ctx.gate
        pc = core.pc()
        replay = self._replay
        code = self._code_at(inst, pc)
        if replay is None or self._accessed_by(inst, code, pc) != replay[0][0]:
            self._replay = None  # not stopped inside that access after all: nothing to finish
            return None
        size = instruction_size(self._replay_arch, code, pc)
        if size is None:
            return None  # replayed at the next slice's start instead
        gate.quiet = True  # its breakpoint, if any, was passed already
        try:
            if counted:  # counted blocks stop at count=1 (no counter: counts are inexact)
                uc.emu_start(core.start_address(), UNTIL, count=1)
            else:
                uc.ctl_remove_cache(pc, pc + size)
                uc.emu_start(core.start_address(), pc + size)
                uc.ctl_remove_cache(pc, pc + size)
            return None
        except UcError as exc:
            return exc
        finally:
            gate.quiet = False
            self._replay = None

    @staticmethod
    def _code_at(inst: BoardInstance, pc: int) -> bytes:
        for size in (4, 2):
            try:
                return bytes(inst.uc.mem_read(pc, size))
            except UcError:
                continue
        return b""

    def _accessed_by(self, inst: BoardInstance, code: bytes, pc: int) -> int | None:
        """The memory address the instruction at pc (``code``) is about to access."""
        core = inst.core

        def reg(name: str) -> int | None:
            resolved = core.resolve(name)
            return None if resolved is None else core.read_reg(resolved)

        return memory_operand_address(self._replay_arch, code, pc, reg)

    def _slice_over(self) -> bool:
        """Whether the slice should end at this access: the watchdog or run control asked;
        an uncounted slice's time is up; or a debugger call waits for the lock and the
        slice has run a little (not in icount mode, where the point a slice ends at must not
        depend on host timing: it decides when a pended interrupt is taken)."""
        if self._stop_pending or self._ctx.halt_request.is_set():
            return True
        now = time.perf_counter()
        if self._ctx.lock.waiting and not (self._ctx.options.icount or self.deterministic) \
                and now - self._slice_t0 >= MIN_SLICE_S:
            return True
        return not self._counted and now >= self._slice_deadline

    def semihost(self, op: int, arg: int, pc: int) -> int | None:
        try:
            res = semihost_call(_SemihostIO(self._ctx, self, self._bound()), op, arg)
        except UcError as exc:
            self.hook_stop(StopInfo(StopReason.FAULT, pc=pc, fault_address=arg,
                                    message=f"semihosting call 0x{op:x}: bad pointer ({exc})"))
            return None
        if res.exit_code is not None:
            self.hook_stop(StopInfo(StopReason.EXIT, pc=pc, exit_code=res.exit_code))
            return None
        return res.value

    def account_extra(self, instructions: int) -> None:
        self._extra += instructions

    def request_reset(self) -> None:
        self._reset_requested = True

    # ------------------------------------------------------------------ the watchdog's side
    def watchdog_stop(self, slice_id: int) -> bool:
        """Called by the watchdog thread when a slice's time is up. Never waits for an
        MMIO access in progress: False then, and the watchdog tries again."""
        if not self._mmio_lock.acquire(blocking=False):
            return False
        try:
            if self._in_slice and self._slice_id == slice_id and not self._counted:
                blocks = self._bound().blocks
                if blocks is not None:
                    blocks.want_stop()  # the next block entry stops, synchronously (exact counts)
                else:
                    self._stop_pending = True
                    self._bound().uc.emu_stop()
        finally:
            self._mmio_lock.release()
        return True

    def _check_replay(self) -> None:
        """After a slice the watchdog stopped: if the instruction at pc is the MMIO access
        that ran last, Unicorn stopped inside it and will execute it again."""
        last = self._last_access
        if last is None:
            return
        inst = self._bound()
        pc = inst.core.pc()
        try:
            code = bytes(inst.uc.mem_read(pc, 4))
        except UcError:
            return
        if self._accessed_by(inst, code, pc) == last[0][0]:
            self._replay = last

    def _on_unmapped(self, uc: Engine, access: int, address: int, size: int, value: int,
                     _ud: object) -> bool:
        self._fault_addr = address
        return False

    # ------------------------------------------------------------------ slices
    def _raw_slice(self, n: int, counted: bool) -> tuple[UcError | None, int, bool]:
        """One emu_start; returns (error, instructions executed, halted on WFI)."""
        inst = self._bound()
        core, uc, clock = inst.core, inst.uc, self._ctx.clock
        self._hit, self._fault_addr, self._extra = None, None, 0
        self._counted = counted
        self._slice_cycles = clock.cycles
        self._slice_t0 = time.perf_counter()
        self._slice_deadline = self._slice_t0 + SLICE_TIMEOUT_US / 1e6
        self._slice_id += 1
        self._stop_pending = False
        self._finish_pending = False
        self._last_access = None
        blocks = inst.blocks
        if blocks is not None:
            blocks.forget()
            self._slice_insns0 = blocks.instructions
        self._in_slice = True
        if not counted:
            WATCHDOG.arm(self._slice_deadline, self, self._slice_id)
        err: UcError | None = None
        if counted != self._tb_counted:
            # Unicorn 2.1.4 instruments translated blocks for `count=` when it translates
            # them: blocks cached by an uncounted run never stop a counted one (emu_start
            # then runs forever), and counted blocks slow uncounted runs down. Switching
            # modes therefore starts from an empty translation cache.
            uc.ctl_flush_tb()
            self._tb_counted = counted
        try:
            if counted:
                uc.emu_start(core.start_address(), UNTIL, count=n)
            else:
                uc.emu_start(core.start_address(), UNTIL)
        except UcError as exc:
            err = exc
        finally:
            with self._mmio_lock:
                self._in_slice = False
            if self._stop_pending and err is None and self._hit is None:
                self._check_replay()
        if blocks is not None:
            blocks.slice_ended(core.pc())
        if self._finish_pending:
            self._finish_pending = False
            if err is None and self._hit is None:
                err = self._finish_access(inst, counted)
                if blocks is not None:
                    blocks.slice_ended(core.pc())
        pc = core.pc()
        if self._ctx.collector is not None:
            self._ctx.collector.slice_ended(pc)  # exact coverage counts: pc has not run
        clean = err is None and self._hit is None
        if blocks is not None:
            executed = blocks.instructions - self._slice_insns0
            if counted and inst.counter.available:
                # only a halt leaves Unicorn's count short of n (see below)
                wfi = clean and inst.counter.read() - 1 < n and core.halted_on_wfi(pc)
            else:
                wfi = clean and core.halted_on_wfi(pc)
            if blocks.undecoded:
                clock.exact = False
        elif counted and inst.counter.available:
            c = inst.counter.read()
            # PC just past a WFI can also be an exception return to there: only a
            # halt leaves the count short of n with the next instruction uncounted
            # (a slice that ran its n reads no code: the common case costs nothing)
            wfi = clean and c - 1 < n and core.halted_on_wfi(pc)
            executed = c if wfi else max(c - 1, 0)
        elif counted:
            wfi = clean and core.halted_on_wfi(pc)
            executed = n if clean and not wfi else 0
            clock.exact = False
        else:
            wfi = clean and core.halted_on_wfi(pc)
            executed = int((time.perf_counter() - self._slice_t0) * NOMINAL_IPS)
            clock.exact = False
        executed += self._extra
        clock.instructions += executed
        clock.cycles += executed
        return err, executed, wfi

    def advance(self, limit: int | None, *, sleep: bool = True) -> Advance:
        """One slice plus its bookkeeping. ``limit``: run at most that many instructions,
        counted (a step); None: an ordinary slice of a run. ``sleep=False``: a slice that
        ends asleep in WFI with nothing to take says so (``Advance.wfi``) and the virtual
        clock stays where the WFI left it (lock-step sleeps by its own rules)."""
        inst = self._bound()
        core, clock = inst.core, self._ctx.clock
        if self._reset_requested:
            self.reset_board()
            self._ctx.events.reset_by_guest("the firmware's reset request (AIRCR.SYSRESETREQ)")
        image = self._ctx.image
        if image is not self._unmask_image and isinstance(core, CortexM):
            core.watch_unmasking(image.segments if image is not None else ())
            self._unmask_image = image
        core.tick(clock.cycles)
        stop = core.deliver()
        if stop is not None:
            return Advance(stop, 0, False)
        deadline = core.deadline()
        counted = bool(self._ctx.options.icount or limit is not None or core.wants_count())
        # a step's slices are no longer than a run's, so a pause ends a long step soon
        n = SLICE_COUNT if limit is None else min(limit, SLICE_COUNT)
        if deadline is not None:
            n = min(n, max(deadline - clock.cycles, 1))
        err, executed, wfi = self._raw_slice(n, counted)
        self._ctx.console.flush()
        stop = self._hit
        if err is not None and stop is None:
            stop = core.on_error(err, self._fault_addr)
            if stop is None and self._hit is not None:
                stop = self._hit
        if stop is not None and stop.reason == StopReason.WATCHPOINT:
            stop, more = self._complete_watched_access(inst, stop)
            executed += more
        idle = asleep = False
        if stop is None:
            core.tick(clock.cycles)
            if wfi and not sleep:
                asleep = not core.deliverable()
            elif wfi and not core.deliverable():
                nxt = core.deadline()
                if nxt is not None and nxt > clock.cycles:
                    clock.cycles = nxt  # sleep until the timer fires
                    core.tick(clock.cycles)
                elif nxt is None:
                    idle = True
            stop = core.deliver()
        return Advance(stop, executed, idle, asleep)

    def _complete_watched_access(self, inst: BoardInstance, stop: StopInfo) -> tuple[StopInfo, int]:
        """Complete the access so PC and memory show its effect, as GDB reports it.
        Unicorn stops either at the accessing instruction (stop.pc, taken in the hook: the
        access has not retired) or, in a counted slice on Cortex-M, right after it
        (already complete: one more instruction would overshoot, e.g. run the exception
        return that follows a store in an interrupt handler). Returns the stop and the
        instructions run to complete it."""
        core, gate = inst.core, self._ctx.gate
        completed, executed = True, 0
        if core.pc() == stop.pc:
            gate.quiet = True
            try:
                err, executed, _ = self._raw_slice(1, True)
            finally:
                gate.quiet = False
            completed = err is None and self._hit is None
        if completed:
            stop = replace(stop, pc=core.pc())
            if stop.watch_access == "read" or stop.watch_value is None:
                addr = stop.watch_address or 0
                try:
                    stop = replace(stop, watch_value=int.from_bytes(inst.uc.mem_read(addr, 4), "little"))
                except UcError:
                    pass
        self._ctx.console.flush()
        return stop, executed


class _SemihostIO:
    """The machine as semihosting sees it (semihosting.SemihostHost)."""

    def __init__(self, ctx: MachineContext, slicer: Slicer, inst: BoardInstance) -> None:
        self._slicer, self._inst = slicer, inst
        self._console = ctx.console
        self._console_name = ctx.board.console

    @property
    def cpu_hz(self) -> int:
        return self._slicer.cpu_hz

    def now_cycles(self) -> int:
        return self._slicer.now_cycles()

    def mem_read(self, address: int, size: int) -> bytes:
        return bytes(self._inst.uc.mem_read(address, size))

    def mem_write(self, address: int, data: bytes) -> None:
        self._inst.uc.mem_write(address, data)

    def console_out(self, data: bytes) -> None:
        self._console.write(data)

    def console_read(self, size: int) -> bytes:
        uart = self._inst.console_uart(self._console_name)
        out = bytearray()
        while uart is not None and len(out) < size:
            b = uart.pop_rx()
            if b is None:
                break
            out.append(b)
        return bytes(out)
