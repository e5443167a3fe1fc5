"""The audit log through the real gRPC API: what a mutating RPC, a failing one, a debug
write and an Attach command write; what reading and stepping do not; list filters, pages,
time ranges; the stream's replay then live entries; bad requests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time

import pytest
from google.protobuf import timestamp_pb2

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from machineserver.server.core.calls import CallInfo
from machineserver.v1 import audit_pb2 as apb
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.api import until, upload
from tests.helpers.firmware import elf_symbol

S = "/machineserver.v1.SessionService/"
D = "/machineserver.v1.DebugService/"
T = "/machineserver.v1.TelemetryService/"
RULE = {"metric": "cpu.percent", "comparison": "COMPARISON_GREATER", "threshold": 99, "duration": "0s"}


async def events(client: AsyncClient, filter: str = "", page_size: int = 0, **times: object) -> list[apb.AuditEvent]:
    """Every entry the filter matches, following the pages."""
    out: list[apb.AuditEvent] = []
    token = ""
    while True:
        page = await client.audit.list_audit_events(filter=filter, page_size=page_size, page_token=token,
                                                    **times)  # type: ignore[arg-type]
        out += page.events
        token = page.next_page_token
        if not token:
            return out


def rid(name: str) -> list[tuple[str, str]]:
    return [("x-request-id", name)]


async def halted_session(client: AsyncClient) -> str:
    prog = await upload(client, "lm3s6965evb", "hello")
    return (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session.name


async def test_a_mutating_rpc_writes_one_entry_and_reads_write_none(client: AsyncClient) -> None:
    before = time.time()
    s = (await client.sessions.create_session(board_template="lm3s6965evb", metadata=rid("audit-create-1"))).session
    await client.sessions.get_session(name=s.name)
    await client.sessions.list_sessions()
    await client.capabilities.get_capabilities()
    await client.audit.list_audit_events()
    after = time.time()
    (e,) = await events(client)
    assert e.method == S + "CreateSession"
    assert (e.principal, e.tenant) == ("anonymous", "default")  # auth off: the local admin
    assert e.resource == s.name and e.code == "OK" and e.request_id == "audit-create-1"
    assert e.transport == apb.AUDIT_TRANSPORT_RPC and e.peer.startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert not e.HasField("address") and not e.HasField("length")
    assert before - 1 <= e.time.ToNanoseconds() / 1e9 <= after + 1 and e.sequence >= 1


async def test_a_failing_rpc_writes_its_error_code(client: AsyncClient) -> None:
    with pytest.raises(errors.NotFound):
        await client.sessions.delete_session(name="sessions/nope", metadata=rid("audit-delete-missing"))
    with pytest.raises(errors.MachineServerError) as bad:
        await client.sessions.create_session(board_template="no-such-board", metadata=rid("audit-create-bad"))
    by_rid = {e.request_id: e for e in await events(client)}
    gone = by_rid["audit-delete-missing"]
    assert (gone.method, gone.code, gone.resource) == (S + "DeleteSession", "NOT_FOUND", "sessions/nope")
    created = by_rid["audit-create-bad"]
    assert created.method == S + "CreateSession" and created.code == bad.value.code.name != "OK"
    assert len(by_rid) == 2  # and nothing was created: no OK entry


async def test_debug_writes_record_address_and_length_and_stepping_is_not_audited(client: AsyncClient) -> None:
    name = await halted_session(client)
    start = max(e.sequence for e in await events(client))
    await client.debug.write_memory(name=name, address=0x20001000, data=b"\x01\x02\x03\x04\x05\x06",
                                    metadata=rid("audit-mem"))
    await client.debug.write_register(name=name, register="r7", value=0x1234, metadata=rid("audit-reg"))
    bp = (await client.debug.set_breakpoint(name=name, location={"symbol": "main"}, metadata=rid("audit-bp"))).breakpoint
    await client.debug.step(name=name, count=1)
    await client.debug.read_memory(name=name, address=0x20001000, size=4)
    await client.debug.read_registers(name=name)
    await client.debug.clear_breakpoint(name=name, id=bp.id, metadata=rid("audit-unbp"))
    with pytest.raises(errors.InvalidArgument):
        await client.debug.write_memory(name=name, address=0xFFFFFFFE, data=b"\x00" * 4, metadata=rid("audit-mem-bad"))
    new = [e for e in await events(client) if e.sequence > start]
    assert [e.request_id for e in new] == ["audit-mem", "audit-reg", "audit-bp", "audit-unbp", "audit-mem-bad"]
    mem, reg, setbp, clear, bad = new
    assert (mem.method, mem.resource, mem.address, mem.length, mem.code) == (D + "WriteMemory", name, 0x20001000, 6, "OK")
    assert (reg.method, reg.resource, reg.address, reg.length) == (D + "WriteRegister", f"{name}/registers/r7", 7, 4)
    main = elf_symbol("lm3s6965evb", "hello", "main")
    assert (setbp.method, setbp.resource, setbp.address) == (D + "SetBreakpoint", f"{name}/breakpoints/{bp.id}", main)
    assert (clear.method, clear.resource, clear.address) == (D + "ClearBreakpoint", f"{name}/breakpoints/{bp.id}", main)
    assert (bad.code, bad.address, bad.length) == ("INVALID_ARGUMENT", 0xFFFFFFFE, 4)


async def test_attach_commands_are_audited_as_the_rpcs_they_mirror(client: AsyncClient) -> None:
    name = await halted_session(client)
    start = max(e.sequence for e in await events(client))

    async def requests():  # type: ignore[no-untyped-def]
        yield dpb.AttachRequest(open=dpb.AttachOpen(name=name, control=True))
        yield dpb.AttachRequest(command=dpb.DebugCommand(
            tag=7, write_memory=dpb.WriteMemoryRequest(address=0x20002000, data=b"\xaa\xbb")))
        yield dpb.AttachRequest(command=dpb.DebugCommand(tag=8, read_memory=dpb.ReadMemoryRequest(address=0x20002000, size=2)))
        yield dpb.AttachRequest(command=dpb.DebugCommand(tag=9, step=dpb.StepRequest(count=1)))

    results = [m.result for m in [m async for m in client.debug.attach(requests(), metadata=rid("audit-attach"))]
               if m.HasField("result")]
    assert [r.code for r in results] == [0, 0, 0]
    new = [e for e in await events(client) if e.sequence > start]
    assert len(new) == 1, new  # the read and the step are not audited, nor the stream itself
    (e,) = new
    assert (e.method, e.transport, e.request_id) == (D + "WriteMemory", apb.AUDIT_TRANSPORT_ATTACH, "audit-attach.7")
    assert (e.resource, e.address, e.length, e.code) == (name, 0x20002000, 2, "OK")


async def test_list_filters_pages_and_time_ranges(client: AsyncClient) -> None:
    rules = [(await client.telemetry.create_alert_rule(rule=RULE)).rule.name for _ in range(3)]
    boundary = time.time()
    await asyncio.sleep(0.05)
    s = (await client.sessions.create_session(board_template="lm3s6965evb")).session.name
    await client.telemetry.delete_alert_rule(name=rules[0])
    with pytest.raises(errors.NotFound):
        await client.telemetry.delete_alert_rule(name=rules[0])
    everything = await events(client)
    assert len(everything) == 6
    assert [e.sequence for e in everything] == sorted(e.sequence for e in everything)

    def methods(evs: list[apb.AuditEvent]) -> list[str]:
        return [e.method.rsplit("/", 1)[1] for e in evs]

    assert methods(await events(client, "method=CreateAlertRule")) == ["CreateAlertRule"] * 3
    assert methods(await events(client, f"method={T}CreateAlertRule")) == ["CreateAlertRule"] * 3
    assert methods(await events(client, "code=NOT_FOUND")) == ["DeleteAlertRule"]
    assert methods(await events(client, "code=not_found AND method=DeleteAlertRule")) == ["DeleteAlertRule"]
    assert methods(await events(client, f"resource={rules[0]}")) == ["CreateAlertRule", "DeleteAlertRule", "DeleteAlertRule"]
    assert methods(await events(client, f"resource={s}")) == ["CreateSession"]
    assert len(await events(client, "principal=anonymous AND tenant=default AND transport=rpc")) == 6
    assert await events(client, "principal=somebody-else") == []
    assert await events(client, "transport=gdb") == []
    at = timestamp_pb2.Timestamp()
    at.FromNanoseconds(int(boundary * 1e9))
    assert methods(await events(client, start_time=at)) == ["CreateSession", "DeleteAlertRule", "DeleteAlertRule"]
    assert methods(await events(client, end_time=at)) == ["CreateAlertRule"] * 3
    # pages: two at a time, the same entries in the same order
    paged = await events(client, page_size=2)
    assert [e.sequence for e in paged] == [e.sequence for e in everything]
    first = await client.audit.list_audit_events(page_size=4)
    assert len(first.events) == 4 and first.next_page_token
    rest = await client.audit.list_audit_events(page_size=4, page_token=first.next_page_token)
    assert [e.sequence for e in rest.events] == [e.sequence for e in everything[4:]] and not rest.next_page_token


@pytest.mark.parametrize(("request_fields", "field"), [
    ({"filter": "bogus=1"}, "filter"),
    ({"filter": "code=NOPE"}, "filter"),
    ({"filter": "transport=carrier-pigeon"}, "filter"),
    ({"filter": "method"}, "filter"),
    ({"page_size": -1}, "page_size"),
    ({"page_token": "not a token"}, "page_token"),
    ({"page_token": base64.urlsafe_b64encode(json.dumps({"a": 1e400, "f": "x"}).encode()).decode()}, "page_token"),
    ({"start_time": "1970-01-01T00:00:20Z", "end_time": "1970-01-01T00:00:10Z"}, "end_time"),
])
async def test_bad_list_requests_are_invalid_argument(client: AsyncClient, request_fields: dict[str, object],
                                                      field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.audit.list_audit_events(**request_fields)  # type: ignore[arg-type]
    assert field in [f for f, _ in exc.value.field_violations] or field in str(exc.value)


async def test_a_page_token_belongs_to_its_query(client: AsyncClient) -> None:
    for _ in range(3):
        await client.telemetry.create_alert_rule(rule=RULE)
    token = (await client.audit.list_audit_events(page_size=1)).next_page_token
    assert token
    with pytest.raises(errors.InvalidArgument):
        await client.audit.list_audit_events(page_size=1, page_token=token, filter="code=OK")


async def test_stream_replays_then_follows_live_and_ends_with_its_caller(client: AsyncClient,
                                                                         server: RunningServer) -> None:
    first = (await client.telemetry.create_alert_rule(rule=RULE)).rule.name
    second = (await client.telemetry.create_alert_rule(rule=RULE)).rule.name
    await client.sessions.create_session(board_template="lm3s6965evb")
    old = await events(client)
    stream = client.audit.stream_audit_events(after_sequence=old[0].sequence, filter="method=CreateAlertRule",
                                              timeout=None)
    replayed = await asyncio.wait_for(stream.__anext__(), 10)
    assert replayed.event.sequence == old[1].sequence and replayed.event.resource == second
    # the stream is in place: what is written now comes live, filtered
    await client.sessions.create_session(board_template="lm3s6965evb")
    third = (await client.telemetry.create_alert_rule(rule=RULE, metadata=rid("audit-live"))).rule.name
    live = await asyncio.wait_for(stream.__anext__(), 10)
    assert (live.event.resource, live.event.request_id) == (third, "audit-live")
    assert first not in (replayed.event.resource, live.event.resource)
    assert server.engine.audit.events.subscriber_count == 1
    await stream.aclose()
    await until(lambda: server.engine.audit.events.subscriber_count == 0, what="the stream's subscription closed")


async def test_stream_from_zero_sends_only_new_entries(client: AsyncClient) -> None:
    for _ in range(2):
        await client.telemetry.create_alert_rule(rule=RULE)
    newest = max(e.sequence for e in await events(client))
    stream = client.audit.stream_audit_events(timeout=None)
    got: list[apb.StreamAuditEventsResponse] = []

    async def read_one() -> None:
        got.append(await stream.__anext__())

    reader = asyncio.create_task(read_one())
    try:
        # the subscription starts when the server runs the stream: write until one comes
        for _ in range(100):
            await client.telemetry.create_alert_rule(rule=RULE)
            done, _ = await asyncio.wait({reader}, timeout=0.1)
            if done:
                break
        assert got, "no live entry arrived"
        assert got[0].event.sequence > newest and got[0].event.method == T + "CreateAlertRule"
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await stream.aclose()


async def test_a_slow_stream_reader_misses_nothing(client: AsyncClient, server: RunningServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscriber's queue is bounded; one that overflows re-reads the gap from the log."""
    await client.telemetry.create_alert_rule(rule=RULE)
    base = (await client.telemetry.create_alert_rule(rule=RULE)).rule.name
    start = (await events(client))[0].sequence
    stream = client.audit.stream_audit_events(after_sequence=start, timeout=None)  # 0 would mean: only new
    first = await asyncio.wait_for(stream.__anext__(), 10)
    assert first.event.resource == base
    subs = list(server.engine.audit.events._subs)
    assert len(subs) == 1
    monkeypatch.setattr(subs[0], "_maxlen", 3)
    # a burst the stream cannot take in between (written in one go on the server's loop)
    burst = [f"burst-{i}" for i in range(12)]
    for request_id in burst:
        call = CallInfo(T + "CreateAlertRule", request_id, {})
        server.engine.audit.write(call)
    assert subs[0].dropped == 9
    received = [(await asyncio.wait_for(stream.__anext__(), 10)).event.request_id for _ in burst]
    assert received == burst
    await stream.aclose()
