"""R4: clients that vanish mid-stream (a client process SIGKILLed while each of its
channels holds a stream open: StreamConsole following, StreamSessionMetrics,
StreamHostStatus, StreamSessionEvents, and Attach holding control of a session) leave
nothing behind in the server process: its open fds, threads and child processes come back
to what they were after a warm-up round of the same shape (measured in /proc/PID), and
control is free again: every round's controllers take control of the sessions the
previous round's held, and so does a last Attach at the end.
Clients: ``MS_RELIABILITY_DISCONNECT_CLIENTS`` (100; the long form 1,000), 50 a process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.api import console_until, upload
from tests.helpers.server import ServerProcess
from tests.reliability.sizes import report, size

CLIENTS = size("disconnect_clients", 100)
PER_PROCESS = 50
SESSIONS = 4

# One vanishing client process: argv target, sessions (comma-separated), how many
# clients, whether the first per session takes control. Each client is a channel of its
# own (its own connection) holding one stream open past its first message; "ready" once
# all are, then it waits to be killed. Attach controllers print their role.
VANISHER = r'''
import asyncio, sys
from grpc import aio
from google.protobuf import duration_pb2
from machineserver.v1 import debug_pb2 as d, session_pb2 as s, telemetry_pb2 as t
from machineserver.v1 import debug_pb2_grpc, session_pb2_grpc, telemetry_pb2_grpc

async def main(target, sessions, count):
    opts = [("grpc.use_local_subchannel_pool", 1)]
    roles, calls, channels = [], [], []
    every = duration_pb2.Duration(nanos=50_000_000)
    async def one(i):
        ch = aio.insecure_channel(target, options=opts)
        channels.append(ch)
        name = sessions[i % len(sessions)]
        kind = i % 5 if i >= len(sessions) else 4
        if kind == 0:
            call = session_pb2_grpc.SessionServiceStub(ch).StreamConsole(s.StreamConsoleRequest(name=name, follow=True))
        elif kind == 1:
            call = telemetry_pb2_grpc.TelemetryServiceStub(ch).StreamSessionMetrics(
                t.StreamSessionMetricsRequest(name=name, interval=every))
        elif kind == 2:
            call = telemetry_pb2_grpc.TelemetryServiceStub(ch).StreamHostStatus(t.StreamHostStatusRequest(interval=every))
        elif kind == 3:
            call = session_pb2_grpc.SessionServiceStub(ch).StreamSessionEvents(s.StreamSessionEventsRequest(name=name))
        else:  # the first client per session takes control; it never sends more
            queue = asyncio.Queue()
            async def requests():
                yield d.AttachRequest(open=d.AttachOpen(name=name, control=i < len(sessions)))
                await queue.get()
            call = debug_pb2_grpc.DebugServiceStub(ch).Attach(requests())
        first = await call.read()
        calls.append(call)
        if kind == 4 and i < len(sessions):
            roles.append(d.AttachRole.Name(first.opened.role))
    await asyncio.gather(*(one(i) for i in range(count)))
    print("ready " + ",".join(roles), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])))
'''


def footprint(pid: int) -> tuple[int, int, int]:
    """(open fds, threads, child processes) of the server process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    children = len(psutil.Process(pid).children(recursive=True))
    return fds, threads, children


def vanish(target: str, sessions: list[str], count: int) -> list[str]:
    """Run one vanishing client process until all its streams are open, then SIGKILL it;
    the roles its controllers got."""
    proc = subprocess.Popen([sys.executable, "-c", VANISHER, target, ",".join(sessions), str(count)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), f"the client did not get its streams open: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"  # type: ignore[union-attr]
        return [r for r in line.split()[1].split(",") if r] if len(line.split()) > 1 else []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


async def settle(pid: int, limit: tuple[int, int, int], timeout: float = 20) -> tuple[int, int, int]:
    """The footprint once it is within ``limit`` (the server cleans up as it notices each
    connection gone), or as it is after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        now = footprint(pid)
        if all(n <= m for n, m in zip(now, limit, strict=True)) or loop.time() > deadline:
            return now
        await asyncio.sleep(0.2)


async def vanish_round(server: ServerProcess, client: AsyncClient, sessions: list[str], late: list[float]) -> None:
    """One vanishing client process; then until the server has seen its connections go
    (its fds back near where they were). Its controllers must have found control free (the
    previous round's holders vanished); one that opened as an observer is waited for: a
    fresh Attach must get control within 30 s (how long it took goes in ``late``)."""
    before = footprint(server.pid)
    roles = await asyncio.to_thread(vanish, server.target, sessions, PER_PROCESS)
    assert len(roles) == SESSIONS, roles
    for name, role in zip(sessions, roles, strict=True):
        if role != "ATTACH_ROLE_CONTROLLER":
            late.append(await control_freed_after(client, name))
    await settle(server.pid, (before[0] + 2, 10**6, 10**6))


async def control_freed_after(client: AsyncClient, session: str, timeout: float = 30) -> float:
    """Seconds until a fresh Attach gets control of ``session`` (0 when the first one
    does); fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    if await take_control(client, session) == dpb.ATTACH_ROLE_CONTROLLER:
        return 0.0
    while await take_control(client, session) != dpb.ATTACH_ROLE_CONTROLLER:
        assert loop.time() - start < timeout, f"{session}: control still held {timeout} s after its holder vanished"
        await asyncio.sleep(0.1)
    return loop.time() - start


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    sp = ServerProcess(tmp_path / "data").start()
    try:
        yield sp
    finally:
        sp.stop()


async def take_control(client: AsyncClient, session: str) -> int:
    """A fresh Attach asking for control; the role it got."""
    requests: asyncio.Queue[dpb.AttachRequest | None] = asyncio.Queue()
    await requests.put(dpb.AttachRequest(open=dpb.AttachOpen(name=session, control=True)))

    async def feed():  # type: ignore[no-untyped-def]
        while (r := await requests.get()) is not None:
            yield r

    stream = client.debug.attach(feed())
    first = await asyncio.wait_for(anext(stream), 20)  # type: ignore[call-overload]
    await requests.put(None)
    async for _ in stream:  # type: ignore[attr-defined]
        pass
    return int(first.opened.role)


async def test_vanishing_clients_leave_nothing_behind_and_free_control(server: ServerProcess) -> None:
    async with await AsyncClient.connect(server.target, timeout=30) as client:
        echo = await upload(client, "lm3s6965evb", "echo")
        sessions = [(await client.sessions.create_session(board_template="lm3s6965evb", program=echo, run=True,
                                                          session_id=f"v{k}")).session.name for k in range(SESSIONS)]
        for name in sessions:
            await console_until(client, name, b"echo ready\n")
        # warm-up: the same shape once, so lazily made pools and caches are in the baseline
        late: list[float] = []
        for _ in range(2):
            await vanish_round(server, client, sessions, late)
        baseline = await settle(server.pid, (0, 0, 0), timeout=3)
        rounds = max(1, CLIENTS // PER_PROCESS)
        for _ in range(rounds):
            await vanish_round(server, client, sessions, late)
        # slack: a few fds/threads come and go with the server's own work (telemetry, console files)
        limit = (baseline[0] + 8, baseline[1] + 3, baseline[2])
        after = await settle(server.pid, limit)
        for name in sessions:
            freed = await control_freed_after(client, name)
            if freed > 0:
                late.append(freed)
            state = (await client.sessions.get_session(name=name)).session.state
            assert state == cpb.SESSION_STATE_RUNNING, cpb.SessionState.Name(state)
    report("R4 disconnects", clients=rounds * PER_PROCESS, sessions=SESSIONS,
           fds_baseline=baseline[0], fds_after=after[0], threads_baseline=baseline[1], threads_after=after[1],
           children_baseline=baseline[2], children_after=after[2],
           leaked_fds=max(0, after[0] - baseline[0]), leaked_threads=max(0, after[1] - baseline[1]),
           leaked_processes=max(0, after[2] - baseline[2]),
           controls_freed_late=len(late), slowest_control_release_s=round(max(late, default=0.0), 3))
    assert all(n <= m for n, m in zip(after, limit, strict=True)), \
        f"the server kept what vanished clients left: (fds, threads, children) {after}, baseline {baseline}"
