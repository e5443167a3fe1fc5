"""Calls that could outlive their caller, on every backend: a long Step, a Continue that
waits, a StepLine. Each stops when its RPC is cancelled or its deadline passes, and
leaves the session halted and usable; Pause and PowerOff never wait behind one. Memory
while running: read where the backend can, a clear refusal where it cannot."""

from __future__ import annotations

import asyncio
import time

import pytest

from machineserver.sdk import errors
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.conformance import Conf

BOARD = "mps2-an385"
RAM = 0x2000_8000


async def _halted_in_echo(conf: Conf) -> str:
    """A session in the echo firmware, halted while it polls the UART for input forever."""
    name = await conf.session(BOARD, "echo", power_on=True)
    await conf.client.sessions.run_session(name=name)
    await conf.console_until(name, b"echo ready\n")
    await conf.client.debug.halt(name=name)
    return name


async def _usable(conf: Conf, name: str) -> None:
    session = await conf.state(name)
    assert session.state == cpb.SESSION_STATE_HALTED, session  # type: ignore[attr-defined]
    regs = await conf.registers(name, ["pc"])
    assert regs["pc"] != 0
    step = await conf.client.debug.step(name=name, count=1)
    assert step.stop.reason == cpb.STOP_REASON_STEP


async def test_a_long_step_stops_at_its_deadline(conf: Conf) -> None:
    name = await _halted_in_echo(conf)
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        await conf.client.debug.step(name=name, count=10**9, timeout=0.5)
    # the server stopped stepping: the next calls are answered at once, not after hours
    await _usable(conf, name)
    assert time.monotonic() - started < 10


async def test_a_long_step_stops_when_its_caller_cancels(conf: Conf) -> None:
    name = await _halted_in_echo(conf)
    call = asyncio.ensure_future(conf.client.debug.step(name=name, count=10**9))
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await _usable(conf, name)


async def test_pause_preempts_a_long_step(conf: Conf) -> None:
    name = await _halted_in_echo(conf)
    step = asyncio.ensure_future(conf.client.debug.step(name=name, count=10**9))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await conf.client.debug.halt(name=name)
    result = await asyncio.wait_for(step, 10)
    assert result.stop.reason == cpb.STOP_REASON_HALT  # the step's caller gets the halt
    assert time.monotonic() - started < 10
    await _usable(conf, name)


async def test_power_off_preempts_a_long_step(conf: Conf) -> None:
    name = await _halted_in_echo(conf)
    step = asyncio.ensure_future(conf.client.debug.step(name=name, count=10**9))
    await asyncio.sleep(0.3)
    await asyncio.wait_for(conf.client.sessions.power_off_session(name=name), 15)
    with pytest.raises(errors.FailedPrecondition) as exc:
        await asyncio.wait_for(step, 10)
    assert "powered off" in exc.value.message
    assert (await conf.state(name)).state == cpb.SESSION_STATE_OFF  # type: ignore[attr-defined]


async def test_a_waiting_continue_halts_at_its_deadline(conf: Conf) -> None:
    name = await _halted_in_echo(conf)
    with pytest.raises(errors.DeadlineExceeded) as exc:
        await conf.client.debug.continue_(name=name, wait=True, timeout=1.0)
    assert "halted" in exc.value.message
    await _usable(conf, name)


async def test_a_waiting_continue_halts_when_its_caller_cancels(conf: Conf) -> None:
    name = await _halted_in_echo(conf)
    call = asyncio.ensure_future(conf.client.debug.continue_(name=name, wait=True))
    await conf.wait_state(name, cpb.SESSION_STATE_RUNNING)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await conf.wait_state(name, cpb.SESSION_STATE_HALTED)
    await _usable(conf, name)


async def test_a_step_line_that_does_not_end_halts_at_its_deadline(conf: Conf) -> None:
    name = await _halted_in_echo(conf)  # halted inside the polling loop of uart_getc
    bt = (await conf.client.debug.backtrace(name=name)).frames
    assert bt, "the echo firmware has call frames"
    # stepping out of main never ends (main loops forever reading the UART)
    await conf.client.debug.set_breakpoint(name=name, location={"symbol": "main"})
    with pytest.raises((errors.DeadlineExceeded, errors.FailedPrecondition)):
        for _ in range(50):  # step lines until one of them cannot end
            await conf.client.debug.step_line(name=name, mode="STEP_MODE_OVER", timeout=1.0)
    await _usable(conf, name)


async def test_memory_while_running_is_read_or_refused_clearly(conf: Conf) -> None:
    name = await conf.session(BOARD, "echo", run=True)
    await conf.console_until(name, b"echo ready\n")
    caps = await conf.client.capabilities.get_capabilities()
    backend = next(b for b in caps.backends if b.name == conf.backend)
    promise = backend.details["memory_while_running"]
    if promise.startswith("yes"):
        data = (await conf.client.debug.read_memory(name=name, address=RAM, size=16)).data
        assert len(data) == 16
        await conf.client.debug.write_memory(name=name, address=RAM, data=b"\x11\x22")
        again = (await conf.client.debug.read_memory(name=name, address=RAM, size=2)).data
        assert again == b"\x11\x22"
        assert (await conf.state(name)).state == cpb.SESSION_STATE_RUNNING  # type: ignore[attr-defined]
    else:
        with pytest.raises(errors.FailedPrecondition) as exc:
            await conf.client.debug.read_memory(name=name, address=RAM, size=16)
        assert "running" in exc.value.message and "pause it first" in exc.value.message
    # registers stay a halted-only thing on every backend
    with pytest.raises(errors.FailedPrecondition):
        await conf.client.debug.read_registers(name=name)
