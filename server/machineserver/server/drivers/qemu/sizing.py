"""What one more halted QEMU session of a board costs the host in memory, measured (for
CapabilitiesService's board footprints).

A QEMU of the board's machine is started the way sessions start theirs (:mod:`.launch`:
the plugin, the sockets, no huge pages), left to settle (QEMU gives back part of its
start-up heap within a fraction of a second), and its own pages are read
(``/proc/PID/smaps_rollup``: private clean + private dirty), then it is stopped. To that
the driver's share of its worker process is added (:data:`DRIVER_SHARE`). Pages that
every QEMU maps (its binary and libraries, ~24 MiB for QEMU 7.2) are not counted: a host
pays them once, not per session.

Measured once per QEMU binary (path, size, modification time), machine and plugin on a
host: kept in memory and in the per-user cache (``qemu-footprints.json`` next to the
plugin, see :mod:`..native`), so a server started later answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from machineserver.server.drivers import native
from machineserver.server.drivers.base import DriverError, MemoryFootprint
from machineserver.server.drivers.qemu.launch import LaunchSpec, launch
from machineserver.server.drivers.qemu.plugin import plugin_status

MIB = 1024 * 1024
SETTLE_S = 0.5
# the worker processes' growth per halted QEMU session at scale, measured by scripts/bench
# --only qemu_scale (~0.35 MiB with 256 sessions: the machine's objects, buffers and
# sockets, and the extra workers 64 machines each take)
DRIVER_SHARE = 350 * 1024
CACHE_FILE = "qemu-footprints.json"
CACHE_VERSION = 1


def private_and_resident(pid: int) -> tuple[int, int] | None:
    """A process's own pages and its resident set, in bytes (None where the kernel does
    not say: no smaps_rollup)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                name, _, rest = line.partition(":")
                if name in ("Rss", "Private_Clean", "Private_Dirty"):
                    fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if len(fields) < 3:
        return None
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Rss"]


class FootprintMeter:
    """Footprints by :class:`LaunchSpec`, measured on first request (concurrent requests
    for one share the measurement)."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._cache_dir = cache_dir
        self._known: dict[str, MemoryFootprint] = {}
        self._cache_read = False
        self._plugin: str | None = None  # the plugin QEMUs load ("-": none), once known
        self._keys: dict[LaunchSpec, str | None] = {}  # a binary's identity, read once
        self._measuring: dict[str, asyncio.Task[MemoryFootprint | None]] = {}

    async def footprint(self, spec: LaunchSpec, version: str = "") -> MemoryFootprint | None:
        """None when it cannot be measured here (QEMU missing, no smaps_rollup, QEMU
        does not start)."""
        if self._plugin is None:
            self._plugin = (await asyncio.to_thread(plugin_status)).path or "-"
        if spec not in self._keys:
            self._keys[spec] = self._key(spec, self._plugin)
        key = self._keys[spec]
        if key is None:
            return None
        if not self._cache_read:  # what earlier servers on this host measured
            self._cache_read = True
            self._known = {**self._read_cache(), **self._known}
        if key in self._known:
            return self._known[key]
        task = self._measuring.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._measure(spec, version))
            self._measuring[key] = task
        try:
            found = await asyncio.shield(task)
        finally:
            if task.done() and self._measuring.get(key) is task:
                del self._measuring[key]
        if found is not None:
            self._known[key] = found
            self._write_cache(key, found)
        return found

    @staticmethod
    def _key(spec: LaunchSpec, plugin: str) -> str | None:
        path = shutil.which(spec.binary)
        if path is None:
            return None
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return f"v{CACHE_VERSION}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{spec.machine}|{plugin}"

    @staticmethod
    async def _measure(spec: LaunchSpec, version: str) -> MemoryFootprint | None:
        try:
            started = await launch(spec, on_console=lambda _: None, on_exit=lambda *_: None)
        except DriverError:
            return None
        try:
            await asyncio.sleep(SETTLE_S)
            proc = started.instance.proc
            measured = private_and_resident(proc.pid) if proc is not None else None
        finally:
            await started.discard()
        if measured is None:
            return None
        own, resident = measured
        what = " ".join(x for x in (os.path.basename(spec.binary), version) if x)
        return MemoryFootprint(
            memory_bytes=own + DRIVER_SHARE,
            basis=(f"measured on this host: {what}, {spec.machine}, halted: {own / MIB:.1f} MiB own "
                   f"+ {DRIVER_SHARE / MIB:.1f} MiB driver; {(resident - own) / MIB:.0f} MiB shared by "
                   "every QEMU (code, libraries) is paid once per host"),
        )

    # ------------------------------------------------------------------ the cache file
    def _cache_path(self) -> Path:
        return (self._cache_dir or native.cache_dirs()[0]) / CACHE_FILE

    def _read_cache(self) -> dict[str, MemoryFootprint]:
        try:
            raw = json.loads(self._cache_path().read_text())
            return {k: MemoryFootprint(int(v["memory_bytes"]), str(v["basis"])) for k, v in raw.items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}

    def _write_cache(self, key: str, found: MemoryFootprint) -> None:
        """Merged into the file, written to a temp file and renamed; a cache that cannot
        be written is only a slower next start."""
        path = self._cache_path()
        entries = {k: {"memory_bytes": v.memory_bytes, "basis": v.basis} for k, v in self._read_cache().items()}
        entries[key] = {"memory_bytes": found.memory_bytes, "basis": found.basis}
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".qemu-footprints-", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(entries, out, indent=1, sort_keys=True)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
