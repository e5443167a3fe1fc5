"""Per-tenant quotas through the real gRPC API: a server config with small quotas for
the tenant every caller has while auth is off ("default"); each limit hit answers
RESOURCE_EXHAUSTED with a google.rpc.QuotaFailure naming it, and is free again when the
resources go; a busy firmware is paused over its instruction budget."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from machineserver.sdk import AsyncClient, errors
from machineserver.server.api.auth import parse_settings
from machineserver.server.api.server import MAX_MESSAGE_BYTES
from machineserver.server.app import RunningServer
from machineserver.server.config import ServerConfig
from machineserver.server.core.quotas import QuotaConfig, TenantQuotas
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import session_pb2 as spb
from machineserver.v1 import session_pb2_grpc
from tests.helpers.api import until, upload, wait_state
from tests.helpers.firmware import firmware
from tests.helpers.server import serving

BOARD = "lm3s6965evb"


def config(tmp_path: Path, **default: int) -> ServerConfig:
    return ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning",
                        quotas=QuotaConfig(TenantQuotas(**default)))


def violation(exc: errors.MachineServerError) -> str:
    """The QuotaFailure's one violation, as "subject | description"."""
    assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    (subject, description), = exc.quota_violations
    return f"{subject} | {description}"


def usage(running: RunningServer, tenant: str = "default") -> dict[str, tuple[int, int]]:
    return {limit: (used, maximum) for limit, used, maximum in running.engine.quotas.usage(tenant)}


# ---------------------------------------------------------------------------- sessions


async def test_live_sessions_quota_raw_status_details(tmp_path: Path) -> None:
    async with serving(config(tmp_path, live_sessions=2)) as (running, client):
        names = [(await client.sessions.create_session(board_template=BOARD)).session.name for _ in range(2)]

        def third() -> grpc.RpcError:  # a plain grpc stub: the status details as any client sees them
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                try:
                    session_pb2_grpc.SessionServiceStub(channel).CreateSession(
                        spb.CreateSessionRequest(board_template=BOARD), timeout=20)
                except grpc.RpcError as exc:
                    return exc
            raise AssertionError("a third session was created over live_sessions = 2")

        exc = await asyncio.to_thread(third)
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        assert status is not None
        details = {d.TypeName(): d for d in status.details}
        failure, info = error_details_pb2.QuotaFailure(), error_details_pb2.ErrorInfo()
        assert details["google.rpc.QuotaFailure"].Unpack(failure) and details["google.rpc.ErrorInfo"].Unpack(info)
        (v,) = failure.violations
        assert (v.subject, v.description) == ("tenant:default", "live_sessions: 2 of 2 in use")
        assert info.metadata["quota"] == "live_sessions"
        assert len((await client.sessions.list_sessions()).sessions) == 2
        assert usage(running)["live_sessions"] == (2, 2)
        # freed when a session goes
        await client.sessions.delete_session(name=names[0])
        await client.sessions.create_session(board_template=BOARD)
        assert usage(running)["live_sessions"] == (2, 2)


async def test_running_sessions_quota(tmp_path: Path) -> None:
    async with serving(config(tmp_path, running_sessions=1)) as (running, client):
        prog = await upload(client, BOARD, "echo")  # polls its UART for ever: runs until paused
        a = (await client.sessions.create_session(board_template=BOARD, program=prog, run=True)).session
        b = (await client.sessions.create_session(board_template=BOARD, program=prog, power_on=True)).session
        with pytest.raises(errors.ResourceExhausted) as exc:
            await client.sessions.run_session(name=b.name)
        assert violation(exc.value) == "tenant:default | running_sessions: 1 of 1 in use"
        with pytest.raises(errors.ResourceExhausted) as exc:
            await client.debug.continue_(name=b.name)
        assert "running_sessions: 1 of 1" in exc.value.message
        with pytest.raises(errors.ResourceExhausted):
            await client.sessions.create_session(board_template=BOARD, program=prog, run=True)
        assert (await client.sessions.get_session(name=b.name)).session.state == cpb.SESSION_STATE_HALTED
        assert usage(running)["running_sessions"] == (1, 1)
        # freed when the running one stops
        await client.sessions.pause_session(name=a.name)
        assert (await client.sessions.run_session(name=b.name)).session.state == cpb.SESSION_STATE_RUNNING
        with pytest.raises(errors.ResourceExhausted):
            await client.sessions.run_session(name=a.name)
        await client.sessions.power_off_session(name=b.name)
        await client.sessions.run_session(name=a.name)


# ---------------------------------------------------------------------------- stored bytes


async def test_program_bytes_quota(tmp_path: Path) -> None:
    hello, crc32 = firmware(BOARD, "hello"), firmware(BOARD, "crc32")
    limit = hello.stat().st_size + crc32.stat().st_size - 1  # one fits, not both
    async with serving(config(tmp_path, program_bytes=limit)) as (running, client):
        first = (await client.upload_program(hello)).program
        assert usage(running)["program_bytes"] == (first.size_bytes, limit)
        with pytest.raises(errors.ResourceExhausted) as exc:
            await client.upload_program(crc32)
        assert violation(exc.value) == (f"tenant:default | program_bytes: {first.size_bytes} of {limit} in use; "
                                        f"storing {crc32.stat().st_size} more bytes would exceed it")
        assert [p.name for p in (await client.sessions.list_programs()).programs] == [first.name]
        assert not list((tmp_path / "data" / "blobs").glob(".incoming-*"))
        # freed when the program goes
        await client.sessions.delete_program(name=first.name)
        second = (await client.upload_program(crc32)).program
        assert usage(running)["program_bytes"] == (second.size_bytes, limit)


async def _snapshot_blob(client: AsyncClient, name: str) -> tuple[spb.Snapshot, bytes]:
    parts = [m async for m in client.sessions.export_snapshot(name=name)]
    return parts[0].snapshot, b"".join(p.chunk for p in parts[1:])


def _import_requests(snap: spb.Snapshot, blob: bytes) -> Iterator[spb.ImportSnapshotRequest]:
    yield spb.ImportSnapshotRequest(metadata=spb.SnapshotMetadata(
        display_name="again", board=snap.board, backend=snap.backend, sha256=snap.sha256))
    for i in range(0, len(blob), 60_000):
        yield spb.ImportSnapshotRequest(chunk=blob[i:i + 60_000])


async def test_snapshot_bytes_quota_at_create_and_import(tmp_path: Path) -> None:
    # a first server without quotas stores one snapshot; the same data directory is then
    # served with room for about one and a half of it
    async with serving(config(tmp_path)) as (_, client):
        prog = await upload(client, BOARD, "hello")
        s = (await client.sessions.create_session(board_template=BOARD, program=prog, power_on=True)).session
        snap, blob = await _snapshot_blob(client, (await client.sessions.create_snapshot(name=s.name)).snapshot.name)
    limit = snap.size_bytes * 3 // 2
    async with serving(config(tmp_path, snapshot_bytes=limit)) as (running, client):
        assert usage(running)["snapshot_bytes"] == (snap.size_bytes, limit)
        with pytest.raises(errors.ResourceExhausted) as exc:
            await client.sessions.import_snapshot(_import_requests(snap, blob))
        assert violation(exc.value) == (f"tenant:default | snapshot_bytes: {snap.size_bytes} of {limit} in use; "
                                        f"storing {len(blob)} more bytes would exceed it")
        await client.sessions.power_on_session(name=s.name)
        with pytest.raises(errors.ResourceExhausted) as exc:
            await client.sessions.create_snapshot(name=s.name)
        assert exc.value.quota_violations[0][1].startswith(f"snapshot_bytes: {snap.size_bytes} of {limit} in use")
        assert [x.name for x in (await client.sessions.list_snapshots()).snapshots] == [snap.name]
        assert not list((tmp_path / "data" / "blobs").glob(".incoming-*"))
        # freed when the snapshot goes
        await client.sessions.delete_snapshot(name=snap.name)
        imported = (await client.sessions.import_snapshot(_import_requests(snap, blob))).snapshot
        assert usage(running)["snapshot_bytes"] == (imported.size_bytes, limit)


# ---------------------------------------------------------------------------- streams


async def test_concurrent_streams_quota(tmp_path: Path) -> None:
    async with serving(config(tmp_path, concurrent_streams=2)) as (running, client):
        s = (await client.sessions.create_session(board_template=BOARD)).session
        opened: list[Any] = []

        async def open_events() -> Any:
            stream = client.sessions.stream_session_events(name=s.name)
            await stream.__anext__()  # the subscribed message: the call is open on the server
            opened.append(stream)
            return stream

        await open_events()
        console = client.sessions.stream_console(name=s.name, follow=True)
        console_task = asyncio.ensure_future(console.__anext__())  # open, waiting for output
        await until(lambda: usage(running)["concurrent_streams"][0] == 2, what="two streams open")
        with pytest.raises(errors.ResourceExhausted) as exc:
            await open_events()
        assert violation(exc.value) == "tenant:default | concurrent_streams: 2 of 2 in use"
        # unary calls are not streams
        assert (await client.sessions.get_session(name=s.name)).session.name == s.name
        # freed when a stream ends
        console_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, errors.Cancelled):
            await console_task
        await console.aclose()
        await until(lambda: usage(running)["concurrent_streams"][0] == 1, what="the console stream released")
        await open_events()
        assert usage(running)["concurrent_streams"] == (2, 2)
        for stream in opened:
            await stream.aclose()
        await until(lambda: usage(running)["concurrent_streams"][0] == 0, what="every stream released")


# ---------------------------------------------------------------------------- instructions


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_instruction_budget_pauses_and_refuses_runs(tmp_path: Path, backend: str) -> None:
    budget = 3_000_000
    async with serving(config(tmp_path, instructions_per_hour=budget)) as (running, client):
        prog = await upload(client, BOARD, "echo")
        s = (await client.sessions.create_session(board_template=BOARD, program=prog, backend=backend,
                                                   run=True)).session
        paused = await wait_state(client, s.name, cpb.SESSION_STATE_HALTED, timeout=30)
        assert "instructions_per_hour quota" in paused.state_reason and "tenant default" in paused.state_reason
        used, maximum = usage(running)["instructions_per_hour"]
        assert maximum == budget and used >= budget
        for refused in (client.sessions.run_session(name=s.name), client.debug.continue_(name=s.name),
                        client.debug.step(name=s.name)):
            with pytest.raises(errors.ResourceExhausted) as exc:
                await refused
            subject, description = exc.value.quota_violations[0]
            assert subject == "tenant:default" and description.startswith("instructions_per_hour: ")
            assert f"of {budget} in use" in description
        assert (await client.sessions.get_session(name=s.name)).session.state == cpb.SESSION_STATE_HALTED
        # once the window has room again, runs are allowed (the window shortened here: an
        # hour is too long for a test)
        running.engine.quotas.meter.window = 0.5
        await until(lambda: usage(running)["instructions_per_hour"][0] < budget, timeout=10,
                    what="the window sliding past the spent instructions")
        assert (await client.sessions.run_session(name=s.name)).session.state == cpb.SESSION_STATE_RUNNING


async def test_instruction_budget_with_room_leaves_sessions_running(tmp_path: Path) -> None:
    async with serving(config(tmp_path, instructions_per_hour=10**15)) as (running, client):
        prog = await upload(client, BOARD, "echo")
        s = (await client.sessions.create_session(board_template=BOARD, program=prog, run=True)).session
        await until(lambda: usage(running)["instructions_per_hour"][0] > 100_000, timeout=20,
                    what="instructions metered")
        assert (await client.sessions.get_session(name=s.name)).session.state == cpb.SESSION_STATE_RUNNING


# ---------------------------------------------------------------------------- usage


async def test_usage_numbers(tmp_path: Path) -> None:
    limits = dict(live_sessions=5, running_sessions=3, program_bytes=10**7, snapshot_bytes=10**8,
                  concurrent_streams=4, instructions_per_hour=10**15)
    async with serving(config(tmp_path, **limits)) as (running, client):
        assert usage(running) == {k: (0, v) for k, v in limits.items()}
        prog = (await client.upload_program(firmware(BOARD, "echo"))).program
        a = (await client.sessions.create_session(board_template=BOARD, program=prog.name, run=True)).session
        b = (await client.sessions.create_session(board_template=BOARD, program=prog.name, power_on=True)).session
        snap = (await client.sessions.create_snapshot(name=b.name)).snapshot
        events = client.sessions.stream_session_events(name=a.name)
        await events.__anext__()
        u = usage(running)
        assert u["live_sessions"] == (2, 5) and u["running_sessions"] == (1, 3)
        assert u["program_bytes"] == (prog.size_bytes, 10**7)
        assert u["snapshot_bytes"] == (snap.size_bytes, 10**8)
        assert u["concurrent_streams"] == (1, 4)
        await until(lambda: usage(running)["instructions_per_hour"][0] > 0, what="instructions metered")
        await client.sessions.pause_session(name=a.name)
        spent = usage(running)["instructions_per_hour"][0]
        # halted sessions spend nothing; the meter counts what the counters say
        await asyncio.sleep(1.2)
        assert usage(running)["instructions_per_hour"][0] == spent
        stepped = (await client.debug.step(name=a.name, count=1000)).stop
        assert stepped.reason == cpb.STOP_REASON_STEP
        await until(lambda: usage(running)["instructions_per_hour"][0] == spent + 1000, what="the step metered")
        await events.aclose()
        await until(lambda: usage(running)["concurrent_streams"][0] == 0, what="the stream released")
        # another tenant has used nothing
        assert all(used == 0 for used, _ in usage(running, "other").values())


# ---------------------------------------------------------------------------- tenants


async def test_one_tenants_quota_does_not_affect_another(tmp_path: Path) -> None:
    """With authentication on, API keys of two tenants: each tenant's sessions count
    against its own quota only (tenant "big" has an override), and GetQuotaUsage reports
    each tenant's own numbers."""
    quotas = QuotaConfig(TenantQuotas(live_sessions=1), {"big": TenantQuotas(live_sessions=3)})
    auth = parse_settings({"enabled": True, "bootstrap_admin_key_file": str(tmp_path / "admin.key")}, "test")
    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning", quotas=quotas,
                       auth=auth)
    async with serving(cfg) as (running, _):
        target = f"127.0.0.1:{running.port}"
        admin_secret = (tmp_path / "admin.key").read_text().strip()
        keys = {}
        async with await AsyncClient.connect(target, timeout=20, api_key=admin_secret) as admin:
            for tenant in ("a", "big"):
                keys[tenant] = (await admin.access.create_api_key(
                    display_name=f"op-{tenant}", tenant=tenant, roles=["ROLE_OPERATOR"])).secret
        async with await AsyncClient.connect(target, timeout=20, api_key=keys["a"]) as a, \
                await AsyncClient.connect(target, timeout=20, api_key=keys["big"]) as big:
            await a.sessions.create_session(board_template=BOARD)
            with pytest.raises(errors.ResourceExhausted) as exc:
                await a.sessions.create_session(board_template=BOARD)
            assert violation(exc.value) == "tenant:a | live_sessions: 1 of 1 in use"
            for _ in range(3):  # a's session does not count against big, which has its own limit
                await big.sessions.create_session(board_template=BOARD)
            with pytest.raises(errors.ResourceExhausted) as exc:
                await big.sessions.create_session(board_template=BOARD)
            assert violation(exc.value) == "tenant:big | live_sessions: 3 of 3 in use"
            for client, tenant, used, maximum in ((a, "a", 1, 1), (big, "big", 3, 3)):
                reply = await client.access.get_quota_usage()
                assert reply.tenant == tenant
                assert {q.limit: (q.used, q.maximum) for q in reply.quotas}["live_sessions"] == (used, maximum)
        assert usage(running, "default")["live_sessions"] == (0, 1)


# ---------------------------------------------------------------------------- size limits


async def test_message_size_limit_names_the_limit(tmp_path: Path) -> None:
    """A message over the server's gRPC receive limit (api/server.py MAX_MESSAGE_BYTES,
    8 MiB) is refused by gRPC itself: RESOURCE_EXHAUSTED, the message giving both sizes."""
    async with serving(config(tmp_path)) as (running, _):

        def oversized() -> grpc.RpcError:
            options = [("grpc.max_send_message_length", 64 << 20)]
            with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
                try:
                    session_pb2_grpc.SessionServiceStub(channel).WriteConsole(
                        spb.WriteConsoleRequest(name="sessions/x", data=b"\x00" * (9 << 20)), timeout=20)
                except grpc.RpcError as exc:
                    return exc
            raise AssertionError("a 9 MiB message was accepted")

        exc = await asyncio.to_thread(oversized)
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        # "SERVER: Received message larger than max (9437201 vs. 8388608)"
        assert "Received message larger than max" in str(exc.details())  # type: ignore[attr-defined]
        assert f"vs. {MAX_MESSAGE_BYTES})" in str(exc.details())  # type: ignore[attr-defined]


async def test_upload_size_limits_name_the_limit(tmp_path: Path) -> None:
    from machineserver.server.core.engine import Limits

    cfg = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning",
                       limits=Limits(max_program_bytes=4096, max_snapshot_bytes=64))
    async with serving(cfg) as (_, client):
        with pytest.raises(errors.ResourceExhausted) as exc:
            await client.upload_program(b"\x00" * 5000, format="bin")
        assert exc.value.quota_violations == [(
            "limits.max_program_bytes", "the program is larger than the server's limits.max_program_bytes (4096 bytes)")]
        prog = await upload(client, BOARD, "hello", "bin")  # under 4096 bytes
        s = (await client.sessions.create_session(board_template=BOARD, program=prog, power_on=True)).session
        with pytest.raises(errors.ResourceExhausted) as exc:
            await client.sessions.create_snapshot(name=s.name)
        assert exc.value.quota_violations == [(
            "limits.max_snapshot_bytes", "the snapshot is larger than the server's limits.max_snapshot_bytes (64 bytes)")]

        def big_import() -> Iterator[spb.ImportSnapshotRequest]:
            yield spb.ImportSnapshotRequest(metadata=spb.SnapshotMetadata(board=BOARD, backend="unicorn"))
            yield spb.ImportSnapshotRequest(chunk=b"\x00" * 3000)

        with pytest.raises(errors.ResourceExhausted) as exc:
            await client.sessions.import_snapshot(big_import())
        assert exc.value.quota_violations[0][0] == "limits.max_snapshot_bytes"
        assert "(64 bytes)" in exc.value.quota_violations[0][1]
