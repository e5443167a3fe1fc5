"""Sessions end to end on the embedded default backend: lifecycle, console, events,
run control, limits and the bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.config import ServerConfig
from machineserver.server.core.engine import Limits
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import console_until, session_events, upload, wait_state
from tests.helpers.firmware import firmware
from tests.helpers.server import serving

__all__ = ["console_until", "upload", "wait_state"]  # imported from here by older test modules


async def test_hello_runs_to_exit_and_console_replays(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "hello")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True,
                                               display_name="demo", labels={"team": "fw"})).session
    assert s.name.startswith("sessions/") and s.backend == "unicorn"
    assert await console_until(client, s.name, b"\n") == b"Hello from lm3s6965evb!\n"
    done = await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
    assert done.exit_code == 0 and done.last_stop.reason == cpb.STOP_REASON_EXIT  # type: ignore[attr-defined]
    # replay from an offset, without following
    chunks = [m async for m in client.sessions.stream_console(name=s.name, offset=6, follow=False)]
    assert b"".join(c.data for c in chunks) == b"from lm3s6965evb!\n" and chunks[0].offset == 6
    with pytest.raises(errors.OutOfRange):
        [m async for m in client.sessions.stream_console(name=s.name, offset=10_000, follow=False)]


async def test_lifecycle_and_state_guards(client: AsyncClient) -> None:
    prog = await upload(client, "mps2-an385", "crc32")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog)).session
    assert s.state == cpb.SESSION_STATE_OFF
    with pytest.raises(errors.FailedPrecondition) as exc:
        await client.debug.step(name=s.name)
    assert "power it on" in exc.value.message
    with pytest.raises(errors.FailedPrecondition):
        await client.sessions.run_session(name=s.name)
    on = (await client.sessions.power_on_session(name=s.name)).session
    assert on.state == cpb.SESSION_STATE_HALTED
    assert (await client.sessions.power_on_session(name=s.name)).session.state == cpb.SESSION_STATE_HALTED
    running = (await client.sessions.run_session(name=s.name)).session
    assert running.state == cpb.SESSION_STATE_RUNNING
    paused = await client.sessions.pause_session(name=s.name)
    assert paused.session.state == cpb.SESSION_STATE_HALTED
    assert paused.stop.reason == cpb.STOP_REASON_HALT
    regs = await client.debug.read_registers(name=s.name, names=["pc"])
    assert regs.registers[0].value == paused.stop.pc
    await client.sessions.run_session(name=s.name)
    out = await console_until(client, s.name, b"\n")
    assert out == b"crc32=0x80f45f04\n"
    await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
    with pytest.raises(errors.FailedPrecondition) as exc:
        await client.sessions.run_session(name=s.name)
    assert "reset" in exc.value.message
    reset = (await client.sessions.reset_session(name=s.name, run_after_reset=True)).session
    assert reset.state in (cpb.SESSION_STATE_RUNNING, cpb.SESSION_STATE_EXITED)
    out = await console_until(client, s.name, b"crc32=0x80f45f04\ncrc32=0x80f45f04\n")
    off = (await client.sessions.power_off_session(name=s.name)).session
    assert off.state == cpb.SESSION_STATE_OFF
    await client.sessions.delete_session(name=s.name)
    with pytest.raises(errors.NotFound):
        await client.sessions.get_session(name=s.name)


async def test_events_stream_reports_state_changes(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "hello")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog)).session
    events: list[object] = []
    async with session_events(client, s.name) as stream:
        # the first message: subscribed, with the session as it is now
        assert [(x.name, x.state) for x in stream.first.sessions] == [(s.name, cpb.SESSION_STATE_OFF)]
        await client.sessions.power_on_session(name=s.name)
        await client.sessions.run_session(name=s.name)
        while not events or events[-1].state != cpb.SESSION_STATE_EXITED:  # type: ignore[attr-defined]
            events.append(await stream.next())
    states = [e.state for e in events]  # type: ignore[attr-defined]
    assert states[:2] == [cpb.SESSION_STATE_HALTED, cpb.SESSION_STATE_RUNNING]
    assert states[-1] == cpb.SESSION_STATE_EXITED
    assert events[-1].stop.exit_code == 0  # type: ignore[attr-defined]
    assert not any(e.HasField("subscribed") for e in events)  # type: ignore[attr-defined]


async def test_events_stream_for_every_session_starts_with_all_of_them(client: AsyncClient) -> None:
    a = (await client.sessions.create_session(board_template="lm3s6965evb", session_id="first")).session
    b = (await client.sessions.create_session(board_template="mps2-an385", session_id="second",
                                              power_on=True)).session
    async with session_events(client) as stream:
        assert [(x.name, x.state) for x in stream.first.sessions] == [
            (a.name, cpb.SESSION_STATE_OFF), (b.name, cpb.SESSION_STATE_HALTED)]
        c = (await client.sessions.create_session(board_template="lm3s6965evb", session_id="third")).session
        await client.sessions.power_on_session(name=a.name)
        got = [(ev.session, ev.state) for ev in [await stream.next(), await stream.next()]]
    assert got == [(c.name, cpb.SESSION_STATE_OFF), (a.name, cpb.SESSION_STATE_HALTED)]
    with pytest.raises(errors.NotFound):
        async with session_events(client, "sessions/nope"):
            pass


async def test_events_stream_ends_when_its_session_is_deleted(client: AsyncClient) -> None:
    s = (await client.sessions.create_session(board_template="lm3s6965evb")).session
    async with session_events(client, s.name) as stream:
        await client.sessions.delete_session(name=s.name)
        rest = [ev async for ev in stream]
    assert rest and all(ev.session == s.name for ev in rest)


async def test_console_input_reaches_the_uart(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "echo")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True)).session
    await console_until(client, s.name, b"echo ready\n")
    n = (await client.sessions.write_console(name=s.name, data=b"hi there\nq")).bytes_written
    assert n == 10
    out = await console_until(client, s.name, b"bye\n")
    assert out == b"echo ready\nhi there\nbye\n"
    await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
    with pytest.raises(errors.InvalidArgument):
        await client.sessions.write_console(name=s.name, data=b"")
    with pytest.raises(errors.InvalidArgument):
        await client.sessions.write_console(name=s.name, data=b"x" * 70000)


async def test_inline_board_config(client: AsyncClient) -> None:
    lm3s = (await client.capabilities.get_board_template(name="lm3s6965evb")).board_template
    config = lm3s.config.replace("name: lm3s6965evb", "name: my-lm3s", 1)
    prog = await upload(client, "lm3s6965evb", "hello")
    s = (await client.sessions.create_session(board_config=config, program=prog, run=True)).session
    assert s.board == "my-lm3s" and "my-lm3s" in s.board_config
    assert b"Hello" in await console_until(client, s.name, b"\n")


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({}, errors.InvalidArgument, "board_template"),
        ({"board_template": "lm3s6965evb", "board_config": "x"}, errors.InvalidArgument, "board_template"),
        ({"board_template": "nope"}, errors.NotFound, None),
        ({"board_template": "lm3s6965evb", "backend": "renode9"}, errors.InvalidArgument, "backend"),
        ({"board_template": "lm3s6965evb", "program": "programs/missing"}, errors.NotFound, None),
        ({"board_config": "name: x\narch: arm-cortex-m"}, errors.InvalidArgument, "board_config.memory"),
        ({"board_template": "lm3s6965evb", "labels": {"BAD KEY": "v"}}, errors.InvalidArgument, "labels[BAD KEY]"),
        ({"board_template": "lm3s6965evb", "session_id": "Bad_ID"}, errors.InvalidArgument, "session_id"),
    ],
)
async def test_bad_create_requests(client: AsyncClient, kwargs: dict, code: type, field: str | None) -> None:  # type: ignore[type-arg]
    with pytest.raises(code) as exc:
        await client.sessions.create_session(**kwargs)
    if field is not None:
        assert exc.value.field_violations[0][0] == field  # type: ignore[attr-defined]
    assert not (await client.sessions.list_sessions()).sessions


async def test_list_filter_and_pages(client: AsyncClient) -> None:
    for i in range(5):
        await client.sessions.create_session(board_template="lm3s6965evb", session_id=f"s{i}",
                                             labels={"parity": "even" if i % 2 == 0 else "odd"})
    await client.sessions.power_on_session(name="sessions/s0")
    page = await client.sessions.list_sessions(page_size=2)
    names = [s.name for s in page.sessions]
    while page.next_page_token:
        page = await client.sessions.list_sessions(page_size=2, page_token=page.next_page_token)
        names += [s.name for s in page.sessions]
    assert names == [f"sessions/s{i}" for i in range(5)]
    even = await client.sessions.list_sessions(filter="labels.parity=even")
    assert [s.name for s in even.sessions] == ["sessions/s0", "sessions/s2", "sessions/s4"]
    halted = await client.sessions.list_sessions(filter="state=HALTED AND labels.parity=even")
    assert [s.name for s in halted.sessions] == ["sessions/s0"]
    with pytest.raises(errors.AlreadyExists):
        await client.sessions.create_session(board_template="lm3s6965evb", session_id="s1")
    with pytest.raises(errors.InvalidArgument):
        await client.sessions.list_sessions(page_size=2, page_token=page.next_page_token or "x", filter="board=a")


async def test_session_limit_and_instruction_limit(tmp_path: Path) -> None:
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path, limits=Limits(max_sessions=2))
    async with serving(config) as (_, c):
        prog = (await c.upload_program(firmware("lm3s6965evb", "crc32"))).program.name
        s = (await c.sessions.create_session(board_template="lm3s6965evb", program=prog,
                                             limits={"max_instructions": 200_000}, run=True)).session
        await c.sessions.create_session(board_template="lm3s6965evb")
        with pytest.raises(errors.ResourceExhausted):
            await c.sessions.create_session(board_template="lm3s6965evb")
        halted = await wait_state(c, s.name, cpb.SESSION_STATE_HALTED)
        assert "instruction limit" in halted.state_reason  # type: ignore[attr-defined]
        metrics = (await c.telemetry.get_session_metrics(name=s.name)).metrics
        assert metrics.instructions >= 200_000


async def test_faulting_firmware(client: AsyncClient) -> None:
    prog = await upload(client, "mps2-an385", "fault")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, run=True)).session
    out = await console_until(client, s.name, b"hardfault\n")
    assert out == b"about to fault\nhardfault\n"
    done = await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
    assert done.exit_code == 3  # type: ignore[attr-defined]
