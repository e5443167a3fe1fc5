"""The SDK's typed surface: what a user's code sees under `mypy --strict` (response and
stream item types, keyword fields checked per request, typed options and errors), and the
runtime behaviour behind those types (JSON-string well-known types, refused values, errors
read from sync and aio calls alike)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from machineserver.sdk import AsyncClient, Client, errors
from machineserver.sdk.errors import from_rpc_error
from tests.helpers.tools import mypy_errors

# Code a user writes. Lines marked "# E: CODE" must be refused by mypy with that error
# code; every other line must type-check under --strict.
USER_CODE = '''
from __future__ import annotations

import contextlib
from typing import assert_type

import grpc
from google.rpc import error_details_pb2

from machineserver.sdk import AsyncClient, Client, errors
from machineserver.sdk.errors import MachineServerError
from machineserver.v1 import coverage_pb2, session_pb2, telemetry_pb2


async def reads(c: AsyncClient) -> None:
    assert_type(await c.sessions.get_session(name="sessions/x"), session_pb2.GetSessionResponse)
    async for event in c.sessions.stream_session_events(name=""):
        assert_type(event, session_pb2.StreamSessionEventsResponse)
    async with contextlib.aclosing(c.telemetry.stream_host_status(interval="0.5s")) as stream:
        async for sample in stream:
            assert_type(sample, telemetry_pb2.StreamHostStatusResponse)
    async for data in c.console("sessions/x"):
        assert_type(data, bytes)
    await c.sessions.create_session(board_template="lm3s6965evb", labels={"team": "fw"},
                                    options={"coverage": True}, timeout=None)
    await c.coverage.export_coverage(name="sessions/x", format=coverage_pb2.COVERAGE_FORMAT_LCOV).aclose()
    await c.coverage.export_coverage(name="sessions/x", format="COVERAGE_FORMAT_HTML").aclose()


def errors_and_options(c: Client) -> None:
    try:
        c.sessions.get_session(session_pb2.GetSessionRequest(name="sessions/x"), timeout=2.5,
                               metadata=[("x-request-id", "r1"), ("x-blob-bin", b"\\x00")])
    except errors.InvalidArgument as exc:
        assert_type(exc.field_violations, list[tuple[str, str]])
        assert_type(exc.detail(error_details_pb2.RetryInfo), error_details_pb2.RetryInfo | None)
        as_builtin: ValueError = exc  # also the builtin exception it stands for
        assert_type(str(as_builtin), str)
    except MachineServerError as exc:
        assert_type(exc.code, grpc.StatusCode)
        assert_type(exc.request_id, str)
    with contextlib.closing(c.sessions.stream_console(name="sessions/x")) as console:
        for chunk in console:
            assert_type(chunk.data, bytes)


def mistakes(c: Client) -> None:
    c.sessions.get_session(nam="sessions/x")  # E: call-arg
    c.sessions.list_sessions(page_size="10")  # E: arg-type
    c.sessions.get_session(name="sessions/x", timeout="5")  # E: arg-type
    c.sessions.create_session(labels=["team=fw"])  # E: arg-type
    c.sessions.create_session(limits=5)  # E: arg-type
    c.coverage.export_coverage(name="sessions/x", format=2.5)  # E: arg-type
    c.sessions.get_session(session_pb2.ListSessionsRequest())  # E: arg-type
    c.sessions.get_session(name="sessions/x").sessions  # E: attr-defined
    Client.connect("localhost:1", metadata=[("k", 5)])  # E: list-item
    Client.connect("localhost:1", channel_args={"grpc.max_receive_message_length": 1.5})  # E: dict-item
'''


def test_user_code_is_typed_under_mypy_strict(tmp_path: Path) -> None:
    got, expected, output = mypy_errors(USER_CODE, tmp_path)
    assert len(expected) == 10
    assert got == expected, output


def test_a_bare_rpc_error_is_unknown() -> None:
    exc = from_rpc_error(grpc.RpcError("raised outside a call"))
    assert isinstance(exc, errors.Unknown)
    assert exc.code is grpc.StatusCode.UNKNOWN and exc.message == "raised outside a call"


def test_sync_errors_keep_field_violations_and_request_id(sync_client: Client) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        sync_client.sessions.get_session(name="bad/name/here", metadata=[("x-request-id", "sync-rid-1")])
    assert exc.value.request_id == "sync-rid-1"
    assert exc.value.field_violations == [("name", "'bad/name/here' is not a sessions resource name (sessions/ID)")]
    info = exc.value.error_info
    assert info is not None and info.reason == "INVALID_ARGUMENT"


async def test_well_known_types_from_their_json_strings(client: AsyncClient) -> None:
    stream = client.telemetry.stream_host_status(interval="0.05s")
    try:
        first = await anext(stream)
    finally:
        await stream.aclose()
    assert first.status.cpu_percent >= 0 and first.status.HasField("time")
    with pytest.raises(errors.InvalidArgument) as exc:  # the server read 1 ms: below its floor (0 means default)
        await anext(client.telemetry.stream_host_status(interval="0.001s"))
    assert [field for field, _ in exc.value.field_violations] == ["interval"]


async def test_values_a_field_cannot_hold_are_refused_before_the_call(client: AsyncClient) -> None:
    with pytest.raises(TypeError, match=r"ReadRegistersRequest\.names: a repeated field takes a list, not str"):
        await client.debug.read_registers(name="sessions/x", names="pc")  # a str is an Iterable[str] to mypy
    with pytest.raises(TypeError, match=r"StreamHostStatusRequest\.interval"):
        await anext(client.telemetry.stream_host_status(interval="soon"))
    with pytest.raises(ValueError, match="unknown program format 'zip'"):
        await client.upload_program(b"\x00" * 4, format="zip")
