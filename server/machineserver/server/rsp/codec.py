"""The GDB remote serial protocol's wire format, for both ends of a connection: pure
functions and one incremental reader, no I/O.

Layers of a packet, outermost first (what :func:`frame` and :class:`PacketReader` deal
with, then what the two ends apply to the payload)::

    $<payload>#<two hex digits: sum of the payload's bytes mod 256>
       payload   may be run-length encoded: "x*n" = x, then x repeated ord(n) - 29 more
                 times (n is ' '..'~' except '#' and '$'); decode_rle undoes it
       data      binary data (X packets, qXfer replies) is escaped: $ # } * become
                 '}' + (byte ^ 0x20); unescape_binary undoes it, after decode_rle

Outside packets the byte stream carries acknowledgements ('+' received, '-' send it
again) until both ends agree on no-ack mode, and ^C (0x03) from the debugger to stop a
running target. Hex text (registers, memory, console output) is lower-case pairs.

Stop replies (answers to ``?``, ``c``, ``s``, ``vCont``) are :class:`StopReply`:
``S``/``T`` (stopped with a signal; ``T`` carries ``key:value;`` fields and expedited
registers ``nn:hex;``), ``W`` (exited with a status) and ``X`` (killed by a signal),
both with an optional ``;process:pid``. ``O<hex>`` packets are console output that may
come before a stop reply or a ``qRcmd`` result, and ``Exx`` is an error reply.

Malformed input raises :class:`CodecError` (a ValueError); callers decide what it means
for their connection.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

START = 0x24  # '$'
END = 0x23  # '#'
ESCAPE = 0x7D  # '}'
RUN = 0x2A  # '*'
ACK = b"+"
NAK = b"-"
INTERRUPT = b"\x03"
ESCAPED_BYTES = frozenset(b"$#}*")
ESCAPE_XOR = 0x20
RLE_BIAS = 29  # count character = extra repeats + 29
RLE_MIN_EXTRA, RLE_MAX_EXTRA = 3, 126 - RLE_BIAS  # ' ' .. '~'
_RLE_FORBIDDEN_COUNTS = frozenset((START - RLE_BIAS, END - RLE_BIAS))  # counts spelling '$' or '#'
MAX_PACKET = 1 << 20  # the reader's bound on one packet (bytes between '$' and '#')

SIGINT, SIGTRAP, SIGKILL, SIGSEGV = 2, 5, 9, 11


class CodecError(ValueError):
    """Bytes that do not follow the protocol's rules."""


# --------------------------------------------------------------------------- framing


def checksum(payload: bytes) -> int:
    """The modulo-256 sum of the payload's bytes (what follows '#', as two hex digits)."""
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cs``; the payload must already be escaped (and RLE-encoded) as needed."""
    return b"$" + payload + b"#%02x" % checksum(payload)


def escape_binary(data: bytes) -> bytes:
    """Binary data for a packet: ``$ # } *`` become ``}`` + (byte ^ 0x20)."""
    if not ESCAPED_BYTES.intersection(data):
        return bytes(data)
    out = bytearray()
    for b in data:
        if b in ESCAPED_BYTES:
            out += bytes((ESCAPE, b ^ ESCAPE_XOR))
        else:
            out.append(b)
    return bytes(out)


def unescape_binary(data: bytes) -> bytes:
    """Undo :func:`escape_binary` (run-length decoding, if any, comes first)."""
    if ESCAPE not in data:
        return bytes(data)
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESCAPE:
            nxt = next(it, None)
            if nxt is None:
                raise CodecError("binary data ends in an escape byte")
            out.append(nxt ^ ESCAPE_XOR)
        else:
            out.append(b)
    return bytes(out)


def decode_rle(payload: bytes) -> bytes:
    """Expand run-length encoding: ``x*n`` is x followed by ord(n) - 29 more x."""
    if RUN not in payload:
        return bytes(payload)
    out = bytearray()
    i, n = 0, len(payload)
    while i < n:
        b = payload[i]
        if b != RUN:
            out.append(b)
            i += 1
            continue
        if not out:
            raise CodecError("run-length marker '*' with nothing before it")
        if i + 1 >= n:
            raise CodecError("run-length marker '*' at the end of the packet")
        extra = payload[i + 1] - RLE_BIAS
        if extra < RLE_MIN_EXTRA:
            raise CodecError(f"bad run-length count byte 0x{payload[i + 1]:02x}")
        out += bytes((out[-1],)) * extra
        i += 2
    return bytes(out)


def encode_rle(payload: bytes) -> bytes:
    """Run-length encode runs of four or more equal bytes (what gdbserver does for large
    replies); :func:`decode_rle` inverts it. Works on escaped data: the escape-worthy
    bytes are never repeated, and a count never spells ``#`` or ``$``."""
    out = bytearray()
    i, n = 0, len(payload)
    while i < n:
        b = payload[i]
        j = i + 1
        while j < n and payload[j] == b:
            j += 1
        out.append(b)
        extra = j - i - 1
        if b in ESCAPED_BYTES:  # never repeat an escape or a framing byte
            out += bytes((b,)) * extra
            i = j
            continue
        while extra >= RLE_MIN_EXTRA:
            run = min(extra, RLE_MAX_EXTRA)
            while run in _RLE_FORBIDDEN_COUNTS:
                run -= 1
            out += bytes((RUN, run + RLE_BIAS))
            extra -= run
            if extra:  # the rest of a long run starts again from a literal byte
                out.append(b)
                extra -= 1
        out += bytes((b,)) * extra
        i = j
    return bytes(out)


# --------------------------------------------------------------------------- hex


def to_hex(data: bytes) -> bytes:
    """Lower-case hex pairs."""
    return data.hex().encode()


def from_hex(text: bytes, *, unavailable: int | None = None) -> bytes:
    """Bytes from hex pairs. ``xx`` (a register the stub cannot read) is refused unless
    ``unavailable`` gives the byte to put in its place."""
    if unavailable is not None and b"x" in text:
        if len(text) % 2:
            raise CodecError(f"odd-length hex {text[:40]!r}")
        pairs = (text[i : i + 2] for i in range(0, len(text), 2))
        return bytes(unavailable if p == b"xx" else _hex_byte(p) for p in pairs)
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise CodecError(f"bad hex {text[:40]!r}") from None


def _hex_byte(pair: bytes) -> int:
    try:
        return int(pair, 16)
    except ValueError:
        raise CodecError(f"bad hex pair {pair!r}") from None


def hex_int(text: bytes) -> int:
    """A big-endian hex number as in addresses, lengths and register numbers."""
    if not _is_hex(text):  # int() would also take signs, spaces, "0x" and "_"
        raise CodecError(f"bad hex number {text[:40]!r}")
    return int(text, 16)


def le_hex(value: int, size: int) -> bytes:
    """A register value as the protocol sends it: ``size`` bytes, little-endian, hex."""
    return to_hex((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))


def parse_error(reply: bytes) -> int | None:
    """The code of an ``Exx`` error reply; None when ``reply`` is not one."""
    if len(reply) == 3 and reply[:1] == b"E":
        try:
            return int(reply[1:], 16)
        except ValueError:
            return None
    return None


def error_reply(code: int) -> bytes:
    return b"E%02x" % (code & 0xFF)


# --------------------------------------------------------------------------- the reader


class EventKind(enum.StrEnum):
    PACKET = "packet"  # data: the payload (checksum verified, still RLE-encoded)
    BAD_CHECKSUM = "bad"  # data: the payload whose checksum did not match
    ACK = "ack"  # data: b"+" (received) or b"-" (send it again)
    INTERRUPT = "interrupt"  # ^C; data: b""
    NOISE = "noise"  # data: the bytes skipped


class Event(NamedTuple):
    """What :class:`PacketReader` found in the stream; compares equal to the plain
    ``(kind, data)`` tuple."""

    kind: EventKind
    data: bytes

    @property
    def nak(self) -> bool:
        return self.kind is EventKind.ACK and self.data == NAK


class PacketReader:
    """Splits a byte stream into events, incrementally: feed what arrives,
    get what it completes (an incomplete packet waits for more bytes).

    A ``$`` inside an unfinished packet starts a new packet (the old part is NOISE);
    a packet longer than ``max_packet`` is NOISE. Bytes outside packets other than
    ``+ - ^C`` are NOISE, consecutive ones reported together.
    """

    def __init__(self, *, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()
        self._scanned = 1  # how far an unfinished packet was searched for '#' and '$'

    @property
    def pending(self) -> int:
        """Bytes held back: the start of a packet not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        buf = self._buf
        events: list[Event] = []
        noise = bytearray()

        def flush_noise() -> None:
            if noise:
                events.append(Event(EventKind.NOISE, bytes(noise)))
                noise.clear()

        while buf:
            b = buf[0]
            if b in (ACK[0], NAK[0]):
                flush_noise()
                events.append(Event(EventKind.ACK, bytes((b,))))
                del buf[0]
                continue
            if b == INTERRUPT[0]:
                flush_noise()
                events.append(Event(EventKind.INTERRUPT, b""))
                del buf[0]
                continue
            if b != START:
                m = _OUTSIDE_SPECIAL.search(buf)
                cut = m.start() if m else len(buf)
                noise += buf[:cut]
                del buf[:cut]
                continue
            end = buf.find(b"#", self._scanned)
            restart = buf.find(b"$", self._scanned, end if end >= 0 else len(buf))
            if restart > 0:  # a new packet began before this one ended
                noise += buf[:restart]
                del buf[:restart]
                self._scanned = 1
                continue
            if end < 0:
                if len(buf) > self.max_packet + 1:
                    noise += buf
                    buf.clear()
                    self._scanned = 1
                else:
                    self._scanned = len(buf)
                break  # incomplete: wait for more
            if len(buf) < end + 3:
                self._scanned = end
                break  # the checksum has not arrived yet
            flush_noise()
            payload = bytes(buf[1:end])
            sent = bytes(buf[end + 1 : end + 3])
            del buf[: end + 3]
            self._scanned = 1
            try:
                ok = int(sent, 16) == checksum(payload)
            except ValueError:
                ok = False
            events.append(Event(EventKind.PACKET if ok else EventKind.BAD_CHECKSUM, payload))
        flush_noise()
        return events


_OUTSIDE_SPECIAL = re.compile(rb"[$+\-\x03]")


class Acks:
    """Ack-mode bookkeeping for one end of a connection: what to answer a packet with,
    and what to send again on a ``-`` (the last packet sent, at most ``max_resends``
    times). ``enabled`` goes False when both ends agree on no-ack mode."""

    def __init__(self, *, max_resends: int = 3) -> None:
        self.enabled = True
        self.max_resends = max_resends
        self.bad_in_a_row = 0  # consecutive packets received with a bad checksum
        self.gave_up = False  # a '-' came after max_resends resends of one packet
        self._last = b""
        self._resends = 0

    def sent(self, framed: bytes) -> None:
        """Record a packet just written (the one a ``-`` asks for)."""
        self._last = framed if self.enabled else b""
        self._resends = 0
        self.gave_up = False

    def answer(self, event: Event) -> bytes:
        """``+`` for a good packet, ``-`` for a bad checksum (nothing in no-ack mode)."""
        if event.kind is EventKind.PACKET:
            self.bad_in_a_row = 0
            return ACK if self.enabled else b""
        if event.kind is EventKind.BAD_CHECKSUM:
            self.bad_in_a_row += 1
            return NAK if self.enabled else b""
        return b""

    def received(self, event: Event) -> bytes | None:
        """For an ACK event: the packet to send again after a ``-``, or None (nothing to
        resend, or given up: see ``gave_up``); a ``+`` settles the last packet."""
        if event.kind is not EventKind.ACK or not self.enabled:
            return None
        if not event.nak:
            self._last = b""
            return None
        if not self._last:
            return None
        if self._resends >= self.max_resends:
            self.gave_up = True
            return None
        self._resends += 1
        return self._last

    @property
    def unacknowledged(self) -> bool:
        """The last packet sent has not been acknowledged yet (ack mode only)."""
        return bool(self._last)


# --------------------------------------------------------------------------- stop replies


@dataclass(frozen=True)
class StopReply:
    """A stop reply: ``S``/``T`` (stopped by ``signal``), ``W`` (exited, ``signal`` is the
    exit status) or ``X`` (killed by ``signal``).

    ``fields`` holds the named ``key:value`` pairs in their order (``thread``,
    ``watch``/``rwatch``/``awatch``, ``swbreak``, ``hwbreak``, ``core``, ``process`` for
    W/X, ...); ``registers`` the expedited registers of a ``T`` reply (number -> raw
    bytes, in target order)."""

    kind: str
    signal: int = 0
    fields: Mapping[str, str] = field(default_factory=dict)
    registers: Mapping[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("S", "T", "W", "X"):
            raise CodecError(f"no stop reply kind {self.kind!r}")

    @property
    def exited(self) -> bool:
        """The process is gone (``W`` or ``X``)."""
        return self.kind in ("W", "X")

    @property
    def exit_code(self) -> int | None:
        return self.signal if self.kind == "W" else None

    @property
    def watch(self) -> tuple[str, int] | None:
        """("write" | "read" | "access", data address) for a watchpoint stop."""
        for key, access in (("watch", "write"), ("rwatch", "read"), ("awatch", "access")):
            if key in self.fields:
                return access, hex_int(self.fields[key].encode())
        return None

    @property
    def breakpoint(self) -> str | None:
        """"software" / "hardware" when the stub says a breakpoint stopped it."""
        if "swbreak" in self.fields:
            return "software"
        if "hwbreak" in self.fields:
            return "hardware"
        return None

    @property
    def thread(self) -> str | None:
        return self.fields.get("thread")

    @property
    def process(self) -> int | None:
        value = self.fields.get("process")
        return None if value is None else hex_int(value.encode())

    def encode(self) -> bytes:
        """The payload: ``T05`` + ``nn:hex;`` registers + ``key:value;`` fields, ``S05``,
        ``W00[;process:pid]``, ``X09[;process:pid]``."""
        head = self.kind.encode() + b"%02x" % (self.signal & 0xFF)
        if self.kind == "S":
            return head
        if self.kind == "T":
            regs = b"".join(b"%02x:%s;" % (n, to_hex(v)) for n, v in self.registers.items())
            rest = b"".join(b"%s:%s;" % (k.encode(), v.encode()) for k, v in self.fields.items())
            return head + regs + rest
        return head + b"".join(b";%s:%s" % (k.encode(), v.encode()) for k, v in self.fields.items())

    @classmethod
    def parse(cls, payload: bytes) -> StopReply:
        kind = payload[:1].decode("ascii", "replace")
        if kind not in ("S", "T", "W", "X") or len(payload) < 3:
            raise CodecError(f"not a stop reply: {payload[:40]!r}")
        signal = hex_int(payload[1:3])
        fields: dict[str, str] = {}
        registers: dict[int, bytes] = {}
        rest = payload[3:]
        if kind == "S":
            if rest:
                raise CodecError(f"trailing data in {payload[:40]!r}")
        elif kind == "T":
            for item in rest.split(b";"):
                if not item:
                    continue
                key, sep, value = item.partition(b":")
                if not sep:
                    raise CodecError(f"stop reply field without ':' in {payload[:60]!r}")
                if _is_hex(key):
                    registers[int(key, 16)] = from_hex(value, unavailable=0)
                else:
                    fields[key.decode("ascii", "replace")] = value.decode("ascii", "replace")
        elif rest:
            if rest[:1] != b";":
                raise CodecError(f"trailing data in {payload[:40]!r}")
            for item in rest[1:].split(b";"):
                key, sep, value = item.partition(b":")
                if not sep:
                    raise CodecError(f"exit reply field without ':' in {payload[:40]!r}")
                fields[key.decode("ascii", "replace")] = value.decode("ascii", "replace")
        return cls(kind, signal, fields, registers)


def _is_hex(text: bytes) -> bool:
    return bool(text) and all(c in b"0123456789abcdefABCDEF" for c in text)


def stopped_reply(signal: int, *, registers: Mapping[int, bytes] | None = None,
            fields: Iterable[tuple[str, str]] = ()) -> bytes:
    """A ``T`` stop reply payload (``S`` when there is nothing to add)."""
    extra = dict(fields)
    if not registers and not extra:
        return StopReply("S", signal).encode()
    return StopReply("T", signal, extra, dict(registers or {})).encode()


def exited_reply(status: int, *, process: int | None = None) -> bytes:
    """A ``W`` reply payload."""
    return StopReply("W", status, {} if process is None else {"process": f"{process:x}"}).encode()


def killed_reply(signal: int, *, process: int | None = None) -> bytes:
    """An ``X`` reply payload."""
    return StopReply("X", signal, {} if process is None else {"process": f"{process:x}"}).encode()


def console_reply(text: bytes | str) -> bytes:
    """An ``O`` packet payload carrying console text."""
    raw = text.encode() if isinstance(text, str) else text
    return b"O" + to_hex(raw)


def parse_console_output(payload: bytes) -> bytes | None:
    """The text of an ``O`` packet; None when the payload is not one (``OK`` is not)."""
    if payload[:1] != b"O" or payload == b"OK":
        return None
    return from_hex(payload[1:])


# --------------------------------------------------------------------------- qCRC


def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else (c << 1)
        table.append(c & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def gdb_crc32(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """The CRC a ``qCRC:addr,length`` reply carries (``C<crc>``): CRC-32 with polynomial
    0x04C11DB7, not reflected, seeded with all ones, no final inversion (CRC-32/MPEG-2)."""
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[((crc >> 24) ^ b) & 0xFF]
    return crc
