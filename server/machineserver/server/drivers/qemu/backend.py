"""The QEMU backend factory: probing the installed QEMU and creating machines."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess

from machineserver.server.drivers.base import (
    Arch,
    Backend,
    BackendInfo,
    BoardSpec,
    Feature,
    Machine,
    MachineEvents,
    MachineOptions,
    MemoryFootprint,
    features_of,
)
from machineserver.server.drivers.qemu import snapshots
from machineserver.server.drivers.qemu.launch import LaunchSpec
from machineserver.server.drivers.qemu.lockstep import LOCKSTEP_BROKEN
from machineserver.server.drivers.qemu.machine import BINARIES, SNAPSHOT_BROKEN, QemuMachine
from machineserver.server.drivers.qemu.plugin import plugin_status
from machineserver.server.drivers.qemu.sizing import FootprintMeter
from machineserver.server.drivers.qemu.spares import DEMAND, IDLE_S, WINDOW_S, SparePool

_VERSION = re.compile(r"QEMU emulator version (\S+)")


def board_limits() -> dict[str, dict[Feature, str]]:
    """Per board (QEMU machine name), the features it lacks on QEMU, with the reason."""
    limits: dict[str, dict[Feature, str]] = {}
    for board, reason in SNAPSHOT_BROKEN.items():
        limits.setdefault(board, {})[Feature.SNAPSHOTS] = reason
    for board, reason in LOCKSTEP_BROKEN.items():
        limits.setdefault(board, {})[Feature.LOCKSTEP] = reason
    return limits
SPARES_ENV = "MS_QEMU_SPARES"


class QemuBackend(Backend):
    name = "qemu"
    description = (
        "QEMU full-system emulation (qemu-system-arm / qemu-system-riscv32): one process "
        "per machine, QMP for control, its gdbstub for debugging, a chardev console"
    )
    machine_class: type[Machine] = QemuMachine

    def __init__(self, binaries: dict[Arch, str] | None = None, *, spares: int | None = None) -> None:
        """``spares``: warm QEMUs kept per board in demand (0 or 1, see :mod:`.spares`);
        None reads ``MS_QEMU_SPARES`` from the environment (default 1). Not a
        ``MACHINESERVER_*`` variable: those are the server's own settings, and this one
        must reach the worker processes, which make their own backends."""
        self.binaries = dict(binaries or BINARIES)
        self._versions: dict[str, str | None] = {}
        self._machines: dict[str, frozenset[str]] = {}
        self._plugins: dict[str, bool] = {}
        self._paths: dict[Arch, str | None] = {}
        self.spares = SparePool(per_spec=spares_setting() if spares is None else spares)
        self.sizes = FootprintMeter()

    # ------------------------------------------------------------------ probing
    def _path(self, arch: Arch) -> str | None:
        """The binary's path, looked up once (board_support runs for every template)."""
        if arch not in self._paths:
            self._paths[arch] = shutil.which(self.binaries[arch])
        return self._paths[arch]

    def _version(self, binary: str) -> str | None:
        if binary not in self._versions:
            version = None
            path = shutil.which(binary)
            if path:
                try:
                    out = subprocess.run(
                        [path, "--version"], capture_output=True, text=True, timeout=10
                    ).stdout
                    m = _VERSION.search(out)
                    version = m.group(1) if m else out.strip().splitlines()[0]
                except (OSError, subprocess.SubprocessError, IndexError):
                    version = None
            self._versions[binary] = version
        return self._versions[binary]

    def _machine_names(self, binary: str) -> frozenset[str]:
        if binary not in self._machines:
            names: set[str] = set()
            path = shutil.which(binary)
            if path:
                try:
                    out = subprocess.run(
                        [path, "-machine", "help"], capture_output=True, text=True, timeout=10
                    ).stdout
                    names = {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
                except (OSError, subprocess.SubprocessError):
                    pass
            self._machines[binary] = frozenset(names)
        return self._machines[binary]

    def _accepts_plugins(self, binary: str) -> bool:
        """Whether this QEMU was built with TCG plugin support (``-plugin`` in its help)."""
        if binary not in self._plugins:
            ok = False
            path = shutil.which(binary)
            if path:
                try:
                    out = subprocess.run(
                        [path, "-help"], capture_output=True, text=True, timeout=10
                    ).stdout
                    ok = "-plugin" in out
                except (OSError, subprocess.SubprocessError):
                    ok = False
            self._plugins[binary] = ok
        return self._plugins[binary]

    def coverage_method(self) -> str:
        """"tcg-plugin", or "none: <reason>". Builds the plugin on first call (cached)."""
        binaries = [b for a, b in self.binaries.items() if self._path(a)]
        if binaries and not any(self._accepts_plugins(b) for b in binaries):
            return "none: this QEMU was built without TCG plugin support (-plugin)"
        return plugin_status().method

    def probe(self) -> BackendInfo:
        found: dict[Arch, str] = {}
        for arch, binary in self.binaries.items():
            version = self._version(binary) if self._path(arch) else None
            if version:
                found[arch] = version
        if not found:
            return BackendInfo(
                name=self.name,
                description=self.description,
                available=False,
                unavailable_reason=(
                    "QEMU is not installed: none of "
                    + ", ".join(sorted(self.binaries.values()))
                    + " is on PATH (Debian: apt-get install --no-install-recommends "
                    "qemu-system-arm qemu-system-misc)"
                ),
                features=features_of(QemuMachine),
            )
        versions = sorted(set(found.values()))
        coverage = self.coverage_method()
        features = features_of(QemuMachine)
        if coverage != "tcg-plugin":  # no plugin: no coverage, no lock-step deadlines
            features -= {Feature.COVERAGE, Feature.LOCKSTEP}
        details = {
            "qemu_version": ", ".join(versions),
            "coverage_method": coverage,
            "coverage_usage": 'per machine: MachineOptions.extra["coverage"] = "1" loads '
            "the block-counting plugin (about +25 % run time); other machines run at full speed",
            "instruction_counting": "with icount only (MachineOptions.icount)",
            "memory_while_running": "no: QEMU's gdbstub answers memory requests only while "
            "the VM is stopped; pause it first",
            "counted_steps": "continues through the TCG plugin's instruction gate (gdbstub "
            "single steps where QEMU does not export runstate_is_running)"
            if coverage == "tcg-plugin" else f"gdbstub single steps ({coverage})",
            "semihosting_exits": "caught before QEMU ends (state EXITED, QEMU kept); "
            'MachineOptions.extra["semihosting_traps"]="off" lets QEMU exit itself',
            "warm_spares": (f"a board started {DEMAND} times within {WINDOW_S:g} s gets a halted "
                            "QEMU kept ready for its next power-on (per worker process; stopped "
                            f"after {IDLE_S:g} s unused; not for coverage); {SPARES_ENV}=0 "
                            "turns them off") if self.spares.enabled else f"off ({SPARES_ENV}=0)",
        }
        for arch, binary in self.binaries.items():
            details[f"binary_{arch.value}"] = (
                f"{binary} {found[arch]}" if arch in found else f"{binary}: not installed"
            )
        return BackendInfo(
            name=self.name,
            description=self.description,
            available=True,
            version=versions[0],
            features=features,
            board_limits=board_limits(),
            details=details,
        )

    def board_support(self, board: BoardSpec) -> str | None:
        machine = board.backend_machines.get("qemu")
        if not machine:
            return f"board {board.name} names no QEMU machine (backends.qemu)"
        binary = self.binaries.get(board.arch)
        if binary is None:
            return f"QEMU has no system emulator configured for {board.arch}"
        if not self._path(board.arch):
            return f"{binary} is not installed (needed for {board.arch} boards)"
        names = self._machine_names(binary)
        if names and machine not in names:
            return f"{binary} has no machine {machine!r}"
        return None

    def check_snapshot(self, blob: bytes, board: BoardSpec) -> None:
        snapshots.check_blob(blob, board)

    def create_machine(
        self, board: BoardSpec, options: MachineOptions, events: MachineEvents
    ) -> Machine:
        return QemuMachine(board, options, events, binary=self.binaries[board.arch],
                           spares=self.spares if self.spares.enabled else None)

    async def memory_footprint(self, board: BoardSpec) -> MemoryFootprint | None:
        """Measured once per QEMU binary and machine on this host (see :mod:`.sizing`)."""
        if self.board_support(board) is not None:
            return None
        binary = self.binaries[board.arch]
        spec = LaunchSpec(binary, board.backend_machines["qemu"], board.arch)
        version = self._versions[binary] if binary in self._versions else (
            await asyncio.to_thread(self._version, binary))  # probed already, usually
        return await self.sizes.footprint(spec, version or "")

    async def aclose(self) -> None:
        """Stop the warm spares (the machines are powered off by then)."""
        await self.spares.aclose()


def spares_setting() -> int:
    """``MS_QEMU_SPARES``: how many warm QEMUs per board in demand (0: none; default 1)."""
    text = os.environ.get(SPARES_ENV, "").strip()
    try:
        return max(0, int(text)) if text else 1
    except ValueError:
        return 1
