"""Failure capsules through the API, on real firmware and both backends: the fault and
assert triggers, an explicit capture of a running machine, the archive's parts and size,
export -> import -> open giving the same pc, registers and memory, and the refusals."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.v1 import capsule_pb2 as pb
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import upload, wait_state
from tests.helpers.backends import require_backend
from tests.helpers.firmware import elf_symbol_value, firmware

BOARD = "mps2-an385"  # QEMU 7.2 restores its snapshots (lm3s6965evb's abort)
RAM = 0x20000000
BACKENDS = ["unicorn", "qemu"]


async def eventually(get: Callable[[], Awaitable[Any]], timeout: float = 20) -> Any:
    """``get()``'s first truthy answer (a capsule the server captures in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = await get()
        if got:
            return got
        if loop.time() > deadline:
            raise AssertionError(f"nothing after {timeout} s")
        await asyncio.sleep(0.05)


async def capsules_of(client: AsyncClient, session: str) -> list[pb.Capsule]:
    return list((await client.capsules.list_capsules(filter=f"session={session}")).capsules)


async def registers(client: AsyncClient, session: str) -> dict[str, int]:
    return {r.name: r.value for r in (await client.debug.read_registers(name=session)).registers}


async def export(client: AsyncClient, name: str) -> tuple[pb.Capsule, bytes]:
    parts = [m async for m in client.capsules.export_capsule(name=name)]
    return parts[0].capsule, b"".join(p.chunk for p in parts[1:])


async def import_bytes(client: AsyncClient, data: bytes) -> pb.Capsule:
    reqs = [pb.ImportCapsuleRequest(chunk=data[i:i + 100_000]) for i in range(0, len(data), 100_000)]
    return (await client.capsules.import_capsule(reqs)).capsule


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rezip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, b in files.items():
            zf.writestr(n, b)
    return out.getvalue()


async def faulted_session(client: AsyncClient, backend: str, **options: Any) -> str:
    """fault on mps2-an385 with no HardFault handler to go to (its vector unmapped): the
    escalation stops the machine FAULTED."""
    prog = await upload(client, BOARD, "fault")
    s = (await client.sessions.create_session(
        board_template=BOARD, backend=backend, program=prog, power_on=True,
        options={"capsules": {"on_fault": True}, **options})).session
    await client.debug.write_memory(name=s.name, address=0x0C, data=(0xF0000001).to_bytes(4, "little"))
    return str(s.name)


async def test_fault_capsule_on_qemu_keeps_what_outlives_qemu(client: AsyncClient) -> None:
    """A fault ends QEMU (a lockup aborts it): the capsule has the fault's pc, the console,
    the program and the manifest, and says the snapshot and registers went with QEMU;
    opening it is refused with that reason."""
    require_backend("qemu", BOARD)
    name = await faulted_session(client, "qemu")
    await client.sessions.run_session(name=name)
    faulted = await wait_state(client, name, cpb.SESSION_STATE_FAULTED)
    (cap,) = await eventually(lambda: capsules_of(client, name))
    assert cap.trigger == pb.CAPSULE_TRIGGER_FAULT and "Lockup" in cap.reason
    assert cap.pc == faulted.last_stop.pc and cap.backend == "qemu" and cap.backend_version
    assert "QEMU" in cap.missing["snapshot"] and "QEMU" in cap.missing["registers"]
    _, data = await export(client, cap.name)
    files = members(data)
    assert b"about to fault\n" in files["console.txt"] and "snapshot.bin" not in files
    assert files["program.bin"] == firmware(BOARD, "fault").read_bytes()
    with pytest.raises(errors.FailedPrecondition, match=r"has no snapshot to open: .*QEMU"):
        await client.capsules.open_capsule(name=cap.name)


async def test_fault_capsule_reopens_at_the_fault(client: AsyncClient) -> None:
    backend = "unicorn"
    name = await faulted_session(client, backend)
    await client.sessions.run_session(name=name)
    faulted = await wait_state(client, name, cpb.SESSION_STATE_FAULTED)
    (cap,) = await eventually(lambda: capsules_of(client, name))
    assert cap.trigger == pb.CAPSULE_TRIGGER_FAULT and cap.reason.startswith("fault at pc 0x")
    assert cap.backend == backend and cap.board == BOARD and cap.backend_version
    assert cap.firmware_sha256 and cap.size_bytes < 1 << 20
    assert cap.pc == faulted.last_stop.pc
    regs = await registers(client, name)
    sram = (await client.debug.read_memory(name=name, address=RAM, size=4096)).data

    got, data = await export(client, cap.name)
    assert got.name == cap.name and len(data) == cap.size_bytes
    files = members(data)
    manifest = json.loads(files["manifest.json"])
    assert manifest["format"] == "machineserver-capsule" and manifest["format_version"] == 1
    assert manifest["capsule"]["trigger"] == "fault" and manifest["capsule"]["pc"] == cap.pc
    assert manifest["program"]["sha256"] == cap.firmware_sha256
    assert json.loads(files["registers.json"]) == regs
    assert b"about to fault\n" in files["console.txt"]
    assert files["program.bin"] == firmware(BOARD, "fault").read_bytes()
    assert json.loads(files["telemetry.json"])["host"][0]["cpu_percent"] >= 0
    # coverage was not on: the trace and coverage are missing, each saying why
    assert "trace" in cap.missing and "coverage" in cap.missing and "trace.json" not in files

    imported = await import_bytes(client, data)
    assert imported.name != cap.name and imported.pc == cap.pc and imported.trigger == cap.trigger
    opened = (await client.capsules.open_capsule(name=imported.name, session_id="reopened")).session
    assert opened.name == "sessions/reopened" and opened.state == cpb.SESSION_STATE_HALTED
    assert opened.backend == backend
    assert await registers(client, opened.name) == regs
    assert (await client.debug.read_memory(name=opened.name, address=RAM, size=4096)).data == sram
    # the opened session's program is the capsule's, with its symbols
    main = (await client.debug.resolve_symbol(name=opened.name, symbol="main"))
    assert main.address == elf_symbol_value(firmware(BOARD, "fault"), "main") & ~1


@pytest.mark.parametrize("backend", BACKENDS)
async def test_assert_capsule_halts_on_the_assert_function(client: AsyncClient, backend: str) -> None:
    require_backend(backend, BOARD)
    prog = await upload(client, BOARD, "assert")
    s = (await client.sessions.create_session(
        board_template=BOARD, backend=backend, program=prog, power_on=True,
        options={"coverage": True, "capsules": {"assert_symbols": ["__assert_func", "no_such_symbol"]}})).session
    assert list(s.options.capsules.assert_symbols) == ["__assert_func", "no_such_symbol"]
    await client.coverage.start_coverage(name=s.name)
    await client.sessions.run_session(name=s.name)
    halted = await wait_state(client, s.name, cpb.SESSION_STATE_HALTED)
    assert_func = elf_symbol_value(firmware(BOARD, "assert"), "__assert_func") & ~1
    assert halted.last_stop.pc == assert_func
    (cap,) = await eventually(lambda: capsules_of(client, s.name))
    assert cap.trigger == pb.CAPSULE_TRIGGER_ASSERT and cap.reason == "reached __assert_func"
    assert cap.pc == assert_func
    _, data = await export(client, cap.name)
    files = members(data)
    frames = json.loads(files["backtrace.json"])
    assert [f["function"] for f in frames[:2]] == ["__assert_func", "check_balance"]
    assert files["console.txt"].endswith(b"checking\n")
    # the trace tail (coverage on): the last blocks before the assert, symbolised, oldest first
    assert not {"trace", "coverage", "backtrace", "snapshot", "registers"} & set(cap.missing), cap.missing
    trace = json.loads(files["trace.json"])
    assert 0 < len(trace) <= 256
    assert trace[-1]["symbol"].split("+")[0] in ("check_balance", "__assert_func"), trace[-4:]
    assert any(t["symbol"].startswith("main+") for t in trace)
    assert b"SF:src/assert.c" in files["coverage.info"]
    assert cap.size_bytes < 1 << 20, cap.size_bytes  # "small": under 1 MB on the boards here
    # left halted at the instant: the session is still there, not yet past the assert
    assert (await client.sessions.get_session(name=s.name)).session.state == cpb.SESSION_STATE_HALTED
    regs = await registers(client, s.name)
    assert regs["pc"] == assert_func and json.loads(files["registers.json"]) == regs
    sram = (await client.debug.read_memory(name=s.name, address=RAM, size=8192)).data

    # export -> import -> open: the same pc, registers and memory, and it runs on from there
    opened = (await client.capsules.open_capsule(name=(await import_bytes(client, data)).name)).session
    assert opened.state == cpb.SESSION_STATE_HALTED and opened.backend == backend and opened.name != s.name
    assert await registers(client, opened.name) == regs
    assert (await client.debug.read_memory(name=opened.name, address=RAM, size=8192)).data == sram
    bt = (await client.debug.backtrace(name=opened.name)).frames
    assert [f.location.function for f in bt[:2]] == ["__assert_func", "check_balance"]
    await client.sessions.run_session(name=opened.name)
    done = await wait_state(client, opened.name, cpb.SESSION_STATE_EXITED)
    assert done.exit_code == 4
    tail = b"".join([m.data async for m in client.sessions.stream_console(name=opened.name, follow=False)])
    assert tail.endswith(b"assertion failed: left >= 0\n")


async def test_explicit_capsule_of_a_running_machine_with_coverage(client: AsyncClient) -> None:
    prog = await upload(client, BOARD, "echo")
    s = (await client.sessions.create_session(board_template=BOARD, program=prog, power_on=True,
                                              options={"coverage": True})).session
    await client.coverage.start_coverage(name=s.name)
    await client.sessions.run_session(name=s.name)
    await asyncio.sleep(0.2)
    cap = (await client.capsules.create_capsule(name=s.name, trigger=pb.CAPSULE_TRIGGER_TEST_FAILURE,
                                                reason="expected 'ready'", test_id="tests/t.py::test_x")).capsule
    assert cap.trigger == pb.CAPSULE_TRIGGER_TEST_FAILURE and cap.test_id == "tests/t.py::test_x"
    # resumed after the capture
    assert (await client.sessions.get_session(name=s.name)).session.state == cpb.SESSION_STATE_RUNNING
    _, data = await export(client, cap.name)
    files = members(data)
    assert "coverage" not in cap.missing, cap.missing
    assert files["coverage.info"].startswith(b"TN:") and b"SF:src/echo.c" in files["coverage.info"]
    assert "trace" not in cap.missing, cap.missing
    trace = json.loads(files["trace.json"])
    assert len(trace) == 256 and all(t["symbol"] for t in trace)  # echo waits in a loop: a full tail
    got = (await client.capsules.get_capsule(name=cap.name)).capsule
    assert got == cap
    await client.capsules.delete_capsule(name=cap.name)
    with pytest.raises(errors.NotFound):
        await client.capsules.get_capsule(name=cap.name)


async def test_bad_inputs(client: AsyncClient) -> None:
    prog = await upload(client, BOARD, "hello")
    s = (await client.sessions.create_session(board_template=BOARD, program=prog)).session
    with pytest.raises(errors.FailedPrecondition):  # off
        await client.capsules.create_capsule(name=s.name)
    await client.sessions.power_on_session(name=s.name)
    with pytest.raises(errors.InvalidArgument, match="trigger"):
        await client.capsules.create_capsule(name=s.name, trigger=pb.CAPSULE_TRIGGER_FAULT)
    with pytest.raises(errors.InvalidArgument, match="reason"):
        await client.capsules.create_capsule(name=s.name, reason="x" * 5000)
    with pytest.raises(errors.InvalidArgument, match="test_id"):
        await client.capsules.create_capsule(name=s.name, test_id="x" * 2000)
    with pytest.raises(errors.NotFound):
        await client.capsules.create_capsule(name="sessions/nope")
    for call in (client.capsules.get_capsule, client.capsules.delete_capsule, client.capsules.open_capsule):
        with pytest.raises(errors.NotFound):
            await call(name="capsules/nope")  # type: ignore[operator]
    with pytest.raises(errors.InvalidArgument, match="name"):
        await client.capsules.get_capsule(name="")
    with pytest.raises(errors.InvalidArgument, match="filter"):
        await client.capsules.list_capsules(filter="trigger=sometimes")
    with pytest.raises(errors.InvalidArgument, match="assert_symbols"):
        await client.sessions.create_session(board_template=BOARD,
                                             options={"capsules": {"assert_symbols": [f"f{i}" for i in range(17)]}})
    cap = (await client.capsules.create_capsule(name=s.name)).capsule
    assert cap.trigger == pb.CAPSULE_TRIGGER_EXPLICIT
    with pytest.raises(errors.InvalidArgument, match="display_name"):
        await client.capsules.open_capsule(name=cap.name, display_name="d" * 300)
    with pytest.raises(errors.InvalidArgument, match="session_id"):
        await client.capsules.open_capsule(name=cap.name, session_id="Bad_Id!")
    assert [c.name for c in (await client.capsules.list_capsules(filter="trigger=explicit")).capsules] == [cap.name]
    assert not (await client.capsules.list_capsules(filter="trigger=fault")).capsules


async def test_imports_refused_with_the_reason(client: AsyncClient) -> None:
    prog = await upload(client, BOARD, "hello")
    s = (await client.sessions.create_session(board_template=BOARD, program=prog, power_on=True)).session
    await client.debug.step(name=s.name, count=500)
    cap = (await client.capsules.create_capsule(name=s.name)).capsule
    _, data = await export(client, cap.name)
    files = members(data)
    manifest = json.loads(files["manifest.json"])

    async def refused(blob: bytes, error: type[errors.MachineServerError], match: str) -> None:
        with pytest.raises(error, match=match):
            await import_bytes(client, blob)

    await refused(b"not a zip at all", errors.InvalidArgument, "not a capsule archive")
    await refused(rezip({"other.txt": b"x"}), errors.InvalidArgument, "unexpected member")
    # a snapshot changed after capture: its sha256 no longer matches the manifest
    snap = bytearray(files["snapshot.bin"])
    snap[-1] ^= 0xFF
    await refused(rezip({**files, "snapshot.bin": bytes(snap)}), errors.InvalidArgument, "snapshot.bin does not match")
    # a zip bomb: a member declared far over its limit is refused before it is inflated
    bomb = rezip({**files, "console.txt": b"\0" * (4 << 20)})
    await refused(bomb, errors.InvalidArgument, "console.txt is")
    # a newer capsule format
    newer = {**manifest, "format_version": 2}
    await refused(rezip({**files, "manifest.json": json.dumps(newer).encode()}), errors.FailedPrecondition,
                  "capsule format version 2; this server reads version 1")
    # a backend version that cannot restore it: a Unicorn snapshot format from the future
    snap3 = bytearray(files["snapshot.bin"])
    snap3[8:10] = (3).to_bytes(2, "little")
    future = {**manifest, "snapshot_format": "unicorn-snapshot/3", "backend_version": "9.9.9",
              "sha256": {**manifest["sha256"], "snapshot.bin": hashlib.sha256(bytes(snap3)).hexdigest()}}
    with pytest.raises(errors.FailedPrecondition) as info:
        await import_bytes(client, rezip({**files, "manifest.json": json.dumps(future).encode(),
                                          "snapshot.bin": bytes(snap3)}))
    assert "unicorn 9.9.9 (snapshot format unicorn-snapshot/3)" in str(info.value)
    assert "snapshot format unicorn-snapshot/2" in str(info.value)
    # a backend this server does not have
    other = {**manifest, "backend": "renode", "backend_version": "1.15"}
    await refused(rezip({**files, "manifest.json": json.dumps(other).encode()}), errors.FailedPrecondition,
                  "backend 'renode' 1.15; this server has no such backend")
    # a manifest that lies about its snapshot's format
    lying = {**manifest, "snapshot_format": "unicorn-snapshot/1"}
    await refused(rezip({**files, "manifest.json": json.dumps(lying).encode()}), errors.InvalidArgument,
                  "the manifest says snapshot format")
    # the original still imports
    assert (await import_bytes(client, data)).firmware_sha256 == cap.firmware_sha256
