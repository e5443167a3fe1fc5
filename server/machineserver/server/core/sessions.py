"""Sessions: one simulated board each, its machine (from a backend driver), its console,
its state machine and its events.

State machine (``MachineState``)::

    OFF --power_on--> HALTED --run--> RUNNING --pause/breakpoint/step--> HALTED
                        |                 +--exit--> EXITED  --reset--> HALTED
                        |                 +--fault-> FAULTED --reset--> HALTED
     any powered state --backend died--> FAILED --power_off--> OFF
     any state --power_off--> OFF

Every guard names the state it needed (FailedPrecondition). Records are saved on every
state change (one transaction each) so a restarted server lists the same sessions,
marked OFF.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from machineserver.server.core import identity, tenancy
from machineserver.server.core.backends import BackendRegistry
from machineserver.server.core.catalog import BoardCatalog
from machineserver.server.core.console import ConsoleChunk, ConsoleLog, MarkKind
from machineserver.server.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MachineServerError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from machineserver.server.core.images import check_fits
from machineserver.server.core.limits import MAX_CONSOLE_BYTES
from machineserver.server.core.listing import (
    FieldGetters,
    Page,
    match_terms,
    paginate,
    parse_filter,
    resource_id,
)
from machineserver.server.core.models import (
    SessionRecord,
    from_row,
    now,
    record_row,
    stop_from_dict,
    stop_to_dict,
)
from machineserver.server.core.programs import ProgramStore
from machineserver.server.core.pubsub import Hub, Subscription
from machineserver.server.core.quotas import QuotaConfig, Quotas
from machineserver.server.core.remote_targets import DEFAULT_REMOTE_ALLOW, check_allowed, normal_form
from machineserver.server.drivers import base as drv
from machineserver.server.drivers.base import (
    BoardSpec,
    Feature,
    Machine,
    MachineOptions,
    MachineState,
    StopInfo,
    StopReason,
)
from machineserver.server.store.console_files import ConsoleStore
from machineserver.server.store.db import Database
from machineserver.server.worker.remote import RemoteMachine

log = structlog.get_logger(__name__)

TABLE = "sessions"
COLLECTION = "sessions"
LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_./")
OPERATION_STOP_SECONDS = 15.0
SHORT_STEP = 64  # steps of at most this many instructions are not long operations  # how long a cancelled driver operation may take to stop
POWERED = {MachineState.HALTED, MachineState.RUNNING, MachineState.EXITED, MachineState.FAULTED}


@dataclass(frozen=True)
class SessionEvent:
    session: str  # session id
    state: MachineState
    previous_state: MachineState
    reason: str
    stop: StopInfo | None = None
    time: float = field(default_factory=now)
    tenant: str = ""  # the session's (who may see the event)


@dataclass(frozen=True)
class CreateParams:
    board_template: str = ""
    board_config: str = ""
    backend: str = ""
    display_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    max_instructions: int = 0
    max_console_bytes: int = 0
    icount: bool = False
    coverage: bool = False
    remote_target: str = ""
    remote_console: str = ""
    program: str = ""
    power_on: bool = False
    run: bool = False
    session_id: str = ""
    capsule_on_fault: bool = False  # options.capsules (core/capsules)
    capsule_assert_symbols: tuple[str, ...] = ()


def _stop_of(op: asyncio.Future[StopInfo]) -> StopInfo | None:
    """The stop an operation returned, if it finished with one (not cancelled, no error)."""
    if not op.done() or op.cancelled() or op.exception() is not None:
        return None
    return op.result()


async def finish_uninterrupted(task: asyncio.Future[Any], timeout: float) -> bool:
    """Wait (bounded) for ``task`` to end, whatever cancellations reach the waiter meanwhile.
    For work that must not be cut in half: starting a run, stopping an operation, pausing
    a machine whose caller went away. Returns whether the waiter was cancelled meanwhile
    (it must then raise CancelledError itself, once the work is accounted for)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    cancelled = False
    while not task.done() and loop.time() < deadline:
        try:
            await asyncio.wait({task}, timeout=deadline - loop.time())
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


@contextlib.contextmanager
def driver_errors(live: LiveSession | None = None) -> Iterator[None]:
    """Translate driver errors into the core's errors (one place for all drivers)."""
    try:
        yield
    except drv.BadImage as exc:
        raise InvalidArgument("program", str(exc)) from None
    except drv.BadRequest as exc:
        raise InvalidArgument(exc.field, str(exc)) from None
    except drv.WrongState as exc:
        raise FailedPrecondition(str(exc), state=exc.state, required=exc.required) from None
    except drv.NotSupported as exc:
        raise Unimplemented("backend", str(exc)) from None
    except drv.BackendFailed as exc:
        if live is not None:
            live.manager.stops.mark_failed(live, str(exc))
        raise Unavailable(f"the backend failed: {exc}") from None


class Membership(Protocol):
    """A group a session belongs to that takes over its run control (a co-simulation):
    the session's Run and Pause act on the group; its other run-control and lifecycle
    calls are refused, naming the group."""

    @property
    def name(self) -> str: ...

    async def run_member(self, live: LiveSession) -> None: ...

    async def pause_member(self, live: LiveSession) -> None: ...


class LiveSession:
    """A session's record plus what exists only while the server runs. Implements the
    driver's MachineEvents (thread-safe: it hops onto the event loop)."""

    def __init__(self, manager: SessionManager, record: SessionRecord, board: BoardSpec) -> None:
        self.manager = manager
        self.record = record
        self.board = board
        self.machine: Machine | None = None
        retain = record.max_console_bytes or manager.console_retain
        store = manager.console_store
        self.console = ConsoleLog(retain, store.file(record.id, retain) if store is not None else None)
        self.lock = asyncio.Lock()
        self.stop_waiters: list[asyncio.Future[StopInfo]] = []
        self.limit_task: asyncio.Task[None] | None = None
        # the driver call of a long operation in progress (a step); Pause and PowerOff
        # preempt it (see SessionManager.preempt) instead of waiting for the lock
        self.operation: asyncio.Task[StopInfo] | None = None
        self.preempted_by = ""  # why, when it was preempted
        # what its caller gets then: "halt" (Pause: the stop), "deadline" (its own time ran
        # out: DEADLINE_EXCEEDED) or "gone" (PowerOff, Delete: FAILED_PRECONDITION)
        self.preempt_outcome = "gone"
        # addresses of breakpoints the core set for itself (stepping over a call): a hit
        # there is reported as the end of a step, not as a breakpoint
        self.temporary_breakpoints: set[int] = set()
        self.membership: Membership | None = None  # the co-simulation it belongs to
        self._loop = manager.loop

    # ------------------------------------------------------------------ MachineEvents

    def console_output(self, data: bytes) -> None:
        self._loop.call_soon_threadsafe(self.console.append, bytes(data))

    def stopped(self, info: StopInfo) -> None:
        self._loop.call_soon_threadsafe(self.manager.stops.on_stop, self, info)

    def failed(self, reason: str) -> None:
        self._loop.call_soon_threadsafe(self.manager.stops.mark_failed, self, reason)

    def reset_by_guest(self, detail: str) -> None:
        # after the console bytes the driver sent before it (the same loop, in order)
        self._loop.call_soon_threadsafe(self.console.mark, MarkKind.RESET, detail)

    # ------------------------------------------------------------------ helpers

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> MachineState:
        return MachineState(self.record.state)

    @property
    def last_stop(self) -> StopInfo | None:
        return stop_from_dict(self.record.last_stop)

    def require_machine(self, action: str) -> Machine:
        if self.machine is None or self.state not in POWERED:
            raise FailedPrecondition(
                f"cannot {action}: session {self.id} is {self.state.value}; power it on first",
                state=self.state.value,
                required="powered on",
            )
        return self.machine

    def require_halted(self, action: str) -> Machine:
        machine = self.require_machine(action)
        if self.state is not MachineState.HALTED:
            hint = "pause it first" if self.state is MachineState.RUNNING else "reset it first"
            if self.state is MachineState.EXITED and self.record.remote_target:
                hint = "the remote target ended with the program: power it off and on again to reconnect"
            raise FailedPrecondition(
                f"cannot {action}: session {self.id} is {self.state.value}; {hint}",
                state=self.state.value,
                required=MachineState.HALTED.value,
            )
        return machine

    def require_inspectable(self, action: str) -> Machine:
        """Registers/memory: any powered state but RUNNING."""
        machine = self.require_machine(action)
        if self.state is MachineState.RUNNING:
            raise FailedPrecondition(
                f"cannot {action}: session {self.id} is running; pause it first",
                state=self.state.value,
                required="halted, exited or faulted",
            )
        return machine

    def feature(self, feature: Feature) -> None:
        self.manager.backends.require_feature(self.record.backend, self.board, feature)

    def refuse_member(self, action: str) -> None:
        """FAILED_PRECONDITION when the session belongs to a co-simulation, naming it."""
        group = self.membership
        if group is not None:
            raise FailedPrecondition(
                f"cannot {action}: session {self.id} belongs to co-simulation {group.name}; "
                f"control it through the co-simulation, or delete {group.name} first",
                state=self.state.value, required="not in a co-simulation")


class SessionManager:
    def __init__(
        self,
        db: Database,
        catalog: BoardCatalog,
        backends: BackendRegistry,
        programs: ProgramStore,
        *,
        max_sessions: int = 256,
        console_retain: int = 1 << 20,
        console_dir: Path | None = None,
        remote_allow: Sequence[str] = DEFAULT_REMOTE_ALLOW,
        quotas: Quotas | None = None,
        max_console_bytes: int = MAX_CONSOLE_BYTES,
    ) -> None:
        """``console_dir``: where consoles are kept across restarts (None: memory only);
        ``remote_allow``: the endpoints gdbremote sessions may reach (core/remote_targets.py);
        ``max_console_bytes``: the most console a session may ask to keep."""
        self.db = db
        self.catalog = catalog
        self.backends = backends
        self.programs = programs
        self.max_sessions = max_sessions
        self.remote_allow = tuple(remote_allow)
        self.quotas = quotas if quotas is not None else Quotas(QuotaConfig(), db)  # per tenant (core/quotas.py)
        self.console_retain = console_retain
        self.max_console_bytes = max_console_bytes
        self.console_store = ConsoleStore(console_dir) if console_dir is not None else None
        self.events: Hub[SessionEvent] = Hub(maxlen=4096)
        self._sessions: dict[str, LiveSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # background work (see background)
        self.ops = Operations(self)
        self.stops = Stops(self)
        self.loop = asyncio.get_running_loop()
        # Other core parts (the debugger) hook in here rather than being imported.
        self.power_on_hooks: list[Callable[[LiveSession], Awaitable[None]]] = []
        # after a LoadProgram put a program into a powered machine
        self.program_hooks: list[Callable[[LiveSession], Awaitable[None]]] = []
        self.stop_hooks: list[Callable[[LiveSession, StopInfo], None]] = []
        # "is there a breakpoint at this pc?" for the parts that set them (the debugger, the
        # capsules' assert symbols): a long step cancelled as it reached one still reports it
        self.breakpoint_probes: list[Callable[[LiveSession, int], bool]] = []
        self.delete_hooks: list[Callable[[LiveSession], None]] = []

    # ------------------------------------------------------------------ startup/shutdown

    async def start(self) -> None:
        """Load every stored session, with its console log. Emulator state does not survive
        a restart: a session that was powered on comes back OFF with the reason."""
        rows = self.db.rows(TABLE)
        if self.console_store is not None:  # a crash between a delete's two steps
            for orphan in self.console_store.session_ids() - {row["id"] for row in rows}:
                self.console_store.remove(orphan)
        for row in rows:
            rec = from_row(SessionRecord, row["data"])
            try:
                board = self.catalog.parse(rec.board_config)
            except MachineServerError as exc:
                log.warning("session_board_unreadable", session_id=rec.id, error=str(exc))
                continue
            if rec.state != MachineState.OFF.value:
                rec.state_reason = f"server restarted while {rec.state}; emulator state was lost"
                rec.state = MachineState.OFF.value
                rec.update_time = now()
                self._save(rec)
            self._sessions[rec.id] = LiveSession(self, rec, board)

    async def shutdown(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)
        for live in list(self._sessions.values()):
            if live.machine is not None:
                try:
                    await asyncio.wait_for(self._power_off(live, "server shutting down"), 10)
                except (TimeoutError, Exception) as exc:
                    log.warning("power_off_failed", session_id=live.id, error=str(exc))
            await live.console.close()
        self.events.close()

    # ------------------------------------------------------------------ lookups

    def get(self, name: str, field: str = "name") -> LiveSession:
        """The session a caller names: NotFound when there is none or the caller's tenant
        does not see it (the same answer: ids do not leak across tenants). Every lookup on
        behalf of a caller goes through here."""
        sid = resource_id(name, COLLECTION, field)
        live = self._sessions.get(sid)
        if live is None or not tenancy.visible(live.record.tenant):
            raise NotFound("session", sid)
        return live

    def find(self, session_id: str) -> LiveSession | None:
        """A session by id for the server's own work (no tenant check: never for a
        name a caller gave)."""
        return self._sessions.get(session_id)

    def contains(self, live: LiveSession) -> bool:
        return self._sessions.get(live.id) is live

    def all(self) -> list[LiveSession]:
        """Every session, of every tenant (the server's own work: metrics, shutdown)."""
        return list(self._sessions.values())

    def visible(self) -> list[LiveSession]:
        """The sessions the current caller sees."""
        who = identity.current()
        return [s for s in self._sessions.values() if who.sees(s.record.tenant)]

    def subscribe_events(self, only: LiveSession | None = None) -> Subscription[SessionEvent]:
        """Session events for the current caller: one session's (``only``, looked up with
        :meth:`get`), or those of every session its tenant sees (the identity is taken
        now: the filter runs where events are published)."""
        if only is not None:
            only_id = only.id
            return self.events.subscribe(lambda ev: ev.session == only_id)
        who = identity.current()
        if who.is_admin:
            return self.events.subscribe(None)
        return self.events.subscribe(lambda ev: who.sees(ev.tenant))

    def list(self, page_size: int, page_token: str, filter_text: str) -> Page[SessionRecord]:
        terms = parse_filter(filter_text, ["state", "backend", "board", "display_name", "labels.",
                                           tenancy.FILTER_KEY])
        scope = tenancy.list_scope(terms)
        if "state" in terms:
            terms["state"] = terms["state"].upper().removeprefix("SESSION_STATE_").lower()
        getters: FieldGetters[SessionRecord] = {
            "state": lambda r: r.state,
            "backend": lambda r: r.backend,
            "board": lambda r: r.board,
            "display_name": lambda r: r.display_name,
            "labels.": lambda r: r.labels,
        }
        recs = sorted((s.record for s in self._sessions.values() if scope.admits(s.record.tenant)),
                      key=lambda r: (r.create_time, r.id))
        items = [r for r in recs if match_terms(terms, getters, r)]
        return paginate(items, page_size, page_token, scope.token_key(filter_text))

    # ------------------------------------------------------------------ create/delete

    async def create(self, p: CreateParams) -> LiveSession:
        if bool(p.board_template) == bool(p.board_config):
            raise InvalidArgument(
                "board_template", "give exactly one of board_template and board_config"
            )
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(
                "sessions", f"the server holds its limit of {self.max_sessions} sessions; delete some"
            )
        self.quotas.admit_session()
        for key, value in p.labels.items():
            if not key or len(key) > 63 or not set(key) <= LABEL_CHARS or len(value) > 256:
                raise InvalidArgument(f"labels[{key}]", "label keys are 1-63 of a-z 0-9 - _ . /; values up to 256 chars")
        if p.max_console_bytes < 0 or p.max_instructions < 0:
            raise InvalidArgument("limits", "limits must not be negative")
        symbols = p.capsule_assert_symbols
        if len(symbols) > 16 or any(not s or len(s) > 256 for s in symbols):
            raise InvalidArgument("options.capsules.assert_symbols", "at most 16 names of 1-256 characters")
        if p.max_console_bytes > self.max_console_bytes:
            raise InvalidArgument("limits.max_console_bytes", f"at most {self.max_console_bytes} "
                                                              "(the server's limits.max_console_bytes)")
        if p.session_id:
            sid = resource_id(p.session_id, COLLECTION, "session_id")
            if not set(sid) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") or len(sid) > 63:
                raise InvalidArgument("session_id", "1-63 of a-z 0-9 -")
            if sid in self._sessions:
                raise AlreadyExists("session", sid)
        else:
            sid = "s-" + secrets.token_hex(6)
        if p.board_template:
            template, board = self.catalog.get(p.board_template, "board_template")
            config_text = template.config
        else:
            board = self.catalog.parse_input(p.board_config, "board_config")
            config_text = p.board_config
        backend_name = p.backend or self.backends.default
        backend = self.backends.get(backend_name)
        why_not = backend.board_support(board)
        if why_not:
            raise FailedPrecondition(f"backend {backend_name} cannot run board {board.name}: {why_not}")
        remote_target, remote_console = _remote_endpoints(backend, p, self.remote_allow)
        refused = self.backends.info(backend_name).refused_options
        for option, asked in (("icount", p.icount), ("coverage", p.coverage)):
            if asked and option in refused:
                raise Unimplemented(option, f"backend {backend_name} cannot honour options.{option}: "
                                            f"{refused[option]}")
        program_id = ""
        if p.program:
            prog = self.programs.get(p.program, "program")
            parsed, _ = self.programs.load(prog)
            check_fits(parsed.image, board, "program")
            program_id = prog.id
        owner, tenant = tenancy.stamp()
        rec = SessionRecord(
            id=sid,
            board=board.name,
            board_config=config_text,
            backend=backend_name,
            display_name=p.display_name,
            labels=dict(p.labels),
            max_instructions=p.max_instructions,
            max_console_bytes=p.max_console_bytes,
            icount=p.icount,
            coverage=p.coverage,
            remote_target=remote_target,
            remote_console=remote_console,
            program=program_id,
            capsule_policy={"on_fault": True} if p.capsule_on_fault else {},
            owner=owner,
            tenant=tenant,
        )
        if symbols:
            rec.capsule_policy["assert_symbols"] = list(symbols)
        self._save(rec)
        if self.console_store is not None:
            self.console_store.remove(sid)  # never another session's leftovers
        live = LiveSession(self, rec, board)
        self._sessions[sid] = live
        self._publish(live, MachineState.OFF, "created")
        log.info("session_created", session_id=sid, board=board.name, backend=backend_name)
        if p.power_on or p.run:
            try:
                await self.power_on(live)
                if p.run:
                    await self.run(live)
            except BaseException:
                await self._undo_create(live)
                raise
        return live

    async def _undo_create(self, live: LiveSession) -> None:
        """A create whose power-on or run failed (or whose caller went away meanwhile)
        leaves nothing behind: no record, no live session, no console, no machine. Streams
        following it see it end as deleted."""
        undo = asyncio.ensure_future(self.delete(live))
        cancelled = await finish_uninterrupted(undo, OPERATION_STOP_SECONDS)
        if undo.done() and not undo.cancelled() and undo.exception() is not None:
            log.error("create_undo_failed", session_id=live.id, exc_info=undo.exception())
        log.info("session_create_undone", session_id=live.id)
        if cancelled:
            raise asyncio.CancelledError()

    async def delete(self, live: LiveSession) -> None:
        live.refuse_member("delete the session")
        await self.ops.preempt(live, "deleted")
        if live.machine is not None:
            await self.discard_machine(live)
            self.stops.wake_waiters(live, FailedPrecondition(f"session {live.id} was deleted", state="off"))
        self._sessions.pop(live.id, None)
        self.db.delete(TABLE, live.id)
        await live.console.discard()
        for hook in self.delete_hooks:
            hook(live)
        # the last event of the session (OFF, "deleted"): streams following it end here
        previous = live.state
        live.record.state = MachineState.OFF.value
        live.record.state_reason = "deleted"
        self._publish(live, previous, "deleted")
        log.info("session_deleted", session_id=live.id)

    # ------------------------------------------------------------------ lifecycle

    async def power_on(self, live: LiveSession, near: LiveSession | None = None) -> None:
        """``near``: a session whose machine this one works with (a co-simulation's
        member): run in the same worker process where possible."""
        async with live.lock:
            if live.machine is not None and live.state in POWERED:
                return
            if live.machine is not None:  # FAILED: clean up what is left first
                await self.discard_machine(live)
            backend = self.backends.get(live.record.backend)
            extra = {"coverage": "1"} if live.record.coverage else {}
            if live.record.remote_target:
                extra[drv.REMOTE_TARGET] = live.record.remote_target
                extra[drv.REMOTE_CONSOLE] = live.record.remote_console
            options = MachineOptions(icount=live.record.icount, extra=extra)
            machine = backend.create_machine(live.board, options, live)
            if near is not None and isinstance(machine, RemoteMachine) and isinstance(near.machine, RemoteMachine):
                machine.near = near.machine
            with driver_errors():
                await machine.power_on()
            live.machine = machine
            try:
                if live.record.program:
                    await self._load_into(live, live.record.program)
                for hook in self.power_on_hooks:
                    await hook(live)
            except BaseException:
                await self.discard_machine(live)
                raise
            live.console.mark(MarkKind.POWER_ON, "powered on")
            live.record.exit_code = None
            live.record.last_stop = None
            live.record.backend_details = {
                **machine.details(),
                **{f"lacks {iface.feature.value if iface.feature else iface.__name__}": why
                   for iface, why in machine.lacking().items()}}
            self.set_state(live, MachineState.HALTED, "powered on")

    async def power_off(self, live: LiveSession) -> None:
        live.refuse_member("power the session off")
        await self.ops.preempt(live, "powered off")
        async with live.lock:
            if live.machine is None:
                if live.state is not MachineState.OFF:
                    self.set_state(live, MachineState.OFF, "powered off")
                return
            await self._power_off(live, "powered off")

    async def _power_off(self, live: LiveSession, reason: str) -> None:
        await self.discard_machine(live)
        self.stops.wake_waiters(live, FailedPrecondition(f"session {live.id} was {reason}", state="off"))
        self.set_state(live, MachineState.OFF, reason)

    async def discard_machine(self, live: LiveSession) -> None:
        machine, live.machine = live.machine, None
        if live.limit_task is not None:
            live.limit_task.cancel()
            live.limit_task = None
        if machine is not None:
            try:
                await machine.power_off()
            except drv.DriverError as exc:
                log.warning("power_off_error", session_id=live.id, error=str(exc))

    async def reset(self, live: LiveSession, run_after: bool = False, cause: str = "reset") -> None:
        """``cause``: who asked, for the console's reset mark (e.g. "ResetSession")."""
        live.refuse_member("reset the session")
        await self.ops.settled(live)
        async with live.lock:
            machine = live.require_machine("reset")
            with driver_errors(live):
                await machine.reset()
                live.console.mark(MarkKind.RESET, cause)
                if live.record.program:
                    await self._load_into(live, live.record.program)
            live.record.exit_code = None
            live.record.last_stop = None
            self.set_state(live, MachineState.HALTED, "reset")
        if run_after:
            await self.run(live)

    async def load_program(self, live: LiveSession, program_name: str) -> None:
        live.refuse_member("load a program")
        prog = self.programs.get(program_name, "program")
        parsed, _ = self.programs.load(prog)
        check_fits(parsed.image, live.board, "program")
        async with live.lock:
            if live.state is MachineState.RUNNING:
                raise FailedPrecondition(
                    f"cannot load a program: session {live.id} is running; pause it first",
                    state=live.state.value, required="not running",
                )
            if live.machine is not None and live.state in POWERED:
                await self._load_into(live, prog.id)  # the record names it only once it is in
                live.record.program = prog.id
                for hook in self.program_hooks:
                    await hook(live)
                live.record.exit_code = None
                live.record.last_stop = None
                self.set_state(live, MachineState.HALTED, f"loaded {prog.name}")
            else:
                live.record.program = prog.id
                live.record.update_time = now()
                self._save(live.record)

    async def _load_into(self, live: LiveSession, program_id: str) -> None:
        assert live.machine is not None
        prog = self.programs.by_id(program_id, "program")  # the session's own: no tenant check
        parsed, _ = self.programs.load(prog)
        check_fits(parsed.image, live.board, "program")
        with driver_errors(live):
            await live.machine.load(parsed.image)

    # ------------------------------------------------------------------ run control

    async def run(self, live: LiveSession) -> None:
        if live.membership is not None:
            await live.membership.run_member(live)
            return
        await self.ops.settled(live)
        async with live.lock:
            machine = live.require_machine("run")
            if live.state is MachineState.RUNNING:
                return
            live.require_halted("run")
            live.feature(Feature.RUN_CONTROL)
            self.quotas.admit_run([live])
            self.set_state(live, MachineState.RUNNING, "running")
            # a run() is short: a cancelled caller does not cut it in half (the machine would
            # run with the record saying otherwise); the cancellation goes on after it
            start = asyncio.ensure_future(machine.capability(drv.RunControl).run())
            cancelled = await finish_uninterrupted(start, OPERATION_STOP_SECONDS)
            try:
                with driver_errors(live):
                    await start
            except BaseException:
                # read afresh (annotated: mypy would keep the state narrowed from before the await)
                state: MachineState = live.state
                if state is MachineState.RUNNING:
                    self.set_state(live, MachineState.HALTED, "run failed")
                raise
            if live.record.max_instructions:
                live.limit_task = asyncio.create_task(self.ops.watch_limit(live))
            if cancelled:
                raise asyncio.CancelledError()

    async def pause(self, live: LiveSession, reason: str = "paused") -> StopInfo | None:
        if live.membership is not None:
            await live.membership.pause_member(live)
            return live.last_stop
        await self.ops.preempt(live, reason, halts=True)
        async with live.lock:
            machine = live.require_machine("pause")
            if live.state is not MachineState.RUNNING:
                return live.last_stop
            live.feature(Feature.RUN_CONTROL)
            with driver_errors(live):
                info: StopInfo = await machine.capability(drv.RunControl).pause()
            if live.state is MachineState.RUNNING:  # a stop event may have come first
                if info.reason is StopReason.HALT and any(probe(live, info.pc) for probe in self.breakpoint_probes):
                    # halted on a breakpoint's address: it reached the breakpoint as the pause
                    # came (the hit's own event, arriving after, would be dropped: not RUNNING)
                    info = StopInfo(StopReason.BREAKPOINT, pc=info.pc)
                    reason = "breakpoint"
                self.stops.apply(live, info, reason)
            return live.last_stop

    async def step(self, live: LiveSession, count: int, timeout: float | None = None) -> StopInfo:
        """Execute ``count`` instructions. A long step is an operation: its caller going
        away (cancelled) or its ``timeout`` passing stops it, Pause and PowerOff preempt
        it; either way the machine is left halted (or exited/faulted when that came
        first) before this returns."""
        if count < 0 or count > 10**9:
            raise InvalidArgument("count", "must be between 1 and 10^9")
        live.refuse_member("step")
        await self.ops.settled(live)
        async with live.lock:
            machine = live.require_halted("step")
            live.feature(Feature.RUN_CONTROL)
            self.quotas.admit_step(live)
            run_control = machine.capability(drv.RunControl)
            if count <= SHORT_STEP:  # over in microseconds: no operation task (a debugger's stepi)
                with driver_errors(live):
                    info = await run_control.step(count or 1)
            else:
                start_pc = await self.ops.halted_pc(live)
                try:
                    info = await self.ops.run(live, run_control.step(count), "step", timeout)
                except asyncio.CancelledError:
                    await self.ops.breakpoint_reached(live, start_pc)
                    raise
            self.stops.apply(live, info, "step", quiet=info.reason is StopReason.STEP)
            return info

    def background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Work that outlives the call that started it, owned by the manager: errors are
        logged, and shutdown waits for it."""
        task = self.loop.create_task(work, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background_task_failed", task=name, exc_info=t.exception())

        task.add_done_callback(done)

    # ------------------------------------------------------------------ console

    async def write_console(self, live: LiveSession, data: bytes) -> int:
        if not data:
            raise InvalidArgument("data", "must not be empty")
        if len(data) > 64 * 1024:
            raise InvalidArgument("data", "at most 64 KiB per call")
        machine = live.require_machine("write to the console")
        live.feature(Feature.CONSOLE_INPUT)
        with driver_errors(live):
            await machine.capability(drv.ConsoleInput).console_input(data)
        return len(data)

    def console_stream(self, live: LiveSession, offset: int, follow: bool) -> AsyncIterator[ConsoleChunk]:
        return live.console.follow(offset, follow, marks=True)

    # ------------------------------------------------------------------ records and events

    def set_state(self, live: LiveSession, state: MachineState, reason: str, *, stop: StopInfo | None = None) -> None:
        previous = live.state
        live.record.state = state.value
        live.record.state_reason = reason
        live.record.update_time = now()
        self._save(live.record)
        self._publish(live, previous, reason, stop)

    def _publish(self, live: LiveSession, previous: MachineState, reason: str, stop: StopInfo | None = None) -> None:
        self.events.publish(SessionEvent(live.id, live.state, previous, reason, stop, tenant=live.record.tenant))

    def _save(self, rec: SessionRecord) -> None:
        self.db.put(TABLE, record_row(rec, board=rec.board, backend=rec.backend, state=rec.state))


class Operations:
    """A session's long operations (a step of many instructions runs as a task of its own,
    ``live.operation``) and waiting for stops: how Pause and PowerOff preempt them, how a
    caller that goes away or runs out of time stops them, and how a waiting continue never
    outlives its caller."""

    def __init__(self, manager: SessionManager) -> None:
        self.m = manager

    async def settled(self, live: LiveSession) -> None:
        """Wait for an operation that is being stopped (its caller went away, or it was
        preempted) to be stopped: a call that comes right after finds the machine halted,
        not still stepping. An operation that goes on is not waited for."""
        op = live.operation
        if op is not None and not op.done() and (op.cancelling() or live.preempted_by):
            await asyncio.wait({op}, timeout=OPERATION_STOP_SECONDS)

    async def run(self, live: LiveSession, driver_call: Coroutine[Any, Any, StopInfo],
                         what: str, timeout: float | None = None) -> StopInfo:
        """Run a driver call that may take long as a task of its own (``live.operation``);
        the caller holds the session lock. A cancelled caller cancels the call with it
        (drivers stop and leave the machine halted) and the record follows the machine's
        state; a preempted call (:meth:`preempt`) hands its caller the halt."""
        op: asyncio.Task[StopInfo] = asyncio.ensure_future(driver_call)
        live.operation, live.preempted_by = op, ""
        caller = asyncio.current_task()
        timer = None
        if timeout is not None:
            reason = f"halted: the {what} did not finish before its deadline"
            timer = self.m.loop.call_later(
                timeout, lambda: op.done() or self._preempt_now(live, op, reason, "deadline"))
        try:
            with driver_errors(live):
                info = await op
            return info
        except asyncio.CancelledError:
            if not op.done():
                op.cancel()
            await finish_uninterrupted(op, OPERATION_STOP_SECONDS)
            preempted = live.preempted_by
            if preempted and caller is not None and caller.cancelling() == 0:
                if live.preempt_outcome == "halt":
                    return await self._halted_after(live, preempted)
                if live.preempt_outcome == "deadline":
                    await self._follow_machine_to_its_stop(live, preempted)
                    raise DeadlineExceeded(f"the {what} did not finish in time; session {live.id} was "
                                           "halted") from None
                raise FailedPrecondition(f"cannot finish the {what}: session {live.id} was {preempted}",
                                         state=live.state.value) from None
            reached = _stop_of(op)
            if reached is None or reached.reason is StopReason.STEP:
                # the machine may have ended by itself as the cancellation came, the step
                # never saying so: ask it for that stop, so the exit code is not lost
                reached = await self._stop_reached(live) or reached
            if reached is not None and reached.reason is not StopReason.STEP:
                # it ended by itself (an exit, a fault, a breakpoint) before the cancellation
                # took: report that stop (an exit's code with it), not just the state
                self.m.stops.apply(live, reached, what)
            else:
                self.follow_machine(live, f"{what} cancelled by its caller")  # no stop of its own
            raise
        finally:
            if timer is not None:
                timer.cancel()
            live.operation, live.preempted_by = None, ""

    async def halted_pc(self, live: LiveSession) -> int | None:
        """The pc of a HALTED machine; None otherwise (or when it cannot be read)."""
        machine = live.machine
        if machine is None or machine.state is not MachineState.HALTED or not machine.has(drv.RegisterAccess):
            return None
        with contextlib.suppress(drv.DriverError):
            return (await machine.capability(drv.RegisterAccess).read_registers(["pc"]))["pc"]
        return None

    async def breakpoint_reached(self, live: LiveSession, start_pc: int | None) -> None:
        """A long step cancelled by its caller (a wait whose console matched, a caller that
        went away) just as it reached a breakpoint: the driver reports the cancellation's halt,
        or the step's own stop is dropped with it. Halted on a breakpoint's address it did not
        start from, the machine is at that breakpoint: the stop is reported as one (its hooks
        fire, and the caller's caller does not run past it unknowing)."""
        if not self.m.breakpoint_probes:
            return
        pc = await self.halted_pc(live)
        if pc is None or pc == start_pc or not any(probe(live, pc) for probe in self.m.breakpoint_probes):
            return
        last = live.last_stop
        if last is not None and last.reason is StopReason.BREAKPOINT and last.pc == pc:
            return  # the step's own stop said so (reported already)
        self.m.stops.apply(live, StopInfo(StopReason.BREAKPOINT, pc=pc), "breakpoint")

    async def preempt(self, live: LiveSession, reason: str, *, halts: bool = False) -> None:
        """Stop a long operation in progress, so that Pause and PowerOff never wait behind
        a step of 10^9 instructions. Its caller gets the halt (``halts``: a pause) or
        FAILED_PRECONDITION saying why (a power-off, a delete)."""
        op = live.operation
        if op is None or op.done():
            return
        self._preempt_now(live, op, reason, "halt" if halts else "gone")
        await asyncio.wait({op}, timeout=OPERATION_STOP_SECONDS)

    @staticmethod
    def _preempt_now(live: LiveSession, op: asyncio.Task[StopInfo], reason: str, outcome: str) -> None:
        live.preempted_by, live.preempt_outcome = reason, outcome
        op.cancel()

    async def _halted_after(self, live: LiveSession, reason: str) -> StopInfo:
        """The stop a preempted operation's caller gets: where the machine halted."""
        machine = live.machine
        if machine is not None and machine.state is MachineState.HALTED:
            pc = 0
            with contextlib.suppress(drv.DriverError):
                pc = (await machine.capability(drv.RegisterAccess).read_registers(["pc"]))["pc"]
            return StopInfo(StopReason.HALT, pc=pc, message=reason)
        await self._follow_machine_to_its_stop(live, reason)
        raise FailedPrecondition(f"session {live.id} was {reason}", state=live.state.value)

    @staticmethod
    async def _stop_reached(live: LiveSession) -> StopInfo | None:
        """The stop an EXITED or FAULTED machine ended at, where its driver keeps it."""
        machine = live.machine
        if machine is None or machine.state not in (MachineState.EXITED, MachineState.FAULTED) \
                or not machine.has(drv.RunControl):
            return None
        try:
            return await machine.capability(drv.RunControl).stop_reached()
        except drv.DriverError:
            return None

    async def _follow_machine_to_its_stop(self, live: LiveSession, reason: str) -> None:
        """:meth:`follow_machine`, but a machine that ended by itself (exit, fault) gives
        the record its stop, exit code included."""
        reached = await self._stop_reached(live)
        if reached is not None:
            self.m.stops.apply(live, reached, reason)
        else:
            self.follow_machine(live, reason)

    def follow_machine(self, live: LiveSession, reason: str) -> None:
        """After an interrupted operation: the record takes the machine's state."""
        machine = live.machine
        if machine is None:
            return
        state = machine.state
        if state is MachineState.FAILED:
            self.m.stops.mark_failed(live, reason)
        elif state in POWERED and state is not live.state:
            self.m.set_state(live, state, reason)

    async def wait_for_stop(self, live: LiveSession, timeout: float | None) -> StopInfo:
        if live.state is not MachineState.RUNNING:
            stop = live.last_stop
            if stop is None:
                raise FailedPrecondition(f"session {live.id} is {live.state.value} and has not stopped")
            return stop
        fut: asyncio.Future[StopInfo] = self.m.loop.create_future()
        live.stop_waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"session {live.id} is still running") from None
        finally:
            if fut in live.stop_waiters:
                live.stop_waiters.remove(fut)

    async def run_until_stop(self, live: LiveSession, timeout: float | None) -> StopInfo:
        """Run and wait for the next stop. If the caller goes away or its time is up
        first, the session is halted before this ends: a continue never outlives the
        call that waits for it."""
        try:
            await self.m.run(live)
            return await self.wait_for_stop(live, timeout)
        except DeadlineExceeded:
            await self.m.pause(live, "halted: the continue's deadline passed")
            raise DeadlineExceeded(f"session {live.id} did not stop in time; it was halted") from None
        except asyncio.CancelledError:
            await self.halt_for_gone_caller(live, "halted: the continue's caller went away")
            raise

    async def halt_for_gone_caller(self, live: LiveSession, reason: str) -> None:
        """Pause a session whose waiting caller was cancelled; the pause itself is not cut
        short by further cancellations of that caller (a half-done pause would leave the
        machine running with nobody waiting)."""
        pause = asyncio.ensure_future(self.m.pause(live, reason))
        await finish_uninterrupted(pause, OPERATION_STOP_SECONDS)
        if pause.done() and not pause.cancelled():
            with contextlib.suppress(MachineServerError):
                pause.result()

    async def watch_limit(self, live: LiveSession) -> None:
        """Pause a running session once it has executed its max_instructions."""
        limit = live.record.max_instructions
        while live.state is MachineState.RUNNING and (machine := live.machine) is not None:
            try:
                instructions = (await machine.current_counters()).instructions
            except drv.DriverError:
                return  # the machine went away under us: nothing left to limit
            if instructions >= limit:
                await self.m.pause(live, f"instruction limit of {limit} reached")
                return
            await asyncio.sleep(0.005)



class Stops:
    """What machines report (stops, failures) and stops from elsewhere (a co-simulation's),
    turned into the session's record, its stop hooks and its waiters."""

    def __init__(self, manager: SessionManager) -> None:
        self.m = manager

    def on_stop(self, live: LiveSession, info: StopInfo) -> None:
        # pause() and step() hand their stops back themselves, never as events (the driver
        # contract); a HALT event is a halt from elsewhere (a remote target halted by another
        # debugger): it stops the session like a breakpoint would
        if live.state is not MachineState.RUNNING or info.reason is StopReason.STEP:
            return
        self.apply(live, info, info.reason.value)

    def record(self, live: LiveSession, info: StopInfo, reason: str) -> None:
        """A stop that happened outside the manager's run control (a co-simulation's):
        the record, the stop hooks, the waiters, as for the session's own stops."""
        self.apply(live, info, reason)

    def apply(self, live: LiveSession, info: StopInfo, reason: str, *, quiet: bool = False) -> None:
        if info.reason is StopReason.BREAKPOINT and info.pc in live.temporary_breakpoints:
            info = StopInfo(StopReason.STEP, pc=info.pc)
            reason = "step"
        if info.reason is StopReason.EXIT:
            state = MachineState.EXITED
            live.record.exit_code = info.exit_code
            reason = f"exited with code {info.exit_code}"
        elif info.reason is StopReason.FAULT:
            state = MachineState.FAULTED
            reason = f"fault at pc 0x{info.pc:08x}: {info.message}" if info.message else "fault"
        else:
            state = MachineState.HALTED
            if info.reason is StopReason.BREAKPOINT:
                reason = f"breakpoint at 0x{info.pc:08x}"
            elif info.reason is StopReason.WATCHPOINT and info.watch_address is not None:
                reason = f"watchpoint at 0x{info.watch_address:08x}"
        live.record.last_stop = stop_to_dict(info)
        for hook in self.m.stop_hooks:
            hook(live, info)
        if quiet and state is live.state:
            return  # a plain step: no state change worth an event or a write
        self.m.set_state(live, state, reason, stop=info)
        self.wake_waiters(live, info)

    def wake_waiters(self, live: LiveSession, outcome: StopInfo | MachineServerError) -> None:
        waiters, live.stop_waiters = live.stop_waiters, []
        for fut in waiters:
            if fut.done():
                continue
            if isinstance(outcome, MachineServerError):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

    def mark_failed(self, live: LiveSession, reason: str) -> None:
        """The backend died: FAILED with the reason; whatever is left of the machine (a
        stuck emulator process) is freed now, not when the session is deleted."""
        if live.state in (MachineState.FAILED, MachineState.OFF):
            return
        log.warning("session_failed", session_id=live.id, reason=reason)
        self.m.set_state(live, MachineState.FAILED, reason)
        self.wake_waiters(live, Unavailable(f"session {live.id} failed: {reason}"))
        self.m.background(self._free_failed(live), f"free-{live.id}")

    async def _free_failed(self, live: LiveSession) -> None:
        async with live.lock:
            if live.state is MachineState.FAILED and live.machine is not None:
                await self.m.discard_machine(live)


def _remote_endpoints(backend: drv.Backend, p: CreateParams, allow: Sequence[str]) -> tuple[str, str]:
    """A remote-target backend's endpoints, checked against the allow-list; refused
    for the other backends."""
    where = "options.remote.address"
    if not backend.remote_target:
        if p.remote_target or p.remote_console:
            raise InvalidArgument(where, f"backend {backend.name} runs its own machines; a remote "
                                  "target is for the gdbremote backend")
        return "", ""
    if not p.remote_target:
        raise InvalidArgument(where, f"backend {backend.name} needs the GDB server to drive "
                              "(HOST:PORT or unix:/path)")
    target = normal_form(p.remote_target, where)
    check_allowed(target, allow, where)
    console = ""
    if p.remote_console:
        console = normal_form(p.remote_console, "options.remote.console", console=True)
        check_allowed(console, allow, "options.remote.console")
    return target, console
