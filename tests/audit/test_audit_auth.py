"""The audit log with authentication on: entries name the real caller and tenant (API keys),
refused calls are recorded with their code, GDB packets run as the identity that started
the bridge, and only an admin reads the log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from machineserver.sdk import errors
from machineserver.server.rsp.client import RspClient
from machineserver.v1 import audit_pb2 as apb
from tests.auth.conftest import AuthServer, Tokens, serving_with_auth
from tests.helpers.api import upload

T = "/machineserver.v1.TelemetryService/"
RULE = {"metric": "cpu.percent", "comparison": "COMPARISON_GREATER", "threshold": 99, "duration": "0s"}


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[AuthServer]:
    async with serving_with_auth(tmp_path, Tokens(tmp_path)) as server:
        yield server


async def test_entries_name_the_caller_and_refusals_are_recorded(secured: AuthServer) -> None:
    operator = await secured.key(["operator"], tenant="team-a", name="ci")
    viewer = await secured.key(["viewer"], tenant="team-b", name="watcher")
    async with await secured.client(api_key=operator) as op, await secured.client(api_key=viewer) as view, \
            await secured.client() as nobody, await secured.client(api_key=secured.admin_secret) as admin:
        rule = (await op.telemetry.create_alert_rule(rule=RULE, metadata=[("x-request-id", "by-operator")])).rule.name
        with pytest.raises(errors.PermissionDenied):
            await view.telemetry.create_alert_rule(rule=RULE, metadata=[("x-request-id", "by-viewer")])
        with pytest.raises(errors.Unauthenticated):
            await nobody.telemetry.create_alert_rule(rule=RULE, metadata=[("x-request-id", "by-nobody")])
        for reader in (op, view, nobody):  # the log is the admin's
            with pytest.raises((errors.PermissionDenied, errors.Unauthenticated)):
                await reader.audit.list_audit_events()
        everything = (await admin.audit.list_audit_events(filter=f"method={T}CreateAlertRule", page_size=100)).events
        by_rid = {e.request_id: e for e in everything}
        assert (by_rid["by-operator"].principal, by_rid["by-operator"].tenant) == ("apikey:ci", "team-a")
        assert (by_rid["by-operator"].code, by_rid["by-operator"].resource) == ("OK", rule)
        assert (by_rid["by-viewer"].principal, by_rid["by-viewer"].tenant) == ("apikey:watcher", "team-b")
        assert by_rid["by-viewer"].code == "PERMISSION_DENIED"
        # a refused caller is recorded as unauthenticated, never as the local admin
        nobody_entry = by_rid["by-nobody"]
        assert (nobody_entry.principal, nobody_entry.tenant, nobody_entry.code) == ("unauthenticated", "",
                                                                                   "UNAUTHENTICATED")
        # the admin's own key creations are there too, and filters by tenant work
        keys = (await admin.audit.list_audit_events(filter="method=CreateApiKey")).events
        assert [e.principal for e in keys] == ["apikey:bootstrap-admin"] * 2
        team_a = (await admin.audit.list_audit_events(filter="tenant=team-a")).events
        assert {e.request_id for e in team_a} == {"by-operator"}


async def test_gdb_packets_are_recorded_as_the_identity_that_started_the_bridge(secured: AuthServer) -> None:
    operator = await secured.key(["operator"], tenant="team-a", name="debugger")
    async with await secured.client(api_key=operator) as op:
        prog = await upload(op, "lm3s6965evb", "hello")
        name = (await op.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session.name
        port = (await op.debug.start_gdb_server(name=name)).gdb_server.port
    rsp = await RspClient.connect_tcp("127.0.0.1", port, xml_registers="arm")
    try:
        await rsp.write_memory(0x20000010, b"\x01\x02\x03")
        await rsp.write_register(1, b"\x07\x00\x00\x00")
    finally:
        await rsp.close()
    async with await secured.client(api_key=secured.admin_secret) as admin:
        for _ in range(200):  # the disconnect entry is written as the bridge sees the connection close
            via_gdb = (await admin.audit.list_audit_events(filter="transport=gdb", page_size=100)).events
            if via_gdb and via_gdb[-1].method == "gdb/disconnect":
                break
            await asyncio.sleep(0.02)
    assert {(e.principal, e.tenant) for e in via_gdb} == {("apikey:debugger", "team-a")}
    writes = [(e.method.rsplit("/", 1)[1], e.address, e.length, e.code) for e in via_gdb if "Write" in e.method]
    assert writes == [("WriteMemory", 0x20000010, 3, "OK"), ("WriteRegister", 1, 4, "OK")]
    assert via_gdb[0].method == "gdb/connect" and via_gdb[-1].method == "gdb/disconnect"
    assert all(e.transport == apb.AUDIT_TRANSPORT_GDB for e in via_gdb)
