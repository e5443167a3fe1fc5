"""Jetson boards through ``tegrastats --interval MS``, run as a subprocess.

A reader thread keeps the newest line; a host sample takes it. A line looks like
(JetPack 4 to 6; fields a board lacks are simply absent)::

    RAM 2448/7772MB (lfb 1x2MB) SWAP 0/3886MB (cached 0MB) CPU [12%@1190,5%@1190,off,off]
    EMC_FREQ 0% GR3D_FREQ 0%@[305] APE 150 cpu@47.437C soc2@44.5C GPU@-256C
    VDD_CPU_CV 493mW/306mW VDD_SOC 1234mW/1200mW

parsed into per-core usage and frequency (an ``off`` core reads 0 % at 0 MHz), RAM and
SWAP, GPU utilisation and clock (GR3D_FREQ), temperatures by sensor (-256 C means the
sensor is off and is left out) and power rails, current/average mW (older releases print
them without the unit). The process is started on the first read; if it exits or stops
printing, the source reports that (ok false, with its exit status and last stderr) and
starts it again after ``restart_after`` seconds.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

from machineserver.server.core.telemetry_sources.base import (
    CpuCore,
    GpuSample,
    SourceReading,
    SourceStatus,
    Usage,
)

_UNITS = {"B": 1, "kB": 1 << 10, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
_MEM = re.compile(r"\b(RAM|SWAP) (\d+)/(\d+)(kB|KB|MB|GB|B)\b")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CORE = re.compile(r"^(\d+(?:\.\d+)?)%(?:@(\d+))?$")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+(?:\.\d+)?)%(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"(?<![\w@%])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"(?<![\w/])([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}


@dataclass(frozen=True)
class TegraReading:
    cpus: tuple[CpuCore, ...]
    ram: Usage | None
    swap: Usage | None
    gpu_percent: float | None
    gpu_mhz: float
    temperatures: tuple[tuple[str, float], ...]
    power_rails: tuple[tuple[str, float, float], ...]


def _usage(used: str, total: str, unit: str) -> Usage:
    u, t = int(used) * _UNITS[unit], int(total) * _UNITS[unit]
    return Usage(u, t, 100.0 * u / t if t else 0.0)


def parse_tegrastats(line: str) -> TegraReading:
    """One tegrastats line. ValueError when it has none of RAM, CPU or GR3D_FREQ."""
    mem = {m.group(1): _usage(m.group(2), m.group(3), m.group(4)) for m in _MEM.finditer(line)}
    cpus: list[CpuCore] = []
    cpu = _CPU.search(line)
    if cpu:
        for i, item in enumerate(x.strip() for x in cpu.group(1).split(",")):
            m = _CORE.match(item)
            cpus.append(CpuCore(i, float(m.group(1)), float(m.group(2) or 0)) if m else CpuCore(i, 0.0, 0.0))
    gr3d = _GR3D.search(line)
    gpu_mhz = 0.0
    if gr3d and gr3d.group(2):
        clocks = [float(c) for c in gr3d.group(2).split(",") if c]
        gpu_mhz = max(clocks, default=0.0)
    if not mem and not cpu and not gr3d:
        raise ValueError(f"not a tegrastats line: {line[:80]!r}")
    temps = tuple((m.group(1), float(m.group(2))) for m in _TEMP.finditer(line) if float(m.group(2)) > -256)
    rails = tuple(
        (m.group(1), float(m.group(2)), float(m.group(3)))
        for m in _RAIL.finditer(line) if m.group(1) not in _NOT_RAILS
    )
    return TegraReading(
        cpus=tuple(cpus), ram=mem.get("RAM"), swap=mem.get("SWAP"),
        gpu_percent=float(gr3d.group(1)) if gr3d else None, gpu_mhz=gpu_mhz,
        temperatures=temps, power_rails=rails,
    )


def to_source_reading(r: TegraReading) -> SourceReading:
    """Cores replace psutil's (tegrastats also lists offline ones); the integrated GPU
    (GR3D) becomes a GPU whose temperature is the ``GPU`` sensor and power the first
    ``VDD_GPU*`` rail; temperatures are named ``tegrastats/SENSOR``."""
    gpus: tuple[GpuSample, ...] = ()
    if r.gpu_percent is not None:
        temp = next((c for n, c in r.temperatures if n.upper() == "GPU"), 0.0)
        power = next((cur for n, cur, _ in r.power_rails if n.startswith("VDD_GPU")), 0.0)
        gpus = (GpuSample(0, "tegra GR3D", utilization_percent=r.gpu_percent, temperature_celsius=temp,
                          power_mw=power, graphics_clock_mhz=r.gpu_mhz),)
    return SourceReading(
        cpus=r.cpus, gpus=gpus,
        temperatures=tuple((f"tegrastats/{n}", c) for n, c in r.temperatures),
        power_rails=r.power_rails,
    )


class TegrastatsSource:
    name = "tegrastats"

    def __init__(self, *, interval_ms: int = 500, command: str = "tegrastats",
                 restart_after: float = 5.0, first_line_timeout: float = 3.0) -> None:
        self.interval_ms = interval_ms
        self.command = command
        self.restart_after = restart_after
        self.first_line_timeout = first_line_timeout
        self._path = shutil.which(command)
        self._proc: subprocess.Popen[str] | None = None
        self._latest: tuple[float, str] | None = None  # (monotonic time, line)
        self._exit_error = ""
        self._exited_at = -float("inf")
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # one read (and start) at a time
        self._readers: list[threading.Thread] = []  # the reader of each process started: joined at close

    # ------------------------------------------------------------------ process

    def _start(self) -> None:
        assert self._path is not None
        proc = subprocess.Popen(
            [self._path, "--interval", str(self.interval_ms)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1, errors="replace",
        )
        with self._cond:
            self._proc, self._latest, self._exit_error = proc, None, ""
        reader = threading.Thread(target=self._pump, args=(proc,), name="tegrastats-reader", daemon=True)
        self._readers = [t for t in self._readers if t.is_alive()] + [reader]
        reader.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.strip():
                with self._cond:
                    self._latest = (time.monotonic(), line.strip())
                    self._cond.notify_all()
        err = proc.stderr.read().strip().splitlines()
        rc = proc.wait()
        with self._cond:
            if self._proc is proc:
                tail = f": {err[-1]}" if err else ""
                self._exit_error = f"tegrastats exited with status {rc}{tail}"
                self._exited_at = time.monotonic()
                self._latest = None
                self._cond.notify_all()

    # ------------------------------------------------------------------ Source

    def status(self) -> SourceStatus:
        if self._path is None:
            return SourceStatus(self.name, False, f"{self.command} not found on PATH (not a Jetson)")
        with self._cond:
            if self._exit_error:
                return SourceStatus(self.name, False, self._exit_error)
        return SourceStatus(self.name, True)

    def read(self) -> tuple[SourceReading | None, SourceStatus]:
        if self._path is None:
            return None, self.status()
        with self._lock:
            running = self._proc is not None and self._proc.poll() is None
            if not running and time.monotonic() - self._exited_at >= self.restart_after:
                try:
                    self._start()
                except OSError as exc:
                    self._exited_at = time.monotonic()
                    self._exit_error = f"cannot start tegrastats: {exc}"
            with self._cond:
                if self._latest is None and not self._exit_error:
                    self._cond.wait_for(lambda: self._latest is not None or bool(self._exit_error),
                                        self.first_line_timeout)
                latest, exit_error = self._latest, self._exit_error
        if exit_error:
            return None, SourceStatus(self.name, False, exit_error)
        if latest is None:
            return None, SourceStatus(self.name, False, f"no output from tegrastats in {self.first_line_timeout:g}s")
        age = time.monotonic() - latest[0]
        if age > 3 * self.interval_ms / 1000 + 2:
            return None, SourceStatus(self.name, False, f"no output from tegrastats for {age:.1f}s")
        try:
            return to_source_reading(parse_tegrastats(latest[1])), SourceStatus(self.name, True)
        except ValueError as exc:
            return None, SourceStatus(self.name, False, str(exc))

    def close(self) -> None:
        with self._cond:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2)
        for reader in self._readers:  # each ends at its process's EOF
            reader.join(2)
        self._readers = [t for t in self._readers if t.is_alive()]
