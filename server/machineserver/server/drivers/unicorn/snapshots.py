"""Snapshots on Unicorn: capture and restore a whole machine (CPU registers, core
peripherals, UARTs, every memory region, the loaded image, the counters) in the format of
:mod:`.snapshot_format`. Collected coverage is not part of a snapshot: it is kept.

Both directions are incremental (:mod:`.snapshot_pages`): a save copies and packs only
the pages written since the last save or restore, a restore writes only the pages that
differ; the loaded image is packed once per image and unpacked only when it changes.
Blobs stay self-contained (every non-zero page is in each one).
"""

from __future__ import annotations

import asyncio
import weakref

from machineserver.server.drivers.base import (
    BadRequest,
    MachineState,
    ProgramImage,
    Segment,
    Snapshots,
)
from machineserver.server.drivers.unicorn import snapshot_format as fmt
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext
from machineserver.server.drivers.unicorn.run_control import UnicornRunControl
from machineserver.server.drivers.unicorn.slicer import Slicer
from machineserver.server.drivers.unicorn.snapshot_pages import PageTracker

DECODE_INLINE = 256 * 1024  # smaller blobs are decoded on the event loop (no thread hop)


class ImageCache:
    """The last program image packed or unpacked, both ways, so that saving or restoring
    the same image again costs a comparison, not a (de)compression."""

    def __init__(self) -> None:
        self._image: ProgramImage | None = None
        self._packed: fmt.PackedImage | None = None

    def pack(self, image: ProgramImage | None) -> fmt.PackedImage | None:
        if image is None:
            return None
        if image is not self._image or self._packed is None:
            segments = tuple(fmt.PackedSegment(s.address, len(s.data), fmt.pack(s.data)) for s in image.segments)
            self._image, self._packed = image, fmt.PackedImage(segments, image.entry, image.arch)
        return self._packed

    def unpack(self, packed: fmt.PackedImage | None) -> ProgramImage | None:
        """Corrupt when a segment does not unpack to its length."""
        if packed is None:
            return None
        if packed != self._packed or self._image is None:
            segments = tuple(Segment(s.address, fmt.unpack(s.packed, s.length)) for s in packed.segments)
            return ProgramImage(segments, packed.entry, packed.arch)
        return self._image

    def remember(self, image: ProgramImage | None, packed: fmt.PackedImage | None) -> None:
        if image is not None and packed is not None:
            self._image, self._packed = image, packed


class UnicornSnapshots(Snapshots):
    def __init__(self, ctx: MachineContext, slicer: Slicer, run_control: UnicornRunControl) -> None:
        self._ctx = ctx
        self._slicer = slicer
        self._run_control = run_control
        self._regions = fmt.board_regions(ctx.board)
        self._pages = PageTracker([size for _, _, size in self._regions])
        self._images = ImageCache()
        self._tracked: weakref.ref[BoardInstance] | None = None  # the instance the baseline is of

    def _tracker(self, inst: BoardInstance) -> PageTracker:
        """The page tracker, its baseline forgotten when the machine was powered on again
        since (a new engine, all memory zero). A baseline always stays correct, only less
        useful: pages are compared, never assumed clean."""
        if self._tracked is None or self._tracked() is not inst:
            self._pages.forget()
            self._tracked = weakref.ref(inst)
        return self._pages

    async def save_state(self) -> bytes:
        self._ctx.require(MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED)
        return await self._ctx.locked("save a snapshot", self._save, off_loop=True)

    def _save(self, inst: BoardInstance) -> bytes:
        ctx = self._ctx
        return fmt.encode(fmt.MachineSnapshot(
            board=ctx.board.name, arch=ctx.board.arch.value,
            regs=inst.core.save_regs(), core=inst.core.get_state(),
            uarts={name: uart.get_state() for name, uart in inst.uarts.items()},
            instructions=ctx.clock.instructions, cycles=ctx.clock.cycles, exact=ctx.clock.exact,
            regions=self._regions, pages=self._tracker(inst).capture(inst.ram),
            image=self._images.pack(ctx.image)))

    async def restore_state(self, blob: bytes) -> None:
        ctx = self._ctx
        ctx.require_on()
        board = ctx.board
        if len(blob) <= DECODE_INLINE:
            snap = fmt.decode(blob, board)
        else:
            snap = await asyncio.to_thread(fmt.decode, blob, board)
        await self._run_control.halt()  # a bad blob above leaves a running machine running
        await ctx.locked("restore a snapshot", lambda inst: self._restore(inst, snap), off_loop=True)

    def _restore(self, inst: BoardInstance, snap: fmt.MachineSnapshot) -> None:
        ctx = self._ctx
        pages = self._tracker(inst)
        try:  # everything that can be refused is, before anything is written
            plan = pages.plan(inst.ram, snap.pages)
            image = self._images.unpack(snap.image)
        except fmt.Corrupt as exc:
            raise BadRequest(f"corrupt snapshot: {exc}", field="snapshot") from None
        self._slicer.forget_replay()
        if ctx.collector is not None:
            ctx.collector.forget_last()  # collected coverage is kept: not part of snapshots
        if pages.apply(inst.ram, snap.pages, plan).pages:
            inst.uc.ctl_flush_tb()  # memory was written behind the engine's back
        ctx.image = image
        self._images.remember(image, snap.image)
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
