"""The in-process Unicorn backend: Cortex-M3/M4 and RV32 boards with Python peripheral
models (UARTs, NVIC/SCB/SysTick, CLINT). See :mod:`.machine` for the run loop and
virtual time, :mod:`.cortexm` and :mod:`.riscv` for exceptions and traps."""

from __future__ import annotations

from machineserver.server.drivers.unicorn.backend import UnicornBackend

__all__ = ["UnicornBackend"]
