"""Fixtures for the GDB bridge tests: an in-process server (tests/conftest.py's `server`),
a session made through the SDK, and a GdbServer started on it from the engine objects on
a free port; the real `gdb-multiarch` runs as a child process (tests/helpers/gdb.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.app import RunningServer
from machineserver.server.core.gdbserver import GdbServer
from tests.helpers.backends import require_backend
from tests.helpers.firmware import firmware
from tests.helpers.gdb import Attach, Target
from tests.helpers.gdb import gdb_multiarch as _gdb_multiarch


@pytest.fixture
def gdb_multiarch() -> Path:
    """For tests that run gdb-multiarch: skipped without it (failed under scripts/test)."""
    return _gdb_multiarch()


@pytest.fixture
async def gdb_target(server: RunningServer, client: AsyncClient) -> AsyncIterator[Attach]:
    """attach(board, program, backend, halt_on_detach=False) -> Target: a powered-on,
    halted session with a GdbServer listening on 127.0.0.1:<free port> (with
    halt_on_detach: a detach leaves the session halted; by default it resumes)."""
    started: list[GdbServer] = []

    async def attach(board: str, program: str, backend: str, halt_on_detach: bool = False) -> Target:
        require_backend(backend, board)
        elf = firmware(board, program)
        prog = (await client.upload_program(elf)).program.name
        s = (await client.sessions.create_session(
            board_template=board, program=prog, power_on=True, backend=backend)).session
        live = server.engine.sessions.get(s.name)
        gs = GdbServer(server.engine.sessions, server.engine.debugger, live, halt_on_detach=halt_on_detach)
        started.append(gs)
        host, port = await gs.start("127.0.0.1", 0)
        assert host == "127.0.0.1" and port > 0
        return Target(s.name, live, gs, port, elf)

    try:
        yield attach
    finally:
        for gs in started:
            await gs.stop()
