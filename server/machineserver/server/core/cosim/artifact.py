"""The coordinated-snapshot artifact: one self-contained byte string holding every
member's machine state and the co-simulation's own state at a barrier.

Layout: ``MAGIC``, a 4-byte little-endian manifest length, the manifest (JSON, UTF-8),
then each member's state blob, in member order, each as an 8-byte length and the bytes.
The manifest names the shape (each member's board and backend), the virtual time, the
quanta, each member's cycles since the co-simulation's time 0, the link state, the
inputs waiting for the next quantum, the quantum a halt cut (its barrier's time, what the
members transmitted in it so far, which serial bytes they took), if any, and each blob's
sha256. Parsing checks all of it: an artifact is client data on import.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from machineserver.server.core.errors import InvalidArgument
from machineserver.server.drivers.base import BarrierInput, Segment
from machineserver.server.lockstep.links import LinkState
from machineserver.server.lockstep.runner import MidQuantum

MAGIC = b"MSCOSIM\x01"
FORMAT_VERSION = 1
MAX_MANIFEST = 64 << 20
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Artifact:
    shape: tuple[str, ...]  # "board/backend" per member
    time_ref: int
    quanta: int
    since_origin: tuple[int, ...]  # per member: cycles run since time 0
    link_state: dict[str, Any]
    inputs: tuple[BarrierInput, ...]
    blobs: tuple[bytes, ...]
    mid: MidQuantum | None = None  # taken at a halt inside a quantum


def _inputs_to_json(inp: BarrierInput) -> dict[str, Any]:
    return {"writes": [[s.address, base64.b64encode(s.data).decode()] for s in inp.writes],
            "irqs": list(inp.irqs), "console": base64.b64encode(inp.console).decode()}


def _inputs_from_json(data: dict[str, Any]) -> BarrierInput:
    return BarrierInput(tuple(Segment(int(a), base64.b64decode(d)) for a, d in data["writes"]),
                        tuple(int(i) for i in data["irqs"]), base64.b64decode(data["console"]))


def encode(art: Artifact) -> bytes:
    manifest = {
        "format": FORMAT_VERSION,
        "shape": list(art.shape),
        "time_ref": art.time_ref,
        "quanta": art.quanta,
        "since_origin": list(art.since_origin),
        "link_state": art.link_state,
        "inputs": [_inputs_to_json(i) for i in art.inputs],
        "blob_sha256": [hashlib.sha256(b).hexdigest() for b in art.blobs],
        "mid": None if art.mid is None else {
            "end": art.mid.end, "accepted": list(art.mid.accepted),
            "console": [base64.b64encode(c).decode() for c in art.mid.console]},
    }
    head = json.dumps(manifest, separators=(",", ":")).encode()
    parts = [MAGIC, _U32.pack(len(head)), head]
    for blob in art.blobs:
        parts += [_U64.pack(len(blob)), blob]
    return b"".join(parts)


def _bad(why: str) -> InvalidArgument:
    return InvalidArgument("snapshot", f"not a co-simulation snapshot: {why}")


def decode(data: bytes) -> Artifact:
    if not data.startswith(MAGIC):
        raise _bad("it does not start with the co-simulation snapshot magic")
    pos = len(MAGIC)
    if len(data) < pos + 4:
        raise _bad("truncated")
    (size,) = _U32.unpack_from(data, pos)
    pos += 4
    if size > MAX_MANIFEST or pos + size > len(data):
        raise _bad("truncated manifest")
    try:
        manifest = json.loads(data[pos:pos + size])
        pos += size
        if manifest.get("format") != FORMAT_VERSION:
            raise _bad(f"format {manifest.get('format')!r} (this server reads {FORMAT_VERSION})")
        shape = tuple(str(s) for s in manifest["shape"])
        digests = [str(d) for d in manifest["blob_sha256"]]
        inputs = tuple(_inputs_from_json(i) for i in manifest["inputs"])
        since = tuple(int(c) for c in manifest["since_origin"])
        time_ref, quanta = int(manifest["time_ref"]), int(manifest["quanta"])
        link_state = dict(manifest["link_state"])
        LinkState.from_dict(link_state)  # readable now, not first at restore
        raw_mid = manifest.get("mid")
        mid = None if raw_mid is None else MidQuantum(
            int(raw_mid["end"]), [base64.b64decode(c) for c in raw_mid["console"]],
            [int(a) for a in raw_mid["accepted"]])
    except InvalidArgument:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise _bad(f"unreadable manifest ({exc.__class__.__name__})") from None
    if not (len(shape) == len(digests) == len(inputs) == len(since)) or len(shape) < 2:
        raise _bad("the manifest's member lists disagree")
    if mid is not None and not (len(mid.console) == len(mid.accepted) == len(shape) and mid.end > time_ref):
        raise _bad("the cut quantum's lists disagree with the members, or it ends in the past")
    blobs: list[bytes] = []
    for i, digest in enumerate(digests):
        if pos + 8 > len(data):
            raise _bad(f"truncated before member {i}'s state")
        (n,) = _U64.unpack_from(data, pos)
        pos += 8
        if pos + n > len(data):
            raise _bad(f"member {i}'s state is truncated")
        blob = data[pos:pos + n]
        pos += n
        if hashlib.sha256(blob).hexdigest() != digest:
            raise _bad(f"member {i}'s state does not match its sha256")
        blobs.append(blob)
    if pos != len(data):
        raise _bad("trailing bytes after the last member's state")
    return Artifact(shape, time_ref, quanta, since, link_state, inputs, tuple(blobs), mid)
