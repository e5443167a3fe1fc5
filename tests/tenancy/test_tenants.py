"""Tenants through the real gRPC API: a tenant never sees, lists or touches another's
sessions, programs, snapshots, board templates, coverage reports, co-simulations (and
their snapshots) or alert rules. Such a resource answers NOT_FOUND with the same text as
an id that does not exist; lists show only the caller's own; admins see every tenant's;
page tokens do not cross tenants; program deduplication is per tenant; a restarted
server keeps every record's tenant; with authentication off the local admin sees every
tenant's records. Callers are real API keys (conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import start
from machineserver.server.core import boards
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from tests.cosim.test_cosim import pingpong
from tests.helpers.api import upload
from tests.helpers.firmware import firmware
from tests.tenancy.conftest import Tenants, connect, create_keys, server_config, tenants_on

BOARD = "mps2-an385"


async def not_found(call: Callable[[], Awaitable[Any]]) -> str:
    """The NOT_FOUND message ``call`` gets (fails on any other outcome)."""
    with pytest.raises(errors.NotFound) as exc:
        await call()
    return exc.value.message


async def same_as_missing(call: Callable[[str], Awaitable[Any]], other_tenants: str, missing: str) -> None:
    """``call(name)`` for another tenant's resource answers exactly as for a name that
    does not exist (the id aside): nothing tells the two apart."""
    hidden = await not_found(lambda: call(other_tenants))
    absent = await not_found(lambda: call(missing))
    for name, ids in ((other_tenants, "hidden"), (missing, "absent")):
        for part in name.split("/")[1::2]:  # the ids of "collection/ID[/collection/ID]"
            if ids == "hidden":
                hidden = hidden.replace(part, "ID")
            else:
                absent = absent.replace(part, "ID")
    assert hidden == absent


async def session_of(client: AsyncClient, program: str = "", **kw: Any) -> str:
    s = (await client.sessions.create_session(board_template=BOARD, program=program, backend="unicorn", **kw)).session
    return str(s.name)


async def test_sessions_belong_to_their_tenant(tenants: Tenants) -> None:
    a, b, admin = tenants.a, tenants.b, tenants.admin
    prog_a = await upload(a, BOARD, "hello")
    s_a = (await a.sessions.create_session(board_template=BOARD, program=prog_a, backend="unicorn",
                                           power_on=True)).session
    assert (s_a.owner, s_a.tenant) == ("apikey:alice", "a")
    s_b = await session_of(b)
    missing = "sessions/s-000000000000"

    # every way B could reach A's session: NOT_FOUND, as for a missing one
    for call in (
        lambda n: b.sessions.get_session(name=n),
        lambda n: b.sessions.delete_session(name=n),
        lambda n: b.sessions.power_on_session(name=n),
        lambda n: b.sessions.power_off_session(name=n),
        lambda n: b.sessions.run_session(name=n),
        lambda n: b.sessions.reset_session(name=n),
        lambda n: b.sessions.load_program(name=n, program=prog_a),
        lambda n: b.sessions.write_console(name=n, data=b"x"),
        lambda n: b.sessions.create_snapshot(name=n),
        lambda n: b.debug.read_memory(name=n, address=0x20000000, size=4),
        lambda n: b.debug.write_memory(name=n, address=0x20000000, data=b"\0"),
        lambda n: b.debug.read_registers(name=n),
        lambda n: b.debug.step(name=n, count=1),
        lambda n: b.debug.set_breakpoint(name=n, location={"address": 0x100}),
        lambda n: b.debug.start_gdb_server(name=n),
        lambda n: b.telemetry.get_session_metrics(name=n),
        lambda n: b.coverage.start_coverage(name=n),
    ):
        await same_as_missing(call, s_a.name, missing)

    async def stream_first(n: str) -> None:
        async for _ in b.sessions.stream_console(name=n, follow=False):
            pass

    await same_as_missing(stream_first, s_a.name, missing)

    async def attach(n: str) -> None:
        async for _ in b.debug.attach([dpb.AttachRequest(open=dpb.AttachOpen(name=n, control=True))]):
            pass

    await same_as_missing(attach, s_a.name, missing)

    # the lists: each tenant its own; the admin every tenant's, or one tenant's with tenant=T
    assert [s.name for s in (await a.sessions.list_sessions()).sessions] == [s_a.name]
    assert [s.name for s in (await b.sessions.list_sessions()).sessions] == [s_b]
    assert {s.name for s in (await admin.sessions.list_sessions()).sessions} == {s_a.name, s_b}
    assert [s.name for s in (await admin.sessions.list_sessions(filter="tenant=b")).sessions] == [s_b]
    assert (await b.sessions.list_sessions(filter="tenant=a")).sessions == []
    # the admin reaches A's session; A is untouched by all of B's attempts
    got = (await admin.sessions.get_session(name=s_a.name)).session
    assert got.state == cpb.SESSION_STATE_HALTED and got.tenant == "a"
    await a.debug.step(name=s_a.name, count=1)


async def test_session_events_reach_only_their_tenant(tenants: Tenants) -> None:
    a, b = tenants.a, tenants.b
    before_a = await session_of(a)
    events = b.sessions.stream_session_events()
    first = await events.__anext__()
    assert before_a not in [s.name for s in first.subscribed.sessions]
    await session_of(a)  # an event B must not see
    mine = await session_of(b)
    nxt = await asyncio.wait_for(events.__anext__(), 20)
    assert nxt.session == mine
    with contextlib.suppress(Exception):
        await events.aclose()


async def test_programs_deduplicate_per_tenant(tenants: Tenants) -> None:
    a, b, admin = tenants.a, tenants.b, tenants.admin
    image = firmware(BOARD, "hello").read_bytes()
    up_a = await a.upload_program(image)
    assert not up_a.deduplicated and up_a.program.tenant == "a" and up_a.program.owner == "apikey:alice"
    again = await a.upload_program(image)
    assert again.deduplicated and again.program.name == up_a.program.name
    # the same bytes from B: B's own record, not A's, and no hint that A has them
    up_b = await b.upload_program(image)
    assert not up_b.deduplicated and up_b.program.name != up_a.program.name
    assert up_b.program.tenant == "b" and up_b.program.sha256 == up_a.program.sha256

    missing = "programs/0000000000000000"
    await same_as_missing(lambda n: b.sessions.get_program(name=n), up_a.program.name, missing)
    await same_as_missing(lambda n: b.sessions.delete_program(name=n), up_a.program.name, missing)
    await same_as_missing(lambda n: b.sessions.create_session(board_template=BOARD, program=n, backend="unicorn"),
                          up_a.program.name, missing)
    s_b = await session_of(b)
    await same_as_missing(lambda n: b.sessions.load_program(name=s_b, program=n), up_a.program.name, missing)

    assert [p.name for p in (await a.sessions.list_programs()).programs] == [up_a.program.name]
    assert [p.name for p in (await b.sessions.list_programs()).programs] == [up_b.program.name]
    assert (await b.sessions.list_programs(filter=f"sha256={up_a.program.sha256} AND tenant=a")).programs == []
    assert {p.name for p in (await admin.sessions.list_programs()).programs} == {up_a.program.name,
                                                                                  up_b.program.name}
    # B deleting its copy leaves A's program (and the shared bytes) in place
    await b.sessions.delete_program(name=up_b.program.name)
    s_a = await session_of(a, up_a.program.name, power_on=True)
    await a.debug.step(name=s_a, count=1)


async def test_snapshots_belong_to_their_tenant(tenants: Tenants) -> None:
    a, b, admin = tenants.a, tenants.b, tenants.admin
    s_a = await session_of(a, await upload(a, BOARD, "hello"), power_on=True)
    snap = (await a.sessions.create_snapshot(name=s_a)).snapshot
    assert snap.tenant == "a" and snap.owner == "apikey:alice"
    s_b = await session_of(b, await upload(b, BOARD, "hello"), power_on=True)
    missing = "snapshots/snap-000000000000"
    await same_as_missing(lambda n: b.sessions.get_snapshot(name=n), snap.name, missing)
    await same_as_missing(lambda n: b.sessions.delete_snapshot(name=n), snap.name, missing)
    await same_as_missing(lambda n: b.sessions.restore_snapshot(name=s_b, snapshot=n), snap.name, missing)

    async def export(n: str) -> None:
        async for _ in b.sessions.export_snapshot(name=n):
            pass

    await same_as_missing(export, snap.name, missing)
    assert (await b.sessions.list_snapshots()).snapshots == []
    assert [s.name for s in (await a.sessions.list_snapshots()).snapshots] == [snap.name]
    assert [s.name for s in (await admin.sessions.list_snapshots(filter="tenant=a")).snapshots] == [snap.name]
    await a.sessions.restore_snapshot(name=s_a, snapshot=snap.name)


def template_config(name: str) -> str:
    data = yaml.safe_load(boards.shipped_board_texts()[BOARD])
    data["name"] = name
    return yaml.safe_dump(data)


async def test_board_templates_belong_to_their_tenant(tenants: Tenants) -> None:
    a, b, admin = tenants.a, tenants.b, tenants.admin
    # creating, changing and deleting templates takes the admin role (api/auth.py): an
    # admin key of tenant "a" makes one of tenant a's
    mine = (await tenants.a_admin.capabilities.create_board_template(
        config=template_config("board-of-a"))).board_template
    assert mine.tenant == "a" and mine.owner == "apikey:alice-admin"
    missing = "boardTemplates/no-such-board"
    await same_as_missing(lambda n: b.capabilities.get_board_template(name=n), mine.name, missing)
    # (B may not change templates at all: PERMISSION_DENIED for the method, whichever the
    # template; the core's NOT_FOUND for another tenant's is in test_core.py)
    with pytest.raises(errors.PermissionDenied):
        await b.capabilities.delete_board_template(name=mine.name)
    await same_as_missing(lambda n: b.sessions.create_session(board_template=n, backend="unicorn"),
                          mine.name, missing)

    # the shipped templates are everyone's; a user's only its tenant's (and the admin's)
    seen_b = {t.name for t in (await b.capabilities.list_board_templates(page_size=1000)).board_templates}
    seen_a = {t.name for t in (await a.capabilities.list_board_templates(page_size=1000)).board_templates}
    assert f"boardTemplates/{BOARD}" in seen_b and mine.name not in seen_b
    assert seen_a == seen_b | {mine.name}
    assert mine.name in {t.name for t in (await admin.capabilities.list_board_templates(
        page_size=1000)).board_templates}
    assert [t.name for t in (await admin.capabilities.list_board_templates(
        filter="tenant=a")).board_templates] == [mine.name]
    await b.capabilities.get_board_template(name=f"boardTemplates/{BOARD}")
    # GetCapabilities names the boards each backend runs: the shipped ones and the caller's own
    for client, sees_it in ((a, True), (b, False), (admin, True), (b, False)):
        caps = await client.capabilities.get_capabilities()
        unicorn = next(x for x in caps.backends if x.name == "unicorn")
        assert BOARD in unicorn.boards and ("board-of-a" in unicorn.boards) == sees_it
        if not sees_it:
            assert all(f.board != "board-of-a" for x in caps.backends for f in x.board_footprints)
    s = (await a.sessions.create_session(board_template=mine.name, backend="unicorn")).session
    assert s.board == "board-of-a"


async def test_alert_rules_belong_to_their_tenant(tenants: Tenants) -> None:
    a, b, admin = tenants.a, tenants.b, tenants.admin
    rule = (await a.telemetry.create_alert_rule(rule={
        "metric": "cpu.percent", "comparison": "COMPARISON_GREATER", "threshold": 1000, "duration": "0s"})).rule
    assert rule.tenant == "a" and rule.owner == "apikey:alice"
    assert (await b.telemetry.list_alert_rules()).rules == []
    assert [r.name for r in (await a.telemetry.list_alert_rules()).rules] == [rule.name]
    assert [r.name for r in (await admin.telemetry.list_alert_rules()).rules] == [rule.name]
    await same_as_missing(lambda n: b.telemetry.delete_alert_rule(name=n), rule.name, "alertRules/rule-0000000000")
    await a.telemetry.delete_alert_rule(name=rule.name)


async def test_coverage_reports_belong_to_their_tenant(tenants: Tenants) -> None:
    a, b = tenants.a, tenants.b
    prog = str((await a.upload_program(firmware(BOARD, "coverage"))).program.name)
    s_a = (await a.sessions.create_session(board_template=BOARD, program=prog, backend="unicorn", power_on=True,
                                           options={"coverage": True})).session.name
    await a.coverage.start_coverage(name=s_a)
    await a.debug.continue_(name=s_a, wait=True, timeout=60)
    report = (await a.coverage.stop_coverage(name=s_a)).report
    assert report.tenant == "a" and report.owner == "apikey:alice"
    missing = "coverageReports/cov-000000000000"
    await same_as_missing(lambda n: b.coverage.get_coverage_summary(name=n), report.name, missing)
    await same_as_missing(lambda n: b.coverage.merge_coverage(names=[n]), report.name, missing)
    await same_as_missing(lambda n: b.coverage.get_coverage_summary(name=n), s_a, "sessions/s-000000000000")

    async def export(n: str) -> None:
        async for _ in b.coverage.export_coverage(name=n, format="COVERAGE_FORMAT_JSON"):
            pass

    await same_as_missing(export, report.name, missing)
    assert (await b.coverage.list_coverage_reports()).reports == []
    assert [r.name for r in (await a.coverage.list_coverage_reports()).reports] == [report.name]
    merged = (await a.coverage.merge_coverage(names=[report.name, report.name])).report
    assert merged.tenant == "a"


async def test_cosimulations_and_their_snapshots_belong_to_their_tenant(tenants: Tenants) -> None:
    a, b, admin = tenants.a, tenants.b, tenants.admin
    cosim = await pingpong(a)
    assert cosim.tenant == "a" and cosim.owner == "apikey:alice"
    missing = "cosimulations/cosim-000000000000"
    await same_as_missing(lambda n: b.cosim.get_co_simulation(name=n), cosim.name, missing)
    await same_as_missing(lambda n: b.cosim.delete_co_simulation(name=n), cosim.name, missing)
    await same_as_missing(lambda n: b.cosim.step_co_simulation(name=n, count=1), cosim.name, missing)
    await same_as_missing(lambda n: b.cosim.create_co_sim_snapshot(parent=n), cosim.name, missing)
    await same_as_missing(lambda n: b.cosim.list_co_sim_snapshots(parent=n), cosim.name, missing)
    assert (await b.cosim.list_co_simulations()).cosimulations == []
    assert [c.name for c in (await admin.cosim.list_co_simulations()).cosimulations] == [cosim.name]

    await a.cosim.step_co_simulation(name=cosim.name, count=2)
    snap = (await a.cosim.create_co_sim_snapshot(parent=cosim.name)).snapshot
    await same_as_missing(lambda n: b.cosim.restore_co_sim_snapshot(name=n), snap.name,
                          f"{missing}/snapshots/snap-000000000000")
    await same_as_missing(lambda n: b.cosim.delete_co_sim_snapshot(name=n), snap.name,
                          f"{missing}/snapshots/snap-000000000000")

    # B cannot put A's sessions in a co-simulation of its own
    b1 = await session_of(b)
    await same_as_missing(lambda n: b.cosim.create_co_simulation(sessions=[b1, n], sync={"quantum_instructions": 1000}),
                          cosim.sessions[0], "sessions/s-000000000000")
    await a.cosim.restore_co_sim_snapshot(name=snap.name)


async def test_page_tokens_do_not_cross_tenants(tenants: Tenants) -> None:
    a, b = tenants.a, tenants.b
    for _ in range(3):
        await session_of(a)
        await session_of(b)
    page = await a.sessions.list_sessions(page_size=1)
    assert page.next_page_token
    with pytest.raises(errors.InvalidArgument):
        await b.sessions.list_sessions(page_size=1, page_token=page.next_page_token)
    nxt = await a.sessions.list_sessions(page_size=1, page_token=page.next_page_token)
    assert len(nxt.sessions) == 1 and nxt.sessions[0].tenant == "a"

    for i in range(2):
        await tenants.a_admin.capabilities.create_board_template(config=template_config(f"tok-{i}"))
    templates = await a.capabilities.list_board_templates(page_size=1)
    assert templates.next_page_token
    with pytest.raises(errors.InvalidArgument):
        await b.capabilities.list_board_templates(page_size=1, page_token=templates.next_page_token)


async def test_a_restarted_server_keeps_every_records_tenant(tmp_path: Path) -> None:
    """Records keep their tenant across a restart; with authentication off afterwards the
    local admin (tenant "default") sees every tenant's, and makes "default" records."""
    data = tmp_path / "data"
    image = firmware(BOARD, "hello").read_bytes()
    names: dict[str, dict[str, str]] = {}
    running = await start(server_config(data))
    try:
        secrets = await create_keys(running, (tmp_path / "admin.key").read_text().strip())
        async with tenants_on(running, secrets) as t:
            for who, client in (("a", t.a), ("b", t.b)):
                prog = (await client.upload_program(image)).program.name
                sess = await session_of(client, prog, power_on=True)
                snap = (await client.sessions.create_snapshot(name=sess)).snapshot.name
                names[who] = {"program": prog, "session": sess, "snapshot": snap}
    finally:
        await running.stop(0.5)

    running = await start(server_config(data))
    try:
        async with tenants_on(running, secrets) as t:
            for who, client, other in (("a", t.a, "b"), ("b", t.b, "a")):
                got = (await client.sessions.get_session(name=names[who]["session"])).session
                assert got.tenant == who and got.state == cpb.SESSION_STATE_OFF
                assert [s.name for s in (await client.sessions.list_sessions()).sessions] == [names[who]["session"]]
                assert [p.name for p in (await client.sessions.list_programs()).programs] == [names[who]["program"]]
                assert [s.name for s in (await client.sessions.list_snapshots()).snapshots] == [
                    names[who]["snapshot"]]
                theirs = names[other]
                await not_found(functools.partial(client.sessions.get_session, name=theirs["session"]))
                await not_found(functools.partial(client.sessions.get_program, name=theirs["program"]))
                await not_found(functools.partial(client.sessions.get_snapshot, name=theirs["snapshot"]))
            # the same bytes again: still deduplicated within the tenant after the restart
            assert (await t.a.upload_program(image)).deduplicated
            await t.a.sessions.power_on_session(name=names["a"]["session"])  # its program, by id
    finally:
        await running.stop(0.5)

    running = await start(server_config(data, auth=False))
    try:
        async with await connect(running, None) as local:
            listed = {s.name: s.tenant for s in (await local.sessions.list_sessions()).sessions}
            assert listed == {names["a"]["session"]: "a", names["b"]["session"]: "b"}
            s = (await local.sessions.create_session(board_template=BOARD, backend="unicorn")).session
            assert (s.tenant, s.owner) == ("default", "anonymous")
            await local.sessions.restore_snapshot(name=names["b"]["session"], snapshot=names["b"]["snapshot"])
    finally:
        await running.stop(0.5)
