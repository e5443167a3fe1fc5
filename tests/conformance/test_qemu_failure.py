"""A QEMU that dies under a session (SIGKILL from outside): the session goes to FAILED with
the reason, the server keeps serving every other session, and the failed session can be
powered on again."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import until
from tests.helpers.backends import qemu_children, reaped, require_backend
from tests.helpers.conformance import Conf


@pytest.fixture(autouse=True)
def _needs_qemu() -> None:
    require_backend("qemu")


async def power_on_and_find_child(conf: Conf, name: str) -> psutil.Process:
    before = {p.pid for p in qemu_children()}
    await conf.client.sessions.power_on_session(name=name)
    new = [p for p in qemu_children() if p.pid not in before]
    assert len(new) == 1, new
    return new[0]


@pytest.mark.parametrize("while_state", ["running", "halted"])
async def test_killed_qemu_fails_the_session_only(client: AsyncClient, while_state: str) -> None:
    qemu, unicorn = Conf(client, "qemu"), Conf(client, "unicorn")
    victim = await qemu.session("lm3s6965evb", "echo")
    child = await power_on_and_find_child(qemu, victim)
    assert child.name().startswith("qemu-system-arm")
    # neighbours on both backends
    bystander = await qemu.halted_at("mps2-an385", "crc32")
    other = await unicorn.halted_at("mps2-an385", "crc32")
    if while_state == "running":
        await client.sessions.run_session(name=victim)
        await qemu.console_until(victim, b"echo ready\n")

    child.kill()  # SIGKILL
    failed = await qemu.wait_state(victim, cpb.SESSION_STATE_FAILED, timeout=10)
    reason = failed.state_reason  # type: ignore[attr-defined]
    assert "QEMU" in reason and "SIGKILL" in reason, reason
    await until(lambda: reaped(child.pid), 3, what=f"QEMU {child.pid} reaped")

    # the failed session refuses debug work with a clear status, not a hang
    for call in (client.debug.step(name=victim), client.debug.read_registers(name=victim),
                 client.sessions.run_session(name=victim)):
        with pytest.raises(errors.FailedPrecondition) as exc:
            await call
        assert "failed" in exc.value.message and "power it on" in exc.value.message

    # everyone else is served as before
    for conf, name in ((qemu, bystander), (unicorn, other)):
        step = await client.debug.step(name=name, count=6)
        assert step.stop.reason == cpb.STOP_REASON_STEP
        await conf.run_to_exit(name)
        assert await conf.console(name) == b"crc32=0x80f45f04\n"
    listed = {s.name: s.state for s in (await client.sessions.list_sessions()).sessions}
    assert listed[victim] == cpb.SESSION_STATE_FAILED

    # power it on again: a fresh QEMU, the program reloaded, working console
    again = await power_on_and_find_child(qemu, victim)
    assert again.pid != child.pid
    assert (await qemu.state(victim)).state == cpb.SESSION_STATE_HALTED  # type: ignore[attr-defined]
    offset = await qemu.console_size(victim)
    await client.sessions.run_session(name=victim)
    await qemu.console_until(victim, b"echo ready\n" * 2 if offset else b"echo ready\n")
    await client.sessions.write_console(name=victim, data=b"ok\nq")
    await qemu.wait_state(victim, cpb.SESSION_STATE_EXITED)
    assert (await qemu.console(victim, offset)).endswith(b"echo ready\nok\nbye\n")


async def test_a_waiting_continue_learns_why_the_backend_died(client: AsyncClient) -> None:
    qemu = Conf(client, "qemu")
    victim = await qemu.session("mps2-an385", "echo")
    child = await power_on_and_find_child(qemu, victim)
    waiting = asyncio.ensure_future(client.debug.continue_(name=victim, wait=True))
    await qemu.wait_state(victim, cpb.SESSION_STATE_RUNNING)
    child.kill()
    with pytest.raises(errors.Unavailable) as exc:
        await asyncio.wait_for(waiting, 10)
    assert "failed" in exc.value.message and "SIGKILL" in exc.value.message, exc.value.message
    assert "powered off" not in exc.value.message


async def test_a_stuck_qemu_is_freed_when_its_session_fails(client: AsyncClient) -> None:
    """A SIGSTOPped QEMU stops answering: the session becomes FAILED and the process is gone
    at once, not when the session is deleted."""
    qemu = Conf(client, "qemu")
    victim = await qemu.session("mps2-an385", "echo")
    child = await power_on_and_find_child(qemu, victim)
    child.suspend()  # SIGSTOP
    try:
        with pytest.raises((errors.Unavailable, errors.FailedPrecondition)):
            await client.debug.step(name=victim, count=1, timeout=30)
        failed = await qemu.wait_state(victim, cpb.SESSION_STATE_FAILED, timeout=20)
        assert failed.state_reason  # type: ignore[attr-defined]
        await until(lambda: reaped(child.pid), 5, what=f"the stuck QEMU {child.pid} gone")
    finally:
        if child.is_running():
            child.kill()
