"""R3: a QEMU child SIGKILLed while its firmware runs, under a server process: that session
goes to FAILED with the reason; the other sessions (QEMU and Unicorn) keep running and
answering; the process table holds no zombie of the server's, and no QEMU is left once
the sessions are deleted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import console_text, console_until, until, upload, wait_state
from tests.helpers.backends import require_backend
from tests.helpers.server import ServerProcess
from tests.reliability.sizes import report

QEMU_SESSIONS = 3


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    require_backend("qemu")
    monkeypatch.setenv("MS_QEMU_SPARES", "0")  # every QEMU belongs to a session: none started ahead
    sp = ServerProcess(tmp_path / "data").start()
    try:
        yield sp
    finally:
        sp.stop()


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def qemus(pid: int) -> dict[int, psutil.Process]:
    out = {}
    for p in descendants(pid):
        try:
            if p.name().startswith("qemu-system") and p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    return out


def zombies(pid: int) -> list[tuple[int, str]]:
    """Zombies anywhere under the server process, from the process table."""
    found = []
    for p in descendants(pid):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                found.append((p.pid, p.name()))
        except psutil.NoSuchProcess:
            continue
    return found


async def test_a_killed_qemu_fails_its_session_only_and_leaves_no_zombie(server: ServerProcess) -> None:
    async with await AsyncClient.connect(server.target, timeout=30) as client:
        echo_qemu = await upload(client, "lm3s6965evb", "echo")
        owners: dict[int, str] = {}
        for k in range(QEMU_SESSIONS):
            before = set(qemus(server.pid))
            name = (await client.sessions.create_session(board_template="lm3s6965evb", program=echo_qemu,
                                                         backend="qemu", session_id=f"q{k}", run=True)).session.name
            new = set(qemus(server.pid)) - before
            assert len(new) == 1, f"{name}: expected one new QEMU, found {new}"
            owners[new.pop()] = name
        unicorn = (await client.sessions.create_session(board_template="lm3s6965evb", program=echo_qemu,
                                                        backend="unicorn", session_id="u0", run=True)).session.name
        for name in [*owners.values(), unicorn]:
            await console_until(client, name, b"echo ready\n")
        victim_pid, victim = next(iter(owners.items()))
        qemus(server.pid)[victim_pid].kill()

        failed = await wait_state(client, victim, cpb.SESSION_STATE_FAILED, timeout=20)
        assert "QEMU" in failed.state_reason and "SIGKILL" in failed.state_reason, failed.state_reason
        with pytest.raises(errors.FailedPrecondition):
            await client.debug.read_registers(name=victim)
        await until(lambda: victim_pid not in {p.pid for p in descendants(server.pid)}, 10,
                    what=f"the killed QEMU {victim_pid} reaped")
        assert not zombies(server.pid), f"zombies under the server: {zombies(server.pid)}"

        # the others run on: state, console round trip, debug reads
        for name in [n for n in owners.values() if n != victim] + [unicorn]:
            state = (await client.sessions.get_session(name=name)).session.state
            assert state == cpb.SESSION_STATE_RUNNING, (name, cpb.SessionState.Name(state))
            offset = len(await console_text(client, name))
            await client.sessions.write_console(name=name, data=b"still here\n")
            await console_until(client, name, b"still here\n")
            assert offset < len(await console_text(client, name))

        for name in [*owners.values(), unicorn]:
            await client.sessions.delete_session(name=name)
        await until(lambda: not qemus(server.pid), 10, what="every QEMU gone after the deletes")
        await asyncio.sleep(0.2)
        left = zombies(server.pid)
    assert not left, f"zombies under the server: {left}"
    code = server.stop()
    assert code == 0, server.read_log()[-2000:]
    assert not [p for p in psutil.process_iter(["pid", "ppid"]) if p.info["ppid"] == server.pid], \
        "processes of the server outlived it"
    report("R3 backend death", qemu_sessions=QEMU_SESSIONS, killed=1, failed_reason=failed.state_reason,
           zombies=0)
