"""Co-simulation (issue 12): what lock-step costs, each figure next to its peer.

Firmware: tests/firmware/src/cosim_spin.c on mps2-an385, compute-bound (a CRC-32 loop
that runs ~400 M instructions before it exits). Each node publishes its progress in its
OUT region every ~3k instructions and rings its doorbell every ~12k. Links (the headline,
as issue 12's figures ask): one shared region, the first node's OUT seen as the second's
IN, and each node's doorbell raising IRQ 30 on the other, so the barrier copies bytes and
raises interrupts every few quanta. For information at 10k: the same pair without links
(lock-step alone), and with a second region (both directions, as the ring firmware).

1. aggregate instructions/s of two Unicorn nodes in lock-step (emulation in worker
   processes, the default; created off, so CreateCoSimulation places them: in one worker,
   where the quantum loop then runs, for quanta under 50k instructions, in a worker each
   from 50k; for information, the same with the nodes in two workers whatever the quantum)
   at quanta of 1k, 10k and 100k instructions, against ONE node
   alone run for the same virtual time with exact counting (session option icount=true,
   as lock-step counts; StepSession count=N). For information, the same against the
   node alone in the default uncounted mode (run to its exit; the instruction count is
   the exact one of an icount run of the same firmware).
2. the same at 10k with a Unicorn and a QEMU node, and with two QEMU nodes (QEMU with
   icount), against the QEMU node alone with icount.
3. the exact cross-node halt: a breakpoint on the second node's spin_mark(), reached
   mid-quantum after a few hundred quanta; CoSimulation.last_stop.halt_ms (from the stop
   to every node halted at its instant) p50/p90, against the quantum's own host time, and
   breakpoint-to-breakpoint through StepCoSimulation against one session doing the same
   with Continue --wait.
For scale, at 10k: the pair without links, with two regions, and without links on a
server with emulation in its own process (--workers 0: no worker round trips).

Rounds of ours and the peer's are interleaved, figures are medians over rounds.
"""

from __future__ import annotations

import shutil
import statistics
import time
from typing import Any

from bench import Server, firmware, line, pct, single

from machineserver.v1 import common_pb2

BOARD = "mps2-an385"
PROGRAM = "cosim_spin"
OUT, IN, BELL, IRQ = 0x20200000, 0x20210000, 0x20220000, 30
REGION = 0x1000
ROUNDS = 5
# quanta per timed round, per quantum size (instructions): a round is ~0.2-0.5 s here
QUANTA = {1_000: 500, 10_000: 200, 100_000: 100}
MIXED_QUANTUM = 10_000
ONE_WAY, BOTH_WAYS, NO_LINKS = "one region + 2 doorbells", "two regions + 2 doorbells", "no links"
HALT_QUANTA = {10_000: 300, 100_000: 250}  # quanta between two breakpoint hits
HALT_HITS = 10
BLOCK_INSTRUCTIONS = 3_000  # about, per cosim_spin block (to space the breakpoint hits)


async def _node(c: Any, program: str, backend: str = "unicorn", *, icount: bool = True,
                power_on: bool = True) -> str:
    s = (await c.sessions.create_session(board_template=BOARD, program=program, backend=backend,
                                         options={"icount": icount}, power_on=power_on)).session
    return str(s.name)


def _links(a: str, b: str, topology: str) -> list[dict[str, Any]]:
    """ONE_WAY: a's OUT region is b's IN region, doorbells both ways (the headline).
    BOTH_WAYS: and b's OUT is a's IN (two regions). NO_LINKS: lock-step alone."""
    out: list[dict[str, Any]] = []
    if topology == NO_LINKS:
        return out
    for k, (src, dst) in enumerate(((a, b), (b, a))):
        if k == 0 or topology == BOTH_WAYS:
            out.append({"shared_memory": {"mappings": [{"session": src, "address": OUT},
                                                       {"session": dst, "address": IN}], "size": REGION}})
        out.append({"interrupt": {"from_session": src, "doorbell_address": BELL, "value_mask": 1,
                                  "to_session": dst, "irq": IRQ}})
    return out


async def _pair(c: Any, program: str, quantum: int, backends: tuple[str, str] = ("unicorn", "unicorn"),
                mark_every: int = 0, topology: str = ONE_WAY, spread: bool = False) -> tuple[str, list[str]]:
    """Created off, CreateCoSimulation powers the nodes on where it runs them best (one
    worker, where the quantum loop then runs with no round trip per quantum, for quanta
    under 50k instructions; a worker each from 50k). ``spread``: each powered on before, in
    a worker of its own (the least loaded), so the loop runs in the server with a round
    trip to each worker per quantum."""
    nodes = [await _node(c, program, b, power_on=spread) for b in backends]
    if mark_every:
        await _set_mark(c, nodes[1], mark_every)
    cosim = (await c.cosim.create_co_simulation(sessions=nodes, links=_links(*nodes, topology),
                                                sync={"quantum_instructions": quantum},
                                                display_name=f"bench {backends[0]}+{backends[1]} q{quantum}",
                                                timeout=60)).cosimulation
    return str(cosim.name), nodes


async def _set_mark(c: Any, name: str, every: int) -> None:
    """Run to main (the startup code has initialised .data), set spin_mark_every, and put
    a breakpoint on spin_mark()."""
    await c.sessions.power_on_session(name=name)
    bp = (await c.debug.set_breakpoint(name=name, location={"symbol": "main"})).breakpoint
    stop = (await c.debug.continue_(name=name, wait=True, timeout=60)).stop
    assert stop.pc == bp.address, stop
    await c.debug.clear_breakpoint(name=name, id=bp.id)
    where = (await c.debug.resolve_symbol(name=name, symbol="spin_mark_every")).address
    await c.debug.write_memory(name=name, address=where, data=every.to_bytes(4, "little"))
    await c.debug.set_breakpoint(name=name, location={"symbol": "spin_mark"})


async def _drop(c: Any, cosim: str, nodes: list[str]) -> None:
    await c.cosim.delete_co_simulation(name=cosim)
    for n in nodes:
        await c.sessions.delete_session(name=n)


async def _cosim_round(c: Any, cosim: str, quanta: int) -> tuple[float, Any]:
    t = time.perf_counter()
    now = (await c.cosim.step_co_simulation(name=cosim, count=quanta, timeout=600)).cosimulation
    took = time.perf_counter() - t
    assert not now.last_stop.reason, now.last_stop  # nothing stopped it
    return took, now


async def _alone_round(c: Any, name: str, instructions: int) -> float:
    t = time.perf_counter()
    stop = (await c.debug.step(name=name, count=instructions, timeout=600)).stop
    took = time.perf_counter() - t
    assert stop.reason == common_pb2.STOP_REASON_STEP, stop
    return took


async def _exact_total(c: Any, program: str) -> int:
    """cosim_spin's instructions from power-on to its exit, counted exactly (icount)."""
    name = await _node(c, program, icount=True)
    stop = (await c.debug.continue_(name=name, wait=True, timeout=600)).stop
    assert stop.reason == common_pb2.STOP_REASON_EXIT and stop.exit_code == 0, stop
    metrics = (await c.telemetry.get_session_metrics(name=name)).metrics
    assert metrics.counts_exact, metrics
    await c.sessions.delete_session(name=name)
    return int(metrics.instructions)


async def _uncounted_round(c: Any, program: str) -> float:
    """Seconds for cosim_spin to run to its exit on one session in the default uncounted mode."""
    name = await _node(c, program, icount=False)
    t = time.perf_counter()
    stop = (await c.debug.continue_(name=name, wait=True, timeout=600)).stop
    took = time.perf_counter() - t
    assert stop.reason == common_pb2.STOP_REASON_EXIT and stop.exit_code == 0, stop
    await c.sessions.delete_session(name=name)
    return took


async def _throughput(c: Any, program: str, quantum: int, quanta: int, backends: tuple[str, str],
                      alone_backend: str, uncounted: bool, topology: str = ONE_WAY,
                      spread: bool = False) -> dict[str, float]:
    """Interleaved rounds: the pair for ``quanta`` quanta, the node alone (icount) for the
    same virtual time, and (``uncounted``) the node alone run to exit without icount."""
    cosim, nodes = await _pair(c, program, quantum, backends, topology=topology, spread=spread)
    alone = await _node(c, program, alone_backend, icount=True)
    n = quantum * quanta
    ours, peer, free, per_q = [], [], [], []
    try:
        await _cosim_round(c, cosim, quanta)  # untimed: the first quanta, caches warm
        await _alone_round(c, alone, n)
        for _ in range(ROUNDS):
            took, now = await _cosim_round(c, cosim, quanta)
            ours.append(2 * n / took)
            per_q.append(took / quanta * 1000)
            peer.append(n / await _alone_round(c, alone, n))
            if uncounted:
                free.append(await _uncounted_round(c, program))
        if topology != NO_LINKS:  # the barrier did real work
            assert now.link_status[0].bytes > 0 and now.link_status[1].interrupts > 0, now.link_status
    finally:
        await _drop(c, cosim, nodes)
        await c.sessions.delete_session(name=alone)
    return {"ours": statistics.median(ours), "peer": statistics.median(peer),
            "free_s": statistics.median(free) if free else 0.0, "ms_per_quantum": statistics.median(per_q),
            "interrupts": float(sum(st.interrupts for st in now.link_status))}


async def _halts(c: Any, program: str, quantum: int) -> dict[str, list[float]]:
    """Breakpoint hits on the second node, HALT_QUANTA[quantum] quanta apart: halt_ms and
    the round trip, interleaved with one session stopping at the same breakpoint."""
    every = HALT_QUANTA[quantum] * quantum // BLOCK_INSTRUCTIONS
    cosim, nodes = await _pair(c, program, quantum, mark_every=every)
    alone = await _node(c, program, icount=True)
    await _set_mark(c, alone, every)
    halt, ours, peer, mid = [], [], [], 0
    try:
        for i in range(HALT_HITS + 1):
            t = time.perf_counter()
            now = (await c.cosim.step_co_simulation(name=cosim, count=10**6, timeout=600)).cosimulation
            took = time.perf_counter() - t
            stop = now.last_stop
            assert stop.reason == "breakpoint" and stop.session == nodes[1], stop
            assert {m.virtual_time_ns for m in now.members} == {now.virtual_time_ns}, now.members
            t = time.perf_counter()
            alone_stop = (await c.debug.continue_(name=alone, wait=True, timeout=600)).stop
            took_alone = time.perf_counter() - t
            assert alone_stop.pc == stop.pc, (alone_stop, stop)
            if i == 0:
                continue  # untimed: the first stretch starts from reset
            halt.append(stop.halt_ms)
            ours.append(took * 1000)
            peer.append(took_alone * 1000)
            mid += now.virtual_time_ns % now.quantum_ns != 0
    finally:
        await _drop(c, cosim, nodes)
        await c.sessions.delete_session(name=alone)
    return {"halt": halt, "ours": ours, "peer": peer, "mid": [float(mid)]}


async def bench_cosim(server: Server) -> None:
    from machineserver.sdk import AsyncClient

    print(f"co-simulation ({BOARD}, 2 x {PROGRAM}, {ONE_WAY} unless said, workers; "
          f"median of {ROUNDS} interleaved rounds)")
    async with await AsyncClient.connect(server.target, timeout=600) as c:
        prog = (await c.upload_program(str(firmware(BOARD, PROGRAM)))).program.name
        total = await _exact_total(c, prog)
        per_quantum: dict[int, float] = {}
        for quantum, quanta in QUANTA.items():
            r = await _throughput(c, prog, quantum, quanta, ("unicorn", "unicorn"), "unicorn",
                                  uncounted=quantum == 10_000)
            per_quantum[quantum] = r["ms_per_quantum"]
            target = {10_000: "speed, target >= 0.5x", 100_000: "speed, target >= 0.9x"}.get(quantum, "speed")
            line(f"unicorn x2, {quantum // 1000}k quanta, vs 1 alone (icount)", r["ours"] / 1e6,
                 r["peer"] / 1e6, "MIPS", target)
            single(f"  host time per quantum ({quantum // 1000}k)", r["ms_per_quantum"], "ms",
                   f"{int(r['interrupts'])} doorbell IRQs in all")
            if r["free_s"]:
                line("  same vs 1 alone, uncounted (default mode)", r["ours"] / 1e6, total / r["free_s"] / 1e6,
                     "MIPS", "information: exact counting is part of lock-step's price")
        for topology in (NO_LINKS, BOTH_WAYS):  # what the barrier's work costs
            r = await _throughput(c, prog, 10_000, QUANTA[10_000], ("unicorn", "unicorn"), "unicorn",
                                  uncounted=False, topology=topology)
            line(f"  10k, {topology}", r["ours"] / 1e6, r["peer"] / 1e6, "MIPS",
                 f"information; {r['ms_per_quantum']:.2f} ms per quantum")
        for quantum in (10_000, 100_000):  # the loop in the server, a round trip per member per quantum
            r = await _throughput(c, prog, quantum, QUANTA[quantum], ("unicorn", "unicorn"), "unicorn",
                                  uncounted=False, spread=True)
            line(f"  {quantum // 1000}k, nodes in two workers", r["ours"] / 1e6, r["peer"] / 1e6, "MIPS",
                 f"information; {r['ms_per_quantum']:.2f} ms per quantum")
    inproc = Server(extra=["--workers", "0"])  # what the worker round trips cost
    try:
        async with await AsyncClient.connect(inproc.target, timeout=600) as c:
            prog = (await c.upload_program(str(firmware(BOARD, PROGRAM)))).program.name
            r = await _throughput(c, prog, 10_000, QUANTA[10_000], ("unicorn", "unicorn"), "unicorn",
                                  uncounted=False, topology=NO_LINKS)
            line("  10k, no links, in-process (--workers 0)", r["ours"] / 1e6, r["peer"] / 1e6, "MIPS",
                 f"information; {r['ms_per_quantum']:.2f} ms per quantum")
    finally:
        inproc.stop()
    async with await AsyncClient.connect(server.target, timeout=600) as c:
        prog = (await c.upload_program(str(firmware(BOARD, PROGRAM)))).program.name

        if shutil.which("qemu-system-arm"):
            for backends in (("unicorn", "qemu"), ("qemu", "qemu")):
                label = f"{backends[0]}+{backends[1]}, {MIXED_QUANTUM // 1000}k quanta"
                try:
                    r = await _throughput(c, prog, MIXED_QUANTUM, QUANTA[MIXED_QUANTUM], backends, "qemu",
                                          uncounted=False)
                except Exception as exc:  # QEMU lock-step may be unfinished: say why, go on
                    print(f"  {label}: not measured: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                line(f"{label}, vs qemu alone (icount)", r["ours"] / 1e6, r["peer"] / 1e6, "MIPS",
                     "speed")
                single(f"  host time per quantum ({label})", r["ms_per_quantum"], "ms", "")
        else:
            print("  qemu: skipped (qemu-system-arm not installed)")

        for quantum in HALT_QUANTA:
            h = await _halts(c, prog, quantum)
            k = f"{quantum // 1000}k"
            line(f"exact halt p50 (halt_ms), {k} quanta", pct(h["halt"], 0.5), per_quantum[quantum], "ms",
                 "vs the host time of one quantum (section 1)")
            single(f"  exact halt p90, {k} quanta", pct(h["halt"], 0.9), "ms",
                   f"{int(h['mid'][0])}/{len(h['halt'])} stops mid-quantum")
            line(f"  run ~{HALT_QUANTA[quantum]} quanta to a breakpoint, p50", pct(h["ours"], 0.5),
                 pct(h["peer"], 0.5), "ms", "cost vs 1 session continue --wait (icount) to it")
