"""Console marks (StreamConsoleResponse.marks): resets, power-ons and restored snapshots
recorded between the console's bytes, at the offset they came at; the bytes unchanged; a
follower told at once; the log's bounds (core/console.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.core.console import ConsoleLog, MarkKind
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import session_pb2 as pb
from tests.helpers.api import console_until, upload, wait_state

READY = b"echo ready\n"


async def everything(client: AsyncClient, name: str, offset: int = 0) -> list[pb.StreamConsoleResponse]:
    return [m async for m in client.sessions.stream_console(name=name, offset=offset, follow=False)]


def marks_of(msgs: list[pb.StreamConsoleResponse]) -> list[tuple[int, int, str]]:
    return [(m.offset, m.kind, m.detail) for msg in msgs for m in msg.marks]


def data_of(msgs: list[pb.StreamConsoleResponse]) -> bytes:
    return b"".join(m.data for m in msgs)


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_a_reset_of_a_running_session_is_marked_where_it_came(client: AsyncClient, backend: str) -> None:
    prog = await upload(client, "lm3s6965evb", "echo")  # says "echo ready", then waits for input
    s = (await client.sessions.create_session(board_template="lm3s6965evb", backend=backend, program=prog,
                                              run=True)).session
    await console_until(client, s.name, READY)
    await wait_state(client, s.name, cpb.SESSION_STATE_RUNNING)
    before = time.time()
    await client.sessions.reset_session(name=s.name, run_after_reset=True)
    await console_until(client, s.name, READY * 2)
    msgs = await everything(client, s.name)
    assert data_of(msgs) == READY * 2  # the bytes as written, nothing added
    assert marks_of(msgs) == [(0, pb.CONSOLE_MARK_KIND_POWER_ON, "powered on"),
                              (len(READY), pb.CONSOLE_MARK_KIND_RESET, "ResetSession")]
    reset = next(m for msg in msgs for m in msg.marks if m.kind == pb.CONSOLE_MARK_KIND_RESET)
    assert before - 1 <= reset.time.ToDatetime().timestamp() <= time.time() + 1
    # each mark sits in the message whose bytes it falls between
    for msg in msgs:
        for m in msg.marks:
            assert msg.offset <= m.offset <= msg.offset + len(msg.data)
    # read from after the reset: the marks before are not repeated
    later = await everything(client, s.name, len(READY) + 1)
    assert marks_of(later) == [] and data_of(later) == READY[1:]


async def test_power_on_and_restore_are_marked(client: AsyncClient) -> None:
    prog = await upload(client, "mps2-an385", "hello")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, power_on=True)).session
    snap = (await client.sessions.create_snapshot(name=s.name)).snapshot
    await client.sessions.run_session(name=s.name)
    await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
    hello = b"Hello from mps2-an385!\n"
    await client.sessions.power_off_session(name=s.name)
    await client.sessions.power_on_session(name=s.name)
    await client.sessions.restore_snapshot(name=s.name, snapshot=snap.name)
    await client.sessions.run_session(name=s.name)
    await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
    msgs = await everything(client, s.name)
    assert data_of(msgs) == hello * 2
    n = len(hello)
    assert marks_of(msgs) == [(0, pb.CONSOLE_MARK_KIND_POWER_ON, "powered on"),
                              (n, pb.CONSOLE_MARK_KIND_POWER_ON, "powered on"),
                              (n, pb.CONSOLE_MARK_KIND_SNAPSHOT_RESTORED, f"restored {snap.name}")]


async def test_a_follower_gets_a_mark_while_nothing_is_written(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "hello")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True)).session
    await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
    end = len(data_of(await everything(client, s.name)))
    stream = client.sessions.stream_console(name=s.name, offset=end, follow=True)
    async with contextlib.aclosing(stream):
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.3)
        assert not pending.done()  # nothing to say yet
        await client.sessions.reset_session(name=s.name)  # reset, left halted: no bytes
        msg = await asyncio.wait_for(pending, 20)
    assert msg.data == b"" and msg.offset == end
    assert [(m.offset, m.kind) for m in msg.marks] == [(end, pb.CONSOLE_MARK_KIND_RESET)]


async def test_the_log_keeps_a_bounded_number_of_marks_and_none_older_than_its_bytes() -> None:
    log = ConsoleLog(retain=16)
    for i in range(ConsoleLog.MAX_MARKS + 5):
        log.mark(MarkKind.RESET, f"r{i}")
    kept = log.marks
    assert len(kept) == ConsoleLog.MAX_MARKS and kept[0].detail == "r5" and kept[-1].detail == f"r{ConsoleLog.MAX_MARKS + 4}"
    log.append(b"0123456789")
    log.mark(MarkKind.POWER_ON, "at 10")
    log.append(b"abcdefghij")  # 20 bytes written, 16 kept: bytes 0..3 are gone, and the marks at 0
    assert [(m.offset, m.detail) for m in log.marks] == [(10, "at 10")]
    chunks = [c async for c in log.follow(0, False, marks=True)]
    assert chunks[0].dropped == 4 and chunks[0].offset == 4
    assert b"".join(c.data for c in chunks) == b"456789abcdefghij"
    assert [(m.offset, m.kind) for c in chunks for m in c.marks] == [(10, MarkKind.POWER_ON)]
    # without marks=True (e.g. the debug Attach stream) a follower never sees them
    assert all(not c.marks for c in [c async for c in log.follow(0, False)])


# Thumb: r0 = AIRCR, r1 = VECTKEY | SYSRESETREQ, store, then spin; the literals after
RESET_REQUEST_CODE = bytes.fromhex("0148" "0249" "0160" "fee7") + (0xE000ED0C).to_bytes(4, "little") \
    + (0x05FA0004).to_bytes(4, "little")


async def test_the_firmwares_own_reset_is_marked(client: AsyncClient) -> None:
    """A reset the firmware asks for (AIRCR.SYSRESETREQ) is a RESET mark too, where it
    came: the machine runs on from its reset vector (Unicorn; QEMU's are not reported yet)."""
    prog = await upload(client, "lm3s6965evb", "echo")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", backend="unicorn", program=prog,
                                              run=True)).session
    await console_until(client, s.name, READY)
    await client.sessions.pause_session(name=s.name)
    code = 0x20008000  # SRAM the echo firmware leaves alone
    await client.debug.write_memory(name=s.name, address=code, data=RESET_REQUEST_CODE)
    await client.debug.write_register(name=s.name, register="pc", value=code)
    await client.sessions.run_session(name=s.name)
    await console_until(client, s.name, READY * 2)  # it booted again
    msgs = await everything(client, s.name)
    assert data_of(msgs) == READY * 2
    assert marks_of(msgs) == [(0, pb.CONSOLE_MARK_KIND_POWER_ON, "powered on"),
                              (len(READY), pb.CONSOLE_MARK_KIND_RESET,
                               "the firmware's reset request (AIRCR.SYSRESETREQ)")]
