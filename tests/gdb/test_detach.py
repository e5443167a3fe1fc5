"""Leaving gdb (real gdb-multiarch, batch mode) on the unicorn and the qemu backend: a
``detach`` resumes a halted session, as gdbserver does; a bridge started with
halt_on_detach leaves it halted where it was; ``kill`` never resumes. Also through the
API: StartGdbServer(halt_on_detach) reported in GdbServer, and msctl's flag."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.app import RunningServer
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import upload, wait_state
from tests.helpers.firmware import elf_symbol_value
from tests.helpers.gdb import Attach, run_gdb, wait_for_clients
from tests.helpers.tools import VENV_BIN

pytestmark = pytest.mark.usefixtures("gdb_multiarch")


async def pc_of(client: AsyncClient, name: str) -> int:
    return (await client.debug.read_registers(name=name, names=["pc"])).registers[0].value


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_detach_resumes_the_session_to_its_exit(gdb_target: Attach, client: AsyncClient, backend: str) -> None:
    t = await gdb_target("mps2-an385", "hello", backend)
    out = await run_gdb(t, "break main", "continue", "detach")
    assert "Breakpoint 1, main () at src/hello.c" in out, out
    assert "[Inferior 1 (Remote target) detached]" in out, out
    await wait_for_clients(t.gdbserver, 0)
    # resumed from main, without gdb's breakpoint: the firmware says hello and exits 0
    s = await wait_state(client, t.name, cpb.SESSION_STATE_EXITED)
    assert s.exit_code == 0
    console = b"".join([m.data async for m in client.sessions.stream_console(name=t.name, follow=False)])
    assert console == b"Hello from mps2-an385!\n"
    assert not (await client.debug.list_breakpoints(name=t.name)).breakpoints


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_halt_on_detach_leaves_it_halted_at_the_same_pc(gdb_target: Attach, client: AsyncClient,
                                                              backend: str) -> None:
    t = await gdb_target("mps2-an385", "hello", backend, halt_on_detach=True)
    main = elf_symbol_value(t.elf, "main") & ~1
    out = await run_gdb(t, "break main", "continue", "print/x $pc", "detach")
    assert "Breakpoint 1, main () at src/hello.c" in out, out
    assert re.search(rf"^\$1 = 0x{main:x}$", out, re.M), out
    await wait_for_clients(t.gdbserver, 0)
    s = (await client.sessions.get_session(name=t.name)).session
    assert s.state == cpb.SESSION_STATE_HALTED
    assert await pc_of(client, t.name) == main
    assert not (await client.debug.list_breakpoints(name=t.name)).breakpoints


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_kill_never_resumes(gdb_target: Attach, client: AsyncClient, backend: str) -> None:
    t = await gdb_target("mps2-an385", "hello", backend)
    main = elf_symbol_value(t.elf, "main") & ~1
    out = await run_gdb(t, "break main", "continue", "kill")
    assert "[Inferior 1 (Remote target) killed]" in out, out
    await wait_for_clients(t.gdbserver, 0)
    s = (await client.sessions.get_session(name=t.name)).session
    assert s.state == cpb.SESSION_STATE_HALTED
    assert await pc_of(client, t.name) == main


async def test_the_api_and_msctl_take_halt_on_detach(server: RunningServer, client: AsyncClient) -> None:
    prog = await upload(client, "mps2-an385", "hello")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, power_on=True)).session
    started = (await client.debug.start_gdb_server(name=s.name, halt_on_detach=True)).gdb_server
    assert started.halt_on_detach and started.port > 0
    # the same bridge, asked again without it: its setting follows the latest request
    again = (await client.debug.start_gdb_server(name=s.name)).gdb_server
    assert again.port == started.port and not again.halt_on_detach
    await client.debug.stop_gdb_server(name=s.name)
    # msctl gets the flag from the proto
    env = dict(os.environ, MSCTL_TARGET=f"127.0.0.1:{server.port}")
    argv = [str(VENV_BIN / "msctl"), "--json", "debug", "start-gdb-server", s.name, "--halt-on-detach"]
    # off the loop: the server answering msctl runs on it
    r = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"halt_on_detach": true' in r.stdout, r.stdout
    await client.debug.stop_gdb_server(name=s.name)
