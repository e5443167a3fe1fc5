"""Which snapshot format a capsule holds, and whether this server's backend restores it.

A capsule names its snapshot's format: ``unicorn-snapshot/N`` (the Unicorn driver's own
format, version N: independent of the Unicorn library's version) or ``qemu-migration/X.Y``
(QEMU's migration stream behind our header: QEMU loads streams of its own version only, so
the format is the QEMU version that wrote it). Import and open refuse, FAILED_PRECONDITION,
a format this server cannot restore, naming both sides.
"""

from __future__ import annotations

import re
import struct

from machineserver.server.drivers.base import Backend, BackendInfo, BadRequest, BoardSpec

UNICORN_MAGIC = b"MSUCSNAP"
QEMU_MAGIC = b"MSQEMU1\n"
QEMU_PREFIX = "qemu-migration/"


class Unrestorable(Exception):
    """This server cannot restore the snapshot: the message says why, naming both versions."""


class Malformed(Exception):
    """The snapshot is not what the capsule says it is."""


def qemu_series(version: str) -> str:
    """"7.2.15" -> "7.2"."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else version or "unknown"


def format_of(blob: bytes, backend_version: str) -> str:
    """The format of a snapshot blob as saved by ``backend_version`` of its backend."""
    if blob.startswith(UNICORN_MAGIC) and len(blob) >= len(UNICORN_MAGIC) + 2:
        return f"unicorn-snapshot/{struct.unpack_from('<H', blob, len(UNICORN_MAGIC))[0]}"
    if blob.startswith(QEMU_MAGIC):
        return QEMU_PREFIX + qemu_series(backend_version)
    return "unknown"


def writes(backend: str, info: BackendInfo) -> str:
    """The format this server's ``backend`` writes now ("" when it cannot say)."""
    if backend == "unicorn":
        from machineserver.server.drivers.unicorn.snapshot_format import VERSION  # the driver's own

        return f"unicorn-snapshot/{VERSION}"
    if backend == "qemu":
        return QEMU_PREFIX + qemu_series(info.version)
    return ""


def check_restorable(driver: Backend, info: BackendInfo, board: BoardSpec, blob: bytes, *,
                     claimed: str, their_version: str) -> None:
    """Whether ``driver`` restores ``blob`` (claimed to be of format ``claimed``, written by
    its backend's ``their_version``) into ``board``. Malformed: the blob is not of the
    claimed format, or is damaged although this server reads that format; Unrestorable:
    a format this server does not restore. Blocking (the backend's check): off the loop."""
    actual = format_of(blob, their_version)
    if actual != claimed:
        raise Malformed(f"the manifest says snapshot format {claimed[:64]!r}; snapshot.bin is {actual!r}")
    here = writes(driver.name, info)
    theirs = f"{driver.name} {their_version or '?'} (snapshot format {claimed})"
    ours = f"{driver.name} {info.version or '?'} (snapshot format {here or '?'})"
    if actual.startswith(QEMU_PREFIX) and actual != here:
        raise Unrestorable(f"the capsule was captured on {theirs}; this server runs {ours}, and QEMU loads "
                           "migration streams of its own version only")
    try:
        driver.check_snapshot(blob, board)
    except BadRequest as exc:
        if actual != here:
            raise Unrestorable(f"the capsule was captured on {theirs}; this server runs {ours}, which cannot "
                               f"restore it: {exc}") from None
        raise Malformed(f"snapshot.bin is not a {driver.name} snapshot of board {board.name}: {exc}") from None
    except Exception as exc:  # a check that fails otherwise: unreadable
        raise Malformed(f"snapshot.bin is unreadable ({exc.__class__.__name__})") from None
