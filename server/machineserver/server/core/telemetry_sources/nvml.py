"""NVIDIA GPUs through NVML (PyPI ``nvidia-ml-py``, imported as ``pynvml``).

Per GPU: utilization, memory used/total, temperature, power (mW) and graphics/memory
clocks. Without an NVIDIA driver ``nvmlInit`` fails: the source is reported unavailable
with NVML's message and retried now and then (never fatal). Fields a GPU does not support
(``NVML_ERROR_NOT_SUPPORTED``: power on some boards, clocks on vGPUs) read 0; any other
NVML error fails the source for that sample (a lost GPU, a driver reload) and NVML is
initialised again on a later read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from machineserver.server.core.telemetry_sources.base import GpuSample, SourceReading, SourceStatus

T = TypeVar("T")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlSource:
    name = "nvml"

    def __init__(self, *, retry_after: float = 60.0) -> None:
        self.retry_after = retry_after
        self._nvml: ModuleType | None = None
        self._ready = False
        self._failed_at = -float("inf")
        self._status = SourceStatus(self.name, False, "not started")
        self._lock = threading.Lock()

    def _init(self) -> bool:
        if self._ready:
            return True
        if time.monotonic() - self._failed_at < self.retry_after:
            return False
        try:
            import pynvml  # imported late: tests put a fake in sys.modules

            pynvml.nvmlInit()
        except ImportError as exc:
            return self._fail(f"nvidia-ml-py is not installed: {exc}")
        except Exception as exc:  # NVMLError (no driver, no library), OSError
            return self._fail(f"NVML unavailable (nvmlInit failed: {_text(exc) or type(exc).__name__})")
        self._nvml = pynvml
        self._ready = True
        return True

    def _fail(self, error: str) -> bool:
        self._failed_at = time.monotonic()
        self._status = SourceStatus(self.name, False, error)
        return False

    def status(self) -> SourceStatus:
        with self._lock:
            self._init()
            if self._ready and not self._status.ok and self._status.error == "not started":
                self._status = SourceStatus(self.name, True)
            return self._status

    def read(self) -> tuple[SourceReading | None, SourceStatus]:
        with self._lock:
            if not self._init():
                return None, self._status
            assert self._nvml is not None
            try:
                gpus = tuple(self._gpu(self._nvml, i) for i in range(self._nvml.nvmlDeviceGetCount()))
            except Exception as exc:
                self._shutdown()
                self._fail(f"NVML read failed: {_text(exc) or type(exc).__name__}")
                return None, self._status
            self._status = SourceStatus(self.name, True)
            return SourceReading(gpus=gpus), self._status

    def _gpu(self, nv: ModuleType, index: int) -> GpuSample:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        not_supported = getattr(nv, "NVML_ERROR_NOT_SUPPORTED", 3)

        def optional(get: Callable[[], T], default: T) -> T:
            try:
                return get()
            except nv.NVMLError as exc:
                if getattr(exc, "value", None) == not_supported:
                    return default
                raise

        util = nv.nvmlDeviceGetUtilizationRates(h)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        return GpuSample(
            index=index,
            name=_text(nv.nvmlDeviceGetName(h)),
            utilization_percent=float(util.gpu),
            memory_used_bytes=int(mem.used),
            memory_total_bytes=int(mem.total),
            temperature_celsius=float(optional(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU), 0)),
            power_mw=float(optional(lambda: nv.nvmlDeviceGetPowerUsage(h), 0)),  # NVML answers mW
            graphics_clock_mhz=float(optional(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_GRAPHICS), 0)),
            memory_clock_mhz=float(optional(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM), 0)),
        )

    def _shutdown(self) -> None:
        if self._ready and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # already gone
                pass
        self._ready = False

    def close(self) -> None:
        with self._lock:
            self._shutdown()
