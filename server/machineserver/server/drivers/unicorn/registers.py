"""Register access on Unicorn: by the arch core's names and aliases (``r13``/``sp``,
``a0``/``x10``), in HALTED, EXITED and FAULTED."""

from __future__ import annotations

from collections.abc import Sequence

from machineserver.server.drivers.base import Arch, BadRequest, MachineState, RegisterAccess
from machineserver.server.drivers.unicorn import cortexm, riscv
from machineserver.server.drivers.unicorn.arch import ArchCore
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext

READABLE = (MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED)


class UnicornRegisters(RegisterAccess):
    def __init__(self, ctx: MachineContext) -> None:
        self._ctx = ctx

    def register_names(self) -> Sequence[str]:
        if self._ctx.board.arch == Arch.ARM_CORTEX_M:
            return cortexm.REGISTER_NAMES
        return riscv.REGISTER_NAMES

    def _resolve(self, core: ArchCore, name: str) -> str:
        canon = core.resolve(name)
        if canon is None:
            raise BadRequest(f"no register named {name!r} on {self._ctx.board.arch.value} "
                             f"(known: {', '.join(core.register_names)})", field="name")
        return canon

    async def read_registers(self, names: Sequence[str] | None = None) -> dict[str, int]:
        self._ctx.require(*READABLE)

        def read(inst: BoardInstance) -> dict[str, int]:
            core = inst.core
            wanted = list(names) if names else list(core.register_names)
            canon = [self._resolve(core, n) for n in wanted]
            return {w: core.read_reg(c) for w, c in zip(wanted, canon, strict=True)}

        return await self._ctx.locked("read registers", read)

    async def write_register(self, name: str, value: int) -> None:
        self._ctx.require(*READABLE)

        def write(inst: BoardInstance) -> None:
            core = inst.core
            canon = self._resolve(core, name)
            core.write_reg(canon, value)
            if canon == core.resolve("pc") and self._ctx.collector is not None:
                self._ctx.collector.forget_last()  # the next block does not follow the last

        await self._ctx.locked("write a register", write)
