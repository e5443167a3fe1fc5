"""Host status sources: psutil for real; NVML through the fake pynvml (recorded example
values) and the real pynvml where no driver exists; tegrastats through fake_tegrastats on
PATH (real-format lines) and its parser on real-format lines."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import ModuleType

import psutil
import pytest

from machineserver.server.config import ServerConfig
from machineserver.server.core.telemetry import HostSampler, Telemetry, sample_host
from machineserver.server.core.telemetry_sources import NvmlSource, TegrastatsSource, parse_tegrastats
from machineserver.server.store.db import Database
from tests.helpers.server import serving

ORIN = ("RAM 2448/7772MB (lfb 1x2MB) SWAP 0/3886MB (cached 0MB) CPU [12%@1190,5%@1190,off,off] "
        "EMC_FREQ 0% GR3D_FREQ 0%@[305] APE 150 cpu@47.437C soc2@44.5C GPU@-256C "
        "VDD_CPU_CV 493mW/306mW VDD_SOC 1234mW/1200mW")
NANO = ("RAM 1653/3964MB (lfb 224x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
        "CPU [5%@102,3%@102,0%@102,1%@102] EMC_FREQ 0%@1600 GR3D_FREQ 17%@76 APE 25 PLL@36C "
        "CPU@38.5C PMIC@100C GPU@37.5C AO@44.5C thermal@37.75C POM_5V_IN 1992/1992 POM_5V_GPU 0/0")
XAVIER = ("RAM 4722/31920MB (lfb 6395x4MB) SWAP 0/15960MB (cached 0MB) CPU [1%@1190,0%@1190,0%@1190,"
          "0%@1190,0%@1190,2%@1190,0%@1190,0%@1190] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[318,318] VIC_FREQ 0%@115 "
          "APE 150 CV0@-256C CPU@40.5C SOC2@37.281C SOC0@38.5C CV1@-256C GPU@37.093C tj@40.5C SOC1@37.875C "
          "CV2@-256C VDD_GPU_SOC 2770mW/2770mW VDD_CPU_CV 462mW/462mW VIN_SYS_5V0 3431mW/3431mW")


# ---------------------------------------------------------------------- psutil (real)


def test_psutil_sample_is_real() -> None:
    s = sample_host()
    assert s.sources[0].name == "psutil" and s.sources[0].ok
    assert len(s.cpus) == psutil.cpu_count()
    assert s.memory.total_bytes == psutil.virtual_memory().total
    assert 0 <= s.cpu_percent <= 100


def test_host_sampler_lists_every_source_and_never_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no tegrastats here

    class Broken:
        name = "broken"

        def read(self) -> tuple[None, None]:
            raise RuntimeError("sensor bus on fire")

        def status(self) -> None: ...

        def close(self) -> None: ...

    sampler = HostSampler([TegrastatsSource(), Broken()])  # type: ignore[list-item]
    s = sampler()
    names = {x.name: x for x in s.sources}
    assert names["psutil"].ok and not names["tegrastats"].ok and "not found on PATH" in names["tegrastats"].error
    assert not names["broken"].ok and "sensor bus on fire" in names["broken"].error
    assert len(s.cpus) == psutil.cpu_count()


# ---------------------------------------------------------------------- NVML


def test_nvml_with_fake_pynvml_replays_recorded_values(fake_nvml: ModuleType) -> None:
    src = NvmlSource()
    reading, status = src.read()
    assert status.ok and reading is not None and len(reading.gpus) == 2
    g = reading.gpus[0]
    rec = fake_nvml.RECORDS[0][0]
    assert g.name == "NVIDIA A100-SXM4-40GB"
    assert g.utilization_percent == rec.util
    assert g.memory_used_bytes == rec.mem_used_mib << 20 and g.memory_total_bytes == 40960 << 20
    assert g.temperature_celsius == rec.temp_c
    assert g.power_mw == pytest.approx(rec.power_w * 1000)
    assert (g.graphics_clock_mhz, g.memory_clock_mhz) == (rec.gr_mhz, rec.mem_mhz)
    fake_nvml.advance()
    reading, _ = src.read()
    assert reading is not None and reading.gpus[0].power_mw == pytest.approx(fake_nvml.RECORDS[0][1].power_w * 1000)
    assert fake_nvml.calls.count("init") == 1  # initialised once, not per read
    src.close()
    assert "shutdown" in fake_nvml.calls


def test_nvml_unavailable_is_reported_with_fake_failing_init(fake_nvml: ModuleType) -> None:
    fake_nvml.FAIL_INIT = True
    src = NvmlSource()
    sample = HostSampler([src])()
    nvml = next(x for x in sample.sources if x.name == "nvml")
    assert not nvml.ok and "NVML Shared Library Not Found" in nvml.error
    assert sample.gpus == () and sample.sources[0].ok  # psutil unaffected
    src.read()
    assert fake_nvml.calls.count("init") == 1  # not retried on every sample


def test_nvml_gpu_lost_mid_stream_then_recovers_with_fake(fake_nvml: ModuleType) -> None:
    src = NvmlSource(retry_after=0)
    assert src.read()[1].ok
    fake_nvml.LOSE_GPU = True
    reading, status = src.read()
    assert reading is None and not status.ok and "GPU is lost" in status.error
    fake_nvml.LOSE_GPU = False
    reading, status = src.read()
    assert status.ok and reading is not None and len(reading.gpus) == 2
    assert fake_nvml.calls.count("init") == 2


def test_nvml_unsupported_field_reads_zero_with_fake(fake_nvml: ModuleType) -> None:
    fake_nvml.NO_POWER = True
    reading, status = NvmlSource().read()
    assert status.ok and reading is not None
    assert reading.gpus[0].power_mw == 0 and reading.gpus[0].temperature_celsius > 0


def test_real_pynvml_without_a_driver_is_unavailable_not_fatal() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")
    reading, status = NvmlSource().read()
    assert reading is None and not status.ok and "nvmlInit failed" in status.error


# ---------------------------------------------------------------------- tegrastats


def test_parse_tegrastats_orin_line() -> None:
    r = parse_tegrastats(ORIN)
    assert [(c.usage_percent, c.frequency_mhz) for c in r.cpus] == [(12, 1190), (5, 1190), (0, 0), (0, 0)]
    assert r.ram is not None and r.ram.used_bytes == 2448 << 20 and r.ram.total_bytes == 7772 << 20
    assert r.swap is not None and r.swap.used_bytes == 0 and r.swap.total_bytes == 3886 << 20
    assert (r.gpu_percent, r.gpu_mhz) == (0, 305)
    assert r.temperatures == (("cpu", 47.437), ("soc2", 44.5))  # GPU@-256C: sensor off, left out
    assert r.power_rails == (("VDD_CPU_CV", 493, 306), ("VDD_SOC", 1234, 1200))


def test_parse_tegrastats_older_and_xavier_lines() -> None:
    nano = parse_tegrastats(NANO)
    assert len(nano.cpus) == 4 and nano.cpus[0].frequency_mhz == 102
    assert (nano.gpu_percent, nano.gpu_mhz) == (17, 76)
    assert ("PMIC", 100.0) in nano.temperatures and ("GPU", 37.5) in nano.temperatures
    assert nano.power_rails == (("POM_5V_IN", 1992, 1992), ("POM_5V_GPU", 0, 0))  # no mW unit on JetPack 4
    xavier = parse_tegrastats(XAVIER)
    assert len(xavier.cpus) == 8 and xavier.gpu_mhz == 318
    assert [n for n, _, _ in xavier.power_rails] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]
    assert all(c > -256 for _, c in xavier.temperatures) and len(xavier.temperatures) == 6
    with pytest.raises(ValueError):
        parse_tegrastats("tegrastats: permission denied")


def test_tegrastats_with_fake_tool_on_path(fake_tegrastats: Path) -> None:
    src = TegrastatsSource(interval_ms=50)
    try:
        reading, status = src.read()
        assert status.ok, status.error
        assert reading is not None
        assert len(reading.cpus) == 6 and reading.cpus[4].usage_percent == 0  # two cores "off"
        assert reading.cpus[0].frequency_mhz in (1190, 1510)
        assert reading.gpus[0].name == "tegra GR3D" and reading.gpus[0].graphics_clock_mhz in (305, 624)
        assert reading.gpus[0].temperature_celsius > 40  # the gpu@ sensor
        assert ("VDD_IN" in {n for n, _, _ in reading.power_rails})
        assert any(n == "tegrastats/tj" for n, _ in reading.temperatures)
        merged = HostSampler([src])()
        assert [c.index for c in merged.cpus] == list(range(6)) and merged.power_rails
    finally:
        src.close()


def test_tegrastats_fails_mid_stream_with_fake_tool(fake_tegrastats: Path, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("FAKE_TEGRASTATS_LINES", "3")
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("FAKE_TEGRASTATS_PIDFILE", str(pidfile))
    src = TegrastatsSource(interval_ms=50, restart_after=3600)
    try:
        assert src.read()[1].ok
        deadline = time.monotonic() + 10
        while (status := src.read()[1]).ok:
            assert time.monotonic() < deadline, "fake_tegrastats did not stop"
            time.sleep(0.05)
        assert "exited with status 1" in status.error and "lost the board" in status.error
        sample = HostSampler([src])()  # the host sample still comes, with the failure listed
        assert sample.sources[0].ok and not sample.sources[1].ok and sample.power_rails == ()
        assert src.status().ok is False
    finally:
        src.close()


def test_tegrastats_process_stops_on_close_with_fake_tool(fake_tegrastats: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("FAKE_TEGRASTATS_PIDFILE", str(pidfile))
    src = TegrastatsSource(interval_ms=50)
    assert src.read()[1].ok
    pid = int(pidfile.read_text())
    src.close()
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.02)


# ---------------------------------------------------------------------- through the API


async def test_host_status_with_fake_nvml_and_fake_tegrastats(
    fake_nvml: ModuleType, fake_tegrastats: Path, server_config: ServerConfig
) -> None:
    async with serving(server_config) as (running, client):
        st = (await client.telemetry.get_host_status()).status
        assert [(x.name, x.ok) for x in st.sources] == [("psutil", True), ("nvml", True), ("tegrastats", True)]
        assert [g.name for g in st.gpus] == ["NVIDIA A100-SXM4-40GB"] * 2 + ["tegra GR3D"]
        assert [g.index for g in st.gpus] == [0, 1, 2]
        assert st.gpus[0].power_mw == pytest.approx(318520) and st.gpus[1].temperature_celsius == 31
        assert len(st.cpus) == 6 and st.power_rails[0].name == "VDD_IN"
        assert {x.name: x.ok for x in running.engine.telemetry.sources()} == {
            "psutil": True, "nvml": True, "tegrastats": True}


async def test_telemetry_sources_report_what_the_host_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            fake_nvml: ModuleType) -> None:
    fake_nvml.FAIL_INIT = True
    monkeypatch.setenv("PATH", str(tmp_path))
    tel = Telemetry(Database(tmp_path / "t.db"))
    try:
        got = {s.name: s for s in tel.sources()}
        assert got["psutil"].ok and not got["nvml"].ok and not got["tegrastats"].ok
        assert got["nvml"].error and got["tegrastats"].error
    finally:
        await tel.stop()


def test_fake_tegrastats_is_executable() -> None:
    from tests.telemetry.conftest import FAKE_TEGRASTATS

    assert os.access(FAKE_TEGRASTATS, os.X_OK)



def test_cpu_meters_keep_their_own_windows() -> None:
    """Each sampler measures CPU over its own interval (psutil.cpu_percent's one
    per-process baseline would let samplers of different intervals eat each other's)."""
    from machineserver.server.core.telemetry import CpuMeter

    a, b = CpuMeter(settle=0.05), CpuMeter(settle=0.05)
    t0 = time.monotonic()
    first = a.percpu()  # no baseline yet: measures over `settle`
    assert time.monotonic() - t0 >= 0.05
    assert len(first) == psutil.cpu_count() and all(0 <= x <= 100 for x in first)
    b.percpu()
    t1 = time.monotonic()
    a.percpu()  # has a baseline now: answers at once
    assert time.monotonic() - t1 < 0.05
    assert a._prev is not None and b._prev is not None and a._prev[0] != b._prev[0]
