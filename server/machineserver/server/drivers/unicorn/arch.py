"""What the Unicorn machine and its arch cores (Cortex-M, RISC-V) need from each other.

* :class:`Engine` is the part of Unicorn's ``Uc`` this driver uses, typed. Unicorn 2.1.4's
  Python API is only partly annotated, so a core casts the ``Uc`` it creates to it once
  (:meth:`ArchCore.create_uc`); everything else speaks ``Engine``.
* :class:`ArchCore` is what the machine drives: registers, reset, exceptions/traps, timers.
* :class:`CoreHost` is what a core calls back into while it emulates: MMIO accesses, stops,
  semihosting, virtual time. The run loop's :class:`~.slicer.Slicer` implements it.

The cores (``cortexm.py``, ``riscv.py``) import this module and nothing of the machine; the
machine imports the cores. Nothing here imports back.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from unicorn.unicorn import Uc, UcError

from machineserver.server.drivers.base import StopInfo

# A core's or a peripheral's own state as it goes into a snapshot: JSON-able values only.
JsonState = dict[str, Any]

# Unicorn's MMIO callbacks: (uc, offset in the mapped range, size[, value], user data)
MmioReadCallback = Callable[["Engine", int, int, object], int]
MmioWriteCallback = Callable[["Engine", int, int, int, object], None]


class Engine(Protocol):
    """The Unicorn ``Uc`` methods this driver calls (Unicorn 2.1.4), with their types."""

    def mem_map(self, address: int, size: int, perms: int = ...) -> None: ...

    def mem_map_ptr(self, address: int, size: int, perms: int, ptr: int) -> None: ...

    def mmio_map(self, address: int, size: int, read_cb: MmioReadCallback | None, read_ud: object,
                 write_cb: MmioWriteCallback | None, write_ud: object) -> None: ...

    def mem_read(self, address: int, size: int) -> bytearray: ...

    def mem_write(self, address: int, data: bytes) -> None: ...

    def reg_read(self, reg_id: int) -> int: ...

    def reg_write(self, reg_id: int, value: int) -> None: ...

    def hook_add(self, htype: int, callback: Callable[..., object], user_data: object = None,
                 begin: int = 1, end: int = 0) -> int: ...

    def hook_del(self, handle: int) -> None: ...

    def emu_start(self, begin: int, until: int, timeout: int = 0, count: int = 0) -> None: ...

    def emu_stop(self) -> None: ...

    def ctl_flush_tb(self) -> None: ...

    def ctl_remove_cache(self, lbound: int, ubound: int) -> None: ...

    def ctl_set_cpu_model(self, model: int) -> None: ...


def new_engine(arch: int, mode: int) -> Engine:
    """A new ``Uc`` as an :class:`Engine` (``Uc.__new__`` is unannotated in 2.1.4: this is
    the one place its type is asserted)."""
    make: Callable[[int, int], object] = Uc
    return cast(Engine, make(arch, mode))


def native_handle(engine: Engine) -> ctypes.c_void_p | None:
    """The ``uc_engine*`` behind an engine (for the native block counter and the
    instruction counter); None once it has been released."""
    handle = getattr(engine, "_uch", None)
    return handle if isinstance(handle, ctypes.c_void_p) and handle.value else None


def release_engine(engine: Engine) -> None:
    """Free the engine's native memory now, once. Unicorn 2.1.4 closes a ``Uc`` from a
    ``weakref.finalize`` it registers in ``Uc.__init__`` (its ``release_handle`` is a
    static method that finalizer calls: calling it directly would close the handle twice).
    Calling the finalizer runs it at most once, and garbage collection will not run it
    again. The caller guarantees that no thread is inside the engine and that nothing
    uses it afterwards: any later call would touch freed memory."""
    finalizer = getattr(engine, "_Uc__finalizer", None)
    if callable(finalizer):
        finalizer()


class CoreHost(Protocol):
    """What a core needs from the machine while it emulates (implemented by the Slicer)."""

    @property
    def cpu_hz(self) -> int:
        """Core clock: virtual cycles per second."""

    def now_cycles(self) -> int:
        """Virtual time in cycles, exact inside a counted slice."""

    def mmio_read(self, address: int, size: int, read: Callable[[], int]) -> int:
        """Perform a modelled register read at ``address`` (a callback of an ``mmio_map``)."""

    def mmio_write(self, address: int, size: int, value: int, write: Callable[[], None]) -> None:
        """Perform a modelled register write at ``address``."""

    def guard(self, action: Callable[[], object]) -> None:
        """Run a hook's work; an exception stops the machine FAULTED instead of reaching
        Unicorn."""

    def hook_stop(self, info: StopInfo) -> None:
        """End the current slice with this stop (the first one of a slice wins)."""

    def end_slice_here(self) -> None:
        """From a code hook, before its instruction runs: an interrupt is deliverable, end
        the slice here so that it is taken before this instruction (no stop reported)."""

    def semihost(self, op: int, arg: int, pc: int) -> int | None:
        """Run a semihosting call; its result for r0/a0, or None when it stopped the
        machine (exit, bad pointer)."""

    def account_extra(self, instructions: int) -> None:
        """Count instructions a core completed outside Unicorn's counter (e.g. a trap
        instruction it emulated)."""

    def request_reset(self) -> None:
        """The guest asked for a system reset (taken before the next slice)."""


class ArchCore(Protocol):
    """One CPU architecture on Unicorn: what the machine needs from a core."""

    @property
    def register_names(self) -> Sequence[str]:
        """Canonical register names, in the order registers are listed."""

    # ---- engine
    def create_uc(self) -> Engine:
        """A new engine for this CPU (before any memory is mapped)."""

    def attach(self, uc: Engine, host: CoreHost) -> None:
        """Install the core's own MMIO (e.g. the SCS, the CLINT) and interrupt hooks."""

    def reset(self, entry: int | None) -> None:
        """CPU and core peripherals to their reset state; start at ``entry`` when the
        architecture has no reset vector of its own."""

    def pc(self) -> int: ...

    def start_address(self) -> int:
        """Where ``emu_start`` resumes (the pc, with the Thumb bit on Cortex-M)."""

    # ---- registers
    def resolve(self, name: str) -> str | None:
        """The canonical name of a register or alias; None when unknown."""

    def read_reg(self, name: str) -> int: ...

    def write_reg(self, name: str, value: int) -> None: ...

    def save_regs(self) -> dict[str, int]: ...

    def restore_regs(self, regs: dict[str, int]) -> None: ...

    def get_state(self) -> JsonState:
        """The core peripherals' state (NVIC/SCB/SysTick, CLINT) for a snapshot."""

    def set_state(self, state: JsonState) -> None: ...

    # ---- time and interrupts
    def tick(self, now: int) -> None:
        """Advance timers to cycle ``now`` (raising what became pending)."""

    def deadline(self) -> int | None:
        """The cycle at which the next timer event is due; None when none is armed."""

    def wants_count(self) -> bool:
        """True when virtual time matters now (an armed timer): slices must be counted."""

    def deliver(self) -> StopInfo | None:
        """Take the highest pending interrupt that may preempt; a stop when taking it
        is impossible (no vector)."""

    def deliverable(self) -> bool:
        """Whether an interrupt is pending that :meth:`deliver` would take."""

    def set_irq(self, irq: int, level: bool) -> None:
        """A device drives an interrupt line."""

    def halted_on_wfi(self, pc: int) -> bool:
        """Whether emulation returned because the CPU sleeps in WFI just before ``pc``."""

    def on_error(self, err: UcError, address: int | None) -> StopInfo | None:
        """Unicorn ended a slice with an error (fault, invalid instruction): take it as a
        guest exception (None: go on) or stop."""
