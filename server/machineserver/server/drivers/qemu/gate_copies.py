"""The plugin's copies of the lock-step watched ranges (``gate.watched``, see
msplugin.c, "Watched copies"), made at every VM stop: a mapped file with a header (the
ranges asked for, the stop the copies are of) and the data."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable

from machineserver.server.drivers.qemu.gate_channel import U32, U64

WATCH_MAGIC = b"MSWATCH\x01"
WATCH_HEADER = 4096
WATCH_DATA = 1 << 20
WATCH_RANGES = 16
_W_NRANGES, _W_CAPACITY, _W_COPIED, _W_FAILED, _W_RANGES = 8, 12, 16, 24, 64
_W_RANGE = struct.Struct("<QII")


class WatchedCopies:
    """One gate's copies file, mapped by :meth:`attach` when the plugin keeps one."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "gate.watched")
        self._page: mmap.mmap | None = None
        self._ranges: tuple[tuple[int, int], ...] = ()

    def attach(self) -> None:
        """Map the file the plugin made; left unmapped when it is not the plugin's."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size < WATCH_HEADER + WATCH_DATA:
                return
            page = mmap.mmap(fd, WATCH_HEADER + WATCH_DATA)
        finally:
            os.close(fd)
        if page[:8] != WATCH_MAGIC:
            page.close()
            return
        self._page = page

    def close(self) -> None:
        if self._page is not None:
            self._page.close()
            self._page = None

    def set_ranges(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Have the plugin copy these (address, size) memory ranges at every VM stop
        (empty: none). False, and none copied, when the plugin cannot (no copies file) or
        they do not fit (:data:`WATCH_RANGES` ranges, :data:`WATCH_DATA` bytes). The VM
        must be stopped."""
        wanted = tuple(ranges)
        page = self._page
        if page is None:
            return False
        if wanted == self._ranges:
            return True
        fits = (len(wanted) <= WATCH_RANGES
                and sum(size for _, size in wanted) <= WATCH_DATA)
        U32.pack_into(page, _W_NRANGES, 0)
        self._ranges = ()
        if not fits:
            return False
        offset = 0
        for i, (address, size) in enumerate(wanted):
            _W_RANGE.pack_into(page, _W_RANGES + _W_RANGE.size * i, address, size, offset)
            offset += size
        U32.pack_into(page, _W_NRANGES, len(wanted))
        self._ranges = wanted
        return True

    def of_stop(self, stops: int) -> list[bytes] | None:
        """The copied ranges' contents made at the VM stop that brought the gate's stop
        count (:attr:`.gate.StopRecords.stops`) to ``stops`` (in :meth:`set_ranges`
        order), or None when there are none of that stop (none asked for, or the plugin
        could not read a range)."""
        page = self._page
        if page is None or not self._ranges:
            return None
        if (U64.unpack_from(page, _W_COPIED)[0] != stops
                or U32.unpack_from(page, _W_FAILED)[0]):
            return None
        out = []
        offset = WATCH_HEADER
        for _, size in self._ranges:
            out.append(page[offset:offset + size])
            offset += size
        return out
