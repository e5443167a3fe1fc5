"""Session metrics that tell the truth (issue 17): GetSessionMetrics rates MIPS and host CPU
over a window of samples the server keeps per session, so the first request on a running
session already has a rate; host CPU and memory are measured on both backends (QEMU: its
process; Unicorn: its thread in its worker process, memory the worker's RSS), and the
instruction count moves while a session runs on both (QEMU: its plugin's total)."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.core.telemetry import SessionTick, SessionWindow
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import console_until, upload
from tests.helpers.backends import require_backend, require_qemu_plugin


def test_window_rates_from_the_oldest_sample_in_span() -> None:
    window = SessionWindow(span=2.0, settle=0.2)
    assert window.rate_base(100.0) is None  # nothing sampled yet: the caller must settle
    window.add(SessionTick(100.0, 1_000_000, 1.0))
    assert window.rate_base(100.05) is None  # too close to rate over
    base = window.rate_base(100.2)
    assert base == SessionTick(100.0, 1_000_000, 1.0)
    now = SessionTick(100.5, 6_000_000, 1.25)
    assert SessionWindow.mips(base, now) == pytest.approx(10.0)  # 5 M instructions in 0.5 s
    assert SessionWindow.cpu_percent(base, now) == pytest.approx(50.0)  # 0.25 s CPU in 0.5 s
    window.add(now)
    window.add(SessionTick(101.5, 16_000_000, 2.25))
    # 100.0 is now 2.0 s old: the window keeps the last sample at least span old, no older
    window.add(SessionTick(102.6, 27_000_000, 3.35))
    assert [t.t for t in window.ticks] == [100.5, 101.5, 102.6]
    assert window.rate_base(102.7) == SessionTick(101.5, 16_000_000, 2.25)  # 100.5 is older than span
    assert window.rate_base(200.0) is None  # a quiet spell: everything is stale


def test_window_restarts_when_the_count_goes_back() -> None:
    window = SessionWindow(span=2.0, settle=0.2)
    window.add(SessionTick(10.0, 5_000_000, None))
    window.add(SessionTick(10.5, 100, None))  # a reset: counting from zero again
    assert [t.instructions for t in window.ticks] == [100]
    assert window.rate_base(10.6) is None
    base = window.rate_base(10.8)
    assert base is not None
    assert SessionWindow.cpu_percent(base, SessionTick(11.0, 200, 1.0)) is None  # CPU not measured then


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_first_request_on_a_busy_session_has_rates_and_usage(client: AsyncClient, backend: str) -> None:
    """echo spins on the UART waiting for input: a busy running session. Its very first
    GetSessionMetrics carries MIPS, an exact instruction count, host CPU and host memory,
    all above zero and plausible, on both backends (QEMU's count is read while it runs:
    the plugin's total), as has a second request straight after (from the window, not
    from nothing)."""
    require_backend(backend)
    if backend == "qemu":
        require_qemu_plugin()
    total_memory = psutil.virtual_memory().total
    cores = psutil.cpu_count() or 1
    prog = await upload(client, "lm3s6965evb", "echo")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, backend=backend,
                                              run=True)).session
    await console_until(client, s.name, b"echo ready\n")
    first = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    assert first.state == cpb.SESSION_STATE_RUNNING
    assert first.counts_exact, first
    assert first.instructions > 0 and first.mips > 0, first
    assert 0 < first.host_cpu_percent <= 100 * cores, first
    # a QEMU process, or the worker running Unicorn: MiBs, not more than the machine has
    assert 8 << 20 < first.host_memory_bytes < total_memory, first
    again = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    assert 0 < again.host_cpu_percent <= 100 * cores and 8 << 20 < again.host_memory_bytes < total_memory, again
    assert again.mips > 0 and again.instructions >= first.instructions, (first, again)
    if backend == "qemu":
        assert first.host_usage_note == ""
    else:
        assert "RSS of worker process" in first.host_usage_note, first.host_usage_note
    await client.sessions.power_off_session(name=s.name)
    off = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    assert (off.mips, off.host_cpu_percent, off.host_memory_bytes) == (0, 0, 0)
    assert off.host_usage_note == "powered off"


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_halted_session_count_stands_still(client: AsyncClient, backend: str) -> None:
    """A session paused while busy: two requests a moment apart read the same count, MIPS
    0, and its host CPU falls to about nothing (QEMU's process, Unicorn's worker thread
    idle), while its memory is still there."""
    require_backend(backend)
    if backend == "qemu":
        require_qemu_plugin()
    prog = await upload(client, "lm3s6965evb", "echo")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, backend=backend,
                                              run=True)).session
    await console_until(client, s.name, b"echo ready\n")
    await asyncio.sleep(0.2)
    await client.sessions.pause_session(name=s.name)
    one = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    await asyncio.sleep(0.3)
    two = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    assert one.state == two.state == cpb.SESSION_STATE_HALTED
    assert two.instructions == one.instructions > 0 and two.counts_exact, (one, two)
    assert two.mips == 0
    assert two.host_cpu_percent < 50, two  # a halted machine spins nothing (noise aside)
    assert two.host_memory_bytes > 8 << 20, two
    if backend == "unicorn":
        assert "no thread runs for this session now" in two.host_usage_note, two.host_usage_note


async def test_halted_session_answers_zero_at_once(client: AsyncClient) -> None:
    """A halted session runs nothing: MIPS 0 (no waiting for a second sample), its count
    the instructions stepped."""
    prog = await upload(client, "lm3s6965evb", "crc32")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    await client.debug.step(name=s.name, count=1000)
    m = (await client.telemetry.get_session_metrics(name=s.name)).metrics
    assert m.state == cpb.SESSION_STATE_HALTED
    assert m.mips == 0 and m.instructions == 1000
