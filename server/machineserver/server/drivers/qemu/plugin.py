"""Our TCG plugin (plugin/msplugin.c): how it is built and how a QEMU loads it.

Every QEMU this driver starts loads it when it can be built (a host C compiler is
needed): its instruction gate (see :mod:`.gate`) costs nothing until armed, its
instruction total (each translated block adds its size: the machine's instruction count
without ``-icount``) costs ~0 % (scripts/bench counts), and its coverage table (see
:mod:`.blocktable`) is added only for machines that ask for coverage.

* **Build**: Debian's QEMU 7.2 loads plugins (``-plugin``) but ships no ``qemu-plugin.h``;
  msplugin.c declares the few API functions it uses. It is compiled on first use with
  the host's gcc into a per-user cache (see :mod:`..native`), named by a hash of the
  source, compiler and flags, written to a temp file and renamed (concurrent servers
  never see a half-written .so). :func:`plugin_status` is cached for the process.
* **Arguments**: one ``-plugin file=...,key=value...`` option; paths must not contain
  commas (QEMU's option syntax has no escape for them here).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from machineserver.server.drivers import native

PLUGIN_SOURCE = Path(__file__).resolve().parent / "plugin" / "msplugin.c"


@dataclass(frozen=True)
class PluginStatus:
    path: str | None  # the built .so, None when unavailable
    reason: str = ""  # why it is unavailable

    @property
    def method(self) -> str:
        """The coverage method it gives: "tcg-plugin", or "none: <reason>"."""
        return "tcg-plugin" if self.path else f"none: {self.reason}"


_lock = threading.Lock()


@functools.cache
def _plugin_status_cached() -> PluginStatus:
    path, reason = native.build_cached(PLUGIN_SOURCE, "the TCG plugin")
    return PluginStatus(str(path) if path else None, reason)


def plugin_status() -> PluginStatus:
    """The plugin, built on first call (thread-safe; cached for the process)."""
    with _lock:
        return _plugin_status_cached()


def plugin_args(so_path: str, options: Mapping[str, str]) -> list[str]:
    """The QEMU arguments that load the plugin with ``options`` (key=value each).
    ValueError when a value cannot be passed (a comma in it)."""
    parts = [f"file={so_path}", *(f"{k}={v}" for k, v in options.items())]
    if any("," in part for part in parts):
        raise ValueError("plugin paths must not contain commas (QEMU option syntax)")
    return ["-plugin", ",".join(parts)]
