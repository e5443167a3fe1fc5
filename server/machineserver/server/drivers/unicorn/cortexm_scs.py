"""The Cortex-M System Control Space at 0xE000E000 as a Python model: the NVIC (enable,
pending, active, priority registers), the SCB (CPUID, ICSR, VTOR, AIRCR, SCR, CCR, SHPR,
SHCSR, fault status and address registers, CPACR, FPU context registers) and SysTick,
which counts virtual cycles. Exception *behaviour* (entry, return, preemption) is in
:mod:`.cortexm_exceptions`; this is the register file it reads and writes.

State is plain ints (``get_state``/``set_state`` for snapshots).
"""

from __future__ import annotations

from typing import Protocol

from machineserver.server.drivers.base import BoardSpec
from machineserver.server.drivers.unicorn.arch import CoreHost, JsonState

NMI, HARDFAULT, MEMMANAGE, BUSFAULT, USAGEFAULT = 2, 3, 4, 5, 6
SVCALL, DEBUGMON, PENDSV, SYSTICK = 11, 12, 14, 15
SCS_BASE, SCS_SIZE = 0xE000E000, 0x1000
CPUID = {"cortex-m3": 0x412FC231, "cortex-m4": 0x410FC241, "cortex-m4f": 0x410FC241}


class ScsCpu(Protocol):
    """What ICSR shows of the CPU."""

    def ipsr(self) -> int:
        """The active exception number (0 in Thread mode)."""

    def best_pending(self) -> int | None:
        """The pending exception that would be taken next."""


_SCS_FIELDS = ("enabled", "pending", "active", "levels", "vtor", "prigroup", "scr", "ccr",
               "shcsr", "cfsr", "hfsr", "dfsr", "mmfar", "bfar", "cpacr", "fpccr", "fpcar",
               "fpdscr", "st_csr", "st_rvr", "st_cvr", "st_flag", "st_next")


class Scs:
    """NVIC + SCB + SysTick registers at 0xE000E000 (offsets relative to it)."""

    host: CoreHost  # set by connect
    cpu: ScsCpu  # set by connect

    def __init__(self, board: BoardSpec, num_irq: int, prio_bits: int) -> None:
        self.board = board
        self.num_irq = num_irq
        self.prio_mask = (0xFF << (8 - prio_bits)) & 0xFF
        self.reset()

    def connect(self, host: CoreHost, cpu: ScsCpu) -> None:
        """Virtual time and reset requests from ``host``; ICSR's view of the CPU from
        ``cpu`` (attach, before the guest runs)."""
        self.host, self.cpu = host, cpu

    def reset(self) -> None:
        self.enabled = 0  # bit n = IRQ n
        self.pending = 0  # bit e = exception e (IRQ n is bit 16+n)
        self.active = 0
        self.levels = 0  # interrupt lines held high by devices (bit 16+n)
        self.prio = bytearray(16 + self.num_irq)
        self.vtor = self.board.vector_table & 0xFFFFFF80
        self.prigroup = 0
        self.scr, self.ccr, self.shcsr = 0, 0x200, 0
        self.cfsr = self.hfsr = self.dfsr = self.mmfar = self.bfar = 0
        self.cpacr, self.fpccr, self.fpcar, self.fpdscr = 0, 0xC0000000, 0, 0
        self.st_csr, self.st_rvr, self.st_cvr, self.st_flag = 0, 0, 0, 0
        self.st_next: int | None = None  # cycle at which the counter next reaches 0

    # ---- state for snapshots
    def get_state(self) -> JsonState:
        d = {k: getattr(self, k) for k in _SCS_FIELDS}
        d["prio"] = bytes(self.prio).hex()
        return d

    def set_state(self, d: JsonState) -> None:
        for k in _SCS_FIELDS:
            setattr(self, k, d[k])
        self.prio = bytearray(bytes.fromhex(d["prio"]))

    # ---- SysTick (counts processor cycles = virtual time)
    def _st_period(self) -> int:
        return self.st_rvr + 1

    def _st_catch_up(self, now: int) -> bool:
        """Account for every wrap up to ``now``; True if the counter wrapped."""
        if self.st_next is None or now < self.st_next:
            return False
        if self.st_rvr == 0:
            self.st_next = None
        else:
            n = (now - self.st_next) // self._st_period() + 1
            self.st_next += n * self._st_period()
        self.st_flag = 1
        return True

    def st_cvr_now(self, now: int) -> int:
        if self.st_next is None:
            return self.st_cvr
        self._st_catch_up(now)
        if self.st_next is None:
            return 0
        rem = self.st_next - now
        return 0 if rem >= self._st_period() else rem

    def systick_wants_count(self) -> bool:
        return bool(self.st_csr & 1)

    def deadline(self) -> int | None:
        return self.st_next if (self.st_csr & 3) == 3 else None

    def tick(self, now: int) -> None:
        if self.st_csr & 1 and self._st_catch_up(now) and self.st_csr & 2:
            self.pending |= 1 << SYSTICK

    # ---- helpers
    def set_level(self, irq: int, level: bool) -> None:
        bit = 1 << (16 + irq)
        if level:
            self.levels |= bit
        else:
            self.levels &= ~bit

    def _irq_bits(self, field: int, index: int) -> int:
        return (field >> (16 + 32 * index)) & 0xFFFFFFFF

    def icsr(self) -> int:
        v = self.cpu.ipsr()
        best = self.cpu.best_pending()
        if best is not None:
            v |= (best & 0x1FF) << 12
        if self.pending >> 16:
            v |= 1 << 22
        if self.pending & (1 << SYSTICK):
            v |= 1 << 26
        if self.pending & (1 << PENDSV):
            v |= 1 << 28
        if self.pending & (1 << NMI):
            v |= 1 << 31
        if bin(self.active).count("1") <= 1:
            v |= 1 << 11
        return v

    # ---- MMIO
    def read(self, offset: int, size: int) -> int:
        if 0x400 <= offset < 0x400 + self.num_irq or 0xD18 <= offset < 0xD24:
            base = 16 if offset < 0xD00 else 4
            start = offset - (0x400 if offset < 0xD00 else 0xD18) + base
            v = 0
            for i in range(size):
                if start + i < len(self.prio):
                    v |= self.prio[start + i] << (8 * i)
            return v
        word = self.read32(offset & ~3)
        return (word >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def read32(self, off: int) -> int:
        now = self.host.now_cycles()
        if off == 0x004:
            return (self.num_irq + 31) // 32 - 1
        if off == 0x010:
            self._st_catch_up(now)
            v = self.st_csr | (self.st_flag << 16)
            self.st_flag = 0
            return v
        if off == 0x014:
            return self.st_rvr
        if off == 0x018:
            return self.st_cvr_now(now)
        if off == 0x01C:
            tenms = int(self.host.cpu_hz // 100) - 1
            return (1 << 31) | (tenms & 0xFFFFFF)
        if 0x100 <= off < 0x140:
            return (self.enabled >> (32 * ((off - 0x100) >> 2))) & 0xFFFFFFFF
        if 0x180 <= off < 0x1C0:
            return (self.enabled >> (32 * ((off - 0x180) >> 2))) & 0xFFFFFFFF
        if 0x200 <= off < 0x240:
            return self._irq_bits(self.pending | self.levels, (off - 0x200) >> 2)
        if 0x280 <= off < 0x2C0:
            return self._irq_bits(self.pending | self.levels, (off - 0x280) >> 2)
        if 0x300 <= off < 0x340:
            return self._irq_bits(self.active, (off - 0x300) >> 2)
        return {
            0xD00: CPUID.get(self.board.cpu, 0x410FC241), 0xD04: self.icsr(),
            0xD08: self.vtor, 0xD0C: 0xFA050000 | (self.prigroup << 8), 0xD10: self.scr,
            0xD14: self.ccr, 0xD24: self.shcsr | self._shcsr_active(), 0xD28: self.cfsr,
            0xD2C: self.hfsr, 0xD30: self.dfsr, 0xD34: self.mmfar, 0xD38: self.bfar,
            0xD88: self.cpacr, 0xF34: self.fpccr, 0xF38: self.fpcar, 0xF3C: self.fpdscr,
        }.get(off, 0)

    def _shcsr_active(self) -> int:
        a = self.active
        return ((a >> MEMMANAGE) & 1) | ((a >> BUSFAULT) & 1) << 1 | ((a >> USAGEFAULT) & 1) << 3 \
            | ((a >> SVCALL) & 1) << 7 | ((a >> PENDSV) & 1) << 10 | ((a >> SYSTICK) & 1) << 11

    def write(self, offset: int, size: int, value: int) -> None:
        if 0x400 <= offset < 0x400 + self.num_irq or 0xD18 <= offset < 0xD24:
            base = 16 if offset < 0xD00 else 4
            start = offset - (0x400 if offset < 0xD00 else 0xD18) + base
            for i in range(size):
                if start + i < len(self.prio):
                    self.prio[start + i] = (value >> (8 * i)) & self.prio_mask
            return
        shift = 8 * (offset & 3)
        self.write32(offset & ~3, (value << shift) & 0xFFFFFFFF)

    def write32(self, off: int, v: int) -> None:
        now = self.host.now_cycles()
        irq_mask = ((1 << self.num_irq) - 1)
        if off == 0x010:
            was = self.st_csr & 1
            if was and not v & 1:
                self.st_cvr = self.st_cvr_now(now)
                self.st_next = None
            elif v & 1 and not was:
                self.st_next = now + (self.st_cvr if self.st_cvr else self._st_period())
            self.st_csr = v & 7
        elif off == 0x014:
            self.st_rvr = v & 0xFFFFFF
        elif off == 0x018:
            self.st_cvr, self.st_flag = 0, 0
            if self.st_csr & 1:
                self.st_next = now + self._st_period()
        elif 0x100 <= off < 0x140:
            self.enabled |= (v << (32 * ((off - 0x100) >> 2))) & irq_mask
        elif 0x180 <= off < 0x1C0:
            self.enabled &= ~(v << (32 * ((off - 0x180) >> 2)))
        elif 0x200 <= off < 0x240:
            self.pending |= ((v << (32 * ((off - 0x200) >> 2))) & irq_mask) << 16
        elif 0x280 <= off < 0x2C0:
            self.pending &= ~(v << (16 + 32 * ((off - 0x280) >> 2)))
        elif off == 0xD04:
            for bit, exc, setting in ((31, NMI, True), (28, PENDSV, True), (27, PENDSV, False),
                                      (26, SYSTICK, True), (25, SYSTICK, False)):
                if v >> bit & 1:
                    if setting:
                        self.pending |= 1 << exc
                    else:
                        self.pending &= ~(1 << exc)
        elif off == 0xD08:
            self.vtor = v & 0xFFFFFF80
        elif off == 0xD0C:
            if v >> 16 == 0x05FA:
                self.prigroup = (v >> 8) & 7
                if v & 0x5:  # SYSRESETREQ / VECTRESET
                    self.host.request_reset()
        elif off == 0xD10:
            self.scr = v & 0x16
        elif off == 0xD14:
            self.ccr = (v & 0x31B) | 0x200
        elif off == 0xD24:
            self.shcsr = v & 0x70000
        elif off == 0xD28:
            self.cfsr &= ~v
        elif off == 0xD2C:
            self.hfsr &= ~v
        elif off == 0xD30:
            self.dfsr &= ~v
        elif off == 0xD34:
            self.mmfar = v
        elif off == 0xD38:
            self.bfar = v
        elif off == 0xD88:
            self.cpacr = v & 0x00F00000
        elif off == 0xF00:
            irq = v & 0x1FF
            if irq < self.num_irq:
                self.pending |= 1 << (16 + irq)
        elif off == 0xF34:
            self.fpccr = v
        elif off == 0xF38:
            self.fpcar = v & ~7
        elif off == 0xF3C:
            self.fpdscr = v
