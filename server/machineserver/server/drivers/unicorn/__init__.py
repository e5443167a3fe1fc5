"""The in-process Unicorn backend: Cortex-M3/M4 and RV32 boards with Python peripheral
models (UARTs, NVIC/SCB/SysTick, CLINT).

Where things are:

* ``backend.py``: the factory (probe, board support); ``machine.py``: the lifecycle and
  the table of capability parts, one module each (``run_control.py``, ``registers.py``,
  ``memory.py``, ``breakpoints.py``, ``watchpoints.py``, ``console.py``, ``snapshots.py``,
  ``coverage.py``, ``footprint.py``);
* ``context.py``: what the parts share (state, lock, the powered-on board);
  ``slicer.py``: one emulation slice, virtual time, MMIO access and its replay protection;
  ``watchdog.py``: ends uncounted slices;
* ``arch.py``: the typed seam between the machine and the arch cores: ``cortexm.py``
  (with ``cortexm_scs.py``, the NVIC/SCB/SysTick registers, and ``cortexm_exceptions.py``,
  exception entry/return and faults) and ``riscv.py`` (traps, CLINT);
* ``peripherals.py`` (UART models), ``semihosting.py``, ``snapshot_format.py`` (the
  blob) and ``snapshot_pages.py`` (incremental pages), ``collector.py`` (native block
  counter, ``native/ucblocks.c``), ``counter.py`` (exact instruction counts),
  ``replay.py`` (which address an instruction accesses).
"""

from __future__ import annotations

from machineserver.server.drivers.unicorn.backend import UnicornBackend

__all__ = ["UnicornBackend"]
