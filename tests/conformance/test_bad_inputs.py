"""Conformance: bad inputs get the same status code from every backend."""

from __future__ import annotations

import pytest

from machineserver.sdk import errors
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.backends import require_backend
from tests.helpers.conformance import Conf


async def test_unknown_session_is_not_found(conf: Conf) -> None:
    missing = "sessions/no-such-session"
    calls = [
        conf.client.sessions.get_session(name=missing),
        conf.client.sessions.power_on_session(name=missing),
        conf.client.sessions.run_session(name=missing),
        conf.client.sessions.write_console(name=missing, data=b"x"),
        conf.client.sessions.create_snapshot(name=missing),
        conf.client.debug.step(name=missing),
        conf.client.debug.read_registers(name=missing),
        conf.client.debug.read_memory(name=missing, address=0, size=4),
        conf.client.debug.set_breakpoint(name=missing, location={"symbol": "main"}),
    ]
    for call in calls:
        with pytest.raises(errors.NotFound):
            await call
    # a real session of this backend next to it is unaffected
    name = await conf.session("lm3s6965evb", "hello", run=True)
    await conf.wait_state(name, cpb.SESSION_STATE_EXITED)


async def test_powered_off_is_failed_precondition(conf: Conf) -> None:
    name = await conf.session("mps2-an385", "crc32")
    for call in (
        conf.client.debug.step(name=name),
        conf.client.debug.read_registers(name=name),
        conf.client.debug.write_register(name=name, register="r0", value=1),
        conf.client.debug.read_memory(name=name, address=0x20000000, size=4),
        conf.client.debug.write_memory(name=name, address=0x20000000, data=b"1"),
        conf.client.sessions.run_session(name=name),
        conf.client.sessions.write_console(name=name, data=b"x"),
        conf.client.sessions.create_snapshot(name=name),
    ):
        with pytest.raises(errors.FailedPrecondition) as exc:
            await call
        assert "power it on" in exc.value.message or "off" in exc.value.message


async def test_running_is_failed_precondition(conf: Conf) -> None:
    name = await conf.session("lm3s6965evb", "echo", run=True)
    await conf.console_until(name, b"echo ready\n")
    # (memory while running: tests/conformance/test_long_calls.py)
    for call in (
        conf.client.debug.step(name=name),
        conf.client.debug.read_registers(name=name),
        conf.client.sessions.load_program(name=name, program=await conf.upload("lm3s6965evb", "hello")),
    ):
        with pytest.raises(errors.FailedPrecondition) as exc:
            await call
        assert "running" in exc.value.message
    assert (await conf.state(name)).state == cpb.SESSION_STATE_RUNNING  # type: ignore[attr-defined]


@pytest.mark.parametrize(("board", "other"), [("lm3s6965evb", "sifive_e"), ("sifive_e", "mps2-an385")])
async def test_wrong_arch_program_is_invalid_argument(conf: Conf, board: str, other: str) -> None:
    require_backend(conf.backend, board)
    wrong = await conf.upload(other, "hello")
    with pytest.raises(errors.InvalidArgument) as exc:
        await conf.client.sessions.create_session(board_template=board, program=wrong, backend=conf.backend)
    assert exc.value.field_violations[0][0] == "program"
    name = await conf.session(board, "hello", power_on=True)
    with pytest.raises(errors.InvalidArgument) as exc:
        await conf.client.sessions.load_program(name=name, program=wrong)
    assert exc.value.field_violations[0][0] == "program"
    # the session keeps its own program
    await conf.run_to_exit(name)
    assert await conf.console(name) == f"Hello from {board}!\n".encode()


async def test_bad_debug_requests(conf: Conf) -> None:
    name = await conf.halted_at("lm3s6965evb", "coverage")
    with pytest.raises(errors.NotFound):
        await conf.client.debug.set_breakpoint(name=name, location={"symbol": "no_such_function"})
    with pytest.raises(errors.NotFound):
        await conf.client.debug.set_breakpoint(name=name, location={"file_line": "coverage.c:99999"})
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.set_breakpoint(name=name, location={"file_line": "nonsense"})
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.set_breakpoint(name=name)
    with pytest.raises(errors.NotFound):
        await conf.client.debug.clear_breakpoint(name=name, id=4242)
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.set_breakpoint(name=name, location={"address": 0x20000000},
                                               kind=dpb.BREAKPOINT_KIND_WATCH_WRITE, size=3)
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.read_registers(name=name, names=["bogus"])
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.write_register(name=name, register="r0", value=1 << 40)
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.read_memory(name=name, address=1 << 33, size=4)
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.step(name=name, count=10**10)
    # the session is still usable
    await conf.run_to_exit(name)
    assert await conf.console(name) == b"coverage done\n"
