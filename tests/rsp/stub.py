"""A scripted gdbstub for the client tests: an asyncio server on 127.0.0.1 (port 0) that
reads packets and answers through a test's ``script`` coroutine.

Its framing is written out here by hand, not taken from the codec under test, so a
mistake in the codec cannot cancel itself out. What it does on its own: acks packets
(``+``; ``-``, optionally ``nak_delay`` seconds late, for the first ``nak_first``
arrivals of each packet), sends its
last packet again on ``-``, answers the handshake (qSupported with ``features``, and
QStartNoAckMode when ``no_ack`` is offered), and records everything the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

Script = Callable[["Stub", bytes], Awaitable[None]]


def frame(payload: bytes, *, bad_checksum: bool = False) -> bytes:
    cs = (sum(payload) + (1 if bad_checksum else 0)) & 0xFF
    return b"$" + payload + b"#" + f"{cs:02x}".encode()


def unescape(data: bytes) -> bytes:
    out = bytearray()
    escaped = False
    for b in data:
        if escaped:
            out.append(b ^ 0x20)
            escaped = False
        elif b == 0x7D:
            escaped = True
        else:
            out.append(b)
    assert not escaped
    return bytes(out)


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in b"$#}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


async def echo(stub: Stub, payload: bytes) -> None:
    """The default script: answers ``reply-to-<payload>``."""
    stub.send(b"reply-to-" + payload)


class Stub:
    def __init__(self, script: Script = echo, *, features: bytes = b"PacketSize=4000;qXfer:features:read+",
                 no_ack: bool = False, nak_first: int = 0, nak_delay: float = 0.0) -> None:
        self.script = script
        self.features = features + (b";QStartNoAckMode+" if no_ack else b"")
        self.nak_first = nak_first
        self.nak_delay = nak_delay  # seconds before each of those '-' goes out
        self.ack_mode = True
        self.received: list[bytes] = []  # every packet that arrived intact, resends included
        self.acks: list[bytes] = []  # '+' and '-' from the client, in order
        self.acks_after_no_ack = 0
        self.interrupts = 0
        self.supported = b""  # the client's qSupported payload
        self.changed = asyncio.Event()  # set whenever a packet, an ack or a ^C arrives
        self.interrupted = asyncio.Event()
        self.memory: dict[int, int] = {}
        self._arrivals: dict[bytes, int] = {}
        self._last = b""
        self._no_ack_next = False
        self.on_interrupt: Callable[[Stub], None] | None = None  # what ^C makes the stub do
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> Stub:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._writer is not None:
            self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    # ------------------------------------------------------------------ what scripts call

    def send(self, payload: bytes, *, bad_checksum: bool = False) -> None:
        """Send one packet (payload as given: escape or RLE-encode it yourself)."""
        packet = frame(payload, bad_checksum=bad_checksum)
        self._last = frame(payload)  # a '-' gets the good copy
        self.write(packet)

    def write(self, raw: bytes) -> None:
        assert self._writer is not None
        self._writer.write(raw)

    def hang_up(self) -> None:
        assert self._writer is not None
        self._writer.close()

    def later(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` after ``delay`` seconds without holding up the next packet."""
        async def run() -> None:
            await asyncio.sleep(delay)
            action()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        """Until ``check()`` holds (what the client writes reaches the stub a moment later)."""
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                await self.changed.wait()

    async def wait_for_packet(self, payload: bytes, timeout: float = 5.0) -> None:
        await self.wait_until(lambda: payload in self.received, timeout)

    # ------------------------------------------------------------------ the connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        buf = b""
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                buf += data
                while buf:
                    c = buf[:1]
                    self.changed.set()
                    if c in (b"+", b"-"):
                        self.acks.append(c)
                        if not self.ack_mode:
                            self.acks_after_no_ack += 1
                        if c == b"-" and self._last:
                            self.write(self._last)
                        buf = buf[1:]
                    elif c == b"\x03":
                        self.interrupts += 1
                        self.interrupted.set()
                        if self.on_interrupt is not None:
                            self.on_interrupt(self)
                        buf = buf[1:]
                    elif c == b"$":
                        end = buf.find(b"#")
                        if end < 0 or len(buf) < end + 3:
                            break
                        payload, cs = buf[1:end], buf[end + 1 : end + 3]
                        buf = buf[end + 3 :]
                        assert int(cs, 16) == sum(payload) & 0xFF, f"client sent a bad checksum on {payload!r}"
                        await self._packet(payload)
                    else:
                        raise AssertionError(f"client sent {buf[:20]!r} outside a packet")

    async def _packet(self, payload: bytes) -> None:
        if self._no_ack_next:
            self.ack_mode, self._no_ack_next = False, False
        self.received.append(payload)
        seen = self._arrivals.get(payload, 0)
        self._arrivals[payload] = seen + 1
        if self.ack_mode:
            if seen < self.nak_first:
                if self.nak_delay:
                    self.later(self.nak_delay, lambda: self.write(b"-"))
                else:
                    self.write(b"-")
                return
            self.write(b"+")
        if payload.startswith(b"qSupported"):
            self.supported = payload
            self.send(self.features)
        elif payload == b"QStartNoAckMode" and b"QStartNoAckMode+" in self.features:
            self.send(b"OK")
            self._no_ack_next = True  # the client acks this OK; the next packet is unacked
        else:
            await self.script(self, payload)
