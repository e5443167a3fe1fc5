"""Basic-block coverage for QEMU machines through our own TCG plugin (plugin/msblocks.c).

* **Build**: Debian's QEMU 7.2 loads plugins (``-plugin``) but ships none and no
  ``qemu-plugin.h``; msblocks.c declares the few API functions it uses. It is compiled
  on first use with the host's gcc into a per-user cache (``$XDG_CACHE_HOME/machineserver``
  or ``~/.cache/machineserver``), named by a hash of the source, compiler and flags, written
  to a temp file and renamed (concurrent servers never see a half-written .so).
  :func:`plugin_status` is cached for the process.
* **Table**: the plugin mmaps ``out=FILE`` (MAP_SHARED) and appends one 24-byte entry per
  translated block, with an inline TCG add of 1 on that entry's count at each execution
  (no callback, no lock; ~+24 % on a CPU-bound loop). :func:`read_table` reads the file
  at any time, while QEMU runs: the counts are live. See the C file for the layout.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from machineserver.server.drivers import native

PLUGIN_SOURCE = Path(__file__).resolve().parent / "plugin" / "msblocks.c"
MAGIC = b"MSBLKS\x00\x01"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ32x")  # magic, version, entry_size, capacity, flags, used
ENTRY = struct.Struct("<QIIQ")  # vaddr, size, pad, count
FLAG_FULL = 1
FLAG_EXITED = 2

# block start address -> (size in bytes, execution count)
Blocks = dict[int, tuple[int, int]]


@dataclass(frozen=True)
class PluginStatus:
    path: str | None  # the built .so, None when unavailable
    reason: str = ""  # why it is unavailable

    @property
    def method(self) -> str:
        return "tcg-plugin" if self.path else f"none: {self.reason}"


_lock = threading.Lock()


@functools.cache
def _plugin_status_cached() -> PluginStatus:
    path, reason = native.build_cached(PLUGIN_SOURCE, "the TCG plugin")
    return PluginStatus(str(path) if path else None, reason)


def plugin_status() -> PluginStatus:
    """The coverage plugin, built on first call (thread-safe; cached for the process)."""
    with _lock:
        return _plugin_status_cached()


def plugin_args(so_path: str, out: str) -> list[str]:
    if "," in so_path or "," in out:
        raise ValueError("plugin paths must not contain commas (QEMU option syntax)")
    return ["-plugin", f"file={so_path},out={out}"]


@dataclass(frozen=True)
class Table:
    blocks: Blocks  # merged by address: summed counts, largest size; count-0 blocks kept
    full: bool  # the table overflowed: blocks translated later are not counted
    exited: bool


def read_table(path: str | os.PathLike[str]) -> Table:
    """Read a plugin table (while QEMU runs or after). A missing or not yet initialised
    file reads as empty."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                return Table({}, False, False)
            magic, version, esize, capacity, flags, used = HEADER.unpack(head)
            if magic != MAGIC:
                return Table({}, False, False)
            if version != VERSION or esize != ENTRY.size:
                raise ValueError(f"unsupported coverage table version {version}/{esize}")
            used = min(used, capacity)
            data = f.read(used * ENTRY.size)
    except FileNotFoundError:
        return Table({}, False, False)
    blocks: Blocks = {}
    for vaddr, size, _pad, count in ENTRY.iter_unpack(data[: len(data) - len(data) % ENTRY.size]):
        old = blocks.get(vaddr)
        if old is None:
            blocks[vaddr] = (size, count)
        else:
            blocks[vaddr] = (max(old[0], size), old[1] + count)
    return Table(blocks, bool(flags & FLAG_FULL), bool(flags & FLAG_EXITED))


def merge(into: Blocks, more: Blocks) -> Blocks:
    """Add ``more`` to ``into`` (in place; returns it)."""
    for addr, (size, count) in more.items():
        old = into.get(addr)
        into[addr] = (size, count) if old is None else (max(old[0], size), old[1] + count)
    return into


def delta(current: Blocks, baseline: Blocks) -> Blocks:
    """Blocks executed since ``baseline``: counts minus the baseline's, only those > 0."""
    out: Blocks = {}
    for addr, (size, count) in current.items():
        n = count - baseline.get(addr, (0, 0))[1]
        if n > 0:
            out[addr] = (size, n)
    return out
