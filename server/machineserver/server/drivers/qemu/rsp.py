"""A small asyncio client for the GDB remote serial protocol (RSP), as QEMU's gdbstub
speaks it.

Only what the QEMU driver needs: packet framing with checksums and acks (QEMU 7.2 has
no ``QStartNoAckMode``; the client switches ack mode off when a stub offers it), register
and memory access, breakpoints and watchpoints, step/continue, the ^C interrupt, and
parsing of stop replies (``S``/``T`` with ``watch``/``rwatch``/``awatch``, ``W``/``X``).

One request is in flight at a time (an internal lock); a continue is split into
:meth:`RspClient.send_continue` (returns at once) and :meth:`RspClient.wait_stop` (the
stop reply, whenever it comes), so a pause can send ^C in between.

Errors: :class:`RspError` for an ``Exx`` reply, :class:`RspClosed` when the stub is gone,
:class:`RspTimeout` when a reply does not come in time.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


class RspError(Exception):
    """The stub answered ``Exx`` (or something this client cannot use)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class RspClosed(RspError):
    """The connection to the stub is closed."""


class RspTimeout(RspError):
    """No reply in time."""


@dataclass(frozen=True)
class StopReply:
    """A parsed stop reply."""

    kind: str  # "S"/"T": stopped with signal; "W": exited; "X": killed by signal
    signal: int = 0  # S/T/X: the signal; W: the exit status
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def exited(self) -> bool:
        return self.kind in ("W", "X")

    @property
    def watch(self) -> tuple[str, int] | None:
        """("write" | "read" | "access", address) for a watchpoint stop."""
        for key, access in (("watch", "write"), ("rwatch", "read"), ("awatch", "access")):
            if key in self.fields:
                return access, int(self.fields[key], 16)
        return None


_ESCAPE = {0x23, 0x24, 0x7D, 0x2A}  # '#', '$', '}', '*'


def escape_binary(data: bytes) -> bytes:
    """Escape binary data for an ``X`` packet."""
    out = bytearray()
    for b in data:
        if b in _ESCAPE:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def _checksum(payload: bytes) -> bytes:
    return b"%02x" % (sum(payload) & 0xFF)


def parse_stop(payload: bytes) -> StopReply:
    text = payload.decode("ascii", "replace")
    kind = text[:1]
    if kind not in ("S", "T", "W", "X") or len(text) < 3:
        raise RspError(f"unexpected stop reply {text!r}")
    sig = int(text[1:3], 16)
    fields: dict[str, str] = {}
    if kind == "T":
        for item in text[3:].split(";"):
            if ":" in item:
                k, v = item.split(":", 1)
                fields[k] = v
    elif kind in ("W", "X") and ";" in text:
        for item in text[3:].split(";"):
            if ":" in item:
                k, v = item.split(":", 1)
                fields[k] = v
    return StopReply(kind, sig, fields)


class RspClient:
    """One connection to a gdbstub. Create with :meth:`connect_unix` or :meth:`connect_tcp`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r = reader
        self._w = writer
        self._lock = asyncio.Lock()
        self._ack = True
        self._buf = bytearray()
        self._closed = False
        self.features: dict[str, str] = {}
        self.packet_size = 4096
        self._running = False

    # ---------------------------------------------------------------- connection
    @classmethod
    async def connect_unix(cls, path: str, limit: float = 5.0, *,
                           xml_registers: str | None = None) -> RspClient:
        """``xml_registers`` names the architecture that qSupported's ``xmlRegisters=``
        claims ("arm"; None, the default, claims nothing: right for RISC-V)."""
        r, w = await asyncio.wait_for(asyncio.open_unix_connection(path), limit)
        client = cls(r, w)
        await client._handshake(limit, xml_registers)
        return client

    @classmethod
    async def connect_tcp(cls, host: str, port: int, limit: float = 5.0, *,
                          xml_registers: str | None = None) -> RspClient:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), limit)
        sock = w.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(r, w)
        await client._handshake(limit, xml_registers)
        return client

    @staticmethod
    def supported_request(xml_registers: str | None) -> bytes:
        """The qSupported packet this client sends."""
        ours = [b"multiprocess+", b"swbreak+", b"hwbreak+"]
        if xml_registers:
            ours.append(b"xmlRegisters=" + xml_registers.encode())
        return b"qSupported:" + b";".join(ours)

    async def _handshake(self, limit: float, xml_registers: str | None = None) -> None:
        reply = await self.request(self.supported_request(xml_registers), limit=limit)
        for item in reply.decode("ascii", "replace").split(";"):
            if "=" in item:
                k, v = item.split("=", 1)
                self.features[k] = v
            elif item.endswith(("+", "-", "?")):
                self.features[item[:-1]] = item[-1]
        if "PacketSize" in self.features:
            with contextlib.suppress(ValueError):
                self.packet_size = int(self.features["PacketSize"], 16)
        if self.features.get("QStartNoAckMode") == "+":
            if await self.request(b"QStartNoAckMode", limit=limit) == b"OK":
                self._ack = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._w.close()
            await asyncio.wait_for(self._w.wait_closed(), 1.0)

    # ---------------------------------------------------------------- framing
    def _send_packet(self, payload: bytes) -> None:
        if self._closed:
            raise RspClosed("gdbstub connection closed")
        self._w.write(b"$" + payload + b"#" + _checksum(payload))

    async def _fill(self) -> None:
        chunk = await self._r.read(65536)
        if not chunk:
            self._closed = True
            raise RspClosed("gdbstub connection closed")
        self._buf += chunk

    async def _read_packet(self) -> bytes:
        """The next packet's payload (acks and stray bytes before it skipped)."""
        while True:
            start = self._buf.find(b"$")
            if start < 0:
                self._buf.clear()
                await self._fill()
                continue
            if start:
                del self._buf[:start]
            end = self._buf.find(b"#")
            if end < 0 or len(self._buf) < end + 3:
                await self._fill()
                continue
            payload = bytes(self._buf[1:end])
            csum = bytes(self._buf[end + 1 : end + 3])
            del self._buf[: end + 3]
            if self._ack:
                if csum.lower() != _checksum(payload):
                    self._w.write(b"-")
                    continue
                self._w.write(b"+")
            return _unescape_rle(payload)

    async def _exchange(self, payload: bytes) -> bytes:
        self._send_packet(payload)
        if self._ack:
            # QEMU answers '+' then the reply; a '-' means resend
            while True:
                while not self._buf:
                    await self._fill()
                c = self._buf[0]
                if c == 0x2B:  # '+'
                    del self._buf[:1]
                    break
                if c == 0x2D:  # '-'
                    del self._buf[:1]
                    self._send_packet(payload)
                    continue
                if c == 0x24:  # '$' without ack: accept
                    break
                del self._buf[:1]
        return await self._read_packet()

    async def request(self, payload: bytes, *, limit: float = 5.0) -> bytes:
        """Send one packet and return the reply payload."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._exchange(payload), limit)
            except TimeoutError:
                raise RspTimeout(f"no reply to {payload[:20]!r} in {limit} s") from None
            except (ConnectionError, OSError) as exc:
                self._closed = True
                raise RspClosed(f"gdbstub connection lost: {exc}") from None

    async def request_ok(self, payload: bytes, *, limit: float = 5.0) -> None:
        reply = await self.request(payload, limit=limit)
        if reply != b"OK":
            raise _error(payload, reply)

    # ---------------------------------------------------------------- run control
    async def send_continue(self, payload: bytes = b"c") -> None:
        """Send ``c`` (or ``s``/``vCont``) and return once the stub took it (acked);
        the stop reply comes through :meth:`wait_stop`."""
        async with self._lock:
            self._send_packet(payload)
            self._running = True
            if self._ack:
                try:
                    while True:
                        while not self._buf:
                            await asyncio.wait_for(self._fill(), 5.0)
                        c = self._buf[0]
                        if c == 0x2B:
                            del self._buf[:1]
                            break
                        if c == 0x2D:
                            del self._buf[:1]
                            self._send_packet(payload)
                            continue
                        break  # a packet already (the stop reply): leave it for wait_stop
                except TimeoutError:
                    raise RspTimeout("the stub did not acknowledge the continue") from None

    async def wait_stop(self, limit: float | None = None) -> StopReply:
        """The stop reply for the last continue/step."""
        try:
            payload = await asyncio.wait_for(self._read_packet(), limit)
        except TimeoutError:
            raise RspTimeout("no stop reply in time") from None
        except (ConnectionError, OSError) as exc:
            self._closed = True
            raise RspClosed(f"gdbstub connection lost: {exc}") from None
        self._running = False
        return parse_stop(payload)

    def interrupt(self) -> None:
        """Send ^C (0x03) out of band; the stop reply comes through wait_stop."""
        if not self._closed:
            self._w.write(b"\x03")

    async def step(self, limit: float = 5.0) -> StopReply:
        async with self._lock:
            self._send_packet(b"s")
            self._running = True
        return await self.wait_stop(limit)

    async def halt_reason(self) -> StopReply:
        return parse_stop(await self.request(b"?"))

    # ---------------------------------------------------------------- registers
    async def read_all_registers(self) -> bytes:
        reply = await self.request(b"g")
        if reply[:1] == b"E" and len(reply) == 3:
            raise _error(b"g", reply)
        return bytes.fromhex(reply.decode("ascii"))

    async def read_register(self, number: int) -> bytes:
        reply = await self.request(b"p%x" % number)
        if (reply[:1] == b"E" and len(reply) == 3) or not reply:
            raise _error(b"p", reply)
        return bytes.fromhex(reply.decode("ascii"))

    async def write_register(self, number: int, value: bytes) -> None:
        await self.request_ok(b"P%x=%s" % (number, value.hex().encode()))

    # ---------------------------------------------------------------- memory
    def _chunk(self) -> int:
        # a reply carries 2 hex digits per byte plus framing
        return max(16, min(4096, (self.packet_size - 32) // 2))

    async def read_memory(self, address: int, size: int) -> bytes:
        out = bytearray()
        step = self._chunk()
        while len(out) < size:
            n = min(step, size - len(out))
            a = address + len(out)
            reply = await self.request(b"m%x,%x" % (a, n))
            if reply[:1] == b"E" or not reply:
                raise _error(b"m", reply, address=a)
            out += bytes.fromhex(reply.decode("ascii"))
        return bytes(out)

    async def write_memory(self, address: int, data: bytes) -> None:
        step = self._chunk()
        for off in range(0, len(data), step):
            chunk = data[off : off + step]
            reply = await self.request(
                b"M%x,%x:%s" % (address + off, len(chunk), chunk.hex().encode())
            )
            if reply != b"OK":
                raise _error(b"M", reply, address=address + off)

    async def write_memory_binary(self, address: int, data: bytes) -> None:
        step = max(16, (self.packet_size - 64) // 2)  # worst case every byte escaped
        for off in range(0, len(data), step):
            chunk = data[off : off + step]
            reply = await self.request(
                b"X%x,%x:" % (address + off, len(chunk)) + escape_binary(chunk)
            )
            if reply != b"OK":
                raise _error(b"X", reply, address=address + off)

    # ---------------------------------------------------------------- break/watch
    async def insert_point(self, kind: int, address: int, length: int) -> None:
        await self.request_ok(b"Z%d,%x,%x" % (kind, address, length))

    async def remove_point(self, kind: int, address: int, length: int) -> None:
        await self.request_ok(b"z%d,%x,%x" % (kind, address, length))

    # ---------------------------------------------------------------- queries
    async def read_xfer(self, obj: str, annex: str) -> bytes:
        """``qXfer:<obj>:read:<annex>``, all chunks."""
        out = bytearray()
        while True:
            reply = await self.request(
                b"qXfer:%s:read:%s:%x,%x" % (obj.encode(), annex.encode(), len(out), 0x3F00)
            )
            if not reply or reply[:1] not in (b"m", b"l"):
                raise _error(b"qXfer", reply)
            out += reply[1:]
            if reply[:1] == b"l":
                return bytes(out)


def _unescape_rle(payload: bytes) -> bytes:
    if b"}" not in payload and b"*" not in payload:
        return payload
    out = bytearray()
    i = 0
    n = len(payload)
    while i < n:
        b = payload[i]
        if b == 0x7D and i + 1 < n:
            out.append(payload[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A and out and i + 1 < n:
            out += bytes([out[-1]]) * (payload[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def _error(request: bytes, reply: bytes, *, address: int | None = None) -> RspError:
    text = reply.decode("ascii", "replace")
    code = None
    if text[:1] == "E" and len(text) == 3:
        with contextlib.suppress(ValueError):
            code = int(text[1:], 16)
    where = f" at 0x{address:08x}" if address is not None else ""
    what = "not supported by the stub" if not reply else text
    return RspError(f"{request.decode('ascii', 'replace')}{where}: {what}", code)
