"""A Unicorn snapshot blob checked whole, as an import must before it is stored: the
format (:func:`.snapshot_format.decode`: version, board, memory map, sizes), every packed
page and image segment unpacked once (one at a time, each bounded by its size), and the
CPU and peripheral state this board's machine restores: the registers it writes, the
core peripherals' fields with their types, the UARTs the board has with the registers
their model keeps. BadRequest(field="snapshot") naming what is wrong.

Pure (no engine is made), so it runs anywhere: on a thread of the server at import.
"""

from __future__ import annotations

import string
from typing import Any

from machineserver.server.drivers.base import Arch, BadRequest, BoardSpec, PeripheralSpec
from machineserver.server.drivers.unicorn import snapshot_format as fmt
from machineserver.server.drivers.unicorn.cortexm import RESTORE_ORDER as CORTEXM_REGISTERS
from machineserver.server.drivers.unicorn.cortexm_scs import _SCS_FIELDS as SCS_FIELDS
from machineserver.server.drivers.unicorn.peripherals import UART_MODELS
from machineserver.server.drivers.unicorn.riscv import REGISTER_NAMES as RISCV_REGISTERS

MAX_RX_BYTES = 1 << 20  # a UART's receive FIFO as a snapshot holds it
MAX_REGISTERS = 256
_HEX = frozenset(string.hexdigits)
U32 = 1 << 32


def _bad(why: str) -> BadRequest:
    return BadRequest(f"corrupt snapshot: {why}", field="snapshot")


def check_blob(blob: bytes, board: BoardSpec) -> fmt.MachineSnapshot:
    """The snapshot in ``blob``, checked whole for ``board`` (see the module docstring)."""
    snap = fmt.decode(blob, board)
    for pages, (name, _, size) in zip(snap.pages, snap.regions, strict=True):
        for n, packed in pages.items():
            try:
                fmt.unpack(packed, min(fmt.PAGE, size - n * fmt.PAGE))
            except fmt.Corrupt as exc:
                raise _bad(f"page {n} of region {name}: {exc}") from None
    for seg in snap.image.segments if snap.image else ():
        try:
            fmt.unpack(seg.packed, seg.length)  # check_fits bounded it by its region
        except fmt.Corrupt as exc:
            raise _bad(f"the image's segment at 0x{seg.address:08x}: {exc}") from None
    try:
        check_state(snap, board)
    except (ValueError, TypeError, KeyError) as exc:
        raise _bad(str(exc)) from None
    return snap


def check_state(snap: fmt.MachineSnapshot, board: BoardSpec) -> None:
    """ValueError/TypeError/KeyError unless the registers and peripheral state are what a
    machine of ``board`` restores."""
    names = CORTEXM_REGISTERS if board.arch is Arch.ARM_CORTEX_M else RISCV_REGISTERS
    if len(snap.regs) > MAX_REGISTERS:
        raise ValueError(f"{len(snap.regs)} registers")
    missing = [n for n in names if n not in snap.regs]
    if missing:
        raise ValueError(f"registers missing: {', '.join(missing[:8])}")
    for name in names:
        fmt.strict_int(snap.regs[name], f"register {name}")
    if board.arch is Arch.ARM_CORTEX_M:
        _check_cortexm(snap.core, board)
    else:
        _check_riscv(snap.core)
    _check_uarts(snap.uarts, board)


def _check_cortexm(core: dict[str, Any], board: BoardSpec) -> None:
    scs = core["scs"]
    if not isinstance(scs, dict):
        raise ValueError("core.scs is not an object")
    for k in SCS_FIELDS:
        if k == "st_next" and scs[k] is None:
            continue
        fmt.strict_int(scs[k], f"core.scs.{k}")
    nvic = next((p for p in board.peripherals if p.model == "nvic"), None)
    num_irq = int((nvic.properties if nvic else {}).get("num_irq", 64))
    prio = scs["prio"]
    if not isinstance(prio, str) or len(prio) != 2 * (16 + num_irq) or not _HEX.issuperset(prio):
        raise ValueError(f"core.scs.prio is not {16 + num_irq} bytes in hex")
    mark = core.get("sleep_mark")
    if mark is not None:
        fmt.strict_int(mark, "core.sleep_mark")


def _check_riscv(core: dict[str, Any]) -> None:
    clint = core["clint"]
    if not isinstance(clint, dict):
        raise ValueError("core.clint is not an object")
    fmt.strict_int(clint["msip"], "core.clint.msip")
    fmt.strict_int(clint["mtimecmp"], "core.clint.mtimecmp")
    fmt.strict_int(clint["mtime_offset"], "core.clint.mtime_offset", -fmt.U64, fmt.U64)


def uart_registers(spec: PeripheralSpec) -> frozenset[str] | None:
    """The registers a UART of this model keeps in a snapshot; None when it is no UART."""
    model = UART_MODELS.get(spec.model)
    if model is None:
        return None
    uart = model.__new__(model)
    model.reset(uart)  # the registers' defaults, without a host
    return frozenset(model.regs(uart))


def _check_uarts(uarts: dict[str, dict[str, Any]], board: BoardSpec) -> None:
    for name, state in uarts.items():
        spec = board.peripheral(name)
        allowed = None if spec is None else uart_registers(spec)
        if allowed is None:
            raise ValueError(f"uart {name[:40]!r} is not a UART of board {board.name}")
        regs = state.get("regs", {})
        if not isinstance(regs, dict) or not allowed.issuperset(regs):
            raise ValueError(f"uart {name}: registers other than {', '.join(sorted(allowed))}")
        for k, v in regs.items():
            fmt.strict_int(v, f"uart {name} register {k}", 0, U32)
        rx = state.get("rx", "")
        if not isinstance(rx, str) or len(rx) % 2 or len(rx) > 2 * MAX_RX_BYTES or not _HEX.issuperset(rx):
            raise ValueError(f"uart {name}: rx is not up to {MAX_RX_BYTES} bytes in hex")
