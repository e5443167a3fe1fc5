"""SessionService.ExpectConsole and DebugService.Continue with a budget (core/waits.py),
through the SDK against a real server, on Unicorn and QEMU with the test firmware.

Budgets counted in instructions or virtual time are deterministic: the same firmware gives
the same outcome whatever the host's load (boot_heavy prints "ready" after about a million
instructions: 1,000 instructions never reach it, 5 million always do)."""

from __future__ import annotations

import asyncio

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from machineserver.server.core.console import ConsoleLog
from machineserver.server.core.waits import ConsoleMatcher, compile_pattern
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import session_pb2 as spb
from tests.helpers.api import duration, until, upload
from tests.helpers.backends import require_backend
from tests.helpers.firmware import elf_symbol

BACKENDS = ["unicorn", "qemu"]
BOARD = "lm3s6965evb"


async def running(client: AsyncClient, backend: str, program: str, board: str = BOARD) -> str:
    require_backend(backend, board)
    prog = await upload(client, board, program)
    s = (await client.sessions.create_session(board_template=board, backend=backend, program=prog,
                                              power_on=True, run=True)).session
    return str(s.name)


async def halted_at_main(client: AsyncClient, backend: str, program: str) -> str:
    require_backend(backend, BOARD)
    prog = await upload(client, BOARD, program)
    name = (await client.sessions.create_session(board_template=BOARD, backend=backend, program=prog,
                                                 power_on=True)).session.name
    bp = (await client.debug.set_breakpoint(name=name, location={"symbol": "main"})).breakpoint
    stop = (await client.debug.continue_(name=name, wait=True)).stop
    assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.pc == elf_symbol(BOARD, program, "main")
    await client.debug.clear_breakpoint(name=name, id=bp.id)
    return str(name)


async def expecting(server: RunningServer, client: AsyncClient, name: str,
                    budget: dict[str, object]) -> asyncio.Future[spb.ExpectConsoleResponse]:
    """An ExpectConsole of text that never comes, started and in progress: stepping the
    machine (a counted budget) or subscribed to its events (host time)."""
    live = server.engine.sessions.get(name)
    hub = server.engine.sessions.events
    before = hub.subscriber_count
    wait = asyncio.ensure_future(client.sessions.expect_console(name=name, pattern="never printed", budget=budget))
    counted = "host_time" not in budget
    await until(lambda: live.operation is not None if counted else hub.subscriber_count > before,
                what="the expect waits")
    return wait


@pytest.mark.parametrize("backend", BACKENDS)
async def test_match_with_groups_and_offsets(client: AsyncClient, backend: str) -> None:
    name = await running(client, backend, "hello")
    r = await client.sessions.expect_console(name=name, pattern=r"Hello from (\S+)!(x)?",
                                             budget=cpb.Budget(host_time=duration(10)))
    assert r.outcome == cpb.WAIT_OUTCOME_MATCHED
    assert r.match == f"Hello from {BOARD}!" and list(r.groups) == [BOARD, ""]
    assert (r.match_start, r.match_end) == (0, len(r.match))
    # from an offset past "Hello": the next match of "o" is the one in "from"
    r2 = await client.sessions.expect_console(name=name, pattern="o", offset=5)
    assert r2.outcome == cpb.WAIT_OUTCOME_MATCHED and (r2.match_start, r2.match_end) == (8, 9)
    assert r2.end_offset >= len(f"Hello from {BOARD}!\n") and "Hello" in r2.console_tail


@pytest.mark.parametrize("backend", BACKENDS)
async def test_stopped_when_the_firmware_exits_first(client: AsyncClient, backend: str) -> None:
    name = await running(client, backend, "fault")
    r = await client.sessions.expect_console(name=name, pattern="never printed", budget=cpb.Budget(host_time=duration(20)))
    assert r.outcome == cpb.WAIT_OUTCOME_STOPPED
    assert r.stop.reason == cpb.STOP_REASON_EXIT and r.stop.exit_code == 3
    assert r.state == cpb.SESSION_STATE_EXITED
    assert r.console_tail.endswith("about to fault\nhardfault\n")
    # a stopped machine stays stopped: the console as it is decides at once
    again = await client.sessions.expect_console(name=name, pattern=r"hard(\w+)")
    assert again.outcome == cpb.WAIT_OUTCOME_MATCHED and list(again.groups) == ["fault"]
    miss = await client.sessions.expect_console(name=name, pattern="nope")
    assert miss.outcome == cpb.WAIT_OUTCOME_STOPPED and miss.state == cpb.SESSION_STATE_EXITED


@pytest.mark.parametrize("backend", BACKENDS)
async def test_instruction_budget(client: AsyncClient, backend: str) -> None:
    name = await running(client, backend, "boot_heavy")
    ready = await client.sessions.expect_console(name=name, pattern="ready\n", budget={"instructions": 50_000_000})
    assert ready.outcome == cpb.WAIT_OUTCOME_MATCHED
    # waiting for input: nothing more comes, and the budget is counted exactly
    short = await client.sessions.expect_console(name=name, pattern="result", offset=ready.match_end,
                                                 budget={"instructions": 1000})
    assert short.outcome == cpb.WAIT_OUTCOME_BUDGET_EXHAUSTED and short.match == ""
    assert short.instructions == 1000
    assert short.state == cpb.SESSION_STATE_RUNNING  # an expect leaves the run state as it found it
    await client.sessions.write_console(name=name, data=b"g")
    done = await client.sessions.expect_console(name=name, pattern=r"result=(\w+)\n", offset=ready.match_end,
                                                budget={"instructions": 1_000_000})
    assert done.outcome == cpb.WAIT_OUTCOME_MATCHED and list(done.groups) == ["091c8e7c"]
    assert done.match_start == ready.match_end


@pytest.mark.parametrize("backend", BACKENDS)
async def test_virtual_time_budget_runs_out(client: AsyncClient, backend: str) -> None:
    name = await running(client, backend, "echo")
    r = await client.sessions.expect_console(name=name, pattern="never printed",
                                             budget={"virtual_time_ns": 2_000_000})
    assert r.outcome == cpb.WAIT_OUTCOME_BUDGET_EXHAUSTED
    assert r.virtual_time_ns >= 2_000_000
    assert r.state == cpb.SESSION_STATE_RUNNING and "echo ready" in r.console_tail


@pytest.mark.parametrize("backend", BACKENDS)
async def test_host_time_budget_runs_out(client: AsyncClient, backend: str) -> None:
    name = await running(client, backend, "echo")
    r = await client.sessions.expect_console(name=name, pattern="never printed", budget=cpb.Budget(host_time=duration(0.3)))
    assert r.outcome == cpb.WAIT_OUTCOME_BUDGET_EXHAUSTED
    assert r.host_time.ToNanoseconds() >= 300_000_000
    assert r.state == cpb.SESSION_STATE_RUNNING


@pytest.mark.parametrize("backend", BACKENDS)
async def test_continue_with_an_instruction_budget_halts_where_it_ran_out(client: AsyncClient, backend: str) -> None:
    name = await halted_at_main(client, backend, "boot_heavy")
    r = await client.debug.continue_(name=name, wait=True, budget={"instructions": 10_000})
    assert r.outcome == cpb.WAIT_OUTCOME_BUDGET_EXHAUSTED
    # boot_heavy's boot is about a million instructions: 10,000 never reach "ready"
    assert (await client.sessions.expect_console(name=name, pattern="ready")).outcome == cpb.WAIT_OUTCOME_STOPPED
    assert r.state == cpb.SESSION_STATE_HALTED and r.stop.reason == cpb.STOP_REASON_HALT
    pc = {reg.name: reg.value for reg in (await client.debug.read_registers(name=name, names=["pc"])).registers}["pc"]
    assert r.stop.pc == pc
    more = await client.debug.continue_(name=name, wait=True, budget={"instructions": 5_000_000})
    assert more.outcome == cpb.WAIT_OUTCOME_BUDGET_EXHAUSTED  # it waits for input: no stop
    assert (await client.sessions.expect_console(name=name, pattern="ready")).outcome == cpb.WAIT_OUTCOME_MATCHED
    # enough budget: it stops by itself (exit after 'g')
    await client.sessions.write_console(name=name, data=b"g")
    done = await client.debug.continue_(name=name, wait=True, budget={"instructions": 50_000_000})
    assert done.outcome == cpb.WAIT_OUTCOME_MATCHED
    assert done.stop.reason == cpb.STOP_REASON_EXIT and done.state == cpb.SESSION_STATE_EXITED


@pytest.mark.parametrize("backend", BACKENDS)
async def test_continue_with_a_host_time_budget(client: AsyncClient, backend: str) -> None:
    name = await halted_at_main(client, backend, "echo")
    r = await client.debug.continue_(name=name, wait=True, budget=cpb.Budget(host_time=duration(0.3)))
    assert r.outcome == cpb.WAIT_OUTCOME_BUDGET_EXHAUSTED
    assert r.state == cpb.SESSION_STATE_HALTED and r.stop.reason == cpb.STOP_REASON_HALT


async def test_bad_inputs_name_the_field(client: AsyncClient) -> None:
    name = await running(client, "unicorn", "hello")
    cases = [
        ({"pattern": "("}, "pattern"),
        ({"pattern": ""}, "pattern"),
        ({"pattern": "a" * 4097}, "pattern"),
        ({"pattern": "x", "offset": 1 << 40}, "offset"),
        ({"pattern": "x", "budget": {"instructions": 0}}, "budget.instructions"),
        ({"pattern": "x", "budget": {"instructions": 10**12 + 1}}, "budget.instructions"),
        ({"pattern": "x", "budget": {"virtual_time_ns": 10**13 + 1}}, "budget.virtual_time_ns"),
        ({"pattern": "x", "budget": cpb.Budget(host_time=duration(3601))}, "budget.host_time"),
        ({"pattern": "x", "budget": cpb.Budget(instructions=5, host_guard=duration(7200))}, "budget.host_guard"),
    ]
    for fields, field in cases:
        with pytest.raises(errors.InvalidArgument) as info:
            await client.sessions.expect_console(name=name, **fields)
        assert field in str(info.value), (fields, str(info.value))
    # at the limit: accepted
    at_limit = await client.sessions.expect_console(name=name, pattern="x" * 4096,
                                                    budget=cpb.Budget(host_time=duration(0.1)))
    assert at_limit.outcome in (cpb.WAIT_OUTCOME_STOPPED, cpb.WAIT_OUTCOME_BUDGET_EXHAUSTED)
    with pytest.raises(errors.InvalidArgument, match=r"budget\.instructions"):
        await client.debug.continue_(name=name, wait=True, budget={"instructions": 0})
    with pytest.raises(errors.NotFound):
        await client.sessions.expect_console(name="sessions/nope", pattern="x")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_host_guard_ends_a_counted_wait_on_a_sleeping_machine(client: AsyncClient, backend: str) -> None:
    # cosim_ping alone prints "ping ready" and sleeps in WFI with nothing to wake it
    name = await running(client, backend, "cosim_ping", board="mps2-an385")
    await client.sessions.expect_console(name=name, pattern="ping ready", budget={"instructions": 50_000_000})
    r = await client.sessions.expect_console(
        name=name, pattern="never printed", budget=cpb.Budget(instructions=10**9, host_guard=duration(0.5)))
    assert r.outcome == cpb.WAIT_OUTCOME_HOST_GUARD and r.state == cpb.SESSION_STATE_RUNNING
    c = await client.debug.continue_(name=name, wait=True,
                                     budget=cpb.Budget(instructions=10**9, host_guard=duration(0.5)))
    assert c.outcome == cpb.WAIT_OUTCOME_HOST_GUARD
    assert c.state == cpb.SESSION_STATE_HALTED and c.stop.reason == cpb.STOP_REASON_HALT


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_calls_deadline_ends_the_wait(client: AsyncClient, backend: str) -> None:
    name = await running(client, backend, "echo")
    with pytest.raises(errors.DeadlineExceeded):
        await client.sessions.expect_console(name=name, pattern="never printed",
                                             budget={"instructions": 10**12}, timeout=1.0)
    # an expect leaves the machine as it found it: running
    assert (await client.sessions.get_session(name=name)).session.state == cpb.SESSION_STATE_RUNNING
    with pytest.raises(errors.DeadlineExceeded):
        await client.debug.continue_(name=name, wait=True, budget={"instructions": 10**12}, timeout=1.0)
    # a continue never outlives its call: halted
    assert (await client.sessions.get_session(name=name)).session.state == cpb.SESSION_STATE_HALTED


def test_matcher_offsets_are_console_bytes_and_invalid_utf8_is_replaced() -> None:
    log = ConsoleLog(retain=64)
    log.append(b"ab\xffc\xc3\xa9d")  # a, b, an invalid byte, c, e-acute (2 bytes), d
    m = ConsoleMatcher(compile_pattern("\ufffdc(\u00e9)d"), log, 0).search()
    assert m is not None and m.groups == ("\u00e9",)
    assert (m.start, m.end) == (2, 7)
    # a multi-byte character split across two outputs still decodes as one
    log.append(b"x\xc3")
    tail = ConsoleMatcher(compile_pattern("x\u00e9"), log, 7)
    assert tail.search() is None
    log.append(b"\xa9")
    m2 = tail.search()
    assert m2 is not None and (m2.start, m2.end) == (7, 10)
    # bytes the retained log dropped are skipped: the search starts at the oldest kept
    log.append(b"-" * 100)
    late = ConsoleMatcher(compile_pattern("a"), log, 0)
    assert late.search() is None
    log.append(b"za")
    m3 = late.search()
    assert m3 is not None and m3.start == log.end - 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [{"instructions": 10**9}, {"host_time": "20s"}], ids=["driven", "watched"])
async def test_a_breakpoint_ends_the_wait_as_stopped(server: RunningServer, client: AsyncClient, backend: str,
                                                    budget: dict[str, object]) -> None:
    name = await running(client, backend, "echo")
    await client.sessions.expect_console(name=name, pattern="echo ready", budget={"instructions": 50_000_000})
    # echo polls its UART inside uart_getc: the breakpoint is hit once a byte comes and it
    # calls uart_getc again
    await client.debug.set_breakpoint(name=name, location={"symbol": "uart_getc"})
    wait = await expecting(server, client, name, budget)
    await client.sessions.write_console(name=name, data=b"x")
    r = await asyncio.wait_for(wait, 20)
    assert r.outcome == cpb.WAIT_OUTCOME_STOPPED
    assert r.stop.reason == cpb.STOP_REASON_BREAKPOINT and r.stop.location.function == "uart_getc"
    assert r.state == cpb.SESSION_STATE_HALTED


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [{"instructions": 10**12}, {"host_time": "20s"}], ids=["driven", "watched"])
async def test_power_off_ends_the_wait_as_stopped(server: RunningServer, client: AsyncClient, backend: str,
                                                  budget: dict[str, object]) -> None:
    name = await running(client, backend, "echo")
    wait = await expecting(server, client, name, budget)
    await client.sessions.power_off_session(name=name)
    r = await asyncio.wait_for(wait, 20)
    assert r.outcome == cpb.WAIT_OUTCOME_STOPPED and r.state == cpb.SESSION_STATE_OFF


async def test_continue_refuses_a_budget_without_wait(client: AsyncClient) -> None:
    name = await halted_at_main(client, "unicorn", "echo")
    with pytest.raises(errors.InvalidArgument, match="budget"):
        await client.debug.continue_(name=name, wait=False, budget={"instructions": 5})
