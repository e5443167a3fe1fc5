"""Co-simulation through the public API (SDK), on real firmware built from C
(tests/firmware/src/cosim_*.c, ring*.c on mps2-an385): the exchanged values over shared
memory, doorbell interrupts and serial links; determinism (ten runs, one beside a CPU
hog); mixed backends; the exact cross-member halt; coordinated snapshots; membership
rules; a member's backend killed mid-run; the bad inputs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from machineserver.server.config import ServerConfig
from machineserver.server.drivers.base import HostFootprint
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import cosim_pb2 as pb
from tests.helpers.api import console_text, upload
from tests.helpers.backends import require_backend
from tests.helpers.firmware import FIRMWARE, firmware
from tests.helpers.gdb import gdb_multiarch
from tests.helpers.server import ServerProcess

BOARD = "mps2-an385"
OUT, IN, PONG, BELL, IRQ = 0x20200000, 0x20210000, 0x20280000, 0x20220000, 30
QUANTUM = 10_000  # instructions
ONE_SECOND = 10**9


@pytest.fixture(params=[-1, 0], ids=["workers", "in-process"])
def server_config(request: pytest.FixtureRequest, server_config: ServerConfig) -> ServerConfig:
    return dataclasses.replace(server_config, workers=request.param)


async def member(client: AsyncClient, program: str, backend: str = "unicorn", name: str = "") -> str:
    prog = await upload(client, BOARD, program)
    s = await client.sessions.create_session(board_template=BOARD, program=prog, backend=backend,
                                             options={"icount": backend == "qemu"}, session_id=name)
    return str(s.session.name)


def shared(a: str, a_addr: int, b: str, b_addr: int, size: int = 0x1000) -> dict[str, Any]:
    return {"shared_memory": {"mappings": [{"session": a, "address": a_addr}, {"session": b, "address": b_addr}],
                              "size": size}}


def bell(src: str, dst: str, latency_ns: int = 0) -> dict[str, Any]:
    return {"interrupt": {"from_session": src, "doorbell_address": BELL, "value_mask": 1, "to_session": dst,
                          "irq": IRQ, "latency_ns": latency_ns}}


async def pingpong(client: AsyncClient, backends: tuple[str, str] = ("unicorn", "unicorn"),
                   quantum: int = QUANTUM) -> pb.CoSimulation:
    ping = await member(client, "cosim_ping", backends[0])
    pong = await member(client, "cosim_pong", backends[1])
    return (await client.cosim.create_co_simulation(
        sessions=[ping, pong], links=[shared(ping, OUT, pong, PONG), bell(ping, pong), bell(pong, ping)],
        sync={"quantum_instructions": quantum}, display_name="ping-pong")).cosimulation


async def chatter(client: AsyncClient, backends: tuple[str, str] = ("unicorn", "unicorn")) -> pb.CoSimulation:
    a = await member(client, "cosim_chatter", backends[0])
    b = await member(client, "cosim_responder", backends[1])
    return (await client.cosim.create_co_simulation(
        sessions=[a, b], links=[{"serial": {"session_a": a, "session_b": b}}],
        sync={"quantum_instructions": 2_000})).cosimulation


async def ring(client: AsyncClient, backends: tuple[str, ...] = ("unicorn",) * 3) -> pb.CoSimulation:
    nodes = [await member(client, f"ring{k}", backends[k]) for k in range(3)]
    links = []
    for k in range(3):
        nxt = nodes[(k + 1) % 3]
        links += [shared(nodes[k], OUT, nxt, IN), bell(nodes[k], nxt, latency_ns=1_000)]
    return (await client.cosim.create_co_simulation(sessions=nodes, links=links,
                                                    sync={"quantum_ns": 200_000})).cosimulation


async def run_to_end(client: AsyncClient, cosim: pb.CoSimulation) -> pb.CoSimulation:
    """Step until a member stops the co-simulation (an exit), at most one virtual second."""
    done = (await client.cosim.step_co_simulation(name=cosim.name, until_virtual_time_ns=ONE_SECOND,
                                                  timeout=120)).cosimulation
    assert done.state == pb.CO_SIM_STATE_STOPPED, done
    return done


async def consoles(client: AsyncClient, cosim: pb.CoSimulation) -> list[bytes]:
    return [await console_text(client, s) for s in cosim.sessions]


@contextlib.asynccontextmanager
async def traffic_log(client: AsyncClient, cosim: pb.CoSimulation) -> AsyncIterator[list[tuple[Any, ...]]]:
    """The co-simulation's link traffic, as (kind, virtual ns, from, to, data, irq), until
    the block ends (and the stream has caught up with the co-simulation's end)."""
    log: list[tuple[Any, ...]] = []
    names = {s: f"m{i}" for i, s in enumerate(cosim.sessions)}  # the same log whatever the session ids
    stream = client.cosim.stream_co_simulation_events(name=cosim.name)
    first = await anext(stream)
    assert first.kind == pb.CO_SIM_EVENT_KIND_SUBSCRIBED

    async def read() -> None:
        async for ev in stream:
            if ev.kind in (pb.CO_SIM_EVENT_KIND_SERIAL, pb.CO_SIM_EVENT_KIND_INTERRUPT,
                           pb.CO_SIM_EVENT_KIND_SHARED_MEMORY, pb.CO_SIM_EVENT_KIND_DROP):
                log.append((ev.kind, ev.virtual_time_ns, names[ev.session], names.get(ev.to_session, ""),
                            bytes(ev.data), ev.irq))
            if ev.kind == pb.CO_SIM_EVENT_KIND_STOP:
                return

    reader = asyncio.create_task(read())
    try:
        yield log
        await asyncio.wait_for(reader, 30)
    finally:
        reader.cancel()
        await stream.aclose()


# ---------------------------------------------------------------------------- exchanged values

async def test_ping_pong_over_shared_memory_and_doorbells(client: AsyncClient) -> None:
    cosim = await pingpong(client)
    assert cosim.state == pb.CO_SIM_STATE_PAUSED and len(cosim.members) == 2
    assert all(m.state == cpb.SESSION_STATE_HALTED for m in cosim.members)
    done = await run_to_end(client, cosim)
    ping, pong = await consoles(client, cosim)
    assert ping.startswith(b"ping ready\n") and ping.endswith(b"ping: 100 round trips, pong sum 5050\n"), ping
    assert b"pong: 100 pings, sum 5050\n" in pong, pong
    assert done.last_stop.reason == "exit" and done.last_stop.session == cosim.sessions[0]
    assert done.link_status[1].interrupts == 100 and done.link_status[2].interrupts == 100
    # every member ends at the stopping member's virtual instant
    assert {m.virtual_time_ns for m in done.members} == {done.virtual_time_ns}
    assert done.members[0].state == cpb.SESSION_STATE_EXITED
    assert done.members[1].state == cpb.SESSION_STATE_HALTED


async def test_a_serial_link_carries_lines_both_ways(client: AsyncClient) -> None:
    cosim = await chatter(client)
    done = await run_to_end(client, cosim)
    sent, answered = await consoles(client, cosim)
    assert sent == b"".join(b"msg %d\n" % i for i in range(1, 11)) + b"done\n", sent
    assert answered == b"".join(b"ack %d\n" % i for i in range(1, 11)) + b"bye\n", answered
    assert done.members[0].state == cpb.SESSION_STATE_EXITED
    link = done.link_status[0]
    assert link.bytes == len(sent) + len(answered) and link.bytes_dropped == 0 and link.bytes_in_flight == 0


async def test_a_three_node_ring_passes_the_token(client: AsyncClient) -> None:
    cosim = await ring(client)
    await run_to_end(client, cosim)
    out = await consoles(client, cosim)
    assert out[0].endswith(b"ring0: 5 laps, token 15\n"), out[0]
    assert b"ring1: token 13\n" in out[1] and b"ring2: token 14\n" in out[2], out


# ---------------------------------------------------------------------------- determinism

def _hog(stop: Any) -> None:
    while not stop.is_set():
        pass


@contextlib.contextmanager
def cpu_hog() -> Iterator[None]:
    spawn = multiprocessing.get_context("spawn")  # not a fork of a process with gRPC's threads
    stop = spawn.Event()
    procs = [spawn.Process(target=_hog, args=(stop,)) for _ in range(os.cpu_count() or 2)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


async def test_ten_runs_one_under_load_are_identical(client: AsyncClient, server_config: ServerConfig) -> None:
    if server_config.workers == 0:
        pytest.skip("run once, with the emulation in worker processes")
    runs = []
    for i in range(10):
        cosim = await pingpong(client, quantum=3_000)
        async with traffic_log(client, cosim) as log:
            with cpu_hog() if i == 4 else contextlib.nullcontext():
                done = await run_to_end(client, cosim)
        runs.append((await consoles(client, cosim), log, done.virtual_time_ns, done.quanta))
        await client.cosim.delete_co_simulation(name=cosim.name)
    first = runs[0]
    assert first[1] and any(kind == pb.CO_SIM_EVENT_KIND_INTERRUPT for kind, *_ in first[1])
    for i, run in enumerate(runs[1:], 1):
        assert run == first, f"run {i} differs"


# ---------------------------------------------------------------------------- the exact halt

async def test_a_breakpoint_halts_every_member_at_the_same_instant(client: AsyncClient) -> None:
    straight = await pingpong(client)
    await run_to_end(client, straight)
    expected = await consoles(client, straight)

    cosim = await pingpong(client)
    pong = cosim.sessions[1]
    await client.debug.set_breakpoint(name=pong, location={"symbol": "IRQ30_Handler"})
    hits = 0
    async with traffic_log(client, cosim) as log:
        while True:
            now = (await client.cosim.step_co_simulation(name=cosim.name, until_virtual_time_ns=ONE_SECOND,
                                                         timeout=60)).cosimulation
            if now.state == pb.CO_SIM_STATE_STOPPED:
                break
            assert now.state == pb.CO_SIM_STATE_PAUSED and now.last_stop.reason == "breakpoint"
            assert now.last_stop.session == pong
            # every member is at the stopping member's instant, exactly
            assert [m.virtual_time_ns for m in now.members] == [now.virtual_time_ns] * 2, now.members
            assert [m.state for m in now.members] == [cpb.SESSION_STATE_HALTED] * 2
            session = (await client.sessions.get_session(name=pong)).session
            assert session.last_stop.reason == cpb.STOP_REASON_BREAKPOINT
            hits += 1
            if hits == 3:
                bps = (await client.debug.list_breakpoints(name=pong)).breakpoints
                await client.debug.clear_breakpoint(name=pong, id=bps[0].id)
    assert hits == 3
    assert await consoles(client, cosim) == expected  # halting did not change the system's behaviour
    assert log


# ---------------------------------------------------------------------------- snapshots

async def test_snapshot_run_restore_run_is_identical(client: AsyncClient) -> None:
    cosim = await pingpong(client)
    mid = (await client.cosim.step_co_simulation(name=cosim.name, count=40)).cosimulation
    assert mid.quanta == 40 and mid.state == pb.CO_SIM_STATE_PAUSED
    snap = (await client.cosim.create_co_sim_snapshot(parent=cosim.name, display_name="q40")).snapshot
    assert snap.name.startswith(cosim.name + "/snapshots/") and snap.quanta == 40
    assert list(snap.shape) == [f"{BOARD}/unicorn"] * 2
    marks = [len(c) for c in await consoles(client, cosim)]
    first = await run_to_end(client, cosim)
    after_first = [c[m:] for c, m in zip(await consoles(client, cosim), marks, strict=True)]

    restored = (await client.cosim.restore_co_sim_snapshot(name=snap.name)).cosimulation
    assert restored.state == pb.CO_SIM_STATE_PAUSED and restored.quanta == 40
    assert restored.virtual_time_ns == mid.virtual_time_ns
    marks = [len(c) for c in await consoles(client, cosim)]
    second = await run_to_end(client, cosim)
    after_second = [c[m:] for c, m in zip(await consoles(client, cosim), marks, strict=True)]
    assert after_second == after_first and b"round trips" in after_first[0]
    assert second.virtual_time_ns == first.virtual_time_ns and second.quanta == first.quanta

    # export, import into a co-simulation of the same shape, restore there: the same continuation
    artifact = b""
    async for msg in client.cosim.export_co_sim_snapshot(name=snap.name):
        artifact += msg.chunk
    other = await pingpong(client)

    async def chunks() -> AsyncIterator[pb.ImportCoSimSnapshotRequest]:
        yield pb.ImportCoSimSnapshotRequest(metadata=pb.CoSimSnapshotHeader(parent=other.name, sha256=snap.sha256))
        for i in range(0, len(artifact), 65536):
            yield pb.ImportCoSimSnapshotRequest(chunk=artifact[i:i + 65536])

    imported = (await client.cosim.import_co_sim_snapshot(chunks())).snapshot
    await client.cosim.restore_co_sim_snapshot(name=imported.name)
    marks = [len(c) for c in await consoles(client, other)]
    await run_to_end(client, other)
    assert [c[m:] for c, m in zip(await consoles(client, other), marks, strict=True)] == after_first

    # a snapshot of another shape does not go in
    third = await chatter(client)

    async def wrong() -> AsyncIterator[pb.ImportCoSimSnapshotRequest]:
        yield pb.ImportCoSimSnapshotRequest(metadata=pb.CoSimSnapshotHeader(parent=third.name))
        yield pb.ImportCoSimSnapshotRequest(chunk=b"not a snapshot")

    with pytest.raises(errors.InvalidArgument, match="not a co-simulation snapshot"):
        await client.cosim.import_co_sim_snapshot(wrong())


# ---------------------------------------------------------------------------- membership

async def test_members_run_control_goes_through_the_cosimulation(client: AsyncClient) -> None:
    cosim = await pingpong(client)
    ping, pong = cosim.sessions
    with pytest.raises(errors.FailedPrecondition, match=cosim.name):
        await client.debug.step(name=ping, count=10)
    with pytest.raises(errors.FailedPrecondition, match=cosim.name):
        await client.sessions.reset_session(name=pong)
    with pytest.raises(errors.FailedPrecondition, match=cosim.name):
        await client.sessions.delete_session(name=pong)
    with pytest.raises(errors.FailedPrecondition, match=cosim.name):
        await client.sessions.power_off_session(name=pong)
    # a continue on one member runs the whole co-simulation to the next stop
    stop = (await client.debug.continue_(name=pong, wait=True, timeout=60)).stop
    assert stop.reason == cpb.STOP_REASON_HALT
    now = (await client.cosim.get_co_simulation(name=cosim.name)).cosimulation
    assert now.state == pb.CO_SIM_STATE_STOPPED and now.last_stop.session == ping
    # deleting the co-simulation frees its members
    await client.cosim.delete_co_simulation(name=cosim.name)
    await client.sessions.reset_session(name=pong)
    with pytest.raises(errors.NotFound):
        await client.cosim.get_co_simulation(name=cosim.name)


async def test_bad_topologies_are_refused_naming_the_field(client: AsyncClient) -> None:
    a = await member(client, "cosim_ping")
    b = await member(client, "cosim_pong")
    good_sync = {"quantum_instructions": 1000}

    async def create(**kw: Any) -> None:
        await client.cosim.create_co_simulation(**{"sessions": [a, b], "sync": good_sync, **kw})

    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"sessions": [a]}, errors.InvalidArgument, "sessions"),
        ({"sessions": [a, a]}, errors.InvalidArgument, "sessions"),
        ({"sync": {}}, errors.InvalidArgument, "sync.quantum_ns"),
        ({"sync": {"quantum_ns": 1}}, errors.InvalidArgument, "sync.quantum_ns"),
        ({"links": [shared(a, 0x20200000, b, 0x20200000), shared(a, 0x20200800, b, 0x20300000)]},
         errors.InvalidArgument, "links[1].shared_memory.mappings[0].address"),
        ({"links": [shared(a, 0x40000000, b, OUT)]}, errors.InvalidArgument,
         "links[0].shared_memory.mappings[0].address"),
        ({"links": [shared(a, 0x203FF800, b, OUT)]}, errors.InvalidArgument,
         "links[0].shared_memory.mappings[0].address"),
        ({"links": [{"interrupt": {**bell(a, b)["interrupt"], "irq": 32}}]}, errors.InvalidArgument,
         "links[0].interrupt.irq"),
        ({"links": [bell(a, "sessions/nobody")]}, errors.InvalidArgument, "links[0].interrupt.to_session"),
        ({"links": [{"serial": {"session_a": a, "session_b": a}}]}, errors.InvalidArgument,
         "links[0].serial.session_b"),
        ({"sessions": [a, "sessions/nobody"]}, errors.NotFound, "nobody"),
    ]
    for kw, exc, where in cases:
        with pytest.raises(exc) as info:
            await create(**kw)
        assert where in str(info.value), (kw, str(info.value))
    # a session already in another co-simulation
    c = await member(client, "cosim_pong")
    first = (await client.cosim.create_co_simulation(sessions=[a, c], sync=good_sync)).cosimulation
    with pytest.raises(errors.FailedPrecondition, match=f"already belongs to co-simulation {first.name}"):
        await create()
    # running it twice, stepping too far, a time in the past
    await client.cosim.start_co_simulation(name=first.name)
    with pytest.raises(errors.FailedPrecondition, match="running"):
        await client.cosim.step_co_simulation(name=first.name)
    await client.cosim.pause_co_simulation(name=first.name)
    with pytest.raises(errors.InvalidArgument, match="count"):
        await client.cosim.step_co_simulation(name=first.name, count=10**10)
    stepped = (await client.cosim.step_co_simulation(name=first.name)).cosimulation
    assert stepped.virtual_time_ns > 0
    with pytest.raises(errors.InvalidArgument, match="until_virtual_time_ns"):
        await client.cosim.step_co_simulation(name=first.name, until_virtual_time_ns=stepped.virtual_time_ns)
    with pytest.raises(errors.NotFound):
        await client.cosim.start_co_simulation(name="cosimulations/nope")


# ---------------------------------------------------------------------------- failure

async def test_a_member_killed_mid_run_fails_the_cosimulation(server: RunningServer, client: AsyncClient,
                                                                server_config: ServerConfig) -> None:
    if server_config.workers == 0:
        pytest.skip("a member's backend process to kill: the emulation runs in worker processes")
    require_backend("qemu", BOARD)
    cosim = await pingpong(client, ("unicorn", "qemu"), quantum=1_000)
    ping, pong = cosim.sessions
    await client.cosim.start_co_simulation(name=cosim.name)
    deadline = asyncio.get_running_loop().time() + 30
    while (now := (await client.cosim.get_co_simulation(name=cosim.name)).cosimulation).quanta < 5:
        assert now.state == pb.CO_SIM_STATE_RUNNING, now  # it runs, until the kill
        assert asyncio.get_running_loop().time() < deadline, now
        await asyncio.sleep(0.01)
    machine = server.engine.sessions.get(pong).machine
    assert machine is not None
    pids = list(machine.capability(HostFootprint).host_process_ids())
    assert pids, "the QEMU member has a process"
    os.kill(pids[0], signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        now = (await client.cosim.get_co_simulation(name=cosim.name)).cosimulation
        if now.state == pb.CO_SIM_STATE_FAILED:
            break
        assert asyncio.get_running_loop().time() < deadline, now
        await asyncio.sleep(0.05)
    assert pong in now.state_reason and "SIGKILL" in now.state_reason, now.state_reason
    states = {m.session: m.state for m in now.members}
    assert states[pong] == cpb.SESSION_STATE_FAILED and states[ping] == cpb.SESSION_STATE_HALTED
    # nothing lost: the record says so after a fresh read, and the other member is inspectable
    assert (await client.debug.read_registers(name=ping)).registers
    listed = (await client.cosim.list_co_simulations(filter="state=FAILED")).cosimulations
    assert [c.name for c in listed] == [cosim.name]


# ---------------------------------------------------------------------------- mixed backends

@pytest.mark.parametrize("program", ["pingpong", "chatter"])
async def test_mixed_backends_agree_with_unicorn_and_qemu_alone(client: AsyncClient, server_config: ServerConfig,
                                                                program: str) -> None:
    if server_config.workers == 0:
        pytest.skip("run once, with the emulation in worker processes")
    require_backend("qemu", BOARD)
    make = pingpong if program == "pingpong" else chatter
    results = {}
    for backends in (("unicorn", "unicorn"), ("unicorn", "qemu"), ("qemu", "unicorn"), ("qemu", "qemu")):
        cosim = await make(client, backends)
        done = await run_to_end(client, cosim)
        results[backends] = (await consoles(client, cosim), done.virtual_time_ns)
        await client.cosim.delete_co_simulation(name=cosim.name)
    reference = results[("unicorn", "unicorn")]
    for backends, outcome in results.items():
        assert outcome == reference, f"{backends} differs from all-Unicorn"


# ---------------------------------------------------------------------------- gdb on a member

async def test_gdb_on_a_member_sees_the_cosimulation_halt_and_continues_all(client: AsyncClient,
                                                                            server_config: ServerConfig) -> None:
    if server_config.workers == 0:
        pytest.skip("run once, with the emulation in worker processes")
    gdb = gdb_multiarch()
    cosim = await pingpong(client)
    ping, pong = cosim.sessions
    port = (await client.debug.start_gdb_server(name=pong)).gdb_server.port
    proc = await asyncio.create_subprocess_exec(
        str(gdb), "-q", "-batch", "-nx", "-ex", "set pagination off", "-ex", "set confirm off",
        "-ex", f"target remote 127.0.0.1:{port}", "-ex", "break IRQ30_Handler", "-ex", "continue",
        "-ex", "print/x $pc", "-ex", "delete", "-ex", "continue", "-ex", "detach",
        str(firmware(BOARD, "cosim_pong")), cwd=FIRMWARE, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode(errors="replace")
    # gdb's continue ran the whole co-simulation to pong's breakpoint, then to ping's exit
    assert "Breakpoint 1, IRQ30_Handler" in out, out
    done = (await client.cosim.get_co_simulation(name=cosim.name)).cosimulation
    assert done.state == pb.CO_SIM_STATE_STOPPED and done.last_stop.session == ping, done
    assert (await consoles(client, cosim))[0].endswith(b"ping: 100 round trips, pong sum 5050\n")
    assert {m.virtual_time_ns for m in done.members} == {done.virtual_time_ns}


# ---------------------------------------------------------------------------- who can keep lock-step

async def test_capabilities_say_who_keeps_lock_step_and_create_refuses_the_rest(client: AsyncClient) -> None:
    caps = await client.capabilities.get_capabilities()
    assert set(caps.buses) == {"shared-memory", "interrupt", "serial"}
    unicorn = next(b for b in caps.backends if b.name == "unicorn")
    assert cpb.FEATURE_LOCKSTEP in unicorn.features
    limit = next(x for x in unicorn.board_limits if x.board == "sifive_e" and x.feature == cpb.FEATURE_LOCKSTEP)
    assert limit.reason
    ping = await member(client, "cosim_ping")
    riscv = (await client.sessions.create_session(board_template="sifive_e")).session.name
    with pytest.raises(errors.FailedPrecondition, match="cannot keep lock-step") as info:
        await client.cosim.create_co_simulation(sessions=[ping, riscv], sync={"quantum_instructions": 1000})
    assert limit.reason in str(info.value)
    # nothing was taken: the session is free for another co-simulation
    pong = await member(client, "cosim_pong")
    await client.cosim.create_co_simulation(sessions=[ping, pong], sync={"quantum_instructions": 1000})


async def test_a_qemu_member_needs_icount(client: AsyncClient) -> None:
    require_backend("qemu", BOARD)
    ping = await member(client, "cosim_ping")
    prog = await upload(client, BOARD, "cosim_pong")
    plain = (await client.sessions.create_session(board_template=BOARD, program=prog, backend="qemu")).session.name
    with pytest.raises(errors.FailedPrecondition, match="icount"):
        await client.cosim.create_co_simulation(sessions=[ping, plain], sync={"quantum_instructions": 1000})
    # refused whole: neither session joined
    other = await member(client, "cosim_pong")
    await client.cosim.create_co_simulation(sessions=[ping, other], sync={"quantum_instructions": 1000})


# ---------------------------------------------------------------------------- a restart

async def test_after_a_server_kill_the_cosimulation_is_failed_and_a_snapshot_brings_it_back(
        tmp_path: Path, server_config: ServerConfig) -> None:
    if server_config.workers == 0:
        pytest.skip("server processes of their own: once is enough")
    sp = ServerProcess(tmp_path / "data").start()
    try:
        async with await AsyncClient.connect(sp.target, timeout=30) as c:
            cosim = await pingpong(c)
            await c.cosim.step_co_simulation(name=cosim.name, count=30)
            snap = (await c.cosim.create_co_sim_snapshot(parent=cosim.name)).snapshot
            marks = [len(x) for x in await consoles(c, cosim)]
            await run_to_end(c, cosim)
            straight = [x[m:] for x, m in zip(await consoles(c, cosim), marks, strict=True)]
        sp.stop(signal.SIGKILL)
        sp.start()
        async with await AsyncClient.connect(sp.target, timeout=30) as c:
            back = (await c.cosim.get_co_simulation(name=cosim.name)).cosimulation
            assert back.state == pb.CO_SIM_STATE_FAILED and "restarted" in back.state_reason, back
            assert [s.name for s in (await c.cosim.list_co_sim_snapshots(parent=cosim.name)).snapshots] == [snap.name]
            with pytest.raises(errors.FailedPrecondition, match=cosim.name):
                await c.debug.step(name=cosim.sessions[0])
            restored = (await c.cosim.restore_co_sim_snapshot(name=snap.name)).cosimulation
            assert restored.state == pb.CO_SIM_STATE_PAUSED and restored.quanta == 30
            marks = [len(x) for x in await consoles(c, cosim)]
            await run_to_end(c, cosim)
            assert [x[m:] for x, m in zip(await consoles(c, cosim), marks, strict=True)] == straight
    finally:
        sp.stop()


# ---------------------------------------------------------------------------- where the loop runs

async def test_members_in_two_workers_run_the_loop_in_the_server_with_the_same_result(
        server: RunningServer, client: AsyncClient, server_config: ServerConfig) -> None:
    if server_config.workers == 0:
        pytest.skip("about worker processes")
    prog = {p: await upload(client, BOARD, p) for p in ("cosim_ping", "cosim_pong")}
    apart = []
    for p in ("cosim_ping", "cosim_pong"):  # powered on before: each in a worker of its own
        apart.append((await client.sessions.create_session(board_template=BOARD, program=prog[p],
                                                           power_on=True)).session.name)
    links = {server.engine.sessions.get(s).machine.link for s in apart}  # type: ignore[union-attr]
    assert len(links) == 2, "the pool placed both in one worker"
    ping, pong = apart
    cosim = (await client.cosim.create_co_simulation(
        sessions=apart, links=[shared(ping, OUT, pong, PONG), bell(ping, pong), bell(pong, ping)],
        sync={"quantum_instructions": QUANTUM})).cosimulation
    done = await run_to_end(client, cosim)
    assert done.link_status[1].interrupts == 100

    together = await pingpong(client)  # created off: powered on in one worker, the loop runs there
    links = {server.engine.sessions.get(s).machine.link for s in together.sessions}  # type: ignore[union-attr]
    assert len(links) == 1
    again = await run_to_end(client, together)
    assert await consoles(client, together) == await consoles(client, cosim)
    assert (again.virtual_time_ns, again.quanta) == (done.virtual_time_ns, done.quanta)


async def test_a_snapshot_at_a_halt_inside_a_quantum_continues_the_same(client: AsyncClient) -> None:
    """Taken where a breakpoint halted every member mid-quantum: the rest of the quantum
    runs after a restore as after a continue; the same consoles to the end."""
    cosim = await pingpong(client)
    pong = cosim.sessions[1]
    # a line a few instructions into pong's handler: reached just after a barrier
    bp = (await client.debug.set_breakpoint(name=pong, location={"file_line": "cosim_pong.c:20"})).breakpoint
    for _ in range(5):
        halted = (await client.cosim.step_co_simulation(name=cosim.name, until_virtual_time_ns=ONE_SECOND,
                                                        timeout=60)).cosimulation
        assert halted.last_stop.reason == "breakpoint"
    assert halted.virtual_time_ns % halted.quantum_ns != 0  # inside a quantum
    await client.debug.clear_breakpoint(name=pong, id=bp.id)
    snap = (await client.cosim.create_co_sim_snapshot(parent=cosim.name)).snapshot
    assert snap.virtual_time_ns == halted.virtual_time_ns
    marks = [len(c) for c in await consoles(client, cosim)]
    first = await run_to_end(client, cosim)
    after_first = [c[m:] for c, m in zip(await consoles(client, cosim), marks, strict=True)]
    restored = (await client.cosim.restore_co_sim_snapshot(name=snap.name)).cosimulation
    assert restored.virtual_time_ns == halted.virtual_time_ns
    marks = [len(c) for c in await consoles(client, cosim)]
    second = await run_to_end(client, cosim)
    assert [c[m:] for c, m in zip(await consoles(client, cosim), marks, strict=True)] == after_first
    assert (second.virtual_time_ns, second.quanta) == (first.virtual_time_ns, first.quanta)
