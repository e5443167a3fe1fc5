"""Per-tenant quotas: what one tenant may hold and use at once, so that a shared server
stays usable for the others.

The limits (each per tenant; 0 = unlimited):

* ``live_sessions``: sessions that exist (checked when one is created);
* ``running_sessions``: sessions in the RUNNING state (checked when one is run, alone
  or as a co-simulation member);
* ``program_bytes`` / ``snapshot_bytes``: the bytes of the tenant's stored programs, and
  of its snapshots (session and co-simulation snapshots together), summed from the
  records (the ``tenant`` column and each record's ``size_bytes``); checked at upload,
  create and import, before anything is stored;
* ``concurrent_streams``: server-streaming and bidirectional calls open at once (counted
  by :class:`StreamQuota`, a hook of the call chain, registered only while some tenant
  has this limit: otherwise nothing counts them and usage reports 0);
* ``instructions_per_hour``: a virtual-CPU budget, the instructions executed by the
  tenant's sessions in a sliding hour. Each powered session's instruction counter is
  sampled (as telemetry reads it, on every backend) by :class:`InstructionMeter`; a
  tenant over its budget has its running sessions paused with the reason, and Run,
  Continue and Step are refused until the window has room again. A backend that does
  not count instructions (QEMU without icount: its count stays 0) is charged its
  virtual time at the board's clock, one instruction per cycle; QEMU with icount reads
  its count at stops, so a long run of one is charged when it stops.

A limit that is hit raises :class:`~machineserver.server.core.errors.QuotaExceeded`:
RESOURCE_EXHAUSTED with a google.rpc.QuotaFailure whose subject is ``tenant:T`` and whose
description names the limit (``live_sessions: 5 of 5 in use``).

The server config's ``quotas`` section gives a default for every tenant and per-tenant
overrides (a tenant's entry replaces only the limits it names)::

    quotas:
      default: {live_sessions: 20, running_sessions: 4, instructions_per_hour: 50000000000}
      tenants:
        ci: {running_sessions: 16}
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import structlog

from machineserver.server.core import identity
from machineserver.server.core.calls import CallInfo, Transport
from machineserver.server.core.errors import MachineServerError, QuotaExceeded
from machineserver.server.drivers.base import DriverError, Machine, MachineState
from machineserver.server.store.db import Database

if TYPE_CHECKING:
    from machineserver.server.core.sessions import LiveSession, SessionEvent, SessionManager

log = structlog.get_logger(__name__)

WINDOW_SECONDS = 3600.0  # instructions_per_hour: the sliding window
ENFORCE_INTERVAL = 0.25  # how often the meter samples while a tenant has an instruction budget
SAMPLE_INTERVAL = 1.0  # ... and while none has (the counts are still reported in usage)
PROGRAM_TABLES = ("programs",)
SNAPSHOT_TABLES = ("snapshots", "cosim_snapshots")


@dataclass(frozen=True)
class TenantQuotas:
    """One tenant's limits; 0 = unlimited."""

    live_sessions: int = 0
    running_sessions: int = 0
    program_bytes: int = 0
    snapshot_bytes: int = 0
    concurrent_streams: int = 0
    instructions_per_hour: int = 0

    def maximum(self, limit: str) -> int:
        return int(getattr(self, limit))


LIMITS = tuple(f.name for f in fields(TenantQuotas))


@dataclass(frozen=True)
class QuotaConfig:
    """The ``quotas`` section: ``default`` for every tenant, ``tenants`` the overrides."""

    default: TenantQuotas = field(default_factory=TenantQuotas)
    tenants: Mapping[str, TenantQuotas] = field(default_factory=dict)

    def of(self, tenant: str) -> TenantQuotas:
        return self.tenants.get(tenant, self.default)

    @property
    def limits_streams(self) -> bool:
        """Whether any tenant has a concurrent_streams limit (only then are streams counted:
        the counting hook has a before(), which costs every call a little)."""
        return any(q.concurrent_streams for q in (self.default, *self.tenants.values()))

    @property
    def budgets_instructions(self) -> bool:
        """Whether any tenant has an instruction budget (the meter then samples faster)."""
        return any(q.instructions_per_hour for q in (self.default, *self.tenants.values()))


def _limits(value: Any, base: TenantQuotas, where: str) -> TenantQuotas:
    if value is None:
        return base
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: must be a mapping of limits ({', '.join(LIMITS)})")
    given: dict[str, int] = {}
    for key, number in value.items():
        if key not in LIMITS:
            raise ValueError(f"{where}: unknown quota {key!r}; known: {', '.join(LIMITS)}")
        try:
            count = int(number)
        except (TypeError, ValueError):
            raise ValueError(f"{where}.{key}: must be a whole number (0 = unlimited)") from None
        if isinstance(number, bool) or count < 0 or count != number:
            raise ValueError(f"{where}.{key}: must be a whole number >= 0 (0 = unlimited)")
        given[key] = count
    return replace(base, **given)


def parse_config(value: Any, source: str) -> QuotaConfig:
    """The ``quotas`` section of a config (``source`` names where it came from in errors)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: quotas must be a mapping with 'default' and 'tenants'")
    unknown = set(value) - {"default", "tenants"}
    if unknown:
        raise ValueError(f"{source}: unknown quotas setting {sorted(unknown)[0]!r}; known: default, tenants")
    default = _limits(value.get("default"), TenantQuotas(), f"{source}: quotas.default")
    tenants_given = value.get("tenants") or {}
    if not isinstance(tenants_given, Mapping):
        raise ValueError(f"{source}: quotas.tenants must map tenant names to limits")
    tenants = {str(t): _limits(v, default, f"{source}: quotas.tenants.{t}") for t, v in tenants_given.items()}
    return QuotaConfig(default, tenants)


def tenant_of(live: LiveSession) -> str:
    """The tenant a session belongs to (records from before tenants: the default one)."""
    tenant: str = getattr(live.record, "tenant", "") or identity.DEFAULT_TENANT
    return tenant


class InstructionMeter:
    """Instructions executed per tenant in a sliding window, from sampled counters.

    Each session's last reading is kept with the machine it came from: a new machine (a
    power-on) counts from zero, a counter that went back (a reset) counts from zero
    again, and a restore (which sets the counter to the snapshot's) is not execution:
    :meth:`rebase` takes the new reading as the base. A machine whose instruction count
    stays 0 (its backend does not count) is charged its virtual time at ``mhz``.
    Spending is kept in one-second buckets per tenant."""

    def __init__(self, window: float = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._last: dict[str, tuple[Machine, int, int]] = {}  # session id -> (machine, instructions, ns)
        self._spent: dict[str, deque[list[int]]] = {}  # tenant -> [second, instructions]

    def observe(self, session_id: str, tenant: str, machine: Machine, mhz: float) -> None:
        """Charge ``tenant`` what the session executed since its last reading."""
        counters = machine.counters()
        count, ns = counters.instructions, counters.virtual_time_ns
        last = self._last.get(session_id)
        base_count, base_ns = 0, 0
        if last is not None and last[0] is machine and count >= last[1] and ns >= last[2]:
            base_count, base_ns = last[1], last[2]
        self._last[session_id] = (machine, count, ns)
        spent = count - base_count if count else int((ns - base_ns) * mhz / 1000)
        if spent > 0:
            self.charge(tenant, spent)

    def rebase(self, session_id: str, machine: Machine) -> None:
        counters = machine.counters()
        self._last[session_id] = (machine, counters.instructions, counters.virtual_time_ns)

    def forget_except(self, session_ids: Iterable[str]) -> None:
        keep = set(session_ids)
        for gone in [sid for sid in self._last if sid not in keep]:
            del self._last[gone]

    def charge(self, tenant: str, instructions: int) -> None:
        second = int(self.clock())
        buckets = self._spent.setdefault(tenant, deque())
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += instructions
        else:
            buckets.append([second, instructions])

    def used(self, tenant: str) -> int:
        buckets = self._spent.get(tenant)
        if not buckets:
            return 0
        oldest = self.clock() - self.window
        while buckets and buckets[0][0] + 1 <= oldest:
            buckets.popleft()
        return sum(count for _, count in buckets)

    def tenants(self) -> list[str]:
        return list(self._spent)


class Quotas:
    """The quotas of every tenant: the checks the core calls before it creates, stores or
    runs something, the instruction meter and its enforcement, and the usage report."""

    def __init__(self, config: QuotaConfig, db: Database, *, window: float = WINDOW_SECONDS) -> None:
        self.config = config
        self.db = db
        self.meter = InstructionMeter(window)
        self.streams: Counter[str] = Counter()  # tenant -> streaming calls open
        self.sessions: SessionManager | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ wiring

    def attach(self, sessions: SessionManager) -> None:
        """Meter ``sessions``: every session event is seen as it is published (the hub
        calls ``accept`` synchronously; nothing is queued), so a stop is charged exactly
        and a restore is not charged at all."""
        self.sessions = sessions
        sessions.events.subscribe(accept=self._on_event)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._enforce_loop(), name="quotas")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ checks

    def admit_session(self) -> None:
        """Before the caller creates a session."""
        tenant = identity.current().tenant
        self._check("live_sessions", tenant, self.live_sessions(tenant))

    def admit_run(self, lives: Sequence[LiveSession]) -> None:
        """Before ``lives`` (one session, or a co-simulation's members) start running:
        room for them among the tenant's running sessions, and instructions left."""
        for tenant in sorted({tenant_of(live) for live in lives}):
            starting = sum(1 for live in lives if tenant_of(live) == tenant and live.state is not MachineState.RUNNING)
            maximum = self.config.of(tenant).running_sessions
            running = self.running_sessions(tenant)
            if maximum and starting and running + starting > maximum:
                raise QuotaExceeded("running_sessions", tenant, running, maximum)
            self._check_instructions(tenant)

    def admit_step(self, live: LiveSession) -> None:
        """Before a session executes a step: instructions left."""
        self._check_instructions(tenant_of(live))

    def admit_program_bytes(self, size: int) -> None:
        """Before the caller's program of ``size`` bytes is stored."""
        tenant = identity.current().tenant
        self._check_bytes("program_bytes", tenant, self.stored_bytes(tenant, PROGRAM_TABLES), size)

    def admit_snapshot_bytes(self, size: int) -> None:
        """Before the caller's snapshot of ``size`` bytes is stored."""
        tenant = identity.current().tenant
        self._check_bytes("snapshot_bytes", tenant, self.stored_bytes(tenant, SNAPSHOT_TABLES), size)

    def open_stream(self, tenant: str) -> None:
        self._check("concurrent_streams", tenant, self.streams[tenant])
        self.streams[tenant] += 1

    def close_stream(self, tenant: str) -> None:
        self.streams[tenant] -= 1
        if self.streams[tenant] <= 0:
            del self.streams[tenant]

    def _check(self, limit: str, tenant: str, used: int) -> None:
        maximum = self.config.of(tenant).maximum(limit)
        if maximum and used >= maximum:
            raise QuotaExceeded(limit, tenant, used, maximum)

    def _check_bytes(self, limit: str, tenant: str, used: int, size: int) -> None:
        maximum = self.config.of(tenant).maximum(limit)
        if maximum and used + size > maximum:
            raise QuotaExceeded(limit, tenant, used, maximum, f"storing {size} more bytes would exceed it")

    def _check_instructions(self, tenant: str) -> None:
        maximum = self.config.of(tenant).instructions_per_hour
        if maximum:
            used = self.meter.used(tenant)
            if used >= maximum:
                raise QuotaExceeded("instructions_per_hour", tenant, used, maximum,
                                    "instructions executed in the last hour; runs wait until the window has room")

    # ------------------------------------------------------------------ what is in use

    def _lives(self, tenant: str) -> list[LiveSession]:
        sessions = self.sessions
        return [live for live in sessions.all() if tenant_of(live) == tenant] if sessions is not None else []

    def live_sessions(self, tenant: str) -> int:
        return len(self._lives(tenant))

    def running_sessions(self, tenant: str) -> int:
        return sum(1 for live in self._lives(tenant) if live.state is MachineState.RUNNING)

    def stored_bytes(self, tenant: str, tables: Sequence[str]) -> int:
        total = 0
        for table in tables:
            for page in self.db.pages(table, where="tenant = ?", params=[tenant]):
                total += sum(int(row["data"].get("size_bytes", 0)) for row in page)
        return total

    def usage(self, tenant: str) -> list[tuple[str, int, int]]:
        """(limit, used, maximum) for each limit of ``tenant``; maximum 0 = unlimited."""
        quotas = self.config.of(tenant)
        used = {
            "live_sessions": self.live_sessions(tenant),
            "running_sessions": self.running_sessions(tenant),
            "program_bytes": self.stored_bytes(tenant, PROGRAM_TABLES),
            "snapshot_bytes": self.stored_bytes(tenant, SNAPSHOT_TABLES),
            "concurrent_streams": self.streams[tenant],
            "instructions_per_hour": self.meter.used(tenant),
        }
        return [(limit, used[limit], quotas.maximum(limit)) for limit in LIMITS]

    # ------------------------------------------------------------------ the instruction budget

    def _on_event(self, event: SessionEvent) -> bool:
        sessions = self.sessions
        live = sessions.find(event.session) if sessions is not None else None
        if live is not None and live.machine is not None:
            if event.reason.startswith("restored "):
                self.meter.rebase(live.id, live.machine)
            else:
                self.meter.observe(live.id, tenant_of(live), live.machine, live.board.cpu_mhz)
        return False  # never queued: this subscription only watches

    def sample(self) -> None:
        """Charge every powered session's instructions since its last reading."""
        sessions = self.sessions
        if sessions is None:
            return
        lives = sessions.all()
        for live in lives:
            machine = live.machine
            if machine is not None:
                self.meter.observe(live.id, tenant_of(live), machine, live.board.cpu_mhz)
        self.meter.forget_except(live.id for live in lives if live.machine is not None)

    def over_budget(self) -> dict[str, tuple[int, int]]:
        """The tenants whose instructions in the window reached their budget: (used, maximum)."""
        out = {}
        for tenant in self.meter.tenants():
            maximum = self.config.of(tenant).instructions_per_hour
            used = self.meter.used(tenant)
            if maximum and used >= maximum:
                out[tenant] = (used, maximum)
        return out

    async def enforce(self) -> None:
        """Sample, then pause the running sessions (and stop the long steps) of every
        tenant over its instruction budget, with the reason."""
        self.sample()
        sessions = self.sessions
        over = self.over_budget()
        if sessions is None or not over:
            return
        for live in sessions.all():
            tenant = tenant_of(live)
            if tenant not in over:
                continue
            used, maximum = over[tenant]
            reason = (f"paused: tenant {tenant} is over its instructions_per_hour quota "
                      f"({used} of {maximum} instructions in the last hour)")
            try:
                if live.state is MachineState.RUNNING:
                    await sessions.pause(live, reason)
                elif live.operation is not None and not live.operation.done():
                    await sessions.ops.preempt(live, reason, halts=True)
            except (MachineServerError, DriverError) as exc:
                log.warning("quota_pause_failed", session_id=live.id, tenant=tenant, error=str(exc))

    async def _enforce_loop(self) -> None:
        while True:
            try:
                await self.enforce()
            except Exception as exc:  # the meter must outlive one bad sample
                log.error("quota_enforce_failed", exc_info=exc)
            await asyncio.sleep(ENFORCE_INTERVAL if self.config.budgets_instructions else SAMPLE_INTERVAL)


class StreamQuota:
    """Call-chain hook: counts the server-streaming and bidirectional calls each tenant has
    open (``methods``: their full names) and refuses one over ``concurrent_streams``. It
    runs after the auth hook, which names the caller."""

    def __init__(self, quotas: Quotas, methods: Iterable[str]) -> None:
        self.quotas = quotas
        self.methods = frozenset(methods)
        self._open: dict[CallInfo, str] = {}  # the calls counted, and their tenant

    async def before(self, call: CallInfo) -> None:
        if call.method in self.methods and call.transport is Transport.RPC:
            tenant = identity.of_call(call).tenant
            self.quotas.open_stream(tenant)
            self._open[call] = tenant

    def after(self, call: CallInfo) -> None:
        tenant = self._open.pop(call, None)
        if tenant is not None:
            self.quotas.close_stream(tenant)
