"""The RSP codec: framing, escaping, run-length coding, hex, the incremental reader, ack
bookkeeping, stop replies, console output and the qCRC checksum."""

from __future__ import annotations

import random

import pytest

from machineserver.server.rsp import codec
from machineserver.server.rsp.codec import (
    Acks,
    CodecError,
    Event,
    EventKind,
    PacketReader,
    StopReply,
)

RNG_SEED = 20261201


def _random_blobs(count: int) -> list[bytes]:
    rng = random.Random(RNG_SEED)
    blobs = [b"", bytes(range(256)), b"$#}*" * 20, b"\x00" * 300, b"}" * 9]
    for _ in range(count):
        # runs and framing bytes are what the coders get wrong: make them common
        alphabet = rng.choice([b"$#}*+-\x03ab", bytes(range(256)), b"0f"])
        out = bytearray()
        while len(out) < rng.randrange(0, 400):
            out += bytes((rng.choice(alphabet),)) * rng.choice((1, 1, 2, 4, 7, 8, 40, 130))
        blobs.append(bytes(out))
    return blobs


# --------------------------------------------------------------------------- framing


def test_checksum_and_frame() -> None:
    assert codec.checksum(b"") == 0
    assert codec.checksum(b"OK") == 0x9A
    assert codec.frame(b"OK") == b"$OK#9a"
    assert codec.frame(b"") == b"$#00"
    assert codec.frame(b"\xff\xff") == b"$\xff\xff#fe"  # mod 256


def test_binary_escaping_round_trips_every_byte() -> None:
    data = bytes(range(256))
    escaped = codec.escape_binary(data)
    for framing in b"$#*":
        assert framing not in escaped
    assert escaped.count(b"}") == 4  # one escape per $ # } *
    assert codec.escape_binary(b"a$b") == b"a}\x04b"
    assert codec.escape_binary(b"}") == b"}]"
    assert codec.unescape_binary(escaped) == data
    for blob in _random_blobs(200):
        assert codec.unescape_binary(codec.escape_binary(blob)) == blob


def test_unescape_refuses_a_dangling_escape() -> None:
    with pytest.raises(CodecError, match="escape"):
        codec.unescape_binary(b"abc}")


# --------------------------------------------------------------------------- run-length coding


def test_rle_decoding_follows_the_gdb_manual() -> None:
    # "0* " is "0000": the count byte ' ' (32) means 32 - 29 = 3 more
    assert codec.decode_rle(b"0* ") == b"0000"
    assert codec.decode_rle(b"x*!y") == b"xxxxxy"
    assert codec.decode_rle(b"ab*~") == b"a" + b"b" * 98
    assert codec.decode_rle(b"no runs") == b"no runs"


@pytest.mark.parametrize("bad", [b"*  ", b"ab*", b"a*\x10"])
def test_rle_decoding_refuses_malformed_runs(bad: bytes) -> None:
    with pytest.raises(CodecError):
        codec.decode_rle(bad)


def test_rle_encoding_round_trips_and_never_spells_framing_bytes() -> None:
    assert codec.encode_rle(b"0000") == b"0* "
    assert codec.encode_rle(b"000") == b"000"  # too short to pay off
    # 7 zeros would need count '$' (6 more), 8 zeros '#' (7 more): both avoided
    for n in (7, 8):
        encoded = codec.encode_rle(b"0" * n)
        assert b"$" not in encoded and b"#" not in encoded
        assert codec.decode_rle(encoded) == b"0" * n
    long_run = codec.encode_rle(b"0" * 1000)
    assert len(long_run) < 40
    assert codec.decode_rle(long_run) == b"0" * 1000
    for blob in _random_blobs(300):
        escaped = codec.escape_binary(blob)
        encoded = codec.encode_rle(escaped)
        assert b"$" not in encoded and b"#" not in encoded
        assert codec.decode_rle(encoded) == escaped
        assert codec.unescape_binary(codec.decode_rle(encoded)) == blob


def test_binary_data_survives_the_whole_wire_path() -> None:
    """escape -> RLE -> frame -> reader (in odd-sized pieces) -> RLE decode -> unescape."""
    blobs = _random_blobs(60)
    wire = b"".join(codec.frame(codec.encode_rle(codec.escape_binary(b))) for b in blobs)
    reader = PacketReader()
    events: list[Event] = []
    rng = random.Random(RNG_SEED)
    i = 0
    while i < len(wire):
        n = rng.randrange(1, 50)
        events += reader.feed(wire[i : i + n])
        i += n
    assert [e.kind for e in events] == [EventKind.PACKET] * len(blobs)
    assert [codec.unescape_binary(codec.decode_rle(e.data)) for e in events] == blobs
    assert reader.pending == 0


# --------------------------------------------------------------------------- hex


def test_hex_helpers() -> None:
    assert codec.to_hex(b"\x01\xab") == b"01ab"
    assert codec.from_hex(b"01AB") == b"\x01\xab"
    assert codec.hex_int(b"20000000") == 0x20000000
    assert codec.le_hex(0x12345678, 4) == b"78563412"
    assert codec.le_hex(-1, 2) == b"ffff"
    assert codec.from_hex(b"01xx03", unavailable=0) == b"\x01\x00\x03"
    for bad in (b"0", b"zz", b"01xx"):
        with pytest.raises(CodecError):
            codec.from_hex(bad)
    for bad in (b"", b"-1", b"0x10", b"g"):
        with pytest.raises(CodecError):
            codec.hex_int(bad)


def test_error_replies() -> None:
    assert codec.parse_error(b"E01") == 1
    assert codec.parse_error(b"Eff") == 255
    assert codec.parse_error(codec.error_reply(0x16)) == 0x16
    for not_error in (b"OK", b"E", b"E1", b"E123", b"Ezz", b"", b"00"):
        assert codec.parse_error(not_error) is None


# --------------------------------------------------------------------------- the reader


def test_reader_events_compare_as_plain_tuples() -> None:
    reader = PacketReader()
    assert reader.feed(b"+$O") == [("ack", b"+")]
    assert reader.pending == 2
    assert reader.feed(b"K#9a\x03$OK#00-") == [
        ("packet", b"OK"), ("interrupt", b""), ("bad", b"OK"), ("ack", b"-")]
    nak = Event(EventKind.ACK, b"-")
    assert nak.nak and not Event(EventKind.ACK, b"+").nak


def test_reader_byte_at_a_time() -> None:
    wire = codec.frame(b"m20000000,4") + b"+" + codec.frame(b"T05thread:1;")
    reader = PacketReader()
    events = [e for b in wire for e in reader.feed(bytes((b,)))]
    assert events == [("packet", b"m20000000,4"), ("ack", b"+"), ("packet", b"T05thread:1;")]


def test_reader_reports_noise_and_restarts_on_a_new_packet() -> None:
    reader = PacketReader()
    assert reader.feed(b"hello$OK#9a") == [("noise", b"hello"), ("packet", b"OK")]
    # a '$' inside an unfinished packet: the first one was cut short
    assert reader.feed(b"$trunc") == []
    assert reader.feed(b"ated$OK#9a") == [("noise", b"$truncated"), ("packet", b"OK")]
    # a checksum that is not hex is a bad checksum
    assert reader.feed(b"$OK#zz") == [("bad", b"OK")]
    # data inside a packet is data: ^C, '+' and '-' included
    assert reader.feed(codec.frame(b"X0,3:\x03+-")) == [("packet", b"X0,3:\x03+-")]


def test_reader_bounds_a_packet_that_never_ends() -> None:
    reader = PacketReader(max_packet=64)
    assert reader.feed(b"$" + b"a" * 40) == []
    events = reader.feed(b"a" * 40)
    assert events == [("noise", b"$" + b"a" * 80)]
    assert reader.pending == 0
    assert reader.feed(b"$OK#9a") == [("packet", b"OK")]


# --------------------------------------------------------------------------- acks


def test_acks_answer_and_resend_a_bounded_number_of_times() -> None:
    acks = Acks(max_resends=2)
    good, bad = Event(EventKind.PACKET, b"OK"), Event(EventKind.BAD_CHECKSUM, b"OK")
    plus, minus = Event(EventKind.ACK, b"+"), Event(EventKind.ACK, b"-")
    assert acks.answer(good) == b"+" and acks.answer(bad) == b"-"
    assert acks.bad_in_a_row == 1
    assert acks.answer(good) == b"+" and acks.bad_in_a_row == 0
    assert acks.received(minus) is None  # nothing sent yet
    acks.sent(b"$g#67")
    assert acks.unacknowledged
    assert acks.received(minus) == b"$g#67"
    assert acks.received(minus) == b"$g#67"
    assert acks.received(minus) is None and acks.gave_up
    acks.sent(b"$?#3f")
    assert not acks.gave_up
    assert acks.received(plus) is None and not acks.unacknowledged
    assert acks.received(minus) is None  # settled: nothing to send again
    acks.enabled = False  # no-ack mode: no answers, nothing kept
    assert acks.answer(good) == b"" and acks.answer(bad) == b""
    acks.sent(b"$g#67")
    assert not acks.unacknowledged and acks.received(minus) is None


# --------------------------------------------------------------------------- stop replies


def test_parse_signal_and_t_stop_replies() -> None:
    s = StopReply.parse(b"S05")
    assert (s.kind, s.signal, s.exited, dict(s.fields)) == ("S", 5, False, {})
    t = StopReply.parse(b"T05thread:p01.01;0f:00010000;0d:f0ff0320;swbreak:;core:0;")
    assert t.signal == 5 and t.thread == "p01.01"
    assert t.registers == {15: b"\x00\x01\x00\x00", 13: b"\xf0\xff\x03\x20"}
    assert t.breakpoint == "software" and t.watch is None and not t.exited
    assert StopReply.parse(b"T05hwbreak:;").breakpoint == "hardware"
    assert StopReply.parse(b"T05watch:20000010;").watch == ("write", 0x20000010)
    assert StopReply.parse(b"T05rwatch:2000001c;").watch == ("read", 0x2000001C)
    assert StopReply.parse(b"T05awatch:20000020;").watch == ("access", 0x20000020)
    assert StopReply.parse(b"T0201:xxxxxxxx;").registers == {1: b"\x00" * 4}


def test_parse_exit_replies() -> None:
    w = StopReply.parse(b"W00")
    assert w.exited and w.exit_code == 0 and w.process is None
    w3 = StopReply.parse(b"W03;process:1a")
    assert w3.exit_code == 3 and w3.process == 0x1A
    x = StopReply.parse(b"X09;process:2")
    assert x.exited and x.exit_code is None and x.signal == 9 and x.process == 2


@pytest.mark.parametrize("bad", [b"", b"T", b"T5", b"Tzz", b"OK", b"E01", b"S05x", b"T05thread",
                                 b"W00process:1", b"W00;process"])
def test_malformed_stop_replies_are_refused(bad: bytes) -> None:
    with pytest.raises(CodecError):
        StopReply.parse(bad)


def test_stop_reply_builders_round_trip() -> None:
    regs = {15: codec.from_hex(codec.le_hex(0x1A4, 4)), 0: b"\x01\x00\x00\x00"}
    built = codec.stopped_reply(5, registers=regs, fields=[("swbreak", ""), ("thread", "1")])
    assert built == b"T050f:a4010000;00:01000000;swbreak:;thread:1;"
    back = StopReply.parse(built)
    assert back.registers == regs and back.breakpoint == "software" and back.thread == "1"
    assert codec.stopped_reply(2) == b"S02"
    assert codec.stopped_reply(5, fields=[("watch", "20000000")]) == b"T05watch:20000000;"
    assert codec.exited_reply(0) == b"W00"
    assert codec.exited_reply(0x103, process=0x2A) == b"W03;process:2a"  # status is 8 bits
    assert codec.killed_reply(9) == b"X09"
    for payload in (b"S05", b"T05thread:1;", b"W07", b"X0b;process:1", built):
        assert StopReply.parse(payload).encode() == payload
    with pytest.raises(CodecError):
        StopReply("Q")


def test_console_output_packets() -> None:
    assert codec.console_reply("hi\n") == b"O68690a"
    assert codec.parse_console_output(b"O68690a") == b"hi\n"
    assert codec.parse_console_output(b"OK") is None  # the end of a qRcmd, not output
    assert codec.parse_console_output(b"T05") is None
    with pytest.raises(CodecError):
        codec.parse_console_output(b"Ozz")


# --------------------------------------------------------------------------- qCRC


def _crc_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def test_gdb_crc32() -> None:
    assert codec.gdb_crc32(b"123456789") == 0x0376E6E7  # the CRC-32/MPEG-2 check value
    assert codec.gdb_crc32(b"") == 0xFFFFFFFF
    for blob in _random_blobs(30):
        assert codec.gdb_crc32(blob) == _crc_bitwise(blob)
    # it continues across pieces
    assert codec.gdb_crc32(b"6789", codec.gdb_crc32(b"12345")) == 0x0376E6E7
