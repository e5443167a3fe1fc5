"""The plugin's coverage table (``out=FILE``, see plugin/msplugin.c for the layout):
one 24-byte entry per translated block, with an inline TCG add of 1 on that entry's
count at each execution (no callback, no lock; ~+24 % on a CPU-bound loop), in a file
the plugin maps shared. :func:`read_table` reads it at any time, while QEMU runs: the
counts are live."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from machineserver.server.drivers.base import Blocks, merge_blocks

MAGIC = b"MSBLKS\x00\x01"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ32x")  # magic, version, entry_size, capacity, flags, used
ENTRY = struct.Struct("<QIIQ")  # vaddr, size, pad, count
FLAG_FULL = 1
FLAG_EXITED = 2


@dataclass(frozen=True)
class Table:
    # by address: summed counts, largest size; blocks translated but never executed
    # (count 0: e.g. a translation a flush threw away) left out
    blocks: Blocks
    full: bool  # the table overflowed: blocks translated later are not counted
    exited: bool


EMPTY = Table({}, False, False)


def read_table(path: str | os.PathLike[str]) -> Table:
    """Read a plugin table (while QEMU runs or after). A missing or not yet initialised
    file reads as empty."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                return EMPTY
            magic, version, esize, capacity, flags, used = HEADER.unpack(head)
            if magic != MAGIC:
                return EMPTY
            if version != VERSION or esize != ENTRY.size:
                raise ValueError(f"unsupported coverage table version {version}/{esize}")
            used = min(used, capacity)
            data = f.read(used * ENTRY.size)
    except FileNotFoundError:
        return EMPTY
    blocks: Blocks = {}
    usable = data[: len(data) - len(data) % ENTRY.size]
    for vaddr, size, _pad, count in ENTRY.iter_unpack(usable):
        if not count:
            continue
        if vaddr in blocks:  # translated again (after a flush, a single step...)
            merge_blocks(blocks, {vaddr: (size, count)})
        else:
            blocks[vaddr] = (size, count)
    return Table(blocks, bool(flags & FLAG_FULL), bool(flags & FLAG_EXITED))
