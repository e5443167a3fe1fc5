"""The Unicorn machine snapshot format, version 1: pure encoding and decoding.

A snapshot is registers + memory + peripheral state, never a pickled Unicorn context
(restoring one into another ``Uc`` aborts the process on 2.1.4)::

    b"MSUCSNAP" | version: u16 LE | zlib( header length: u32 LE | header JSON | memory | image )

The header JSON holds ``version``, ``board``, ``arch``, ``regs`` (name -> value), ``core``
(the arch core's peripheral state), ``uarts`` (peripheral name -> state), ``instructions``,
``cycles``, ``exact``, ``regions`` ([name, base, size] of each memory region) and ``image``
(null, or ``entry``, ``arch`` and ``segments`` as [address, length]). After it come the
bytes of every region, in the header's order, then the data of every image segment.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from machineserver.server.drivers.base import Arch, BadRequest, BoardSpec, ProgramImage, Segment
from machineserver.server.drivers.unicorn.arch import JsonState

MAGIC = b"MSUCSNAP"
VERSION = 1

Region = tuple[str, int, int]  # (name, base, size)


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
    memory: tuple[bytes, ...]  # one per region
    image: ProgramImage | None


def board_regions(board: BoardSpec) -> tuple[Region, ...]:
    return tuple((r.name, r.base, r.size) for r in board.memory)


def encode(snap: MachineSnapshot) -> bytes:
    image = snap.image
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
        "image": None if image is None else {
            "entry": image.entry,
            "arch": image.arch.value if image.arch else None,
            "segments": [[s.address, len(s.data)] for s in image.segments],
        },
    }
    hjson = json.dumps(header, separators=(",", ":")).encode()
    parts = [*snap.memory, *(s.data for s in image.segments)] if image else list(snap.memory)
    payload = struct.pack("<I", len(hjson)) + hjson + b"".join(parts)
    return MAGIC + struct.pack("<H", VERSION) + zlib.compress(payload, 1)


def _corrupt(why: str) -> BadRequest:
    return BadRequest(f"corrupt snapshot: {why}", field="snapshot")


def decode(blob: bytes) -> MachineSnapshot:
    """The snapshot in ``blob``; BadRequest(field="snapshot") for anything that is not a
    complete Unicorn machine snapshot of this version."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 2:
        raise BadRequest("not a Unicorn machine snapshot", field="snapshot")
    (version,) = struct.unpack_from("<H", blob, len(MAGIC))
    if version != VERSION:
        raise BadRequest(f"snapshot format version {version} is not supported "
                         f"(this server reads {VERSION})", field="snapshot")
    try:
        payload = zlib.decompress(blob[len(MAGIC) + 2:])
        (hlen,) = struct.unpack_from("<I", payload, 0)
        header = json.loads(payload[4:4 + hlen])
    except (zlib.error, struct.error, ValueError) as exc:
        raise _corrupt(str(exc)) from None
    try:
        return _from_header(header, payload, 4 + hlen)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(f"bad header ({exc!r})") from None


def _from_header(header: Any, payload: bytes, pos: int) -> MachineSnapshot:
    regions = tuple((str(name), int(base), int(size)) for name, base, size in header["regions"])
    memory = []
    for _, _, size in regions:
        memory.append(payload[pos:pos + size])
        pos += size
    image = None
    img = header["image"]
    if img is not None:
        segs = []
        for address, length in img["segments"]:
            segs.append(Segment(int(address), payload[pos:pos + int(length)]))
            pos += int(length)
        entry = img["entry"]
        image = ProgramImage(tuple(segs), None if entry is None else int(entry),
                             Arch(img["arch"]) if img["arch"] else None)
    if pos != len(payload):
        raise ValueError(f"{len(payload) - pos:+d} bytes of memory against the header")
    return MachineSnapshot(
        board=str(header["board"]), arch=str(header["arch"]),
        regs={str(k): int(v) for k, v in header["regs"].items()},
        core=dict(header["core"]),
        uarts={str(k): dict(v) for k, v in header["uarts"].items()},
        instructions=int(header["instructions"]), cycles=int(header["cycles"]),
        exact=bool(header["exact"]), regions=regions, memory=tuple(memory), image=image)


def check_fits(snap: MachineSnapshot, board: BoardSpec) -> None:
    """BadRequest(field="snapshot") unless the snapshot is of this board."""
    if snap.board != board.name or snap.arch != board.arch.value:
        raise BadRequest(f"the snapshot is of board {snap.board} ({snap.arch}), this machine is "
                         f"{board.name}", field="snapshot")
    if snap.regions != board_regions(board):
        raise BadRequest("the snapshot's memory map differs from the board's", field="snapshot")
    for seg in snap.image.segments if snap.image else ():
        if seg.data and board.region_at(seg.address, len(seg.data)) is None:
            raise _corrupt(f"its image has a segment at 0x{seg.address:08x} outside the board's memory")
