"""Watchpoints on Unicorn: memory hooks (``UC_HOOK_MEM_READ``/``WRITE``) limited to the
watched range, widened by 7 bytes below it so an 8-byte access that starts before the
range and overlaps it is seen too; the callback checks the real overlap. The run loop
completes the access before it reports the stop (see ``Slicer.advance``). The table
outlives power cycles, like breakpoints."""

from __future__ import annotations

from collections.abc import Callable

from unicorn import unicorn_const as ucc

from machineserver.server.drivers.base import (
    WATCH_SIZES,
    BadRequest,
    MachineState,
    StopInfo,
    StopReason,
    WatchKind,
    Watchpoints,
)
from machineserver.server.drivers.unicorn.arch import CoreHost, Engine
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext

WatchKey = tuple[int, int, WatchKind]  # (address, size, kind)


class UnicornWatchpoints(Watchpoints):
    def __init__(self, ctx: MachineContext, host: CoreHost) -> None:
        self._ctx = ctx
        self._host = host
        self._hooks: dict[WatchKey, list[int]] = {}  # hook handles ([] while off)

    # ------------------------------------------------------------------ for the machine
    def install(self, inst: BoardInstance) -> None:
        """Hook every watchpoint on a new engine (power_on; the lock is held)."""
        for key in self._hooks:
            self._hooks[key] = self._add_hooks(inst, key)

    def forget_hooks(self) -> None:
        self._hooks = {key: [] for key in self._hooks}

    def _callback(self, inst: BoardInstance, address: int, size: int,
                  access: str) -> Callable[[Engine, int, int, int, int, object], None]:
        gate = self._ctx.gate

        def on_access(uc: Engine, kind: int, a: int, s: int, value: int, _ud: object) -> None:
            if gate.quiet or not (a < address + size and a + s > address):
                return
            self._host.hook_stop(StopInfo(StopReason.WATCHPOINT, pc=inst.core.pc(), watch_address=a,
                                          watch_value=value if access == "write" else None,
                                          watch_access=access))
        return on_access

    def _add_hooks(self, inst: BoardInstance, key: WatchKey) -> list[int]:
        address, size, kind = key
        uc = inst.uc
        lo, hi = max(address - 7, 0), address + size - 1
        hooks = []
        if kind in (WatchKind.READ, WatchKind.ACCESS):
            hooks.append(uc.hook_add(ucc.UC_HOOK_MEM_READ, self._callback(inst, address, size, "read"),
                                     None, lo, hi))
        if kind in (WatchKind.WRITE, WatchKind.ACCESS):
            hooks.append(uc.hook_add(ucc.UC_HOOK_MEM_WRITE, self._callback(inst, address, size, "write"),
                                     None, lo, hi))
        uc.ctl_flush_tb()  # memory hooks are compiled into translated blocks
        return hooks

    # ------------------------------------------------------------------ Watchpoints
    @staticmethod
    def _watch_kind(kind: WatchKind | str) -> WatchKind:
        try:
            return WatchKind(kind)
        except ValueError:
            raise BadRequest(f"unknown watchpoint kind {kind!r} (known: "
                             f"{', '.join(k.value for k in WatchKind)})", field="kind") from None

    async def set_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        if size not in WATCH_SIZES:
            raise BadRequest(f"watchpoint size {size} is not one of {', '.join(map(str, WATCH_SIZES))}",
                             field="size")
        if self._ctx.board.region_at(address, size) is None:
            raise BadRequest(f"0x{address:08x}+{size} is not in a memory region of board "
                             f"{self._ctx.board.name}", field="address")
        key = (address, size, self._watch_kind(kind))
        if key in self._hooks:
            return
        if self._ctx.state == MachineState.OFF:
            self._hooks[key] = []
            return

        def add(inst: BoardInstance) -> None:
            self._hooks[key] = self._add_hooks(inst, key)

        await self._ctx.locked("set a watchpoint", add)

    async def clear_watchpoint(self, address: int, size: int, kind: WatchKind) -> None:
        key = (address, size, self._watch_kind(kind))
        if key not in self._hooks:
            return
        if not self._hooks[key]:
            del self._hooks[key]
            return

        def remove(inst: BoardInstance) -> None:
            for handle in self._hooks.pop(key, []):
                inst.uc.hook_del(handle)
            inst.uc.ctl_flush_tb()

        await self._ctx.locked("clear a watchpoint", remove)
