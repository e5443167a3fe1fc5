"""What the parts of one Unicorn machine share.

:class:`MachineContext` lives as long as the machine: board, options, events, the state,
the lock every use of the engine takes, virtual-time counters, the loaded image, and the
:class:`BoardInstance` while powered on. :class:`BoardInstance` is what ``power_on`` builds
and ``power_off`` frees: the Unicorn engine, the arch core, the UART models and the MMIO
map. Each capability part (``run_control.py``, ``registers.py``, ``memory.py``, ...) gets
the context and reaches the engine through :meth:`MachineContext.locked`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import mmap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from unicorn import unicorn_const as ucc
from unicorn.unicorn import UcError

from machineserver.server.drivers.base import (
    Arch,
    BackendFailed,
    BoardSpec,
    Counters,
    DriverError,
    MachineEvents,
    MachineOptions,
    MachineState,
    PeripheralSpec,
    ProgramImage,
    WrongState,
)
from machineserver.server.drivers.unicorn.arch import ArchCore, CoreHost, Engine, release_engine
from machineserver.server.drivers.unicorn.blockcount import BlockCounter
from machineserver.server.drivers.unicorn.collector import Collector
from machineserver.server.drivers.unicorn.cortexm import CortexM
from machineserver.server.drivers.unicorn.counter import EmuCounter
from machineserver.server.drivers.unicorn.peripherals import UART_MODELS, Uart
from machineserver.server.drivers.unicorn.riscv import RiscV

T = TypeVar("T")
PAGE = 0x1000


def page_span(base: int, size: int) -> tuple[int, int]:
    """The whole pages covering [base, base + size): (start, length)."""
    start = base & ~(PAGE - 1)
    end = (base + size + PAGE - 1) & ~(PAGE - 1)
    return start, end - start


def map_ram(uc: Engine, base: int, size: int) -> memoryview:
    """Map [base, base + size) on memory of ours (a private anonymous mapping: pages the
    guest never touched cost nothing) and return the region's bytes as the guest sees
    them, for code that reads or compares whole regions without copying them out of the
    engine (snapshots). The view keeps the mapping alive; the engine must be released
    before the view is dropped (BoardInstance.release)."""
    start, length = page_span(base, size)
    backing = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    uc.mem_map_ptr(start, length, ucc.UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(backing)))
    return memoryview(backing)[base - start:base - start + size]


@contextlib.contextmanager
def driver_errors(action: str) -> Iterator[None]:
    """Only DriverError leaves the driver: an engine error or a bug becomes BackendFailed
    (UNAVAILABLE) saying what was being done (``action``: "read memory")."""
    try:
        yield
    except DriverError:
        raise
    except UcError as exc:
        raise BackendFailed(f"unicorn failed to {action}: {exc}") from exc
    except Exception as exc:
        raise BackendFailed(f"internal error in the unicorn driver trying to {action}: {exc!r}") from exc


# --------------------------------------------------------------------------- small shared state


@dataclass
class VirtualClock:
    """Instructions and virtual cycles since reset. Cycles = instructions + cycles
    skipped while the CPU sleeps in WFI. ``exact`` stays True while every slice so far
    was counted (see :mod:`.slicer`)."""

    instructions: int = 0
    cycles: int = 0
    exact: bool = True

    def reset(self) -> None:
        self.instructions = self.cycles = 0
        self.exact = True

    def counters(self, cpu_mhz: float) -> Counters:
        return Counters(instructions=self.instructions,
                        virtual_time_ns=int(self.cycles * 1000 / cpu_mhz), exact=self.exact)


@dataclass
class HookGate:
    """When the breakpoint and watchpoint hooks may stop the machine."""

    # True while the run loop completes a watched access itself (no stop from it)
    quiet: bool = False
    # the breakpoint address the machine resumes from: not a stop the first time
    skip_at: int | None = None

    def breakpoint_stops(self, address: int) -> bool:
        if self.quiet:
            return False
        if address == self.skip_at:
            self.skip_at = None
            return False
        return True


class ConsoleOutput:
    """Bytes the guest writes to the console, batched: flushed to ``events`` after every
    slice (or once 4 KiB are waiting), so a chatty guest costs one event per slice. In
    lock-step the flushed bytes go to a sink of the caller's instead (:meth:`divert`)."""

    FLUSH_AT = 4096

    def __init__(self, events: MachineEvents) -> None:
        self._events = events
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._sink: bytearray | None = None

    def divert(self, sink: bytearray | None) -> None:
        """From now on flushed bytes are appended to ``sink`` (None: sent as events again).
        Bytes still waiting go where flushed bytes went until now."""
        self.flush()
        with self._lock:
            self._sink = sink

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            big = len(self._buf) >= self.FLUSH_AT
        if big:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            data, self._buf = bytes(self._buf), bytearray()
            if data and self._sink is not None:
                self._sink += data
                return
        if data:
            self._events.console_output(data)


class HandOffLock:
    """The lock around every use of the engine, fair to debugger calls.

    The run loop holds it for each slice and takes it again at once for the next one.
    ``threading.RLock`` is not fair: a debugger call waiting for it (clearing a breakpoint
    while running) could starve for seconds. So a call announces itself (``_wanted``)
    before it waits, and the run loop, between slices, lets every announced call go first
    (:meth:`worker_turn`). A call made while the machine runs waits on a thread of its
    own, never on the event loop (:meth:`call`)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._wanted = 0  # calls waiting for the lock while the worker runs slices
        self._wanted_guard = threading.Lock()

    @property
    def waiting(self) -> bool:
        """Whether a call waits for the lock (the run loop ends its slice early for it)."""
        return self._wanted > 0

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def worker_turn(self) -> Iterator[None]:
        """The run loop's turn: after every waiting call has had the lock."""
        while self._wanted:
            time.sleep(0.0001)
        with self._lock:
            yield

    def _call_announced(self, fn: Callable[[], T]) -> T:
        with self._wanted_guard:
            self._wanted += 1
        try:
            with self._lock:
                return fn()
        finally:
            with self._wanted_guard:
                self._wanted -= 1

    async def call(self, fn: Callable[[], T], *, off_loop: bool) -> T:
        """``fn()`` under the lock: on a worker thread when ``off_loop`` (the machine
        runs: the lock is busy with slices), inline otherwise (it is free or about to be)."""
        if off_loop:
            return await asyncio.to_thread(self._call_announced, fn)
        return self._call_announced(fn)


# --------------------------------------------------------------------------- the powered board


def make_core(board: BoardSpec) -> ArchCore:
    if board.arch == Arch.ARM_CORTEX_M:
        return CortexM(board)
    return RiscV(board)


class _UartLink:
    """A UART model's view of its machine (peripherals.Host)."""

    def __init__(self, core: ArchCore, host: CoreHost, console: ConsoleOutput | None) -> None:
        self._core, self._host, self._console = core, host, console

    def console_out(self, data: bytes) -> None:
        if self._console is not None:
            self._console.write(data)

    def set_irq(self, irq: int, level: bool) -> None:
        self._core.set_irq(irq, level)

    def now_cycles(self) -> int:
        return self._host.now_cycles()


@dataclass
class BoardInstance:
    """One power-on of a board: the engine, the arch core, the UART models (by
    peripheral name), the MMIO pages (base, length) they are mapped on, and the bytes of
    each of the board's memory regions (``ram``, in ``board.memory`` order: see
    :func:`map_ram`). ``blocks``: the exact instruction counter (a native block hook, see
    :mod:`.blockcount`), None without a C compiler."""

    uc: Engine
    core: ArchCore
    counter: EmuCounter
    blocks: BlockCounter | None = None
    uarts: dict[str, Uart] = field(default_factory=dict)
    mmio: tuple[tuple[int, int], ...] = ()
    ram: tuple[memoryview, ...] = ()

    @classmethod
    def build(cls, board: BoardSpec, host: CoreHost, console: ConsoleOutput) -> BoardInstance:
        """Map the board's memory and peripherals on a new engine (UcError when Unicorn
        refuses the board)."""
        core = make_core(board)
        uc = core.create_uc()
        try:
            ram = tuple(map_ram(uc, region.base, region.size) for region in board.memory)
            uarts: dict[str, Uart] = {}
            mmio: list[tuple[int, int]] = []
            for spec in board.peripherals:
                model_class = UART_MODELS.get(spec.model)
                if model_class is None:
                    continue  # modelled by the core (NVIC, SysTick, CLINT)
                is_console = spec.name == (board.console or spec.name)
                model = model_class(spec, _UartLink(core, host, console if is_console else None))
                uarts[spec.name] = model
                mmio.append(_map_uart(uc, spec, model, host))
            core.attach(uc, host)
            blocks = BlockCounter.attach(uc, thumb=board.arch == Arch.ARM_CORTEX_M)
            return cls(uc, core, EmuCounter(uc), blocks, uarts, tuple(mmio), ram)
        except BaseException:
            release_engine(uc)
            raise

    def console_uart(self, console: str) -> Uart | None:
        return self.uarts.get(console) if console else next(iter(self.uarts.values()), None)

    def reset(self, image: ProgramImage | None) -> None:
        """Flash contents back from the image, CPU and peripherals to reset."""
        if image is not None:
            for seg in image.segments:
                if seg.data:
                    self.uc.mem_write(seg.address, seg.data)
            # mem_write does not invalidate translated blocks: without this, code of the
            # program loaded before (e.g. after an exit, LoadProgram) would run instead
            self.uc.ctl_flush_tb()
        self.core.reset(image.entry if image else None)
        for uart in self.uarts.values():
            uart.reset()
            uart.clear_rx()

    def release(self) -> None:
        """Free the engine (no thread may be inside it: the run loop has been joined)."""
        release_engine(self.uc)


def _map_uart(uc: Engine, spec: PeripheralSpec, model: Uart, host: CoreHost) -> tuple[int, int]:
    base, size = page_span(spec.base, spec.size)
    delta = spec.base - base

    def read(_uc: Engine, offset: int, width: int, _ud: object) -> int:
        return host.mmio_read(base + offset, width, partial(model.read, offset - delta, width))

    def write(_uc: Engine, offset: int, width: int, value: int, _ud: object) -> None:
        host.mmio_write(base + offset, width, value, partial(model.write, offset - delta, width, value))

    uc.mmio_map(base, size, read, None, write, None)
    return base, size


# --------------------------------------------------------------------------- the machine's context


class MachineContext:
    """What every part of one machine shares, for the machine's whole life."""

    def __init__(self, board: BoardSpec, options: MachineOptions, events: MachineEvents) -> None:
        self.board = board
        self.options = options
        self.events = events
        self.state = MachineState.OFF
        self.lock = HandOffLock()
        self.instance: BoardInstance | None = None  # while powered on
        self.image: ProgramImage | None = None  # what reset() loads again
        self.clock = VirtualClock()
        self.gate = HookGate()
        self.console = ConsoleOutput(events)
        self.wake = threading.Event()  # console input for a run loop idle in WFI
        self.halt_request = threading.Event()  # run control asks the running slices to end
        self.collector: Collector | None = None  # coverage table: survives power cycles
        # a worker thread outlived its join (FAILED): it may hold the lock, so nothing
        # waits for the lock until that thread has ended (see run_control)
        self.worker_stuck = False

    def require(self, *states: MachineState) -> None:
        if self.state not in states:
            raise WrongState(
                f"the machine is {self.state.value}; this needs it "
                f"{' or '.join(s.value for s in states)}",
                state=self.state.value, required="|".join(s.value for s in states))

    def require_on(self) -> None:
        if self.state == MachineState.OFF:
            raise WrongState("the machine is off; power it on first", state="off", required="halted")

    def reset_board(self, inst: BoardInstance) -> None:
        """Reset the CPU and peripherals and load the image again (state unchanged)."""
        if self.collector is not None:
            self.collector.forget_last()
        inst.reset(self.image)
        self.clock.reset()

    async def locked(self, action: str, fn: Callable[[BoardInstance], T], *, off_loop: bool = False) -> T:
        """``fn(instance)`` under the lock, with errors as DriverError (``action`` says
        what it does: "read memory"). While the machine runs, or with ``off_loop``, it
        waits for the lock on a worker thread, never on the event loop; while it runs
        that is until the end of the current slice (at most ~10 ms)."""

        def on(inst: BoardInstance | None) -> T:
            if inst is None:  # powered off meanwhile
                raise WrongState("the machine is off; power it on first", state="off", required="halted")
            return fn(inst)

        return await self.locked_any(action, on, off_loop=off_loop)

    async def locked_any(self, action: str, fn: Callable[[BoardInstance | None], T], *,
                         off_loop: bool = False) -> T:
        """Like :meth:`locked`, also while off (``fn`` gets None then)."""
        if self.worker_stuck:
            raise WrongState(f"cannot {action}: the machine failed and its worker thread is still "
                             "inside the emulator", state=self.state.value, required="halted")

        def call() -> T:
            with driver_errors(action):
                return fn(self.instance)

        return await self.lock.call(call, off_loop=off_loop or self.state == MachineState.RUNNING)

    def counters(self) -> Counters:
        return self.clock.counters(self.board.cpu_mhz)
