"""Register access without the Python binding's per-call work, for the hot paths
(Cortex-M exception entry and return, the pc between slices).

Unicorn 2.1.4's ``Uc.reg_read`` looks up the register's value class on every call
(``_select_reg_class``: a generator over the architecture's special ranges), allocates a
ctypes value and raises on a status; an exception entry made ~10 such reads and ~5
writes, its return ~5 and ~10. :class:`RegBatch` keeps the id array, the value array and
its pointers for a fixed list of 32-bit registers and reads or writes them all in one
native ``uc_reg_read_batch`` / ``uc_reg_write_batch`` call, through the binding's own
low-level methods (``_do_reg_read_batch``: same library, same handle; they write the
registers in list order, and a pc among them breaks the translation loop as
``reg_write`` does). An engine without those methods (another binding) gets the plain
per-register calls instead.

A batch's arrays are reused: use one from one thread at a time (under the machine's
lock, as every engine call is) and copy the values out (``read`` returns a new list)
before anything else may use the same batch.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import cast

from unicorn.unicorn import UcError

from machineserver.server.drivers.unicorn.arch import Engine

MASK32 = 0xFFFFFFFF
_Native = Callable[[object, object, object], int]
_engine_error: Callable[[int], UcError] = UcError  # unannotated in 2.1.4


class RegBatch:
    """A fixed list of 32-bit registers of one engine, read or written in one call."""

    def __init__(self, uc: Engine, regs: Sequence[int]) -> None:
        n = len(regs)
        self._uc = uc
        self._regs = tuple(regs)
        self._ids = (ctypes.c_int * n)(*regs)
        self._vals = (ctypes.c_uint64 * n)()  # 32-bit registers: the upper halves stay 0
        base = ctypes.addressof(self._vals)
        size = ctypes.sizeof(ctypes.c_uint64)
        self._ptrs = (ctypes.c_void_p * n)(*(base + size * i for i in range(n)))
        self._count = ctypes.c_int(n)
        self._read = cast(_Native | None, getattr(uc, "_do_reg_read_batch", None))
        self._write = cast(_Native | None, getattr(uc, "_do_reg_write_batch", None))

    def read(self) -> list[int]:
        """The registers' values, in list order (32-bit, unsigned)."""
        if self._read is None:
            return [int(self._uc.reg_read(r)) & MASK32 for r in self._regs]
        status = self._read(self._ids, self._ptrs, self._count)
        if status:
            raise _engine_error(status)
        return [v & MASK32 for v in self._vals]

    def write(self, values: Sequence[int]) -> None:
        """Write the registers, in list order (values masked to 32 bits)."""
        if self._write is None:
            for reg, value in zip(self._regs, values, strict=True):
                self._uc.reg_write(reg, value & MASK32)
            return
        if len(values) != len(self._regs):
            raise ValueError(f"{len(values)} values for {len(self._regs)} registers")
        self._vals[:] = [v & MASK32 for v in values]
        status = self._write(self._ids, self._ptrs, self._count)
        if status:
            raise _engine_error(status)


class RegReader:
    """One 32-bit register at a time, read without the binding's per-call lookup."""

    def __init__(self, uc: Engine) -> None:
        self._uc = uc
        self._val = ctypes.c_uint64()
        self._ref = ctypes.byref(self._val)
        self._read = cast(Callable[[int, object], int] | None, getattr(uc, "_do_reg_read", None))

    def __call__(self, reg: int) -> int:
        if self._read is None:
            return int(self._uc.reg_read(reg)) & MASK32
        status = self._read(reg, self._ref)
        if status:
            raise _engine_error(status)
        return self._val.value & MASK32
