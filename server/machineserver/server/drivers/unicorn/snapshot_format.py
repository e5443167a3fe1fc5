"""The Unicorn machine snapshot format: pure encoding and decoding, bounded by the board.

A snapshot is registers + memory + peripheral state, never a pickled Unicorn context
(restoring one into another ``Uc`` aborts the process on 2.1.4). Version 2, written since
snapshots became incremental::

    b"MSUCSNAP" | version: u16 LE = 2 | header length: u32 LE | header JSON
              | page table | packed pages | packed image segments

* The header JSON holds ``version``, ``board``, ``arch``, ``regs`` (name -> value),
  ``core`` (the arch core's peripheral state), ``uarts`` (peripheral name -> state),
  ``instructions``, ``cycles``, ``exact``, ``regions`` ([name, base, size] of each memory
  region), ``page_size`` (4096), ``pages`` (how many pages each region stores) and
  ``image`` (null, or ``entry``, ``arch`` and ``segments`` as [address, length, stored
  length]).
* Memory is sparse: a region is cut into pages of ``page_size`` bytes from its base (the
  last one may be shorter) and only pages that are not all zero are stored. The page
  table has, region after region, one ``u32 page number, u32 stored length`` pair (LE)
  per stored page, page numbers strictly increasing.
* A *packed* page or image segment is one codec byte and the data: ``0`` raw, ``1``
  zlib. Each page is packed on its own, so a machine that snapshots again packs only the
  pages written since (see :mod:`.snapshot_pages`), and a blob stays self-contained for
  export, import and restore into any session of the same board.

Decoding never trusts a size it has not checked against the blob and the board: the
header is bounded, every page number must lie in its region, a stored page is at most one
codec byte more than a page, and packed data is only unpacked (to exactly the size the
board allows) when it is written into a machine. Version 1 (one zlib stream of header,
whole regions and image) is still read, inflated piece by piece against the sizes its
header declares and the board allows (never as a whole).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from machineserver.server.drivers.base import Arch, BadRequest, BoardSpec
from machineserver.server.drivers.unicorn.arch import JsonState

MAGIC = b"MSUCSNAP"
VERSION = 2
READS = (1, 2)
PAGE = 4096
RAW, ZLIB = 0, 1  # codec bytes of packed data
ZLIB_LEVEL = 1
MAX_HEADER = 4 << 20  # registers and peripheral state are a few KiB
U64 = 1 << 64

Region = tuple[str, int, int]  # (name, base, size)
Pages = dict[int, bytes]  # page number in its region -> packed page; all-zero pages absent
_PREFIX = struct.Struct("<8sHI")  # magic, version, header length
_PAIR = struct.Struct("<II")


class Corrupt(ValueError):
    """Packed data that does not unpack to what it claims."""


@dataclass(frozen=True)
class PackedSegment:
    address: int
    length: int  # bytes once unpacked
    packed: bytes


@dataclass(frozen=True)
class PackedImage:
    """The loaded program (what reset() loads again), its segments packed."""

    segments: tuple[PackedSegment, ...]
    entry: int | None
    arch: Arch | None


@dataclass(frozen=True)
class MachineSnapshot:
    board: str
    arch: str
    regs: dict[str, int]
    core: JsonState
    uarts: dict[str, JsonState]
    instructions: int
    cycles: int
    exact: bool
    regions: tuple[Region, ...]
    pages: tuple[Pages, ...]  # one per region
    image: PackedImage | None


def board_regions(board: BoardSpec) -> tuple[Region, ...]:
    return tuple((r.name, r.base, r.size) for r in board.memory)


def page_count(size: int) -> int:
    return (size + PAGE - 1) // PAGE


def pack(data: bytes) -> bytes:
    """``data`` packed: zlib when that is smaller, raw otherwise."""
    squeezed = zlib.compress(data, ZLIB_LEVEL)
    return bytes((ZLIB,)) + squeezed if len(squeezed) < len(data) else bytes((RAW,)) + data


def unpack(packed: bytes, size: int) -> bytes:
    """The ``size`` bytes ``packed`` holds; Corrupt when it holds anything else (never
    unpacks more than ``size`` + 1 bytes)."""
    if not packed:
        raise Corrupt("empty packed data")
    codec, body = packed[0], memoryview(packed)[1:]
    if codec == RAW:
        data = bytes(body)
    elif codec == ZLIB:
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(body, size + 1)
        except zlib.error as exc:
            raise Corrupt(f"bad zlib data ({exc})") from None
        if not inflater.eof or inflater.unused_data:
            raise Corrupt("zlib data that does not end where it should")
    else:
        raise Corrupt(f"unknown codec {codec}")
    if len(data) != size:
        raise Corrupt(f"{len(data)} bytes where {size} were expected")
    return data


# --------------------------------------------------------------------------- encoding


def encode(snap: MachineSnapshot) -> bytes:
    """The blob of ``snap`` (the same snapshot always gives the same bytes)."""
    image = snap.image
    order = [sorted(pages) for pages in snap.pages]
    header = {
        "version": VERSION,
        "board": snap.board,
        "arch": snap.arch,
        "regs": snap.regs,
        "core": snap.core,
        "uarts": snap.uarts,
        "instructions": snap.instructions,
        "cycles": snap.cycles,
        "exact": snap.exact,
        "regions": [list(r) for r in snap.regions],
        "page_size": PAGE,
        "pages": [len(numbers) for numbers in order],
        "image": None if image is None else {
            "entry": image.entry,
            "arch": image.arch.value if image.arch else None,
            "segments": [[s.address, s.length, len(s.packed)] for s in image.segments],
        },
    }
    hjson = json.dumps(header, separators=(",", ":")).encode()
    table: list[int] = []
    data: list[bytes] = []
    for pages, numbers in zip(snap.pages, order, strict=True):
        for n in numbers:
            packed = pages[n]
            table += (n, len(packed))
            data.append(packed)
    if image is not None:
        data += (s.packed for s in image.segments)
    return b"".join((_PREFIX.pack(MAGIC, VERSION, len(hjson)), hjson,
                     struct.pack(f"<{len(table)}I", *table), *data))


# --------------------------------------------------------------------------- decoding


def _corrupt(why: str) -> BadRequest:
    return BadRequest(f"corrupt snapshot: {why}", field="snapshot")


def version_of(blob: bytes) -> int | None:
    """The format version a blob claims; None when it is not a Unicorn machine snapshot."""
    if len(blob) < len(MAGIC) + 2 or not blob.startswith(MAGIC):
        return None
    return int(struct.unpack_from("<H", blob, len(MAGIC))[0])


def decode(blob: bytes, board: BoardSpec) -> MachineSnapshot:
    """The snapshot in ``blob`` for a machine of ``board``: BadRequest(field="snapshot")
    for anything that is not a complete Unicorn machine snapshot of a version this reads,
    or not one of this board. Allocates no more than the blob's size plus what the board
    bounds (version 1, inflated piece by piece)."""
    blob = bytes(blob)
    version = version_of(blob)
    if version is None:
        raise BadRequest("not a Unicorn machine snapshot", field="snapshot")
    if version not in READS:
        raise BadRequest(f"snapshot format version {version} is not supported "
                         f"(this server reads {', '.join(map(str, READS))})", field="snapshot")
    try:
        snap = _decode_v1(blob, board) if version == 1 else _decode_v2(blob, board)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError,
            struct.error) as exc:
        raise _corrupt(f"{exc!r}") from None
    check_fits(snap, board)
    return snap


def _decode_v2(blob: bytes, board: BoardSpec) -> MachineSnapshot:
    if len(blob) < _PREFIX.size:
        raise ValueError("truncated before its header")
    _, _, hlen = _PREFIX.unpack_from(blob, 0)
    pos = _PREFIX.size
    if hlen > MAX_HEADER or pos + hlen > len(blob):
        raise ValueError(f"a header of {hlen} bytes in a blob of {len(blob)}")
    header = json.loads(blob[pos:pos + hlen])
    pos += hlen
    if header["page_size"] != PAGE:
        raise ValueError(f"page size {header['page_size']}")
    regions = _regions(header, board)
    counts = [strict_int(c, "a page count") for c in header["pages"]]
    if len(counts) != len(regions):
        raise ValueError("a page count per region expected")
    for count, (name, _, size) in zip(counts, regions, strict=True):
        if not 0 <= count <= page_count(size):
            raise ValueError(f"{count} pages in region {name} of {page_count(size)}")
    pairs = sum(counts)
    if pos + pairs * _PAIR.size > len(blob):
        raise ValueError("truncated page table")
    table = struct.unpack_from(f"<{2 * pairs}I", blob, pos)
    pos += pairs * _PAIR.size
    pages: list[Pages] = []
    i = 0
    for count, (name, _, size) in zip(counts, regions, strict=True):
        region_pages: Pages = {}
        last = -1
        for _ in range(count):
            n, stored = table[i], table[i + 1]
            i += 2
            if not last < n < page_count(size):
                raise ValueError(f"page {n} of region {name} out of order or outside it")
            if not 1 <= stored <= PAGE + 1 or pos + stored > len(blob):
                raise ValueError(f"page {n} of region {name} claims {stored} bytes")
            region_pages[n] = blob[pos:pos + stored]
            pos += stored
            last = n
        pages.append(region_pages)
    image, pos = _image_v2(header["image"], blob, pos)
    if pos != len(blob):
        raise ValueError(f"{len(blob) - pos} bytes after the last segment")
    return _snapshot(header, regions, tuple(pages), image)


def _regions(header: Any, board: BoardSpec) -> tuple[Region, ...]:
    """The header's memory regions, which must be the board's (checked before anything
    is sized from them)."""
    if str(header["board"]) != board.name or str(header["arch"]) != board.arch.value:
        raise BadRequest(f"the snapshot is of board {header['board']} ({header['arch']}), this "
                         f"machine is {board.name}", field="snapshot")
    regions = tuple((str(name), strict_int(base, "a region's base"), strict_int(size, "a region's size"))
                    for name, base, size in header["regions"])
    if regions != board_regions(board):
        raise BadRequest("the snapshot's memory map differs from the board's", field="snapshot")
    return regions


def _image_v2(img: Any, blob: bytes, pos: int) -> tuple[PackedImage | None, int]:
    if img is None:
        return None, pos
    segments = []
    for address, length, stored in img["segments"]:
        address, length, stored = (strict_int(address, "an image segment's address"),
                                   strict_int(length, "an image segment's length"),
                                   strict_int(stored, "an image segment's stored length"))
        if length < 0 or not 1 <= stored <= length + 1 or pos + stored > len(blob):
            raise ValueError(f"image segment at 0x{address:08x} claims {stored} bytes for {length}")
        segments.append(PackedSegment(address, length, blob[pos:pos + stored]))
        pos += stored
    return _image(img, tuple(segments)), pos


def _image(img: Any, segments: tuple[PackedSegment, ...]) -> PackedImage:
    entry = img["entry"]
    return PackedImage(segments, None if entry is None else strict_int(entry, "the image's entry"),
                       Arch(img["arch"]) if img["arch"] else None)


def strict_int(value: Any, what: str, low: int = 0, high: int = U64) -> int:
    """``value`` when it is an int (not a bool, a float or a string) in [low, high)."""
    if type(value) is not int or not low <= value < high:
        raise ValueError(f"{what} is {str(value)[:40]!r}, not an integer in [{low}, {high})")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _snapshot(header: Any, regions: tuple[Region, ...], pages: tuple[Pages, ...],
              image: PackedImage | None) -> MachineSnapshot:
    exact = header["exact"]
    if not isinstance(exact, bool):
        raise ValueError("exact is not a boolean")
    return MachineSnapshot(
        board=str(header["board"]), arch=str(header["arch"]),
        regs={str(k): strict_int(v, f"register {str(k)[:20]}") for k, v in _dict(header["regs"], "regs").items()},
        core=dict(_dict(header["core"], "core")),
        uarts={str(k): dict(_dict(v, f"uart {str(k)[:20]}")) for k, v in _dict(header["uarts"], "uarts").items()},
        instructions=strict_int(header["instructions"], "instructions"),
        cycles=strict_int(header["cycles"], "cycles"),
        exact=exact, regions=regions, pages=pages, image=image)


class _Inflated:
    """A zlib stream read in exact pieces, never inflating much more than asked for."""

    STEP = 64 * 1024

    def __init__(self, data: bytes) -> None:
        self._z = zlib.decompressobj()
        self._pending = data
        self._buf = b""
        self._off = 0  # what of _buf was read

    def read(self, n: int) -> bytes:
        if len(self._buf) - self._off < n:
            parts = [self._buf[self._off:]]
            have = len(parts[0])
            while have < n:
                if self._z.eof:
                    raise ValueError("less data than the header declares")
                try:
                    out = self._z.decompress(self._pending, max(n - have, self.STEP))
                except zlib.error as exc:
                    raise ValueError(f"bad zlib data ({exc})") from None
                self._pending = self._z.unconsumed_tail
                if not out and not self._pending and not self._z.eof:
                    raise ValueError("truncated zlib data")
                parts.append(out)
                have += len(out)
            self._buf, self._off = b"".join(parts), 0
        data = self._buf[self._off:self._off + n]
        self._off += n
        return data

    def end(self) -> None:
        if self._off < len(self._buf):
            raise ValueError("more data than the header declares")
        if not self._z.eof:
            try:
                extra = self._z.decompress(self._pending, 1)
            except zlib.error as exc:
                raise ValueError(f"bad zlib data ({exc})") from None
            if extra or not self._z.eof:
                raise ValueError("more data than the header declares, or a truncated stream")
        if self._z.unused_data:
            raise ValueError("bytes after the zlib stream")


def _decode_v1(blob: bytes, board: BoardSpec) -> MachineSnapshot:
    """Version 1: zlib(header length u32 | header JSON | every region | image data).
    Inflated piece by piece against the sizes the header declares (and the board
    allows), never as a whole: all-zero pages are dropped and the others packed as they
    come, so a stream that inflates far beyond its size costs no more than its pages."""
    stream = _Inflated(blob[len(MAGIC) + 2:])
    (hlen,) = struct.unpack("<I", stream.read(4))
    if hlen > MAX_HEADER:
        raise ValueError(f"a header of {hlen} bytes")
    header = json.loads(stream.read(hlen))
    regions = _regions(header, board)
    pages: list[Pages] = []
    zero = bytes(PAGE)
    for _, _, size in regions:
        region_pages: Pages = {}
        for n in range(page_count(size)):
            chunk = stream.read(min(PAGE, size - n * PAGE))
            if not zero.startswith(chunk):
                region_pages[n] = pack(chunk)
        pages.append(region_pages)
    image = None
    img = header["image"]
    if img is not None:
        segments = []
        for address, length in img["segments"]:
            address, length = strict_int(address, "an image segment's address"), strict_int(length, "its length")
            if length and board.region_at(address, length) is None:
                raise ValueError(f"an image segment at 0x{address:08x} of {length} bytes outside the board's memory")
            segments.append(PackedSegment(address, length, pack(stream.read(length))))
        image = _image(img, tuple(segments))
    stream.end()
    return _snapshot(header, regions, tuple(pages), image)


def check_fits(snap: MachineSnapshot, board: BoardSpec) -> None:
    """BadRequest(field="snapshot") unless the snapshot is of this board."""
    if snap.board != board.name or snap.arch != board.arch.value:
        raise BadRequest(f"the snapshot is of board {snap.board} ({snap.arch}), this machine is "
                         f"{board.name}", field="snapshot")
    if snap.regions != board_regions(board):
        raise BadRequest("the snapshot's memory map differs from the board's", field="snapshot")
    for seg in snap.image.segments if snap.image else ():
        if seg.length and board.region_at(seg.address, seg.length) is None:
            raise _corrupt(f"its image has a segment at 0x{seg.address:08x} outside the board's memory")
