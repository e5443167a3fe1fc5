"""A fake ``pynvml`` (nvidia-ml-py) for hosts without an NVIDIA GPU: tests put this module
in ``sys.modules["pynvml"]``. It replays recorded examples: values of the kind
``nvidia-smi --query-gpu=name,utilization.gpu,memory.used,memory.total,temperature.gpu,
power.draw,clocks.gr,clocks.mem --format=csv`` prints on a two-GPU A100 host under a
training load (written down as examples, not captured on this machine, which has no GPU).
Each ``nvmlDeviceGet*`` call answers from the current record; ``advance()`` moves every
GPU to its next record (cycling).

Knobs for tests: ``FAIL_INIT`` (nvmlInit raises NVML_ERROR_LIBRARY_NOT_FOUND, as without a
driver), ``LOSE_GPU`` (reads raise NVML_ERROR_GPU_IS_LOST, as when a GPU falls off the
bus), ``NO_POWER`` (power reads raise NVML_ERROR_NOT_SUPPORTED). ``reset()`` restores all.
"""

from __future__ import annotations

from dataclasses import dataclass

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"Unknown Error {self.value}")


@dataclass(frozen=True)
class Record:
    """One nvidia-smi row: util %, memory MiB used/total, °C, W, graphics/memory MHz."""

    util: int
    mem_used_mib: int
    mem_total_mib: int
    temp_c: int
    power_w: float
    gr_mhz: int
    mem_mhz: int


NAMES = ["NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB"]
RECORDS: list[list[Record]] = [
    [Record(87, 31245, 40960, 61, 318.52, 1410, 1215),
     Record(92, 31245, 40960, 63, 341.07, 1410, 1215),
     Record(34, 31251, 40960, 58, 176.33, 1395, 1215)],
    [Record(0, 4, 40960, 31, 54.21, 210, 1215),
     Record(0, 4, 40960, 31, 54.60, 210, 1215),
     Record(12, 1863, 40960, 33, 89.95, 1275, 1215)],
]

FAIL_INIT = False
LOSE_GPU = False
NO_POWER = False
_initialized = False
_step = 0
calls: list[str] = []


@dataclass(frozen=True)
class _Utilization:
    gpu: int
    memory: int


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


def reset() -> None:
    global FAIL_INIT, LOSE_GPU, NO_POWER, _initialized, _step
    FAIL_INIT = LOSE_GPU = NO_POWER = False
    _initialized = False
    _step = 0
    calls.clear()


def advance() -> None:
    global _step
    _step += 1


def _record(handle: int) -> Record:
    calls.append(f"read {handle}")
    if not _initialized:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    if LOSE_GPU:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    recs = RECORDS[handle]
    return recs[_step % len(recs)]


def nvmlInit() -> None:
    global _initialized
    calls.append("init")
    if FAIL_INIT:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    _initialized = True


def nvmlShutdown() -> None:
    global _initialized
    calls.append("shutdown")
    _initialized = False


def nvmlDeviceGetCount() -> int:
    if not _initialized:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return len(NAMES)


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < len(NAMES):
        raise NVMLError(2)
    return index


def nvmlDeviceGetName(handle: int) -> str:
    return NAMES[handle]


def nvmlDeviceGetUtilizationRates(handle: int) -> _Utilization:
    r = _record(handle)
    return _Utilization(r.util, r.util // 2)


def nvmlDeviceGetMemoryInfo(handle: int) -> _Memory:
    r = _record(handle)
    return _Memory(r.mem_total_mib << 20, (r.mem_total_mib - r.mem_used_mib) << 20, r.mem_used_mib << 20)


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    assert sensor == NVML_TEMPERATURE_GPU
    return _record(handle).temp_c


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    r = _record(handle)
    if NO_POWER:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return round(r.power_w * 1000)  # NVML answers milliwatts


def nvmlDeviceGetClockInfo(handle: int, clock: int) -> int:
    r = _record(handle)
    return r.mem_mhz if clock == NVML_CLOCK_MEM else r.gr_mhz
