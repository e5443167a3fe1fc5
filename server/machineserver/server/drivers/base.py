"""The driver interface: what a simulation backend implements.

A backend is a factory (:class:`Backend`) registered under the entry-point group
``machineserver.drivers``. It creates one :class:`Machine` per session. A machine always
implements the lifecycle (:class:`Machine`) and is made of small parts, one per
capability interface below that it really supports (run control, registers, memory,
breakpoints, watchpoints, console input, snapshots, coverage, host footprint). The
machine class declares them in ``capabilities``; :func:`features_of` derives the feature
flags that CapabilitiesService reports from that declaration, and callers reach a part
through the typed accessor ``machine.capability(Interface)``.

Drivers speak plain Python (dataclasses, enums, bytes, ints): every argument and result
can cross a process boundary. They never import the API layer, generated protobuf
messages or the core. Every method is ``async``; blocking work (an emulator's run loop, a
subprocess, a socket) runs off the event loop. Events flow back through
:class:`MachineEvents`, whose methods may be called from any thread.

The contract (``tests/drivers/test_contract.py`` checks it against every driver):

* only :class:`DriverError` and its subclasses escape a driver method (and
  ``asyncio.CancelledError`` when the caller is cancelled);
* each stop is reported exactly once (see :class:`RunControl`);
* clearing a breakpoint or watchpoint that is not set is a no-op;
* watchpoint sizes are ``WATCH_SIZES`` everywhere;
* registers and memory stay readable after the program exits or faults (where the machine
  outlives its program: a remote target that goes away on exit, e.g. a QEMU whose
  semihosting exit ends it, answers WrongState saying so).
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

# --------------------------------------------------------------------------- errors


class DriverError(Exception):
    """Root of the errors a driver raises.

    DriverError
     +-- BadImage           the program image does not fit the board (INVALID_ARGUMENT)
     +-- BadRequest         a bad argument: unknown register, unmapped address (INVALID_ARGUMENT)
     +-- WrongState         the machine is not in the state the call needs (FAILED_PRECONDITION)
     +-- NotSupported       the backend cannot do this here (UNIMPLEMENTED)
     +-- BackendFailed      the emulator process or library died (UNAVAILABLE)
    """


class BadImage(DriverError):
    pass


class BadRequest(DriverError):
    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class WrongState(DriverError):
    def __init__(self, message: str, *, state: str = "", required: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.required = required


class NotSupported(DriverError):
    pass


class BackendFailed(DriverError):
    pass


# --------------------------------------------------------------------------- boards


class Arch(enum.StrEnum):
    ARM_CORTEX_M = "arm-cortex-m"
    RISCV32 = "riscv32"


@dataclass(frozen=True)
class MemoryRegion:
    """A RAM, flash/ROM or other memory range on the board's bus."""

    name: str
    base: int
    size: int
    kind: str = "ram"  # "ram" | "flash" | "rom"
    writable: bool = True

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, address: int, length: int = 1) -> bool:
        return self.base <= address and address + length <= self.end


@dataclass(frozen=True)
class PeripheralSpec:
    """A memory-mapped peripheral: ``model`` names the behaviour a backend implements
    (e.g. ``uart-pl011``, ``uart-cmsdk``, ``uart-stm32``, ``uart-sifive``, ``systick``,
    ``nvic``, ``clint``)."""

    name: str
    model: str
    base: int
    size: int
    irq: int | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BoardSpec:
    """A board, as data: processor, memory map, peripherals, and the machine name each
    backend uses for it (e.g. ``{"qemu": "lm3s6965evb"}``)."""

    name: str
    description: str
    arch: Arch
    cpu: str  # "cortex-m3", "cortex-m4", "rv32imac", ...
    cpu_mhz: float
    memory: tuple[MemoryRegion, ...]
    peripherals: tuple[PeripheralSpec, ...] = ()
    console: str = ""  # name of the peripheral wired to the session console
    backend_machines: Mapping[str, str] = field(default_factory=dict)
    reset_vector: int | None = None  # RISC-V: reset pc; Cortex-M boots from the vector table
    vector_table: int = 0  # Cortex-M: where the vector table lives at reset

    def region_at(self, address: int, length: int = 1) -> MemoryRegion | None:
        for region in self.memory:
            if region.contains(address, length):
                return region
        return None

    def peripheral(self, name: str) -> PeripheralSpec | None:
        for p in self.peripherals:
            if p.name == name:
                return p
        return None


# --------------------------------------------------------------------------- programs


@dataclass(frozen=True)
class Segment:
    address: int
    data: bytes


@dataclass(frozen=True)
class ProgramImage:
    """A program ready to load: bytes at addresses, and the entry point if known."""

    segments: tuple[Segment, ...]
    entry: int | None = None
    arch: Arch | None = None


# --------------------------------------------------------------------------- run state


class MachineState(enum.StrEnum):
    OFF = "off"
    HALTED = "halted"
    RUNNING = "running"
    EXITED = "exited"  # the firmware ended (semihosting exit); reset or power off to go on
    FAULTED = "faulted"  # an unrecoverable guest fault (lockup); reset or power off
    FAILED = "failed"  # the backend itself died


class StopReason(enum.StrEnum):
    BREAKPOINT = "breakpoint"
    WATCHPOINT = "watchpoint"
    STEP = "step"
    HALT = "halt"  # paused on request
    EXIT = "exit"
    FAULT = "fault"


@dataclass(frozen=True)
class StopInfo:
    reason: StopReason
    pc: int
    exit_code: int | None = None
    fault_address: int | None = None
    message: str = ""
    watch_address: int | None = None
    watch_value: int | None = None
    watch_access: str = ""  # "read" | "write"


# stops a machine comes to by itself (not a step's end, not a halt it was asked for)
SELF_STOPS = frozenset({StopReason.BREAKPOINT, StopReason.WATCHPOINT, StopReason.EXIT, StopReason.FAULT})


def kept_stop(finished: object) -> StopInfo | None:
    """Contract for a long step (or pause) cancelled after the machine had already stopped
    by itself: the driver returns that stop instead of raising CancelledError, so a
    breakpoint hit or an exit code is never lost with the cancellation. ``finished`` is the
    step's own result where it has one; this is the stop to return, or None (raise)."""
    if isinstance(finished, StopInfo) and finished.reason in SELF_STOPS:
        return finished
    return None


@dataclass(frozen=True)
class Counters:
    instructions: int
    virtual_time_ns: int
    # False when the backend does not count instructions (estimates them, or reports 0:
    # e.g. a QEMU without its TCG plugin and without icount)
    exact: bool = True


class WatchKind(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ACCESS = "access"


REMOTE_TARGET = "gdbremote.target"  # MachineOptions.extra: "HOST:PORT" or "unix:/path"
REMOTE_CONSOLE = "gdbremote.console"  # MachineOptions.extra: "", "tcp:HOST:PORT", "unix:/path", "serial:/dev/x"


@dataclass(frozen=True)
class MachineOptions:
    icount: bool = False  # deterministic virtual time where the backend has a choice
    memory_limit_bytes: int = 0  # 0: no limit beyond the board's
    extra: Mapping[str, str] = field(default_factory=dict)


class MachineEvents(Protocol):
    """Where a machine reports what happens. Called from any thread; must not block."""

    def console_output(self, data: bytes) -> None: ...

    def stopped(self, info: StopInfo) -> None: ...

    def failed(self, reason: str) -> None: ...

    def reset_by_guest(self, detail: str) -> None:
        """The firmware reset the machine itself (e.g. Cortex-M AIRCR.SYSRESETREQ) and it
        runs on from its reset vector: not a stop. ``detail`` says how, for people."""
        ...


# --------------------------------------------------------------------------- coverage data

# Executed basic blocks: start address -> (size in bytes, execution count). A count of 0
# means "executed, count unknown" (a first-hit collector). Blocks may overlap (a block
# entered in the middle of another one's range); the number of times the instruction at an
# address ran is the sum of the counts of the blocks whose range holds it.
Blocks = dict[int, tuple[int, int]]
# Control transfers: (address of the last instruction of the block left, start of the
# block entered) -> how many times it was taken (0: taken, count unknown).
Edges = dict[tuple[int, int], int]


def merge_blocks(into: Blocks, other: Mapping[int, tuple[int, int]]) -> Blocks:
    """Add ``other``'s blocks to ``into`` (and return it) so that every address's count
    (see :data:`Blocks`) is the sum of both sides'. Blocks of the same start and size add
    their counts; of the same start and different sizes, the shorter range keeps the start
    with both counts and the rest of the longer one becomes a block of its own where the
    shorter ends (added the same way). A count stays 0 ("unknown") only when both sides
    are unknown."""
    for start, (size, count) in other.items():
        while True:
            old = into.get(start)
            if old is None or old[0] == size or not old[0] or not size:
                into[start] = (size, count) if old is None else (max(old[0], size), old[1] + count)
                break
            (short, _), (long, long_count) = sorted((old, (size, count)))
            into[start] = (short, old[1] + count)
            start, size, count = start + short, long - short, long_count
    return into


def merge_edges(into: Edges, other: Mapping[tuple[int, int], int]) -> Edges:
    """Union into ``into`` (and return it), counts summed."""
    for edge, count in other.items():
        into[edge] = into.get(edge, 0) + count
    return into


def blocks_since(current: Mapping[int, tuple[int, int]], baseline: Mapping[int, tuple[int, int]]) -> Blocks:
    """Blocks executed since ``baseline`` was taken: counts minus the baseline's, only
    those that grew. Unknown counts (0) are kept when the block is new since then. Exact
    when a start has the same size on both sides (the same collector's blocks)."""
    out: Blocks = {}
    for start, (size, count) in current.items():
        before = baseline.get(start)
        if before is None:
            out[start] = (size, count)
        elif count > before[1]:
            out[start] = (size, count - before[1])
    return out


def edges_since(current: Mapping[tuple[int, int], int], baseline: Mapping[tuple[int, int], int]) -> Edges:
    out: Edges = {}
    for edge, count in current.items():
        before = baseline.get(edge)
        if before is None:
            out[edge] = count
        elif count > before:
            out[edge] = count - before
    return out


# --------------------------------------------------------------------------- capabilities


class Feature(enum.StrEnum):
    RUN_CONTROL = "run_control"
    REGISTERS = "registers"
    MEMORY = "memory"
    BREAKPOINTS = "breakpoints"
    WATCHPOINTS = "watchpoints"
    CONSOLE_INPUT = "console_input"
    SNAPSHOTS = "snapshots"
    COVERAGE = "coverage"
    LOCKSTEP = "lockstep"


class Capability(abc.ABC):  # noqa: B024 - a marker base; the interfaces below are abstract
    """One part of a machine. Each interface below is one capability; a backend
    implements each capability it supports as its own small class (its own file), and
    the machine hands the parts out through :meth:`Machine.capability`.

    ``feature`` is the flag CapabilitiesService reports for it (None: not a feature,
    e.g. :class:`HostFootprint`)."""

    feature: ClassVar[Feature | None] = None


C = TypeVar("C", bound=Capability)


class RunControl(Capability):
    """Rules every driver keeps (the driver contract suite checks them):

    * A stop that happens while running (breakpoint, watchpoint, exit, fault) is reported
      exactly once, through ``MachineEvents.stopped``. The stops that :meth:`pause` and
      :meth:`step` return are never also sent as events.
    * :meth:`step` and :meth:`pause` are cancellable: when the awaiting task is cancelled
      the machine stops as soon as it can and is left HALTED (or EXITED/FAULTED when that
      came first), usable, with CancelledError re-raised to the caller.
    """

    feature = Feature.RUN_CONTROL

    @abc.abstractmethod
    async def run(self) -> None:
        """Start or resume execution; returns at once. Needs HALTED."""

    @abc.abstractmethod
    async def pause(self) -> StopInfo:
        """Stop execution and return where it stopped (HALT). On a halted machine, the
        current pc as a HALT."""

    async def stop_reached(self) -> StopInfo | None:
        """The stop an EXITED or FAULTED machine ended at (with its exit code), for a
        caller whose own step was cancelled as the machine got there and so never saw it;
        None on a machine in any other state, or where the driver keeps no such stop."""
        return None

    @abc.abstractmethod
    async def step(self, count: int = 1) -> StopInfo:
        """Execute ``count`` instructions (fewer if a breakpoint, watchpoint, exit or fault
        comes first). Needs HALTED; ``count`` >= 1 (BadRequest otherwise). A large count
        runs as a continue with a count, not as ``count`` single steps."""


class RegisterAccess(Capability):
    """Registers are readable and writable in HALTED, EXITED and FAULTED (never RUNNING:
    WrongState)."""

    feature = Feature.REGISTERS

    @abc.abstractmethod
    def register_names(self) -> Sequence[str]: ...

    @abc.abstractmethod
    async def read_registers(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """Values by the names asked for (aliases allowed); all registers for None.
        Unknown name: BadRequest(field="name")."""

    @abc.abstractmethod
    async def write_register(self, name: str, value: int) -> None: ...


class MemoryAccess(Capability):
    """Memory is readable and writable in HALTED, EXITED and FAULTED; while RUNNING only
    where ``access_while_running`` is True (otherwise WrongState saying so). Unmapped or
    MMIO ranges: BadRequest(field="address")."""

    feature = Feature.MEMORY
    access_while_running: bool = False

    @abc.abstractmethod
    async def read_memory(self, address: int, size: int) -> bytes: ...

    @abc.abstractmethod
    async def write_memory(self, address: int, data: bytes) -> None: ...


class Breakpoints(Capability):
    """Breakpoints stay set across reset() and load() until cleared or power_off(); they
    can be set before power_on() and while running. Setting one twice at the same address
    is a no-op, and so is clearing one that is not set."""

    feature = Feature.BREAKPOINTS

    @abc.abstractmethod
    async def set_breakpoint(self, address: int, *, hardware: bool = False) -> None: ...

    @abc.abstractmethod
    async def clear_breakpoint(self, address: int) -> None: ...


WATCH_SIZES = (1, 2, 4, 8)


class Watchpoints(Capability):
    """Same lifetime rules as breakpoints. Sizes are one of ``WATCH_SIZES`` on every
    backend (BadRequest(field="size") otherwise); the range must lie in the board's
    memory (BadRequest(field="address"))."""

    feature = Feature.WATCHPOINTS

    @abc.abstractmethod
    async def set_watchpoint(self, address: int, size: int, kind: WatchKind) -> None: ...

    @abc.abstractmethod
    async def clear_watchpoint(self, address: int, size: int, kind: WatchKind) -> None: ...


class ConsoleInput(Capability):
    feature = Feature.CONSOLE_INPUT

    @abc.abstractmethod
    async def console_input(self, data: bytes) -> None: ...


class Snapshots(Capability):
    feature = Feature.SNAPSHOTS

    @abc.abstractmethod
    async def save_state(self) -> bytes:
        """The whole machine state (CPU, RAM, peripherals) as one self-contained blob.
        Needs HALTED, EXITED or FAULTED."""

    @abc.abstractmethod
    async def restore_state(self, blob: bytes) -> None:
        """Bring the machine back to a state from :meth:`save_state`. HALTED after. A blob
        that is not one of this backend's, or of another board: BadRequest(field="snapshot")."""


TRACE_TAIL_MAX = 4096  # blocks a coverage hook keeps for the trace tail


class Coverage(Capability):
    """Collection between :meth:`coverage_start` and :meth:`coverage_stop`; reset clears
    what was collected. Counts are exact execution counts where ``exact_counts`` is True."""

    feature = Feature.COVERAGE
    exact_counts: bool = True

    @property
    @abc.abstractmethod
    def method(self) -> str:
        """How blocks are collected (e.g. "tcg-plugin", "native-block-callback")."""

    @abc.abstractmethod
    async def coverage_start(self) -> None: ...

    @abc.abstractmethod
    async def coverage_stop(self) -> None: ...

    @abc.abstractmethod
    async def coverage_reset(self) -> None: ...

    @abc.abstractmethod
    async def coverage_blocks(self) -> Blocks:
        """Executed basic blocks since start/reset (see :data:`Blocks`)."""

    async def coverage_edges(self) -> Edges | None:
        """Control transfers since start/reset (see :data:`Edges`), or None when the
        backend does not see them."""
        return None

    async def coverage_trace(self, count: int) -> list[int] | None:
        """The trace tail: start addresses of the last ``count`` (at most
        :data:`TRACE_TAIL_MAX`) blocks entered while collecting, oldest first (a block entered
        again appears again); None when the backend keeps no trace. Kept by the same hooks
        that count blocks, in a fixed ring, so it costs one store per block entered."""
        return None


@dataclass(frozen=True)
class BarrierInput:
    """What a co-simulation hands one node at a barrier, applied before its next quantum
    runs, in this order: memory ``writes`` (shared-memory updates, doorbell clears), then
    ``irqs`` (external interrupt lines set pending), then ``console`` bytes offered to the
    console UART's receiver (see :meth:`LockStep.advance`)."""

    writes: tuple[Segment, ...] = ()
    irqs: tuple[int, ...] = ()
    console: bytes = b""


@dataclass(frozen=True)
class QuantumResult:
    """What one :meth:`LockStep.advance` did."""

    cycles: int  # the node's virtual cycle counter now (see LockStep)
    stop: StopInfo | None  # stopped before the target (breakpoint, watchpoint, exit, fault)
    console: bytes  # bytes the console UART transmitted during the quantum
    accepted: int  # how many of BarrierInput.console the receiver took
    watched: tuple[bytes, ...]  # the watched ranges' contents at the end, in order
    # ended asleep (WFI) with nothing pending: a hint for tools, not part of the
    # deterministic result (QEMU reads it from its idle check when the deadline fires,
    # which can depend on host timing); nothing in a co-simulation depends on it
    idle: bool = False


class LockStep(Capability):
    """Running in lock-step with other machines (co-simulation), deterministically.

    Virtual cycles: a counter that advances by one per executed instruction and, while
    the CPU sleeps (WFI with nothing pending), by the cycles slept, so that every node of
    a co-simulation can be brought to the same virtual instant. It is exact (counted, never
    estimated) and depends only on the program, the machine's state and the inputs given
    at barriers, never on host timing.

    Between :meth:`begin` and :meth:`end` (or power_off) the machine is driven only by
    :meth:`advance`: console output is returned in :attr:`QuantumResult.console` instead
    of being sent as ``MachineEvents.console_output``, and a stop in a quantum is returned
    in :attr:`QuantumResult.stop`, never sent as an event. Breakpoints, watchpoints,
    registers, memory and snapshots work as usual while halted between quanta."""

    feature = Feature.LOCKSTEP

    @abc.abstractmethod
    async def begin(self, watch: Sequence[tuple[int, int]]) -> int:
        """Enter lock-step. ``watch`` lists (address, size) ranges whose contents each
        :meth:`advance` returns (shared memory, doorbells). Needs HALTED; returns the
        virtual cycle counter now."""

    @abc.abstractmethod
    async def end(self) -> None:
        """Leave lock-step (HALTED, console output as events again). Idempotent."""

    @abc.abstractmethod
    async def advance(self, until_cycles: int, inputs: BarrierInput) -> QuantumResult:
        """Apply ``inputs``, then run until the virtual cycle counter reaches
        ``until_cycles`` exactly, or a stop comes first (then ``cycles`` is the stop's).
        Asleep in WFI, the counter jumps to ``until_cycles`` (an interrupt raised by a
        timer of the machine's own wakes it at the exact cycle). Console bytes: the
        receiver takes at most one byte per call, and only when its receive register is
        empty; ``accepted`` says whether it did. Needs HALTED; HALTED (or EXITED/FAULTED)
        after. Cancellable like :meth:`RunControl.step`."""

    @abc.abstractmethod
    async def checkpoint(self) -> None:
        """Remember the whole machine state and cycle counter now (one checkpoint, kept
        inside the machine; a new one replaces it). Needs HALTED."""

    @abc.abstractmethod
    async def rollback(self) -> None:
        """Go back to the last :meth:`checkpoint` (state and cycle counter). WrongState
        without one."""


class HostFootprint(Capability):
    """What a machine uses on the host, for session metrics (not a feature flag): the
    processes it runs (e.g. QEMU) or the threads it runs on (an in-process emulator)."""

    def host_process_ids(self) -> Sequence[int]:
        return ()

    def host_thread_ids(self) -> Sequence[int]:
        """Native thread ids, in the process :meth:`host_thread_process` names."""
        return ()

    def host_thread_process(self) -> int:
        """The process whose threads :meth:`host_thread_ids` names (this one, unless the
        machine runs in a worker process)."""
        return os.getpid()


class Machine(abc.ABC):
    """The lifecycle every machine implements, plus its parts. A new machine is OFF.

    ``capabilities`` lists the capability interfaces the machine class provides; its
    ``__init__`` hands one part per interface to :meth:`provide`. Callers reach a part
    through :meth:`capability`, typed: ``machine.capability(RunControl).step(1)``."""

    capabilities: ClassVar[tuple[type[Capability], ...]] = ()

    def __init__(self) -> None:
        self._parts: dict[type[Capability], Capability] = {}
        self._lacking: dict[type[Capability], str] = {}

    def provide(self, *parts: Capability) -> None:
        """Register this machine's parts (each must implement a declared capability)."""
        for part in parts:
            declared = [c for c in self.capabilities if isinstance(part, c)]
            if not declared:
                raise TypeError(f"{type(part).__name__} implements none of "
                                f"{type(self).__name__}.capabilities")
            for iface in declared:
                self._parts[iface] = part

    def lack(self, iface: type[Capability], reason: str) -> None:
        """Record that this machine does not have ``iface`` although its class declares it
        (e.g. a remote target that refuses watchpoints), and why: :meth:`capability` then
        raises NotSupported with the reason."""
        self._parts.pop(iface, None)
        self._lacking[iface] = reason

    def lacking(self) -> Mapping[type[Capability], str]:
        """The declared capabilities this machine lacks, with the reasons."""
        return dict(self._lacking)

    def details(self) -> Mapping[str, str]:
        """What the machine found out about itself (e.g. a remote target's abilities), shown
        with its session; empty unless a driver has something to say."""
        return {}

    def capability(self, iface: type[C]) -> C:
        """This machine's part for ``iface``; NotSupported when it has none."""
        part = self._parts.get(iface)
        if part is None:
            if iface in self._lacking:
                raise NotSupported(self._lacking[iface])
            what = iface.feature.value.replace("_", " ") if iface.feature else iface.__name__
            raise NotSupported(f"this backend's machines have no {what}")
        assert isinstance(part, iface)
        return part

    def has(self, iface: type[Capability]) -> bool:
        return iface in self._parts

    @property
    @abc.abstractmethod
    def state(self) -> MachineState: ...

    @abc.abstractmethod
    async def power_on(self) -> None:
        """Allocate the machine and leave it HALTED at its reset state."""

    @abc.abstractmethod
    async def power_off(self) -> None:
        """Free everything the machine holds (memory, processes, threads). Idempotent;
        never raises."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Reset the CPU and peripherals (memory contents of flash kept); HALTED after.
        Also brings an EXITED or FAULTED machine back."""

    @abc.abstractmethod
    async def load(self, image: ProgramImage) -> None:
        """Write the image into memory and set the CPU to start it. HALTED after."""

    @abc.abstractmethod
    def counters(self) -> Counters: ...

    async def current_counters(self) -> Counters:
        """The counters as of now, for a caller that polls a running machine (an
        instruction limit). ``counters()`` may lag where the machine runs elsewhere."""
        return self.counters()


def features_of(machine_class: type[Machine]) -> frozenset[Feature]:
    """The features a machine class really implements: its declared capabilities."""
    return frozenset(c.feature for c in machine_class.capabilities if c.feature is not None)


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class BackendInfo:
    name: str
    description: str
    available: bool
    version: str = ""
    unavailable_reason: str = ""
    features: frozenset[Feature] = frozenset()
    # per-board restrictions: board name -> features that board lacks on this backend,
    # with the reason (e.g. QEMU 7.2 aborts restoring lm3s6965evb snapshots)
    board_limits: Mapping[str, Mapping[Feature, str]] = field(default_factory=dict)
    details: Mapping[str, str] = field(default_factory=dict)
    # features it has only in part, and what is missing (e.g. snapshots without peripherals)
    partial: Mapping[Feature, str] = field(default_factory=dict)
    # why it lacks a feature it does not have at all (shown with UNIMPLEMENTED)
    unsupported: Mapping[Feature, str] = field(default_factory=dict)
    # session options (MachineOptions: "icount", "coverage") it cannot honour, and why: a
    # session asking for one is refused at creation
    refused_options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryFootprint:
    """What one more powered-on, halted machine of a board costs the host in memory:
    ``memory_bytes`` its processes hold for themselves (pages shared by every machine, an
    emulator's code and libraries, are paid once per host), and ``basis``, how that was
    obtained ("measured: ..." or "estimated: ...")."""

    memory_bytes: int
    basis: str


class Backend(abc.ABC):
    """A backend factory; the object an entry point in ``machineserver.drivers`` names."""

    # class attributes in a driver; a wrapper (e.g. one that runs the machines in worker
    # processes) sets them per instance
    name: str
    description: str
    machine_class: type[Machine]
    # whether its machines drive a target named per session, given to create_machine as
    # MachineOptions.extra[REMOTE_TARGET] (and REMOTE_CONSOLE); the core requires one for
    # such a backend and refuses one for the others
    remote_target: bool = False

    @abc.abstractmethod
    def probe(self) -> BackendInfo:
        """Whether the backend can run here, its version and features. Cheap; cached by core."""

    @abc.abstractmethod
    def board_support(self, board: BoardSpec) -> str | None:
        """None when this backend can run ``board``; otherwise the reason it cannot."""

    @abc.abstractmethod
    def create_machine(
        self, board: BoardSpec, options: MachineOptions, events: MachineEvents
    ) -> Machine:
        """A new machine, OFF. Cheap: resources are taken at power_on."""

    def check_snapshot(self, blob: bytes, board: BoardSpec) -> None:  # noqa: B027 - optional hook
        """Whether ``blob`` is a whole, well-formed snapshot of this backend for a machine of
        ``board`` (format, version, board, sizes, field types), so that an import refuses
        what a restore could not take: BadRequest(field="snapshot") naming why. Bounded:
        allocates no more than the blob's size plus one page or segment at a time. Pure;
        may run on any thread. The default checks nothing (restore still refuses)."""

    async def memory_footprint(self, board: BoardSpec) -> MemoryFootprint | None:
        """What one more halted machine of ``board`` costs in memory; None when the backend
        cannot say. May take a moment the first time (a backend may measure it); cached by
        the backend."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Called at server shutdown after every machine is powered off."""
