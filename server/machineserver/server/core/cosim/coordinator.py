"""The quantum loop of one co-simulation, over its members' ``LockStep`` parts.

A quantum: every member's ``advance`` to the quantum's end runs at once (members live in
different worker processes, so they run in parallel), then the barrier
(:class:`~.links.Exchange`) turns their results into the next quantum's inputs. Console
bytes are published to each session's console at the barrier (or at a halt), so nothing
a roll-back undoes is ever shown.

The exact cross-member halt. When members stop inside a quantum, the earliest stop (in
virtual time; on a tie, the first member) sets the instant Ts. Every member that ran past
Ts goes back to its checkpoint and is replayed, call for call, to Ts: the runs are
deterministic, so the replay is the same run, cut at Ts. Checkpoints are taken when a run
begins and then from time to time (cost-bounded), so a replay is short. A halt does not
move the barriers: the rest of the quantum runs when the co-simulation continues, and
its traffic is exchanged at the quantum's end as if nothing had stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from machineserver.server.core.cosim.links import Exchange, Traffic
from machineserver.server.core.cosim.model import CoSimRecord, board_hz
from machineserver.server.core.sessions import LiveSession
from machineserver.server.drivers import base as drv
from machineserver.server.drivers.base import BarrierInput, LockStep, QuantumResult, StopInfo

log = structlog.get_logger("machineserver.cosim")

# a periodic checkpoint once the run since the last one took this many times what a
# checkpoint costs (a replay then costs at most about that much)
CHECKPOINT_RATIO = 20
MIN_CHECKPOINT_INTERVAL_S = 0.05
NO_INPUT = BarrierInput()


class ReplayDiverged(Exception):
    """A member did not replay as it ran: a backend is not deterministic."""


@dataclass
class Member:
    live: LiveSession
    part: LockStep
    hz: int
    origin: int
    cycles: int
    # advance calls since the checkpoint: (until_cycles, inputs, cycles it ended at)
    calls: list[tuple[int, BarrierInput, int]] = field(default_factory=list)

    def at(self, time_ref: int, hz_ref: int) -> int:
        """Its cycle count at reference time ``time_ref``."""
        return self.origin + time_ref * self.hz // hz_ref

    def time_of(self, cycles: int, hz_ref: int) -> int:
        """The reference time at which it reached ``cycles`` (rounded up)."""
        return -(-(cycles - self.origin) * hz_ref // self.hz)


@dataclass
class MidQuantum:
    """A quantum cut by a halt: where it ends and what it did so far."""

    end: int  # reference time of the quantum's barrier
    console: list[bytes]  # transmitted so far, per member
    accepted: list[int]  # serial bytes taken in the quantum's first part, per member


@dataclass(frozen=True)
class Halt:
    """How a run segment ended at members' stops."""

    time_ref: int
    stops: tuple[tuple[int, StopInfo], ...]  # (member index, stop), the first one first
    halt_ms: float


class Coordinator:
    """Runs one co-simulation's quanta. Not thread-safe: the manager runs one segment at
    a time on the event loop."""

    def __init__(self, rec: CoSimRecord, members: list[Member], exchange: Exchange,
                 on_traffic: Callable[[list[Traffic]], None],
                 on_barrier: Callable[[], None]) -> None:
        self.rec = rec
        self.members = members
        self.exchange = exchange
        self.inputs: list[BarrierInput] = [NO_INPUT] * len(members)
        self.mid: MidQuantum | None = None
        self.pause_requested = False
        self._on_traffic = on_traffic
        self._on_barrier = on_barrier
        self._checkpoint_cost = 0.0
        self._last_checkpoint = 0.0

    @staticmethod
    async def begin(lives: Sequence[LiveSession], watches: list[list[tuple[int, int]]]) -> list[Member]:
        """Put every member in lock-step; their cycle counts now (origins are set by the
        manager)."""
        parts = [live.require_halted("join a co-simulation").capability(LockStep) for live in lives]
        outcomes = await asyncio.gather(*(p.begin(w) for p, w in zip(parts, watches, strict=True)),
                                        return_exceptions=True)
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:  # all or none: those that entered leave again
            for part, outcome in zip(parts, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    with contextlib.suppress(drv.DriverError):
                        await part.end()
            raise failure
        return [Member(live, part, board_hz(live.board), 0, c)
                for live, part, c in zip(lives, parts, outcomes, strict=True) if isinstance(c, int)]

    @property
    def hz_ref(self) -> int:
        return self.rec.hz_ref

    # ------------------------------------------------------------------ checkpoints

    async def checkpoint(self) -> None:
        t0 = time.perf_counter()
        await asyncio.gather(*(m.part.checkpoint() for m in self.members))
        now = time.perf_counter()
        self._checkpoint_cost, self._last_checkpoint = now - t0, now
        for m in self.members:
            m.calls.clear()

    def _checkpoint_due(self) -> bool:
        since = time.perf_counter() - self._last_checkpoint
        return since >= max(MIN_CHECKPOINT_INTERVAL_S, CHECKPOINT_RATIO * self._checkpoint_cost)

    # ------------------------------------------------------------------ quanta

    async def run(self, max_quanta: int, until_ref: int) -> Halt | None:
        """Run quanta until ``max_quanta`` barriers passed (0: no limit), the barrier at
        or after ``until_ref`` (0: none), a pause request, or a stop (returned)."""
        await self.checkpoint()
        done = 0
        while not self.pause_requested:
            if max_quanta and done >= max_quanta:
                break
            if until_ref and self.rec.time_ref >= until_ref:
                break
            halt = await self._quantum()
            if halt is not None:
                return halt
            done += 1
            if self._checkpoint_due():
                await self.checkpoint()
        return None

    async def _quantum(self) -> Halt | None:
        mid = self.mid
        end = mid.end if mid is not None else self.rec.time_ref + self.rec.quantum_ref
        inputs = [NO_INPUT] * len(self.members) if mid is not None else self.inputs
        targets = [m.at(end, self.hz_ref) for m in self.members]
        results = await self._advance_all(targets, inputs)
        stopped = [(self.members[i].time_of(r.cycles, self.hz_ref), i)
                   for i, r in enumerate(results) if r.stop is not None]
        if stopped:
            return await self._halt(min(stopped)[0], results, end)
        console = [r.console for r in results]
        accepted = [r.accepted for r in results]
        if mid is not None:
            console = [a + b for a, b in zip(mid.console, console, strict=True)]
            accepted = mid.accepted
            self.mid = None
        self._publish_console([r.console for r in results])
        merged = [QuantumResult(r.cycles, None, c, a, r.watched, r.idle)
                  for r, c, a in zip(results, console, accepted, strict=True)]
        self.inputs, traffic = self.exchange.barrier(end, end - self.rec.quantum_ref, merged, console)
        self.rec.time_ref = end
        self.rec.quanta += 1
        if traffic:
            self._on_traffic(traffic)
        self._on_barrier()
        return None

    async def _advance_all(self, targets: list[int], inputs: list[BarrierInput]) -> list[QuantumResult]:
        """Every member's advance at once. A cancelled caller does not cut a quantum in
        half (the members would end at instants nobody chose): the quantum finishes."""
        work = asyncio.ensure_future(asyncio.gather(
            *(m.part.advance(t, i) for m, t, i in zip(self.members, targets, inputs, strict=True)),
            return_exceptions=True))
        try:
            outcomes = await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait({work})
            raise
        failure: BaseException | None = None
        results: list[QuantumResult] = []
        for m, target, inp, out in zip(self.members, targets, inputs, outcomes, strict=True):
            if isinstance(out, BaseException):
                failure = failure or out
                continue
            m.calls.append((target, inp, out.cycles))
            m.cycles = out.cycles
            results.append(out)
        if failure is not None:
            raise failure
        return results

    async def _halt(self, stop_ref: int, results: list[QuantumResult], end: int) -> Halt:
        t0 = time.perf_counter()
        stops: list[tuple[int, StopInfo]] = []
        replays = []
        for i, (m, r) in enumerate(zip(self.members, results, strict=True)):
            if r.stop is not None and m.time_of(r.cycles, self.hz_ref) == stop_ref:
                stops.append((i, r.stop))
            elif r.cycles > m.at(stop_ref, self.hz_ref):
                replays.append(i)
        if replays:
            replayed = await asyncio.gather(*(self._replay_to(self.members[i], stop_ref) for i in replays))
            for i, r in zip(replays, replayed, strict=True):
                results[i] = r
        halt_ms = (time.perf_counter() - t0) * 1000
        first = self.mid is None
        console = [r.console for r in results]
        self._publish_console(console)
        if first:
            self.mid = MidQuantum(end, console, [r.accepted for r in results])
            delivered = self.exchange.deliveries(end - self.rec.quantum_ref, [r.accepted for r in results])
            if delivered:
                self._on_traffic(delivered)
        else:
            assert self.mid is not None
            self.mid.console = [a + b for a, b in zip(self.mid.console, console, strict=True)]
        self.rec.time_ref = stop_ref
        log.info("cosim_halted", cosim=self.rec.id, time_ref=stop_ref, stops=len(stops), replayed=len(replays),
                 halt_ms=round(halt_ms, 2))
        return Halt(stop_ref, tuple(stops), halt_ms)

    async def _replay_to(self, m: Member, stop_ref: int) -> QuantumResult:
        """Roll ``m`` back to its checkpoint and replay its calls; the last one ends at
        ``stop_ref``."""
        await m.part.rollback()
        calls, m.calls = m.calls, []
        *before, (_, last_inputs, _) = calls
        for target, inp, reached in before:
            r = await m.part.advance(target, inp)
            if r.cycles != reached:
                raise ReplayDiverged(f"session {m.live.id} replayed to cycle {r.cycles}, not {reached}")
            m.calls.append((target, inp, reached))
        target = m.at(stop_ref, self.hz_ref)
        r = await m.part.advance(target, last_inputs)
        if r.stop is not None or r.cycles != target:
            raise ReplayDiverged(f"session {m.live.id} replayed to cycle {r.cycles} ({r.stop}), not {target}")
        m.calls.append((target, last_inputs, r.cycles))
        m.cycles = r.cycles
        return r

    def _publish_console(self, console: list[bytes]) -> None:
        for m, data in zip(self.members, console, strict=True):
            if data:
                m.live.console.append(data)

    # ------------------------------------------------------------------ the end

    async def end(self) -> None:
        """Leave lock-step (members that are still there)."""
        for m in self.members:
            machine = m.live.machine
            if machine is not None and machine.state is not drv.MachineState.FAILED:
                try:
                    await m.part.end()
                except drv.DriverError as exc:
                    log.warning("cosim_end_failed", session_id=m.live.id, error=str(exc))
