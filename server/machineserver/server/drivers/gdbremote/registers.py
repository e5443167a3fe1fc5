"""Registers of a gdbremote machine, numbered as the remote's target.xml says (``g`` for
the core set in one round trip, ``p``/``P`` for the rest and for writes)."""

from __future__ import annotations

from collections.abc import Sequence

from machineserver.server.drivers.base import Arch, BadRequest, RegisterAccess
from machineserver.server.drivers.gdbremote.link import RemoteLink, guarded, refused
from machineserver.server.rsp import RspError
from machineserver.server.rsp.targetdesc import Reg, RegisterMap


class RemoteRegisters(RegisterAccess):
    def __init__(self, link: RemoteLink) -> None:
        self.link = link

    def register_names(self) -> Sequence[str]:
        return self.link.regmap.names() if self.link.regmap is not None else []

    def _resolve(self, regmap: RegisterMap, name: str) -> Reg:
        reg = regmap.resolve(name)
        if reg is None:
            raise BadRequest(f"unknown register {name!r} (the remote's target.xml has no such register)",
                             field="name")
        return reg

    @guarded
    async def read_registers(self, names: Sequence[str] | None = None) -> dict[str, int]:
        async with self.link.op:
            self.link.require_inspectable("read registers")
            regmap = self.link.regmap
            assert regmap is not None
            wanted = list(regmap.names()) if names is None else list(names)
            regs = [self._resolve(regmap, n) for n in wanted]
            stub = self.link.stub()
            g = regmap.decode_g(await stub.read_all_registers()) if any(r.in_g for r in regs) else None
            out: dict[str, int] = {}
            for name, reg in zip(wanted, regs, strict=True):
                if g is not None and reg.name in g:
                    out[name] = g[reg.name]
                else:
                    out[name] = int.from_bytes(await stub.read_register(reg.number), "little")
            return out

    @guarded
    async def write_register(self, name: str, value: int) -> None:
        async with self.link.op:
            self.link.require_inspectable("write registers")
            regmap = self.link.regmap
            assert regmap is not None
            reg = self._resolve(regmap, name)
            if not 0 <= value < 1 << (8 * reg.size):
                raise BadRequest(f"value 0x{value:x} does not fit {name}", field="value")
            if reg.name == "pc" and self.link.arch is Arch.ARM_CORTEX_M:
                value &= ~1
            try:
                await self.link.write_register(reg.name, value)
            except RspError as exc:
                if not refused(exc):
                    raise
                raise BadRequest(f"the remote refused to write {name}: {exc}", field="name") from None
