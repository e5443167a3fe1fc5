"""Failure capsules: a session's state at an instant (snapshot, registers, backtrace,
console tail, trace tail, coverage, host telemetry, manifest) captured into one archive
(:mod:`.archive`), kept in the blob store with a record, exported and imported as streams,
and opened as a new session halted at that instant.

Triggers (a session's CapsulePolicy, kept in its record): a fault stop (``on_fault``) and
a hit on an assert symbol (``assert_symbols``: breakpoints of the server's own at those
functions, armed whenever the program is loaded into a powered machine; a hit leaves the
machine HALTED on the function's first instruction). Both capture in the background from
the session manager's stop hook: the capture takes the session's lock before anything can
run the machine again. Explicit: CreateCapsule (a running machine is paused for it and
resumed after).

Pruning: capsules older than ``limits.capsule_max_age_s`` (all tenants) and, per tenant,
those past the newest ``limits.capsule_max_count``; at start and after each new capsule.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from machineserver.server import __version__ as server_version
from machineserver.server.core import tenancy
from machineserver.server.core.calls import CURRENT
from machineserver.server.core.capsules import archive, formats
from machineserver.server.core.coverage import CoverageManager
from machineserver.server.core.coverage_export import lcov
from machineserver.server.core.debug import LineStepper
from machineserver.server.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    MachineServerError,
    ResourceExhausted,
)
from machineserver.server.core.images import ImageFormat
from machineserver.server.core.listing import (
    FieldGetters,
    Page,
    match_terms,
    paginate,
    parse_filter,
)
from machineserver.server.core.models import from_row, now, record_row
from machineserver.server.core.programs import UploadMetadata
from machineserver.server.core.sessions import CreateParams, LiveSession, SessionManager, driver_errors
from machineserver.server.core.telemetry import Telemetry
from machineserver.server.drivers.base import (
    Breakpoints,
    Coverage,
    DriverError,
    MachineState,
    RegisterAccess,
    Snapshots,
    StopInfo,
    StopReason,
)
from machineserver.server.store.blobs import BlobStore
from machineserver.server.store.db import Database

log = structlog.get_logger(__name__)

TABLE = "capsules"
COLLECTION = "capsules"
MAX_REASON = 4096
MAX_TEST_ID = 1024
MAX_DISPLAY_NAME = 256
MAX_ASSERT_SYMBOLS = 16
CHUNK = 64 * 1024
# tables whose rows may hold the same blob (an archive uploaded as a program, say)
BLOB_TABLES = ("capsules", "programs", "snapshots", "cosim_snapshots")


class Trigger(enum.StrEnum):
    FAULT = "fault"
    ASSERT = "assert"
    EXPLICIT = "explicit"
    TEST_FAILURE = "test_failure"


@dataclass(frozen=True)
class CapsuleSettings:
    max_bytes: int = 64 << 20  # an archive (captured or imported) and its snapshot/program members
    max_age_s: float = 0.0  # 0: kept whatever their age
    max_count: int = 0  # per tenant; 0: no limit


@dataclass
class CapsuleRecord:
    id: str
    session: str  # session id (on import: as the archive records it)
    trigger: str
    reason: str
    sha256: str  # the archive's blob
    size_bytes: int
    test_id: str = ""
    board: str = ""
    backend: str = ""
    backend_version: str = ""
    server_version: str = ""
    program: str = ""  # program id at capture ("" on import)
    firmware_sha256: str = ""
    pc: int = 0
    instructions: int = 0
    virtual_time_ns: int = 0
    missing: dict[str, str] = field(default_factory=dict)
    owner: str = ""
    tenant: str = ""
    create_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"{COLLECTION}/{self.id}"


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat().replace("+00:00", "Z")


def _as_session_id(name: str) -> str:
    return name.removeprefix("sessions/")


class CapsuleManager:
    def __init__(self, db: Database, blobs: BlobStore, sessions: SessionManager, stepper: LineStepper,
                 coverage: CoverageManager, telemetry: Telemetry, settings: CapsuleSettings) -> None:
        self._db = db
        self._blobs = blobs
        self._sessions = sessions
        self._stepper = stepper
        self._debugger = stepper.debugger
        self._coverage = coverage
        self._telemetry = telemetry
        self.settings = settings
        self._armed: dict[str, dict[int, str]] = {}  # session id -> assert address -> symbol
        sessions.breakpoint_probes.append(lambda live, pc: (pc & ~1) in self._armed.get(live.id, {}))
        sessions.power_on_hooks.append(self._arm)
        sessions.program_hooks.append(self._arm)
        sessions.stop_hooks.append(self._on_stop)
        sessions.delete_hooks.append(self._forget)

    async def start(self) -> None:
        self.prune()

    def _forget(self, live: LiveSession) -> None:
        self._armed.pop(live.id, None)

    # ------------------------------------------------------------------ records

    def get(self, name: str, field_name: str = "name") -> CapsuleRecord:
        return tenancy.fetch_visible(self._db, TABLE, CapsuleRecord, name, COLLECTION, "capsule", field_name)

    def list(self, page_size: int, page_token: str, filter_text: str) -> Page[CapsuleRecord]:
        terms = parse_filter(filter_text, ["session", "trigger", tenancy.FILTER_KEY])
        scope = tenancy.list_scope(terms)
        if "session" in terms:
            terms["session"] = _as_session_id(terms["session"])
        if "trigger" in terms:
            terms["trigger"] = terms["trigger"].lower().removeprefix("capsule_trigger_")
            if terms["trigger"] not in {t.value for t in Trigger}:
                raise InvalidArgument("filter", f"trigger is one of {', '.join(t.value for t in Trigger)}")
        getters: FieldGetters[CapsuleRecord] = {"session": lambda r: r.session, "trigger": lambda r: r.trigger}
        where, params = scope.where()
        rows = self._db.rows(TABLE, where, params, order_by="create_time DESC, id")
        items = [r for r in (from_row(CapsuleRecord, x["data"]) for x in rows) if match_terms(terms, getters, r)]
        return paginate(items, page_size, page_token, scope.token_key(filter_text))

    def delete(self, name: str) -> None:
        self._drop(self.get(name))

    def _drop(self, rec: CapsuleRecord) -> None:
        self._db.delete(TABLE, rec.id)
        if all(self._db.count(t, "blob = ?", [rec.sha256]) == 0 for t in BLOB_TABLES):
            self._blobs.delete(rec.sha256)

    def _save(self, rec: CapsuleRecord) -> None:
        self._db.put(TABLE, record_row(rec, session=rec.session, trigger=rec.trigger, blob=rec.sha256))

    def prune(self, tenant: str | None = None) -> int:
        """Drop capsules past the configured age (every tenant) and count (per tenant; only
        ``tenant``'s when given). How many went."""
        gone = 0
        if self.settings.max_age_s > 0:
            cutoff = time.time() - self.settings.max_age_s
            for row in self._db.rows(TABLE, "create_time < ?", [cutoff]):
                self._drop(from_row(CapsuleRecord, row["data"]))
                gone += 1
        if self.settings.max_count > 0:
            tenants = [tenant] if tenant is not None else [
                str(r["tenant"]) for r in self._db.rows(TABLE, order_by="tenant")]
            for t in dict.fromkeys(tenants):
                rows = self._db.rows(TABLE, "tenant = ?", [t], order_by="create_time DESC, id",
                                     offset=self.settings.max_count, limit=-1)
                for row in rows:
                    self._drop(from_row(CapsuleRecord, row["data"]))
                    gone += 1
        if gone:
            log.info("capsules_pruned", count=gone)
        return gone

    # ------------------------------------------------------------------ capture

    async def create(self, live: LiveSession, trigger: Trigger, reason: str, test_id: str) -> CapsuleRecord:
        """CreateCapsule: the explicit trigger or a test harness's."""
        if trigger not in (Trigger.EXPLICIT, Trigger.TEST_FAILURE):
            raise InvalidArgument("trigger", "EXPLICIT or TEST_FAILURE; FAULT and ASSERT are the server's own")
        if len(reason.encode()) > MAX_REASON:
            raise InvalidArgument("reason", f"at most {MAX_REASON} bytes")
        if len(test_id.encode()) > MAX_TEST_ID:
            raise InvalidArgument("test_id", f"at most {MAX_TEST_ID} bytes")
        live.require_machine("capture a capsule")
        owner, tenant = tenancy.stamp()
        was_running = live.state is MachineState.RUNNING
        if was_running:
            await self._sessions.pause(live, "paused for a capsule")
        try:
            return await self._capture(live, trigger, reason, test_id, owner, tenant)
        finally:
            if was_running and live.state is MachineState.HALTED and self._sessions.contains(live):
                await self._sessions.run(live)

    def _on_stop(self, live: LiveSession, info: StopInfo) -> None:
        """The stop hook: a fault or an assert symbol's breakpoint under the session's
        policy starts a capture (as the server, owned like the session)."""
        policy = live.record.capsule_policy or {}
        if info.reason is StopReason.FAULT and policy.get("on_fault"):
            trigger = Trigger.FAULT
            reason = f"fault at pc 0x{info.pc:08x}" + (f": {info.message}" if info.message else "")
        elif info.reason is StopReason.BREAKPOINT and (symbol := self._armed.get(live.id, {}).get(info.pc & ~1)):
            trigger, reason = Trigger.ASSERT, f"reached {symbol}"
        else:
            return
        self._sessions.background(self._capture_as_server(live, trigger, reason), f"capsule-{live.id}")

    async def _capture_as_server(self, live: LiveSession, trigger: Trigger, reason: str) -> None:
        CURRENT.set(None)  # this task's own context: the server's work, not the caller's
        try:
            rec = await self._capture(live, trigger, reason, "", live.record.owner, live.record.tenant)
            log.info("capsule_captured", session_id=live.id, capsule=rec.id, trigger=trigger.value)
        except (MachineServerError, DriverError) as exc:
            log.warning("capsule_capture_failed", session_id=live.id, trigger=trigger.value, error=str(exc))

    async def _capture(self, live: LiveSession, trigger: Trigger, reason: str, test_id: str,
                       owner: str, tenant: str) -> CapsuleRecord:
        parts: dict[str, bytes] = {}
        missing: dict[str, str] = {}
        async with live.lock:
            machine = live.require_inspectable("capture a capsule")
            if machine.has(Snapshots):
                try:
                    with driver_errors(live):
                        parts["snapshot"] = await machine.capability(Snapshots).save_state()
                except MachineServerError as exc:
                    missing["snapshot"] = str(exc)
            else:
                missing["snapshot"] = f"backend {live.record.backend} has no snapshots"
            registers: dict[str, int] = {}
            if machine.has(RegisterAccess):
                try:
                    with driver_errors(live):
                        registers = dict(await machine.capability(RegisterAccess).read_registers(None))
                    parts["registers"] = json.dumps(registers, indent=1).encode()
                except MachineServerError as exc:  # a QEMU that ended with the fault took them along
                    missing["registers"] = str(exc)
            else:
                missing["registers"] = f"backend {live.record.backend} has no register access"
            counters = machine.counters()
            pc = registers.get("pc", live.last_stop.pc if live.last_stop else 0)
            await self._backtrace(live, parts, missing)
            collecting = await self._coverage_part(live, parts, missing)
            await self._trace(live, collecting, parts, missing)
            await self._telemetry_part(live, parts, missing)
            console = live.console.read(max(0, live.console.end - archive.CONSOLE_TAIL), archive.CONSOLE_TAIL)
            parts["console"] = console.data
        program = self._program(live, parts, missing)
        capsule_id = "cap-" + secrets.token_hex(6)
        t = now()
        backend = live.record.backend
        info = self._sessions.backends.info(backend)
        snapshot_format = formats.format_of(parts["snapshot"], info.version) if "snapshot" in parts else ""
        manifest = {
            "format": archive.FORMAT,
            "format_version": archive.FORMAT_VERSION,
            "capsule": {"name": f"{COLLECTION}/{capsule_id}", "session": live.record.name, "trigger": trigger.value,
                        "reason": reason, "test_id": test_id, "create_time": _rfc3339(t), "pc": pc,
                        "instructions": counters.instructions, "virtual_time_ns": counters.virtual_time_ns},
            "server_version": server_version,
            "backend": backend,
            "backend_version": info.version,
            "snapshot_format": snapshot_format,
            "board": live.board.name,
            "board_yaml": live.record.board_config,
            "session_options": {"icount": live.record.icount, "coverage": live.record.coverage,
                                "max_instructions": live.record.max_instructions,
                                "capsules": dict(live.record.capsule_policy or {})},
            "program": program,
            "missing": missing,
        }
        blob = await asyncio.to_thread(archive.write, manifest, parts)
        if len(blob) > self.settings.max_bytes:
            raise ResourceExhausted("limits.capsule_max_bytes", f"the capsule is {len(blob)} bytes, over the "
                                    f"server's limits.capsule_max_bytes ({self.settings.max_bytes})")
        digest = await asyncio.to_thread(self._blobs.put, blob)
        rec = CapsuleRecord(
            id=capsule_id, session=live.id, trigger=trigger.value, reason=reason, sha256=digest,
            size_bytes=len(blob), test_id=test_id, board=live.board.name, backend=backend,
            backend_version=info.version, server_version=server_version, program=live.record.program,
            firmware_sha256=program["sha256"], pc=pc, instructions=counters.instructions,
            virtual_time_ns=counters.virtual_time_ns, missing=missing, owner=owner, tenant=tenant, create_time=t)
        self._save(rec)
        self.prune(tenant)
        return rec

    def _program(self, live: LiveSession, parts: dict[str, bytes], missing: dict[str, str]) -> dict[str, Any]:
        empty = {"name": "", "sha256": "", "format": "", "load_address": 0, "file": ""}
        if not live.record.program:
            missing["program"] = f"session {live.id} has no program loaded"
            return empty
        prog = self._sessions.programs.by_id(live.record.program, "program")
        parts["program"] = self._blobs.get(prog.sha256)
        return {"name": prog.name, "sha256": prog.sha256, "format": prog.format,
                "load_address": prog.load_address, "file": archive.MEMBERS["program"]}

    async def _backtrace(self, live: LiveSession, parts: dict[str, bytes], missing: dict[str, str]) -> None:
        try:
            frames = await self._stepper.backtrace(live)
        except (MachineServerError, DriverError) as exc:
            missing["backtrace"] = str(exc)
            return
        parts["backtrace"] = json.dumps([{"level": f.level, "pc": f.pc, "function": f.source.function,
                                          "file": f.source.file, "line": f.source.line} for f in frames],
                                        indent=1).encode()

    async def _coverage_part(self, live: LiveSession, parts: dict[str, bytes], missing: dict[str, str]) -> bool:
        """coverage.info; whether coverage is being collected in the session."""
        try:
            result = await self._coverage.result(live.record.name)
        except (MachineServerError, DriverError) as exc:
            missing["coverage"] = str(exc)
            return False
        parts["coverage"] = (await asyncio.to_thread(lcov, result, "", f"capsule_{live.id}")).encode()
        return True

    async def _trace(self, live: LiveSession, collecting: bool, parts: dict[str, bytes],
                     missing: dict[str, str]) -> None:
        machine = live.machine
        tail: list[int] | None = None
        if machine is not None and machine.has(Coverage):
            with contextlib.suppress(DriverError):
                tail = await machine.capability(Coverage).coverage_trace(archive.TRACE_BLOCKS)
        if not tail:
            if tail is not None and collecting:
                missing["trace"] = "no block was entered since coverage started"
            elif not collecting:
                missing["trace"] = ("coverage was not collected (the trace tail comes from the coverage hooks: "
                                    "set options.coverage and start coverage)")
            else:
                missing["trace"] = f"backend {live.record.backend} keeps no trace tail"
            return
        symbols = self._debugger.symbols(live, required=False)
        blocks = []
        for address in tail[-archive.TRACE_BLOCKS:]:
            hit = symbols.symbol_at(address) if symbols is not None else None
            blocks.append({"address": address, "symbol": f"{hit[0].name}+{hit[1]}" if hit else ""})
        parts["trace"] = json.dumps(blocks, indent=1).encode()

    async def _telemetry_part(self, live: LiveSession, parts: dict[str, bytes], missing: dict[str, str]) -> None:
        try:
            sample = await self._telemetry.host_status()
            metrics = await asyncio.to_thread(self._telemetry.session_metrics, live, None)
        except Exception as exc:  # psutil and the host sources: telemetry is never worth a failed capture
            missing["telemetry"] = f"host telemetry failed: {exc.__class__.__name__}"
            return
        host = {"time": sample.time, "cpu_percent": sample.cpu_percent,
                "memory_used_bytes": sample.memory.used_bytes, "memory_total_bytes": sample.memory.total_bytes,
                "memory_percent": sample.memory.percent, "swap_percent": sample.swap.percent,
                "load_average": list(sample.load_average),
                "temperatures": {name: celsius for name, celsius in sample.temperatures}}
        session = {k: v for k, v in metrics.items() if k != "t"}
        parts["telemetry"] = json.dumps({"host": [host], "session": session}, indent=1).encode()

    # ------------------------------------------------------------------ assert symbols

    async def _arm(self, live: LiveSession) -> None:
        """A power-on and program-load hook: breakpoints of the server's own at the
        policy's assert symbols that the program has (the others are ignored)."""
        names = (live.record.capsule_policy or {}).get("assert_symbols") or []
        machine = live.machine
        if not names or machine is None or not machine.has(Breakpoints):
            self._armed.pop(live.id, None)
            return
        symbols = self._debugger.symbols(live, required=False)
        armed: dict[int, str] = {}
        for name in names:
            sym = symbols.symbols.get(name) if symbols is not None else None
            if sym is None:
                continue
            address = sym.address & ~1
            with driver_errors(live):
                await machine.capability(Breakpoints).set_breakpoint(address)
            armed[address] = name
        self._armed[live.id] = armed

    # ------------------------------------------------------------------ export, import

    def export_chunks(self, rec: CapsuleRecord) -> Iterator[bytes]:
        return self._blobs.iter_chunks(rec.sha256, CHUNK)

    async def import_(self, chunks: AsyncIterator[bytes]) -> CapsuleRecord:
        data = bytearray()
        async for chunk in chunks:
            if len(chunk) > 1 << 20:
                raise InvalidArgument("chunk", "chunks are at most 1 MiB")
            data += chunk
            if len(data) > self.settings.max_bytes:
                raise ResourceExhausted("limits.capsule_max_bytes", "the capsule is larger than the server's "
                                        f"limits.capsule_max_bytes ({self.settings.max_bytes} bytes)")
        if not data:
            raise InvalidArgument("chunk", "the import has no bytes")
        blob = bytes(data)
        capsule = await asyncio.to_thread(self._read, blob)
        await asyncio.to_thread(self._check_open, capsule)
        m = capsule.manifest
        cap = m["capsule"]
        digest = await asyncio.to_thread(self._blobs.put, blob)
        owner, tenant = tenancy.stamp()
        rec = CapsuleRecord(
            id="cap-" + secrets.token_hex(6), session=_as_session_id(cap["session"]), trigger=cap["trigger"],
            reason=cap["reason"], sha256=digest, size_bytes=len(blob), test_id=cap["test_id"], board=m["board"],
            backend=m["backend"], backend_version=m["backend_version"], server_version=m["server_version"],
            firmware_sha256=m["program"]["sha256"], pc=cap["pc"], instructions=cap["instructions"],
            virtual_time_ns=cap["virtual_time_ns"], missing=dict(m["missing"]), owner=owner, tenant=tenant)
        self._save(rec)
        self.prune(tenant)
        return rec

    def _read(self, blob: bytes) -> archive.Capsule:
        try:
            return archive.read(blob, self.settings.max_bytes)
        except archive.NewerFormat as exc:
            raise FailedPrecondition(f"cannot read this capsule: {exc}", state="unreadable capsule",
                                     required=f"capsule format version {archive.FORMAT_VERSION}") from None
        except archive.ArchiveError as exc:
            raise InvalidArgument("chunk", f"not a valid capsule: {exc}") from None

    def _check_open(self, capsule: archive.Capsule) -> None:
        """Everything an open needs, checked (blocking: off the loop): its backend here,
        its board, its program's digest, and a snapshot this backend restores."""
        m = capsule.manifest
        backends = self._sessions.backends
        name = m["backend"]
        if name not in backends.names():
            raise FailedPrecondition(f"the capsule was captured on backend {name[:64]!r} "
                                     f"{m['backend_version'][:64]}; this server has no such backend",
                                     state="backend unavailable", required=name[:64])
        info = backends.info(name)
        if not info.available:
            raise FailedPrecondition(f"backend {name} is not available here: {info.unavailable_reason}",
                                     state="backend unavailable", required=name)
        board = self._sessions.catalog.parse_input(m["board_yaml"], "chunk")
        if board.name != m["board"]:
            raise InvalidArgument("chunk", f"not a valid capsule: the manifest's board is {m['board'][:64]!r} "
                                  f"but its board_yaml is {board.name!r}")
        program = capsule.part("program")
        if program is not None:
            if hashlib.sha256(program).hexdigest() != m["program"]["sha256"]:
                raise InvalidArgument("chunk", "not a valid capsule: program.bin is not the firmware whose "
                                      "sha256 the manifest names")
        snapshot = capsule.part("snapshot")
        if snapshot is None:
            return  # openable only as far as it goes; open says why not
        driver = backends.get(name)
        try:
            formats.check_restorable(driver, info, board, snapshot, claimed=m["snapshot_format"],
                                     their_version=m["backend_version"])
        except formats.Unrestorable as exc:
            raise FailedPrecondition(str(exc), state="unrestorable capsule",
                                     required=formats.writes(name, info) or name) from None
        except formats.Malformed as exc:
            raise InvalidArgument("chunk", f"not a valid capsule: {exc}") from None

    # ------------------------------------------------------------------ open

    async def open(self, name: str, session_id: str, display_name: str) -> LiveSession:
        rec = self.get(name)
        if len(display_name.encode()) > MAX_DISPLAY_NAME:
            raise InvalidArgument("display_name", f"at most {MAX_DISPLAY_NAME} bytes")
        blob = await asyncio.to_thread(self._blobs.get, rec.sha256)
        capsule = await asyncio.to_thread(self._read, blob)
        await asyncio.to_thread(self._check_open, capsule)
        m = capsule.manifest
        snapshot = capsule.part("snapshot")
        if snapshot is None:
            raise FailedPrecondition(f"capsule {rec.id} has no snapshot to open: "
                                     f"{m['missing'].get('snapshot', 'not captured')}",
                                     state="no snapshot", required="a capsule with a snapshot")
        program_name = ""
        program = capsule.part("program")
        if program is not None:
            fmt = ImageFormat(m["program"]["format"]) if m["program"]["format"] in {f.value for f in ImageFormat} \
                else None

            async def one_chunk() -> AsyncIterator[bytes]:
                yield program

            uploaded = await self._sessions.programs.upload(
                UploadMetadata(f"from {rec.name}", fmt, m["program"]["load_address"], m["program"]["sha256"]),
                one_chunk())
            program_name = uploaded.program.name
        options = m["session_options"]
        live = await self._sessions.create(CreateParams(
            board_config=m["board_yaml"], backend=m["backend"], display_name=display_name or f"opened {rec.name}",
            icount=options.get("icount") is True, coverage=options.get("coverage") is True,
            program=program_name, power_on=True, session_id=session_id))
        try:
            async with live.lock:
                machine = live.require_machine("open a capsule")
                try:
                    with driver_errors(live):
                        await machine.capability(Snapshots).restore_state(snapshot)
                except (MachineServerError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a blob the backend cannot take after all
                    raise FailedPrecondition(f"capsule {rec.id} cannot be restored: {exc.__class__.__name__}",
                                             state="unrestorable capsule") from None
                live.record.exit_code = None
                live.record.last_stop = None
                self._sessions.set_state(live, MachineState.HALTED, f"opened {rec.name}")
        except BaseException:
            with contextlib.suppress(Exception):
                await self._sessions.delete(live)
            raise
        return live
