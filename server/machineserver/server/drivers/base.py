"""The driver interface: what a simulation backend implements.

A backend is a factory (:class:`Backend`) registered under the entry-point group
``machineserver.drivers``. It creates one :class:`Machine` per session. A machine always
implements the lifecycle part (:class:`Machine`) and composes the small capability
interfaces below that it really supports; :func:`features_of` derives the feature flags
that CapabilitiesService reports from what the machine class inherits, so a flag can
never claim more than the code does.

Drivers speak plain Python (dataclasses, enums, bytes, ints). They never import the API
layer, generated protobuf messages or the core. Every method is ``async``; blocking work
(an emulator's run loop, a subprocess, a socket) runs off the event loop. Events flow
back through :class:`MachineEvents`, whose methods may be called from any thread.

Errors a driver raises: :class:`DriverError` and its subclasses; the core maps them to
gRPC status codes.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

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


@dataclass(frozen=True)
class Counters:
    instructions: int
    virtual_time_ns: int
    # False when the backend estimates rather than counts (e.g. Unicorn or QEMU without
    # icount: exact counting costs speed there)
    exact: bool = True


class WatchKind(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ACCESS = "access"


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


# --------------------------------------------------------------------------- interfaces


class Machine(abc.ABC):
    """The lifecycle every machine implements. A new machine is OFF."""

    @property
    @abc.abstractmethod
    def state(self) -> MachineState: ...

    @abc.abstractmethod
    async def power_on(self) -> None:
        """Allocate the machine and leave it HALTED at its reset state."""

    @abc.abstractmethod
    async def power_off(self) -> None:
        """Free everything the machine holds (memory, processes). Idempotent."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Reset the CPU and peripherals (memory contents of flash kept); HALTED after."""

    @abc.abstractmethod
    async def load(self, image: ProgramImage) -> None:
        """Write the image into memory and set the CPU to start it. HALTED after."""

    @abc.abstractmethod
    def counters(self) -> Counters: ...


class RunControl(abc.ABC):
    @abc.abstractmethod
    async def run(self) -> None:
        """Start or resume execution; returns at once. Stops that happen while running
        (breakpoint, watchpoint, exit, fault) arrive as ``MachineEvents.stopped``; the
        stops that pause() and step() return are not also sent as events."""

    @abc.abstractmethod
    async def pause(self) -> StopInfo:
        """Stop execution and return where it stopped (HALT)."""

    @abc.abstractmethod
    async def step(self, count: int = 1) -> StopInfo:
        """Execute ``count`` instructions (fewer if a breakpoint, exit or fault comes first)."""


class RegisterAccess(abc.ABC):
    @abc.abstractmethod
    def register_names(self) -> Sequence[str]: ...

    @abc.abstractmethod
    async def read_registers(self, names: Sequence[str] | None = None) -> dict[str, int]: ...

    @abc.abstractmethod
    async def write_register(self, name: str, value: int) -> None: ...


class MemoryAccess(abc.ABC):
    @abc.abstractmethod
    async def read_memory(self, address: int, size: int) -> bytes: ...

    @abc.abstractmethod
    async def write_memory(self, address: int, data: bytes) -> None: ...


class Breakpoints(abc.ABC):
    """Breakpoints stay set across reset() and load() until cleared or power_off();
    setting one twice at the same address is a no-op, and so is clearing an unset one."""

    @abc.abstractmethod
    async def set_breakpoint(self, address: int, *, hardware: bool = False) -> None: ...

    @abc.abstractmethod
    async def clear_breakpoint(self, address: int) -> None: ...


class Watchpoints(abc.ABC):
    """Same lifetime rules as breakpoints."""

    @abc.abstractmethod
    async def set_watchpoint(self, address: int, size: int, kind: WatchKind) -> None: ...

    @abc.abstractmethod
    async def clear_watchpoint(self, address: int, size: int, kind: WatchKind) -> None: ...


class ConsoleInput(abc.ABC):
    @abc.abstractmethod
    async def console_input(self, data: bytes) -> None: ...


class Snapshots(abc.ABC):
    @abc.abstractmethod
    async def save_state(self) -> bytes:
        """The whole machine state (CPU, RAM, peripherals) as one self-contained blob.
        The machine must be halted."""

    @abc.abstractmethod
    async def restore_state(self, blob: bytes) -> None:
        """Bring the machine back to a state from :meth:`save_state`. HALTED after."""


class Coverage(abc.ABC):
    @abc.abstractmethod
    async def coverage_start(self) -> None: ...

    @abc.abstractmethod
    async def coverage_stop(self) -> None: ...

    @abc.abstractmethod
    async def coverage_reset(self) -> None: ...

    @abc.abstractmethod
    async def coverage_blocks(self) -> dict[int, tuple[int, int]]:
        """Executed basic blocks: start address -> (size in bytes, execution count;
        count 0 means "executed, count unknown")."""


class HostFootprint:
    """What a machine uses on the host, for session metrics (not a feature flag): the
    processes it runs (e.g. QEMU) or the threads it runs on (an in-process emulator)."""

    def host_process_ids(self) -> Sequence[int]:
        return ()

    def host_thread_ids(self) -> Sequence[int]:
        return ()


class Feature(enum.StrEnum):
    RUN_CONTROL = "run_control"
    REGISTERS = "registers"
    MEMORY = "memory"
    BREAKPOINTS = "breakpoints"
    WATCHPOINTS = "watchpoints"
    CONSOLE_INPUT = "console_input"
    SNAPSHOTS = "snapshots"
    COVERAGE = "coverage"


_FEATURE_INTERFACES: dict[Feature, type] = {
    Feature.RUN_CONTROL: RunControl,
    Feature.REGISTERS: RegisterAccess,
    Feature.MEMORY: MemoryAccess,
    Feature.BREAKPOINTS: Breakpoints,
    Feature.WATCHPOINTS: Watchpoints,
    Feature.CONSOLE_INPUT: ConsoleInput,
    Feature.SNAPSHOTS: Snapshots,
    Feature.COVERAGE: Coverage,
}


def features_of(machine_class: type) -> frozenset[Feature]:
    """The features a machine class really implements: the interfaces it inherits."""
    return frozenset(f for f, iface in _FEATURE_INTERFACES.items() if issubclass(machine_class, iface))


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


class Backend(abc.ABC):
    """A backend factory; the object an entry point in ``machineserver.drivers`` names."""

    name: ClassVar[str]
    description: ClassVar[str]
    machine_class: ClassVar[type[Machine]]

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

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Called at server shutdown after every machine is powered off."""
