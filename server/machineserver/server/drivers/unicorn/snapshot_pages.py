"""Guest memory as snapshot pages: only what changed is copied, packed or written back.

A :class:`PageTracker` keeps, per machine, the *baseline*: the memory image (pages of
:data:`~.snapshot_format.PAGE` bytes per region, all-zero pages absent) that the guest's
memory equalled at the last save or restore, both raw (to compare against) and packed
(what a blob stores). Every save or restore finds the pages where the guest's memory now
differs from the baseline by comparing the board's RAM in place (the regions are mapped
on memory of ours, see :func:`.context.map_ram`; ``bytes.startswith`` compares a page or
a 64 KiB chunk without copying it: ~0.1 ms for 4 MiB of mostly untouched RAM).

* Save: :meth:`PageTracker.collect` (under the machine's lock) copies the pages that
  differ; :func:`pack_changes` packs them (anywhere: it touches nothing shared, so many
  pages are packed on a thread, off the lock); :meth:`PageTracker.commit` makes the new
  image out of the baseline it was collected against and the packed changes, and makes it
  the baseline. Every other page of the image is the baseline's, already packed.
* Restore: :meth:`PageTracker.differing` lists the pages whose packed bytes differ between
  the target image and the baseline (packing is deterministic, so equal packed pages hold
  equal data), :func:`unpack_pages` unpacks and checks them before anything is written
  (anywhere, like packing), and :meth:`PageTracker.apply` (under the lock) writes those and
  the pages dirtied since the baseline (their data is the baseline's, or zeros).

Nothing here hooks the engine: no write tracking slows the guest down, and no write that
bypasses the guest (the debugger, semihosting, a program load) can be missed, because
the comparison is exact. A baseline is never trusted for more than it is: whatever it
holds, the images made against it are exact. (Unicorn 2.1.4's write-protect hooks were
measured for this and rejected: ``mem_protect`` on one page of a 4 MiB region splits and
copies the region, ~7 ms a page, and the faulting write is dropped.)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from machineserver.server.drivers.unicorn.snapshot_format import PAGE, Pages, pack, unpack

CHUNK = 16 * PAGE  # compared at once where the baseline has no page
_ZERO = bytes(CHUNK)

# per region: page number -> its bytes (raw or packed, by context); None: all zero
Changes = list[dict[int, bytes | None]]


def count(changes: Changes) -> int:
    return sum(len(region) for region in changes)


def pack_changes(changes: Changes) -> Changes:
    """The same changes, packed (pure: safe on any thread)."""
    return [{n: None if data is None else pack(data) for n, data in region.items()} for region in changes]


def unpack_pages(target: Sequence[Pages], sizes: Sequence[int], numbers: Sequence[Sequence[int]]) -> Changes:
    """The pages ``numbers`` of ``target``, unpacked (None: absent, all zero). Pure: safe on
    any thread. Corrupt when one does not unpack to its page's size."""
    out: Changes = []
    for pages, size, wanted in zip(target, sizes, numbers, strict=True):
        region: dict[int, bytes | None] = {}
        for n in wanted:
            p = pages.get(n)
            region[n] = None if p is None else unpack(p, min(PAGE, size - n * PAGE))
        out.append(region)
    return out


@dataclass(frozen=True)
class Collected:
    """What a save found: the pages that differ from ``base`` (raw), for ``generation``."""

    generation: int
    base: tuple[Pages, ...]
    changes: Changes


class PageTracker:
    """The baseline of one machine's memory (see the module docstring). The guest's memory
    is read and written only under the machine's lock (collect, apply). The baseline's raw
    and packed halves always change together, under a lock of the tracker's own: a commit
    that finishes on a thread after its caller was cancelled cannot tear them apart (it
    also loses to anything that replaced the baseline since its collection)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = tuple(sizes)
        self.generation = 0
        self._lock = threading.RLock()
        self.forget()

    def forget(self) -> None:
        """Baseline: all memory zero (as on a new engine)."""
        with self._lock:
            self._raw: list[dict[int, bytes]] = [{} for _ in self.sizes]
            self._packed: tuple[Pages, ...] = tuple({} for _ in self.sizes)
            self.generation += 1

    def _check(self, ram: Sequence[memoryview]) -> None:
        if tuple(len(view) for view in ram) != self.sizes:
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

    # ------------------------------------------------------------------ save
    def collect(self, ram: Sequence[memoryview]) -> Collected:
        """Copies of the pages where ``ram`` differs from the baseline (None: now zero)."""
        self._check(ram)
        with self._lock:
            changes: Changes = []
            for region, view in enumerate(ram):
                size = len(view)
                found: dict[int, bytes | None] = {}
                for n in self.dirty(region, view):
                    data = bytes(view[n * PAGE:min((n + 1) * PAGE, size)])
                    found[n] = None if _ZERO.startswith(data) else data
                changes.append(found)
            return Collected(self.generation, self._packed, changes)

    def commit(self, collected: Collected, packed: Changes) -> tuple[Pages, ...]:
        """The image ``collected`` describes, its changes packed as ``packed`` (from
        :func:`pack_changes`); it becomes the baseline unless the baseline was replaced
        since the collection. The dicts returned are never modified afterwards."""
        image = []
        for base, changed in zip(collected.base, packed, strict=True):
            if not changed:
                image.append(base)
                continue
            pages = dict(base)
            for n, p in changed.items():
                if p is None:
                    pages.pop(n, None)
                else:
                    pages[n] = p
            image.append(pages)
        result = tuple(image)
        with self._lock:
            if collected.generation == self.generation:
                raws = []
                for raw, changed in zip(self._raw, collected.changes, strict=True):
                    if changed:
                        raw = dict(raw)
                        for n, data in changed.items():
                            if data is None:
                                raw.pop(n, None)
                            else:
                                raw[n] = data
                    raws.append(raw)
                self._raw, self._packed = raws, result
                self.generation += 1
        return result

    def capture(self, ram: Sequence[memoryview]) -> tuple[Pages, ...]:
        """collect, pack and commit in one go."""
        collected = self.collect(ram)
        return self.commit(collected, pack_changes(collected.changes))

    # ------------------------------------------------------------------ restore
    def differing(self, target: Sequence[Pages]) -> list[list[int]]:
        """Per region, the pages whose packed bytes differ between ``target`` and the
        baseline (present in one only, or different)."""
        if len(target) != len(self.sizes):
            raise ValueError("a page map per region expected")
        out: list[list[int]] = []
        with self._lock:
            packed = self._packed
        for base, want in zip(packed, target, strict=True):
            if want is base:
                out.append([])
                continue
            numbers = [n for n, p in want.items() if base.get(n) != p]
            numbers += [n for n in base if n not in want]
            out.append(numbers)
        return out

    def prepare(self, target: Sequence[Pages]) -> tuple[int, Changes]:
        """(generation, the target's pages that differ from the baseline, unpacked):
        what :meth:`apply` needs besides the guest's memory. Corrupt as unpack_pages."""
        with self._lock:
            generation, differing = self.generation, self.differing(target)
        return generation, unpack_pages(target, self.sizes, differing)

    def apply(self, ram: Sequence[memoryview], target: Sequence[Pages], prepared: tuple[int, Changes]) -> int:
        """Turn the guest's memory into ``target`` (``prepared`` from :meth:`prepare`, for
        the baseline as it still is: prepared again here otherwise); ``target`` becomes the
        baseline. Returns how many pages were written."""
        self._check(ram)
        with self._lock:
            return self._apply(ram, target, prepared)

    def _apply(self, ram: Sequence[memoryview], target: Sequence[Pages], prepared: tuple[int, Changes]) -> int:
        generation, unpacked = prepared
        if generation != self.generation:
            generation, unpacked = self.prepare(target)
        written = 0
        raws = []
        for region, view in enumerate(ram):
            writes, want, old, size = dict(unpacked[region]), target[region], self._raw[region], self.sizes[region]
            for n in self.dirty(region, view):
                if n not in writes:  # the target's page is the baseline's (or both zero)
                    writes[n] = old.get(n)
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
            raws.append(raw)
        self._raw, self._packed = raws, tuple(target)
        self.generation += 1
        return written
