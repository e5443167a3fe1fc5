"""Exact instruction counts in every slice: a native block callback (``ucbc_hook`` in
``native/ucblocks.c``) on every engine, always on.

Each entry into a translated block adds the block's instruction count, decoded once per
block from guest code (Thumb: a halfword whose top five bits are 0b11101, 0b11110 or
0b11111 starts a 32-bit instruction; RISC-V: low two bits 0b11 is 32-bit, else 16-bit)
and cached; after every ``emu_start`` the slicer calls :meth:`BlockCounter.slice_ended`
with the pc the machine stopped at, which has not run: when that pc lies inside the block
entered last, the instructions from pc to the block's end are taken back. So a stop in
the middle of a block (a breakpoint, a watchpoint, a fault, an MMIO access restarted,
a count limit) counts only the instructions before it.

That needs every stop to be synchronous: a stop requested from another thread between a
block's hook and the block's own exit check could not be told apart from a block that
ran and looped back to itself. So the slice watchdog does not call ``emu_stop`` on a
machine with a block counter: it sets a flag (:meth:`BlockCounter.want_stop`) and the
next block entry's hook stops the engine itself, before that block runs anything.

Instructions are counted as QEMU counts them: an instruction an IT block skips counts
(Unicorn's own ``count=`` counter, a code hook, does not see it: see :mod:`.counter`).

When coverage collects in counting mode, its table rides on this hook (one block hook
for both, :meth:`BlockCounter.set_coverage`).

Cost: see scripts/bench's ``counts`` section (raw Unicorn with no hook vs this hook, a
tight CRC loop and a UART-polling loop, in the same run).

Without a C compiler there is no block counter; the slicer then estimates uncounted
slices from host time as before, and ``counters().exact`` says so.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from typing import Any

from unicorn import unicorn_const as ucc

from machineserver.server.drivers.unicorn.arch import Engine, native_handle
from machineserver.server.drivers.unicorn.collector import add_native_hook, native_status

_lock = threading.Lock()


@functools.cache
def _functions() -> Any:
    """The count functions of the native library (declared once), None without it."""
    lib = native_status().lib
    if lib is None:
        return None
    vp, u64, u32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32
    for name, res, args in (
        ("ucbc_new", vp, [u32, vp, vp]), ("ucbc_free", None, [vp]),
        ("ucbc_stop", None, [vp, vp, u64]), ("ucbc_want_stop", None, [vp]),
        ("ucbc_forget", None, [vp]), ("ucbc_insns", u64, [vp]), ("ucbc_undecoded", u32, [vp]),
        ("ucbc_set_coverage", None, [vp, vp, u32]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _count_lib() -> Any:
    with _lock:
        return _functions()


class BlockCounter:
    """The instruction counter of one engine (made with the engine, at power-on)."""

    def __init__(self, uc: Engine, lib: Any, thumb: bool) -> None:
        from unicorn.unicorn_py3.unicorn import uclib

        self._lib = lib
        self._uc = uc
        mem_read = ctypes.cast(uclib.uc_mem_read, ctypes.c_void_p).value
        emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        self._c = lib.ucbc_new(1 if thumb else 0, mem_read, emu_stop)
        if not self._c:
            raise MemoryError("ucbc counter")
        weakref.finalize(self, lib.ucbc_free, self._c)
        address = ctypes.cast(lib.ucbc_hook, ctypes.c_void_p).value
        assert address is not None  # a symbol of a loaded library
        add_native_hook(uc, ucc.UC_HOOK_BLOCK, address, self._c)

    @classmethod
    def attach(cls, uc: Engine, thumb: bool) -> BlockCounter | None:
        """A counter on ``uc`` (before anything is translated), or None when the native
        library is not available (no C compiler)."""
        lib = _count_lib()
        return None if lib is None else cls(uc, lib, thumb)

    @property
    def instructions(self) -> int:
        """Instructions executed on this engine so far (exact after :meth:`slice_ended`;
        inside a slice, the blocks entered so far in full)."""
        return int(self._lib.ucbc_insns(self._c))

    @property
    def undecoded(self) -> int:
        """Blocks whose code could not be read (counted as size / 2: inexact)."""
        return int(self._lib.ucbc_undecoded(self._c))

    def slice_ended(self, pc: int) -> None:
        """An ``emu_start`` returned with the machine at ``pc`` (not executed)."""
        handle = native_handle(self._uc)
        self._lib.ucbc_stop(self._c, handle, pc)

    def want_stop(self) -> None:
        """From any thread: the next block entry stops the engine before it runs."""
        self._lib.ucbc_want_stop(self._c)

    def forget(self) -> None:
        """Before a slice: no block entered yet, no stop wanted."""
        self._lib.ucbc_forget(self._c)

    def set_coverage(self, table: int | None, traced: bool) -> None:
        """Feed coverage ``table`` (a ucb_table_t*, None: stop feeding) from this hook."""
        self._lib.ucbc_set_coverage(self._c, table, 1 if traced else 0)
