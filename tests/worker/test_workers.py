"""Emulation in worker processes: machines live outside the server's process, a dead worker
fails only its own sessions (with the reason), and nothing outlives a killed server."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from machineserver.server.config import ServerConfig
from machineserver.server.drivers.unicorn.machine import UnicornMachine
from machineserver.server.worker.remote import RemoteMachine
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import console_until, upload, wait_state
from tests.helpers.server import ServerProcess, serving


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, AsyncClient]]:
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", workers=2)
    async with serving(config) as pair:
        yield pair


def _machine(running: RunningServer, session: str) -> RemoteMachine:
    live = running.engine.sessions.get(session)
    assert isinstance(live.machine, RemoteMachine), type(live.machine)
    return live.machine


def _worker_of(running: RunningServer, session: str) -> int:
    link = _machine(running, session).link
    assert link is not None
    return link.pid


async def test_machines_run_in_worker_processes_spread_over_the_pool(
        two_workers: tuple[RunningServer, AsyncClient]) -> None:
    running, client = two_workers
    prog = await upload(client, "mps2-an385", "hello")
    names = [(await client.sessions.create_session(board_template="mps2-an385", program=prog,
                                                   power_on=True)).session.name for _ in range(4)]
    workers = [_worker_of(running, n) for n in names]
    assert os.getpid() not in workers
    assert sorted(workers.count(pid) for pid in set(workers)) == [2, 2]  # least loaded first
    assert set(workers) == set(running.engine.workers.pids())  # type: ignore[union-attr]
    for name in names:  # and they work as ever
        stop = (await client.debug.continue_(name=name, wait=True)).stop
        assert stop.reason == cpb.STOP_REASON_EXIT and stop.exit_code == 0
    caps = await client.capabilities.get_capabilities()
    unicorn = next(b for b in caps.backends if b.name == "unicorn")
    assert "worker processes" in unicorn.details["isolation"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
async def test_a_dead_worker_fails_only_its_own_sessions(two_workers: tuple[RunningServer, AsyncClient],
                                                         sig: signal.Signals) -> None:
    running, client = two_workers
    prog = await upload(client, "mps2-an385", "echo")
    victim = (await client.sessions.create_session(board_template="mps2-an385", program=prog, run=True)).session.name
    bystander = (await client.sessions.create_session(board_template="mps2-an385", program=prog,
                                                      run=True)).session.name
    await console_until(client, victim, b"echo ready\n")
    await console_until(client, bystander, b"echo ready\n")
    doomed, other = _worker_of(running, victim), _worker_of(running, bystander)
    assert doomed != other

    os.kill(doomed, sig)  # a native crash (SIGSEGV) or the OOM killer (SIGKILL)
    failed = await wait_state(client, victim, cpb.SESSION_STATE_FAILED)
    reason = failed.state_reason  # type: ignore[attr-defined]
    assert f"worker process {doomed}" in reason and sig.name in reason, reason
    with pytest.raises(errors.FailedPrecondition):
        await client.debug.read_registers(name=victim)

    # the other worker's session is served as before
    await client.sessions.write_console(name=bystander, data=b"still here\nq")
    done = await wait_state(client, bystander, cpb.SESSION_STATE_EXITED)
    assert done.exit_code == 0  # type: ignore[attr-defined]
    assert (await console_until(client, bystander, b"bye\n")).endswith(b"still here\nbye\n")

    # the failed session powers on again, in a live worker
    await client.sessions.power_on_session(name=victim)
    assert _worker_of(running, victim) != doomed
    await client.sessions.run_session(name=victim)
    await console_until(client, victim, b"echo ready\necho ready\n")
    assert not psutil.pid_exists(doomed) or psutil.Process(doomed).status() == psutil.STATUS_ZOMBIE


async def test_the_in_process_mode_still_runs_machines_here(tmp_path: Path) -> None:
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", workers=0)
    async with serving(config) as (running, client):
        prog = await upload(client, "mps2-an385", "hello")
        s = (await client.sessions.create_session(board_template="mps2-an385", program=prog,
                                                  power_on=True)).session
        assert isinstance(running.engine.sessions.get(s.name).machine, UnicornMachine)
        stop = (await client.debug.continue_(name=s.name, wait=True)).stop
        assert stop.reason == cpb.STOP_REASON_EXIT


def test_nothing_outlives_a_killed_server(tmp_path: Path) -> None:
    from machineserver.sdk import Client

    server = ServerProcess(tmp_path / "data").start()
    try:
        with Client.connect(server.target, timeout=20) as client:
            prog = client.upload_program(str(Path(__file__).resolve().parents[1] / "firmware" / "build"
                                             / "mps2-an385" / "echo.elf")).program.name
            for backend in ("unicorn", "qemu"):
                client.sessions.create_session(board_template="mps2-an385", program=prog, backend=backend, run=True)
        assert server.proc is not None
        family = psutil.Process(server.proc.pid).children(recursive=True)
        names = sorted({p.name() for p in family})
        assert any(n.startswith("qemu-system") for n in names), names  # QEMU under a worker
        assert len(family) >= 3  # the zygote, a worker, QEMU
    finally:
        server.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        assert time.monotonic() < deadline, [p for p in family if p.is_running()]
        time.sleep(0.05)


async def test_a_cancelled_call_is_cancelled_in_the_worker(two_workers: tuple[RunningServer, AsyncClient]) -> None:
    """The step's task in the worker is cancelled (not left running): the same worker
    answers the next call at once."""
    _, client = two_workers
    prog = await upload(client, "mps2-an385", "echo")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, power_on=True)).session
    with pytest.raises(errors.DeadlineExceeded):
        await client.debug.step(name=s.name, count=10**9, timeout=0.5)
    started = time.monotonic()
    regs = (await client.debug.read_registers(name=s.name, names=["pc"])).registers
    assert regs[0].value != 0 and time.monotonic() - started < 2
    assert (await client.sessions.get_session(name=s.name)).session.state == cpb.SESSION_STATE_HALTED
