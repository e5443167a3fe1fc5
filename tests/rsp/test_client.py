"""The RSP client against a scripted stub (tests/rsp/stub.py): the handshake, acks and
their absence, resends, timeouts and late replies, cancellation, garbage, closed
sockets, the run/stop cycle, exits, and the commands (registers, memory, X escaping,
RLE replies, qXfer, qRcmd, qCRC). Then against real stubs: QEMU's gdbstub, and our own
GDB bridge."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.app import RunningServer
from machineserver.server.core.gdbserver import GdbServer
from machineserver.server.rsp import (
    RspClient,
    RspClosed,
    RspError,
    RspProtocolError,
    RspStateError,
    RspTimeout,
    State,
    codec,
)
from machineserver.server.rsp.client import PushReader
from tests.helpers.firmware import elf_entry, firmware
from tests.helpers.tools import require_tool
from tests.rsp.stub import Script, Stub, echo, escape, unescape


@contextlib.asynccontextmanager
async def connected(script: Script = echo, *, stub_options: dict[str, Any] | None = None,
                    **client_options: Any) -> AsyncIterator[tuple[Stub, RspClient]]:
    async with Stub(script, **(stub_options or {})) as stub:
        client = await RspClient.connect_tcp("127.0.0.1", stub.port, **client_options)
        try:
            yield stub, client
        finally:
            await client.close()


def after_handshake(stub: Stub) -> list[bytes]:
    return [p for p in stub.received if not p.startswith((b"qSupported", b"QStartNoAckMode"))]


# --------------------------------------------------------------------------- handshake and acks


@pytest.mark.parametrize(("xml", "claim"), [("arm", b";xmlRegisters=arm"), (None, b"")])
async def test_handshake_claims_xml_registers_only_when_told(xml: str | None, claim: bytes) -> None:
    async with connected(xml_registers=xml) as (stub, client):
        assert stub.supported == b"qSupported:multiprocess+;swbreak+;hwbreak+" + claim
        assert b"riscv" not in stub.supported
        assert client.state is State.IDLE
        assert client.packet_size == 0x4000
        assert client.features == {"PacketSize": "4000", "qXfer:features:read": "+"}
        assert client.supports("qXfer:features:read") and not client.supports("QStartNoAckMode")
        assert client.ack_mode  # not offered: acks stay on


async def test_ack_mode_acks_every_reply() -> None:
    async with connected() as (stub, client):
        assert await client.request(b"qOne") == b"reply-to-qOne"
        assert await client.request(b"qTwo") == b"reply-to-qTwo"
        await stub.wait_until(lambda: len(stub.acks) == 3)  # qSupported's reply and both replies
        assert stub.acks == [b"+", b"+", b"+"]


async def test_no_ack_mode_when_the_stub_offers_it() -> None:
    async with connected(stub_options={"no_ack": True}) as (stub, client):
        assert b"QStartNoAckMode" in stub.received
        assert not client.ack_mode
        assert await client.request(b"qOne") == b"reply-to-qOne"
        assert await client.request(b"qTwo") == b"reply-to-qTwo"
        await asyncio.sleep(0.05)
        assert stub.acks == [b"+", b"+"]  # qSupported's reply and the OK, then none
        assert stub.acks_after_no_ack == 0


async def test_nak_makes_the_client_resend() -> None:
    async with connected(stub_options={"nak_first": 2}) as (stub, client):
        assert await client.request(b"qAgain") == b"reply-to-qAgain"
        assert stub.received.count(b"qAgain") == 3


async def test_endless_naks_break_the_client() -> None:
    async with connected(stub_options={"nak_first": 2}) as (stub, client):
        stub.nak_first = 100
        with pytest.raises(RspProtocolError, match="refused"):
            await client.request(b"qNever")
        assert stub.received.count(b"qNever") == 4  # the first send and 3 resends
        assert client.state is State.BROKEN and client.closed
        with pytest.raises(RspStateError) as err:
            await client.request(b"qAfter")
        assert err.value.state is State.BROKEN and err.value.required == (State.IDLE,)
        assert "broken" in str(err.value) and "refused" in str(err.value)


async def test_bad_checksum_is_refused_and_the_good_copy_taken() -> None:
    async def corrupt_once(stub: Stub, payload: bytes) -> None:
        stub.send(b"reply-to-" + payload, bad_checksum=True)

    async with connected(corrupt_once) as (stub, client):
        assert await client.request(b"qCorrupt") == b"reply-to-qCorrupt"
        await stub.wait_until(lambda: stub.acks[-2:] == [b"-", b"+"])


async def test_bad_checksums_without_end_break_the_client() -> None:
    async def always_corrupt(stub: Stub, payload: bytes) -> None:
        for _ in range(5):
            stub.write(codec.frame(b"garbled")[:-1] + b"0")

    async with connected(always_corrupt, timeout=2.0) as (_, client):
        with pytest.raises(RspProtocolError, match="bad checksum"):
            await client.request(b"qCorrupt")
        assert client.state is State.BROKEN


async def test_bad_checksum_in_no_ack_mode_breaks_the_client() -> None:
    async def corrupt(stub: Stub, payload: bytes) -> None:
        stub.send(b"reply", bad_checksum=True)

    async with connected(corrupt, stub_options={"no_ack": True}) as (_, client):
        with pytest.raises(RspProtocolError, match="no-ack"):
            await client.request(b"qCorrupt")
        assert client.state is State.BROKEN


# --------------------------------------------------------------------------- timeouts, late replies, cancellation


def slow_first(delay: float) -> Script:
    """Answers the first request after ``delay`` seconds, the others at once."""
    calls = 0

    async def script(stub: Stub, payload: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            stub.later(delay, lambda: stub.send(b"reply-to-" + payload))
        else:
            stub.send(b"reply-to-" + payload)

    return script


async def test_a_late_reply_is_discarded_never_given_to_the_next_request() -> None:
    async with connected(slow_first(0.3), resync_timeout=10) as (stub, client):
        with pytest.raises(RspTimeout) as err:
            await client.request(b"qP0", timeout=0.05)
        assert isinstance(err.value, TimeoutError)
        assert client.reply_owed and client.state is State.IDLE
        # p1 first waits for p0's reply and throws it away, then gets its own
        assert await client.request(b"qP1") == b"reply-to-qP1"
        assert client.discarded == 1 and not client.reply_owed
        assert await client.request(b"qP2") == b"reply-to-qP2"
        assert after_handshake(stub) == [b"qP0", b"qP1", b"qP2"]


async def test_a_reply_that_never_comes_breaks_the_client_before_it_sends_again() -> None:
    async with connected(slow_first(3.0), resync_timeout=0.2) as (stub, client):
        with pytest.raises(RspTimeout):
            await client.request(b"qP0", timeout=0.05)
        with pytest.raises(RspProtocolError, match=r"qP0.*did not come"):
            await client.request(b"qP1")
        assert client.state is State.BROKEN
        assert after_handshake(stub) == [b"qP0"]  # p1 was never sent
        with pytest.raises(RspStateError) as err:
            await client.read_memory(0, 4)
        assert err.value.state is State.BROKEN


async def test_cancelling_a_request_leaves_its_reply_owed() -> None:
    async with connected(slow_first(0.3), resync_timeout=10) as (stub, client):
        pending = asyncio.create_task(client.request(b"qSlow"))
        await stub.wait_for_packet(b"qSlow")
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert client.reply_owed and client.state is State.IDLE
        assert await client.request(b"qFast") == b"reply-to-qFast"
        assert client.discarded == 1


async def test_cancelling_before_the_ack_resends_on_nak_while_resynchronising() -> None:
    """The request is abandoned before its ack; the stub then refuses the packet: the
    resync sends it again, and the reply to the resend is the one discarded."""
    async with connected(stub_options={"nak_delay": 0.2}, resync_timeout=10) as (stub, client):
        stub.nak_first = 1
        pending = asyncio.create_task(client.request(b"qNakked"))
        await stub.wait_for_packet(b"qNakked")
        pending.cancel()  # before the '-' comes
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert stub.received.count(b"qNakked") == 1 and client.reply_owed
        stub.nak_first = 0  # the delayed '-' still comes; nothing else is refused
        assert await client.request(b"qNext") == b"reply-to-qNext"
        assert after_handshake(stub) == [b"qNakked", b"qNakked", b"qNext"]
        assert client.discarded == 1


async def test_concurrent_requests_queue_and_each_gets_its_own_reply() -> None:
    async def slowish(stub: Stub, payload: bytes) -> None:
        await asyncio.sleep(0.01)
        stub.send(b"reply-to-" + payload)

    async with connected(slowish) as (_, client):
        names = [b"q%d" % i for i in range(8)]
        replies = await asyncio.gather(*(client.request(n) for n in names))
        assert replies == [b"reply-to-" + n for n in names]


# --------------------------------------------------------------------------- garbage and closed sockets


async def test_garbage_instead_of_a_reply_breaks_the_client() -> None:
    async def garbage(stub: Stub, payload: bytes) -> None:
        stub.write(b"hello world\r\n")

    async with connected(garbage) as (_, client):
        with pytest.raises(RspProtocolError, match="outside any packet"):
            await client.request(b"qHello")
        assert client.state is State.BROKEN


async def test_a_packet_nobody_asked_for_breaks_the_client() -> None:
    async with connected() as (stub, client):
        stub.send(b"T05thread:1;")  # unsolicited, in all-stop mode
        await asyncio.sleep(0.05)
        with pytest.raises(RspProtocolError, match="no reply was owed"):
            await client.request(b"qAfter")
        assert after_handshake(stub) == []  # nothing was sent after it


async def test_the_stub_hanging_up_mid_request() -> None:
    async def hang_up(stub: Stub, payload: bytes) -> None:
        stub.hang_up()

    async with connected(hang_up) as (_, client):
        with pytest.raises(RspClosed) as err:
            await client.request(b"qBye")
        assert isinstance(err.value, ConnectionError)
        assert client.state is State.CLOSED and client.closed
        with pytest.raises(RspClosed):
            await client.read_register(0)
        with pytest.raises(RspClosed):
            client.interrupt()


async def test_the_stub_hanging_up_while_idle() -> None:
    async with connected() as (stub, client):
        stub.hang_up()
        await asyncio.sleep(0.05)
        with pytest.raises(RspClosed):
            await client.request(b"qAnyone")


async def test_connecting_to_nothing() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        with pytest.raises(RspClosed, match="cannot connect"):
            await RspClient.connect_tcp("127.0.0.1", port, timeout=2)


async def test_close_wakes_a_waiter_in_another_task() -> None:
    async def never(stub: Stub, payload: bytes) -> None:
        return

    async with connected(never) as (_, client):
        await client.send_continue(b"c")
        waiter = asyncio.create_task(client.wait_stop(None))
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(RspClosed):
            await waiter
        assert client.state is State.CLOSED


# --------------------------------------------------------------------------- running, stopping, exiting


def running_target(stop: bytes = b"T02thread:01;") -> Script:
    """``c`` runs until ^C (answered with ``stop``); ``s`` stops at once."""
    async def script(stub: Stub, payload: bytes) -> None:
        if payload == b"c":
            stub.on_interrupt = lambda s: s.send(stop)
        elif payload == b"s":
            stub.send(b"T05thread:01;0f:00010000;")
        else:
            await echo(stub, payload)

    return script


async def test_continue_interrupt_and_the_stop_reply() -> None:
    async with connected(running_target()) as (stub, client):
        assert not client.interrupt()  # not running: nothing is sent
        assert stub.interrupts == 0
        await client.send_continue(b"c")
        assert client.state is State.RUNNING
        with pytest.raises(RspStateError) as err:
            await client.read_memory(0, 4)
        assert err.value.state is State.RUNNING and err.value.required == (State.IDLE,)
        assert "interrupt" in str(err.value)
        with pytest.raises(RspTimeout):
            await client.wait_stop(0.05)
        assert client.state is State.RUNNING  # a timeout leaves it running
        assert client.interrupt()
        reply = await client.wait_stop(5)
        assert (reply.kind, reply.signal, reply.thread) == ("T", 2, "01")
        assert client.state is State.IDLE
        assert stub.interrupts == 1
        assert await client.request(b"qAfter") == b"reply-to-qAfter"


async def test_step_returns_the_stop_reply_with_expedited_registers() -> None:
    async with connected(running_target()) as (_, client):
        reply = await client.step()
        assert reply.signal == 5 and reply.registers == {15: b"\x00\x01\x00\x00"}
        assert client.state is State.IDLE


async def test_a_step_that_times_out_is_interrupted_like_the_qemu_driver_does() -> None:
    async def stuck_step(stub: Stub, payload: bytes) -> None:
        if payload == b"s":
            stub.on_interrupt = lambda s: s.send(b"T02thread:01;")

    async with connected(stuck_step) as (_, client):
        with pytest.raises(RspTimeout):
            await client.step(0.05)
        assert client.state is State.RUNNING
        client.interrupt()
        assert (await client.wait_stop(5)).signal == 2


async def test_each_timeout_says_what_did_not_come() -> None:
    """A call's own deadline ends it with an RspTimeout (a TimeoutError too) that names
    what did not come in time, and where that leaves the target."""
    async def silent(stub: Stub, payload: bytes) -> None:
        if payload == b"c":
            stub.on_interrupt = lambda s: s.send(b"T02thread:01;")

    async with connected(silent, resync_timeout=10) as (stub, client):
        with pytest.raises(RspTimeout, match=r"^no reply to b'qNever' within 0\.05 s$"):
            await client.request(b"qNever", timeout=0.05)
        # its reply is owed: the resume waits for it and never sends its packet
        with pytest.raises(RspTimeout, match=r"^no stop reply to b'c' within 0\.05 s$"):
            await client.resume(b"c", timeout=0.05)
        assert client.state is State.IDLE and b"c" not in stub.received

    async with connected(silent) as (stub, client):
        with pytest.raises(RspTimeout, match=r"^no stop reply to b'c' within 0\.05 s; the target still runs$"):
            await client.resume(b"c", timeout=0.05)
        with pytest.raises(RspTimeout, match=r"^no stop reply within 0\.05 s; the target still runs$"):
            await client.wait_stop(0.05)
        assert client.state is State.RUNNING
        client.interrupt()
        assert (await client.wait_stop(5)).signal == 2

    async with connected(silent) as (stub, client):
        stub.nak_first, stub.nak_delay = 1, 5.0  # the ack of the next packet comes late
        with pytest.raises(RspTimeout, match=r"^the stub did not acknowledge b'c' within 0\.05 s$"):
            await client.send_continue(b"c", timeout=0.05)


async def test_wait_stop_needs_a_resume() -> None:
    async with connected() as (_, client):
        with pytest.raises(RspStateError) as err:
            await client.wait_stop(1)
        assert err.value.state is State.IDLE and err.value.required == (State.RUNNING,)
        with pytest.raises(ValueError):
            await client.send_continue(b"m0,4")


async def test_console_output_while_running_then_a_watchpoint() -> None:
    async def script(stub: Stub, payload: bytes) -> None:
        stub.send(codec.console_reply("booting\n"))
        stub.send(codec.console_reply("ready\n"))
        stub.send(b"T05watch:20000010;thread:01;")

    async with connected(script) as (_, client):
        seen: list[bytes] = []
        client.on_output = seen.append
        await client.send_continue(b"vCont;c")
        reply = await client.wait_stop(5)
        assert seen == [b"booting\n", b"ready\n"]
        assert reply.watch == ("write", 0x20000010)


@pytest.mark.parametrize(("exit_packet", "kind", "signal"), [(b"W03;process:1", "W", 3), (b"X09", "X", 9)])
async def test_exit_replies(exit_packet: bytes, kind: str, signal: int) -> None:
    async def script(stub: Stub, payload: bytes) -> None:
        stub.send(exit_packet)

    async with connected(script) as (_, client):
        await client.send_continue()
        reply = await client.wait_stop(5)
        assert reply.exited and (reply.kind, reply.signal) == (kind, signal)
        assert reply.exit_code == (3 if kind == "W" else None)


async def test_the_exit_reply_is_delivered_even_when_the_stub_hangs_up_right_after() -> None:
    async def exit_and_hang_up(stub: Stub, payload: bytes) -> None:
        stub.send(b"W00")
        stub.hang_up()

    async with connected(exit_and_hang_up) as (_, client):
        await client.send_continue()
        await asyncio.sleep(0.1)  # both the W and the end of the stream have arrived
        assert (await client.wait_stop(5)).exit_code == 0
        with pytest.raises(RspClosed):
            await client.read_register(15)


async def test_a_refused_resume_returns_to_idle() -> None:
    async def refuse(stub: Stub, payload: bytes) -> None:
        stub.send(b"E16" if payload.startswith(b"vCont") else b"OK")

    async with connected(refuse) as (_, client):
        await client.send_continue(b"vCont;c:99")
        with pytest.raises(RspError) as err:
            await client.wait_stop(5)
        assert err.value.code == 0x16 and client.state is State.IDLE


async def test_an_unreadable_stop_reply_breaks_the_client() -> None:
    async def nonsense(stub: Stub, payload: bytes) -> None:
        stub.send(b"Zap")

    async with connected(nonsense) as (_, client):
        await client.send_continue()
        with pytest.raises(RspProtocolError, match="stop reply"):
            await client.wait_stop(5)
        assert client.state is State.BROKEN


# --------------------------------------------------------------------------- resume: continue and wait in one pass


async def test_resume_waits_for_the_stop_reply_and_interrupt_works_meanwhile() -> None:
    async with connected(running_target()) as (stub, client):
        waiting = asyncio.create_task(client.resume(b"c", timeout=5))
        await stub.wait_for_packet(b"c")
        assert client.state is State.RUNNING and not waiting.done()
        assert client.interrupt()  # from another task, while resume() waits
        reply = await waiting
        assert (reply.signal, reply.thread) == (2, "01") and client.state is State.IDLE
        assert stub.interrupts == 1
        assert await client.request(b"qAfter") == b"reply-to-qAfter"


async def test_resume_takes_the_ack_and_resends_on_a_nak_while_waiting() -> None:
    async with connected(running_target(), stub_options={"nak_first": 2}) as (stub, client):
        reply = await client.resume(b"s", timeout=5)
        assert reply.signal == 5 and reply.registers == {15: b"\x00\x01\x00\x00"}
        assert after_handshake(stub).count(b"s") == 3  # refused twice, taken the third time
        assert client.state is State.IDLE and not client.reply_owed


async def test_resume_timing_out_leaves_the_target_running() -> None:
    async with connected(running_target()) as (stub, client):
        with pytest.raises(RspTimeout, match="still runs"):
            await client.resume(b"c", timeout=0.05)
        assert client.state is State.RUNNING
        with pytest.raises(RspStateError):
            await client.resume(b"c", timeout=1)
        assert client.interrupt()
        assert (await client.wait_stop(5)).signal == 2
        assert after_handshake(stub).count(b"c") == 1


async def test_resume_passes_console_output_on_and_returns_the_exit() -> None:
    async def script(stub: Stub, payload: bytes) -> None:
        stub.send(codec.console_reply("bye\n"))
        stub.send(b"W00;process:1")

    async with connected(script) as (_, client):
        seen: list[bytes] = []
        client.on_output = seen.append
        reply = await client.resume(b"vCont;c", timeout=5)
        assert reply.exited and reply.exit_code == 0 and seen == [b"bye\n"]


async def test_resume_refused_returns_to_idle_and_takes_only_resume_packets() -> None:
    async def refuse(stub: Stub, payload: bytes) -> None:
        stub.send(b"E16")

    async with connected(refuse) as (_, client):
        with pytest.raises(RspError) as err:
            await client.resume(b"vCont;c:99", timeout=5)
        assert err.value.code == 0x16 and client.state is State.IDLE
        with pytest.raises(ValueError):
            await client.resume(b"m0,4")


# --------------------------------------------------------------------------- the push reader


async def test_the_push_reader_keeps_what_comes_before_the_client_attaches() -> None:
    reader = PushReader()
    reader.feed_data(b"+$O")
    reader.feed_data(bytearray(b"K#9a"))
    seen: list[bytes | BaseException | None] = []
    reader.attach(seen.append)
    reader.feed_data(b"+")
    broken = ConnectionResetError("reset by peer")
    reader.set_exception(broken)
    reader.feed_eof()
    assert seen == [b"+$O", b"K#9a", b"+", broken, None]
    assert reader.exception() is broken and reader.at_eof()


async def test_clients_that_connect_read_without_a_reader_task() -> None:
    async with connected() as (_, client):
        assert await client.request(b"qOne") == b"reply-to-qOne"
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "rsp-reader"]


async def test_a_reset_connection_is_rsp_closed() -> None:
    """The stub resets the connection (RST, SO_LINGER 0) instead of closing it: the
    transport's error reaches a waiting request as RspClosed."""
    async def reset(stub: Stub, payload: bytes) -> None:
        assert stub._writer is not None
        sock = stub._writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stub.hang_up()

    async with connected(reset) as (_, client):
        with pytest.raises(RspClosed, match="connection to the stub broke"):
            await client.request(b"qBye")
        assert client.state is State.CLOSED


async def test_a_client_over_streams_it_did_not_open_reads_with_a_task() -> None:
    """The constructor takes any asyncio streams; without a PushReader a reader task
    takes the bytes (the handshake is the connect_* methods' own step, called here)."""
    async with Stub() as stub:
        reader, writer = await asyncio.open_connection("127.0.0.1", stub.port)
        client = RspClient(reader, writer)
        try:
            assert [t for t in asyncio.all_tasks() if t.get_name() == "rsp-reader"]
            await client._handshake(None, 5)
            assert await client.request(b"qOne") == b"reply-to-qOne"
            stub.hang_up()
            with pytest.raises(RspClosed):
                await client.request(b"qTwo")
        finally:
            await client.close()
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "rsp-reader"]


async def test_halt_reason() -> None:
    async def script(stub: Stub, payload: bytes) -> None:
        stub.send(b"T05thread:p01.01;" if payload == b"?" else b"")

    async with connected(script) as (_, client):
        reply = await client.halt_reason()
        assert reply.signal == 5 and reply.thread == "p01.01"


# --------------------------------------------------------------------------- registers and memory


class Target:
    """A scripted target with 17 32-bit registers and a sparse byte memory (0 where
    never written, E14 above 0x40000000); ``g`` replies are RLE-encoded."""

    def __init__(self) -> None:
        self.registers = [0] * 17
        self.registers[15] = 0x1A4
        self.last_g = b""  # the last g reply as sent

    async def __call__(self, stub: Stub, payload: bytes) -> None:
        op, args = payload[:1], payload[1:]
        if op == b"g":
            text = b"".join(v.to_bytes(4, "little").hex().encode() for v in self.registers)
            self.last_g = codec.encode_rle(text)
            stub.send(self.last_g)
        elif op == b"p":
            stub.send(self.registers[int(args, 16)].to_bytes(4, "little").hex().encode())
        elif op == b"P":
            n, value = args.split(b"=")
            self.registers[int(n, 16)] = int.from_bytes(bytes.fromhex(value.decode()), "little")
            stub.send(b"OK")
        elif op == b"m":
            address, length = (int(x, 16) for x in args.split(b","))
            if address + length > 0x40000000:
                stub.send(b"E14")
                return
            data = bytes(stub.memory.get(address + i, 0) for i in range(length))
            stub.send(codec.encode_rle(data.hex().encode()))
        elif op in (b"M", b"X"):
            head, data = args.split(b":", 1)
            address, length = (int(x, 16) for x in head.split(b","))
            raw = bytes.fromhex(data.decode()) if op == b"M" else unescape(data)
            assert len(raw) == length
            for i, b in enumerate(raw):
                stub.memory[address + i] = b
            stub.send(b"OK")
        elif op in (b"Z", b"z"):
            stub.send(b"OK" if args.startswith((b"0", b"1", b"2")) else b"")
        else:
            stub.send(b"")


async def test_registers_with_rle_replies() -> None:
    target = Target()
    async with connected(target) as (stub, client):
        g = await client.read_all_registers()
        assert len(g) == 17 * 4 and int.from_bytes(g[60:64], "little") == 0x1A4
        assert b"*" in target.last_g and len(target.last_g) < 17 * 8  # it came RLE-encoded
        await client.write_register(7, (0xDEADBEEF).to_bytes(4, "little"))
        assert target.registers[7] == 0xDEADBEEF
        assert await client.read_register(7) == b"\xef\xbe\xad\xde"
        assert stub.received[-1] == b"p7"


async def test_binary_x_writes_round_trip_every_byte_value() -> None:
    async with connected(Target()) as (stub, client):
        data = bytes(range(256)) * 3 + b"$#}*" * 40
        await client.write_memory_binary(0x20000000, data)
        xs = [p for p in stub.received if p.startswith(b"X")]
        assert xs and all(b"$" not in p and b"#" not in p for p in xs)
        assert await client.read_memory(0x20000000, len(data)) == data  # m replies use RLE
        await client.write_memory(0x20001000, b"\x00" * 5000)  # M, in chunks
        assert await client.read_memory(0x20001000, 5000) == b"\x00" * 5000
        assert len([p for p in stub.received if p.startswith(b"M")]) > 1


async def test_memory_errors_carry_the_code_and_the_address() -> None:
    async with connected(Target()) as (_, client):
        with pytest.raises(RspError) as err:
            await client.read_memory(0x40000000, 4)
        assert err.value.code == 0x14 and err.value.address == 0x40000000
        assert "at 0x40000000" in str(err.value)
        assert client.state is State.IDLE  # an error reply is an answer, not a broken stream


async def test_points_and_unsupported_kinds() -> None:
    async with connected(Target()) as (stub, client):
        await client.insert_point(0, 0x1A4, 2)
        await client.remove_point(2, 0x20000000, 4)
        assert stub.received[-2:] == [b"Z0,1a4,2", b"z2,20000000,4"]
        with pytest.raises(RspError, match="not supported"):
            await client.insert_point(4, 0x20000000, 4)


# --------------------------------------------------------------------------- queries


async def test_read_xfer_in_escaped_chunks() -> None:
    document = b'<?xml version="1.0"?><target><architecture>arm</architecture>' + b"$#}*" * 30 + b"</target>"

    async def xfer(stub: Stub, payload: bytes) -> None:
        prefix = b"qXfer:features:read:target.xml:"
        assert payload.startswith(prefix)
        offset, _ = (int(x, 16) for x in payload[len(prefix):].split(b","))
        piece = document[offset : offset + 50]  # the stub sends less than asked
        more = offset + 50 < len(document)
        stub.send((b"m" if more else b"l") + escape(piece))

    async with connected(xfer) as (stub, client):
        assert await client.read_target_xml() == document
        assert len(after_handshake(stub)) == -(-len(document) // 50)


async def test_monitor_collects_console_output() -> None:
    async def monitor(stub: Stub, payload: bytes) -> None:
        command = bytes.fromhex(payload[len(b"qRcmd,"):].decode())
        if command == b"help":
            stub.send(codec.console_reply("reset  reset the board\n"))
            stub.send(codec.console_reply("halt   halt it\n"))
            stub.send(b"OK")
        elif command == b"version":
            stub.send(b"v1.0\n".hex().encode())  # the output as the reply itself
        else:
            stub.send(codec.console_reply(f"unknown command {command.decode()}\n"))
            stub.send(b"E01")

    async with connected(monitor) as (_, client):
        assert await client.monitor("help") == "reset  reset the board\nhalt   halt it\n"
        assert await client.monitor("version") == "v1.0\n"
        with pytest.raises(RspError) as err:
            await client.monitor("frobnicate")
        assert err.value.code == 1 and "unknown command frobnicate" in str(err.value)


async def test_an_abandoned_monitor_command_discards_its_output_and_its_reply() -> None:
    async def slow_monitor(stub: Stub, payload: bytes) -> None:
        if payload.startswith(b"qRcmd"):
            stub.send(codec.console_reply("working\n"))
            stub.later(0.2, lambda: stub.write(codec.frame(codec.console_reply("done\n")) + codec.frame(b"OK")))
        else:
            await echo(stub, payload)

    async with connected(slow_monitor, resync_timeout=10) as (_, client):
        with pytest.raises(RspTimeout):
            await client.monitor("slow", timeout=0.05)
        assert await client.request(b"qNext") == b"reply-to-qNext"
        assert client.discarded == 1


async def test_crc_against_gdbs_algorithm() -> None:
    async def crc(stub: Stub, payload: bytes) -> None:
        address, length = (int(x, 16) for x in payload[len(b"qCRC:"):].split(b","))
        data = bytes(stub.memory.get(address + i, 0) for i in range(length))
        stub.send(b"C%x" % codec.gdb_crc32(data))

    async with connected(crc) as (stub, client):
        for i, b in enumerate(b"123456789"):
            stub.memory[0x100 + i] = b
        assert await client.crc(0x100, 9) == 0x0376E6E7


async def test_unsupported_crc_is_an_error() -> None:
    async with connected(Target()) as (_, client):
        with pytest.raises(RspError, match="not supported"):
            await client.crc(0, 4)


# --------------------------------------------------------------------------- a real gdbstub

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def qemu_gdbstub(elf: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, RspClient]]:
    """qemu-system-arm -M mps2-an385 halted at reset (-S) with its gdbstub on a free port
    (semihosting on, so the firmware can exit), and a client connected to it; skipped
    (failed under scripts/test) without qemu-system-arm."""
    binary = require_tool("qemu-system-arm")
    port = _free_port()
    qemu = await asyncio.create_subprocess_exec(
        binary, "-M", "mps2-an385", "-nographic", "-monitor", "none", "-S",
        "-semihosting-config", "enable=on,target=native", "-gdb", f"tcp:127.0.0.1:{port}",
        "-kernel", str(elf),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    client: RspClient | None = None
    try:
        async with asyncio.timeout(10):
            while client is None:  # QEMU opens its gdbstub port a moment after it starts
                try:
                    client = await RspClient.connect_tcp("127.0.0.1", port, xml_registers="arm")
                except RspClosed:
                    if qemu.returncode is not None:
                        assert qemu.stderr is not None
                        pytest.fail(f"QEMU ended: {(await qemu.stderr.read()).decode(errors='replace')}")
                    await asyncio.sleep(0.05)
        yield qemu, client
    finally:
        if client is not None:
            await client.close()
        if qemu.returncode is None:
            qemu.kill()
        await qemu.wait()


async def test_against_qemus_gdbstub() -> None:
    elf = firmware("mps2-an385", "hello")
    entry = elf_entry(elf)  # the reset handler, Thumb bit set
    async with qemu_gdbstub(elf) as (qemu, client):
        # handshake: QEMU 7.2 offers no QStartNoAckMode, so acks stay on
        assert client.state is State.IDLE and client.ack_mode
        assert client.packet_size == 0x1000 and client.supports("qXfer:features:read")
        xml = await client.read_target_xml()
        assert b"<architecture>arm</architecture>" in xml
        assert b'name="pc"' in await client.read_xfer("features", "arm-m-profile.xml")
        assert (await client.halt_reason()).signal == codec.SIGTRAP

        # registers and memory agree with the ELF's vector table
        vectors = await client.read_memory(0, 8)
        initial_sp, reset = int.from_bytes(vectors[:4], "little"), int.from_bytes(vectors[4:], "little")
        assert reset == entry
        g = await client.read_all_registers()
        assert int.from_bytes(g[13 * 4 : 14 * 4], "little") == initial_sp
        assert int.from_bytes(g[15 * 4 : 16 * 4], "little") == entry & ~1
        assert await client.read_register(15) == g[15 * 4 : 16 * 4]

        # one step moves the pc
        stop = await client.step()
        assert stop.signal == codec.SIGTRAP and not stop.exited
        pc = int.from_bytes(await client.read_register(15), "little")
        assert pc != entry & ~1

        # continue into a branch-to-self written over the next instruction, then ^C
        original = await client.read_memory(pc, 2)
        await client.write_memory(pc, b"\xfe\xe7")  # b .
        assert await client.read_memory(pc, 2) == b"\xfe\xe7"
        await client.send_continue(b"c")
        with pytest.raises(RspTimeout):
            await client.wait_stop(0.2)  # it really runs
        assert client.interrupt()
        stop = await client.wait_stop(5)
        assert stop.signal == codec.SIGINT and client.state is State.IDLE
        assert int.from_bytes(await client.read_register(15), "little") == pc
        assert "R15=" in await client.monitor("info registers")

        # put the instruction back and run to the end: the firmware exits through semihosting
        await client.write_memory(pc, original)
        await client.send_continue(b"c")
        stop = await client.wait_stop(10)
        assert stop.exited and stop.exit_code == 0
        assert await asyncio.wait_for(qemu.wait(), 10) == 0


async def test_against_our_own_gdb_bridge(server: RunningServer, client: AsyncClient) -> None:
    """Both ends from this package: the client talks to the GDB bridge (which frames with
    rsp.codec) on a Unicorn session; the bridge offers no-ack mode, QEMU does not."""
    elf = firmware("mps2-an385", "hello")
    entry = elf_entry(elf)
    program = (await client.upload_program(elf)).program.name
    session = (await client.sessions.create_session(
        board_template="mps2-an385", program=program, power_on=True, backend="unicorn")).session
    bridge = GdbServer(server.engine.sessions, server.engine.debugger, server.engine.sessions.get(session.name))
    host, port = await bridge.start("127.0.0.1", 0)
    rsp = await RspClient.connect_tcp(host, port, xml_registers="arm")
    try:
        assert not rsp.ack_mode and rsp.supports("QStartNoAckMode")
        assert b"org.gnu.gdb.arm.m-profile" in await rsp.read_target_xml()
        assert "monitor reset" in await rsp.monitor("help")
        with pytest.raises(RspError, match="unknown monitor command"):
            await rsp.monitor("frobnicate")
        assert (await rsp.halt_reason()).registers[15] == (entry & ~1).to_bytes(4, "little")
        assert int.from_bytes((await rsp.read_memory(4, 4)), "little") == entry
        stop = await rsp.step()
        assert stop.signal == codec.SIGTRAP and 15 in stop.registers and stop.thread == "1"
        data = b"$#}*\x00\xff" * 8
        await rsp.write_memory_binary(0x20001000, data)  # X with escapes, unescaped by the bridge
        assert await rsp.read_memory(0x20001000, len(data)) == data
        await rsp.send_continue(b"vCont;c")
        stop = await rsp.wait_stop(20)
        assert stop.exited and stop.exit_code == 0
    finally:
        await rsp.close()
        await bridge.stop()
