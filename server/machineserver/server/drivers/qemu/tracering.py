"""The plugin's trace ring (``trace=FILE``, see plugin/msplugin.c for the layout): the start
address of every block executed, in a ring of the last 4096, in a file the plugin maps
shared. The plugin stores an entry, then bumps ``written`` (release); entry ``n`` lives in
slot ``n % capacity``. :func:`read_ring` reads it at any time, also while QEMU runs: it
reads ``written`` before and after the slots and keeps only the entries that were complete
before and could not have been overwritten during the read."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

MAGIC = b"MSTRACE\x01"
VERSION = 1
HEADER = struct.Struct("<8sIIQ40x")  # magic, version, capacity, written
WRITTEN_OFFSET = 16
MAX_CAPACITY = 1 << 16


@dataclass(frozen=True)
class Ring:
    written: int  # entries written since QEMU started
    first: int  # the index of entries[0] (entries before it were overwritten)
    entries: tuple[int, ...]  # block starts, oldest first

    def since(self, base: int) -> list[int]:
        """The entries with an index >= ``base``, oldest first."""
        skip = max(0, base - self.first)
        return list(self.entries[skip:])


EMPTY = Ring(0, 0, ())


def read_ring(path: str | os.PathLike[str]) -> Ring:
    """Read a plugin trace ring (while QEMU runs or after). A missing or not yet
    initialised file reads as empty; ValueError for a ring of another version."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                return EMPTY
            magic, version, capacity, before = HEADER.unpack(head)
            if magic != MAGIC:
                return EMPTY
            if version != VERSION or not 0 < capacity <= MAX_CAPACITY or capacity & (capacity - 1):
                raise ValueError(f"unsupported trace ring version {version}, capacity {capacity}")
            data = f.read(capacity * 8)
            f.seek(WRITTEN_OFFSET)
            (after,) = struct.unpack("<Q", f.read(8))
    except FileNotFoundError:
        return EMPTY
    if len(data) < capacity * 8:
        return EMPTY
    slots = struct.unpack(f"<{capacity}Q", data)
    # complete before the read: < before; not overwritten during it: >= after - capacity,
    # and > that while the plugin writes (entry `after` may be half-stored in its slot)
    first = max(0, before - capacity, after - capacity + (after != before))
    return Ring(before, first, tuple(slots[n % capacity] for n in range(first, before)))
