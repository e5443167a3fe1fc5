"""The error boundary: an unexpected exception becomes INTERNAL with a request id (no
traceback to the client) and the server keeps serving; typed SDK errors keep details."""

from __future__ import annotations

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from tests.helpers.server import serving


async def test_unexpected_exception_is_internal_and_server_survives(client: AsyncClient, server: RunningServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> object:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.engine.catalog, "support", boom)
    with pytest.raises(errors.Internal) as exc:
        await client.capabilities.get_capabilities()
    assert "secret" not in exc.value.message and "Traceback" not in exc.value.message
    assert exc.value.request_id and exc.value.request_id in exc.value.message
    monkeypatch.undo()
    assert (await client.capabilities.get_capabilities()).backends


async def test_request_id_from_the_caller_is_kept(client: AsyncClient) -> None:
    with pytest.raises(errors.NotFound) as exc:
        await client.sessions.get_session(name="sessions/x", metadata=[("x-request-id", "my-id-123")])
    assert exc.value.request_id == "my-id-123"
    assert isinstance(exc.value, LookupError)
    assert exc.value.error_info is not None and exc.value.error_info.reason == "NOT_FOUND"


async def test_invalid_argument_is_a_value_error_with_the_field(client: AsyncClient) -> None:
    with pytest.raises(ValueError) as exc:
        await client.sessions.get_session(name="bad/name/here")
    assert isinstance(exc.value, errors.InvalidArgument)
    assert exc.value.field_violations == [("name", "'bad/name/here' is not a sessions resource name (sessions/ID)")]


async def test_sdk_refuses_unknown_fields_locally(client: AsyncClient) -> None:
    with pytest.raises(TypeError):
        await client.sessions.get_session(nam="sessions/x")


async def test_coverage_and_cosim_refusals_with_reasons(client: AsyncClient) -> None:
    from machineserver.server.drivers.base import Feature, features_of
    from machineserver.server.drivers.unicorn.backend import UnicornMachine

    s = (await client.sessions.create_session(board_template="lm3s6965evb", backend="unicorn")).session
    if UnicornMachine is None or Feature.COVERAGE not in features_of(UnicornMachine):
        with pytest.raises(errors.Unimplemented) as exc:
            await client.coverage.start_coverage(name=s.name)
        assert exc.value.feature == "coverage" and "does not support coverage" in exc.value.message
    else:  # no program with debug info loaded
        with pytest.raises(errors.FailedPrecondition):
            await client.coverage.start_coverage(name=s.name)
    with pytest.raises(errors.NotFound):
        await client.coverage.start_coverage(name="sessions/nope")
    with pytest.raises(errors.FailedPrecondition):  # nothing collected
        async for _ in client.coverage.export_coverage(name=s.name, format="COVERAGE_FORMAT_LCOV"):
            pass
    with pytest.raises(errors.InvalidArgument) as bad:
        await client.cosim.create_co_simulation(sessions=[s.name])
    assert "two or more sessions" in bad.value.message


async def test_a_refusing_hook_ends_the_chain_and_earlier_hooks_see_after(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from machineserver.server.api.interceptors import CallInfo
    from machineserver.server.config import ServerConfig
    from machineserver.server.core.errors import InvalidArgument

    seen: list[str] = []

    class Recorder:
        async def before(self, call: CallInfo) -> None:
            seen.append(f"before {call.rpc}")

        def after(self, call: CallInfo) -> None:
            seen.append(f"after {call.rpc} {call.code}")

    class Refuser:
        async def before(self, call: CallInfo) -> None:
            raise InvalidArgument("authorization", "refused by a test hook")

        def after(self, call: CallInfo) -> None:
            seen.append("refuser after")

    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path)
    async with serving(config, hooks=[Recorder(), Refuser()]) as (_, c):
        with pytest.raises(errors.InvalidArgument):
            await c.capabilities.get_capabilities()
    assert seen == ["before GetCapabilities", "refuser after", "after GetCapabilities INVALID_ARGUMENT"]
