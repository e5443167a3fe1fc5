"""R7 (fast form): sessions x clients reading their sessions in a loop for a while, on a
server process: zero errors, every session still answering, p50/p99 reported. The long
form (100 sessions x 10 clients for 60 s, next to a bare grpc.aio echo server as the
peer) is ``scripts/bench reliability``. Sizes: ``MS_RELIABILITY_LOAD_SESSIONS`` (10),
``..._LOAD_CLIENTS`` (4 per session), ``..._LOAD_SECONDS`` (5)."""

from __future__ import annotations

import contextlib

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import upload
from tests.helpers.server import ServerProcess
from tests.reliability.load import drive, make_sessions, session_callers
from tests.reliability.sizes import report, size

SESSIONS = size("load_sessions", 10)
CLIENTS = size("load_clients", 4)
SECONDS = size("load_seconds", 5)
CHANNELS = 4


async def test_sessions_times_clients_under_load_answer_without_error(server_process: ServerProcess) -> None:
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(await AsyncClient.connect(server_process.target, timeout=30))
                   for _ in range(CHANNELS)]
        program = await upload(clients[0], "lm3s6965evb", "hello")
        sessions = await make_sessions(clients[0], program, SESSIONS)
        result = await drive(session_callers(clients, sessions, CLIENTS), SECONDS)
        assert not result.errors, f"{len(result.errors)} errors, e.g. {result.errors[:3]}"
        assert result.calls >= SESSIONS * CLIENTS, f"only {result.calls} calls in {SECONDS} s"
        for name in sessions:
            s = (await clients[0].sessions.get_session(name=name)).session
            assert s.state == cpb.SESSION_STATE_HALTED, (name, cpb.SessionState.Name(s.state))
    report("R7 load", sessions=SESSIONS, clients_per_session=CLIENTS, seconds=SECONDS, calls=result.calls,
           errors=len(result.errors), p50_ms=round(result.pct(0.5), 3), p99_ms=round(result.pct(0.99), 3),
           calls_per_s=round(result.calls / result.seconds, 1))
