"""Failed creates leave nothing behind (issue 14: "CreateSession leaves a session behind
when power-on fails"), through a real server:

- CreateSession whose power-on fails (a gdbremote target nobody listens on), and one
  whose caller goes away while power-on hangs (a target that accepts and never answers):
  no session listed, no record in the store (not after a restart either), no console
  file, the id free again;
- UploadProgram that fails (too large, bad checksum, not an image): no blob, no
  half-written file;
- CreateSnapshot over the server's snapshot limit, or whose caller goes away while its
  blob is written: no record, no blob;
- CreateCoSimulation whose second member cannot power on: the member it powered on is
  off again, no co-simulation, the members free to join another.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from machineserver.server.config import ServerConfig
from machineserver.server.core.engine import Limits
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import cosim_pb2
from machineserver.v1 import session_pb2 as spb
from tests.helpers.api import until, upload
from tests.helpers.firmware import firmware
from tests.helpers.server import serving


def closed_port() -> int:
    """A local TCP port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_target() -> Iterator[int]:
    """A local TCP port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def assert_no_session_left(running: RunningServer, session_id: str) -> None:
    engine = running.engine
    assert engine.sessions.find(session_id) is None
    assert engine.db.get("sessions", session_id) is None
    assert [p.name for p in files_under(engine.data_dir / "console") if session_id in p.name] == []


async def test_create_session_whose_power_on_fails_leaves_nothing(server: RunningServer,
                                                                  client: AsyncClient) -> None:
    options = spb.SessionOptions(remote=spb.RemoteTarget(address=f"127.0.0.1:{closed_port()}"))
    for run in (False, True):
        with pytest.raises(errors.MachineServerError) as exc:
            await client.sessions.create_session(board_template="mps2-an385", backend="gdbremote",
                                                 options=options, power_on=True, run=run, session_id="doomed")
        assert not isinstance(exc.value, errors.Internal)
        assert not (await client.sessions.list_sessions()).sessions
        assert_no_session_left(server, "doomed")
    # the id is free again, and the same session without power-on is created
    made = (await client.sessions.create_session(board_template="mps2-an385", backend="gdbremote",
                                                 options=options, session_id="doomed")).session
    assert made.name == "sessions/doomed" and made.state == cpb.SESSION_STATE_OFF


async def test_create_session_whose_caller_goes_away_during_power_on_leaves_nothing(
        server: RunningServer, client: AsyncClient, silent_target: int) -> None:
    options = spb.SessionOptions(remote=spb.RemoteTarget(address=f"127.0.0.1:{silent_target}"))
    with pytest.raises(errors.DeadlineExceeded):
        await client.sessions.create_session(board_template="mps2-an385", backend="gdbremote", options=options,
                                             power_on=True, session_id="gone", timeout=1.0)
    await until(lambda: server.engine.sessions.find("gone") is None, timeout=30,
                what="the session of the abandoned create removed")
    assert_no_session_left(server, "gone")
    assert not (await client.sessions.list_sessions()).sessions


async def test_failed_create_is_not_back_after_a_restart(tmp_path: Path) -> None:
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning")
    options = spb.SessionOptions(remote=spb.RemoteTarget(address=f"127.0.0.1:{closed_port()}"))
    async with serving(cfg) as (_, client):
        with pytest.raises(errors.MachineServerError):
            await client.sessions.create_session(board_template="mps2-an385", backend="gdbremote",
                                                 options=options, power_on=True)
    async with serving(cfg) as (running, client):
        assert not (await client.sessions.list_sessions()).sessions
        assert running.engine.db.rows("sessions") == []
        assert files_under(tmp_path / "data" / "console") == []


async def _stream(*parts: spb.UploadProgramRequest) -> AsyncIterator[spb.UploadProgramRequest]:
    for part in parts:
        yield part


async def test_failed_uploads_and_snapshots_leave_no_blobs(tmp_path: Path) -> None:
    image = firmware("mps2-an385", "hello", "elf").read_bytes()
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning",
                       limits=Limits(max_program_bytes=len(image) + 16, max_snapshot_bytes=1024))
    blobs = tmp_path / "data" / "blobs"
    async with serving(cfg) as (running, client):
        with pytest.raises(errors.ResourceExhausted):
            await client.upload_program(image + b"\0" * 64)
        with pytest.raises(errors.InvalidArgument):  # a checksum that does not match
            await client.sessions.upload_program(_stream(
                spb.UploadProgramRequest(metadata=spb.ProgramMetadata(sha256="0" * 64)),
                spb.UploadProgramRequest(chunk=image)))
        with pytest.raises(errors.InvalidArgument):  # not an ELF or HEX, no format given
            await client.upload_program(b"\x13\x37" * 100)
        with pytest.raises(errors.InvalidArgument):  # an ELF cut short
            await client.upload_program(image[:200])
        assert files_under(blobs) == []
        assert not (await client.sessions.list_programs()).programs

        prog = await upload(client, "mps2-an385", "hello")
        kept = files_under(blobs)
        s = (await client.sessions.create_session(board_template="mps2-an385", program=prog,
                                                  power_on=True)).session
        with pytest.raises(errors.ResourceExhausted):  # over limits.max_snapshot_bytes
            await client.sessions.create_snapshot(name=s.name)
        assert not (await client.sessions.list_snapshots()).snapshots
        assert files_under(blobs) == kept
        assert running.engine.db.rows("snapshots") == []


async def test_failed_cosim_create_powers_off_what_it_powered_on(client: AsyncClient) -> None:
    kept = await upload(client, "mps2-an385", "crc32")
    prog = await upload(client, "mps2-an385", "hello")
    first = (await client.sessions.create_session(board_template="mps2-an385", program=kept)).session
    second = (await client.sessions.create_session(board_template="mps2-an385", program=prog)).session
    # the second's program goes away: the first member powers on, the second cannot
    await client.sessions.delete_program(name=prog, force=True)
    sync = cosim_pb2.SyncPolicy(quantum_ns=100_000)
    with pytest.raises(errors.MachineServerError) as exc:
        await client.cosim.create_co_simulation(sessions=[first.name, second.name], sync=sync)
    assert not isinstance(exc.value, errors.Internal)
    assert not (await client.cosim.list_co_simulations()).cosimulations
    for s in (first, second):
        assert (await client.sessions.get_session(name=s.name)).session.state == cpb.SESSION_STATE_OFF
    # both are free: with a program again they join a co-simulation
    prog2 = await upload(client, "mps2-an385", "hello")
    for s in (first, second):
        await client.sessions.load_program(name=s.name, program=prog2)
    made = await client.cosim.create_co_simulation(sessions=[first.name, second.name], sync=sync)
    assert made.cosimulation.name


async def test_create_snapshot_whose_caller_goes_away_while_the_blob_is_written_leaves_no_blob(
        server: RunningServer, client: AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    prog = await upload(client, "mps2-an385", "hello")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, power_on=True)).session
    blobs_dir = server.engine.data_dir / "blobs"
    kept = files_under(blobs_dir)
    store = server.engine.blobs
    real_put = store.put
    entered, written = threading.Event(), threading.Event()

    def slow_put(data: bytes) -> str:  # the write outlasts the caller's deadline
        entered.set()
        time.sleep(1.5)
        digest = real_put(data)
        written.set()
        return digest

    monkeypatch.setattr(store, "put", slow_put)
    with pytest.raises(errors.DeadlineExceeded):
        await client.sessions.create_snapshot(name=s.name, timeout=0.5)
    assert entered.is_set()
    await until(written.is_set, timeout=30, what="the snapshot's blob written")
    await until(lambda: files_under(blobs_dir) == kept and not any(
        p.name.startswith(".incoming-") for p in blobs_dir.iterdir()), timeout=30,
        what="the abandoned snapshot's blob removed")
    assert not (await client.sessions.list_snapshots()).snapshots
    # and a snapshot with a caller that waits is stored as before
    monkeypatch.setattr(store, "put", real_put)
    snap = (await client.sessions.create_snapshot(name=s.name)).snapshot
    assert len(files_under(blobs_dir)) == len(kept) + 1 and snap.size_bytes > 0


async def test_cosim_snapshot_whose_caller_goes_away_leaves_no_blob(
        server: RunningServer, client: AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    prog = await upload(client, "mps2-an385", "hello")
    members = [(await client.sessions.create_session(board_template="mps2-an385", program=prog)).session.name
               for _ in range(2)]
    cosim = (await client.cosim.create_co_simulation(
        sessions=members, sync=cosim_pb2.SyncPolicy(quantum_ns=100_000))).cosimulation
    blobs_dir = server.engine.data_dir / "blobs"
    kept = files_under(blobs_dir)
    store = server.engine.blobs
    real_put = store.put
    written = threading.Event()

    def slow_put(data: bytes) -> str:
        time.sleep(1.5)
        digest = real_put(data)
        written.set()
        return digest

    monkeypatch.setattr(store, "put", slow_put)
    with pytest.raises(errors.DeadlineExceeded):
        await client.cosim.create_co_sim_snapshot(parent=cosim.name, timeout=0.5)
    await until(written.is_set, timeout=30, what="the co-simulation snapshot's blob written")
    await until(lambda: files_under(blobs_dir) == kept, timeout=30, what="the abandoned blob removed")
    assert not (await client.cosim.list_co_sim_snapshots(parent=cosim.name)).snapshots
