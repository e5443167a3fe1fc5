"""Which memory address the instruction at pc is about to access, so that an MMIO access
interrupted by a stop (and re-executed by Unicorn in the next slice) is recognised as a
replay and has its side effect once, not twice; and how long that instruction is, so that
the slicer can complete it on its own (:meth:`~.slicer.Slicer.mmio_write`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import capstone
from capstone import arm as cs_arm
from capstone import riscv as cs_riscv


@cache
def _disassembler(arch: str) -> capstone.Cs:
    if arch == "arm":
        md = capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB | capstone.CS_MODE_MCLASS)
    else:
        md = capstone.Cs(capstone.CS_ARCH_RISCV, capstone.CS_MODE_RISCV32 | capstone.CS_MODE_RISCVC)
    md.detail = True
    return md


def instruction_size(arch: str, code: bytes, pc: int) -> int | None:
    """The length in bytes of the instruction at ``pc`` (``code``: its bytes and maybe
    more); None when it does not decode."""
    insn = next(_disassembler(arch).disasm(code, pc, 1), None)
    return None if insn is None else int(insn.size)


def memory_operand_address(arch: str, code: bytes, pc: int, read_reg: Callable[[str], int | None]) -> int | None:
    """The effective address of the single memory operand of the instruction at ``pc``
    (base + index + displacement, as it is before the instruction runs); None when the
    instruction has no such operand or a register cannot be read."""
    md = _disassembler(arch)
    insn = next(md.disasm(code, pc, 1), None)
    if insn is None:
        return None
    mem_type = cs_arm.ARM_OP_MEM if arch == "arm" else cs_riscv.RISCV_OP_MEM
    mems = [op for op in insn.operands if op.type == mem_type]
    if arch != "arm" and not mems:
        return _compressed_address(insn, read_reg)
    if len(mems) != 1:
        return None
    op = mems[0]
    mem = op.mem
    base = read_reg(insn.reg_name(mem.base)) if mem.base else 0
    if base is None:
        return None
    address = base + mem.disp
    index = getattr(mem, "index", 0)
    if index:
        value = read_reg(insn.reg_name(index))
        if value is None:
            return None
        # Capstone 5 keeps an index's shift (``[r1, r2, lsl #2]``) in the operand's
        # ``shift``, not in ``mem.lshift``
        shift = op.shift.value if op.shift.type == cs_arm.ARM_SFT_LSL else getattr(mem, "lshift", 0)
        address += (value << shift) * (-1 if getattr(mem, "scale", 1) < 0 else 1)
    return int(address) & 0xFFFFFFFF


# Capstone 5 lists the operands of RISC-V compressed loads and stores as (register, offset,
# base register), e.g. ``c.sw a0, 8(a5)``, not as one memory operand as for ``sw``.
_COMPRESSED_LOADS_STORES = frozenset({
    "c.lw", "c.sw", "c.lwsp", "c.swsp", "c.flw", "c.fsw", "c.flwsp", "c.fswsp",
    "c.fld", "c.fsd", "c.fldsp", "c.fsdsp",
})


def _compressed_address(insn: capstone.CsInsn, read_reg: Callable[[str], int | None]) -> int | None:
    ops = insn.operands
    shape = [op.type for op in ops]
    if insn.mnemonic not in _COMPRESSED_LOADS_STORES or shape != [
        cs_riscv.RISCV_OP_REG, cs_riscv.RISCV_OP_IMM, cs_riscv.RISCV_OP_REG,
    ]:
        return None
    base = read_reg(insn.reg_name(ops[2].reg))
    if base is None:
        return None
    return int(base + ops[1].imm) & 0xFFFFFFFF
