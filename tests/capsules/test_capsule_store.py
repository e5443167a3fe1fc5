"""Capsules as records: they survive a server killed and restarted (and still open there),
and they are pruned past the configured count (per tenant) and age."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from pathlib import Path

from machineserver.sdk import Client
from machineserver.server.config import ServerConfig
from machineserver.server.core.engine import Limits
from machineserver.v1 import capsule_pb2 as pb
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import session_pb2 as spb
from tests.helpers.api import upload
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess, serving

BOARD = "mps2-an385"


def test_a_capsule_survives_a_killed_server_and_opens_after(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    sp = ServerProcess(data_dir).start()
    try:
        with Client.connect(sp.target, timeout=30) as c:
            prog = _upload_sync(c, firmware(BOARD, "hello"))
            s = c.sessions.create_session(board_template=BOARD, program=prog, power_on=True).session
            c.debug.step(name=s.name, count=300)
            regs = {r.name: r.value for r in c.debug.read_registers(name=s.name).registers}
            cap = c.capsules.create_capsule(name=s.name, reason="before the kill").capsule
            exported = b"".join(m.chunk for m in c.capsules.export_capsule(name=cap.name))
    finally:
        sp.stop(signal.SIGKILL)
    sp = ServerProcess(data_dir).start()
    try:
        with Client.connect(sp.target, timeout=30) as c:
            got = c.capsules.get_capsule(name=cap.name).capsule
            assert got == cap
            assert [x.name for x in c.capsules.list_capsules().capsules] == [cap.name]
            assert b"".join(m.chunk for m in c.capsules.export_capsule(name=cap.name)) == exported
            opened = c.capsules.open_capsule(name=cap.name).session
            assert opened.state == cpb.SESSION_STATE_HALTED
            assert {r.name: r.value for r in c.debug.read_registers(name=opened.name).registers} == regs
    finally:
        sp.stop()


def _upload_sync(c: Client, path: Path) -> str:
    data = path.read_bytes()
    reqs = [spb.UploadProgramRequest(metadata=spb.ProgramMetadata(display_name=path.name))]
    reqs += [spb.UploadProgramRequest(chunk=data[i:i + 65536]) for i in range(0, len(data), 65536)]
    return str(c.sessions.upload_program(reqs).program.name)


async def test_pruned_past_the_count_and_the_age(server_config: ServerConfig) -> None:
    config = dataclasses.replace(server_config, limits=Limits(capsule_max_count=2, capsule_max_age_s=1.0))
    async with serving(config) as (_, client):
        prog = await upload(client, BOARD, "hello")
        s = (await client.sessions.create_session(board_template=BOARD, program=prog, power_on=True)).session
        made = [(await client.capsules.create_capsule(name=s.name, reason=f"#{i}")).capsule for i in range(3)]
        listed = (await client.capsules.list_capsules()).capsules
        assert [c.reason for c in listed] == ["#2", "#1"]  # newest first; the oldest went past the count
        assert listed[0].trigger == pb.CAPSULE_TRIGGER_EXPLICIT
        first_made = time.time()
        await asyncio.sleep(1.2)  # past capsule_max_age_s since #1 and #2 were made
        assert time.time() - first_made > 1.0
        fresh = (await client.capsules.create_capsule(name=s.name, reason="fresh")).capsule
        assert [c.name for c in (await client.capsules.list_capsules()).capsules] == [fresh.name]
        assert made[2].name != fresh.name
