"""The quantum loop of a co-simulation, over its members' ``LockStep`` parts: the same code
runs in the server (members anywhere, one worker round trip per member per quantum) and
inside a worker process that hosts every member (no round trip at all). Everything it
needs and leaves behind is plain data (:class:`Topology`, :class:`RunState`), so a segment
can run in one process and the next in another.

A quantum: every member's ``advance`` to the quantum's end runs at once, then the barrier
(:class:`~.links.Exchange`) turns their results into the next quantum's inputs. Console
bytes are handed on (``on_console``) at the barrier or at a halt, so nothing a roll-back
undoes is ever shown.

The exact cross-member halt. When members stop inside a quantum, the earliest stop (in
virtual time; on a tie, the first member) sets the instant Ts. Every member that ran past
Ts goes back to its checkpoint and is replayed, call for call, to Ts: the runs are
deterministic, so the replay is the same run, cut at Ts. Checkpoints are taken when a run
segment begins and then from time to time (bounded by their cost), so a replay is short.
A halt does not move the barriers: the rest of the quantum runs when the co-simulation
continues, and its traffic is exchanged at the quantum's end as if nothing had stopped.

Time is kept in *reference cycles*: cycles of the first member's clock. Member i at
reference time T has run ``T * hz_i // hz_ref`` cycles since its ``origin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from machineserver.server.drivers import base as drv
from machineserver.server.drivers.base import BarrierInput, LockStep, QuantumResult, StopInfo
from machineserver.server.lockstep.links import Exchange, Link, LinkState, Traffic, Watches

# a periodic checkpoint once the run since the last one took this many times what a
# checkpoint costs (a replay then costs at most about that much)
CHECKPOINT_RATIO = 20
MIN_CHECKPOINT_INTERVAL_S = 0.02
NO_INPUT = BarrierInput()


class ReplayDiverged(Exception):
    """A member did not replay as it ran: a backend is not deterministic."""


@dataclass(frozen=True)
class Topology:
    """What does not change while a co-simulation exists."""

    links: tuple[Link, ...]
    hz: tuple[int, ...]  # each member's clock
    quantum_ref: int  # reference cycles per quantum
    hz_ref: int

    def watches(self) -> list[list[tuple[int, int]]]:
        """The (address, size) ranges each member's quanta report."""
        return Watches(list(self.links), len(self.hz)).ranges


@dataclass
class MidQuantum:
    """A quantum cut by a halt: where it ends and what it did so far."""

    end: int  # reference time of the quantum's barrier
    console: list[bytes]  # transmitted so far, per member
    accepted: list[int]  # serial bytes taken in the quantum's first part, per member


@dataclass
class RunState:
    """Where a co-simulation stands between run segments (and in a snapshot)."""

    time_ref: int
    quanta: int
    origins: list[int]  # each member's cycle count at reference time 0
    cycles: list[int]  # each member's cycle count now
    inputs: list[BarrierInput]  # for the next quantum
    links: LinkState = field(default_factory=LinkState)
    mid: MidQuantum | None = None


@dataclass(frozen=True)
class Halt:
    """How a run segment ended at members' stops."""

    time_ref: int
    stops: tuple[tuple[int, StopInfo], ...]  # (member index, stop), the first one first
    halt_ms: float


@dataclass
class _Member:
    part: LockStep
    hz: int
    origin: int
    cycles: int
    label: str
    # advance calls since the checkpoint: (until_cycles, inputs, cycles it ended at)
    calls: list[tuple[int, BarrierInput, int]] = field(default_factory=list)

    def at(self, time_ref: int, hz_ref: int) -> int:
        """Its cycle count at reference time ``time_ref``."""
        return self.origin + time_ref * self.hz // hz_ref

    def time_of(self, cycles: int, hz_ref: int) -> int:
        """The reference time at which it reached ``cycles`` (rounded up)."""
        return -(-(cycles - self.origin) * hz_ref // self.hz)


def _naming(label: str, exc: BaseException) -> BaseException:
    """The error of a member's call, its message naming the member."""
    if isinstance(exc, drv.BadRequest):
        return drv.BadRequest(f"{label}: {exc}", field=exc.field)
    if isinstance(exc, drv.WrongState):
        return drv.WrongState(f"{label}: {exc}", state=exc.state, required=exc.required)
    if isinstance(exc, drv.DriverError):
        return type(exc)(f"{label}: {exc}")
    if isinstance(exc, Exception):
        return drv.BackendFailed(f"{label}: the driver failed unexpectedly: {exc!r}")
    return exc  # a cancellation, an exit: as it is


async def enter(parts: Sequence[LockStep], watches: list[list[tuple[int, int]]]) -> list[int]:
    """Put every member in lock-step, all or none; their cycle counts now."""
    outcomes = await asyncio.gather(*(p.begin(w) for p, w in zip(parts, watches, strict=True)),
                                    return_exceptions=True)
    failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
    if failure is not None:  # those that entered leave again
        for part, outcome in zip(parts, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                with contextlib.suppress(drv.DriverError):
                    await part.end()
        raise failure
    return [o for o in outcomes if isinstance(o, int)]


class Runner:
    """Runs quanta for one segment (not thread-safe: one event loop)."""

    def __init__(self, topology: Topology, state: RunState, parts: Sequence[LockStep], labels: Sequence[str],
                 on_console: Callable[[int, bytes], None], on_traffic: Callable[[list[Traffic]], None],
                 on_barrier: Callable[[int, int], None]) -> None:
        self.topology = topology
        self.state = state
        self.exchange = Exchange(list(topology.links), len(parts), topology.hz_ref, state.links)
        self.members = [_Member(p, hz, o, c, label) for p, hz, o, c, label
                        in zip(parts, topology.hz, state.origins, state.cycles, labels, strict=True)]
        self.pause_requested = False
        self._on_console = on_console
        self._on_traffic = on_traffic
        self._on_barrier = on_barrier
        self._checkpoint_cost = 0.0
        self._last_checkpoint = 0.0

    @property
    def hz_ref(self) -> int:
        return self.topology.hz_ref

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
        try:
            while not self.pause_requested:
                if max_quanta and done >= max_quanta:
                    break
                if until_ref and self.state.time_ref >= until_ref:
                    break
                halt = await self._quantum()
                if halt is not None:
                    return halt
                done += 1
                if self._checkpoint_due():
                    await self.checkpoint()
            return None
        finally:
            self.state.cycles = [m.cycles for m in self.members]

    async def _quantum(self) -> Halt | None:
        st = self.state
        mid = st.mid
        end = mid.end if mid is not None else st.time_ref + self.topology.quantum_ref
        inputs = [NO_INPUT] * len(self.members) if mid is not None else st.inputs
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
            st.mid = None
        self._publish_console([r.console for r in results])
        merged = [QuantumResult(r.cycles, None, c, a, r.watched, r.idle)
                  for r, c, a in zip(results, console, accepted, strict=True)]
        st.inputs, traffic = self.exchange.barrier(end, end - self.topology.quantum_ref, merged, console)
        st.time_ref = end
        st.quanta += 1
        if traffic:
            self._on_traffic(traffic)
        self._on_barrier(st.time_ref, st.quanta)
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
                failure = failure or _naming(m.label, out)
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
        st = self.state
        console = [r.console for r in results]
        self._publish_console(console)
        if st.mid is None:
            st.mid = MidQuantum(end, console, [r.accepted for r in results])
            delivered = self.exchange.deliveries(end - self.topology.quantum_ref, [r.accepted for r in results])
            if delivered:
                self._on_traffic(delivered)
        else:
            st.mid.console = [a + b for a, b in zip(st.mid.console, console, strict=True)]
        st.time_ref = stop_ref
        return Halt(stop_ref, tuple(stops), halt_ms)

    async def _replay_to(self, m: _Member, stop_ref: int) -> QuantumResult:
        """Roll ``m`` back to its checkpoint and replay its calls; the last one ends at
        ``stop_ref``."""
        await m.part.rollback()
        calls, m.calls = m.calls, []
        *before, (_, last_inputs, _) = calls
        for target, inp, reached in before:
            r = await m.part.advance(target, inp)
            if r.cycles != reached:
                raise ReplayDiverged(f"{m.label} replayed to cycle {r.cycles}, not {reached}")
            m.calls.append((target, inp, reached))
        target = m.at(stop_ref, self.hz_ref)
        r = await m.part.advance(target, last_inputs)
        if r.stop is not None or r.cycles != target:
            raise ReplayDiverged(f"{m.label} replayed to cycle {r.cycles} ({r.stop}), not {target}")
        m.calls.append((target, last_inputs, r.cycles))
        m.cycles = r.cycles
        return r

    def _publish_console(self, console: list[bytes]) -> None:
        for i, data in enumerate(console):
            if data:
                self._on_console(i, data)
