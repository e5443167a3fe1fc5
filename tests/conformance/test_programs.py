"""Conformance: sessions, programs, console, run control and faults, one body for every
backend (tests/firmware/EXPECTED.md gives the expected console output and exit codes)."""

from __future__ import annotations

import pytest

from machineserver.sdk import errors
from machineserver.v1 import common_pb2 as cpb
from tests.helpers import api
from tests.helpers.conformance import BOARDS, Conf
from tests.helpers.firmware import elf_symbol

S = cpb  # session states and stop reasons live in common.proto


@pytest.mark.parametrize("board", BOARDS)
async def test_hello_then_crc32_console_and_exit_code(conf: Conf, board: str) -> None:
    name = await conf.session(board, "hello", run=True)
    assert await conf.console_until(name, b"\n") == f"Hello from {board}!\n".encode()
    done = await conf.wait_state(name, S.SESSION_STATE_EXITED)
    assert done.exit_code == 0 and done.last_stop.reason == S.STOP_REASON_EXIT  # type: ignore[attr-defined]

    # load another program into the same (exited) session and run it
    crc = await conf.upload(board, "crc32")
    loaded = (await conf.client.sessions.load_program(name=name, program=crc)).session
    assert loaded.state == S.SESSION_STATE_HALTED and loaded.program == crc
    offset = await conf.console_size(name)
    await conf.run_to_exit(name)
    assert await conf.console(name, offset) == b"crc32=0x80f45f04\n"
    assert (await conf.state(name)).exit_code == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("board", BOARDS)
async def test_peripheral_heavy_firmware_gives_the_same_answer(conf: Conf, board: str) -> None:
    """mmio polls its UART's status register 200000 times: every read answered as the
    hardware would (nothing received), on every backend."""
    name = await conf.session(board, "mmio", run=True)
    await conf.wait_state(name, cpb.SESSION_STATE_EXITED)
    assert await conf.console(name) == b"mmio=0x656c62a1\n"


@pytest.mark.parametrize("board", BOARDS)
async def test_fault_exits_3_through_the_guest_handler(conf: Conf, board: str) -> None:
    handler = "handle_trap" if board == "sifive_e" else "HardFault_Handler"
    name = await conf.session(board, "fault", power_on=True)
    await conf.client.debug.set_breakpoint(name=name, location={"symbol": handler})
    stop = (await conf.client.debug.continue_(name=name, wait=True)).stop
    assert stop.reason == S.STOP_REASON_BREAKPOINT and stop.location.function == handler
    assert stop.pc == elf_symbol(board, "fault", handler)
    assert await conf.console(name) == b"about to fault\n"
    done = await conf.run_to_exit(name)
    trap = b"trap mcause=5\n" if board == "sifive_e" else b"hardfault\n"
    assert await conf.console(name) == b"about to fault\n" + trap
    assert done.exit_code == 3  # type: ignore[attr-defined]


async def test_session_state_machine(conf: Conf) -> None:
    board = "mps2-an385"
    name = await conf.session(board, "crc32")
    async with api.session_events(conf.client, name) as stream:
        # the subscription's first message: the session as it is, OFF since created
        assert [s.state for s in stream.first.sessions] == [S.SESSION_STATE_OFF]
        assert (await conf.state(name)).state == S.SESSION_STATE_OFF  # type: ignore[attr-defined]
        on = (await conf.client.sessions.power_on_session(name=name)).session
        assert on.state == S.SESSION_STATE_HALTED
        # power on twice is a no-op
        assert (await conf.client.sessions.power_on_session(name=name)).session.state == S.SESSION_STATE_HALTED
        regs = await conf.registers(name, ["pc"])
        main = elf_symbol(board, "crc32", "main")
        assert regs["pc"] != main  # at the reset handler, not yet in main
        running = (await conf.client.sessions.run_session(name=name)).session
        assert running.state in (S.SESSION_STATE_RUNNING, S.SESSION_STATE_EXITED)
        assert await conf.console_until(name, b"\n") == b"crc32=0x80f45f04\n"
        done = await conf.wait_state(name, S.SESSION_STATE_EXITED)
        assert done.exit_code == 0 and "exited" in done.state_reason  # type: ignore[attr-defined]
        with pytest.raises(errors.FailedPrecondition) as exc:
            await conf.client.sessions.run_session(name=name)
        assert "reset" in exc.value.message

        # reset: halted at the reset entry again, same pc as after power on
        reset = (await conf.client.sessions.reset_session(name=name)).session
        assert reset.state == S.SESSION_STATE_HALTED and not reset.HasField("exit_code")
        assert (await conf.registers(name, ["pc"]))["pc"] == regs["pc"]
        await conf.client.sessions.reset_session(name=name, run_after_reset=True)
        await conf.console_until(name, b"crc32=0x80f45f04\ncrc32=0x80f45f04\n")
        await conf.wait_state(name, S.SESSION_STATE_EXITED)

        off = (await conf.client.sessions.power_off_session(name=name)).session
        assert off.state == S.SESSION_STATE_OFF
        # the stream kept every change since it subscribed: read them now
        events = [stream.first.sessions[0].state]
        while events[-1] != S.SESSION_STATE_OFF or len(events) == 1:
            events.append((await stream.next(10)).state)
    # every transition, in order from the subscription's OFF: HALTED, RUNNING, EXITED
    # (twice, around a reset), OFF
    compact = [s for i, s in enumerate(events) if i == 0 or events[i - 1] != s]
    assert compact == [
        S.SESSION_STATE_OFF, S.SESSION_STATE_HALTED, S.SESSION_STATE_RUNNING, S.SESSION_STATE_EXITED,
        S.SESSION_STATE_HALTED, S.SESSION_STATE_RUNNING, S.SESSION_STATE_EXITED, S.SESSION_STATE_OFF,
    ], [cpb.SessionState.Name(s) for s in compact]  # type: ignore[arg-type]

    # powered on again after power off: a fresh machine, the program reloaded
    assert (await conf.client.sessions.power_on_session(name=name)).session.state == S.SESSION_STATE_HALTED
    await conf.run_to_exit(name)
    await conf.client.sessions.delete_session(name=name)
    with pytest.raises(errors.NotFound):
        await conf.client.sessions.get_session(name=name)


@pytest.mark.parametrize("board", ["lm3s6965evb", "sifive_e"])
async def test_pause_while_running(conf: Conf, board: str) -> None:
    name = await conf.session(board, "echo", run=True)  # polls the UART forever
    await conf.console_until(name, b"echo ready\n")
    for _ in range(2):
        paused = await conf.client.sessions.pause_session(name=name)
        assert paused.session.state == S.SESSION_STATE_HALTED
        assert paused.stop.reason == S.STOP_REASON_HALT
        pc = (await conf.registers(name, ["pc"]))["pc"]
        assert pc == paused.stop.pc
        where = await conf.client.debug.resolve_symbol(name=name, address=pc)
        assert where.symbol  # inside the firmware, not lost somewhere
        # pausing a halted session is fine and changes nothing
        again = await conf.client.sessions.pause_session(name=name)
        assert again.session.state == S.SESSION_STATE_HALTED
        assert (await conf.registers(name, ["pc"]))["pc"] == pc
        running = (await conf.client.sessions.run_session(name=name)).session
        assert running.state == S.SESSION_STATE_RUNNING
        # it really runs again before the next pause (its virtual time moves on)
        await api.wait_progress(conf.client, name)
    halt = await conf.client.debug.halt(name=name)
    assert halt.state == S.SESSION_STATE_HALTED and halt.stop.reason == S.STOP_REASON_HALT
    off = (await conf.client.sessions.power_off_session(name=name)).session
    assert off.state == S.SESSION_STATE_OFF


@pytest.mark.parametrize("board", ["lm3s6965evb", "sifive_e"])
async def test_console_input_reaches_the_uart(conf: Conf, board: str) -> None:
    # not mps2-an385: QEMU's CMSDK UART input is unreliable there (see the QEMU driver)
    name = await conf.session(board, "echo", run=True)
    await conf.console_until(name, b"echo ready\n")
    n = (await conf.client.sessions.write_console(name=name, data=b"hi there\n")).bytes_written
    assert n == 9
    await conf.console_until(name, b"hi there\n")
    await conf.client.sessions.write_console(name=name, data=b"q")
    assert await conf.console_until(name, b"bye\n") == b"echo ready\nhi there\nbye\n"
    done = await conf.wait_state(name, S.SESSION_STATE_EXITED)
    assert done.exit_code == 0  # type: ignore[attr-defined]
    with pytest.raises(errors.InvalidArgument):
        await conf.client.sessions.write_console(name=name, data=b"")


@pytest.mark.parametrize(("board", "program"), [("lm3s6965evb", "systick"), ("mps2-an385", "systick"),
                                                ("sifive_e", "timer")])
async def test_timer_interrupts(conf: Conf, board: str, program: str) -> None:
    name = await conf.session(board, program, run=True)
    assert await conf.console_until(name, b"\n") == b"ticks=10\n"
    assert (await conf.wait_state(name, S.SESSION_STATE_EXITED)).exit_code == 0  # type: ignore[attr-defined]
