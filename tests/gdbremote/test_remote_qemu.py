"""gdbremote end to end, through the SDK against a real server, on a QEMU the test starts
behind ``-gdb`` (tests/helpers/remote_targets.py): what the conformance suite cannot show
for this backend (the target ends with the firmware, soft snapshots, what a remote lacks),
StepLine/Backtrace, Attach, gdb-multiarch through the session's GDB bridge (gdb -> our
bridge -> our RSP client -> QEMU), the same registers and memory as the qemu and unicorn
backends, a target that vanishes and comes back, and bad inputs."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from machineserver.sdk import errors
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.backends import BOARD_ARCH, require_backend
from tests.helpers.conformance import BOARDS, CORE_REGISTERS, Conf
from tests.helpers.firmware import FIRMWARE, elf_symbol, firmware
from tests.helpers.gdb import gdb_multiarch
from tests.helpers.remote_targets import RemoteTargets

S = cpb


async def test_after_the_target_exited_the_server_says_so(remote: Conf) -> None:
    """A QEMU behind -gdb ends with the firmware (semihosting exit: ``W00``, then it
    exits): what needs the machine afterwards answers with the reason, and a power-on
    after a new QEMU at the same socket reconnects."""
    board = "mps2-an385"
    name = await remote.session(board, "hello", run=True)
    done = await remote.wait_state(name, S.SESSION_STATE_EXITED)
    assert done.exit_code == 0 and done.last_stop.reason == S.STOP_REASON_EXIT  # type: ignore[attr-defined]
    assert await remote.console(name) == f"Hello from {board}!\n".encode()
    qemu = remote.remotes[name]
    assert await qemu.wait_exit() == 0
    crc = await remote.upload(board, "crc32")
    for call in (remote.client.sessions.reset_session(name=name),
                 remote.client.sessions.load_program(name=name, program=crc),
                 remote.client.debug.step(name=name, count=1)):
        with pytest.raises((errors.FailedPrecondition, errors.Unavailable)) as exc:
            await call
        assert "power" in exc.value.message, exc.value.message
    # a new QEMU at the same sockets: power off and on reconnects, the program reloaded
    await qemu.start()
    await remote.client.sessions.power_off_session(name=name)
    on = (await remote.client.sessions.power_on_session(name=name)).session
    assert on.state == S.SESSION_STATE_HALTED
    await remote.client.sessions.run_session(name=name)
    hello = f"Hello from {board}!\n".encode()
    await remote.console_until(name, hello * 2)
    assert (await remote.wait_state(name, S.SESSION_STATE_EXITED)).exit_code == 0  # type: ignore[attr-defined]


async def test_soft_snapshot_replays(remote: Conf) -> None:
    """A soft snapshot (registers and RAM) at the 2nd call of a function: restored, the same
    registers and RAM and the same console bytes next; restored into a fresh session (its
    own QEMU) the same registers and RAM. Capabilities says what it does not hold."""
    board = "mps2-an385"
    caps = await remote.client.capabilities.get_capabilities()
    info = next(b for b in caps.backends if b.name == "gdbremote")
    partial = {p.feature: p.note for p in info.partial_features}
    assert "peripheral" in partial.get(S.FEATURE_SNAPSHOTS, ""), partial

    name = await remote.session(board, "coverage", power_on=True)
    bp = (await remote.client.debug.set_breakpoint(name=name, location={"symbol": "called_three_times"})).breakpoint
    for _ in range(2):
        assert (await remote.client.debug.continue_(name=name, wait=True)).stop.reason == S.STOP_REASON_BREAKPOINT
    regs = await remote.registers(name)
    below_sp = regs["sp"] - 128  # the stack's next 128 bytes (sp may sit near the top of RAM)
    ram = (await remote.client.debug.read_memory(name=name, address=below_sp, size=128)).data
    snap = (await remote.client.sessions.create_snapshot(name=name, display_name="2nd call")).snapshot
    assert snap.backend == "gdbremote" and snap.size_bytes > 0
    await remote.client.debug.clear_breakpoint(name=name, id=bp.id)
    # stop before the exit call, so that the target (and its QEMU) stays
    await remote.client.debug.set_breakpoint(name=name, location={"symbol": "fw_exit"})
    offset = await remote.console_size(name)
    stop = (await remote.client.debug.continue_(name=name, wait=True)).stop
    assert stop.location.function == "fw_exit", stop
    first = await remote.console(name, offset)
    assert first == b"coverage done\n"
    await remote.client.debug.write_memory(name=name, address=below_sp, data=b"\xaa" * 128)

    restored = (await remote.client.sessions.restore_snapshot(name=name, snapshot=snap.name)).session
    assert restored.state == S.SESSION_STATE_HALTED
    assert await remote.registers(name) == regs
    assert (await remote.client.debug.read_memory(name=name, address=below_sp, size=128)).data == ram
    end = await remote.console_size(name)
    stop = (await remote.client.debug.continue_(name=name, wait=True)).stop
    assert stop.location.function == "fw_exit", stop
    assert await remote.console(name, end) == first

    # into a fresh session (its own QEMU): what a soft snapshot holds, registers and RAM
    # (not the UART's setup: running on there is not a replay)
    other = await remote.session(board, "coverage")
    await remote.client.sessions.restore_snapshot(name=other, snapshot=snap.name)
    assert await remote.registers(other) == regs
    assert (await remote.client.debug.read_memory(name=other, address=below_sp, size=128)).data == ram


async def test_what_the_remote_has_is_in_its_details(remote: Conf) -> None:
    board = "mps2-an385"
    caps = await remote.client.capabilities.get_capabilities()
    info = next(b for b in caps.backends if b.name == "gdbremote")
    assert info.available and S.FEATURE_COVERAGE not in info.features
    assert S.FEATURE_LOCKSTEP not in info.features
    name = await remote.session(board, "hello", power_on=True)
    details = dict((await remote.state(name)).backend_details)  # type: ignore[attr-defined]
    assert details["target"] == remote.remotes[name].address
    for key in ("qSupported", "registers", "hardware_breakpoints", "watchpoints", "monitor_reset"):
        assert details.get(key), (key, details)
    assert "write" in details["watchpoints"]


async def _refused_option(remote: Conf, targets: RemoteTargets, option: str) -> str:
    board = "mps2-an385"
    prog = await remote.upload(board, "hello")
    qemu = await targets.start(board)
    with pytest.raises((errors.Unimplemented, errors.InvalidArgument)) as exc:
        created = (await remote.client.sessions.create_session(
            board_template=board, program=prog, backend="gdbremote", power_on=True,
            options={**qemu.options(), option: True})).session
        await remote.client.sessions.delete_session(name=created.name)
    return exc.value.message


async def test_coverage_is_refused_with_the_reason(remote: Conf, targets: RemoteTargets) -> None:
    """A remote target gives no execution trace: StartCoverage and the coverage option
    are UNIMPLEMENTED (never single-stepping the whole program to fake it)."""
    name = await remote.session("mps2-an385", "hello", power_on=True)
    with pytest.raises(errors.Unimplemented) as exc:
        await remote.client.coverage.start_coverage(name=name)
    assert "coverage" in exc.value.message, exc.value.message
    assert "coverage" in await _refused_option(remote, targets, "coverage")


async def test_exact_instruction_counts_are_refused(remote: Conf, targets: RemoteTargets) -> None:
    """The icount option (exact instruction counts, a virtual clock) cannot hold for a
    remote target: refused, naming it."""
    assert "icount" in await _refused_option(remote, targets, "icount")


async def test_lockstep_is_refused(remote: Conf) -> None:
    """A co-simulation member runs in quanta of an emulator's clock: a remote target has none."""
    a = await remote.session("mps2-an385", "hello", power_on=True)
    b = await remote.session("mps2-an385", "hello", power_on=True)
    with pytest.raises((errors.Unimplemented, errors.FailedPrecondition, errors.InvalidArgument)) as exc:
        await remote.client.cosim.create_co_simulation(sessions=[a, b], sync={"quantum_instructions": 1000})
    assert "gdbremote" in exc.value.message or "lock" in exc.value.message.lower(), exc.value.message


async def test_pause_and_run(remote: Conf) -> None:
    """A running target paused twice (^C) and run again: it really ran in between (it
    echoes what the console sends)."""
    board = "lm3s6965evb"
    name = await remote.session(board, "echo", run=True)
    await remote.console_until(name, b"echo ready\n")
    for text in (b"a", b"b"):
        paused = await remote.client.sessions.pause_session(name=name)
        assert paused.session.state == S.SESSION_STATE_HALTED and paused.stop.reason == S.STOP_REASON_HALT
        assert (await remote.registers(name, ["pc"]))["pc"] == paused.stop.pc
        assert (await remote.client.debug.resolve_symbol(name=name, address=paused.stop.pc)).symbol
        running = (await remote.client.sessions.run_session(name=name)).session
        assert running.state == S.SESSION_STATE_RUNNING
        await remote.client.sessions.write_console(name=name, data=text)
        await remote.console_until(name, b"echo ready\na" + (b"b" if text == b"b" else b""))
    await remote.client.sessions.write_console(name=name, data=b"q")
    assert await remote.console_until(name, b"bye\n") == b"echo ready\nabbye\n"
    assert (await remote.wait_state(name, S.SESSION_STATE_EXITED)).exit_code == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("board", ["mps2-an385", "sifive_e"])
async def test_step_line_and_backtrace(remote: Conf, board: str) -> None:
    name = await remote.halted_at(board, "coverage", "called_three_times")
    frames = (await remote.client.debug.backtrace(name=name)).frames
    assert frames[0].location.function == "called_three_times", frames
    assert "main" in [f.location.function for f in frames], frames
    line = frames[0].location.line
    stop = (await remote.client.debug.step_line(name=name, mode=dpb.STEP_MODE_OVER)).stop
    assert stop.reason == S.STOP_REASON_STEP, stop
    assert stop.location.function == "called_three_times" and stop.location.line != line, stop
    out = (await remote.client.debug.step_line(name=name, mode=dpb.STEP_MODE_OUT)).stop
    assert out.location.function != "called_three_times", out
    await remote.run_to_exit(name)
    assert await remote.console(name) == b"coverage done\n"


async def test_attach_drives_a_remote_session(remote: Conf) -> None:
    board = "mps2-an385"
    name = await remote.halted_at(board, "crc32")
    main = elf_symbol(board, "crc32", "main")
    commands = [
        dpb.DebugCommand(tag=1, step=dpb.StepRequest(count=3)),
        dpb.DebugCommand(tag=2, read_registers=dpb.ReadRegistersRequest(names=["pc", "sp"])),
        dpb.DebugCommand(tag=3, read_memory=dpb.ReadMemoryRequest(address=main, size=8)),
        dpb.DebugCommand(tag=4, set_breakpoint=dpb.SetBreakpointRequest(location={"symbol": "fw_exit"})),
        dpb.DebugCommand(tag=5, **{"continue": dpb.ContinueRequest(wait=True)}),
    ]

    stopped = asyncio.Event()

    async def requests():  # type: ignore[no-untyped-def]
        yield dpb.AttachRequest(open=dpb.AttachOpen(name=name, control=True))
        for cmd in commands:
            yield dpb.AttachRequest(command=cmd)
        await asyncio.wait_for(stopped.wait(), 20)  # the stream ends with the requests

    got = []
    async for m in remote.client.debug.attach(requests()):
        got.append(m)
        if m.HasField("stopped") and m.stopped.reason == S.STOP_REASON_BREAKPOINT:
            stopped.set()
    assert got[0].opened.role == dpb.ATTACH_ROLE_CONTROLLER
    results = {m.result.tag: m.result for m in got if m.HasField("result")}
    assert all(r.code == 0 for r in results.values()), results
    assert results[1].step.stop.reason == S.STOP_REASON_STEP
    pc = {r.name: r.value for r in results[2].read_registers.registers}["pc"]
    assert pc == results[1].step.stop.pc != main
    with firmware(board, "crc32").open("rb") as f:
        from elftools.elf.elffile import ELFFile
        text = ELFFile(f).get_section_by_name(".text")
        assert text is not None
        assert results[3].read_memory.data == text.data()[main - text["sh_addr"]:][:8]
    stops = [m.stopped for m in got if m.HasField("stopped")]
    assert [s.location.function for s in stops if s.reason == S.STOP_REASON_BREAKPOINT] == ["fw_exit"], stops
    assert await remote.console(name) == b"crc32=0x80f45f04\n"


async def _gdb(port: int, elf: str, *commands: str, timeout: float = 60) -> str:
    args = [str(gdb_multiarch()), "-q", "-batch", "-nx", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for cmd in commands:
        args += ["-ex", cmd]
    proc = await asyncio.create_subprocess_exec(*args, elf, cwd=FIRMWARE, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError(f"gdb did not finish in {timeout} s:\n{out.decode(errors='replace')}") from None
    return out.decode(errors="replace")


@pytest.mark.parametrize("board", ["mps2-an385", "sifive_e"])
async def test_gdb_multiarch_through_the_bridge_of_a_remote_session(remote: Conf, board: str) -> None:
    """gdb -> our GDB bridge -> our RSP client -> QEMU's gdbstub: break, continue, read,
    step; the session sees where gdb left it."""
    name = await remote.session(board, "crc32", power_on=True)
    # halt_on_detach: the session stays where gdb left it (by default a detach resumes it)
    gs = (await remote.client.debug.start_gdb_server(name=name, halt_on_detach=True)).gdb_server
    main = elf_symbol(board, "crc32", "main")
    out = await _gdb(gs.port, str(firmware(board, "crc32")),
                     "break main", "continue", "print/x $pc", "stepi", "stepi", "print/x $pc",
                     "x/2xw &buf", "detach")
    assert "Breakpoint 1, main" in out, out
    assert f"$1 = {main:#x}" in out, out
    pcs = [line for line in out.splitlines() if line.startswith("$2 = ")]
    assert pcs, out
    after = int(pcs[0].split("=")[1], 16)
    assert after != main
    assert "0x00000000\t0x00000000" in out, out  # buf before fill(): zeroed .bss
    session = await remote.state(name)
    assert session.state == S.SESSION_STATE_HALTED  # type: ignore[attr-defined]
    assert (await remote.registers(name, ["pc"]))["pc"] == after
    await remote.client.debug.stop_gdb_server(name=name)
    await remote.run_to_exit(name)
    assert await remote.console(name) == b"crc32=0x80f45f04\n"


@pytest.mark.parametrize("board", BOARDS)
async def test_same_registers_and_memory_as_qemu_and_unicorn(remote: Conf, board: str) -> None:
    """crc32 at main and N instructions later: the same core registers and the same bytes
    of its buffer on all three backends."""
    require_backend("qemu", board)
    confs = [remote, Conf(remote.client, "qemu"), Conf(remote.client, "unicorn")]
    names = [await conf.halted_at(board, "crc32") for conf in confs]
    buf = elf_symbol(board, "crc32", "buf")
    keep = CORE_REGISTERS[BOARD_ARCH[board]]
    for steps in (0, 1, 10, 97, 200):
        if steps:
            for conf, n in zip(confs, names, strict=True):
                assert (await conf.client.debug.step(name=n, count=steps)).stop.reason == S.STOP_REASON_STEP
        regs = [await conf.registers(n, keep) for conf, n in zip(confs, names, strict=True)]
        mems = [(await conf.client.debug.read_memory(name=n, address=buf, size=64)).data
                for conf, n in zip(confs, names, strict=True)]
        for conf, r, m in zip(confs[1:], regs[1:], mems[1:], strict=True):
            differ = {k: (hex(regs[0][k]), hex(r[k])) for k in keep if regs[0][k] != r[k]}
            assert not differ, f"after {steps} more steps, gdbremote vs {conf.backend}: {differ}"
            assert mems[0] == m, f"after {steps} more steps, buf differs from {conf.backend}"
    assert mems[0] != bytes(64)  # fill() had written some of it


@pytest.mark.parametrize("while_state", ["running", "halted"])
async def test_the_target_vanishing_fails_the_session_and_power_on_reconnects(remote: Conf, while_state: str) -> None:
    board = "lm3s6965evb"
    name = await remote.session(board, "echo", power_on=True)
    qemu = remote.remotes[name]
    if while_state == "running":
        await remote.client.sessions.run_session(name=name)
        await remote.console_until(name, b"echo ready\n")
    qemu.kill()
    if while_state == "halted":  # nothing is in flight: the next request finds it gone
        with pytest.raises((errors.Unavailable, errors.FailedPrecondition)) as exc:
            await remote.client.debug.step(name=name, count=1)
        assert exc.value.message
    failed = await remote.wait_state(name, S.SESSION_STATE_FAILED, timeout=10)
    reason = failed.state_reason  # type: ignore[attr-defined]
    assert "remote" in reason.lower(), reason
    for call in (remote.client.debug.read_registers(name=name), remote.client.sessions.run_session(name=name)):
        with pytest.raises(errors.FailedPrecondition) as exc:
            await call
        assert "failed" in exc.value.message and "power it on" in exc.value.message
    # power on while nobody listens: UNAVAILABLE with the reason, still FAILED/OFF
    with pytest.raises(errors.Unavailable) as exc:
        await remote.client.sessions.power_on_session(name=name)
    assert qemu.address.removeprefix("unix:") in exc.value.message, exc.value.message
    # a new QEMU at the same socket: power on reconnects, the program reloaded
    await qemu.start()
    on = (await remote.client.sessions.power_on_session(name=name)).session
    assert on.state == S.SESSION_STATE_HALTED
    offset = await remote.console_size(name)
    await remote.client.sessions.run_session(name=name)
    await remote.console_until(name, b"echo ready\n" * (2 if offset else 1))
    await remote.client.sessions.write_console(name=name, data=b"ok\nq")
    await remote.wait_state(name, S.SESSION_STATE_EXITED)
    assert (await remote.console(name, offset)).endswith(b"echo ready\nok\nbye\n")


async def test_bad_inputs_name_what_is_wrong(remote: Conf, targets: RemoteTargets) -> None:
    board = "mps2-an385"
    prog = await remote.upload(board, "hello")
    create = remote.client.sessions.create_session
    # nobody listens there: created, but power on is UNAVAILABLE saying where
    nobody = f"unix:{targets.root}/nobody.sock"
    s = (await create(board_template=board, program=prog, backend="gdbremote",
                      options={"remote": {"address": nobody}})).session
    with pytest.raises(errors.Unavailable) as exc:
        await remote.client.sessions.power_on_session(name=s.name)
    assert f"{targets.root}/nobody.sock" in exc.value.message, exc.value.message
    # outside the allow-list, no address, a malformed one: INVALID_ARGUMENT naming the field
    for options in ({"remote": {"address": "10.1.2.3:3333"}}, {"remote": {"address": "unix:/run/elsewhere.sock"}},
                    {}, {"remote": {"address": "nohost"}},
                    {"remote": {"address": f"unix:{targets.root}/x", "console": "tcp:10.0.0.1:2"}}):
        with pytest.raises(errors.InvalidArgument) as exc:
            await create(board_template=board, program=prog, backend="gdbremote", options=options)
        fields = [f for f, _ in exc.value.field_violations]
        assert fields and fields[0].startswith("options.remote."), (options, exc.value.message)
    # a board whose arch is not the target's: refused at power on, naming both
    arm = await targets.start("mps2-an385")
    rv = (await create(board_template="sifive_e", backend="gdbremote", options=arm.options())).session
    with pytest.raises(errors.InvalidArgument) as exc:
        await remote.client.sessions.power_on_session(name=rv.name)
    assert "sifive_e" in exc.value.message and "riscv32" in exc.value.message, exc.value.message
    assert (await remote.state(rv.name)).state != S.SESSION_STATE_HALTED  # type: ignore[attr-defined]
    # a program for another arch than the board's
    wrong = await remote.upload("sifive_e", "hello")
    other = await targets.start(board)
    with pytest.raises(errors.InvalidArgument) as exc:
        await create(board_template=board, program=wrong, backend="gdbremote", options=other.options())
    assert exc.value.field_violations[0][0] == "program"
