"""R2: a server process SIGKILLed under write load and restarted, round after round, loses
no acknowledged write: every session, program and snapshot whose create was answered is
there after the restart (programs with the bytes we sent), every acknowledged delete stays
deleted, SQLite's ``PRAGMA integrity_check`` says ok, and every blob matches its hash.
Rounds: ``MS_RELIABILITY_DURABILITY_ROUNDS`` (5; the long form 50)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import signal
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from machineserver.sdk import AsyncClient, errors
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.reliability.sizes import report, size

ROUNDS = size("durability_rounds", 5)
WRITERS = 3  # of each kind


@dataclass
class Acknowledged:
    """Every write the server answered OK, across all rounds."""

    sessions: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    programs: dict[str, str] = field(default_factory=dict)  # name -> sha256 of what we sent
    snapshots: set[str] = field(default_factory=set)
    writes: int = 0


async def write_load(client: AsyncClient, acked: Acknowledged, round_no: int, snap_source: str) -> None:
    """Writers of every kind, each looping until the server goes away."""
    base = firmware("lm3s6965evb", "hello").read_bytes()

    async def sessions(w: int) -> None:
        for k in range(10**6):
            sid = f"d{round_no}-{w}-{k}"
            await client.sessions.create_session(board_template="lm3s6965evb", session_id=sid,
                                                 labels={"round": str(round_no)})
            acked.sessions.add(f"sessions/{sid}")
            acked.writes += 1
            if k % 3 == 2:  # delete one of ours now and then: it must stay deleted
                # while the delete is in flight the session may be there or not (a kill can
                # land after the delete committed and before its answer): neither is a loss
                acked.sessions.discard(f"sessions/{sid}")
                await client.sessions.delete_session(name=f"sessions/{sid}")
                acked.deleted.add(f"sessions/{sid}")
                acked.writes += 1

    async def programs(w: int) -> None:
        for k in range(10**6):
            data = base + f"round {round_no} writer {w} upload {k} {random.random()}".encode()
            name = (await client.upload_program(data)).program.name
            acked.programs[name] = hashlib.sha256(data).hexdigest()
            acked.writes += 1

    async def snapshots(w: int) -> None:
        for k in range(10**6):
            snap = (await client.sessions.create_snapshot(name=snap_source, display_name=f"{round_no}-{w}-{k}")).snapshot
            acked.snapshots.add(snap.name)
            acked.writes += 1

    writers = [f(w) for w in range(WRITERS) for f in (sessions, programs, snapshots)]
    results = await asyncio.gather(*writers, return_exceptions=True)
    for result in results:  # they end when the server is killed, and only so
        assert isinstance(result, errors.MachineServerError | asyncio.CancelledError), repr(result)


async def verify(client: AsyncClient, acked: Acknowledged, data: Path) -> None:
    listed = set()
    token = ""
    while True:
        page = await client.sessions.list_sessions(page_size=1000, page_token=token)
        listed |= {s.name for s in page.sessions}
        token = page.next_page_token
        if not token:
            break
    lost = acked.sessions - listed
    assert not lost, f"acknowledged sessions lost: {sorted(lost)[:10]} ({len(lost)})"
    back = acked.deleted & listed
    assert not back, f"acknowledged deletes came back: {sorted(back)[:10]}"
    for name, digest in acked.programs.items():
        program = (await client.sessions.get_program(name=name)).program
        assert program.sha256 == digest, f"{name}: sha256 {program.sha256}, we sent {digest}"
        assert blob_path(data, digest).is_file(), f"{name}: its blob is gone"
    for name in acked.snapshots:
        snap = (await client.sessions.get_snapshot(name=name)).snapshot
        assert blob_path(data, snap.sha256).is_file(), f"{name}: its blob {snap.sha256} is gone"


def blob_path(data: Path, digest: str) -> Path:
    return data / "blobs" / "sha256" / digest[:2] / digest


def check_store(data: Path) -> int:
    """integrity_check ok, every blob's bytes hash to its name; how many blobs."""
    with contextlib.closing(sqlite3.connect(data / "machineserver.sqlite3")) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    blobs = [p for p in (data / "blobs" / "sha256").rglob("*") if p.is_file()]
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"blob {blob} does not match its name"
    return len(blobs)


async def test_sigkill_under_write_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    acked = Acknowledged()
    rng = random.Random()
    blobs = 0
    for round_no in range(ROUNDS):
        sp = ServerProcess(data, "--max-sessions", "100000").start()
        try:
            async with await AsyncClient.connect(sp.target, timeout=30) as client:
                await verify(client, acked, data)
                hello = (await client.upload_program(firmware("lm3s6965evb", "hello"))).program.name
                source = (await client.sessions.create_session(
                    board_template="lm3s6965evb", program=hello, power_on=True, session_id=f"src{round_no}")).session
                acked.sessions.add(source.name)
                load = asyncio.ensure_future(write_load(client, acked, round_no, source.name))
                before = acked.writes
                await asyncio.sleep(rng.uniform(0.3, 1.2))
                assert acked.writes > before, "no write was acknowledged before the kill"
                sp.stop(signal.SIGKILL)
                await asyncio.wait_for(load, 30)
        finally:
            if sp.proc is not None and sp.proc.poll() is None:
                sp.stop(signal.SIGKILL)
        blobs = check_store(data)
    sp = ServerProcess(data, "--max-sessions", "100000").start()
    try:
        async with await AsyncClient.connect(sp.target, timeout=30) as client:
            await verify(client, acked, data)
    finally:
        sp.stop()
    blobs = check_store(data)
    report("R2 durability", rounds=ROUNDS, acknowledged_writes=acked.writes, sessions=len(acked.sessions),
           deleted=len(acked.deleted), programs=len(acked.programs), snapshots=len(acked.snapshots), blobs=blobs,
           lost=0)
