"""CoSimService's core: co-simulations as records and as running systems.

A co-simulation owns its members' run control while it exists (``LiveSession.membership``):
a member's Run and Pause act on the whole co-simulation, its other run-control and
lifecycle calls are refused naming it. One run segment (Start, Step, a member's Run) at a
time runs as a task owned by the manager; Pause asks it to stop at the next barrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from machineserver.server.core import tenancy
from machineserver.server.core.cosim.coordinator import Coordinator, placement
from machineserver.server.core.cosim.events import CoSimEvents
from machineserver.server.core.cosim.model import (
    MAX_MEMBERS,
    CoSimRecord,
    CoSimState,
    board_hz,
    check_quantum,
    validate_links,
)
from machineserver.server.core.cosim.snapshots import CoSimSnapshots
from machineserver.server.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    MachineServerError,
    NotFound,
)
from machineserver.server.core.listing import Page, match_terms, paginate, parse_filter, resource_id
from machineserver.server.core.models import from_row, now, record_row
from machineserver.server.core.sessions import LiveSession, SessionManager, driver_errors
from machineserver.server.drivers import base as drv
from machineserver.server.drivers.base import Feature, MachineState, StopInfo, StopReason
from machineserver.server.lockstep.links import Exchange, Link, LinkState, link_to_dict
from machineserver.server.lockstep.runner import Halt, MidQuantum, ReplayDiverged, RunState, Topology, enter
from machineserver.server.store.blobs import BlobStore
from machineserver.server.store.db import Database

log = structlog.get_logger("machineserver.cosim")

TABLE = "cosimulations"
COLLECTION = "cosimulations"
MAX_STEP_QUANTA = 10**9
STOP_TIMEOUT_S = 30.0
SAVE_EVERY_S = 1.0
FAILURE_EVENT_WAIT_S = 1.0  # how long a co-simulation's failure waits for the member's own reason


@dataclass
class MemberView:
    """A member as GetCoSimulation shows it."""

    session: str
    virtual_time_ns: int
    cycles: int
    state: MachineState
    board: str
    backend: str


@dataclass
class Runtime:
    """A co-simulation while the server runs."""

    rec: CoSimRecord
    lives: list[LiveSession]
    links: list[Link]
    coord: Coordinator | None = None  # built when members enter lock-step
    task: asyncio.Task[None] | None = None
    saved_at: float = 0.0  # monotonic time of the last record write while running

    @property
    def state(self) -> CoSimState:
        return CoSimState(self.rec.state)


class _Membership:
    """What a member session's Run and Pause do: act on the co-simulation."""

    def __init__(self, manager: CoSimManager, rt: Runtime) -> None:
        self._manager = manager
        self._rt = rt

    @property
    def name(self) -> str:
        return self._rt.rec.name

    async def run_member(self, live: LiveSession) -> None:
        if self._rt.state is not CoSimState.RUNNING:
            await self._manager.start(self._rt, 0)

    async def pause_member(self, live: LiveSession) -> None:
        await self._manager.pause(self._rt)


class CoSimManager:
    def __init__(self, db: Database, blobs: BlobStore, sessions: SessionManager, max_snapshot_bytes: int) -> None:
        self.db = db
        self.blobs = blobs
        self.sessions = sessions
        self.max_snapshot_bytes = max_snapshot_bytes
        self.events = CoSimEvents()
        self.snapshots = CoSimSnapshots(self, db, blobs, max_snapshot_bytes)
        self._runtimes: dict[str, Runtime] = {}
        sessions.delete_hooks.append(self._on_session_delete)

    # ------------------------------------------------------------------ startup/shutdown

    def load(self) -> None:
        """Stored co-simulations come back: their members' emulator state did not survive
        the restart, so a co-simulation that had run is FAILED with the reason (restore
        a snapshot to go on)."""
        for row in self.db.rows(TABLE):
            rec = from_row(CoSimRecord, row["data"])
            lives = [self.sessions.find(s) for s in rec.sessions]
            present = [live for live in lives if live is not None]
            if rec.state != CoSimState.FAILED.value:
                rec.state = CoSimState.FAILED.value
                rec.state_reason = "the server restarted; the members' emulator state was lost (restore a snapshot)"
                rec.update_time = now()
                self._save(rec)
            rt = Runtime(rec, present, rec.link_specs())
            self._runtimes[rec.id] = rt
            for live in present:
                live.membership = _Membership(self, rt)

    async def shutdown(self) -> None:
        for rt in list(self._runtimes.values()):
            if rt.task is not None and not rt.task.done():
                if rt.coord is not None:
                    await rt.coord.request_pause()
                await asyncio.wait({rt.task}, timeout=STOP_TIMEOUT_S)
        self.events.close()

    # ------------------------------------------------------------------ records

    def get(self, name: str, field_name: str = "name") -> Runtime:
        """The co-simulation a caller names (and through it its snapshots): NotFound when
        there is none or the caller's tenant does not see it (the same answer)."""
        cid = resource_id(name, COLLECTION, field_name)
        rt = self._runtimes.get(cid)
        if rt is None or not tenancy.visible(rt.rec.tenant):
            raise NotFound("cosimulation", cid)
        return rt

    def list_page(self, page_size: int, page_token: str, filter_text: str) -> Page[Runtime]:
        terms = parse_filter(filter_text, ["state", tenancy.FILTER_KEY])
        scope = tenancy.list_scope(terms)
        if "state" in terms:
            terms["state"] = terms["state"].lower().removeprefix("co_sim_state_")
        items = sorted((r for r in self._runtimes.values() if scope.admits(r.rec.tenant)),
                       key=lambda r: (r.rec.create_time, r.rec.id))
        items = [r for r in items if match_terms(terms, {"state": lambda r: r.rec.state}, r)]
        return paginate(items, page_size, page_token, scope.token_key(filter_text))

    def members(self, rt: Runtime) -> list[MemberView]:
        out = []
        coord = rt.coord
        running = rt.state is CoSimState.RUNNING
        for i, live in enumerate(rt.lives):
            hz = board_hz(live.board)
            since = 0
            if running:  # every member is at the co-simulation's time at each barrier
                since = rt.rec.time_ref * hz // rt.rec.hz_ref
            elif coord is not None and i < len(coord.state.cycles):
                since = coord.state.cycles[i] - coord.state.origins[i]
            out.append(MemberView(live.record.name, since * 10**9 // hz, since, live.state,
                                  live.board.name, live.record.backend))
        return out

    def link_state(self, rt: Runtime) -> LinkState:
        return rt.coord.state.links if rt.coord is not None else LinkState.from_dict(rt.rec.link_state)

    def _save(self, rec: CoSimRecord) -> None:
        rec.update_time = now()
        self.db.put(TABLE, record_row(rec))

    # ------------------------------------------------------------------ create/delete

    async def create(self, sessions: Sequence[str], links: list[Link], quantum_ns: int, quantum_instructions: int,
                     display_name: str) -> Runtime:
        if len(sessions) < 2:
            raise InvalidArgument("sessions", "a co-simulation needs two or more sessions")
        if len(sessions) > MAX_MEMBERS:
            raise InvalidArgument("sessions", f"at most {MAX_MEMBERS} sessions")
        lives = [self.sessions.get(name, f"sessions[{i}]") for i, name in enumerate(sessions)]
        ids = [live.id for live in lives]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("sessions", "a session appears twice")
        boards = [live.board for live in lives]
        hz_ref = board_hz(boards[0])
        quantum_ref = check_quantum(quantum_ns, quantum_instructions, hz_ref)
        validate_links(links, boards)
        for live in lives:
            if live.membership is not None:
                raise FailedPrecondition(f"session {live.id} already belongs to co-simulation "
                                         f"{live.membership.name}", required="not in a co-simulation")
            self._check_lockstep(live)
        powered: list[LiveSession] = []  # the members this create powered on: off again if it fails
        try:
            for live in lives:  # an OFF member is powered on (with its program); see _placement
                if live.state is MachineState.OFF or live.machine is None:
                    await self.sessions.power_on(live, placement(lives, quantum_ref))
                    powered.append(live)
                elif live.state is not MachineState.HALTED:
                    raise FailedPrecondition(f"session {live.id} is {live.state.value}; a member must be halted "
                                             "or off (pause or reset it first)", state=live.state.value,
                                             required="halted or off")
            owner, tenant = tenancy.stamp()
            rec = CoSimRecord(id="cosim-" + secrets.token_hex(6), sessions=ids,
                              links=[link_to_dict(x) for x in links], quantum_ref=quantum_ref, hz_ref=hz_ref,
                              quantum_spec={"quantum_ns": quantum_ns, "quantum_instructions": quantum_instructions},
                              display_name=display_name, owner=owner, tenant=tenant, state_reason="created")
            rt = Runtime(rec, lives, links)
            await self.enter_lockstep(rt, since=None, link_state=None)
        except BaseException:
            for live in powered:
                try:
                    await self.sessions.power_off(live)
                except Exception as exc:  # the create's own error is the answer
                    log.warning("cosim_create_undo_failed", session_id=live.id, error=str(exc))
            raise
        self._runtimes[rec.id] = rt
        for live in lives:
            live.membership = _Membership(self, rt)
        self._save(rec)
        self.events.state(rt, "created")
        log.info("cosim_created", cosim=rec.id, sessions=ids, links=len(links), quantum_ref=quantum_ref)
        return rt

    def _check_lockstep(self, live: LiveSession) -> None:
        try:
            self.sessions.backends.require_feature(live.record.backend, live.board, Feature.LOCKSTEP)
        except MachineServerError as exc:
            raise FailedPrecondition(f"session {live.id} cannot keep lock-step: {exc}",
                                     required="a backend and board with lock-step") from None

    async def enter_lockstep(self, rt: Runtime, since: Sequence[int] | None, link_state: LinkState | None,
                     inputs: Sequence[drv.BarrierInput] | None = None, mid: MidQuantum | None = None) -> None:
        """Put the members in lock-step and build the coordinator. ``since``: each
        member's cycles since time 0 (a restore), else time 0 is now."""
        topology = Topology(tuple(rt.links), tuple(board_hz(live.board) for live in rt.lives),
                            rt.rec.quantum_ref, rt.rec.hz_ref)
        watches = topology.watches()
        parts = [live.require_halted("join a co-simulation").capability(drv.LockStep) for live in rt.lives]
        try:
            with driver_errors():
                cycles = await enter(parts, watches)
        except MachineServerError as exc:
            raise FailedPrecondition(f"cannot start lock-step: {exc}") from None
        origins = [c - (since[i] if since is not None else 0) for i, c in enumerate(cycles)]
        state = RunState(rt.rec.time_ref, rt.rec.quanta, origins, list(cycles),
                         [drv.BarrierInput()] * len(cycles), link_state or LinkState())
        if since is None:
            rt.rec.origins = origins
            exchange = Exchange(rt.links, len(rt.lives), rt.rec.hz_ref, state.links)
            contents = await _read_watched(rt.lives, watches)
            exchange.prime(contents)
            state.inputs = [drv.BarrierInput(tuple(w)) for w in exchange.initial_writes(contents)]
        elif inputs is not None:
            state.inputs = list(inputs)
            state.mid = mid
        rt.coord = Coordinator(rt.lives, topology, state, lambda tr: self.events.traffic(rt, tr),
                               lambda t, q: self._barrier(rt, t, q))

    async def delete(self, rt: Runtime) -> None:
        if rt.task is not None and not rt.task.done():
            await self.pause(rt)
        if rt.coord is not None:
            await rt.coord.end()
        for live in rt.lives:
            live.membership = None
            if live.state is MachineState.RUNNING:
                self.sessions.set_state(live, MachineState.HALTED, f"co-simulation {rt.rec.name} deleted")
        self._runtimes.pop(rt.rec.id, None)
        self.db.delete(TABLE, rt.rec.id)
        self.snapshots.delete_all(rt)
        self.events.publish(rt, "state", "deleted")

    def _on_session_delete(self, live: LiveSession) -> None:
        """Not reached for a member (Delete is refused); a defensive unlink."""
        for rt in self._runtimes.values():
            if live in rt.lives:
                rt.lives.remove(live)

    # ------------------------------------------------------------------ running

    def require_runnable(self, rt: Runtime, action: str) -> Coordinator:
        state = rt.state
        if state is CoSimState.RUNNING:
            raise FailedPrecondition(f"cannot {action}: co-simulation {rt.rec.name} is running; pause it first",
                                     state=state.value, required=CoSimState.PAUSED.value)
        if state is not CoSimState.PAUSED or rt.coord is None:
            raise FailedPrecondition(f"cannot {action}: co-simulation {rt.rec.name} is {state.value}: "
                                     f"{rt.rec.state_reason}", state=state.value, required=CoSimState.PAUSED.value)
        for live in rt.lives:
            if live.state is not MachineState.HALTED:
                raise FailedPrecondition(f"cannot {action}: member {live.id} is {live.state.value}",
                                         state=live.state.value, required=MachineState.HALTED.value)
        return rt.coord

    def until_ref(self, rt: Runtime, until_ns: int, field_name: str) -> int:
        if not until_ns:
            return 0
        ref = -(-until_ns * rt.rec.hz_ref // 10**9)
        if ref <= rt.rec.time_ref:
            raise InvalidArgument(field_name, f"{until_ns} ns is not after the current virtual time "
                                  f"{rt.rec.ns(rt.rec.time_ref)} ns")
        return ref

    async def start(self, rt: Runtime, until_ref: int) -> None:
        """Run in the background (returns once RUNNING)."""
        coord = self.require_runnable(rt, "start")
        self._launch(rt, coord, 0, until_ref)

    async def step(self, rt: Runtime, count: int, until_ref: int) -> None:
        """Run ``count`` quanta (or to ``until_ref``) and return when done or stopped. A
        cancelled caller leaves it paused at a barrier."""
        if count > MAX_STEP_QUANTA:
            raise InvalidArgument("count", f"at most {MAX_STEP_QUANTA}")
        coord = self.require_runnable(rt, "step")
        task = self._launch(rt, coord, count or (0 if until_ref else 1), until_ref)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await coord.request_pause()
            await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
            raise

    async def pause(self, rt: Runtime) -> None:
        task = rt.task
        if task is None or task.done() or rt.coord is None:
            return
        await rt.coord.request_pause()
        await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)

    def _launch(self, rt: Runtime, coord: Coordinator, max_quanta: int, until_ref: int) -> asyncio.Task[None]:
        self.sessions.quotas.admit_run(rt.lives)  # the members' tenant's running sessions and instructions
        rt.rec.state, rt.rec.state_reason = CoSimState.RUNNING.value, "running"
        rt.rec.last_stop = None
        for live in rt.lives:
            live.record.last_stop = None
            self.sessions.set_state(live, MachineState.RUNNING, f"running in co-simulation {rt.rec.name}")
        self._save(rt.rec)
        self.events.state(rt, "running")
        rt.task = asyncio.get_running_loop().create_task(self._segment(rt, coord, max_quanta, until_ref),
                                                         name=f"cosim-{rt.rec.id}")
        return rt.task

    async def _segment(self, rt: Runtime, coord: Coordinator, max_quanta: int, until_ref: int) -> None:
        try:
            halt = await coord.run(max_quanta, until_ref)
            rt.rec.time_ref, rt.rec.quanta = coord.state.time_ref, coord.state.quanta
        except asyncio.CancelledError:
            await self._settle_members(rt, "halted: the server is stopping")
            self.end_segment(rt, CoSimState.PAUSED, "halted: the server is stopping")
            raise
        except (drv.DriverError, MachineServerError, ReplayDiverged) as exc:
            await self._failed(rt, exc)
            return
        except Exception as exc:  # a bug must not leave members RUNNING forever
            log.error("cosim_segment_crashed", cosim=rt.rec.id, exc_info=exc)
            await self._failed(rt, exc)
            return
        if halt is not None:
            await self._halted(rt, halt)
            return
        reason = "paused" if coord.pause_requested else "step done" if max_quanta else "reached its time"
        await self._settle_members(rt, f"halted with co-simulation {rt.rec.name} ({reason})")
        self.end_segment(rt, CoSimState.PAUSED, reason)

    async def _settle_members(self, rt: Runtime, reason: str) -> None:
        for live in rt.lives:
            if live.state is MachineState.RUNNING:
                self.sessions.stops.record(live, StopInfo(StopReason.HALT, pc=await _pc(live), message=reason),
                                          reason)

    def end_segment(self, rt: Runtime, state: CoSimState, reason: str) -> None:
        rt.rec.state, rt.rec.state_reason = state.value, reason
        self._save(rt.rec)
        self.events.state(rt, reason)

    async def _halted(self, rt: Runtime, halt: Halt) -> None:
        first_index, first = halt.stops[0]
        first_live = rt.lives[first_index]
        ns = rt.rec.ns(halt.time_ref)
        for i, stop in halt.stops:
            self.sessions.stops.record(rt.lives[i], stop, stop.reason.value)
        what = f"{first.reason.value} on {first_live.record.name} at pc 0x{first.pc:08x}"
        if first.reason is StopReason.EXIT:
            what = f"{first_live.record.name} exited with code {first.exit_code}"
        await self._settle_members(rt, f"halted with co-simulation {rt.rec.name}: {what} at {ns} ns")
        rt.rec.last_stop = {"session": first_live.record.name, "reason": first.reason.value, "pc": first.pc,
                            "virtual_time_ns": ns, "exit_code": first.exit_code or 0, "message": first.message,
                            "halt_ms": halt.halt_ms}
        final = first.reason in (StopReason.EXIT, StopReason.FAULT) or any(
            s.reason in (StopReason.EXIT, StopReason.FAULT) for _, s in halt.stops)
        state = CoSimState.STOPPED if final else CoSimState.PAUSED
        reason = f"stopped: {what} at {ns} ns"
        rt.rec.state, rt.rec.state_reason = state.value, reason
        self._save(rt.rec)
        self.events.publish(rt, "stop", reason, session=first_live.record.name, snapshot=True)
        self.events.state(rt, reason)

    async def _failed(self, rt: Runtime, exc: BaseException) -> None:
        reason = f"failed: {exc}"
        if isinstance(exc, drv.BackendFailed):
            # a member's backend died: its own failure event (which says how: the signal, the
            # exit status) may come a moment after the error of the call that found it
            ids = {live.id for live in rt.lives}
            if not any(live.state is MachineState.FAILED for live in rt.lives):
                sub = self.sessions.events.subscribe(
                    lambda ev: ev.session in ids and ev.state is MachineState.FAILED)
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(sub.get(), FAILURE_EVENT_WAIT_S)
                finally:
                    sub.close()
        for live in rt.lives:
            if live.state is MachineState.FAILED:
                reason = f"failed: member {live.record.name} failed: {live.record.state_reason}"
                break
        log.warning("cosim_failed", cosim=rt.rec.id, reason=reason)
        for live in rt.lives:
            if live.state is MachineState.RUNNING:
                machine = live.machine
                if machine is not None and machine.state is MachineState.FAILED:
                    continue
                self.sessions.set_state(live, MachineState.HALTED, f"paused: co-simulation {rt.rec.name} {reason}")
        self.end_segment(rt, CoSimState.FAILED, reason)

    def _barrier(self, rt: Runtime, time_ref: int, quanta: int) -> None:
        # a long run's progress reaches the record every so often, not at every barrier
        rt.rec.time_ref, rt.rec.quanta = time_ref, quanta
        t = time.monotonic()
        if t - rt.saved_at >= SAVE_EVERY_S:
            rt.saved_at = t
            self._save(rt.rec)
        self.events.publish(rt, "barrier", "barrier")


async def _read_watched(lives: Sequence[LiveSession], ranges: list[list[tuple[int, int]]]) -> list[tuple[bytes, ...]]:
    out = []
    for live, rs in zip(lives, ranges, strict=True):
        mem = live.require_machine("read shared memory").capability(drv.MemoryAccess)
        with driver_errors(live):
            out.append(tuple([await mem.read_memory(a, n) for a, n in rs]))
    return out


async def _pc(live: LiveSession) -> int:
    machine = live.machine
    if machine is None:
        return 0
    with contextlib.suppress(drv.DriverError):
        return (await machine.capability(drv.RegisterAccess).read_registers(["pc"]))["pc"]
    return 0
