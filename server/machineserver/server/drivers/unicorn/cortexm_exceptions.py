"""Cortex-M exceptions on Unicorn 2.1.4: entry, return, preemption and faults, done in
Python over the SCS register model (:mod:`.cortexm_scs`).

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
  BASEPRI, FAULTMASK) and preemption are computed by the model; the interrupt check
  runs between slices, never per instruction. An instruction that makes an exception
  deliverable (an MMIO write to the NVIC/SCB, CPSIE, MSR PRIMASK/BASEPRI) ends its slice
  right after itself, so the exception is taken before the next instruction (see
  :mod:`.slicer` and :mod:`.cortexm`); an exception return takes a pending exception it
  unmasks at once (tail-chaining, above).
* Faults: an unmapped access or fetch ends the slice with a UcError; the model sets
  CFSR/BFAR and takes BusFault/UsageFault when enabled in SHCSR and allowed by
  priority, else HardFault with HFSR.FORCED. A fault at priority <= -1 (in HardFault
  or NMI, or FAULTMASK set) is a lockup: the machine goes FAULTED. An exception whose
  vector is 0 or unmapped, or a frame that cannot be stacked, is FAULTED too.
* FPU (M4): floating-point context is never stacked (EXC_RETURN bit 4 is always 1).
* Cost: entry and return read and write their registers in one batch each
  (:class:`~.regbatch.RegBatch`: one native call instead of ~15 binding calls), so an
  interrupt raised at every co-simulation barrier stays cheap.
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
    UC_ARM_REG_PC,
    UC_ARM_REG_PRIMASK,
    UC_ARM_REG_PSP,
    UC_ARM_REG_R0,
    UC_ARM_REG_R1,
    UC_ARM_REG_R2,
    UC_ARM_REG_R3,
    UC_ARM_REG_R12,
    UC_ARM_REG_SP,
    UC_ARM_REG_XPSR,
)
from unicorn.unicorn import UcError

from machineserver.server.drivers.base import BoardSpec, StopInfo, StopReason
from machineserver.server.drivers.unicorn.arch import CoreHost, Engine
from machineserver.server.drivers.unicorn.cortexm_scs import (
    BUSFAULT,
    HARDFAULT,
    MEMMANAGE,
    NMI,
    SVCALL,
    USAGEFAULT,
    Scs,
)
from machineserver.server.drivers.unicorn.regbatch import RegBatch, RegReader


class CortexMExceptions:
    """Exception entry/return, priorities and faults of one Cortex-M core (the ICSR view
    of the CPU for the SCS, too)."""

    def __init__(self, board: BoardSpec, uc: Engine, scs: Scs, host: CoreHost) -> None:
        self.board = board
        self.uc = uc
        self.scs = scs
        self.host = host
        self._reg = RegReader(uc)
        self._masks = RegBatch(uc, (UC_ARM_REG_BASEPRI, UC_ARM_REG_PRIMASK, UC_ARM_REG_FAULTMASK))
        self._entry_in = RegBatch(uc, (UC_ARM_REG_R0, UC_ARM_REG_R1, UC_ARM_REG_R2, UC_ARM_REG_R3,
                                       UC_ARM_REG_R12, UC_ARM_REG_LR, UC_ARM_REG_XPSR, UC_ARM_REG_SP,
                                       UC_ARM_REG_CONTROL, UC_ARM_REG_PC))
        # the stack first (on the bank in use), then the mode: as the hardware does
        self._entry_out = RegBatch(uc, (UC_ARM_REG_SP, UC_ARM_REG_XPSR, UC_ARM_REG_LR, UC_ARM_REG_PC))
        self._entry_out_psp = RegBatch(uc, (UC_ARM_REG_SP, UC_ARM_REG_CONTROL, UC_ARM_REG_XPSR,
                                            UC_ARM_REG_LR, UC_ARM_REG_PC))
        self._return_in = RegBatch(uc, (UC_ARM_REG_PC, UC_ARM_REG_XPSR, UC_ARM_REG_SP, UC_ARM_REG_PSP,
                                        UC_ARM_REG_CONTROL))
        restore = (UC_ARM_REG_SP, UC_ARM_REG_R0, UC_ARM_REG_R1, UC_ARM_REG_R2, UC_ARM_REG_R3,
                   UC_ARM_REG_R12, UC_ARM_REG_LR, UC_ARM_REG_PC)
        # the mode first (xPSR, then CONTROL.SPSEL for a PSP return), then that bank's SP
        self._return_out = RegBatch(uc, (UC_ARM_REG_XPSR, *restore))
        self._return_out_psp = RegBatch(uc, (UC_ARM_REG_XPSR, UC_ARM_REG_CONTROL, *restore))

    def _pc(self) -> int:
        return self._reg(UC_ARM_REG_PC) & ~1

    def ipsr(self) -> int:
        return self._reg(UC_ARM_REG_XPSR) & 0x1FF

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
        p = self.active_priority()
        basepri, primask, faultmask = self._masks.read()
        basepri &= 0xFF
        if basepri:
            p = min(p, self._group(basepri))
        if primask & 1:
            p = min(p, 0)
        if faultmask & 1:
            p = min(p, -1)
        return p

    def active_priority(self) -> int:
        """The priority of the active exceptions alone (256 in Thread mode with none)."""
        p = 256
        a = self.scs.active
        while a:
            low = a & -a
            p = min(p, self._group(self._prio(low.bit_length() - 1)))
            a ^= low
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

    def wakes(self) -> bool:
        """Whether a pending exception wakes the CPU from WFI: one that would preempt the
        active exceptions, PRIMASK, FAULTMASK and BASEPRI aside (it wakes the CPU even
        when they keep it from being taken, as on hardware and in QEMU)."""
        best = self.best_pending()
        return best is not None and self._group(self._prio(best)) < self.active_priority()

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

    # ---- entry / return
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
        r = self._entry_in.read()  # r0-r3, r12, lr, xpsr, sp, control, pc
        pc = (r[9] & ~1) if return_pc is None else return_pc
        if vec is None:
            return self._fault_stop(
                pc, None, f"exception {exc} taken but its vector is empty "
                f"(no handler in the vector table at 0x{self.scs.vtor:08x})")
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
        new_xpsr = (xpsr & 0xF8000000) | (1 << 24) | exc
        exc_return = 0xFFFFFFF1 if not thread else (0xFFFFFFFD if use_psp else 0xFFFFFFF9)
        if use_psp:  # the frame is on the PSP; the handler runs on the MSP
            self._entry_out_psp.write((frame, control & ~2, new_xpsr, exc_return, vec | 1))
        else:
            self._entry_out.write((frame, new_xpsr, exc_return, vec | 1))
        self.scs.pending &= ~(1 << exc)
        self.scs.active |= 1 << exc
        return None

    def exception_return(self) -> StopInfo | None:
        uc = self.uc
        pc_now, xpsr_now, sp, psp, control = self._return_in.read()
        exc_return = pc_now | 1
        exc = xpsr_now & 0x1FF
        self.scs.active &= ~(1 << exc)
        to_psp = bool(exc_return & 4) and bool(exc_return & 8)
        frame = psp if to_psp else sp
        try:
            r0, r1, r2, r3, r12, lr, pc, xpsr = struct.unpack("<8I", bytes(uc.mem_read(frame, 32)))
        except UcError:
            return self._fault_stop(exc_return, frame, "unstacking error on exception return")
        new_sp = frame + 32 + (4 if xpsr & (1 << 9) else 0)
        if not exc_return & 8:
            xpsr = (xpsr & ~0x1FF) | (xpsr & 0x1FF or exc)  # return to Handler mode
        restored = (new_sp, r0, r1, r2, r3, r12, lr, pc | 1)
        if to_psp:
            self._return_out_psp.write((xpsr & ~(1 << 9), control | 2, *restored))
        else:
            self._return_out.write((xpsr & ~(1 << 9), *restored))
        return self.deliver()

    # ---- faults
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
        pc = self._pc()
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

    # ---- the interrupt hook
    def on_intr(self, uc: Engine, intno: int, _ud: object) -> None:
        """Unicorn's UC_HOOK_INTR: every CPU exception, exception return and BKPT."""
        self.host.guard(partial(self._intr, intno))

    def _intr(self, intno: int) -> None:
        pc = self._pc()
        if intno == 8:  # EXCP_EXCEPTION_EXIT
            stop = self.exception_return()
        elif intno == 7:  # BKPT
            insn = bytes(self.uc.mem_read(pc, 2))
            if insn == b"\xab\xbe":
                uc = self.uc
                op = int(uc.reg_read(UC_ARM_REG_R0)) & 0xFFFFFFFF
                arg = int(uc.reg_read(UC_ARM_REG_R1)) & 0xFFFFFFFF
                res = self.host.semihost(op, arg, pc)
                if res is None:
                    return
                uc.reg_write(UC_ARM_REG_R0, res & 0xFFFFFFFF)
                uc.reg_write(UC_ARM_REG_PC, (pc + 2) | 1)
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
