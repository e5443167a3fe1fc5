"""RISC-V rv32 (sifive_e) on Unicorn 2.1.4: registers, the CLINT (mtime/mtimecmp/msip)
as a Python model, and traps taken in Python.

Measured on Unicorn 2.1.4: ``ebreak`` and illegal instructions end emulation with
UC_ERR_INSN_INVALID (PC at the instruction; no interrupt hook call), ``ecall``
arrives in the interrupt hook with PC past it, ``wfi`` halts the CPU (emulation
returns, PC past it), and ``mret`` works natively. So traps are entered in Python:
mepc, mcause, mtval, mstatus (MPIE <- MIE, MIE <- 0, MPP <- M), PC <- mtvec (vectored
mode for interrupts). The machine timer interrupt is delivered the same way between
slices, at the exact cycle ``mtime`` reaches ``mtimecmp`` (Unicorn keeps mip.MTIP
read-only, so the pending bit lives in the model; the guest's mip does not show it).
A trap with mtvec = 0 stops the machine FAULTED. There is no PLIC model: UART
interrupts are not delivered on this board.
"""

from __future__ import annotations

import struct
from functools import partial

from unicorn import riscv_const as rc
from unicorn import unicorn_const as ucc
from unicorn.unicorn import UcError
from unicorn.unicorn_const import UC_ARCH_RISCV, UC_MODE_RISCV32

from machineserver.server.drivers.base import BoardSpec, StopInfo, StopReason
from machineserver.server.drivers.unicorn.arch import CoreHost, Engine, JsonState, new_engine

ABI = ["zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "s0", "s1", "a0", "a1", "a2", "a3",
       "a4", "a5", "a6", "a7", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11",
       "t3", "t4", "t5", "t6"]
REGS: dict[str, int] = {f"x{i}": getattr(rc, f"UC_RISCV_REG_X{i}") for i in range(32)}
REGS["pc"] = rc.UC_RISCV_REG_PC
CSRS = {"mstatus": rc.UC_RISCV_REG_MSTATUS, "mie": rc.UC_RISCV_REG_MIE,
        "mip": rc.UC_RISCV_REG_MIP, "mtvec": rc.UC_RISCV_REG_MTVEC,
        "mepc": rc.UC_RISCV_REG_MEPC, "mcause": rc.UC_RISCV_REG_MCAUSE,
        "mtval": rc.UC_RISCV_REG_MTVAL}
REGS.update(CSRS)
ALIASES = {name: f"x{i}" for i, name in enumerate(ABI)}
ALIASES["fp"] = "x8"
REGISTER_NAMES = tuple(REGS)
CPUS = {"rv32imac", "rv32imac_zicsr", "rv32i", "rv32im", "rv32imc", "rv32ima"}
CLINT_MODELS = frozenset({"clint"})
EBREAK, WFI = 0x00100073, 0x10500073
SEMI_PRE, SEMI_POST = 0x01F01013, 0x40705013
_U64 = (1 << 64) - 1


def _word(uc: Engine, address: int) -> int | None:
    """The 32-bit word at ``address``; None when it is not mapped."""
    try:
        return int(struct.unpack("<I", bytes(uc.mem_read(address, 4)))[0])
    except UcError:
        return None


class Clint:
    """The core-local interruptor: msip, mtimecmp and mtime (virtual time at
    ``timebase_hz``), mapped at its board address by :meth:`attach`."""

    host: CoreHost  # set by attach

    def __init__(self, timebase_hz: int) -> None:
        self.timebase = timebase_hz
        self.reset()

    def attach(self, uc: Engine, host: CoreHost, base: int, size: int) -> None:
        self.host = host

        def read(_uc: Engine, offset: int, width: int, _ud: object) -> int:
            return host.mmio_read(base + offset, width, partial(self.read, offset, width))

        def write(_uc: Engine, offset: int, width: int, value: int, _ud: object) -> None:
            host.mmio_write(base + offset, width, value, partial(self.write, offset, width, value))

        uc.mmio_map(base, (size + 0xFFF) & ~0xFFF, read, None, write, None)

    def reset(self) -> None:
        self.msip = 0
        self.mtimecmp = _U64
        self.mtime_offset = 0

    def get_state(self) -> JsonState:
        return {"msip": self.msip, "mtimecmp": self.mtimecmp, "mtime_offset": self.mtime_offset}

    def set_state(self, d: JsonState) -> None:
        self.msip, self.mtimecmp, self.mtime_offset = d["msip"], d["mtimecmp"], d["mtime_offset"]

    def mtime(self, now: int) -> int:
        return (now * self.timebase // self.host.cpu_hz + self.mtime_offset) & _U64

    def deadline(self) -> int | None:
        if self.mtimecmp == _U64:
            return None
        ticks = self.mtimecmp - self.mtime_offset
        if ticks <= 0:
            return 0
        return -(-ticks * self.host.cpu_hz // self.timebase)

    def read(self, offset: int, size: int) -> int:
        now = self.host.now_cycles()
        if offset < 4:
            v = self.msip
        elif 0x4000 <= offset < 0x4008:
            v = self.mtimecmp >> (8 * (offset - 0x4000))
        elif 0xBFF8 <= offset < 0xC000:
            v = self.mtime(now) >> (8 * (offset - 0xBFF8))
        else:
            v = 0
        return v & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        mask = (1 << (8 * size)) - 1
        if offset < 4:
            self.msip = value & 1
        elif 0x4000 <= offset < 0x4008:
            sh = 8 * (offset - 0x4000)
            self.mtimecmp = (self.mtimecmp & ~(mask << sh) | ((value & mask) << sh)) & _U64
        elif 0xBFF8 <= offset < 0xC000:
            sh = 8 * (offset - 0xBFF8)
            now = self.host.now_cycles()
            cur = self.mtime(now)
            new = (cur & ~(mask << sh) | ((value & mask) << sh)) & _U64
            self.mtime_offset += new - cur


class RiscV:
    """The RV32 core (an :class:`~.arch.ArchCore`): registers, the CLINT model, traps.
    ``create_uc`` then ``attach`` before anything else."""

    arch_name = "riscv32"
    register_names = REGISTER_NAMES
    uc: Engine  # set by create_uc
    host: CoreHost  # set by attach

    def __init__(self, board: BoardSpec) -> None:
        self.board = board
        spec = next((p for p in self.board.peripherals if p.model == "clint"), None)
        self.clint_spec = spec
        tb = int(spec.properties.get("timebase_hz", 10_000_000)) if spec else 10_000_000
        self.clint = Clint(tb)
        self.mip = 0

    def create_uc(self) -> Engine:
        self.uc = new_engine(UC_ARCH_RISCV, UC_MODE_RISCV32)
        return self.uc

    def attach(self, uc: Engine, host: CoreHost) -> None:
        self.host = host
        self.clint.host = host  # consulted for timer deadlines even without a CLINT page
        if self.clint_spec is not None:
            self.clint.attach(uc, host, self.clint_spec.base, self.clint_spec.size)
        uc.hook_add(ucc.UC_HOOK_INTR, self._on_intr)

    def reset(self, entry: int | None) -> None:
        uc = self.uc
        self.clint.reset()
        for i in range(1, 32):
            uc.reg_write(REGS[f"x{i}"], 0)
        for n in ("mstatus", "mie", "mip", "mtvec", "mepc", "mcause", "mtval"):
            uc.reg_write(CSRS[n], 0)
        pc = entry if entry is not None else (self.board.reset_vector or 0)
        uc.reg_write(rc.UC_RISCV_REG_PC, pc)

    def pc(self) -> int:
        return int(self.uc.reg_read(rc.UC_RISCV_REG_PC)) & 0xFFFFFFFF

    def start_address(self) -> int:
        return self.pc()

    # ---- registers
    def resolve(self, name: str) -> str | None:
        n = name.lower()
        n = ALIASES.get(n, n)
        return n if n in REGS else None

    def read_reg(self, name: str) -> int:
        return int(self.uc.reg_read(REGS[name])) & 0xFFFFFFFF

    def write_reg(self, name: str, value: int) -> None:
        if name != "x0":
            self.uc.reg_write(REGS[name], value & 0xFFFFFFFF)

    def save_regs(self) -> dict[str, int]:
        return {n: self.read_reg(n) for n in REGISTER_NAMES}

    def restore_regs(self, regs: dict[str, int]) -> None:
        for n in REGISTER_NAMES:
            self.write_reg(n, regs[n])

    def get_state(self) -> JsonState:
        return {"clint": self.clint.get_state()}

    def set_state(self, d: JsonState) -> None:
        self.clint.set_state(d["clint"])

    # ---- timers and interrupts
    def wants_count(self) -> bool:
        return self.clint.mtimecmp != _U64

    def deadline(self) -> int | None:
        return self.clint.deadline()

    def tick(self, now: int) -> None:
        # Unicorn's CSR write mask makes mip.MTIP/MSIP read-only, so the pending lines
        # live here (the guest reading mip does not see them; delivery is exact).
        new = 0
        if self.clint.mtimecmp != _U64 and self.clint.mtime(now) >= self.clint.mtimecmp:
            new |= 0x80
        if self.clint.msip:
            new |= 0x8
        self.mip = new

    def set_irq(self, irq: int, level: bool) -> None:
        pass  # no PLIC model

    def _pending_irq(self) -> int | None:
        uc = self.uc
        if not int(uc.reg_read(rc.UC_RISCV_REG_MSTATUS)) & 0x8:
            return None
        self.tick(self.host.now_cycles())
        bits = self.mip & int(uc.reg_read(rc.UC_RISCV_REG_MIE))
        for cause in (11, 3, 7):  # MEI, MSI, MTI: the architectural priority order
            if bits >> cause & 1:
                return cause
        return None

    def deliverable(self) -> bool:
        return self._pending_irq() is not None

    def deliver(self) -> StopInfo | None:
        cause = self._pending_irq()
        if cause is None:
            return None
        return self.trap(cause | 0x80000000, 0, self.pc())

    def halted_on_wfi(self, pc: int) -> bool:
        return _word(self.uc, pc - 4) == WFI

    def trap(self, cause: int, tval: int, epc: int) -> StopInfo | None:
        uc = self.uc
        mtvec = int(uc.reg_read(rc.UC_RISCV_REG_MTVEC)) & 0xFFFFFFFF
        if mtvec & ~3 == 0:
            return StopInfo(StopReason.FAULT, pc=epc, fault_address=tval or None,
                            message=f"trap mcause=0x{cause:x} with no trap vector (mtvec=0)")
        mstatus = int(uc.reg_read(rc.UC_RISCV_REG_MSTATUS))
        mie = (mstatus >> 3) & 1
        mstatus = (mstatus & ~((1 << 7) | (1 << 3))) | (mie << 7) | (3 << 11)
        uc.reg_write(rc.UC_RISCV_REG_MSTATUS, mstatus)
        uc.reg_write(rc.UC_RISCV_REG_MCAUSE, cause)
        uc.reg_write(rc.UC_RISCV_REG_MEPC, epc)
        uc.reg_write(rc.UC_RISCV_REG_MTVAL, tval)
        target = mtvec & ~3
        if mtvec & 1 and cause & 0x80000000:
            target += 4 * (cause & 0x7FFFFFFF)
        uc.reg_write(rc.UC_RISCV_REG_PC, target)
        return None

    def on_error(self, err: UcError, address: int | None) -> StopInfo | None:
        pc = self.pc()
        code = err.errno
        if code == ucc.UC_ERR_INSN_INVALID:
            insn = _word(self.uc, pc)
            if insn == EBREAK:
                if _word(self.uc, pc - 4) == SEMI_PRE and _word(self.uc, pc + 4) == SEMI_POST:
                    res = self.host.semihost(self.read_reg("x10"), self.read_reg("x11"), pc)
                    if res is None:
                        return None
                    self.write_reg("x10", res)
                    self.write_reg("pc", pc + 4)
                    self.host.account_extra(1)
                    return None
                return self.trap(3, pc, pc)
            return self.trap(2, insn or 0, pc)
        if code in (ucc.UC_ERR_READ_UNMAPPED, ucc.UC_ERR_READ_PROT):
            return self.trap(5, address or 0, pc)
        if code in (ucc.UC_ERR_WRITE_UNMAPPED, ucc.UC_ERR_WRITE_PROT):
            return self.trap(7, address or 0, pc)
        if code in (ucc.UC_ERR_FETCH_UNMAPPED, ucc.UC_ERR_FETCH_PROT):
            return self.trap(1, address if address is not None else pc, pc)
        return StopInfo(StopReason.FAULT, pc=pc, fault_address=address,
                        message=f"emulator error: {err}")

    def _on_intr(self, uc: Engine, intno: int, _ud: object) -> None:
        self.host.guard(partial(self._intr, intno))

    def _intr(self, intno: int) -> None:
        pc = self.pc()
        if intno in (8, 9, 11):  # ecall from U/S/M: PC is already past it
            stop = self.trap(11, 0, pc - 4)
        else:
            stop = self.trap(intno, 0, pc)
        if stop is not None:
            self.host.hook_stop(stop)
