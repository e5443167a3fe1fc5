"""Data safety with real server processes: one server per data directory (a second one
refuses to start and names the holder), and what survives a restart, SIGKILL or SIGTERM:
the console log (same bytes, same absolute offsets, and new output after them) and the
breakpoints a user set (not those of a GDB/Attach client)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import start
from machineserver.server.config import ServerConfig
from machineserver.server.store.console_files import ConsoleStore
from machineserver.server.store.lock import DataDirLocked
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.api import console_text, console_until, upload, wait_state
from tests.helpers.firmware import elf_symbol
from tests.helpers.server import ServerProcess, serving

HELLO = b"Hello from lm3s6965evb!\n"
SIGNALS = [pytest.param(signal.SIGKILL, id="sigkill"), pytest.param(signal.SIGTERM, id="sigterm")]


async def connect(sp: ServerProcess) -> AsyncClient:
    return await AsyncClient.connect(sp.target, timeout=20)


def wait_on_disk(path: Path, content: bytes, timeout: float = 10) -> None:
    """Until the console file holds ``content``: the write is issued behind the output
    (off the event loop), and only what was written can survive a SIGKILL."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and content in path.read_bytes()):
        assert time.monotonic() < deadline, f"{path} never held {content!r}"
        time.sleep(0.01)


# ---------------------------------------------------------------------- the data directory lock


async def test_a_second_server_on_the_same_data_dir_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    second = ServerProcess(data)
    try:
        async with await connect(first) as c:
            s = (await c.sessions.create_session(board_template="lm3s6965evb", session_id="mine",
                                                 power_on=True)).session
            assert s.state == cpb.SESSION_STATE_HALTED
            proc = second.spawn()
            code = await asyncio.to_thread(proc.wait, 30)
            log = second.read_log()
            assert code != 0, log
            assert "Traceback" not in log, log
            assert f"data directory {data} is in use by another MachineServer" in log, log
            assert f"pid {first.pid} on host {socket.gethostname()}, started " in log, log
            # the first server was left alone: its session is still on and its own
            again = (await c.sessions.get_session(name=s.name)).session
            assert again.state == cpb.SESSION_STATE_HALTED and again.state_reason == "powered on"
            with pytest.raises(errors.AlreadyExists):
                await c.sessions.create_session(board_template="lm3s6965evb", session_id="mine")
    finally:
        first.stop(signal.SIGKILL)
    # a killed holder's lock is gone with its process: the directory starts again
    third = ServerProcess(data).start()
    try:
        async with await connect(third) as c:
            back = (await c.sessions.get_session(name="sessions/mine")).session
            assert back.state == cpb.SESSION_STATE_OFF and "restarted" in back.state_reason
    finally:
        third.stop()
    assert second.proc is not None and second.proc.returncode != 0


async def test_in_process_servers_share_the_lock(tmp_path: Path) -> None:
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning")
    running = await start(cfg)
    try:
        with pytest.raises(DataDirLocked) as exc:
            await start(cfg)
        assert exc.value.holder["pid"] == os.getpid()
    finally:
        await running.stop(0.5)
    again = await start(cfg)  # released by a graceful stop
    await again.stop(0.5)


# ---------------------------------------------------------------------- the console log


@pytest.mark.parametrize("sig", SIGNALS)
async def test_console_survives_a_restart_with_its_offsets(tmp_path: Path, sig: int) -> None:
    data = tmp_path / "data"
    sp = ServerProcess(data).start()
    try:
        async with await connect(sp) as c:
            prog = await upload(c, "lm3s6965evb", "hello")
            s = (await c.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True,
                                                 session_id="talker")).session
            await wait_state(c, s.name, cpb.SESSION_STATE_EXITED)
            assert await console_text(c, s.name) == HELLO
        if sig == signal.SIGKILL:
            wait_on_disk(data / "console" / "talker.log", HELLO)
    finally:
        sp.stop(sig)

    sp = ServerProcess(data).start()
    try:
        async with await connect(sp) as c:
            assert await console_text(c, s.name) == HELLO
            assert (await c.telemetry.get_session_metrics(name=s.name)).metrics.console_bytes == len(HELLO)
            # new output goes on after the old, at absolute offsets
            await c.sessions.power_on_session(name=s.name)
            await c.sessions.run_session(name=s.name)
            assert await console_until(c, s.name, HELLO * 2) == HELLO * 2
            tail = [m async for m in c.sessions.stream_console(name=s.name, offset=len(HELLO), follow=False)]
            assert tail[0].offset == len(HELLO) and b"".join(m.data for m in tail) == HELLO
            # deleted with its session, on disk too
            await c.sessions.delete_session(name=s.name)
            assert not (data / "console" / "talker.log").exists()
    finally:
        sp.stop()


# ---------------------------------------------------------------------- breakpoints


async def attach_breakpoint(c: AsyncClient, session: str, symbol: str) -> AsyncIterator[dpb.AttachResponse]:
    """An Attach stream (a client's connection) that sets a breakpoint on ``symbol`` and
    stays open; returns the stream once the breakpoint is set."""
    done = asyncio.Event()

    async def requests() -> AsyncIterator[dpb.AttachRequest]:
        yield dpb.AttachRequest(open=dpb.AttachOpen(name=session, control=True))
        yield dpb.AttachRequest(command=dpb.DebugCommand(
            tag=1, set_breakpoint=dpb.SetBreakpointRequest(location=dpb.CodeLocation(symbol=symbol))))
        await done.wait()  # the connection stays until the server goes

    stream = c.debug.attach(requests())
    async for msg in stream:
        if msg.HasField("result"):
            assert msg.result.tag == 1 and msg.result.code == 0, msg.result.message
            break
    return stream


@pytest.mark.parametrize("sig", SIGNALS)
async def test_user_breakpoints_survive_a_restart(tmp_path: Path, sig: int) -> None:
    data = tmp_path / "data"
    main = elf_symbol("lm3s6965evb", "coverage", "main")
    sp = ServerProcess(data).start()
    try:
        async with await connect(sp) as c:
            prog = await upload(c, "lm3s6965evb", "coverage")
            s = (await c.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True,
                                                 session_id="dbg")).session
            at_main = (await c.debug.set_breakpoint(name=s.name, location={"symbol": "main"})).breakpoint
            gone = (await c.debug.set_breakpoint(name=s.name, location={"symbol": "never_called"})).breakpoint
            called = (await c.debug.set_breakpoint(name=s.name,
                                                   location={"symbol": "called_three_times"})).breakpoint
            await c.debug.clear_breakpoint(name=s.name, id=gone.id)
            attached = await attach_breakpoint(c, s.name, "uart_putc")  # a client's: dies with it
            listed = (await c.debug.list_breakpoints(name=s.name)).breakpoints
            assert [b.location.symbol for b in listed] == ["main", "called_three_times", "uart_putc"]
            stop = (await c.debug.continue_(name=s.name, wait=True)).stop
            assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.pc == main
            del attached
    finally:
        sp.stop(sig)

    sp = ServerProcess(data).start()
    try:
        async with await connect(sp) as c:
            listed = (await c.debug.list_breakpoints(name=s.name)).breakpoints
            assert [(b.id, b.location.symbol, b.address, b.hit_count) for b in listed] == [
                (at_main.id, "main", main, 0), (called.id, "called_three_times", called.address, 0)]
            assert listed[0].source.function == "main"
            # applied again at power on: the firmware stops at main, then in the function
            await c.sessions.power_on_session(name=s.name)
            stop = (await c.debug.continue_(name=s.name, wait=True)).stop
            assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.pc == main
            stop = (await c.debug.continue_(name=s.name, wait=True)).stop
            assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.pc == called.address
            # a new one gets a new id; a cleared one stays cleared
            new = (await c.debug.set_breakpoint(name=s.name, location={"symbol": "never_called"})).breakpoint
            assert new.id not in (at_main.id, called.id)
            await c.debug.clear_breakpoint(name=s.name, id=at_main.id)
    finally:
        sp.stop(sig)

    sp = ServerProcess(data).start()
    try:
        async with await connect(sp) as c:
            listed = (await c.debug.list_breakpoints(name=s.name)).breakpoints
            assert [b.location.symbol for b in listed] == ["called_three_times", "never_called"]
            # deleted with the session: a new session of the same id starts with none
            await c.sessions.delete_session(name=s.name)
            await c.sessions.create_session(board_template="lm3s6965evb", session_id="dbg")
            assert not (await c.debug.list_breakpoints(name=s.name)).breakpoints
    finally:
        sp.stop()


async def test_console_files_of_sessions_that_are_gone_are_removed_at_start(tmp_path: Path) -> None:
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning")
    async with serving(cfg) as (_, c):
        prog = await upload(c, "lm3s6965evb", "hello")
        s = (await c.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True,
                                             session_id="keep")).session
        await wait_state(c, s.name, cpb.SESSION_STATE_EXITED)
    console = cfg.data_dir / "console"
    ConsoleStore(console).file("ghost", 100).append(b"from a session deleted mid-crash", 0)
    async with serving(cfg) as (_, c):
        assert sorted(p.name for p in console.glob("*.log")) == ["keep.log"]
        assert await console_text(c, s.name) == HELLO
        # a new session never sees another's leftovers, even under the same id
        await c.sessions.delete_session(name=s.name)
        ConsoleStore(console).file("keep", 100).append(b"stale", 0)
        await c.sessions.create_session(board_template="lm3s6965evb", session_id="keep")
        assert await console_text(c, s.name) == b""
