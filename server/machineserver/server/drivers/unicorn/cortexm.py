"""Cortex-M (M3, M4) on Unicorn 2.1.4: registers, the System Control Space (NVIC, SCB,
SysTick) as a Python model, and exception entry/return done in Python.

How exceptions work here (measured on Unicorn 2.1.4, the cheapest correct way found):

* Unicorn's qemu core has M-profile exception *logic* but no NVIC device, and with a
  ``UC_HOOK_INTR`` hook installed it hands every CPU exception to the hook instead of
  taking it. So entry is done in Python, between emulation slices or inside the
  interrupt hook (both points where the CPU state is consistent): push the 8-word
  frame (r0-r3, r12, lr, return address, xPSR; 8-byte aligned with xPSR bit 9 when
  CCR.STKALIGN) on the active stack, clear CONTROL.SPSEL while still in Thread mode
  (Unicorn swaps the banked SP), write IPSR through xPSR (Handler mode), LR =
  EXC_RETURN (0xFFFFFFF1 / F9 / FD), PC = vector from VTOR.
* Return: a branch to 0xFFFFFFFx in Handler mode raises EXCP_EXCEPTION_EXIT, which
  arrives in the interrupt hook as intno 8 with PC = EXC_RETURN & ~1. The hook pops
  the frame from MSP or PSP (EXC_RETURN bit 2), restores xPSR (back to the stacked
  mode), sets CONTROL.SPSEL for a PSP return, and continues at the stacked PC; then
  it checks for a pending exception (tail-chaining done as return + entry).
* Pending/enabled/active state, priorities (IPR/SHPR, AIRCR.PRIGROUP, PRIMASK,
  BASEPRI, FAULTMASK) and preemption are computed by the model; only the interrupt
  check runs between slices, never per instruction. An MMIO write that makes an
  exception deliverable is taken at the end of the current slice.
* Faults: an unmapped access or fetch ends the slice with a UcError; the model sets
  CFSR/BFAR and takes BusFault/UsageFault when enabled in SHCSR and allowed by
  priority, else HardFault with HFSR.FORCED. A fault at priority <= -1 (in HardFault
  or NMI, or FAULTMASK set) is a lockup: the machine goes FAULTED. An exception whose
  vector is 0 or unmapped, or a frame that cannot be stacked, is FAULTED too.
* FPU (M4): floating-point context is never stacked (EXC_RETURN bit 4 is always 1).
"""

from __future__ import annotations

import struct
from functools import partial

from unicorn import unicorn_const as ucc
from unicorn.arm_const import (
    UC_ARM_REG_BASEPRI,
    UC_ARM_REG_CONTROL,
    UC_ARM_REG_FAULTMASK,
    UC_ARM_REG_LR,
    UC_ARM_REG_MSP,
    UC_ARM_REG_PC,
    UC_ARM_REG_PRIMASK,
    UC_ARM_REG_PSP,
    UC_ARM_REG_R0,
    UC_ARM_REG_R1,
    UC_ARM_REG_R2,
    UC_ARM_REG_R3,
    UC_ARM_REG_R4,
    UC_ARM_REG_R5,
    UC_ARM_REG_R6,
    UC_ARM_REG_R7,
    UC_ARM_REG_R8,
    UC_ARM_REG_R9,
    UC_ARM_REG_R10,
    UC_ARM_REG_R11,
    UC_ARM_REG_R12,
    UC_ARM_REG_SP,
    UC_ARM_REG_XPSR,
    UC_CPU_ARM_CORTEX_M3,
    UC_CPU_ARM_CORTEX_M4,
)
from unicorn.unicorn import UcError
from unicorn.unicorn_const import UC_ARCH_ARM, UC_MODE_MCLASS, UC_MODE_THUMB

from machineserver.server.drivers.base import BoardSpec, StopInfo, StopReason
from machineserver.server.drivers.unicorn.arch import CoreHost, Engine, JsonState, new_engine

NMI, HARDFAULT, MEMMANAGE, BUSFAULT, USAGEFAULT = 2, 3, 4, 5, 6
SVCALL, DEBUGMON, PENDSV, SYSTICK = 11, 12, 14, 15
SCS_BASE, SCS_SIZE = 0xE000E000, 0x1000
CPUS = {"cortex-m3": UC_CPU_ARM_CORTEX_M3, "cortex-m4": UC_CPU_ARM_CORTEX_M4,
        "cortex-m4f": UC_CPU_ARM_CORTEX_M4}
CPUID = {"cortex-m3": 0x412FC231, "cortex-m4": 0x410FC241, "cortex-m4f": 0x410FC241}
# models the SCS stands for (the page at 0xE000E000 is architectural: always mapped)
SCS_MODELS = frozenset({"nvic", "scb", "systick"})

_GPR = [UC_ARM_REG_R0, UC_ARM_REG_R1, UC_ARM_REG_R2, UC_ARM_REG_R3, UC_ARM_REG_R4,
        UC_ARM_REG_R5, UC_ARM_REG_R6, UC_ARM_REG_R7, UC_ARM_REG_R8, UC_ARM_REG_R9,
        UC_ARM_REG_R10, UC_ARM_REG_R11, UC_ARM_REG_R12]
REGS: dict[str, int] = {f"r{i}": r for i, r in enumerate(_GPR)}
REGS.update(sp=UC_ARM_REG_SP, lr=UC_ARM_REG_LR, pc=UC_ARM_REG_PC, xpsr=UC_ARM_REG_XPSR,
            msp=UC_ARM_REG_MSP, psp=UC_ARM_REG_PSP, primask=UC_ARM_REG_PRIMASK,
            basepri=UC_ARM_REG_BASEPRI, faultmask=UC_ARM_REG_FAULTMASK,
            control=UC_ARM_REG_CONTROL)
ALIASES = {"r13": "sp", "r14": "lr", "r15": "pc"}
REGISTER_NAMES = tuple(REGS)
# restore order for snapshots: mode first (xpsr, control), then the banked stacks
RESTORE_ORDER = ("xpsr", "control", "msp", "psp", *[f"r{i}" for i in range(13)], "lr",
                 "primask", "basepri", "faultmask", "pc")

_SCS_FIELDS = ("enabled", "pending", "active", "levels", "vtor", "prigroup", "scr", "ccr",
               "shcsr", "cfsr", "hfsr", "dfsr", "mmfar", "bfar", "cpacr", "fpccr", "fpcar",
               "fpdscr", "st_csr", "st_rvr", "st_cvr", "st_flag", "st_next")


class Scs:
    """NVIC + SCB + SysTick registers at 0xE000E000 (offsets relative to it)."""

    def __init__(self, core: CortexM) -> None:
        self.core = core
        self.num_irq = core.num_irq
        self.prio_mask = (0xFF << (8 - core.prio_bits)) & 0xFF
        self.reset()

    def reset(self) -> None:
        self.enabled = 0  # bit n = IRQ n
        self.pending = 0  # bit e = exception e (IRQ n is bit 16+n)
        self.active = 0
        self.levels = 0  # interrupt lines held high by devices (bit 16+n)
        self.prio = bytearray(16 + self.num_irq)
        self.vtor = self.core.board.vector_table & 0xFFFFFF80
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
        v = self.core.ipsr()
        best = self.core.best_pending()
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
        now = self.core.host.now_cycles()
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
            tenms = int(self.core.host.cpu_hz // 100) - 1
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
            0xD00: CPUID.get(self.core.board.cpu, 0x410FC241), 0xD04: self.icsr(),
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
        now = self.core.host.now_cycles()
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
                    self.core.host.request_reset()
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


class CortexM:
    """The Cortex-M core (an :class:`~.arch.ArchCore`): registers, the SCS model,
    exception entry and return. ``create_uc`` then ``attach`` before anything else."""

    arch_name = "arm-cortex-m"
    register_names = REGISTER_NAMES
    uc: Engine  # set by create_uc
    host: CoreHost  # set by attach

    def __init__(self, board: BoardSpec) -> None:
        self.board = board
        nvic = next((p for p in self.board.peripherals if p.model == "nvic"), None)
        props = nvic.properties if nvic else {}
        self.num_irq = int(props.get("num_irq", 64))
        self.prio_bits = int(props.get("prio_bits", 3))
        self.scs = Scs(self)

    # ---- engine
    def create_uc(self) -> Engine:
        uc = new_engine(UC_ARCH_ARM, UC_MODE_THUMB | UC_MODE_MCLASS)
        uc.ctl_set_cpu_model(CPUS[self.board.cpu])
        self.uc = uc
        return uc

    def attach(self, uc: Engine, host: CoreHost) -> None:
        self.host = host
        uc.mmio_map(SCS_BASE, SCS_SIZE, self._mmio_read, None, self._mmio_write, None)
        uc.hook_add(ucc.UC_HOOK_INTR, self._on_intr)

    def _mmio_read(self, uc: Engine, offset: int, size: int, _ud: object) -> int:
        return self.host.mmio_read(SCS_BASE + offset, size, partial(self.scs.read, offset, size))

    def _mmio_write(self, uc: Engine, offset: int, size: int, value: int, _ud: object) -> None:
        self.host.mmio_write(SCS_BASE + offset, size, value, partial(self.scs.write, offset, size, value))

    def reset(self, entry: int | None) -> None:
        uc = self.uc
        self.scs.reset()
        uc.reg_write(UC_ARM_REG_XPSR, 1 << 24)
        uc.reg_write(UC_ARM_REG_CONTROL, 0)
        for r in _GPR:
            uc.reg_write(r, 0)
        for r in (UC_ARM_REG_PRIMASK, UC_ARM_REG_BASEPRI, UC_ARM_REG_FAULTMASK, UC_ARM_REG_PSP):
            uc.reg_write(r, 0)
        uc.reg_write(UC_ARM_REG_LR, 0xFFFFFFFF)
        sp, pc = 0, entry or 0
        try:
            sp, rv = struct.unpack("<II", bytes(uc.mem_read(self.scs.vtor, 8)))
            pc = rv or pc
        except UcError:
            pass
        uc.reg_write(UC_ARM_REG_MSP, sp & ~3)
        uc.reg_write(UC_ARM_REG_SP, sp & ~3)
        uc.reg_write(UC_ARM_REG_PC, pc | 1)

    def pc(self) -> int:
        return int(self.uc.reg_read(UC_ARM_REG_PC)) & ~1

    def start_address(self) -> int:
        return self.pc() | 1

    def ipsr(self) -> int:
        return int(self.uc.reg_read(UC_ARM_REG_XPSR)) & 0x1FF

    # ---- registers
    def resolve(self, name: str) -> str | None:
        n = name.lower()
        n = ALIASES.get(n, n)
        return n if n in REGS else None

    def read_reg(self, name: str) -> int:
        v = int(self.uc.reg_read(REGS[name])) & 0xFFFFFFFF
        return v & ~1 if name == "pc" else v

    def write_reg(self, name: str, value: int) -> None:
        value &= 0xFFFFFFFF
        self.uc.reg_write(REGS[name], value | 1 if name == "pc" else value)

    def save_regs(self) -> dict[str, int]:
        return {n: self.read_reg(n) for n in REGISTER_NAMES if n != "sp"}

    def restore_regs(self, regs: dict[str, int]) -> None:
        for n in RESTORE_ORDER:
            self.write_reg(n, regs[n])

    def get_state(self) -> JsonState:
        return {"scs": self.scs.get_state()}

    def set_state(self, d: JsonState) -> None:
        self.scs.set_state(d["scs"])

    # ---- timers
    def wants_count(self) -> bool:
        return self.scs.systick_wants_count()

    def deadline(self) -> int | None:
        return self.scs.deadline()

    def tick(self, now: int) -> None:
        self.scs.tick(now)

    def set_irq(self, irq: int, level: bool) -> None:
        self.scs.set_level(irq, level)

    def halted_on_wfi(self, pc: int) -> bool:
        try:
            return bytes(self.uc.mem_read(pc - 2, 2)) == b"\x30\xbf" or \
                bytes(self.uc.mem_read(pc - 4, 4)) == b"\xaf\xf3\x03\x80"
        except UcError:
            return False

    # ---- priorities
    def _group(self, p: int) -> int:
        if p < 0:
            return p
        return p & ~((1 << (self.scs.prigroup + 1)) - 1) & 0xFF

    def _prio(self, exc: int) -> int:
        if exc == NMI:
            return -2
        if exc == HARDFAULT:
            return -1
        return self.scs.prio[exc] if exc < len(self.scs.prio) else 0

    def exec_priority(self) -> int:
        p = 256
        a = self.scs.active
        while a:
            low = a & -a
            p = min(p, self._group(self._prio(low.bit_length() - 1)))
            a ^= low
        uc = self.uc
        basepri = int(uc.reg_read(UC_ARM_REG_BASEPRI)) & 0xFF
        if basepri:
            p = min(p, self._group(basepri))
        if int(uc.reg_read(UC_ARM_REG_PRIMASK)) & 1:
            p = min(p, 0)
        if int(uc.reg_read(UC_ARM_REG_FAULTMASK)) & 1:
            p = min(p, -1)
        return p

    def best_pending(self) -> int | None:
        scs = self.scs
        cand = (scs.pending | (scs.levels & ~scs.active)) & ~((~scs.enabled) << 16) \
            & ~scs.active
        best, best_key = None, None
        while cand:
            low = cand & -cand
            exc = low.bit_length() - 1
            cand ^= low
            key = (self._group(self._prio(exc)), exc)
            if best_key is None or key < best_key:
                best, best_key = exc, key
        return best

    def deliverable(self) -> bool:
        best = self.best_pending()
        return best is not None and self._group(self._prio(best)) < self.exec_priority()

    def deliver(self) -> StopInfo | None:
        """Take the highest pending exception if it preempts the current priority."""
        for _ in range(4):
            best = self.best_pending()
            if best is None or self._group(self._prio(best)) >= self.exec_priority():
                return None
            stop = self.enter(best)
            if stop is not None:
                return stop
        return None

    # ---- exception entry / return
    def _vector(self, exc: int) -> int | None:
        try:
            (vec,) = struct.unpack("<I", bytes(self.uc.mem_read(self.scs.vtor + 4 * exc, 4)))
        except UcError:
            return None
        if vec == 0 or self.board.region_at(vec & ~1, 2) is None:
            return None
        return int(vec)

    def enter(self, exc: int, return_pc: int | None = None) -> StopInfo | None:
        uc = self.uc
        vec = self._vector(exc)
        pc = self.pc() if return_pc is None else return_pc
        if vec is None:
            return self._fault_stop(
                pc, None, f"exception {exc} taken but its vector is empty "
                f"(no handler in the vector table at 0x{self.scs.vtor:08x})")
        r = [int(uc.reg_read(x)) & 0xFFFFFFFF for x in (
            UC_ARM_REG_R0, UC_ARM_REG_R1, UC_ARM_REG_R2, UC_ARM_REG_R3, UC_ARM_REG_R12,
            UC_ARM_REG_LR, UC_ARM_REG_XPSR, UC_ARM_REG_SP, UC_ARM_REG_CONTROL)]
        xpsr, sp, control = r[6], r[7], r[8]
        thread = (xpsr & 0x1FF) == 0
        use_psp = thread and bool(control & 2)
        frame = (sp - 32) & 0xFFFFFFFF
        realign = 0
        if self.scs.ccr & 0x200 and frame & 4:
            frame &= ~7
            realign = 1 << 9
        stacked_xpsr = (xpsr & ~(1 << 9)) | realign | (1 << 24)
        try:
            uc.mem_write(frame, struct.pack("<8I", *r[:6], pc & ~1, stacked_xpsr))
        except UcError:
            return self._fault_stop(pc, frame, f"stacking error entering exception {exc} "
                                               f"(sp=0x{sp:08x})")
        uc.reg_write(UC_ARM_REG_SP, frame)
        if use_psp:
            uc.reg_write(UC_ARM_REG_CONTROL, control & ~2)  # now on MSP
        uc.reg_write(UC_ARM_REG_XPSR, (xpsr & 0xF8000000) | (1 << 24) | exc)
        exc_return = 0xFFFFFFF1 if not thread else (0xFFFFFFFD if use_psp else 0xFFFFFFF9)
        uc.reg_write(UC_ARM_REG_LR, exc_return)
        uc.reg_write(UC_ARM_REG_PC, vec | 1)
        self.scs.pending &= ~(1 << exc)
        self.scs.active |= 1 << exc
        return None

    def exception_return(self) -> StopInfo | None:
        uc = self.uc
        exc_return = (int(uc.reg_read(UC_ARM_REG_PC)) | 1) & 0xFFFFFFFF
        exc = self.ipsr()
        self.scs.active &= ~(1 << exc)
        to_psp = bool(exc_return & 4) and bool(exc_return & 8)
        frame = int(uc.reg_read(UC_ARM_REG_PSP if to_psp else UC_ARM_REG_SP)) & 0xFFFFFFFF
        try:
            r0, r1, r2, r3, r12, lr, pc, xpsr = struct.unpack("<8I", bytes(uc.mem_read(frame, 32)))
        except UcError:
            return self._fault_stop(exc_return, frame, "unstacking error on exception return")
        new_sp = frame + 32 + (4 if xpsr & (1 << 9) else 0)
        if not exc_return & 8:
            xpsr = (xpsr & ~0x1FF) | (xpsr & 0x1FF or exc)  # return to Handler mode
        uc.reg_write(UC_ARM_REG_XPSR, xpsr & ~(1 << 9))
        if to_psp:
            uc.reg_write(UC_ARM_REG_CONTROL, int(uc.reg_read(UC_ARM_REG_CONTROL)) | 2)
        uc.reg_write(UC_ARM_REG_SP, new_sp)
        for reg, v in zip((UC_ARM_REG_R0, UC_ARM_REG_R1, UC_ARM_REG_R2, UC_ARM_REG_R3,
                           UC_ARM_REG_R12, UC_ARM_REG_LR), (r0, r1, r2, r3, r12, lr), strict=True):
            uc.reg_write(reg, v)
        uc.reg_write(UC_ARM_REG_PC, pc | 1)
        return self.deliver()

    def _fault_stop(self, pc: int, address: int | None, message: str) -> StopInfo:
        return StopInfo(StopReason.FAULT, pc=pc & ~1, fault_address=address, message=message)

    def fault(self, kind: int, pc: int, address: int | None, what: str) -> StopInfo | None:
        """A synchronous fault at ``pc``: take it in the guest, or stop the machine."""
        enabled = {MEMMANAGE: 1 << 16, BUSFAULT: 1 << 17, USAGEFAULT: 1 << 18}.get(kind, 0)
        prio = self.exec_priority()
        target = kind
        allowed = bool(self.scs.shcsr & enabled) and self._group(self._prio(kind)) < prio
        if kind != HARDFAULT and not allowed:
            target = HARDFAULT
            self.scs.hfsr |= 1 << 30  # FORCED
        if target == HARDFAULT and prio <= -1:
            return self._fault_stop(pc, address, f"lockup: {what} at priority {prio}")
        if self._vector(target) is None:
            return self._fault_stop(pc, address, f"{what}, and no handler for it")
        return self.enter(target, return_pc=pc)

    def on_error(self, err: UcError, address: int | None) -> StopInfo | None:
        pc = self.pc()
        code = err.errno
        if code in (ucc.UC_ERR_READ_UNMAPPED, ucc.UC_ERR_WRITE_UNMAPPED, ucc.UC_ERR_READ_PROT,
                    ucc.UC_ERR_WRITE_PROT):
            self.scs.cfsr |= (1 << 9) | (1 << 15)  # PRECISERR | BFARVALID
            if address is not None:
                self.scs.bfar = address
            access = "read" if code in (ucc.UC_ERR_READ_UNMAPPED, ucc.UC_ERR_READ_PROT) else "write"
            return self.fault(BUSFAULT, pc, address, f"bus fault: {access} of unmapped "
                              f"address 0x{(address or 0):08x}")
        if code in (ucc.UC_ERR_FETCH_UNMAPPED, ucc.UC_ERR_FETCH_PROT):
            self.scs.cfsr |= 1 << 8  # IBUSERR
            return self.fault(BUSFAULT, pc, address if address is not None else pc,
                              f"bus fault: instruction fetch from 0x{pc:08x}")
        if code == ucc.UC_ERR_INSN_INVALID:
            self.scs.cfsr |= 1 << 16  # UNDEFINSTR
            return self.fault(USAGEFAULT, pc, None, f"undefined instruction at 0x{pc:08x}")
        return self._fault_stop(pc, address, f"emulator error: {err}")

    def _on_intr(self, uc: Engine, intno: int, _ud: object) -> None:
        self.host.guard(partial(self._intr, intno))

    def _intr(self, intno: int) -> None:
        pc = self.pc()
        if intno == 8:  # EXCP_EXCEPTION_EXIT
            stop = self.exception_return()
        elif intno == 7:  # BKPT
            insn = bytes(self.uc.mem_read(pc, 2))
            if insn == b"\xab\xbe":
                op = self.read_reg("r0")
                arg = self.read_reg("r1")
                res = self.host.semihost(op, arg, pc)
                if res is None:
                    return
                self.write_reg("r0", res & 0xFFFFFFFF)
                self.write_reg("pc", pc + 2)
                return
            stop = StopInfo(StopReason.BREAKPOINT, pc=pc, message=f"guest bkpt #{insn[0]}")
        elif intno == 2:  # SVC: PC already past the instruction
            if self._group(self._prio(SVCALL)) < self.exec_priority():
                stop = self.enter(SVCALL)
            else:
                self.scs.hfsr |= 1 << 30
                stop = self.fault(HARDFAULT, pc, None, "SVC at a priority that cannot take it")
        elif intno == 1:  # UDEF
            self.scs.cfsr |= 1 << 16
            stop = self.fault(USAGEFAULT, pc, None, f"undefined instruction at 0x{pc:08x}")
        elif intno == 17:  # NOCP
            self.scs.cfsr |= 1 << 19
            stop = self.fault(USAGEFAULT, pc, None, f"coprocessor (FPU) access at 0x{pc:08x} "
                              "while it is disabled")
        elif intno == 18:  # INVSTATE
            self.scs.cfsr |= 1 << 17
            stop = self.fault(USAGEFAULT, pc, None,
                              f"invalid state (Thumb bit clear) at 0x{pc:08x}")
        elif intno == 22:  # UNALIGNED
            self.scs.cfsr |= 1 << 24
            stop = self.fault(USAGEFAULT, pc, None, f"unaligned access at 0x{pc:08x}")
        else:
            stop = self._fault_stop(pc, None, f"unhandled CPU exception {intno} at 0x{pc:08x}")
        if stop is not None:
            self.host.hook_stop(stop)
