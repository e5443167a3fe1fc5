"""The real gdb-multiarch on a session's GDB bridge (started through the API): its
connection, its memory and register writes are in the audit log with the address and
length; its reads are not."""

from __future__ import annotations

import asyncio
import subprocess

from machineserver.sdk import AsyncClient
from machineserver.v1 import audit_pb2 as apb
from tests.helpers.api import upload
from tests.helpers.firmware import firmware
from tests.helpers.gdb import gdb_multiarch

D = "/machineserver.v1.DebugService/"


async def test_gdb_connection_and_writes_are_audited(client: AsyncClient) -> None:
    gdb = gdb_multiarch()
    prog = await upload(client, "lm3s6965evb", "hello")
    name = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session.name
    # halt_on_detach: the firmware does not run after the detach (it would overwrite the memory checked below)
    bridge = (await client.debug.start_gdb_server(name=name, halt_on_detach=True,
                                                  metadata=[("x-request-id", "audit-bridge")])).gdb_server
    elf = firmware("lm3s6965evb", "hello")
    out = await asyncio.to_thread(subprocess.run, [
        str(gdb), "-q", "-batch", "-nx", "-ex", "set confirm off", "-ex", f"target remote 127.0.0.1:{bridge.port}",
        "-ex", "set {int}0x20000000 = 5", "-ex", "set $r0 = 7", "-ex", "print/x {int}0x20000000",
        "-ex", "print $r0", "-ex", "detach", str(elf)],
        cwd=elf.parents[3], capture_output=True, text=True, timeout=60)
    assert "$1 = 0x5" in out.stdout and "$2 = 7" in out.stdout, out.stdout + out.stderr
    assert (await client.debug.read_memory(name=name, address=0x20000000, size=4)).data == (5).to_bytes(4, "little")
    await client.debug.stop_gdb_server(name=name)

    everything = (await client.audit.list_audit_events(page_size=1000)).events
    started = [e for e in everything if e.method == D + "StartGdbServer"]
    assert [(e.request_id, e.resource, e.transport) for e in started] == [("audit-bridge", name, apb.AUDIT_TRANSPORT_RPC)]
    via_gdb = [e for e in everything if e.transport == apb.AUDIT_TRANSPORT_GDB]
    methods = [e.method for e in via_gdb]
    assert methods[0] == "gdb/connect" and methods[-1] == "gdb/disconnect", methods
    assert not {D + "ReadMemory", D + "ReadRegisters"} & set(methods)  # reads are not audited
    assert len({e.request_id for e in via_gdb}) == len(via_gdb)  # each packet its own request id
    connect = via_gdb[0]
    assert connect.resource == name and connect.code == "OK" and connect.peer.startswith("127.0.0.1:")
    assert all(e.principal == "anonymous" and e.tenant == "default" and e.peer == connect.peer for e in via_gdb)
    # the memory write: gdb sends 4 bytes at 0x20000000 (M or X; an X probe of 0 bytes may come first)
    memory = [e for e in via_gdb if e.method == D + "WriteMemory" and e.length > 0]
    assert [(e.address, e.length, e.resource, e.code) for e in memory] == [(0x20000000, 4, name, "OK")]
    # the register write: P0 (r0 is register 0 in the target description), 4 bytes
    registers = [e for e in via_gdb if e.method == D + "WriteRegister"]
    assert [(e.address, e.length, e.resource, e.code) for e in registers] == [(0, 4, f"{name}/registers/r0", "OK")]
    # and nothing else wrote: only connection events, the stop query's halt and these writes
    assert set(methods) <= {"gdb/connect", "gdb/disconnect", D + "Halt", D + "WriteMemory", D + "WriteRegister"}
