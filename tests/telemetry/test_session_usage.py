"""Per-session host usage: a backend's own processes (QEMU: ``host_process_ids``) and an
in-process backend's worker threads (``host_thread_ids``), measured with psutil for real
on a busy child process and a busy thread; zero with a note when a backend says neither."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.core.telemetry import HostUsageProbe
from machineserver.server.drivers.base import Counters, HostFootprint, Machine, MachineState, ProgramImage
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import telemetry_pb2 as tpb
from tests.helpers.api import console_until, duration, upload
from tests.helpers.backends import require_backend


class ProcessMachine(HostFootprint):
    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def host_process_ids(self) -> list[int]:
        return self.pids


class ThreadMachine(HostFootprint):
    def __init__(self, tids: list[int]) -> None:
        self.tids = tids

    def host_thread_ids(self) -> list[int]:
        return self.tids


class FootlessMachine(Machine):
    """A machine that declares no HostFootprint part."""

    state = MachineState.OFF

    async def power_on(self) -> None: ...
    async def power_off(self) -> None: ...
    async def reset(self) -> None: ...
    async def load(self, image: ProgramImage) -> None: ...

    def counters(self) -> Counters:
        return Counters(0, 0)


def test_process_cpu_and_memory() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "x = bytearray(32 << 20)\nwhile True: pass"])
    try:
        probe = HostUsageProbe()
        machine = ProcessMachine([busy.pid])
        first = probe.measure_footprint(machine)  # lifetime average
        assert first.note == ""
        time.sleep(0.6)  # the process burns CPU meanwhile: the thing measured
        usage = probe.measure_footprint(machine)
        assert usage.cpu_percent > 20, usage
        assert usage.memory_bytes > 32 << 20
    finally:
        busy.kill()
        busy.wait()
    gone = probe.measure_footprint(machine)
    assert gone.cpu_percent == 0 and "unavailable" in gone.note


def test_worker_thread_cpu_share() -> None:
    stop = threading.Event()
    started = threading.Event()
    tid: list[int] = []

    def spin() -> None:
        tid.append(threading.get_native_id())
        started.set()
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=spin)
    t.start()
    try:
        assert started.wait(10)
        probe = HostUsageProbe()
        machine = ThreadMachine(tid)
        assert probe.measure_footprint(machine).cpu_percent == 0  # no previous measurement yet
        time.sleep(0.5)  # the thread burns CPU meanwhile: the thing measured
        usage = probe.measure_footprint(machine)
        assert usage.cpu_percent > 20, usage
        assert usage.memory_bytes == 0 and "shared with the server" in usage.note
    finally:
        stop.set()
        t.join()


def test_unknown_backend_reads_zero_with_a_note() -> None:
    usage = HostUsageProbe().measure(FootlessMachine())
    assert (usage.cpu_percent, usage.memory_bytes) == (0, 0) and "does not say" in usage.note
    assert HostUsageProbe().measure(None).note == "powered off"


async def test_session_metrics_carry_host_fields(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "crc32")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    m = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    assert m.host_cpu_percent >= 0 and m.host_memory_bytes >= 0
    got = []
    async for msg in client.telemetry.stream_session_metrics(name=s.name):
        got.append(msg)
        if len(got) == 2:
            break
    assert all(g.metrics.host_cpu_percent >= 0 for g in got)


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_busy_firmware_shows_real_host_usage(client: AsyncClient, backend: str) -> None:
    """echo waits for input in a busy loop polling the UART: the session burns a host
    core on either backend, and the session metrics say so (QEMU: its process's CPU and
    RSS; Unicorn: its thread's CPU in its worker process, memory that worker's RSS with the note that says
    why)."""
    require_backend(backend)
    prog = await upload(client, "lm3s6965evb", "echo")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, backend=backend,
                                              run=True)).session
    await console_until(client, s.name, b"echo ready\n")  # from here on it spins on the UART
    samples: list[tpb.SessionMetrics] = []
    # each message measures the 0.5 s since the one before (the first: the baseline)
    async with contextlib.aclosing(client.telemetry.stream_session_metrics(  # type: ignore[type-var]
            name=s.name, interval=duration(0.5))) as stream:
        async for msg in stream:
            samples.append(msg.metrics)
            if len(samples) == 3:
                break
    measured = samples[1:]
    assert all(m.state == cpb.SESSION_STATE_RUNNING for m in measured)
    # a busy loop is close to 100 % of a core; a loaded shared host still leaves it well above 20
    assert max(m.host_cpu_percent for m in measured) > 20, [m.host_cpu_percent for m in measured]
    if backend == "qemu":
        assert all(m.host_memory_bytes > 8 << 20 for m in measured), [m.host_memory_bytes for m in measured]
        assert all(m.host_usage_note == "" for m in measured)
    else:
        assert all(m.host_memory_bytes > 8 << 20 for m in measured), [m.host_memory_bytes for m in measured]
        # its thread runs in a worker process, beside that worker's other machines
        assert all("shared with the other machines it runs" in m.host_usage_note
                   for m in measured), measured[0].host_usage_note
    await client.sessions.power_off_session(name=s.name)
    off = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    assert (off.host_cpu_percent, off.host_memory_bytes, off.host_usage_note) == (0, 0, "powered off")
