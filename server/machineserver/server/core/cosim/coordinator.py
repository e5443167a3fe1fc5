"""Where a co-simulation's run segments run, and its state between them.

The quantum loop itself is :class:`~machineserver.server.lockstep.runner.Runner`. When one
worker process hosts every member, a segment runs inside that worker (one request per
segment: no round trip per quantum; console bytes come back as the members' console
events, link traffic and progress as lock-step events of the first member). Otherwise it
runs here, over the members' parts (one worker round trip per member per quantum, all
members at once). Either way the results are the same: the runner is deterministic and
its state (:class:`~machineserver.server.lockstep.runner.RunState`) is plain data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from machineserver.server.core.sessions import POWERED, LiveSession
from machineserver.server.drivers import base as drv
from machineserver.server.drivers.base import LockStep
from machineserver.server.lockstep.links import Traffic
from machineserver.server.lockstep.runner import Halt, Runner, RunState, Topology
from machineserver.server.worker.remote import RemoteMachine

SPREAD_FROM_CYCLES = 50_000  # quanta at least this long put OFF members in workers of their own

# what the manager hears while a segment runs: link traffic, and barriers (time, quanta)
TrafficSink = Callable[[list[Traffic]], None]
BarrierSink = Callable[[int, int], None]


def _labels(lives: Sequence[LiveSession]) -> list[str]:
    return [live.record.name for live in lives]


class Coordinator:
    """One co-simulation's segments (one at a time)."""

    def __init__(self, lives: Sequence[LiveSession], topology: Topology, state: RunState,
                 on_traffic: TrafficSink, on_barrier: BarrierSink) -> None:
        self.lives = list(lives)
        self.topology = topology
        self.state = state
        self._on_traffic = on_traffic
        self._on_barrier = on_barrier
        self._local: Runner | None = None
        self._remote: RemoteMachine | None = None  # the first member, while a segment runs in its worker
        self.pause_requested = False

    def _machines(self) -> list[drv.Machine]:
        return [live.require_machine("run a co-simulation") for live in self.lives]

    def host(self) -> RemoteMachine | None:
        """The first member's machine when one worker hosts every member; else None."""
        machines = self._machines()
        first = machines[0]
        if not isinstance(first, RemoteMachine) or first.link is None:
            return None
        same = all(isinstance(m, RemoteMachine) and m.link is first.link for m in machines)
        return first if same else None

    async def run(self, max_quanta: int, until_ref: int) -> Halt | None:
        """One segment (see Runner.run); the state is this coordinator's after it."""
        self.pause_requested = False
        host = self.host()
        if host is not None:
            return await self._run_in_worker(host, max_quanta, until_ref)
        parts = [m.capability(LockStep) for m in self._machines()]
        runner = Runner(self.topology, self.state, parts, _labels(self.lives),
                        lambda i, data: self.lives[i].console.append(data), self._on_traffic, self._on_barrier)
        self._local = runner
        runner.pause_requested = self.pause_requested
        try:
            return await runner.run(max_quanta, until_ref)
        finally:
            self._local = None

    async def _run_in_worker(self, host: RemoteMachine, max_quanta: int, until_ref: int) -> Halt | None:
        assert host.link is not None
        mids = [m.mid for m in self._machines() if isinstance(m, RemoteMachine)]
        self._remote = host
        host.on_lockstep = self._from_worker
        try:
            answer: tuple[RunState, Halt | None] = await host.link.request(
                "lockstep", host, mids, self.topology, self.state, max_quanta, until_ref, _labels(self.lives),
                cancellable=True)
        finally:
            host.on_lockstep = None
            self._remote = None
        self.state, halt = answer
        return halt

    def _from_worker(self, payload: Any) -> None:
        kind = payload[0]
        if kind == "traffic":
            self._on_traffic(payload[1])
        elif kind == "barrier":
            self._on_barrier(payload[1], payload[2])

    async def request_pause(self) -> None:
        """Stop at the next barrier (the running segment returns there)."""
        self.pause_requested = True
        if self._local is not None:
            self._local.pause_requested = True
        host = self._remote
        if host is not None and host.link is not None:
            try:
                await host.link.request("lockstep_pause", host)
            except drv.DriverError:
                pass  # the worker is gone: the segment fails on its own

    async def end(self) -> None:
        """Leave lock-step (members that are still there)."""
        for live in self.lives:
            machine = live.machine
            if machine is not None and machine.state is not drv.MachineState.FAILED and machine.has(LockStep):
                try:
                    await machine.capability(LockStep).end()
                except drv.DriverError:
                    pass


def placement(lives: Sequence[LiveSession], quantum_ref: int) -> LiveSession | None:
    """Where a member being powered on should run: beside the members already on (one
    worker hosts them all, the quantum loop runs there with no round trip per quantum)
    for short quanta; in a worker of its own (None: the least loaded) for long ones,
    where members computing in parallel processes gains more than a round trip per
    quantum costs (scripts/bench: at 100k-instruction quanta two workers give 0.98x of
    one node alone against 0.80x in one; at 10k, 0.24x against 0.41x)."""
    if quantum_ref >= SPREAD_FROM_CYCLES:
        return None
    return next((x for x in lives if x.machine is not None and x.state in POWERED), None)
