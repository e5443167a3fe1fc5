"""gdb-multiarch through pygdbmi: gdb's own ^C (-exec-interrupt) while the firmware runs,
and gdb's breakpoints visible in the session's Debugger while gdb is attached."""

from __future__ import annotations

import asyncio

import pytest

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from tests.gdb.mi import MiGdb
from tests.helpers.api import wait_progress, wait_state
from tests.helpers.gdb import Attach, wait_for_clients

pytestmark = pytest.mark.usefixtures("gdb_multiarch")


async def test_interrupt_and_breakpoints_while_attached(gdb_target: Attach, client: AsyncClient) -> None:
    t = await gdb_target("mps2-an385", "echo", "unicorn")  # echo waits for input forever
    mi = await asyncio.to_thread(MiGdb, t.elf, t.port)
    try:
        # always-inserted: gdb keeps its breakpoints in the target while stopped too
        await asyncio.to_thread(mi.cmd, "-gdb-set breakpoint always-inserted on")
        await asyncio.to_thread(mi.cmd, "-break-insert main")
        bps = (await client.debug.list_breakpoints(name=t.name)).breakpoints
        assert len(bps) == 1 and bps[0].source.function == "main"
        recs = await asyncio.to_thread(mi.cmd, "-exec-continue", until="*stopped")
        stop = MiGdb.stopped(recs)
        assert stop["reason"] == "breakpoint-hit" and stop["frame"]["func"] == "main"
        assert (await client.debug.list_breakpoints(name=t.name)).breakpoints[0].hit_count == 1

        await asyncio.to_thread(mi.cmd, "-exec-continue", until="*running")
        await wait_state(client, t.name, cpb.SESSION_STATE_RUNNING)
        # interrupted while it really runs: its virtual time moves on first
        await wait_progress(client, t.name)
        recs = await asyncio.to_thread(mi.cmd, "-exec-interrupt", until="*stopped")
        stop = MiGdb.stopped(recs)
        assert stop["reason"] == "signal-received" and stop["signal-name"] == "SIGINT"
        assert (await client.sessions.get_session(name=t.name)).session.state == cpb.SESSION_STATE_HALTED
        regs = (await client.debug.read_registers(name=t.name, names=["pc"])).registers
        assert int(stop["frame"]["addr"], 16) == regs[0].value

        await asyncio.to_thread(mi.cmd, "-target-detach")
        await wait_for_clients(t.gdbserver, 0)
        assert not (await client.debug.list_breakpoints(name=t.name)).breakpoints
        # the detach resumed the halted session (echo then waits for input, running)
        assert (await client.sessions.get_session(name=t.name)).session.state == cpb.SESSION_STATE_RUNNING
        await client.sessions.pause_session(name=t.name)
    finally:
        await asyncio.to_thread(mi.exit)
