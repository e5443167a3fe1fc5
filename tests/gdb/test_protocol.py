"""The GDB bridge's remote serial protocol with a raw socket client: framing, checksums,
acks and their absence (QStartNoAckMode), retransmission, ^C while running, the target
description, bad and unknown packets, and breakpoints showing up in the Debugger."""

from __future__ import annotations

import asyncio

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.core import gdbserver
from machineserver.server.core.gdbserver import (
    PacketReader,
    escape_binary,
    frame,
    unescape_binary,
)
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.api import wait_progress, wait_state
from tests.helpers.gdb import Attach, wait_for_clients


class RawRsp:
    """A minimal RSP client that checks every byte the server sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ack = True

    @classmethod
    async def connect(cls, port: int) -> RawRsp:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def read_byte(self) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(1), 10)

    async def read_packet(self, *, send_ack: bool | None = None) -> bytes:
        """The next packet (checksum verified); acks it in ack mode."""
        b = await self.read_byte()
        while b != b"$":
            assert b not in (b"+", b"-"), f"unexpected ack {b!r}"
            b = await self.read_byte()
        body = await asyncio.wait_for(self.reader.readuntil(b"#"), 10)
        cs = await asyncio.wait_for(self.reader.readexactly(2), 10)
        body = body[:-1]
        assert int(cs, 16) == sum(body) & 0xFF, f"bad checksum on {body!r}"
        if self.ack if send_ack is None else send_ack:
            self.writer.write(b"+")
        return body

    async def request(self, data: bytes) -> bytes:
        self.writer.write(frame(data))
        if self.ack:
            assert await self.read_byte() == b"+"
        return await self.read_packet()

    async def monitor(self, command: str) -> tuple[bytes, str]:
        """qRcmd: (final reply, the text of the O packets before it)."""
        self.writer.write(frame(b"qRcmd," + command.encode().hex().encode()))
        if self.ack:
            assert await self.read_byte() == b"+"
        text = b""
        while (reply := await self.read_packet()).startswith(b"O") and reply != b"OK":
            text += bytes.fromhex(reply[1:].decode())
        return reply, text.decode()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def test_framing_helpers() -> None:
    data = bytes(range(256))
    esc = escape_binary(data)
    assert b"$" not in esc and b"#" not in esc and b"*" not in esc
    assert unescape_binary(esc) == data
    assert frame(b"OK") == b"$OK#9a"
    pr = PacketReader()
    assert pr.feed(b"+$O") == [("ack", b"+")]
    assert pr.feed(b"K#9a\x03$OK#00-") == [("packet", b"OK"), ("interrupt", b""), ("bad", b"OK"), ("ack", b"-")]


async def test_acks_checksums_and_no_ack_mode(gdb_target: Attach, client: AsyncClient) -> None:
    t = await gdb_target("mps2-an385", "hello", "unicorn")
    rsp = await RawRsp.connect(t.port)
    try:
        await wait_for_clients(t.gdbserver, 1)
        # a bad checksum is refused with '-'; the good retransmission is answered
        rsp.writer.write(b"$qC#00")
        assert await rsp.read_byte() == b"-"
        assert await rsp.request(b"qC") == b"QC1"
        # a '-' from us makes the server send its last reply again
        rsp.writer.write(frame(b"qAttached"))
        assert await rsp.read_byte() == b"+"
        assert await rsp.read_packet(send_ack=False) == b"1"
        rsp.writer.write(b"-")
        assert await rsp.read_packet() == b"1"
        sup = await rsp.request(b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=arm")
        for feature in (b"PacketSize=", b"qXfer:features:read+", b"QStartNoAckMode+", b"vContSupported+",
                        b"swbreak+", b"hwbreak+"):
            assert feature in sup
        assert await rsp.request(b"vMustReplyEmpty") == b""
        assert await rsp.request(b"qNoSuchThing") == b""
        assert await rsp.request(b"Hg0") == b"OK"
        assert await rsp.request(b"qfThreadInfo") == b"m1"
        assert await rsp.request(b"qsThreadInfo") == b"l"
        # no-ack mode: the OK is still acked, then neither side acks
        assert await rsp.request(b"QStartNoAckMode") == b"OK"
        rsp.ack = False
        assert await rsp.request(b"vCont?") == b"vCont;c;C;s;S"
        # target description, read in small pieces
        xml = b""
        while True:
            part = await rsp.request(b"qXfer:features:read:target.xml:%x,40" % len(xml))
            assert part[:1] in (b"m", b"l")
            xml += unescape_binary(part[1:])
            if part[:1] == b"l":
                break
        assert b"org.gnu.gdb.arm.m-profile" in xml and b'name="xpsr"' in xml
        assert b"org.gnu.gdb.arm.m-system" in xml and b'name="control"' in xml  # unicorn has them
        assert await rsp.request(b"qXfer:features:read:other.xml:0,100") == b"E00"
        # registers: g is 23 x 4 bytes (r0-r12 sp lr pc xpsr msp psp primask basepri faultmask control)
        g = await rsp.request(b"g")
        assert len(g) == 23 * 8
        pc = int.from_bytes(bytes.fromhex((await rsp.request(b"pf")).decode()), "little")
        assert pc == int.from_bytes(bytes.fromhex(g[15 * 8 : 16 * 8].decode()), "little")
        assert (await rsp.request(b"?")).startswith(b"T05")
        assert await rsp.request(b"P7=efbeadde") == b"OK"
        regs = (await client.debug.read_registers(name=t.name, names=["r7"])).registers
        assert regs[0].value == 0xDEADBEEF
        # memory: M, X with escaped bytes, m; errors are E replies, never a crash
        assert await rsp.request(b"M20001000,4:01020304") == b"OK"
        assert await rsp.request(b"X20001004,4:" + escape_binary(b"$#}*")) == b"OK"
        assert await rsp.request(b"m20001000,8") == b"01020304" + b"$#}*".hex().encode()
        assert await rsp.request(b"X20001000,0:") == b"OK"
        assert (await rsp.request(b"m90000000,4")).startswith(b"E")
        assert (await rsp.request(b"mzz,4")).startswith(b"E")
        assert (await rsp.request(b"p99")).startswith(b"E")
        assert (await rsp.request(b"Z2,20001000,3")).startswith(b"E")  # 3-byte watchpoint
        # breakpoints go through the Debugger (ListBreakpoints shows them, with gdb's client id)
        assert await rsp.request(b"Z0,200,2") == b"OK"
        assert await rsp.request(b"Z1,204,2") == b"OK"
        assert await rsp.request(b"Z2,20001000,4") == b"OK"
        bps = (await client.debug.list_breakpoints(name=t.name)).breakpoints
        assert sorted(b.address for b in bps) == [0x200, 0x204, 0x20001000]
        assert [b.kind for b in sorted(bps, key=lambda b: b.address)] == [
            dpb.BREAKPOINT_KIND_SOFTWARE, dpb.BREAKPOINT_KIND_HARDWARE, dpb.BREAKPOINT_KIND_WATCH_WRITE]
        core_bps = t.gdbserver.debugger.list_breakpoints(t.live)
        assert all(b.client.startswith("gdb-") for b in core_bps)
        assert await rsp.request(b"z0,200,2") == b"OK"
        assert len((await client.debug.list_breakpoints(name=t.name)).breakpoints) == 2
        # monitor commands answer with O packets, then OK
        reply, text = await rsp.monitor("help")
        assert reply == b"OK" and "monitor reset" in text
        reply, text = await rsp.monitor("frobnicate")
        assert reply.startswith(b"E") and "unknown monitor command" in text
        # detach: OK, points removed, the halted session resumed (to hello's exit), connection closed
        assert await rsp.request(b"D") == b"OK"
        assert await asyncio.wait_for(rsp.reader.read(), 10) == b""
        await wait_for_clients(t.gdbserver, 0)
        assert not (await client.debug.list_breakpoints(name=t.name)).breakpoints
        await wait_state(client, t.name, cpb.SESSION_STATE_EXITED)
    finally:
        await rsp.close()


@pytest.mark.parametrize("no_ack", [False, True], ids=["acks", "no-ack"])
async def test_interrupt_while_running(gdb_target: Attach, client: AsyncClient, no_ack: bool) -> None:
    t = await gdb_target("mps2-an385", "echo", "unicorn")  # waits for console input forever
    rsp = await RawRsp.connect(t.port)
    try:
        if no_ack:
            assert await rsp.request(b"QStartNoAckMode") == b"OK"
            rsp.ack = False
        rsp.writer.write(frame(b"vCont;c"))
        if not no_ack:
            assert await rsp.read_byte() == b"+"
        await wait_state(client, t.name, cpb.SESSION_STATE_RUNNING)
        # interrupted while it really runs: its virtual time moves on first
        await wait_progress(client, t.name)
        rsp.writer.write(b"\x03")
        stop = await rsp.read_packet()
        assert stop.startswith(b"T02") and b"0f:" in stop, stop  # SIGINT, pc expedited
        assert (await client.sessions.get_session(name=t.name)).session.state == cpb.SESSION_STATE_HALTED
        # monitor reset leaves it halted at the reset handler; k leaves the session alone
        reply, text = await rsp.monitor("reset")
        assert reply == b"OK" and "reset, halted" in text
        pc = (await client.debug.read_registers(name=t.name, names=["pc"])).registers[0].value
        vectors = (await client.debug.read_memory(name=t.name, address=0, size=8)).data
        assert pc == int.from_bytes(vectors[4:8], "little") & ~1
        rsp.writer.write(frame(b"k"))
        assert await asyncio.wait_for(rsp.reader.read(), 10) in (b"", b"+")
        await wait_for_clients(t.gdbserver, 0)
        s = (await client.sessions.get_session(name=t.name)).session
        assert s.state == cpb.SESSION_STATE_HALTED
    finally:
        await rsp.close()


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_disconnect_while_running_leaves_session_running(
    gdb_target: Attach, client: AsyncClient, backend: str
) -> None:
    t = await gdb_target("mps2-an385", "echo", backend)
    rsp = await RawRsp.connect(t.port)
    assert await rsp.request(b"Z0,200,2") == b"OK"
    assert len((await client.debug.list_breakpoints(name=t.name)).breakpoints) == 1
    rsp.writer.write(frame(b"c"))
    assert await rsp.read_byte() == b"+"
    await wait_state(client, t.name, cpb.SESSION_STATE_RUNNING)  # gdb leaves while it runs
    await rsp.close()
    await wait_for_clients(t.gdbserver, 0)
    assert (await client.sessions.get_session(name=t.name)).session.state == cpb.SESSION_STATE_RUNNING
    assert not (await client.debug.list_breakpoints(name=t.name)).breakpoints
    await client.sessions.pause_session(name=t.name)


async def test_one_client_at_a_time(gdb_target: Attach, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gdbserver, "WAIT_FOR_PREVIOUS_CLIENT", 0.5)
    t = await gdb_target("mps2-an385", "hello", "unicorn")
    first = await RawRsp.connect(t.port)
    assert await first.request(b"qC") == b"QC1"
    second = await RawRsp.connect(t.port)
    second.writer.write(frame(b"qC"))
    assert await asyncio.wait_for(second.reader.read(), 10) == b""  # refused after the wait
    await second.close()
    # a client that comes while the previous one is detaching is served after it
    first.writer.write(frame(b"D"))
    third = await RawRsp.connect(t.port)
    assert await third.request(b"qC") == b"QC1"
    assert await first.read_byte() == b"+"
    assert await first.read_packet() == b"OK"
    await first.close()
    await third.close()
    await wait_for_clients(t.gdbserver, 0)
