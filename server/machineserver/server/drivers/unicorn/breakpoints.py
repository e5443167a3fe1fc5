"""Breakpoints on Unicorn: a code hook on each address (``UC_HOOK_CODE`` limited to that
one address, so code elsewhere runs without Python). The table outlives power cycles:
breakpoints set while off are installed at power_on."""

from __future__ import annotations

from unicorn import unicorn_const as ucc

from machineserver.server.drivers.base import Breakpoints, MachineState, StopInfo, StopReason
from machineserver.server.drivers.unicorn.arch import CoreHost, Engine
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext


class UnicornBreakpoints(Breakpoints):
    def __init__(self, ctx: MachineContext, host: CoreHost) -> None:
        self._ctx = ctx
        self._host = host
        self._hooks: dict[int, int | None] = {}  # address -> hook handle (None while off)

    @staticmethod
    def _key(address: int) -> int:
        return address & ~1 & 0xFFFFFFFF  # Thumb addresses carry bit 0

    # ------------------------------------------------------------------ for the machine
    def install(self, inst: BoardInstance) -> None:
        """Hook every breakpoint on a new engine (power_on; the lock is held)."""
        for addr in self._hooks:
            self._hooks[addr] = self._add_hook(inst, addr)

    def forget_hooks(self) -> None:
        """The engine is gone (power_off): the breakpoints stay, their hooks do not."""
        self._hooks = dict.fromkeys(self._hooks)

    def step_off(self, pc: int) -> None:
        """Resuming at ``pc``: a breakpoint there does not stop the machine at once."""
        self._ctx.gate.skip_at = pc if pc in self._hooks else None

    def _add_hook(self, inst: BoardInstance, addr: int) -> int:
        handle = inst.uc.hook_add(ucc.UC_HOOK_CODE, self._on_code, None, addr, addr)
        inst.uc.ctl_remove_cache(addr, addr + 4)  # code translated before runs hooked now
        return handle

    def _on_code(self, uc: Engine, address: int, size: int, _ud: object) -> None:
        if self._ctx.gate.breakpoint_stops(address):
            self._host.hook_stop(StopInfo(StopReason.BREAKPOINT, pc=address))

    # ------------------------------------------------------------------ Breakpoints
    async def set_breakpoint(self, address: int, *, hardware: bool = False) -> None:
        addr = self._key(address)
        if addr in self._hooks:
            return
        if self._ctx.state == MachineState.OFF:
            self._hooks[addr] = None
            return

        def add(inst: BoardInstance) -> None:
            self._hooks[addr] = self._add_hook(inst, addr)

        await self._ctx.locked("set a breakpoint", add)

    async def clear_breakpoint(self, address: int) -> None:
        addr = self._key(address)
        if addr not in self._hooks:
            return
        if self._hooks[addr] is None:
            del self._hooks[addr]
            return

        def remove(inst: BoardInstance) -> None:
            handle = self._hooks.pop(addr, None)
            if handle is not None:
                inst.uc.hook_del(handle)
                inst.uc.ctl_remove_cache(addr, addr + 4)

        await self._ctx.locked("clear a breakpoint", remove)
