"""``msctl telemetry watch`` against a server process: frames drawn from the real host
(psutil), ``--count``, ``--json``; the renderer on a sample with GPUs and power rails
(values from the fake NVML's recorded examples and a fake tegrastats line)."""

from __future__ import annotations

import json
import subprocess

from machineserver.cli.watch import bar, render
from machineserver.v1 import telemetry_pb2 as tpb
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN


def msctl(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "msctl"), "--target", target, *args],
                          capture_output=True, text=True, timeout=60)


def test_watch_prints_two_frames(server_process: ServerProcess) -> None:
    out = msctl(server_process.target, "telemetry", "watch", "--count", "2", "--interval", "0.1")
    assert out.returncode == 0, out.stderr
    frames = out.stdout.strip().split("\n\n")
    assert len(frames) == 2
    for frame in frames:
        lines = frame.splitlines()
        assert lines[0].startswith("host ")
        assert any(line.startswith("cpu0 ") for line in lines)
        assert any(line.startswith("mem ") for line in lines)
        assert lines[-1].startswith("sources psutil ok")
    assert "\x1b[" not in out.stdout  # no ANSI when piped


def test_watch_json(server_process: ServerProcess) -> None:
    out = msctl(server_process.target, "telemetry", "watch", "--count", "2", "--interval", "0.05", "--json")
    assert out.returncode == 0, out.stderr
    msgs = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(msgs) == 2 and all(m["status"]["cpus"] for m in msgs)
    out = msctl(server_process.target, "--json", "telemetry", "watch", "--count", "1")
    assert len(out.stdout.splitlines()) == 1 and json.loads(out.stdout)["status"]["memory"]["total_bytes"]


def test_watch_rejects_a_bad_interval(server_process: ServerProcess) -> None:
    out = msctl(server_process.target, "telemetry", "watch", "--count", "1", "--interval", "0.001")
    assert out.returncode == 1 and "interval" in out.stderr


def test_render_gpus_and_rails_from_fake_values() -> None:
    msg = tpb.StreamHostStatusResponse(dropped=3, status=tpb.HostStatus(
        cpus=[tpb.CpuCore(index=0, usage_percent=50, frequency_mhz=1190)],
        cpu_percent=50, load_average=[0.5, 0.4, 0.3],
        memory=tpb.MemoryUsage(used_bytes=2 << 30, total_bytes=8 << 30, percent=25),
        temperatures=[tpb.Temperature(sensor="tegrastats/cpu", celsius=47.4)],
        power_rails=[tpb.PowerRail(name="VDD_IN", current_mw=4880, average_mw=4880)],
        gpus=[tpb.Gpu(index=0, name="NVIDIA A100-SXM4-40GB", utilization_percent=87,
                      memory_used_bytes=31245 << 20, memory_total_bytes=40960 << 20, temperature_celsius=61,
                      power_mw=318520, graphics_clock_mhz=1410, memory_clock_mhz=1215)],
        sources=[tpb.TelemetrySource(name="psutil", ok=True),
                 tpb.TelemetrySource(name="nvml", ok=False, error="GPU is lost")],
    ))
    text = render(msg, 80)
    assert "dropped 3" in text and "load 0.50 0.40 0.30" in text
    assert "gpu0" in text and "NVIDIA A100-SXM4-40GB" in text and "318.5 W" in text and "1410/1215 MHz" in text
    assert "VDD_IN 4880/4880 mW" in text and "tegrastats/cpu 47.4C" in text
    assert "nvml off (GPU is lost)" in text
    assert bar(50, 10) == "[#####.....]" and bar(150, 4) == "[####]"
