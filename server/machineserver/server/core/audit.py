"""The audit log: who changed what, and every debug write, on every transport.

Every command is a call in the engine's call chain (:mod:`.calls`): an RPC, an Attach
command, a GDB packet. Whether one is audited is decided by its method name, from one
explicit table (:data:`METHOD_KINDS`, complete for every service: a test checks it against
the descriptors; a method missing from it is audited):

* ``READ`` (Get/List/Stream/Export, register and memory reads, symbols, disassembly, and
  the Attach stream itself, whose commands are calls of their own): not audited, and they
  cost nothing here but a dict lookup when they end;
* ``STEP`` (Step, StepLine, StepCoSimulation): executing instructions is not a write (the
  machine's own progress), and stepping must not pay for a write to the log;
* ``WRITE``: everything else, among them every debug write (WriteMemory, WriteRegister,
  SetBreakpoint, ClearBreakpoint: from RPCs, Attach commands and the GDB packets M, X, P,
  G, Z, z, which arrive named after those RPCs), run control (Continue, Halt, Run, Pause)
  and GDB bridge connections (``gdb/connect``, ``gdb/disconnect``).

Each entry holds who (principal and tenant of the caller's identity), the method, the
resource, the outcome code, the request id, the time, the transport and the peer; debug
writes also the address and length (register writes: the register's number and size). The
core fills what only it knows into :attr:`CallInfo.audit` as it serves the command:
``resource`` (e.g. ``sessions/x/registers/r0``), ``address``, ``length``; every resource
name the core resolves is kept as ``target`` (the resource when nothing better is known).

Same transaction: the trail is the record store's write hook. When the current call is an
audited one whose entry is not written yet, the entry is inserted in the open transaction
of the first record the call writes (code OK, the resource: the one the core named, else
the record written, else the target), so the change and its entry commit together or not
at all. A call that changes no record (a memory or register write, a run) gets its entry
in a one-row transaction of its own when it ends (the chain's ``after``, with the final
code); so does one that fails, before or after a change (a change that committed and a
later failure: two entries, OK and the error).

Append-only: no RPC changes or deletes entries. The server itself prunes entries older
than ``audit_retention_days`` (a limit in the server config; 0, the default: keep all),
never the newest (its sequence number is what a stream resumes after).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils
import structlog

from machineserver.server.core import identity
from machineserver.server.core.calls import CURRENT, STATUS_NUMBERS, AfterOnlyHook, CallInfo, Transport
from machineserver.server.core.errors import InvalidArgument
from machineserver.server.core.listing import parse_filter, read_page_token, token_int, token_str
from machineserver.server.core.pubsub import Hub, Subscription
from machineserver.server.store.db import Database

log = structlog.get_logger(__name__)

TABLE = "audit_events"
GDB_CONNECT = "gdb/connect"
GDB_DISCONNECT = "gdb/disconnect"
PRUNE_INTERVAL_SECONDS = 3600.0
SUBSCRIBER_QUEUE = 1024  # entries a live stream may fall behind before it re-reads the log
MAX_SEQUENCE = 1 << 62


class Kind(enum.Enum):
    READ = "read"
    STEP = "step"
    WRITE = "write"


def _service(name: str, *, reads: tuple[str, ...] = (), steps: tuple[str, ...] = (),
             writes: tuple[str, ...] = ()) -> dict[str, Kind]:
    prefix = f"/machineserver.v1.{name}/"
    return {**{prefix + m: Kind.READ for m in reads}, **{prefix + m: Kind.STEP for m in steps},
            **{prefix + m: Kind.WRITE for m in writes}}


# every method of every service, and the bridge's connection events
METHOD_KINDS: Mapping[str, Kind] = {
    **_service("AccessService", reads=("GetCallerIdentity", "ListApiKeys", "GetQuotaUsage"),
               writes=("CreateApiKey", "RevokeApiKey")),
    **_service("AuditService", reads=("ListAuditEvents", "StreamAuditEvents")),
    **_service("CapsuleService", reads=("GetCapsule", "ListCapsules", "ExportCapsule"),
               writes=("CreateCapsule", "DeleteCapsule", "ImportCapsule", "OpenCapsule")),
    **_service("CapabilitiesService", reads=("GetCapabilities", "ListBoardTemplates", "GetBoardTemplate"),
               writes=("CreateBoardTemplate", "UpdateBoardTemplate", "DeleteBoardTemplate")),
    **_service("CoSimService",
               reads=("GetCoSimulation", "ListCoSimulations", "StreamCoSimulationEvents", "ListCoSimSnapshots",
                      "ExportCoSimSnapshot"),
               steps=("StepCoSimulation",),
               writes=("CreateCoSimulation", "DeleteCoSimulation", "StartCoSimulation", "PauseCoSimulation",
                       "CreateCoSimSnapshot", "RestoreCoSimSnapshot", "DeleteCoSimSnapshot",
                       "ImportCoSimSnapshot")),
    **_service("CoverageService", reads=("GetCoverageSummary", "ExportCoverage", "ListCoverageReports"),
               writes=("StartCoverage", "StopCoverage", "ResetCoverage", "MergeCoverage")),
    **_service("DebugService",
               reads=("ListBreakpoints", "ReadRegisters", "ReadMemory", "Backtrace", "Attach", "Disassemble",
                      "ResolveSymbol"),
               steps=("Step", "StepLine"),
               writes=("SetBreakpoint", "ClearBreakpoint", "WriteRegister", "WriteMemory", "Continue", "Halt",
                       "StartGdbServer", "StopGdbServer")),
    **_service("JobService", reads=("GetJob", "ListJobs", "WatchJob", "ListJobRuns", "ExportJobJunit"),
               writes=("CreateJob", "CancelJob")),
    **_service("SessionService",
               reads=("GetSession", "ListSessions", "ListPrograms", "GetProgram", "StreamConsole",
                      "StreamSessionEvents", "ListSnapshots", "GetSnapshot", "ExportSnapshot", "ExpectConsole"),
               writes=("CreateSession", "DeleteSession", "PowerOnSession", "PowerOffSession", "ResetSession",
                       "RunSession", "PauseSession", "UploadProgram", "DeleteProgram", "LoadProgram",
                       "WriteConsole", "CreateSnapshot", "RestoreSnapshot", "DeleteSnapshot", "ImportSnapshot")),
    **_service("TelemetryService",
               reads=("GetHostStatus", "StreamHostStatus", "GetSessionMetrics", "StreamSessionMetrics",
                      "ListAlertRules", "StreamAlerts"),
               writes=("CreateAlertRule", "DeleteAlertRule")),
    "/grpc.health.v1.Health/Check": Kind.READ,
    "/grpc.health.v1.Health/Watch": Kind.READ,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Kind.READ,
    GDB_CONNECT: Kind.WRITE,
    GDB_DISCONNECT: Kind.WRITE,
}


def kind_of(method: str) -> Kind:
    """How a method is audited (one missing from the table is: WRITE)."""
    return METHOD_KINDS.get(method, Kind.WRITE)


# a record's table -> its resource name from the row id
_ROW_RESOURCES: Mapping[str, Callable[[str], str]] = {
    "sessions": lambda i: f"sessions/{i}",
    "programs": lambda i: f"programs/{i}",
    "snapshots": lambda i: f"snapshots/{i}",
    "board_templates": lambda i: f"boardTemplates/{i}",
    "coverage_reports": lambda i: f"coverageReports/{i}",
    "alert_rules": lambda i: f"alertRules/{i}",
    "cosimulations": lambda i: f"cosimulations/{i}",
    "cosim_snapshots": lambda i: "cosimulations/{}/snapshots/{}".format(*i.split("/", 1)) if "/" in i else "",
    "breakpoints": lambda i: "sessions/{}/breakpoints/{}".format(*i.split("/", 1)) if "/" in i else "",
    "api_keys": lambda i: f"apiKeys/{i}",
    "capsules": lambda i: f"capsules/{i}",
}


def row_resource(table: str, row_id: str) -> str:
    """The resource name of a record row ("" when the table has none or no row is named)."""
    name = _ROW_RESOURCES.get(table)
    return name(row_id) if name is not None and row_id else ""


def note(**fields: object) -> None:
    """Tell the audit log about the command being served (``resource``, ``address``,
    ``length``, or extra facts such as ``register``)."""
    call = CURRENT.get()
    if call is not None:
        call.audit.update(fields)


_KNOWN_KEYS = frozenset({"resource", "address", "length", "target", "written", "sequence"})


@dataclass
class AuditEntry:
    sequence: int
    time: float
    principal: str
    tenant: str
    method: str
    resource: str
    code: str
    request_id: str
    transport: str
    address: int | None = None
    length: int | None = None
    peer: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AuditEntry:
        data = row.get("data")
        return cls(int(row["id"]), float(row["time"]), row["principal"], row["tenant"], row["method"],
                   row.get("resource") or "", row["code"], row.get("request_id") or "",
                   row.get("transport") or "", row.get("address"), row.get("length"), row.get("peer") or "",
                   data if isinstance(data, dict) else {})


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def entry_for(call: CallInfo, code: str) -> AuditEntry:
    """The entry for a call: its resource is the one the core named, else the record it
    wrote (``written``), else the one it resolved (``target``)."""
    who = identity.of_call(call)
    facts = call.audit
    resource = facts.get("resource") or facts.get("written") or facts.get("target") or ""
    extra = {k: v for k, v in facts.items() if k not in _KNOWN_KEYS and isinstance(v, str | int | float | bool)}
    return AuditEntry(0, time.time(), who.principal, who.tenant, call.method, str(resource), code, call.request_id,
                      call.transport.value, _int_or_none(facts.get("address")), _int_or_none(facts.get("length")),
                      call.peer, extra)


# ---------------------------------------------------------------------- queries


FILTER_KEYS = ("principal", "tenant", "method", "resource", "code", "transport")
_TRANSPORTS = frozenset(t.value for t in Transport)


@dataclass(frozen=True)
class AuditQuery:
    """Which entries: the filter's terms (AND-joined) and a time range. ``method`` matches
    the full name or the RPC's name alone (``WriteMemory``); ``resource`` matches the
    resource and those below it (``sessions/x`` takes ``sessions/x/registers/r0``);
    ``visible_tenant``: a reader who is not an admin sees only its own tenant's entries."""

    principal: str = ""
    tenant: str = ""
    method: str = ""
    resource: str = ""
    code: str = ""
    transport: str = ""
    start_time: float | None = None
    end_time: float | None = None
    visible_tenant: str | None = None

    @classmethod
    def parse(cls, text: str, start_time: float | None = None, end_time: float | None = None,
              visible_tenant: str | None = None) -> AuditQuery:
        terms = parse_filter(text, FILTER_KEYS)
        code = terms.get("code", "").upper()
        if code and code not in STATUS_NUMBERS:
            raise InvalidArgument("filter", f"code={terms['code']!r} is not a status code name (OK, NOT_FOUND, ...)")
        transport = terms.get("transport", "").lower()
        if transport and transport not in _TRANSPORTS:
            raise InvalidArgument("filter", f"transport={terms['transport']!r}: give one of {', '.join(sorted(_TRANSPORTS))}")
        if start_time is not None and end_time is not None and end_time < start_time:
            raise InvalidArgument("end_time", "is before start_time")
        return cls(terms.get("principal", ""), terms.get("tenant", ""), terms.get("method", ""),
                   terms.get("resource", "").rstrip("/"), code, transport, start_time, end_time, visible_tenant)

    def where(self) -> tuple[list[str], list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column in ("principal", "tenant", "code", "transport"):
            value = getattr(self, column)
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.visible_tenant is not None:
            clauses.append("tenant = ?")
            params.append(self.visible_tenant)
        if self.method:
            suffix = "/" + self.method.lstrip("/")
            clauses.append("(method = ? OR substr(method, -?) = ?)")
            params += [self.method, len(suffix), suffix]
        if self.resource:
            below = self.resource + "/"
            clauses.append("(resource = ? OR substr(resource, 1, ?) = ?)")
            params += [self.resource, len(below), below]
        if self.start_time is not None:
            clauses.append("time >= ?")
            params.append(self.start_time)
        if self.end_time is not None:
            clauses.append("time < ?")
            params.append(self.end_time)
        return clauses, params

    def matches(self, e: AuditEntry) -> bool:
        if self.visible_tenant is not None and e.tenant != self.visible_tenant:
            return False
        for column in ("principal", "tenant", "code", "transport"):
            value = getattr(self, column)
            if value and getattr(e, column) != value:
                return False
        if self.method and e.method != self.method and not e.method.endswith("/" + self.method.lstrip("/")):
            return False
        if self.resource and e.resource != self.resource and not e.resource.startswith(self.resource + "/"):
            return False
        if self.start_time is not None and e.time < self.start_time:
            return False
        return self.end_time is None or e.time < self.end_time

    def fingerprint(self) -> str:
        """What a page token is bound to (the query, not who asks)."""
        text = json.dumps([self.principal, self.tenant, self.method, self.resource, self.code, self.transport,
                           self.start_time, self.end_time])
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def page_token(after: int, query: AuditQuery) -> str:
    """A page token: keyset, the sequence to continue after (the log only grows)."""
    raw = json.dumps({"a": after, "f": query.fingerprint()}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def read_token(token: str, query: AuditQuery) -> int:
    """The sequence a page token continues after (0 for no token)."""
    if not token:
        return 0
    data = read_page_token(token)
    after, fp = token_int(data, "a", MAX_SEQUENCE), token_str(data, "f")
    if fp != query.fingerprint():
        raise InvalidArgument("page_token", "the token belongs to a different query")
    return after


# ---------------------------------------------------------------------- the trail


class AuditTrail:
    """Writes the log (as the store's write hook and from the chain's hook), reads it,
    and streams new entries to subscribers (bounded queues)."""

    def __init__(self, db: Database, *, retention_days: float = 0.0) -> None:
        self.db = db
        self.retention_days = retention_days
        self.events: Hub[AuditEntry] = Hub(SUBSCRIBER_QUEUE)
        self._loop_thread = threading.get_ident()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pruner: asyncio.Task[None] | None = None
        columns = ("time", "principal", "tenant", "method", "resource", "code", "request_id", "transport",
                   "address", "length", "peer", "data")
        self._insert_sql = (f"INSERT INTO {TABLE} ({', '.join(columns)}) "
                            f"VALUES ({', '.join('?' * len(columns))})")
        db.write_hook = self._in_transaction

    # ------------------------------------------------------------------ writing

    def _insert(self, conn: sqlite_utils.Database, e: AuditEntry) -> int:
        cursor = conn.execute(self._insert_sql, [
            e.time, e.principal, e.tenant, e.method, e.resource, e.code, e.request_id, e.transport, e.address,
            e.length, e.peer, json.dumps(e.data, sort_keys=True) if e.data else None])
        if cursor.lastrowid is None:  # pragma: no cover - an INSERT always sets it
            raise RuntimeError("the audit insert reported no row id")
        e.sequence = int(cursor.lastrowid)
        return e.sequence

    def _in_transaction(self, conn: sqlite_utils.Database, table: str, row_id: str) -> Callable[[bool], None] | None:
        """The store's write hook: the current call's entry, in the transaction of the
        first record it writes."""
        if table == TABLE:
            return None
        call = CURRENT.get()
        if call is None or "sequence" in call.audit or kind_of(call.method) is not Kind.WRITE:
            return None
        written = row_resource(table, row_id)
        if written:
            call.audit.setdefault("written", written)
        entry = entry_for(call, "OK")
        call.audit["sequence"] = self._insert(conn, entry)

        def finished(committed: bool) -> None:
            if committed:
                self._publish(entry)
            else:
                call.audit.pop("sequence", None)
                if call.audit.get("written") == written:
                    call.audit.pop("written", None)

        return finished

    def ended(self, call: CallInfo) -> None:
        """A call ended (the chain's after): its entry, unless it is not audited or its
        entry went with its change and it ended OK."""
        if kind_of(call.method) is not Kind.WRITE or ("sequence" in call.audit and call.code == "OK"):
            return
        self.write(call)

    def write(self, call: CallInfo) -> AuditEntry:
        """The call's entry with its code now, in a transaction of its own."""
        entry = entry_for(call, call.code)
        with self.db.transaction(TABLE) as conn:
            self._insert(conn, entry)
        call.audit.setdefault("sequence", entry.sequence)
        self._publish(entry)
        return entry

    def _publish(self, entry: AuditEntry) -> None:
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self.events.publish, entry)
        else:
            self.events.publish(entry)

    # ------------------------------------------------------------------ reading

    def entries(self, query: AuditQuery, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        """Entries matching ``query`` after sequence ``after``, oldest first."""
        clauses, params = query.where()
        clauses.append("id > ?")
        params.append(after)
        rows = self.db.rows(TABLE, " AND ".join(clauses), params, order_by="id", limit=limit)
        return [AuditEntry.from_row(r) for r in rows]

    def last_sequence(self) -> int:
        rows = self.db.rows(TABLE, None, order_by="id DESC", limit=1)
        return int(rows[0]["id"]) if rows else 0

    def subscribe(self, query: AuditQuery) -> Subscription[AuditEntry]:
        return self.events.subscribe(query.matches)

    # ------------------------------------------------------------------ retention

    def prune(self, now: float | None = None) -> int:
        """Delete entries older than the retention (never the newest); how many went."""
        if self.retention_days <= 0:
            return 0
        cutoff = (now if now is not None else time.time()) - self.retention_days * 86400
        return self.db.delete_where(TABLE, f"time < ? AND id < (SELECT MAX(id) FROM {TABLE})", [cutoff])

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self.retention_days > 0:
            self._pruner = asyncio.create_task(self._prune_forever())

    async def _prune_forever(self) -> None:
        while True:
            try:
                pruned = self.prune()
                if pruned:
                    log.info("audit_pruned", entries=pruned, retention_days=self.retention_days)
            except Exception:
                log.exception("audit_prune_failed")
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)

    async def stop(self) -> None:
        task, self._pruner = self._pruner, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.events.close()


class AuditHook(AfterOnlyHook):
    """The call chain's link to the trail: sees how every command ends."""

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    def after(self, call: CallInfo) -> None:
        self.trail.ended(call)
