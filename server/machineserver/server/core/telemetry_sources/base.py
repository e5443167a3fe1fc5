"""Plain data shared by the host sampler and its sources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class CpuCore:
    index: int
    usage_percent: float
    frequency_mhz: float


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    total_bytes: int
    percent: float


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization_percent: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    temperature_celsius: float = 0.0
    power_mw: float = 0.0
    graphics_clock_mhz: float = 0.0
    memory_clock_mhz: float = 0.0


@dataclass(frozen=True)
class SourceStatus:
    name: str
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class SourceReading:
    """What one source adds to a host sample. ``cpus`` (when not empty) replaces psutil's
    per-core list; the rest is appended."""

    cpus: tuple[CpuCore, ...] = ()
    gpus: tuple[GpuSample, ...] = ()
    temperatures: tuple[tuple[str, float], ...] = ()
    power_rails: tuple[tuple[str, float, float], ...] = ()  # name, current mW, average mW


class Source(Protocol):
    name: str

    def read(self) -> tuple[SourceReading | None, SourceStatus]:
        """The latest reading (None when there is none) and the source's status. Blocking
        (called off the event loop); never raises."""
        ...

    def status(self) -> SourceStatus:
        """Whether the source works, without taking a reading if it can avoid it."""
        ...

    def close(self) -> None: ...
