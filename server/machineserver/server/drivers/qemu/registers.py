"""Register access of a QEMU machine, through the gdbstub, by the names of :mod:`.regs`
(register numbers come from the target description QEMU serves, never hard-coded)."""

from __future__ import annotations

from collections.abc import Sequence

from machineserver.server.drivers.base import Arch, BadRequest, RegisterAccess
from machineserver.server.drivers.qemu.gdbstub import refused
from machineserver.server.drivers.qemu.target import QemuTarget, guarded
from machineserver.server.rsp import RspError
from machineserver.server.rsp.targetdesc import ARM_CORE, Reg, RegisterMap


class QemuRegisters(RegisterAccess):
    """Readable and writable while the CPU is stopped and QEMU holds it: HALTED, and
    EXITED at a caught semihosting exit (QEMU alive, see :mod:`.semihosting`)."""

    def __init__(self, target: QemuTarget) -> None:
        self.target = target

    def register_names(self) -> Sequence[str]:
        if self.target.regmap is not None:
            return self.target.regmap.names()
        if self.target.arch is Arch.ARM_CORTEX_M:
            return list(ARM_CORE)
        return [*(f"x{i}" for i in range(32)), "pc"]

    def _resolve(self, regmap: RegisterMap, name: str) -> Reg:
        reg = regmap.resolve(name)
        if reg is None:
            raise BadRequest(f"unknown register {name!r} on {self.target.board.name}", field="name")
        return reg

    @guarded
    async def read_registers(self, names: Sequence[str] | None = None) -> dict[str, int]:
        async with self.target.op:
            self.target.require_inspectable()
            regmap = self.target.regmap
            assert regmap is not None
            wanted = list(regmap.names()) if names is None else list(names)
            regs = [self._resolve(regmap, n) for n in wanted]
            stub = self.target.stub()
            g: dict[str, int] | None = None
            if any(r.in_g for r in regs):
                g = regmap.decode_g(await stub.read_all_registers())
            out: dict[str, int] = {}
            for name, reg in zip(wanted, regs, strict=True):
                if g is not None and reg.name in g:
                    out[name] = g[reg.name]
                else:
                    out[name] = int.from_bytes(await stub.read_register(reg.number), "little")
            return out

    @guarded
    async def write_register(self, name: str, value: int) -> None:
        async with self.target.op:
            self.target.require_inspectable()
            regmap = self.target.regmap
            assert regmap is not None
            reg = self._resolve(regmap, name)
            if not 0 <= value < 1 << (8 * reg.size):
                raise BadRequest(f"value 0x{value:x} does not fit {name}", field="value")
            if reg.name == "pc" and self.target.arch is Arch.ARM_CORTEX_M:
                value &= ~1
            try:
                await self.target.write_register(reg.name, value)
            except RspError as exc:
                if not refused(exc):
                    raise
                raise BadRequest(f"cannot write {name}: {exc}", field="name") from None
            if reg.name == "pc":
                self.target.last_pc = value
