"""The audit trail at the store: the entry rides in the transaction of the change (a
rolled-back change leaves no entry; a change leaves exactly one), a failure after a change
adds its own entry, reading and stepping calls write none, retention keeps the newest; and
the method table covers every RPC of every service, with no RPC that changes the log."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machineserver.sdk.client import service_descriptors
from machineserver.server.api.server import SERVICE_NAMES
from machineserver.server.core import audit
from machineserver.server.core.audit import METHOD_KINDS, TABLE, AuditTrail, Kind, kind_of
from machineserver.server.core.calls import CURRENT, CallInfo, Transport
from machineserver.server.core.identity import AuthMethod, Identity, Role
from machineserver.server.store.db import Database

CREATE_RULE = "/machineserver.v1.TelemetryService/CreateAlertRule"


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[AuditTrail]:
    db = Database(tmp_path / "records.sqlite3")
    try:
        yield AuditTrail(db)
    finally:
        db.close()


@contextlib.contextmanager
def serving(call: CallInfo) -> Iterator[CallInfo]:
    token = CURRENT.set(call)
    try:
        yield call
    finally:
        CURRENT.reset(token)


def rule_row(rid: str) -> dict[str, object]:
    return {"id": rid, "owner": "o", "create_time": 1.0, "update_time": 1.0, "data": {}}


def entries(trail: AuditTrail) -> list[audit.AuditEntry]:
    return trail.entries(audit.AuditQuery())


def test_the_entry_commits_with_the_change_and_only_once(trail: AuditTrail) -> None:
    who = Identity("apikey:ci", "team-a", frozenset({Role.OPERATOR}), AuthMethod.API_KEY)
    call = CallInfo(CREATE_RULE, "rid-1", {}, Transport.RPC, peer="ipv4:10.0.0.9:1234")
    call.identity = who
    with serving(call):
        trail.db.put("alert_rules", rule_row("r1"))
        trail.db.put("alert_rules", rule_row("r1"))  # a second write of the same call: no second entry
    (e,) = entries(trail)
    assert (e.principal, e.tenant, e.method, e.resource, e.code) == ("apikey:ci", "team-a", CREATE_RULE,
                                                                     "alertRules/r1", "OK")
    assert (e.request_id, e.transport, e.peer) == ("rid-1", "rpc", "ipv4:10.0.0.9:1234")
    assert call.audit["sequence"] == e.sequence
    trail.ended(call)  # ended OK: its entry went with the change
    assert len(entries(trail)) == 1


def test_a_rolled_back_change_leaves_no_entry_and_the_failure_gets_one(trail: AuditTrail) -> None:
    call = CallInfo(CREATE_RULE, "rid-2", {})
    with serving(call), pytest.raises(RuntimeError), trail.db.transaction("alert_rules", "r2") as conn:
        conn.execute("INSERT INTO alert_rules (id, owner, create_time, update_time, data) VALUES ('r2', '', 0, 0, '{}')")
        raise RuntimeError("the change failed")
    assert entries(trail) == [] and trail.db.get("alert_rules", "r2") is None
    assert "sequence" not in call.audit
    call.code = "INTERNAL"
    trail.ended(call)
    (e,) = entries(trail)
    assert (e.code, e.request_id) == ("INTERNAL", "rid-2")


def test_a_change_then_a_failure_writes_both(trail: AuditTrail) -> None:
    call = CallInfo(CREATE_RULE, "rid-3", {})
    with serving(call):
        trail.db.put("alert_rules", rule_row("r3"))
    call.code = "DEADLINE_EXCEEDED"
    trail.ended(call)
    assert [(e.code, e.resource) for e in entries(trail)] == [("OK", "alertRules/r3"),
                                                              ("DEADLINE_EXCEEDED", "alertRules/r3")]


def test_a_failing_audit_insert_fails_the_change(trail: AuditTrail) -> None:
    """Same transaction both ways: no change without its entry."""
    trail.db._db.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON {TABLE} BEGIN SELECT RAISE(ABORT, 'full'); END")
    with serving(CallInfo(CREATE_RULE, "rid-4", {})), pytest.raises(Exception, match="full"):
        trail.db.put("alert_rules", rule_row("r4"))
    assert trail.db.get("alert_rules", "r4") is None


@pytest.mark.parametrize("method", ["/machineserver.v1.DebugService/ReadMemory", "/machineserver.v1.DebugService/Step",
                                    "/machineserver.v1.SessionService/ListSessions"])
def test_reading_and_stepping_calls_write_no_entry(trail: AuditTrail, method: str) -> None:
    call = CallInfo(method, "rid-5", {})
    with serving(call):
        trail.db.put("sessions", {"id": "s1", "owner": "", "create_time": 0.0, "update_time": 0.0, "data": {},
                                  "board": "b", "backend": "unicorn", "state": "halted"})
    trail.ended(call)
    call.code = "INVALID_ARGUMENT"
    trail.ended(call)
    assert entries(trail) == []


def test_the_servers_own_writes_are_not_audited(trail: AuditTrail) -> None:
    assert CURRENT.get() is None
    trail.db.put("alert_rules", rule_row("r6"))
    assert entries(trail) == []


def test_the_core_names_the_resource_over_the_record_written(trail: AuditTrail) -> None:
    call = CallInfo("/machineserver.v1.DebugService/SetBreakpoint", "rid-7", {}, Transport.GDB, peer="127.0.0.1:5")
    with serving(call):
        audit.note(resource="sessions/s1/breakpoints/3", address=0x100, length=2, register="ignored-not-a-field")
        trail.db.put("breakpoints", {"id": "s1/3", "session": "s1", "create_time": 0.0, "update_time": 0.0, "data": {}})
    (e,) = entries(trail)
    assert (e.resource, e.address, e.length, e.transport) == ("sessions/s1/breakpoints/3", 0x100, 2, "gdb")
    assert e.data == {"register": "ignored-not-a-field"}
    assert audit.row_resource("breakpoints", "s1/3") == "sessions/s1/breakpoints/3"
    assert audit.row_resource("cosim_snapshots", "c1/x") == "cosimulations/c1/snapshots/x"


def test_retention_prunes_old_entries_but_never_the_newest(tmp_path: Path) -> None:
    db = Database(tmp_path / "r.sqlite3")
    try:
        trail = AuditTrail(db, retention_days=1)
        now = time.time()
        for age_days in (5, 3, 0.5, 2):  # the newest entry is old too: it stays (streams resume after it)
            db.append(TABLE, {"time": now - age_days * 86400, "principal": "p", "tenant": "t", "method": "m",
                              "code": "OK"})
        assert trail.prune(now) == 2
        assert [round((now - e.time) / 86400, 1) for e in entries(trail)] == [0.5, 2.0]
        assert AuditTrail(db, retention_days=0).prune(now) == 0
    finally:
        db.close()


def test_the_method_table_covers_every_rpc_and_nothing_changes_the_log() -> None:
    served = {s.full_name: s for s in service_descriptors()}
    assert set(SERVICE_NAMES) == set(served)
    missing = [f"/{s.full_name}/{m.name}" for s in served.values() for m in s.methods
               if f"/{s.full_name}/{m.name}" not in METHOD_KINDS]
    assert not missing, f"methods the audit table does not classify: {missing}"
    # the table names no method that does not exist (a renamed RPC would slip out of it)
    ours = {k for k in METHOD_KINDS if k.startswith("/machineserver.v1.")}
    assert ours == {f"/{s.full_name}/{m.name}" for s in served.values() for m in s.methods}
    # append-only from the API: AuditService only reads, and no RPC anywhere takes an entry
    auditing = served["machineserver.v1.AuditService"]
    assert sorted(m.name for m in auditing.methods) == ["ListAuditEvents", "StreamAuditEvents"]
    assert all(kind_of(f"/{auditing.full_name}/{m.name}") is Kind.READ for m in auditing.methods)
    for s in served.values():
        for m in s.methods:
            fields = {f.message_type.full_name for f in m.input_type.fields if f.message_type is not None}
            assert "machineserver.v1.AuditEvent" not in fields, f"{m.full_name} takes an audit entry"
            if s.name != "AuditService":
                assert "Audit" not in m.name, m.full_name
    # debug writes and bridge connections are audited; an unknown method is too
    for name in ("WriteMemory", "WriteRegister", "SetBreakpoint", "ClearBreakpoint"):
        assert kind_of(f"/machineserver.v1.DebugService/{name}") is Kind.WRITE
    assert kind_of(audit.GDB_CONNECT) is kind_of(audit.GDB_DISCONNECT) is Kind.WRITE
    assert kind_of("/machineserver.v1.NewService/DoSomething") is Kind.WRITE


def test_a_reader_who_is_not_an_admin_sees_only_its_tenant(trail: AuditTrail) -> None:
    for tenant in ("a", "b", "a"):
        call = CallInfo(CREATE_RULE, f"rid-{tenant}", {})
        call.identity = Identity(f"apikey:{tenant}", tenant, frozenset({Role.OPERATOR}))
        trail.write(call)
    scoped = audit.AuditQuery.parse("tenant=b", visible_tenant="a")  # asking for another tenant: nothing
    assert trail.entries(scoped) == []
    own = audit.AuditQuery.parse("", visible_tenant="a")
    assert [e.tenant for e in trail.entries(own)] == ["a", "a"]
    assert [own.matches(e) for e in entries(trail)] == [True, False, True]
    assert len(trail.entries(audit.AuditQuery.parse(""))) == 3
