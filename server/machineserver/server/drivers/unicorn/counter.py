"""Exact instruction counts from Unicorn 2.1.4 without a Python hook per instruction.

``emu_start(..., count=n)`` makes Unicorn count instructions natively (a C code hook
that increments ``uc_struct.emu_counter``), but the API never says how many ran when
the emulation stopped early (a breakpoint, a watchpoint, a fault, WFI). We read that
field directly: its offset inside ``uc_struct`` is found once per process by
calibration (run ``count=n`` on a ``b .`` loop twice and keep the offset holding
``n + 1`` both times), so a different build is detected instead of misread.

Semantics measured on 2.1.4 (Thumb and RV32): the counter is incremented *before*
an instruction runs. After a stop from a code, memory, MMIO or interrupt hook, or
after ``count`` is exhausted, ``executed = counter - 1`` (the instruction that was
about to run did not complete: its PC is the stop PC). After WFI (the CPU halts,
PC past the WFI) ``executed = counter``.

The limit ``count`` itself is the next field (``uc_struct.emu_count``, checked by the same
calibration): :meth:`EmuCounter.stop_after_current` lowers it to the counter, so the
counting hook of the *next* instruction ends the emulation, exactly after the current
one (the slicer uses that to take an interrupt an MMIO write made deliverable).
"""

from __future__ import annotations

import ctypes
import struct
import threading

from machineserver.server.drivers.unicorn.arch import Engine, native_handle, new_engine

_lock = threading.Lock()
_offset: int | None = None
_calibrated = False
_SCAN = 4096


def _handle(uc: Engine) -> int:
    handle = native_handle(uc)
    return int(handle.value or 0) if handle is not None else 0


def _calibrate() -> int | None:
    from unicorn.arm_const import UC_CPU_ARM_CORTEX_M3
    from unicorn.unicorn_const import UC_ARCH_ARM, UC_MODE_MCLASS, UC_MODE_THUMB

    uc = new_engine(UC_ARCH_ARM, UC_MODE_THUMB | UC_MODE_MCLASS)
    uc.ctl_set_cpu_model(UC_CPU_ARM_CORTEX_M3)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, b"\xfe\xe7")  # b .
    h = _handle(uc)
    found: set[int] | None = None
    for n in (1000, 4321, 77):
        uc.emu_start(1, 0xFFFFFFFF, count=n)
        blob = ctypes.string_at(h, _SCAN)
        # the counter (n + 1), followed by the limit (n)
        offs = {o for o in range(0, _SCAN - 16, 8) if struct.unpack_from("<QQ", blob, o) == (n + 1, n)}
        found = offs if found is None else found & offs
    return min(found) if found else None


def counter_offset() -> int | None:
    global _offset, _calibrated
    with _lock:
        if not _calibrated:
            try:
                _offset = _calibrate()
            except Exception:
                _offset = None
            _calibrated = True
        return _offset


class EmuCounter:
    """Reads the native instruction counter of one Uc."""

    def __init__(self, uc: Engine) -> None:
        off = counter_offset()
        self.available = off is not None
        self._addr = _handle(uc) + off if off is not None else 0

    def read(self) -> int:
        if not self.available:
            return 0
        return int(ctypes.c_uint64.from_address(self._addr).value)

    def stop_after_current(self) -> bool:
        """Inside a counted ``emu_start``, from a hook or MMIO callback of the instruction
        running now: end the emulation right after it (the next instruction's counting
        hook stops it, before that instruction runs). False when the counter is unknown."""
        if not self.available:
            return False
        ctypes.c_uint64.from_address(self._addr + 8).value = self.read()
        return True
