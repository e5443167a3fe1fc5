"""Cortex-M (M3, M4) on Unicorn 2.1.4: the arch core the machine drives (registers,
reset, timers). The System Control Space (NVIC, SCB, SysTick) is a Python model in
:mod:`.cortexm_scs`; exception entry, return and faults are done in Python by
:mod:`.cortexm_exceptions` (its docstring says how, and why that way).

Unmasking instructions. ``cpsie i|f`` and ``msr primask|basepri|basepri_max|faultmask, rN``
touch no memory, and a Python hook on every instruction would cost ~100x. So their sites
are found in the loaded image (:func:`unmask_sites`: every halfword-aligned encoding of
them, confirmed by capstone), and the instruction *after* each one gets a single-address
code hook (free elsewhere) that ends the slice there when an interrupt is deliverable
(:meth:`CortexM.watch_unmasking`): the interrupt is then taken right after the unmasking
instruction, as on hardware. Not covered: such instructions in code written to RAM at run
time (e.g. functions copied from flash by the startup code, or the image's RAM segments
at other addresses than they run at); there an unmasked interrupt is taken at the end of
the slice. A breakpoint on the instruction after the unmasking one stops first (the
interrupt is then taken when the machine goes on).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from functools import cache, partial

import capstone
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

from machineserver.server.drivers.base import BoardSpec, Segment, StopInfo
from machineserver.server.drivers.unicorn.arch import CoreHost, Engine, JsonState, new_engine
from machineserver.server.drivers.unicorn.cortexm_exceptions import CortexMExceptions
from machineserver.server.drivers.unicorn.cortexm_scs import SCS_BASE, SCS_SIZE, Scs
from machineserver.server.drivers.unicorn.regbatch import RegReader

CPUS = {"cortex-m3": UC_CPU_ARM_CORTEX_M3, "cortex-m4": UC_CPU_ARM_CORTEX_M4,
        "cortex-m4f": UC_CPU_ARM_CORTEX_M4}
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

# Thumb encodings that can unmask an interrupt (little-endian bytes): CPSIE with I or F
# (0xB661..0xB667, A ignored); MSR (register) to PRIMASK, BASEPRI, BASEPRI_MAX or FAULTMASK
# (0xF38n, then 0x8810..0x8813)
_UNMASK = re.compile(rb"[\x61\x62\x63\x65\x66\x67]\xb6|[\x80-\x8f]\xf3[\x10-\x13]\x88", re.DOTALL)


@cache
def _thumb() -> capstone.Cs:
    return capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB | capstone.CS_MODE_MCLASS)


def unmask_sites(segments: Iterable[Segment]) -> list[int]:
    """The address of the instruction after every CPSIE/MSR that can unmask an interrupt
    in these segments (halfword-aligned matches that capstone decodes as such; data that
    happens to match costs a hook on an address that is never run, nothing more)."""
    sites: set[int] = set()
    for seg in segments:
        for match in _UNMASK.finditer(seg.data):
            address = seg.address + match.start()
            if address & 1:
                continue
            insn = next(_thumb().disasm(match.group(), address, 1), None)
            if insn is not None and insn.mnemonic in ("cpsie", "msr") and insn.size == len(match.group()):
                sites.add(address + insn.size)
    return sorted(sites)


class CortexM:
    """The Cortex-M core (an :class:`~.arch.ArchCore`): registers, reset, the SCS model
    (:mod:`.cortexm_scs`) and its exceptions (:mod:`.cortexm_exceptions`). ``create_uc``
    then ``attach`` before anything else."""

    arch_name = "arm-cortex-m"
    register_names = REGISTER_NAMES
    uc: Engine  # set by create_uc
    host: CoreHost  # set by attach
    exceptions: CortexMExceptions  # set by attach
    _reg: RegReader  # set by create_uc

    def __init__(self, board: BoardSpec) -> None:
        self.board = board
        nvic = next((p for p in self.board.peripherals if p.model == "nvic"), None)
        props = nvic.properties if nvic else {}
        self.num_irq = int(props.get("num_irq", 64))
        self.prio_bits = int(props.get("prio_bits", 3))
        self.scs = Scs(board, self.num_irq, self.prio_bits)
        # lock-step (lockstep.py): the instruction count at which the CPU went to sleep in
        # WFI, while it still sleeps (the count moves on as soon as anything runs)
        self.sleep_mark: int | None = None
        self._unmask_hooks: dict[int, int] = {}  # address after a CPSIE/MSR -> hook handle

    # ---- engine
    def create_uc(self) -> Engine:
        uc = new_engine(UC_ARCH_ARM, UC_MODE_THUMB | UC_MODE_MCLASS)
        uc.ctl_set_cpu_model(CPUS[self.board.cpu])
        self.uc = uc
        self._reg = RegReader(uc)
        return uc

    def attach(self, uc: Engine, host: CoreHost) -> None:
        self.host = host
        self.exceptions = CortexMExceptions(self.board, uc, self.scs, host)
        self.scs.connect(host, self.exceptions)
        uc.mmio_map(SCS_BASE, SCS_SIZE, self._mmio_read, None, self._mmio_write, None)
        uc.hook_add(ucc.UC_HOOK_INTR, self.exceptions.on_intr)

    def _mmio_read(self, uc: Engine, offset: int, size: int, _ud: object) -> int:
        return self.host.mmio_read(SCS_BASE + offset, size, partial(self.scs.read, offset, size))

    def _mmio_write(self, uc: Engine, offset: int, size: int, value: int, _ud: object) -> None:
        self.host.mmio_write(SCS_BASE + offset, size, value, partial(self.scs.write, offset, size, value))

    def reset(self, entry: int | None) -> None:
        uc = self.uc
        self.scs.reset()
        self.sleep_mark = None
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
        return self._reg(UC_ARM_REG_PC) & ~1

    def start_address(self) -> int:
        return self.pc() | 1

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
        return {"scs": self.scs.get_state(), "sleep_mark": self.sleep_mark}

    def set_state(self, d: JsonState) -> None:
        self.scs.set_state(d["scs"])
        mark = d.get("sleep_mark")  # absent in snapshots from before lock-step
        self.sleep_mark = None if mark is None else int(mark)

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

    # ---- exceptions
    def watch_unmasking(self, segments: Iterable[Segment]) -> None:
        """Hook the instruction after every unmasking CPSIE/MSR of the loaded image (the
        image changed: the previous image's hooks go)."""
        uc = self.uc
        for address, handle in self._unmask_hooks.items():
            uc.hook_del(handle)
            uc.ctl_remove_cache(address, address + 4)
        self._unmask_hooks = {}
        for address in unmask_sites(segments):
            self._unmask_hooks[address] = uc.hook_add(ucc.UC_HOOK_CODE, self._after_unmask, None,
                                                      address, address)
            uc.ctl_remove_cache(address, address + 4)  # blocks translated before: hooked now

    def _after_unmask(self, uc: Engine, address: int, size: int, _ud: object) -> None:
        if self.exceptions.deliverable():
            self.host.end_slice_here()

    def deliverable(self) -> bool:
        return self.exceptions.deliverable()

    def deliver(self) -> StopInfo | None:
        return self.exceptions.deliver()

    def on_error(self, err: UcError, address: int | None) -> StopInfo | None:
        return self.exceptions.on_error(err, address)
