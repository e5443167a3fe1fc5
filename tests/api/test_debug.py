"""DebugService through the SDK: breakpoints by symbol and file:line, stepping,
registers, memory, watchpoints, disassembly, symbols, the Attach stream, bad inputs."""

from __future__ import annotations

import asyncio

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.api import upload, wait_progress
from tests.helpers.firmware import elf_symbol, firmware
from tests.helpers.tools import require_tool


async def halted_at_main(client: AsyncClient, board: str = "lm3s6965evb", program: str = "hello") -> str:
    prog = await upload(client, board, program)
    s = (await client.sessions.create_session(board_template=board, program=prog, power_on=True)).session
    bp = (await client.debug.set_breakpoint(name=s.name, location={"symbol": "main"})).breakpoint
    assert bp.address == elf_symbol(board, program, "main")
    assert bp.source.function == "main" and bp.source.file.endswith(f"{program}.c")
    resp = await client.debug.continue_(name=s.name, wait=True)
    assert resp.stop.reason == cpb.STOP_REASON_BREAKPOINT and resp.stop.pc == bp.address
    assert resp.stop.location.function == "main"
    return s.name


async def test_break_at_main_step_and_registers(client: AsyncClient) -> None:
    name = await halted_at_main(client)
    regs = {r.name: r.value for r in (await client.debug.read_registers(name=name)).registers}
    assert {"r0", "sp", "lr", "pc", "xpsr", "msp", "psp", "primask", "control"} <= set(regs)
    main = elf_symbol("lm3s6965evb", "hello", "main")
    assert regs["pc"] == main
    step = await client.debug.step(name=name, count=1)
    assert step.stop.reason == cpb.STOP_REASON_STEP and step.stop.pc != main
    assert step.state == cpb.SESSION_STATE_HALTED
    w = await client.debug.write_register(name=name, register="r7", value=0xDEADBEEF)
    assert w.register.value == 0xDEADBEEF
    assert (await client.debug.read_registers(name=name, names=["r7"])).registers[0].value == 0xDEADBEEF
    with pytest.raises(errors.InvalidArgument):
        await client.debug.read_registers(name=name, names=["r99"])
    with pytest.raises(errors.InvalidArgument):
        await client.debug.write_register(name=name, register="r0", value=1 << 33)
    bps = (await client.debug.list_breakpoints(name=name)).breakpoints
    assert len(bps) == 1 and bps[0].hit_count == 1
    await client.debug.clear_breakpoint(name=name, id=bps[0].id)
    with pytest.raises(errors.NotFound):
        await client.debug.clear_breakpoint(name=name, id=bps[0].id)
    done = await client.debug.continue_(name=name, wait=True)
    assert done.stop.reason == cpb.STOP_REASON_EXIT and done.state == cpb.SESSION_STATE_EXITED


async def test_memory_read_write_and_bad_ranges(client: AsyncClient) -> None:
    name = await halted_at_main(client)
    await client.debug.write_memory(name=name, address=0x20001000, data=b"\x01\x02\x03\x04")
    assert (await client.debug.read_memory(name=name, address=0x20001000, size=4)).data == b"\x01\x02\x03\x04"
    vectors = (await client.debug.read_memory(name=name, address=0, size=8)).data
    assert int.from_bytes(vectors[4:8], "little") & 1  # reset vector has the Thumb bit
    with pytest.raises(errors.InvalidArgument):
        await client.debug.read_memory(name=name, address=0x90000000, size=4)
    with pytest.raises(errors.InvalidArgument):
        await client.debug.read_memory(name=name, address=0x20000000, size=0)
    with pytest.raises(errors.InvalidArgument):
        await client.debug.read_memory(name=name, address=0x20000000, size=2 << 20)


async def test_breakpoint_by_file_line_and_symbols(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "coverage")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    called = await client.debug.resolve_symbol(name=s.name, symbol="called_three_times")
    assert called.address == elf_symbol("lm3s6965evb", "coverage", "called_three_times") and called.size > 0
    back = await client.debug.resolve_symbol(name=s.name, address=called.address + 2)
    assert back.symbol == "called_three_times" and back.offset == 2
    line = await client.debug.resolve_symbol(name=s.name, file_line=f"coverage.c:{called.source.line}")
    assert line.symbol == "called_three_times"
    bp = (await client.debug.set_breakpoint(name=s.name, location={"file_line": f"coverage.c:{called.source.line}"})).breakpoint
    for _ in range(3):
        stop = (await client.debug.continue_(name=s.name, wait=True)).stop
        assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.location.function == "called_three_times"
    assert (await client.debug.list_breakpoints(name=s.name)).breakpoints[0].hit_count == 3
    await client.debug.clear_breakpoint(name=s.name, id=bp.id)
    assert (await client.debug.continue_(name=s.name, wait=True)).stop.reason == cpb.STOP_REASON_EXIT
    with pytest.raises(errors.NotFound):
        await client.debug.set_breakpoint(name=s.name, location={"symbol": "no_such_function"})
    with pytest.raises(errors.NotFound):
        await client.debug.set_breakpoint(name=s.name, location={"file_line": "coverage.c:99999"})
    with pytest.raises(errors.InvalidArgument):
        await client.debug.set_breakpoint(name=s.name, location={"file_line": "nonsense"})
    with pytest.raises(errors.InvalidArgument):
        await client.debug.set_breakpoint(name=s.name)


async def test_disassemble_around_pc(client: AsyncClient) -> None:
    name = await halted_at_main(client)
    insns = (await client.debug.disassemble(name=name, count=4)).instructions
    assert len(insns) == 4 and insns[0].address == elf_symbol("lm3s6965evb", "hello", "main")
    assert insns[0].symbol == "main" and insns[0].mnemonic
    with pytest.raises(errors.InvalidArgument):
        await client.debug.disassemble(name=name, count=5000)


async def test_watchpoint_on_a_variable(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "systick")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    sym = await client.debug.resolve_symbol(name=s.name, symbol="ticks")
    await client.debug.set_breakpoint(name=s.name, location={"address": sym.address},
                                      kind=dpb.BREAKPOINT_KIND_WATCH_WRITE, size=4)
    hits = []
    for _ in range(2):
        stop = (await client.debug.continue_(name=s.name, wait=True)).stop
        assert stop.reason == cpb.STOP_REASON_WATCHPOINT, stop
        hits.append(stop.watch_value)
    assert stop.watch_address == sym.address and hits[1] == hits[0] + 1
    with pytest.raises(errors.InvalidArgument):
        await client.debug.set_breakpoint(name=s.name, location={"address": sym.address},
                                          kind=dpb.BREAKPOINT_KIND_WATCH_WRITE, size=3)


async def test_halt_and_step_counts(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "echo")  # polls the UART forever
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True)).session
    await wait_progress(client, s.name)  # halted while it really runs
    halt = await client.debug.halt(name=s.name)
    assert halt.state == cpb.SESSION_STATE_HALTED and halt.stop.reason == cpb.STOP_REASON_HALT
    before = (await client.telemetry.get_session_metrics(name=s.name)).metrics.instructions
    await client.debug.step(name=s.name, count=1000)
    after = (await client.telemetry.get_session_metrics(name=s.name)).metrics.instructions
    assert after - before == 1000
    with pytest.raises(errors.InvalidArgument):
        await client.debug.step(name=s.name, count=10**10)


async def test_continue_wait_honours_the_deadline(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "echo")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    with pytest.raises(errors.DeadlineExceeded) as exc:
        await client.debug.continue_(name=s.name, wait=True, timeout=0.5)
    # a continue never outlives the call that waits for it: halted, and it says so
    assert "halted" in exc.value.message
    assert (await client.sessions.get_session(name=s.name)).session.state == cpb.SESSION_STATE_HALTED


async def test_gdb_server_through_the_api_with_real_gdb(client: AsyncClient) -> None:
    import subprocess

    gdb_multiarch = require_tool("gdb-multiarch")
    prog = await upload(client, "lm3s6965evb", "coverage")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    gdb = (await client.debug.start_gdb_server(name=s.name)).gdb_server
    assert gdb.address == "127.0.0.1" and gdb.port > 0
    again = (await client.debug.start_gdb_server(name=s.name)).gdb_server
    assert again.port == gdb.port  # idempotent
    elf = firmware("lm3s6965evb", "coverage")
    out = await asyncio.to_thread(subprocess.run, [
        str(gdb_multiarch), "-q", "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{gdb.port}",
        "-ex", "break called_three_times", "-ex", "continue", "-ex", "bt", "-ex", "detach", str(elf)],
        cwd=elf.parents[3], capture_output=True, text=True, timeout=60)
    assert "called_three_times" in out.stdout and "#1" in out.stdout and "main" in out.stdout, out.stdout + out.stderr
    await client.debug.stop_gdb_server(name=s.name)
    await client.debug.stop_gdb_server(name=s.name)  # idempotent
    with pytest.raises(errors.InvalidArgument):
        await client.debug.start_gdb_server(name=s.name, bind_address="not-an-ip")
    with pytest.raises(errors.InvalidArgument):
        await client.debug.start_gdb_server(name=s.name, port=70000)
    with pytest.raises(errors.NotFound):
        await client.debug.start_gdb_server(name="sessions/nope")


async def test_backtrace_and_step_by_line(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "coverage")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    await client.debug.set_breakpoint(name=s.name, location={"symbol": "called_three_times"})
    await client.debug.continue_(name=s.name, wait=True)
    frames = (await client.debug.backtrace(name=s.name)).frames
    assert [f.location.function for f in frames[:2]] == ["called_three_times", "main"]
    assert frames[1].location.file.endswith("coverage.c") and frames[1].location.line > 0
    entry_line = frames[0].location.line
    over = await client.debug.step_line(name=s.name, mode=dpb.STEP_MODE_OVER)
    assert over.stop.reason == cpb.STOP_REASON_STEP
    assert over.stop.location.function == "called_three_times" and over.stop.location.line != entry_line
    out = await client.debug.step_line(name=s.name, mode=dpb.STEP_MODE_OUT)
    assert out.stop.location.function == "main" and out.stop.pc == frames[1].pc
    # over a call in main: stays in main
    bps = (await client.debug.list_breakpoints(name=s.name)).breakpoints
    await client.debug.clear_breakpoint(name=s.name, id=bps[0].id)
    for _ in range(3):
        nxt = await client.debug.step_line(name=s.name, mode=dpb.STEP_MODE_OVER)
        if nxt.stop.reason != cpb.STOP_REASON_STEP:
            break
        assert nxt.stop.location.function == "main"
    # into a call: ends up in another function eventually
    seen = set()
    for _ in range(20):
        into = await client.debug.step_line(name=s.name, mode=dpb.STEP_MODE_INTO)
        if into.stop.reason != cpb.STOP_REASON_STEP:
            break
        seen.add(into.stop.location.function)
    assert len(seen) >= 2, seen
    assert not (await client.debug.list_breakpoints(name=s.name)).breakpoints  # no temporary breakpoint left


async def test_step_line_bad_cases(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "echo")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog)).session
    with pytest.raises(errors.FailedPrecondition):
        await client.debug.step_line(name=s.name)
    bin_prog = (await client.upload_program(firmware("lm3s6965evb", "hello", "bin"), format="bin")).program.name
    s2 = (await client.sessions.create_session(board_template="lm3s6965evb", program=bin_prog, power_on=True)).session
    with pytest.raises(errors.FailedPrecondition) as exc:
        await client.debug.backtrace(name=s2.name)
    assert "symbols" in exc.value.message


async def test_attach_stream_controller_and_observer(client: AsyncClient) -> None:
    name = await halted_at_main(client)
    queue: asyncio.Queue[dpb.AttachRequest] = asyncio.Queue()

    async def requests():  # type: ignore[no-untyped-def]
        yield dpb.AttachRequest(open=dpb.AttachOpen(name=name, control=True, clear_breakpoints_on_detach=True))
        while (req := await queue.get()) is not None:
            yield req

    stream = client.debug.attach(requests())
    opened = await stream.__anext__()
    assert opened.opened.role == dpb.ATTACH_ROLE_CONTROLLER

    # an observer on the same session may read but not step
    async def observer():  # type: ignore[no-untyped-def]
        yield dpb.AttachRequest(open=dpb.AttachOpen(name=name, control=True))
        yield dpb.AttachRequest(command=dpb.DebugCommand(tag=1, step=dpb.StepRequest(count=1)))
        yield dpb.AttachRequest(command=dpb.DebugCommand(tag=2, read_registers=dpb.ReadRegistersRequest(names=["pc"])))
        # ending the requests ends the stream, after the results of those before

    obs = [m async for m in client.debug.attach(observer())]
    assert obs[0].opened.role == dpb.ATTACH_ROLE_OBSERVER
    results = {m.result.tag: m.result for m in obs if m.HasField("result")}
    assert results[1].code == 9  # FAILED_PRECONDITION
    assert results[2].code == 0 and results[2].read_registers.registers[0].name == "pc"

    await queue.put(dpb.AttachRequest(command=dpb.DebugCommand(
        tag=10, set_breakpoint=dpb.SetBreakpointRequest(location=dpb.CodeLocation(symbol="uart_putc")))))
    await queue.put(dpb.AttachRequest(command=dpb.DebugCommand(tag=11, **{"continue": dpb.ContinueRequest()})))
    seen: dict[str, object] = {}
    async for msg in stream:
        kind = msg.WhichOneof("response")
        if kind == "result":
            assert msg.result.code == 0, msg.result.message
            seen[f"result{msg.result.tag}"] = msg.result
        elif kind == "stopped":
            seen["stopped"] = msg.stopped
            break
    assert seen["stopped"].reason == cpb.STOP_REASON_BREAKPOINT  # type: ignore[attr-defined]
    await queue.put(None)  # type: ignore[arg-type]
    async for _ in stream:
        pass  # the stream ends once the server has detached (its cleanup runs before the end)
    # detaching cleared the breakpoint it set (the main one, set by the unary RPC, stays)
    symbols = [b.location.symbol for b in (await client.debug.list_breakpoints(name=name)).breakpoints]
    assert symbols == ["main"]


async def test_breakpoints_are_applied_again_after_a_power_cycle(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "hello")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog)).session
    bp = (await client.debug.set_breakpoint(name=s.name, location={"symbol": "main"})).breakpoint  # while OFF
    for _ in range(2):  # on, stop at main, off; and again
        await client.sessions.power_on_session(name=s.name)
        stop = (await client.debug.continue_(name=s.name, wait=True)).stop
        assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.pc == bp.address
        await client.sessions.power_off_session(name=s.name)
