"""Host status sources beyond psutil, picked by what the host has.

- ``nvml``: NVIDIA GPUs through NVML (PyPI ``nvidia-ml-py``, ``import pynvml``); reported
  unavailable, not fatal, when no NVIDIA driver is present (``nvmlInit`` fails).
- ``tegrastats``: Jetson boards, through the ``tegrastats`` tool run as a subprocess.

Every source answers ``read() -> (SourceReading | None, SourceStatus)`` and never raises:
a source that fails (at start or mid-stream) says so in its status.
"""

from machineserver.server.core.telemetry_sources.base import (
    CpuCore,
    GpuSample,
    Source,
    SourceReading,
    SourceStatus,
    Usage,
)
from machineserver.server.core.telemetry_sources.nvml import NvmlSource
from machineserver.server.core.telemetry_sources.tegrastats import TegrastatsSource, parse_tegrastats

__all__ = [
    "CpuCore",
    "GpuSample",
    "NvmlSource",
    "Source",
    "SourceReading",
    "SourceStatus",
    "TegrastatsSource",
    "Usage",
    "default_sources",
    "parse_tegrastats",
]


def default_sources() -> list[Source]:
    """The extra sources every server tries (each reports itself unavailable where the
    host lacks it)."""
    return [NvmlSource(), TegrastatsSource()]
