"""R5, the auth matrix: every RPC of every served service (from the descriptors, so a new
RPC cannot be missed) x {no credentials, bad key, expired JWT, too small a role, wrong
tenant}, over real gRPC with a minimal request of the right type (streams too): every call
denied, with the right code.

Wrong tenant: the RPCs that name a session, program, snapshot or alert rule are sent with
the name of one that tenant "a" owns, by an operator of tenant "b": NOT_FOUND, as if it did
not exist (never PERMISSION_DENIED: ids do not leak). The other RPCs name no resource of
another tenant (List*, Create*, uploads, host status, access, audit); for the List RPCs the
test checks that tenant b's lists do not show tenant a's records.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc import aio

from machineserver.server.api.auth import required_roles
from machineserver.server.api.server import SERVICES
from machineserver.server.core.identity import Role
from tests.auth.conftest import AuthServer
from tests.helpers.api import upload

CALL_TIMEOUT = 10.0


def served_services() -> list[ServiceDescriptor]:
    return [file.services_by_name[name] for _, _, file, name in SERVICES]


def served_methods() -> list[tuple[ServiceDescriptor, MethodDescriptor]]:
    return [(svc, m) for svc in served_services() for m in svc.methods]


def full_name(svc: ServiceDescriptor, method: MethodDescriptor) -> str:
    return f"/{svc.full_name}/{method.name}"


def _ser(msg: Message) -> bytes:
    return msg.SerializeToString()


async def call_code(channel: aio.Channel, svc: ServiceDescriptor, method: MethodDescriptor,
                    metadata: tuple[tuple[str, str], ...], fill: Callable[[Message], None] | None = None
                    ) -> grpc.StatusCode:
    """The status code one call ends with (a stream: after its first message, or its end)."""
    request_cls = GetMessageClass(method.input_type)
    response_cls = GetMessageClass(method.output_type)
    request = request_cls()
    if fill is not None:
        fill(request)
    path = full_name(svc, method)
    try:
        if not method.client_streaming and not method.server_streaming:
            await channel.unary_unary(path, request_serializer=_ser, response_deserializer=response_cls.FromString)(
                request, metadata=metadata, timeout=CALL_TIMEOUT)
        elif method.client_streaming and not method.server_streaming:
            await channel.stream_unary(path, request_serializer=_ser, response_deserializer=response_cls.FromString)(
                iter([request]), metadata=metadata, timeout=CALL_TIMEOUT)
        else:
            if method.client_streaming:
                stream: Any = channel.stream_stream(path, request_serializer=_ser,
                                                    response_deserializer=response_cls.FromString)(
                    iter([request]), metadata=metadata, timeout=CALL_TIMEOUT)
            else:
                stream = channel.unary_stream(path, request_serializer=_ser,
                                              response_deserializer=response_cls.FromString)(
                    request, metadata=metadata, timeout=CALL_TIMEOUT)
            try:
                async for _ in stream:
                    break
            finally:
                stream.cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert isinstance(code, grpc.StatusCode)
        return code


@pytest.fixture
async def channel(auth_server: AuthServer) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(auth_server.target) as ch:
        yield ch


def test_every_served_rpc_has_a_role() -> None:
    table = required_roles(served_services())
    missing = [full_name(s, m) for s, m in served_methods() if full_name(s, m) not in table]
    assert not missing
    # the exceptions table names only RPCs that exist (a renamed RPC would leave a stale entry)
    from machineserver.server.api.auth import ROLE_EXCEPTIONS

    names = {f"{s.name}/{m.name}" for s, m in served_methods()}
    assert set(ROLE_EXCEPTIONS) <= names
    # reads are viewer's, the caller's identity anyone's, the rest operator's or admin's
    assert table["/machineserver.v1.SessionService/ListSessions"] == Role.VIEWER
    assert table["/machineserver.v1.AccessService/GetCallerIdentity"] is None
    assert table["/machineserver.v1.DebugService/WriteMemory"] == Role.OPERATOR
    assert table["/machineserver.v1.AccessService/CreateApiKey"] == Role.ADMIN


async def test_unauthenticated_callers_are_refused_everywhere(auth_server: AuthServer, channel: aio.Channel) -> None:
    expired = auth_server.tokens.mint(exp_in=-3600)
    cases = {"no credentials": (), "bad key": (("authorization", "ApiKey msk_" + "x" * 43),),
             "bad x-api-key": (("x-api-key", "nope"),), "expired JWT": (("authorization", f"Bearer {expired}"),)}
    wrong = []
    total = 0
    for case, metadata in cases.items():
        for svc, method in served_methods():
            total += 1
            code = await call_code(channel, svc, method, metadata)
            if code != grpc.StatusCode.UNAUTHENTICATED:
                wrong.append(f"{case}: {full_name(svc, method)} -> {code.name}")
    assert not wrong, f"{len(wrong)} of {total} calls not UNAUTHENTICATED: {wrong}"
    assert total == 4 * len(served_methods()) and len(served_methods()) > 80


async def test_too_small_a_role_is_refused_everywhere(auth_server: AuthServer, channel: aio.Channel) -> None:
    no_role = auth_server.tokens.mint("nobody", roles=[])
    smaller = {Role.VIEWER: (("authorization", f"Bearer {no_role}"),),
               Role.OPERATOR: (("authorization", "ApiKey " + await auth_server.key(["viewer"])),),
               Role.ADMIN: (("authorization", "ApiKey " + await auth_server.key(["operator"])),)}
    table = required_roles(served_services())
    wrong, checked, open_to_all = [], 0, []
    for svc, method in served_methods():
        needed = table[full_name(svc, method)]
        if needed is None:
            open_to_all.append(method.name)
            continue
        checked += 1
        code = await call_code(channel, svc, method, smaller[needed])
        if code != grpc.StatusCode.PERMISSION_DENIED:
            wrong.append(f"{full_name(svc, method)} (needs {needed.name}) -> {code.name}")
    assert not wrong, wrong
    assert open_to_all == ["GetCallerIdentity"] and checked == len(served_methods()) - 1


def _resource_kind(svc: ServiceDescriptor, method: MethodDescriptor) -> str:
    """Which of tenant a's resources the request's ``name`` names ("" when none)."""
    if "name" not in method.input_type.fields_by_name or method.name.startswith("List"):
        return ""
    if svc.name in ("AccessService", "AuditService", "CapabilitiesService", "CoSimService"):
        return ""  # API keys are admin-only; templates and co-simulations are not created here
    if "Program" in method.name and method.name != "LoadProgram":
        return "program"
    if "Snapshot" in method.name and method.name not in ("CreateSnapshot", "ImportSnapshot"):
        return "snapshot"
    if "AlertRule" in method.name:
        return "alert_rule"
    if svc.name == "CoverageService" and method.name == "MergeCoverage":
        return ""
    if svc.name == "JobService":
        return "job"
    if svc.name == "CapsuleService" and method.name != "CreateCapsule":
        return "capsule"
    return "session"


async def test_another_tenants_resources_are_not_found(auth_server: AuthServer, channel: aio.Channel) -> None:
    from machineserver.sdk import AsyncClient

    owner_key = await auth_server.key(["operator"], tenant="a", name="alice")
    other_key = await auth_server.key(["operator"], tenant="b", name="bob")
    async with await AsyncClient.connect(auth_server.target, api_key=owner_key, timeout=30) as alice:
        program = await upload(alice, "lm3s6965evb", "hello")
        session = (await alice.sessions.create_session(board_template="lm3s6965evb", program=program,
                                                       power_on=True)).session.name
        snapshot = (await alice.sessions.create_snapshot(name=session)).snapshot.name
        capsule = (await alice.capsules.create_capsule(name=session)).capsule.name
        rule = (await alice.telemetry.create_alert_rule(rule={
            "display_name": "hot", "metric": "cpu.percent", "comparison": "COMPARISON_GREATER",
            "threshold": 99})).rule.name
        job = (await alice.jobs.create_job(matrix={"programs": [program], "boards": ["lm3s6965evb"]},
                                           criteria={"max_instructions": 1000})).job.name
    names = {"session": session, "program": program, "snapshot": snapshot, "alert_rule": rule, "job": job,
             "capsule": capsule}
    metadata = (("authorization", f"ApiKey {other_key}"),)
    wrong, checked, unaddressed = [], 0, []
    for svc, method in served_methods():
        kind = _resource_kind(svc, method)
        if not kind:
            unaddressed.append(method.name)
            continue
        checked += 1

        def fill(request: Message, name: str = names[kind]) -> None:
            request.name = name  # type: ignore[attr-defined]
            # the fields a request needs besides the name (so it reaches the lookup: an
            # argument refused before it would not tell whether the resource exists either)
            kind_of_request = request.DESCRIPTOR.name
            if kind_of_request == "AttachRequest":
                request.open.name = name  # type: ignore[attr-defined]
            elif kind_of_request == "RestoreSnapshotRequest":
                request.name, request.snapshot = session, snapshot  # type: ignore[attr-defined]
            elif kind_of_request == "ExportCoverageRequest":
                request.format = 1  # type: ignore[attr-defined]  # COVERAGE_FORMAT_LCOV

        code = await call_code(channel, svc, method, metadata, fill)
        if code != grpc.StatusCode.NOT_FOUND:
            wrong.append(f"{full_name(svc, method)} on {names[kind]} -> {code.name}")
    assert not wrong, wrong
    assert checked >= 40
    # the control: the owner reaches the same resources with the same requests
    owner = (("authorization", f"ApiKey {owner_key}"),)
    for svc, method in served_methods():
        if method.name in ("GetSession", "GetProgram", "GetSnapshot", "ReadRegisters", "GetSessionMetrics", "GetJob"):
            def named(request: Message, name: str = names[_resource_kind(svc, method)]) -> None:
                request.name = name  # type: ignore[attr-defined]

            code = await call_code(channel, svc, method, owner, named)
            assert code == grpc.StatusCode.OK, (method.name, code)
    # the rest name no resource of another tenant; their lists do not show tenant a's
    async with await AsyncClient.connect(auth_server.target, api_key=other_key, timeout=30) as bob:
        assert not (await bob.sessions.list_sessions()).sessions
        assert not (await bob.sessions.list_programs()).programs
        assert not (await bob.sessions.list_snapshots()).snapshots
        assert not (await bob.telemetry.list_alert_rules()).rules
        assert not (await bob.jobs.list_jobs()).jobs
        assert not (await bob.capsules.list_capsules()).capsules
        assert not (await bob.capsules.list_capsules(filter=f"session={session}")).capsules
    await asyncio.sleep(0)
