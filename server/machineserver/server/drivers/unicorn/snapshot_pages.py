"""Guest memory as snapshot pages: only what changed is copied, packed or written back.

A :class:`PageTracker` keeps, per machine, the *baseline*: the memory image (pages of
:data:`~.snapshot_format.PAGE` bytes per region, all-zero pages absent) that the guest's
memory equalled at the last save or restore, both raw (to compare against) and packed
(what a blob stores). Every save or restore first finds the pages where the guest's memory
now differs from the baseline, by comparing the board's RAM in place (the regions are
mapped on memory of ours, see :func:`.context.map_ram`; ``bytes.startswith`` compares a
page or a 64 KiB chunk without copying it: ~0.1 ms for 8 MiB of mostly untouched RAM).

* :meth:`PageTracker.capture` (save): copies and packs only those pages; every other
  page of the new image is the baseline's, already packed.
* :meth:`PageTracker.apply` (restore): writes only the pages where the target image
  differs from the guest's memory: the ones dirtied since the baseline, and the ones
  where the target's packed page differs from the baseline's. Packed pages are compared
  as bytes (packing is deterministic, so equal packed pages hold equal data); every page
  that will be written is unpacked and checked before the first one is written.

Nothing here hooks the engine: no write tracking slows the guest down, and no write that
bypasses the guest (the debugger, semihosting, a program load) can be missed, because
the comparison is exact. (Unicorn 2.1.4's write-protect hooks were measured for this and
rejected: ``mem_protect`` on one page of a 4 MiB region splits and copies the region,
~7 ms a page, and the faulting write is dropped.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from machineserver.server.drivers.unicorn.snapshot_format import PAGE, Corrupt, Pages, pack, unpack

CHUNK = 16 * PAGE  # compared at once where the baseline has no page
_ZERO = bytes(CHUNK)


@dataclass(frozen=True)
class Applied:
    """What a restore wrote."""

    pages: int  # pages written into the guest's memory


class PageTracker:
    """The baseline of one machine's memory (see the module docstring). Not thread-safe:
    used under the machine's lock."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self._sizes = tuple(sizes)
        self.forget()

    def forget(self) -> None:
        """Baseline: all memory zero (as on a new engine)."""
        self._raw: list[dict[int, bytes]] = [{} for _ in self._sizes]
        self._packed: tuple[Pages, ...] = tuple({} for _ in self._sizes)

    @property
    def packed(self) -> tuple[Pages, ...]:
        """The baseline, packed (do not modify)."""
        return self._packed

    def _check(self, ram: Sequence[memoryview]) -> None:
        if tuple(len(view) for view in ram) != self._sizes:
            raise ValueError("the memory regions are not the ones this tracker was made for")

    def dirty(self, region: int, view: memoryview) -> list[int]:
        """Page numbers of ``region`` where ``view`` differs from the baseline."""
        raw = self._raw[region]
        size = len(view)
        chunks = {n * PAGE // CHUNK for n in raw}
        out = []
        for start in range(0, size, CHUNK):
            end = min(start + CHUNK, size)
            if start // CHUNK not in chunks and _ZERO.startswith(view[start:end]):
                continue
            for n in range(start // PAGE, (end + PAGE - 1) // PAGE):
                offset = n * PAGE
                page = view[offset:min(offset + PAGE, size)]
                if not raw.get(n, _ZERO).startswith(page):
                    out.append(n)
        return out

    def capture(self, ram: Sequence[memoryview]) -> tuple[Pages, ...]:
        """The guest's memory now, packed per region; it becomes the baseline. Copies
        and packs only the pages that differ from the baseline; the dicts returned are
        never modified afterwards."""
        self._check(ram)
        packed = list(self._packed)
        for region, view in enumerate(ram):
            dirty = self.dirty(region, view)
            if not dirty:
                continue
            raw, pages = self._raw[region], dict(packed[region])
            size = len(view)
            for n in dirty:
                offset = n * PAGE
                data = bytes(view[offset:min(offset + PAGE, size)])
                if _ZERO.startswith(data):
                    raw.pop(n, None)
                    pages.pop(n, None)
                else:
                    raw[n] = data
                    pages[n] = pack(data)
            packed[region] = pages
        self._packed = tuple(packed)
        return self._packed

    def plan(self, ram: Sequence[memoryview], target: Sequence[Pages]) -> list[dict[int, bytes | None]]:
        """Per region, the pages to write to turn the guest's memory into ``target``:
        page number -> its data (None: zeros). Corrupt when a packed page to be written
        does not unpack to its page's size. Writes nothing."""
        self._check(ram)
        if len(target) != len(self._sizes):
            raise ValueError("a page map per region expected")
        plan: list[dict[int, bytes | None]] = []
        for region, view in enumerate(ram):
            base, want, size = self._packed[region], target[region], self._sizes[region]
            numbers = set(self.dirty(region, view))
            if want is not base:
                numbers.update(n for n, p in want.items() if base.get(n) != p)
                numbers.update(n for n in base if n not in want)
            writes: dict[int, bytes | None] = {}
            for n in numbers:
                p = want.get(n)
                writes[n] = None if p is None else unpack(p, min(PAGE, size - n * PAGE))
            plan.append(writes)
        return plan

    def apply(self, ram: Sequence[memoryview], target: Sequence[Pages],
              plan: list[dict[int, bytes | None]]) -> Applied:
        """Write ``plan`` (from :meth:`plan` for the same target, nothing written since)
        into the guest's memory; ``target`` becomes the baseline."""
        written = 0
        raw_all = []
        for region, view in enumerate(ram):
            writes, want, size = plan[region], target[region], self._sizes[region]
            old = self._raw[region]
            raw = {n: old[n] for n in want if n not in writes}
            for n, data in writes.items():
                offset = n * PAGE
                end = min(offset + PAGE, size)
                if data is None:
                    view[offset:end] = _ZERO[:end - offset]
                else:
                    view[offset:end] = data
                    raw[n] = data
                written += 1
            raw_all.append(raw)
        self._raw = raw_all
        self._packed = tuple(target)
        return Applied(written)


__all__ = ["Applied", "Corrupt", "PageTracker"]
