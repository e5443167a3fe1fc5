"""Snapshots on Unicorn: capture and restore a whole machine (CPU registers, core
peripherals, UARTs, every memory region, the loaded image, the counters) in the format of
:mod:`.snapshot_format`. Collected coverage is not part of a snapshot: it is kept."""

from __future__ import annotations

import asyncio

from machineserver.server.drivers.base import BadRequest, MachineState, Snapshots
from machineserver.server.drivers.unicorn import snapshot_format as fmt
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext
from machineserver.server.drivers.unicorn.run_control import UnicornRunControl
from machineserver.server.drivers.unicorn.slicer import Slicer


class UnicornSnapshots(Snapshots):
    def __init__(self, ctx: MachineContext, slicer: Slicer, run_control: UnicornRunControl) -> None:
        self._ctx = ctx
        self._slicer = slicer
        self._run_control = run_control

    async def save_state(self) -> bytes:
        self._ctx.require(MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED)
        return await self._ctx.locked("save a snapshot", self._save, off_loop=True)

    def _save(self, inst: BoardInstance) -> bytes:
        ctx = self._ctx
        regions = fmt.board_regions(ctx.board)
        return fmt.encode(fmt.MachineSnapshot(
            board=ctx.board.name, arch=ctx.board.arch.value,
            regs=inst.core.save_regs(), core=inst.core.get_state(),
            uarts={name: uart.get_state() for name, uart in inst.uarts.items()},
            instructions=ctx.clock.instructions, cycles=ctx.clock.cycles, exact=ctx.clock.exact,
            regions=regions, memory=tuple(bytes(inst.uc.mem_read(base, size)) for _, base, size in regions),
            image=ctx.image))

    async def restore_state(self, blob: bytes) -> None:
        ctx = self._ctx
        ctx.require_on()
        snap = await asyncio.to_thread(fmt.decode, bytes(blob))
        fmt.check_fits(snap, ctx.board)
        await self._run_control.halt()  # a bad blob above leaves a running machine running
        await ctx.locked("restore a snapshot", lambda inst: self._restore(inst, snap), off_loop=True)

    def _restore(self, inst: BoardInstance, snap: fmt.MachineSnapshot) -> None:
        ctx = self._ctx
        self._slicer.forget_replay()
        if ctx.collector is not None:
            ctx.collector.forget_last()  # collected coverage is kept: not part of snapshots
        for (_, base, _), data in zip(snap.regions, snap.memory, strict=True):
            inst.uc.mem_write(base, data)
        inst.uc.ctl_flush_tb()
        ctx.image = snap.image
        try:
            inst.core.set_state(snap.core)
            inst.core.restore_regs(snap.regs)
            for name, state in snap.uarts.items():
                if name in inst.uarts:
                    inst.uarts[name].set_state(state)
        except (KeyError, TypeError, ValueError) as exc:
            self._slicer.reset_board()  # not half restored: reset, with the snapshot's memory
            ctx.state = MachineState.HALTED
            raise BadRequest(f"corrupt snapshot: bad CPU or peripheral state ({exc!r})",
                             field="snapshot") from None
        ctx.clock.instructions, ctx.clock.cycles, ctx.clock.exact = snap.instructions, snap.cycles, snap.exact
        ctx.state = MachineState.HALTED
