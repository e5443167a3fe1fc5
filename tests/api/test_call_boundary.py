"""The call boundary's own rules: which hooks are awaited before a call, in which order
they see its end, how log lines name the call, answers serialised before, and that no
service is registered outside the boundary."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import pytest
import structlog

from machineserver.sdk import AsyncClient, errors
from machineserver.server.api.interceptors import CallBoundary, Registrar, preserialized
from machineserver.server.config import ServerConfig
from machineserver.server.core.calls import CURRENT, AfterOnlyHook, CallChain, CallInfo, add_call_context
from machineserver.server.core.errors import FailedPrecondition
from machineserver.server.obs import logging as obs_logging
from machineserver.v1 import capabilities_pb2 as pb
from tests.helpers.server import serving


class Seen(AfterOnlyHook):
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def after(self, call: CallInfo) -> None:
        self.log.append(f"{self.name} after {call.code}")


class Gate:
    def __init__(self, log: list[str], refuse: bool = False) -> None:
        self.log, self.refuse = log, refuse

    async def before(self, call: CallInfo) -> None:
        self.log.append("gate before")
        if self.refuse:
            raise FailedPrecondition("refused")

    def after(self, call: CallInfo) -> None:
        self.log.append(f"gate after {call.code}")


class Audited(AfterOnlyHook):
    """Derives from AfterOnlyHook but has a before of its own: that one must run."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def before(self, call: CallInfo) -> None:
        self.log.append("audited before")


async def _run(chain: CallChain, call: CallInfo) -> None:
    async def operation() -> None:
        return None

    try:
        await chain.run(call, operation)
    except FailedPrecondition:
        pass


async def test_only_hooks_with_a_before_are_awaited_and_ends_go_last_first() -> None:
    log: list[str] = []
    chain = CallChain()
    chain.configure([Seen(log, "first"), Seen(log, "second")], lambda exc: "FAILED_PRECONDITION")
    assert chain.observe_only
    chain.configure([Seen(log, "first"), Gate(log), Seen(log, "last")], lambda exc: "FAILED_PRECONDITION")
    assert not chain.observe_only
    await _run(chain, chain.open("/a.S/M"))
    assert log == ["gate before", "last after OK", "gate after OK", "first after OK"]
    log.clear()
    chain.configure([Seen(log, "first"), Gate(log, refuse=True), Seen(log, "last")],
                    lambda exc: "FAILED_PRECONDITION")
    await _run(chain, chain.open("/a.S/M"))
    # the refusing hook and those before it see the end; the one after it never entered
    assert log == ["gate before", "gate after FAILED_PRECONDITION", "first after FAILED_PRECONDITION"]
    log.clear()
    chain.configure([Audited(log)], lambda exc: "UNKNOWN")
    assert not chain.observe_only
    await _run(chain, chain.open("/a.S/M"))
    assert log == ["audited before"]


def test_log_lines_name_the_current_call() -> None:
    call = CallInfo("/machineserver.v1.SessionService/GetSession", "rid-1", {})
    token = CURRENT.set(call)
    try:
        assert add_call_context(None, "info", {"event": "x"}) == {
            "event": "x", "request_id": "rid-1", "rpc": "GetSession"}
        # a line (or context bound around it) that names its own keeps them
        assert add_call_context(None, "info", {"event": "x", "request_id": "rid-1.3"})["request_id"] == "rid-1.3"
    finally:
        CURRENT.reset(token)
    assert add_call_context(None, "info", {"event": "y"}) == {"event": "y"}


async def test_log_lines_written_while_serving_carry_the_request_id(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    obs_logging.configure("json", "info")
    try:
        cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="info", workers=0)
        async with serving(cfg) as (running, client):
            def boom(*args: object) -> object:
                raise RuntimeError("a bug")

            monkeypatch.setattr(running.engine.catalog, "support", boom)
            with pytest.raises(errors.Internal):
                await client.capabilities.get_capabilities(metadata=[("x-request-id", "rid-logged")])
    finally:
        structlog.reset_defaults()
    lines = [json.loads(x) for x in out.getvalue().splitlines() if x.startswith("{")]
    mine = [x for x in lines if x.get("request_id") == "rid-logged"]
    assert {x["event"] for x in mine} == {"rpc_internal_error", "rpc"}
    assert all(x["rpc"] == "GetCapabilities" for x in mine)
    assert next(x for x in mine if x["event"] == "rpc")["code"] == "INTERNAL"


async def test_an_answer_serialised_before_is_sent_as_it_is(tmp_path: Path) -> None:
    answer = pb.GetCapabilitiesResponse(server_version="9.9", default_backend="x" * 300)

    async def handler(request: object, context: object) -> pb.GetCapabilitiesResponse:
        return preserialized(answer.SerializeToString(), pb.GetCapabilitiesResponse)

    async def plain(request: object, context: object) -> pb.GetCapabilitiesResponse:
        return answer

    chain = CallChain()
    chain.configure([], lambda exc: "UNKNOWN")
    boundary = CallBoundary(chain)
    serializer = pb.GetCapabilitiesResponse.SerializeToString
    wrapped = boundary.wrap("/t.S/Pre", grpc.unary_unary_rpc_method_handler(handler, response_serializer=serializer))
    both = boundary.wrap("/t.S/Plain", grpc.unary_unary_rpc_method_handler(plain, response_serializer=serializer))
    assert wrapped.response_serializer is not None and both.response_serializer is not None
    sent = wrapped.response_serializer(await handler(None, None))
    assert sent == answer.SerializeToString() == both.response_serializer(answer)
    async with serving(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning",
                                    workers=0)) as (_, client):
        caps = await client.capabilities.get_capabilities()  # the server's own, serialised once
        assert caps.api_version == "machineserver.v1" and caps.backends
        assert await client.capabilities.get_capabilities() == caps


def test_a_service_that_cannot_be_wrapped_is_refused() -> None:
    registrar = Registrar(CallBoundary(CallChain()))
    registrar.add_generic_rpc_handlers(())  # an opaque generic handler, no methods by name
    with pytest.raises(RuntimeError, match="call boundary"):
        registrar.table()


async def test_health_and_reflection_pass_through_the_chain(tmp_path: Path) -> None:
    seen: list[str] = []

    class Recorder(AfterOnlyHook):
        def after(self, call: CallInfo) -> None:
            seen.append(call.method)

    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning", workers=0)
    async with serving(cfg, hooks=[Recorder()]) as (running, client):
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        await client.capabilities.get_capabilities()
        assert isinstance(client, AsyncClient)
    assert "/grpc.health.v1.Health/Check" in seen
    assert "/machineserver.v1.CapabilitiesService/GetCapabilities" in seen


def test_invocation_metadata_is_read_when_needed() -> None:
    from machineserver.server.api.interceptors import InvocationMetadata

    md = InvocationMetadata((("user-agent", "grpc-python"), ("trace-bin", b"\x00\x01"), ("x-request-id", "r-9")))
    assert md.request_id() == "r-9"
    assert md._mapping is None  # nothing built for that
    assert dict(md) == {"user-agent": "grpc-python", "x-request-id": "r-9"}  # binary values left out
    assert "trace-bin" not in md and md.get("user-agent") == "grpc-python" and len(md) == 2
    assert md.request_id() == "r-9"
    assert InvocationMetadata(None).request_id() == "" and dict(InvocationMetadata(())) == {}
    assert InvocationMetadata((("x-request-id", b"bytes"),)).request_id() == ""


async def test_hooks_read_the_callers_metadata_and_address(tmp_path: Path) -> None:
    seen: list[tuple[str, str, str]] = []

    class Recorder(AfterOnlyHook):
        def after(self, call: CallInfo) -> None:
            seen.append((call.request_id, call.metadata.get("x-team", ""), call.peer))

    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning", workers=0)
    async with serving(cfg, hooks=[Recorder()]) as (_, client):
        await client.capabilities.get_capabilities(metadata=[("x-team", "fw"), ("x-request-id", "rid-md")])
        await client.capabilities.get_capabilities()
    assert seen[0][:2] == ("rid-md", "fw") and seen[0][2].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert seen[1][0] and seen[1][0] != "rid-md" and seen[1][1] == ""
