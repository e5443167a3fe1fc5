"""One simulated board on Unicorn: lifecycle, run loop, debug access, snapshots.

Run loop: ``run()`` starts a worker thread that calls ``emu_start`` in slices; the
GIL is released inside Unicorn, so many machines run side by side. Between slices
(and only there, never per instruction) the loop advances timers, delivers
interrupts, flushes console bytes, and checks for a pause request. Slices are at
most ~10 ms of host time, so ``pause()`` returns within about one slice.

Virtual time. Unicorn's ``count=`` makes every instruction call a native counting
hook, which costs ~6x in speed on 2.1.4 (measured: ~1.6 G instr/s without, ~0.24 G
with). So a slice is *counted* (exact) only when something depends on time: a
stepping request, an armed timer (SysTick enabled, CLINT mtimecmp set), or
``MachineOptions.icount``; then the slice ends exactly at the next timer deadline
and SysTick/mtime readings are exact. Otherwise a slice runs uncounted with a 10 ms
timeout, and its instruction count is an *estimate* (host time x a nominal rate),
like QEMU without ``-icount``. ``counters()`` is exact whenever every slice so far
was counted. The number of instructions a counted slice ran before an early stop is
read from Unicorn's own counter (see :mod:`.counter`).

Virtual cycles = instructions + cycles skipped while the CPU sleeps in WFI.

Memory access from the debugger reaches RAM/flash regions only; MMIO pages are
refused (reads have side effects, e.g. popping a UART FIFO). Flash is writable from
the debugger and, as mapped here, from the guest too.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from unicorn import UcError
from unicorn import unicorn_const as ucc

from machineserver.server.drivers.base import (
    Arch,
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
    Segment,
    Snapshots,
    StopInfo,
    StopReason,
    WatchKind,
    Watchpoints,
    WrongState,
)
from machineserver.server.drivers.unicorn import coverage as cov
from machineserver.server.drivers.unicorn.counter import EmuCounter
from machineserver.server.drivers.unicorn.peripherals import UART_MODELS, Uart
from machineserver.server.drivers.unicorn.replay import memory_operand_address
from machineserver.server.drivers.unicorn.semihosting import semihost_call
from machineserver.server.drivers.unicorn.watchdog import WATCHDOG

SLICE_COUNT = 2_000_000  # instructions per counted slice (~8 ms at ~240 M/s)
SLICE_TIMEOUT_US = 10_000  # host time per uncounted slice
NOMINAL_IPS = 1_500_000_000  # estimate for uncounted slices (crc32 on this host: 1.5-1.9 G/s)
UNTIL = 0xFFFFFFFF  # odd: never a PC on Thumb or RISC-V
SNAPSHOT_MAGIC = b"MSUCSNAP"
SNAPSHOT_VERSION = 1
_PAGE = 0x1000


def _page_span(base: int, size: int) -> tuple[int, int]:
    start = base & ~(_PAGE - 1)
    end = (base + size + _PAGE - 1) & ~(_PAGE - 1)
    return start, end - start


class _UartHost:
    def __init__(self, machine: UnicornMachine, is_console: bool) -> None:
        self.m = machine
        self.is_console = is_console

    def console_out(self, data: bytes) -> None:
        if self.is_console:
            self.m.console_out(data)

    def set_irq(self, irq: int, level: bool) -> None:
        if self.m.core is not None:
            self.m.core.set_irq(irq, level)

    def now_cycles(self) -> int:
        return self.m.now_cycles()


class UnicornMachine(
    Machine, RunControl, RegisterAccess, MemoryAccess, Breakpoints, Watchpoints, ConsoleInput,
    Snapshots, Coverage, HostFootprint,
):
    capabilities = (RunControl, RegisterAccess, MemoryAccess, Breakpoints, Watchpoints, ConsoleInput,
                    Snapshots, Coverage, HostFootprint)

    def __init__(self, board: BoardSpec, options: MachineOptions, events: MachineEvents) -> None:
        super().__init__()
        self.provide(self)
        self.board = board
        self.options = options
        self.events = events
        self.cpu_hz = int(board.cpu_mhz * 1_000_000)
        self._state = MachineState.OFF
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._pause_req = threading.Event()
        self._wake = threading.Event()
        self._last_stop: StopInfo | None = None
        self.uc: Any = None
        self.core: Any = None
        self._counter: EmuCounter | None = None
        self._image: ProgramImage | None = None
        self._breakpoints: dict[int, Any] = {}
        self._watchpoints: dict[tuple[int, int, WatchKind], list[Any]] = {}
        self._uarts: dict[str, Uart] = {}
        self._mmio: list[tuple[int, int]] = []
        self._out = bytearray()
        self._out_lock = threading.Lock()
        self.instructions = 0
        self.cycles = 0
        self.exact = True
        # per-slice bookkeeping
        self._in_slice = False
        self._counted = False
        self._slice_cycles = 0
        self._slice_t0 = 0.0
        self._slice_deadline = 0.0
        self._hit: StopInfo | None = None
        self._fault_addr: int | None = None
        self._extra = 0
        self._skip_bp: int | None = None
        self._suppress_debug = False
        self._tb_counted: bool | None = None  # how the cached translated blocks were made
        self._mmio_lock = threading.RLock()
        self._lock_wanted = 0  # calls waiting for _lock while the worker runs slices
        self._wanted_guard = threading.Lock()
        self._slice_id = 0
        self._stop_pending = False
        self._last_access: tuple[tuple[int, int, int | None], Any] | None = None
        self._replay: tuple[tuple[int, int, int | None], Any] | None = None
        self._reset_requested = False
        # coverage (see .coverage): collected between coverage_start and coverage_stop;
        # from power-on with options.extra["coverage"] == "1" (as the QEMU backend)
        self._cov: cov.Collector | None = None
        self._cov_active = options.extra.get("coverage") == "1"
        self._cov_frozen: tuple[cov.Blocks, set[tuple[int, int]]] | None = None
        self._cov_last_insn: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def state(self) -> MachineState:
        return self._state

    def _require(self, *states: MachineState) -> None:
        if self._state not in states:
            raise WrongState(
                f"the machine is {self._state.value}; this needs it "
                f"{' or '.join(s.value for s in states)}",
                state=self._state.value, required="|".join(s.value for s in states))

    def _require_on(self) -> None:
        if self._state == MachineState.OFF:
            raise WrongState("the machine is off; power it on first", state="off",
                             required="halted")

    def guard(self, fn: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        """Run a model/hook function; never let an exception reach Unicorn."""
        try:
            return fn(*args)
        except Exception as exc:
            pc = self.core.pc() if self.core is not None else 0
            self.hook_stop(StopInfo(StopReason.FAULT, pc=pc,
                                    message=f"internal model error: {exc!r}"))
            return default

    def mmio_access(self, address: int, size: int, value: int | None, fn: Callable[..., Any], *args: Any,
                    default: Any = 0) -> Any:
        """Every MMIO callback goes through here. It ends an uncounted slice
        *synchronously* once its time is up (or the watchdog asked), before the access
        has any effect; otherwise it performs the access under ``_mmio_lock``.

        Why: Unicorn 2.1.4 checks a stop request inside the memory helper of an MMIO
        access and then restarts the instruction (PC left at it, register writeback
        undone), so an asynchronous ``emu_stop`` landing during a UART write would
        replay the write and print the byte twice. So slices are never stopped by
        Unicorn's own ``timeout``: the watchdog thread takes ``_mmio_lock`` before it
        calls ``emu_stop``, and an access that finds a stop pending skips its side
        effect and is re-executed, once, in the next slice. A stop that still lands
        between an access and Unicorn's check (the callback has returned, but the C
        helper has not looked yet) is recognised after the slice: the instruction at pc
        is that very access (``_check_replay``), and its re-execution is answered from
        ``_replay`` without a second side effect.
        """
        with self._mmio_lock:
            if self._in_slice and not self._counted and (
                self._stop_pending or time.perf_counter() >= self._slice_deadline
            ):
                self.uc.emu_stop()
                return default
            key = (address, size, value)
            replay, self._replay = self._replay, None
            if replay is not None and replay[0] == key:
                return replay[1]  # the interrupted access again: its effect happened already
            result = self.guard(fn, *args, default=default)
            self._last_access = (key, result)
            return result

    def _check_replay(self) -> None:
        """After a slice the watchdog stopped: if the instruction at pc is the MMIO access
        that ran last, Unicorn stopped inside it and will execute it again."""
        last = self._last_access
        if last is None:
            return
        pc = self.core.pc()
        try:
            code = bytes(self.uc.mem_read(pc, 4))
        except UcError:
            return
        arch = "arm" if self.board.arch == Arch.ARM_CORTEX_M else "riscv"

        def reg(name: str) -> int | None:
            resolved = self.core.resolve(name)
            return None if resolved is None else int(self.core.read_reg(resolved))

        if memory_operand_address(arch, code, pc, reg) == last[0][0]:
            self._replay = last

    def watchdog_stop(self, slice_id: int) -> None:
        """Called by the watchdog thread when a slice's time is up."""
        with self._mmio_lock:
            if self._in_slice and self._slice_id == slice_id and not self._counted:
                self._stop_pending = True
                self.uc.emu_stop()

    def hook_stop(self, info: StopInfo) -> None:
        if self._hit is None:
            self._hit = info
        self.uc.emu_stop()

    def console_out(self, data: bytes) -> None:
        with self._out_lock:
            self._out += data
            big = len(self._out) >= 4096
        if big:
            self._flush_console()

    def _flush_console(self) -> None:
        with self._out_lock:
            data, self._out = bytes(self._out), bytearray()
        if data:
            self.events.console_output(data)

    def now_cycles(self) -> int:
        if not self._in_slice:
            return self.cycles
        if self._counted and self._counter is not None and self._counter.available:
            return self._slice_cycles + max(self._counter.read() - 1, 0)
        return self._slice_cycles + int((time.perf_counter() - self._slice_t0) * NOMINAL_IPS)

    def request_reset(self) -> None:
        self._reset_requested = True

    def account_extra(self, n: int) -> None:
        self._extra += n

    # semihosting host
    def mem_read(self, address: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(address, size))

    def mem_write(self, address: int, data: bytes) -> None:
        self.uc.mem_write(address, data)

    def console_read(self, size: int) -> bytes:
        uart = self._console_uart()
        out = bytearray()
        while uart is not None and len(out) < size:
            b = uart.pop_rx()
            if b is None:
                break
            out.append(b)
        return bytes(out)

    def semihost(self, op: int, arg: int, pc: int) -> int | None:
        try:
            res = semihost_call(self, op, arg)
        except UcError as exc:
            self.hook_stop(StopInfo(StopReason.FAULT, pc=pc, fault_address=arg,
                                    message=f"semihosting call 0x{op:x}: bad pointer ({exc})"))
            return None
        if res.exit_code is not None:
            self.hook_stop(StopInfo(StopReason.EXIT, pc=pc, exit_code=res.exit_code))
            return None
        return res.value

    def _console_uart(self) -> Uart | None:
        return self._uarts.get(self.board.console) if self.board.console else (
            next(iter(self._uarts.values()), None))

    # ------------------------------------------------------------------ lifecycle
    def _make_core(self) -> Any:
        if self.board.arch == Arch.ARM_CORTEX_M:
            from machineserver.server.drivers.unicorn.cortexm import CortexM

            return CortexM(self)
        from machineserver.server.drivers.unicorn.riscv import RiscV

        return RiscV(self)

    def _power_on_sync(self) -> None:
        with self._lock:
            core = self._make_core()
            uc = core.create_uc()
            self.uc, self.core = uc, core
            self._tb_counted = None
            for region in self.board.memory:
                base, size = _page_span(region.base, region.size)
                uc.mem_map(base, size, ucc.UC_PROT_ALL)
            self._uarts, self._mmio = {}, []
            for spec in self.board.peripherals:
                cls = UART_MODELS.get(spec.model)
                if cls is None:
                    continue
                model = cls(spec, _UartHost(self, spec.name == (self.board.console or spec.name)))
                self._uarts[spec.name] = model
                base, size = _page_span(spec.base, spec.size)
                delta = spec.base - base
                self._mmio.append((base, size))
                uc.mmio_map(base, size, self._mmio_reader(model, base, delta), None,
                            self._mmio_writer(model, base, delta), None)
            core.attach(uc)
            uc.hook_add(ucc.UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
            self._counter = EmuCounter(uc)
            for addr in list(self._breakpoints):
                self._breakpoints[addr] = self._add_bp_hook(addr)
            for key in list(self._watchpoints):
                self._watchpoints[key] = self._add_wp_hooks(*key)
            if self._cov_active:
                self._collector().attach(uc)
                uc.ctl_flush_tb()
            self.instructions = self.cycles = 0
            self.exact = True
            core.reset(None)
            self._state = MachineState.HALTED

    def _mmio_reader(self, model: Uart, base: int, delta: int) -> Callable[..., int]:
        def read(uc: Any, offset: int, size: int, _ud: Any) -> int:
            return int(self.mmio_access(base + offset, size, None, model.read, offset - delta, size, default=0))
        return read

    def _mmio_writer(self, model: Uart, base: int, delta: int) -> Callable[..., None]:
        def write(uc: Any, offset: int, size: int, value: int, _ud: Any) -> None:
            self.mmio_access(base + offset, size, value, model.write, offset - delta, size, value, default=None)
        return write

    def _on_unmapped(self, uc: Any, access: int, address: int, size: int, value: int,
                     _ud: Any) -> bool:
        self._fault_addr = address
        return False

    async def power_on(self) -> None:
        if self._state != MachineState.OFF:
            return
        try:
            self._power_on_sync()
        except UcError as exc:
            self._release()
            raise BadRequest(f"cannot build board {self.board.name!r} on Unicorn: {exc}",
                             field="board") from None

    def _release(self) -> None:
        uc, self.uc, self.core, self._counter = self.uc, None, None, None
        self._uarts = {}
        if self._cov is not None:
            self._cov.detach()
        if uc is not None:
            try:
                uc.release_handle()
            except Exception:
                pass
        self._state = MachineState.OFF

    async def power_off(self) -> None:
        if self._state == MachineState.OFF:
            return
        await self._stop_thread()
        with self._lock:
            self._release()

    def _apply_image(self) -> None:
        if self._image is None:
            return
        for seg in self._image.segments:
            if seg.data:
                self.uc.mem_write(seg.address, seg.data)
        # mem_write does not invalidate translated blocks: without this, code of the
        # program loaded before (e.g. after an exit, LoadProgram) would run instead
        self.uc.ctl_flush_tb()

    def _reset_sync(self) -> None:
        with self._lock:
            self._replay = None
            if self._cov is not None:
                self._cov.forget_last()
            self._apply_image()
            self.core.reset(self._image.entry if self._image else None)
            for uart in self._uarts.values():
                uart.reset()
                with uart._rx_lock:
                    uart.rx.clear()
            self.instructions = self.cycles = 0
            self.exact = True
            self._reset_requested = False
            self._state = MachineState.HALTED

    async def reset(self) -> None:
        self._require_on()
        await self._stop_thread()
        self._reset_sync()

    async def load(self, image: ProgramImage) -> None:
        self._require_on()
        if image.arch is not None and image.arch != self.board.arch:
            raise BadImage(f"the image is for {image.arch.value}, the board "
                           f"{self.board.name} is {self.board.arch.value}")
        if not any(seg.data for seg in image.segments):
            raise BadImage("the image has no data to load")
        regions = ", ".join(f"{r.name} 0x{r.base:08x}-0x{r.end - 1:08x}" for r in self.board.memory)
        for seg in image.segments:
            if seg.data and self.board.region_at(seg.address, len(seg.data)) is None:
                raise BadImage(
                    f"segment 0x{seg.address:08x}-0x{seg.address + len(seg.data) - 1:08x} "
                    f"({len(seg.data)} bytes) is outside the memory of board {self.board.name} "
                    f"({regions})")
        await self._stop_thread()
        self._image = image
        self._reset_sync()

    def counters(self) -> Counters:
        return Counters(instructions=self.instructions,
                        virtual_time_ns=int(self.cycles * 1000 / self.board.cpu_mhz), exact=self.exact)

    # ------------------------------------------------------------------ execution
    def _raw_slice(self, n: int, counted: bool) -> tuple[UcError | None, int, bool]:
        """One emu_start; returns (error, instructions executed, halted on WFI)."""
        core, uc = self.core, self.uc
        self._hit, self._fault_addr, self._extra = None, None, 0
        self._counted = counted
        self._slice_cycles = self.cycles
        self._slice_t0 = time.perf_counter()
        self._slice_deadline = self._slice_t0 + SLICE_TIMEOUT_US / 1e6
        self._slice_id += 1
        self._stop_pending = False
        self._last_access = None
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
        pc = core.pc()
        clean = err is None and self._hit is None
        wfi = clean and core.halted_on_wfi(pc)
        if counted and self._counter is not None and self._counter.available:
            c = self._counter.read()
            # PC just past a WFI can also be an exception return to there: only a
            # halt leaves the count short of n with the next instruction uncounted
            wfi = wfi and c - 1 < n
            executed = c if wfi else max(c - 1, 0)
        elif counted:
            executed = n if clean and not wfi else 0
            self.exact = False
        else:
            executed = int((time.perf_counter() - self._slice_t0) * NOMINAL_IPS)
            self.exact = False
        executed += self._extra
        self.instructions += executed
        self.cycles += executed
        return err, executed, wfi

    def _advance(self, limit: int | None) -> tuple[StopInfo | None, int, bool]:
        """One slice plus its bookkeeping: (stop, executed, idle-without-wake-source)."""
        core = self.core
        if self._reset_requested:
            self._reset_sync()
            self._state = MachineState.RUNNING if limit is None else MachineState.HALTED
        core.tick(self.cycles)
        stop = core.deliver()
        if stop is not None:
            return stop, 0, False
        deadline = core.deadline()
        counted = bool(self.options.icount or limit is not None or core.wants_count())
        n = SLICE_COUNT if limit is None else limit
        if deadline is not None:
            n = min(n, max(deadline - self.cycles, 1))
        err, executed, wfi = self._raw_slice(n, counted)
        self._flush_console()
        stop = self._hit
        if err is not None and stop is None:
            stop = core.on_error(err, self._fault_addr)
            if stop is None and self._hit is not None:
                stop = self._hit
        if stop is not None and stop.reason == StopReason.WATCHPOINT:
            # complete the access so PC and memory show its effect, as GDB reports it.
            # Unicorn stops either at the accessing instruction (stop.pc, taken in the
            # hook: the access has not retired) or, in a counted slice on Cortex-M, right
            # after it (already complete: one more instruction would overshoot, e.g. run
            # the exception return that follows a store in an interrupt handler)
            completed = True
            if core.pc() == stop.pc:
                self._suppress_debug = True
                try:
                    e2, ex2, _ = self._raw_slice(1, True)
                    executed += ex2
                finally:
                    self._suppress_debug = False
                completed = e2 is None and self._hit is None
            if completed:
                stop = replace(stop, pc=core.pc())
                if stop.watch_access == "read" or stop.watch_value is None:
                    size = 4
                    addr = stop.watch_address or 0
                    try:
                        stop = replace(stop, watch_value=int.from_bytes(
                            self.uc.mem_read(addr, size), "little"))
                    except UcError:
                        pass
            self._flush_console()
        idle = False
        if stop is None:
            core.tick(self.cycles)
            if wfi and not core.deliverable():
                nxt = core.deadline()
                if nxt is not None and nxt > self.cycles:
                    self.cycles = nxt  # sleep until the timer fires
                    core.tick(self.cycles)
                elif nxt is None:
                    idle = True
            stop = core.deliver()
        return stop, executed, idle

    def _finish(self, stop: StopInfo) -> None:
        if stop.reason == StopReason.EXIT:
            self._state = MachineState.EXITED
        elif stop.reason == StopReason.FAULT:
            self._state = MachineState.FAULTED
        else:
            self._state = MachineState.HALTED
        self._last_stop = stop

    def host_thread_ids(self) -> list[int]:
        """The worker thread's native id while the machine runs (for session metrics)."""
        t = self._thread
        return [t.native_id] if t is not None and t.is_alive() and t.native_id is not None else []

    def _run_thread(self) -> None:
        stop: StopInfo | None = None
        try:
            while stop is None:
                if self._pause_req.is_set():
                    stop = StopInfo(StopReason.HALT, pc=self.core.pc())
                    break
                while self._lock_wanted:  # let a debugger call in between slices: the
                    time.sleep(0.0001)     # lock is not fair, and this loop would starve it
                with self._lock:
                    stop, _, idle = self._advance(None)
                if idle and stop is None:
                    self._wake.wait(0.02)
                    self._wake.clear()
            with self._lock:
                self._flush_console()
                self._finish(stop)
        except Exception as exc:
            self._state = MachineState.FAILED
            self.events.failed(f"unicorn run loop failed: {exc!r}")
            return
        self.events.stopped(stop)

    async def run(self) -> None:
        if self._state == MachineState.RUNNING:
            return
        self._require(MachineState.HALTED)
        await self._stop_thread()
        pc = self.core.pc()
        self._skip_bp = pc if pc in self._breakpoints else None
        self._pause_req.clear()
        self._wake.clear()
        self._state = MachineState.RUNNING
        self._thread = threading.Thread(target=self._run_thread, daemon=True,
                                        name=f"unicorn-{self.board.name}")
        self._thread.start()

    async def _stop_thread(self) -> StopInfo | None:
        t = self._thread
        if t is None:
            return None
        if t.is_alive():
            self._pause_req.set()
            self._wake.set()
            await asyncio.to_thread(t.join, 10.0)
        self._thread = None
        return self._last_stop

    async def pause(self) -> StopInfo:
        self._require_on()
        if self._state == MachineState.RUNNING:
            stop = await self._stop_thread()
            if stop is not None:
                return stop
        return StopInfo(StopReason.HALT, pc=self.core.pc())

    def _step_sync(self, count: int) -> StopInfo:
        with self._lock:
            pc = self.core.pc()
            self._skip_bp = pc if pc in self._breakpoints else None
            remaining = count
            stop: StopInfo | None = None
            stalls = 0
            while remaining > 0 and stop is None:
                stop, executed, idle = self._advance(remaining)
                remaining -= executed
                stalls = stalls + 1 if executed == 0 else 0
                if idle or stalls > 3:
                    break
            self._skip_bp = None
            if stop is None:
                stop = StopInfo(StopReason.STEP, pc=self.core.pc())
            self._finish(stop)
        if stop.reason in (StopReason.EXIT, StopReason.FAULT):
            self.events.stopped(stop)
        return stop

    async def step(self, count: int = 1) -> StopInfo:
        self._require(MachineState.HALTED)
        if count < 1:
            raise BadRequest("count must be at least 1", field="count")
        await self._stop_thread()
        if count <= 64:
            return self._step_sync(count)
        return await asyncio.to_thread(self._step_sync, count)

    # ------------------------------------------------------------------ registers
    def register_names(self) -> Sequence[str]:
        if self.core is not None:
            return self.core.register_names
        if self.board.arch == Arch.ARM_CORTEX_M:
            from machineserver.server.drivers.unicorn.cortexm import REGISTER_NAMES
        else:
            from machineserver.server.drivers.unicorn.riscv import REGISTER_NAMES
        return REGISTER_NAMES

    def _resolve(self, name: str) -> str:
        canon = self.core.resolve(name)
        if canon is None:
            raise BadRequest(f"no register named {name!r} on {self.board.arch.value} "
                             f"(known: {', '.join(self.core.register_names)})", field="name")
        return canon

    async def read_registers(self, names: Sequence[str] | None = None) -> dict[str, int]:
        self._require_on()
        wanted = list(names) if names else list(self.core.register_names)
        canon = [self._resolve(n) for n in wanted]
        pairs = list(zip(wanted, canon, strict=True))
        return await self._locked(lambda: {w: self.core.read_reg(c) for w, c in pairs})

    async def write_register(self, name: str, value: int) -> None:
        self._require_on()
        canon = self._resolve(name)
        await self._locked(self.core.write_reg, canon, value)
        if self._cov is not None and canon == self.core.resolve("pc"):
            await self._locked(self._cov.forget_last)

    async def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        def call() -> Any:
            with self._wanted_guard:
                self._lock_wanted += 1
            try:
                with self._lock:
                    return fn(*args)
            finally:
                with self._wanted_guard:
                    self._lock_wanted -= 1
        if self._state == MachineState.RUNNING:
            return await asyncio.to_thread(call)
        return call()

    # ------------------------------------------------------------------ memory
    def _check_range(self, address: int, size: int) -> None:
        if size < 0 or address < 0 or address + size > 1 << 32:
            raise BadRequest(f"address range 0x{address:x}+{size} is outside 32 bits",
                             field="address")
        if size and self.board.region_at(address, size) is None:
            for base, length in self._mmio:
                if address < base + length and address + size > base:
                    raise BadRequest(f"0x{address:08x}..0x{address + size - 1:08x} is MMIO; "
                                     "peripheral registers are not accessible from the debugger",
                                     field="address")
            raise BadRequest(f"0x{address:08x}..0x{address + size - 1:08x} is not in a memory "
                             f"region of board {self.board.name}", field="address")

    async def read_memory(self, address: int, size: int) -> bytes:
        self._require_on()
        self._check_range(address, size)
        if not size:
            return b""
        return bytes(await self._locked(self.uc.mem_read, address, size))

    async def write_memory(self, address: int, data: bytes) -> None:
        self._require_on()
        self._check_range(address, len(data))
        if data:
            await self._locked(self._write_mem_sync, address, bytes(data))

    def _write_mem_sync(self, address: int, data: bytes) -> None:
        self.uc.mem_write(address, data)
        self.uc.ctl_remove_cache(address, address + len(data))

    # ------------------------------------------------------------------ breakpoints
    def _on_bp(self, uc: Any, address: int, size: int, _ud: Any) -> None:
        if self._suppress_debug:
            return
        if address == self._skip_bp:
            self._skip_bp = None
            return
        self.hook_stop(StopInfo(StopReason.BREAKPOINT, pc=address))

    def _add_bp_hook(self, addr: int) -> Any:
        h = self.uc.hook_add(ucc.UC_HOOK_CODE, self._on_bp, None, addr, addr)
        self.uc.ctl_remove_cache(addr, addr + 4)
        return h

    async def set_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        addr = address & ~1 & 0xFFFFFFFF
        if addr in self._breakpoints:
            return
        if self.uc is None:
            self._breakpoints[addr] = None
            return
        def add() -> None:
            self._breakpoints[addr] = self._add_bp_hook(addr)
        await self._locked(add)

    async def clear_breakpoint(self, address: int) -> None:
        addr = address & ~1 & 0xFFFFFFFF
        if addr not in self._breakpoints:
            raise BadRequest(f"no breakpoint at 0x{addr:08x}", field="address")
        def remove() -> None:
            h = self._breakpoints.pop(addr)
            if h is not None and self.uc is not None:
                self.uc.hook_del(h)
                self.uc.ctl_remove_cache(addr, addr + 4)
        await self._locked(remove)

    # ------------------------------------------------------------------ watchpoints
    def _wp_callback(self, address: int, size: int, access: str) -> Callable[..., None]:
        def cb(uc: Any, kind: int, a: int, s: int, value: int, _ud: Any) -> None:
            if self._suppress_debug or not (a < address + size and a + s > address):
                return
            self.hook_stop(StopInfo(StopReason.WATCHPOINT, pc=self.core.pc(), watch_address=a,
                                    watch_value=value if access == "write" else None,
                                    watch_access=access))
        return cb

    def _add_wp_hooks(self, address: int, size: int, kind: WatchKind) -> list[Any]:
        hooks = []
        lo, hi = max(address - 7, 0), address + size - 1
        if kind in (WatchKind.READ, WatchKind.ACCESS):
            hooks.append(self.uc.hook_add(ucc.UC_HOOK_MEM_READ,
                                          self._wp_callback(address, size, "read"), None, lo, hi))
        if kind in (WatchKind.WRITE, WatchKind.ACCESS):
            hooks.append(self.uc.hook_add(ucc.UC_HOOK_MEM_WRITE,
                                          self._wp_callback(address, size, "write"), None, lo, hi))
        self.uc.ctl_flush_tb()
        return hooks

    async def set_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        if size < 1:
            raise BadRequest("size must be at least 1", field="size")
        if self.board.region_at(address, size) is None:
            raise BadRequest(f"0x{address:08x}+{size} is not in a memory region", field="address")
        key = (address, size, WatchKind(kind))
        if key in self._watchpoints:
            return
        if self.uc is None:
            self._watchpoints[key] = []
            return
        def add() -> None:
            self._watchpoints[key] = self._add_wp_hooks(*key)
        await self._locked(add)

    async def clear_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        key = (address, size, WatchKind(kind))
        if key not in self._watchpoints:
            raise BadRequest(f"no {kind} watchpoint at 0x{address:08x}+{size}", field="address")
        def remove() -> None:
            for h in self._watchpoints.pop(key):
                if self.uc is not None:
                    self.uc.hook_del(h)
            if self.uc is not None:
                self.uc.ctl_flush_tb()
        await self._locked(remove)

    # ------------------------------------------------------------------ console
    async def console_input(self, data: bytes) -> None:
        self._require_on()
        uart = self._console_uart()
        if uart is None:
            raise BadRequest(f"board {self.board.name} has no console UART", field="data")
        uart.feed(bytes(data))
        self._wake.set()

    # ------------------------------------------------------------------ snapshots
    def _save_sync(self) -> bytes:
        with self._lock:
            regions = [(r.name, r.base, r.size) for r in self.board.memory]
            image = self._image
            header = {
                "version": SNAPSHOT_VERSION,
                "board": self.board.name,
                "arch": self.board.arch.value,
                "regs": self.core.save_regs(),
                "core": self.core.get_state(),
                "uarts": {name: u.get_state() for name, u in self._uarts.items()},
                "instructions": self.instructions,
                "cycles": self.cycles,
                "exact": self.exact,
                "regions": regions,
                "image": None if image is None else {
                    "entry": image.entry,
                    "arch": image.arch.value if image.arch else None,
                    "segments": [[s.address, len(s.data)] for s in image.segments],
                },
            }
            parts = [bytes(self.uc.mem_read(base, size)) for _, base, size in regions]
            if image is not None:
                parts += [s.data for s in image.segments]
        hjson = json.dumps(header, separators=(",", ":")).encode()
        payload = struct.pack("<I", len(hjson)) + hjson + b"".join(parts)
        return SNAPSHOT_MAGIC + struct.pack("<H", SNAPSHOT_VERSION) + zlib.compress(payload, 1)

    async def save_state(self) -> bytes:
        self._require(MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED)
        return await asyncio.to_thread(self._save_sync)

    def _restore_sync(self, blob: bytes) -> None:
        self._replay = None
        if not blob.startswith(SNAPSHOT_MAGIC) or len(blob) < len(SNAPSHOT_MAGIC) + 2:
            raise BadRequest("not a Unicorn machine snapshot", field="snapshot")
        (version,) = struct.unpack_from("<H", blob, len(SNAPSHOT_MAGIC))
        if version != SNAPSHOT_VERSION:
            raise BadRequest(f"snapshot format version {version} is not supported "
                             f"(this server reads {SNAPSHOT_VERSION})", field="snapshot")
        try:
            payload = zlib.decompress(blob[len(SNAPSHOT_MAGIC) + 2:])
            (hlen,) = struct.unpack_from("<I", payload, 0)
            header = json.loads(payload[4:4 + hlen])
        except (zlib.error, struct.error, ValueError) as exc:
            raise BadRequest(f"corrupt snapshot: {exc}", field="snapshot") from None
        if header["board"] != self.board.name or header["arch"] != self.board.arch.value:
            raise BadRequest(f"the snapshot is of board {header['board']} "
                             f"({header['arch']}), this machine is {self.board.name}",
                             field="snapshot")
        regions = [tuple(r) for r in header["regions"]]
        if regions != [(r.name, r.base, r.size) for r in self.board.memory]:
            raise BadRequest("the snapshot's memory map differs from the board's", field="snapshot")
        pos = 4 + hlen
        with self._lock:
            if self._cov is not None:
                self._cov.forget_last()  # collected coverage is kept: not part of snapshots
            for _, base, size in regions:
                self.uc.mem_write(base, payload[pos:pos + size])
                pos += size
            self.uc.ctl_flush_tb()
            img = header["image"]
            if img is None:
                self._image = None
            else:
                segs = []
                for addr, length in img["segments"]:
                    segs.append(Segment(addr, payload[pos:pos + length]))
                    pos += length
                self._image = ProgramImage(tuple(segs), img["entry"],
                                           Arch(img["arch"]) if img["arch"] else None)
            self.core.set_state(header["core"])
            self.core.restore_regs({k: int(v) for k, v in header["regs"].items()})
            for name, st in header["uarts"].items():
                if name in self._uarts:
                    self._uarts[name].set_state(st)
            self.instructions = int(header["instructions"])
            self.cycles = int(header["cycles"])
            self.exact = bool(header["exact"])
            self._state = MachineState.HALTED

    async def restore_state(self, blob: bytes) -> None:
        self._require_on()
        await self._stop_thread()
        await asyncio.to_thread(self._restore_sync, bytes(blob))

    # ------------------------------------------------------------------ coverage
    def _collector(self) -> cov.Collector:
        if self._cov is None:
            first_hit = self.options.extra.get("coverage_mode") == "first-hit"
            self._cov = cov.Collector(first_hit=first_hit)
        return self._cov

    @property
    def coverage_method(self) -> str:
        return self._collector().method

    @property
    def method(self) -> str:
        return self._collector().method

    def _cov_read(self, addr: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(addr, size))

    def _cov_snapshot(self) -> tuple[cov.Blocks, set[tuple[int, int]]]:
        c = self._collector()
        blocks = c.blocks()
        read = self._cov_read if self.uc is not None else None
        edges = cov.edges_by_branch(c.raw_edges(), blocks, read,
                                    self.board.arch == Arch.ARM_CORTEX_M, self._cov_last_insn)
        return blocks, edges

    def _cov_start_sync(self) -> None:
        with self._lock:
            c = self._collector()
            c.clear()
            self._cov_last_insn.clear()
            if self.uc is not None and not c.attached:
                c.attach(self.uc)
                self.uc.ctl_flush_tb()
            elif self.uc is not None and not c.counting:
                self.uc.ctl_flush_tb()  # first-hit: what runs next must be translated again
            self._cov_active = True
            self._cov_frozen = None

    def _cov_stop_sync(self) -> None:
        with self._lock:
            if self._cov_frozen is None:
                self._cov_frozen = self._cov_snapshot() if self._cov_active else ({}, set())
            self._cov_active = False
            if self._cov is not None and self._cov.attached:
                self._cov.detach()
                if self.uc is not None:
                    self.uc.ctl_flush_tb()  # blocks translated with the hook keep calling it

    def _cov_reset_sync(self) -> None:
        with self._lock:
            self._collector().clear()
            self._cov_last_insn.clear()
            if self._cov_active and self.uc is not None and not self._collector().counting:
                self.uc.ctl_flush_tb()
            if self._cov_frozen is not None:
                self._cov_frozen = ({}, set())

    async def coverage_start(self) -> None:
        await self._locked(self._cov_start_sync)

    async def coverage_stop(self) -> None:
        await self._locked(self._cov_stop_sync)

    async def coverage_reset(self) -> None:
        await self._locked(self._cov_reset_sync)

    async def coverage_blocks(self) -> dict[int, tuple[int, int]]:
        """Executed translated blocks since coverage_start/reset (see .coverage): exact
        execution counts with the native counter, 0 (executed) in first-hit mode."""
        if self._cov_frozen is not None:
            return dict(self._cov_frozen[0])
        if not self._cov_active:
            return {}
        blocks, _ = await self._locked(self._cov_snapshot)
        return {a: v for a, v in blocks.items() if v[1] > 0 or not self._collector().counting}

    async def coverage_edges(self) -> dict[tuple[int, int], int]:
        """Control transfers seen since coverage_start/reset: (address of the last
        instruction of the block left, start of the block entered). Every distinct
        transfer with the native counter; only the first way into each block in
        first-hit mode."""
        if self._cov_frozen is not None:
            return dict.fromkeys(self._cov_frozen[1], 0)
        if not self._cov_active:
            return {}
        _, edges = await self._locked(self._cov_snapshot)
        return dict.fromkeys(edges, 0)
