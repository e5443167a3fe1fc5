"""Snapshots on Unicorn: capture and restore a whole machine (CPU registers, core
peripherals, UARTs, every memory region, the loaded image, the counters) in the format of
:mod:`.snapshot_format`. Collected coverage is not part of a snapshot: it is kept.

Both directions are incremental (:mod:`.snapshot_pages`): a save copies and packs only
the pages written since the last save or restore, a restore writes only the pages that
differ; the loaded image is packed once per image and unpacked only when it changes.
Blobs stay self-contained (every non-zero page is in each one).

Where the work runs: the machine's lock is held only to read the machine (registers,
peripherals, the pages that changed) or to write it; packing and unpacking happen
outside it. Small work (up to :data:`INLINE_PAGES` pages to pack or unpack, the
comparison of up to :data:`INLINE_RAM` of RAM) runs on the event loop, where a thread hop
would cost more than the work; anything larger runs on a thread. One save or restore at a
time per machine.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass

from machineserver.server.drivers.base import (
    BadRequest,
    MachineState,
    ProgramImage,
    Segment,
    Snapshots,
)
from machineserver.server.drivers.unicorn import snapshot_format as fmt
from machineserver.server.drivers.unicorn.arch import JsonState
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext, driver_errors
from machineserver.server.drivers.unicorn.run_control import UnicornRunControl
from machineserver.server.drivers.unicorn.slicer import Slicer
from machineserver.server.drivers.unicorn.snapshot_format_check import check_state
from machineserver.server.drivers.unicorn.snapshot_pages import (
    Changes,
    Collected,
    PageTracker,
    count,
    pack_changes,
    unpack_pages,
)

INLINE_PAGES = 16  # pages (un)packed on the event loop; more go to a thread
INLINE_RAM = 32 << 20  # boards with more memory than this are compared on a thread
INLINE_BLOB = 256 * 1024  # smaller blobs are decoded on the event loop
INLINE_IMAGE = 64 * 1024  # program images up to this size are (un)packed on the event loop


class ImageCache:
    """The last program image packed or unpacked, both ways, so that saving or restoring
    the same image again costs a comparison, not a (de)compression. The pair is one
    attribute: replaced at once, even from a thread."""

    def __init__(self) -> None:
        self._pair: tuple[ProgramImage, fmt.PackedImage] | None = None

    def holds(self, image: ProgramImage | fmt.PackedImage | None) -> bool:
        """Whether packing or unpacking ``image`` is free (cached, or nothing)."""
        pair = self._pair
        return image is None or (pair is not None and image in pair)

    def pack(self, image: ProgramImage | None) -> fmt.PackedImage | None:
        if image is None:
            return None
        pair = self._pair
        if pair is None or image is not pair[0]:
            segments = tuple(fmt.PackedSegment(s.address, len(s.data), fmt.pack(s.data)) for s in image.segments)
            pair = self._pair = image, fmt.PackedImage(segments, image.entry, image.arch)
        return pair[1]

    def unpack(self, packed: fmt.PackedImage | None) -> ProgramImage | None:
        """Corrupt when a segment does not unpack to its length."""
        if packed is None:
            return None
        pair = self._pair
        if pair is None or packed != pair[1]:
            segments = tuple(Segment(s.address, fmt.unpack(s.packed, s.length)) for s in packed.segments)
            pair = self._pair = ProgramImage(segments, packed.entry, packed.arch), packed
        return pair[0]


def _image_size(image: ProgramImage | fmt.PackedImage | None) -> int:
    if isinstance(image, ProgramImage):
        return sum(len(s.data) for s in image.segments)
    return sum(s.length for s in image.segments) if image else 0


@dataclass(frozen=True)
class _Saving:
    """A machine as read under its lock, for a save: the rest is packing and encoding."""

    collected: Collected
    regs: dict[str, int]
    core: JsonState
    uarts: dict[str, JsonState]
    instructions: int
    cycles: int
    exact: bool
    image: ProgramImage | None


class UnicornSnapshots(Snapshots):
    def __init__(self, ctx: MachineContext, slicer: Slicer, run_control: UnicornRunControl) -> None:
        self._ctx = ctx
        self._slicer = slicer
        self._run_control = run_control
        self._regions = fmt.board_regions(ctx.board)
        self._pages = PageTracker([size for _, _, size in self._regions])
        self._images = ImageCache()
        self._tracked: weakref.ref[BoardInstance] | None = None  # the instance the baseline is of
        self._serial = asyncio.Lock()  # one save or restore at a time
        self._compare_off_loop = sum(size for _, _, size in self._regions) > INLINE_RAM

    def _tracker(self, inst: BoardInstance) -> PageTracker:
        """The page tracker, its baseline forgotten when the machine was powered on again
        since (a new engine, all memory zero). A baseline always stays correct, only less
        useful: pages are compared, never assumed clean."""
        if self._tracked is None or self._tracked() is not inst:
            self._pages.forget()
            self._tracked = weakref.ref(inst)
        return self._pages

    # ------------------------------------------------------------------ save
    async def save_state(self) -> bytes:
        ctx = self._ctx
        ctx.require(MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED)
        async with self._serial:
            saving = await ctx.locked("save a snapshot", self._collect, off_loop=self._compare_off_loop)
            heavy = count(saving.collected.changes) > INLINE_PAGES or (
                not self._images.holds(saving.image) and _image_size(saving.image) > INLINE_IMAGE)
            if heavy:
                return await asyncio.to_thread(self._encode, saving)
            return self._encode(saving)

    def _collect(self, inst: BoardInstance) -> _Saving:
        ctx = self._ctx
        return _Saving(
            self._tracker(inst).collect(inst.ram), regs=inst.core.save_regs(), core=inst.core.get_state(),
            uarts={name: uart.get_state() for name, uart in inst.uarts.items()},
            instructions=ctx.clock.instructions, cycles=ctx.clock.cycles, exact=ctx.clock.exact,
            image=ctx.image)

    def _encode(self, s: _Saving) -> bytes:
        with driver_errors("save a snapshot"):
            pages = self._pages.commit(s.collected, pack_changes(s.collected.changes))
            board = self._ctx.board
            return fmt.encode(fmt.MachineSnapshot(
                board=board.name, arch=board.arch.value, regs=s.regs, core=s.core, uarts=s.uarts,
                instructions=s.instructions, cycles=s.cycles, exact=s.exact, regions=self._regions,
                pages=pages, image=self._images.pack(s.image)))

    # ------------------------------------------------------------------ restore
    async def restore_state(self, blob: bytes) -> None:
        ctx = self._ctx
        ctx.require_on()
        board = ctx.board
        if len(blob) <= INLINE_BLOB and fmt.version_of(blob) == fmt.VERSION:  # version 1 inflates
            snap = fmt.decode(blob, board)
        else:
            snap = await asyncio.to_thread(fmt.decode, blob, board)
        try:  # a blob stored before imports were checked whole: its state is checked here
            check_state(snap, board)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"corrupt snapshot: {exc}", field="snapshot") from None
        async with self._serial:
            inst = ctx.instance
            if inst is not None:
                self._tracker(inst)
            differing = self._pages.differing(snap.pages)
            heavy = sum(map(len, differing)) > INLINE_PAGES or (
                not self._images.holds(snap.image) and _image_size(snap.image) > INLINE_IMAGE)
            # everything that can be refused is, before anything is written
            if heavy:
                prepared = await asyncio.to_thread(self._prepare, snap, differing)
            else:
                prepared = self._prepare(snap, differing)
            await self._run_control.halt()  # a bad blob above leaves a running machine running
            await ctx.locked("restore a snapshot", lambda inst: self._restore(inst, snap, prepared),
                             off_loop=self._compare_off_loop)

    def _prepare(self, snap: fmt.MachineSnapshot,
                 differing: list[list[int]]) -> tuple[int, Changes, ProgramImage | None]:
        with driver_errors("restore a snapshot"):
            try:
                generation = self._pages.generation
                pages = unpack_pages(snap.pages, self._pages.sizes, differing)
                return generation, pages, self._images.unpack(snap.image)
            except fmt.Corrupt as exc:
                raise BadRequest(f"corrupt snapshot: {exc}", field="snapshot") from None

    def _restore(self, inst: BoardInstance, snap: fmt.MachineSnapshot,
                 prepared: tuple[int, Changes, ProgramImage | None]) -> None:
        ctx = self._ctx
        generation, pages, image = prepared
        self._slicer.forget_replay()
        if ctx.collector is not None:
            ctx.collector.forget_last()  # collected coverage is kept: not part of snapshots
        try:
            written = self._tracker(inst).apply(inst.ram, snap.pages, (generation, pages))
        except fmt.Corrupt as exc:  # prepared again (the machine was powered on again meanwhile)
            raise BadRequest(f"corrupt snapshot: {exc}", field="snapshot") from None
        if written:
            inst.uc.ctl_flush_tb()  # memory was written behind the engine's back
        ctx.image = image
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
