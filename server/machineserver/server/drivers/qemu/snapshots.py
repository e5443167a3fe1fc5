"""Snapshots of a QEMU machine: QEMU's migration stream of the stopped VM, behind a small
header of ours.

* **Save**: QMP ``migrate`` to ``exec:cat > file`` (no disk needed; ~12 ms, ~130-300 KB);
  the stream's run state is patched from "debug" to "paused" (QEMU 7.2 refuses to load
  "debug").
* **Restore**: a new QEMU started with ``-incoming "exec:cat file"``, the breakpoints and
  watchpoints put back, and the snapshot's semihosting trap sites armed.
* **Blob**: ``MSQEMU1\\n``, the header's length (4 bytes, little-endian), the header (JSON:
  QEMU machine, board, icount shift, pc, counters, trap sites), the stream.
* **Boards**: QEMU 7.2 aborts restoring any lm3s6965evb snapshot; that board has no
  snapshots (NotSupported, and a board limit in the backend's probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from machineserver.server.drivers.base import (
    BackendFailed,
    BadRequest,
    BoardSpec,
    NotSupported,
    Snapshots,
    WrongState,
)
from machineserver.server.drivers.qemu.semihosting import TrapSites
from machineserver.server.drivers.qemu.target import QemuTarget, guarded
from machineserver.server.rsp.client import RspClient

# QEMU machines whose snapshot restore is broken in the QEMU versions we know of
SNAPSHOT_BROKEN = {
    "lm3s6965evb": "QEMU 7.2 aborts restoring any lm3s6965evb snapshot "
    "(assertion in hw/sd/sd.c sd_ocr_powerup)",
}
MAGIC = b"MSQEMU1\n"
MAX_HEADER = 1 << 20  # the header is a few hundred bytes and the trap sites
MAX_TRAPS = 65536
MIGRATION_MAGIC = b"QEVM\x00\x00\x00\x03"  # QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION
SAVE_TIMEOUT = 30.0
# section name, instance id, version, then the state's length and its 100-byte buffer
_GLOBALSTATE_DEBUG = re.compile(rb"(\x0bglobalstate.{8})\x00\x00\x00\x06debug\x00.", re.DOTALL)


def patch_runstate(stream: bytes) -> bytes:
    """The migration stream carries the source's run state; a VM stopped by the gdbstub
    is in "debug", and QEMU 7.2 aborts loading that ("invalid runstate transition:
    'inmigrate' -> 'debug'"). Rewrite it to "paused" (the stream keeps its length: the field is a
    100-byte buffer behind its length). The buffer is not always NUL past the name (an
    earlier, longer run state's bytes can remain: "debug\\0nch"), so "paused" gets its own
    NUL, written over the byte after "debug"'s."""
    return _GLOBALSTATE_DEBUG.sub(lambda m: m.group(1) + b"\x00\x00\x00\x07paused\x00", stream,
                                  count=1)


def encode(header: dict[str, Any], stream: bytes) -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + len(head).to_bytes(4, "little") + head + stream


def decode(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, stream); BadRequest(field="snapshot") for anything that is not one."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise BadRequest("not a QEMU snapshot of this backend", field="snapshot")
    off = len(MAGIC)
    size = int.from_bytes(blob[off : off + 4], "little")
    if size > MAX_HEADER or off + 4 + size > len(blob):
        raise BadRequest(f"corrupt snapshot: a header of {size} bytes in a blob of {len(blob)}",
                         field="snapshot")
    try:
        header = json.loads(blob[off + 4 : off + 4 + size])
    except (ValueError, RecursionError):
        raise BadRequest("corrupt snapshot header", field="snapshot") from None
    if not isinstance(header, dict):
        raise BadRequest("corrupt snapshot header", field="snapshot")
    return header, blob[off + 4 + size :]


def _typed(header: dict[str, Any], key: str, kinds: tuple[type, ...], required: bool = True) -> Any:
    if key not in header:
        if required:
            raise BadRequest(f"corrupt snapshot header: no {key}", field="snapshot")
        return None
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise BadRequest(f"corrupt snapshot header: {key} is a {type(value).__name__}", field="snapshot")
    if isinstance(value, int) and not -(1 << 64) < value < (1 << 64):
        raise BadRequest(f"corrupt snapshot header: {key} is out of range", field="snapshot")
    return value


def check_blob(blob: bytes, board: BoardSpec) -> dict[str, Any]:
    """The header of a QEMU snapshot blob checked for ``board`` (see Backend.check_snapshot):
    its machine and board, every field's type, a bounded trap list and a migration stream
    that starts as QEMU's do. BadRequest(field="snapshot") naming why."""
    machine = board.backend_machines.get("qemu", "")
    reason = SNAPSHOT_BROKEN.get(machine)
    if reason:
        raise BadRequest(f"snapshots are not supported on {board.name}: {reason}", field="snapshot")
    header, stream = decode(blob)
    if _typed(header, "machine", (str,)) != machine or _typed(header, "board", (str,)) != board.name:
        raise BadRequest(f"the snapshot is of board {str(header.get('board'))[:64]!r} "
                         f"({str(header.get('machine'))[:64]}), not {board.name} ({machine})", field="snapshot")
    shift = header.get("icount_shift")
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift <= 10):
        raise BadRequest("corrupt snapshot header: icount_shift", field="snapshot")
    for key in ("instructions", "virtual_ns", "vclock", "pc"):
        _typed(header, key, (int,), required=key == "instructions")
    traps = _typed(header, "traps", (list,), required=False) or []
    if len(traps) > MAX_TRAPS or any(isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < 1 << 64
                                     for a in traps):
        raise BadRequest(f"corrupt snapshot header: traps are not up to {MAX_TRAPS} addresses", field="snapshot")
    if not stream.startswith(MIGRATION_MAGIC):
        raise BadRequest("corrupt snapshot: the migration stream is not QEMU's (version 3)", field="snapshot")
    return header


class QemuSnapshots(Snapshots):
    """``restart(stream)`` starts the machine's new QEMU from a migration stream (the
    lifecycle's, with the points put back)."""

    def __init__(self, target: QemuTarget, traps: TrapSites,
                 restart: Callable[[bytes], Awaitable[None]]) -> None:
        self.target = target
        self.traps = traps
        self._restart = restart
        # the last stream saved, with the gdbstub connection and its write count then
        self._last: tuple[RspClient, int, bytes] | None = None

    def _check_board(self) -> None:
        reason = SNAPSHOT_BROKEN.get(self.target.qemu_machine)
        if reason:
            raise NotSupported(f"snapshots are not supported on {self.target.board.name}: {reason}")

    @guarded
    async def save_state(self) -> bytes:
        self._check_board()
        async with self.target.op:
            self.target.require_inspectable()
            stream = await self._stream()
            clock = self.target.clock
            counted = clock.counters(self.target.process)
            return encode({
                "machine": self.target.qemu_machine,
                "board": self.target.board.name,
                "icount_shift": clock.shift,
                "pc": self.target.last_pc,
                "instructions": counted.instructions,
                "virtual_ns": counted.virtual_time_ns,
                "vclock": self.target.virtual_clock_ns(),
                "traps": sorted(self.traps.sites),
            }, stream)

    async def _stream(self) -> bytes:
        """The VM's migration stream. After a migration QEMU leaves a stopped VM in its
        "postmigrate" run state and refuses to migrate it again until it has run ("Can't
        migrate the vm that was paused due to previous migration"): a second save with
        nothing run or written in between gets the first one's stream (the same state); with
        a write in between (a debugger's memory or register write) it is refused, and the
        machine stays as it is."""
        stub = self.target.stub()
        status = await self.target.process.qmp("query-status")
        if isinstance(status, dict) and status.get("status") == "postmigrate":
            last = self._last
            if last is not None and last[0] is stub and last[1] == stub.writes:
                return last[2]
            raise WrongState("QEMU cannot snapshot this machine again before it has run: it was written "
                             "since its last snapshot (QEMU's postmigrate state); step or continue it first",
                             state="postmigrate", required="run since the last snapshot")
        inst = self.target.process.instance
        assert inst is not None
        path = os.path.join(inst.dir, "snapshot.bin")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await self.target.process.qmp("migrate", {"uri": f"exec:cat > {path}"})
        deadline = time.monotonic() + SAVE_TIMEOUT
        while True:
            info = await self.target.process.qmp("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                err = info.get("error-desc", "") if isinstance(info, dict) else ""
                raise BackendFailed(f"snapshot failed: {status} {err}".strip())
            if time.monotonic() > deadline:
                raise await self.target.process.fail(f"snapshot did not finish in {SAVE_TIMEOUT} s")
            await asyncio.sleep(0.002)
        stream = patch_runstate(await asyncio.to_thread(Path(path).read_bytes))
        os.unlink(path)
        self._last = (stub, stub.writes, stream)
        return stream

    @guarded
    async def restore_state(self, blob: bytes) -> None:
        self._check_board()
        check_blob(blob, self.target.board)
        header, stream = decode(blob)
        machine = self.target.qemu_machine
        if header.get("machine") != machine:
            raise BadRequest(f"the snapshot is of a {header.get('machine')} machine, this one is "
                             f"{machine}", field="snapshot")
        clock = self.target.clock
        if header.get("icount_shift") != clock.shift:
            raise BadRequest("the snapshot was taken with other icount settings", field="snapshot")
        try:
            traps = frozenset(int(a) for a in header.get("traps", []))
            instructions, virtual_ns = int(header.get("instructions", 0)), int(header.get("virtual_ns", 0))
            vclock = int(header.get("vclock", virtual_ns))
        except (TypeError, ValueError):
            raise BadRequest("corrupt snapshot header", field="snapshot") from None
        async with self.target.op:
            await self._restart(stream)
            await self.traps.install(self.target.stub(), self.target.process.gate, traps)
            clock.set(instructions, virtual_ns, self.target.process.gate)
            self.target.vclock_base = vclock
            await self.target.read_pc()
            await clock.refresh(self.target.process)
