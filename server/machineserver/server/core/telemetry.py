"""Host and session telemetry.

Host samples come from psutil (CPU per core with frequency, memory, swap, temperatures,
load) plus the sources the host has (``telemetry_sources``: NVML GPUs, Jetson
tegrastats); every source is listed in the sample's ``sources`` with ok/error, and one
that fails never fails the sample. Subscribers asking for the same interval share one
sampler task, which stops when its last subscriber leaves; each subscriber has a bounded
queue (a slow one drops its oldest samples and is told how many; it never slows the
sampler or the others). Alert rules are evaluated on a 1 s host sampler while any rule
exists.

Session metrics add the host CPU and memory a session uses, from machines that implement
the driver interface ``HostFootprint``: ``host_process_ids()`` (a backend running its own
processes, e.g. QEMU: CPU % and RSS of those processes) or ``host_thread_ids()`` (an
in-process backend's worker threads, native ids: their CPU % of one core; memory: the RSS
of the worker process the threads run in, which its other machines share, or 0 in the
server's own process; a halted machine in a worker process runs no thread: CPU 0, memory
the worker's RSS still). Otherwise both read 0, with a note saying why.

A one-shot request for a session's metrics (GetSessionMetrics) is rated over a window of
samples the server keeps per session (:class:`SessionWindow`): its MIPS and host CPU are
over the last second or two, not since some previous caller's request, and a first request
on a running session waits a moment for a second sample rather than answer 0.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import psutil

from machineserver.server.core import identity, tenancy
from machineserver.server.core.errors import InvalidArgument, NotFound, ResourceExhausted
from machineserver.server.core.identity import DEFAULT_TENANT
from machineserver.server.core.listing import Page, paginate, resource_id
from machineserver.server.core.models import from_row, now, record_row
from machineserver.server.core.pubsub import Hub, Subscription
from machineserver.server.core.sessions import LiveSession
from machineserver.server.core.telemetry_sources import (
    CpuCore,
    GpuSample,
    Source,
    SourceReading,
    SourceStatus,
    Usage,
    default_sources,
)
from machineserver.server.drivers.base import HostFootprint, Machine, MachineState
from machineserver.server.store.db import Database

__all__ = [
    "ALERT_METRICS", "AlertEvent", "AlertRuleRecord", "CpuCore", "CpuMeter", "GpuSample", "HostSample", "HostSampler",
    "HostUsage", "HostUsageProbe", "SessionTick", "SessionWindow", "SourceStatus", "Telemetry", "Usage",
    "check_interval", "sample_host",
]

MIN_INTERVAL = 0.01
MAX_INTERVAL = 60.0


@dataclass(frozen=True)
class HostSample:
    time: float
    cpus: tuple[CpuCore, ...]
    cpu_percent: float
    memory: Usage
    swap: Usage
    temperatures: tuple[tuple[str, float], ...]
    power_rails: tuple[tuple[str, float, float], ...]
    gpus: tuple[GpuSample, ...]
    sources: tuple[SourceStatus, ...]
    load_average: tuple[float, ...]

    def metric(self, name: str) -> float | None:
        """A named scalar for alert rules; None when this host has no such metric."""
        values: dict[str, Callable[[], float | None]] = {
            "cpu.percent": lambda: self.cpu_percent,
            "memory.percent": lambda: self.memory.percent,
            "swap.percent": lambda: self.swap.percent,
            "load.1m": lambda: self.load_average[0] if self.load_average else None,
            "temperature.max_celsius": lambda: max((t for _, t in self.temperatures), default=None),
            "gpu.temperature_celsius": lambda: max((g.temperature_celsius for g in self.gpus), default=None),
            "gpu.utilization_percent": lambda: max((g.utilization_percent for g in self.gpus), default=None),
            "gpu.power_mw": lambda: max((g.power_mw for g in self.gpus), default=None),
            "gpu.memory_percent": lambda: max(
                (100.0 * g.memory_used_bytes / g.memory_total_bytes for g in self.gpus if g.memory_total_bytes),
                default=None,
            ),
        }
        getter = values.get(name)
        return None if getter is None else getter()


ALERT_METRICS = (
    "cpu.percent", "memory.percent", "swap.percent", "load.1m", "temperature.max_celsius",
    "gpu.temperature_celsius", "gpu.utilization_percent", "gpu.power_mw", "gpu.memory_percent",
)


def _busy(t: Any) -> tuple[float, float]:
    total = float(sum(t))
    return total - t.idle - getattr(t, "iowait", 0.0), total


class CpuMeter:
    """Per-core CPU % over the time since this meter's previous reading. Each sampler has
    its own (psutil.cpu_percent keeps one baseline per process, so samplers of different
    intervals would measure each other's windows, and a first sample would average over
    whatever happened since some earlier call). A reading with no baseline, or one older
    than ``max_age``, measures over ``settle`` seconds instead (blocking: off the loop)."""

    def __init__(self, max_age: float = 5.0, settle: float = 0.1) -> None:
        self.max_age = max_age
        self.settle = settle
        self._prev: tuple[float, list[Any]] | None = None
        self._lock = threading.Lock()

    def percpu(self) -> list[float]:
        with self._lock:
            now = time.monotonic()
            cur = psutil.cpu_times(percpu=True)
            if self._prev is None or now - self._prev[0] > self.max_age:
                base = cur
                time.sleep(self.settle)
                now, cur = time.monotonic(), psutil.cpu_times(percpu=True)
            else:
                base = self._prev[1]
            self._prev = (now, cur)
        out = []
        for a, b in zip(base, cur, strict=False):
            (busy0, total0), (busy1, total1) = _busy(a), _busy(b)
            dt = total1 - total0
            out.append(min(100.0, max(0.0, 100.0 * (busy1 - busy0) / dt)) if dt > 0 else 0.0)
        return out


_ONE_SHOT_METER = CpuMeter()


def sample_host(meter: CpuMeter | None = None) -> HostSample:
    """One sample from psutil (CPU % since ``meter``'s previous reading; by default one
    meter shared by one-shot requests). Each part that fails is reported in ``sources``."""
    sources: list[SourceStatus] = []
    per_core = (meter or _ONE_SHOT_METER).percpu()
    try:
        freqs = psutil.cpu_freq(percpu=True) or []
    except (OSError, NotImplementedError, AttributeError):
        freqs = []
    cpus = tuple(
        CpuCore(i, float(u), float(freqs[i].current) if i < len(freqs) else 0.0)
        for i, u in enumerate(per_core)
    )
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    temps: list[tuple[str, float]] = []
    try:
        for chip, entries in (psutil.sensors_temperatures() or {}).items():
            for n, entry in enumerate(entries):
                label = entry.label or f"{chip}{n}"
                temps.append((f"{chip}/{label}", float(entry.current)))
    except (OSError, AttributeError) as exc:
        sources.append(SourceStatus("psutil.sensors", False, str(exc)))
    sources.insert(0, SourceStatus("psutil", True))
    load = tuple(float(x) for x in os.getloadavg()) if hasattr(os, "getloadavg") else ()
    return HostSample(
        time=time.time(),
        cpus=cpus,
        cpu_percent=sum(per_core) / len(per_core) if per_core else 0.0,
        memory=Usage(int(vm.total - vm.available), int(vm.total), float(vm.percent)),
        swap=Usage(int(sw.used), int(sw.total), float(sw.percent)),
        temperatures=tuple(temps),
        power_rails=(),
        gpus=(),
        sources=tuple(sources),
        load_average=load,
    )


def merge(base: HostSample, reading: SourceReading | None, status: SourceStatus) -> HostSample:
    """A psutil sample with one more source's reading and status added (the overall CPU %
    stays psutil's: over online cores, where tegrastats also lists offline ones at 0)."""
    if reading is None:
        return replace(base, sources=(*base.sources, status))
    gpus = tuple(replace(g, index=len(base.gpus) + i) for i, g in enumerate(reading.gpus))
    return replace(
        base,
        cpus=reading.cpus or base.cpus,
        gpus=(*base.gpus, *gpus),
        temperatures=(*base.temperatures, *reading.temperatures),
        power_rails=(*base.power_rails, *reading.power_rails),
        sources=(*base.sources, status),
    )


class HostSampler:
    """psutil plus extra sources, in that order. Blocking: call it off the event loop
    (the samplers do, through asyncio.to_thread)."""

    def __init__(self, sources: list[Source] | None = None) -> None:
        self.sources: list[Source] = default_sources() if sources is None else sources

    def __call__(self, meter: CpuMeter | None = None) -> HostSample:
        sample = sample_host(meter)
        for source in self.sources:
            try:
                reading, status = source.read()
            except Exception as exc:  # a source must never fail the sample
                reading, status = None, SourceStatus(source.name, False, f"{type(exc).__name__}: {exc}")
            sample = merge(sample, reading, status)
        return sample

    def statuses(self) -> list[SourceStatus]:
        return [SourceStatus("psutil", True), *(s.status() for s in self.sources)]

    def close(self) -> None:
        for source in self.sources:
            source.close()


@dataclass(frozen=True)
class HostUsage:
    cpu_percent: float
    memory_bytes: int
    note: str = ""
    cpu_seconds: float | None = None  # the CPU time measured in total, when something was measured


class HostUsageProbe:
    """The host CPU (% of one core, summed over the session's processes or threads) and
    memory of one session's machine, as a delta since this probe's previous measurement
    (a first measurement of processes averages over their lifetime; of threads reads 0)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._prev: tuple[float, float] | None = None  # (monotonic, cpu seconds)

    def measure(self, machine: Machine | None) -> HostUsage:
        if machine is None:
            self._prev = None
            return HostUsage(0.0, 0, "powered off")
        if not machine.has(HostFootprint):
            return HostUsage(0.0, 0, "this backend does not say which host processes or threads it uses")
        return self.measure_footprint(machine.capability(HostFootprint))

    def measure_footprint(self, footprint: HostFootprint) -> HostUsage:
        try:
            pids = [int(p) for p in footprint.host_process_ids()]
            if pids:
                return self._processes(pids)
            tids = {int(t) for t in footprint.host_thread_ids()}
            if tids:
                return self._threads(footprint.host_thread_process(), tids)
            worker = footprint.host_thread_process()
            if worker > 0 and worker != os.getpid():
                return self._idle_worker(worker)
        except (psutil.Error, OSError) as exc:
            return HostUsage(0.0, 0, f"host usage unavailable: {exc}")
        return HostUsage(0.0, 0, "no host process or thread is running for this session now")

    def _delta(self, cpu_seconds: float, fallback: float | None) -> float:
        t = time.monotonic()
        prev, self._prev = self._prev, (t, cpu_seconds)
        if prev is None or t <= prev[0]:
            return fallback or 0.0
        return max(0.0, cpu_seconds - prev[1]) / (t - prev[0]) * 100.0

    def _processes(self, pids: list[int]) -> HostUsage:
        cpu = rss = 0.0
        lifetime = 0.0
        for pid in pids:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                used = times.user + times.system
                cpu += used
                rss += proc.memory_info().rss
                lifetime += used / max(1e-3, time.time() - proc.create_time()) * 100.0
        for gone in set(self._procs) - set(pids):
            del self._procs[gone]
        if not pids:
            return HostUsage(0.0, 0, "no host process running")
        return HostUsage(self._delta(cpu, lifetime), int(rss), cpu_seconds=cpu)

    def _idle_worker(self, pid: int) -> HostUsage:
        """A machine in a worker process with no thread running for it (halted): no CPU,
        its memory still there (the worker's RSS)."""
        self._prev = None
        rss = int(psutil.Process(pid).memory_info().rss)
        return HostUsage(0.0, rss, f"memory is the RSS of worker process {pid}, shared with the other "
                                   "machines it runs; no thread runs for this session now")

    def _threads(self, pid: int, tids: set[int]) -> HostUsage:
        if not tids:
            self._prev = None
            return HostUsage(0.0, 0, "no worker thread running")
        process = psutil.Process(pid)
        with process.oneshot():
            cpu = sum(t.user_time + t.system_time for t in process.threads() if t.id in tids)
            rss = 0 if pid == os.getpid() else int(process.memory_info().rss)
        if not rss:
            return HostUsage(self._delta(cpu, None), 0,
                             "memory is shared with the server process (in-process backend)", cpu)
        return HostUsage(self._delta(cpu, None), rss,
                         f"memory is the RSS of worker process {pid}, shared with the other machines it runs", cpu)


@dataclass(frozen=True)
class SessionTick:
    """One sample of a session, taken by the server."""

    t: float  # monotonic
    instructions: int
    cpu_seconds: float | None  # host CPU time of its processes or threads; None when not measured


class SessionWindow:
    """The recent samples of one session that one-shot metrics are rated over: from the
    oldest sample at most ``span`` seconds old (and at least ``settle / 2`` before now) to now.
    With no such sample (a first request, or the first after a quiet spell) a caller takes
    one and waits ``settle`` (:meth:`rate_base` says so by returning None). A count that
    goes backwards (a reset, a new machine) starts the window afresh."""

    def __init__(self, span: float = 2.0, settle: float = 0.25) -> None:
        self.span = span
        self.settle = settle
        self.ticks: deque[SessionTick] = deque()

    def add(self, tick: SessionTick) -> None:
        if self.ticks and tick.instructions < self.ticks[-1].instructions:
            self.ticks.clear()
        self.ticks.append(tick)
        while len(self.ticks) > 1 and tick.t - self.ticks[1].t >= self.span:
            self.ticks.popleft()  # the oldest kept is the last one at least ``span`` old

    def rate_base(self, t: float) -> SessionTick | None:
        """The sample to rate from at monotonic time ``t``, or None when none is usable."""
        for tick in self.ticks:
            if self.settle / 2 <= t - tick.t <= self.span:  # half: a sleep may end a little early
                return tick
        return None

    @staticmethod
    def mips(base: SessionTick, now: SessionTick) -> float:
        if now.t <= base.t:
            return 0.0
        return max(0, now.instructions - base.instructions) / (now.t - base.t) / 1e6

    @staticmethod
    def cpu_percent(base: SessionTick, now: SessionTick) -> float | None:
        """Host CPU % of one core between the samples; None when either did not measure it."""
        if base.cpu_seconds is None or now.cpu_seconds is None or now.t <= base.t:
            return None
        return max(0.0, now.cpu_seconds - base.cpu_seconds) / (now.t - base.t) * 100.0


def _tick(m: dict[str, float | int | str]) -> SessionTick:
    cpu = m.get("cpu_seconds")
    return SessionTick(float(m["t"]), int(m["instructions"]), None if cpu is None else float(cpu))


class _Sampler:
    def __init__(self, interval: float, sample: Callable[[], HostSample]) -> None:
        self.interval = interval
        self.hub: Hub[HostSample] = Hub(maxlen=16)
        self._sample = sample
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while self.hub.subscriber_count:
            sample = await asyncio.to_thread(self._sample)
            self.hub.publish(sample)
            next_at += self.interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind: skip missed ticks rather than burst
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)


def check_interval(seconds: float, field_name: str = "interval") -> float:
    if seconds == 0:
        return 1.0
    if not (MIN_INTERVAL <= seconds <= MAX_INTERVAL) or math.isnan(seconds):
        raise InvalidArgument(field_name, f"must be between {MIN_INTERVAL}s and {MAX_INTERVAL}s")
    return seconds


@dataclass
class AlertRuleRecord:
    id: str
    metric: str
    comparison: str  # ">", ">=", "<", "<="
    threshold: float
    duration_s: float
    display_name: str = ""
    owner: str = ""
    tenant: str = DEFAULT_TENANT
    create_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"alertRules/{self.id}"

    def holds(self, value: float) -> bool:
        return {
            ">": value > self.threshold,
            ">=": value >= self.threshold,
            "<": value < self.threshold,
            "<=": value <= self.threshold,
        }[self.comparison]


@dataclass(frozen=True)
class AlertEvent:
    rule: str
    firing: bool
    metric: str
    value: float
    threshold: float
    time: float
    message: str
    tenant: str = DEFAULT_TENANT  # the rule's: who may see the alert


class Telemetry:
    def __init__(self, db: Database, *, max_subscribers: int = 1000,
                 sample: Callable[[], HostSample] | None = None) -> None:
        self._db = db
        self.host = HostSampler() if sample is None else None
        self._sample: Callable[[], HostSample] = sample or self.host or sample_host
        self._probes: dict[str, HostUsageProbe] = {}
        self._windows: dict[str, SessionWindow] = {}
        self._samplers: dict[float, _Sampler] = {}
        self.max_subscribers = max_subscribers
        self.alerts: Hub[AlertEvent] = Hub(maxlen=256)
        self._alert_task: asyncio.Task[None] | None = None
        self._since: dict[str, float] = {}
        self._firing: dict[str, AlertEvent] = {}  # rule id -> the event that started it, oldest first
        self._proc = psutil.Process()

    async def host_status(self) -> HostSample:
        return await asyncio.to_thread(self._sample)

    def sources(self) -> list[SourceStatus]:
        """Every host status source and whether it works (blocking: NVML may initialise;
        call off the event loop). For CapabilitiesService."""
        return self.host.statuses() if self.host is not None else [SourceStatus("psutil", True)]

    @property
    def firing_count(self) -> int:
        return len(self._firing)

    def firing_alerts(self) -> list[AlertEvent]:
        """The alerts firing now (the event that started each), oldest first: of every
        tenant (the server's own view; a caller's is :meth:`visible_firing`)."""
        return list(self._firing.values())

    def visible_firing(self) -> list[AlertEvent]:
        """The alerts firing now of the rules the current caller sees."""
        who = identity.current()
        return [ev for ev in self._firing.values() if who.sees(ev.tenant)]

    def subscribe_alerts(self) -> Subscription[AlertEvent]:
        """Alerts of the rules the current caller sees (the identity is taken now: the
        filter runs where alerts are published)."""
        who = identity.current()
        return self.alerts.subscribe(None if who.is_admin else (lambda ev: who.sees(ev.tenant)))

    def dropped_total(self) -> int:
        """Samples dropped for slow host status subscribers still connected."""
        return sum(sub.dropped for s in self._samplers.values() for sub in list(s.hub._subs))

    def subscriber_count(self) -> int:
        return sum(s.hub.subscriber_count for s in self._samplers.values())

    def subscribe_host(self, interval: float) -> Subscription[HostSample]:
        interval = check_interval(interval)
        if self.subscriber_count() >= self.max_subscribers:
            raise ResourceExhausted(
                "telemetry_subscribers", f"at most {self.max_subscribers} telemetry subscribers"
            )
        sampler = self._samplers.get(interval)
        if sampler is None:
            sample = self._sample
            if sample is self.host or sample is sample_host:  # its own CPU baseline
                sample = functools.partial(sample, CpuMeter(max_age=2 * interval + 1))
            sampler = self._samplers[interval] = _Sampler(interval, sample)
        sub = sampler.hub.subscribe()
        if sampler.task is None or sampler.task.done():
            sampler.task = asyncio.create_task(sampler.run())
        return sub

    # ------------------------------------------------------------------ sessions

    def session_metrics(self, live: LiveSession, previous: tuple[float, int] | None,
                        probe: HostUsageProbe | None = None) -> dict[str, float | int | str]:
        """A session's counters, MIPS since ``previous`` (monotonic time, instructions) and
        host usage since ``probe``'s last measurement (by default: since the last one-shot
        request for this session). Blocking for a moment (psutil): call off the loop."""
        counters = live.machine.counters() if live.machine is not None else None
        instructions = counters.instructions if counters else 0
        t = time.monotonic()
        mips = 0.0
        if previous is not None and t > previous[0]:
            mips = max(0, instructions - previous[1]) / (t - previous[0]) / 1e6
        if probe is None:
            for gone in [sid for sid in self._probes if live.manager.find(sid) is None]:
                del self._probes[gone]
            probe = self._probes.setdefault(live.id, HostUsageProbe())
        usage = probe.measure(live.machine)
        measured: dict[str, float | int | str] = {} if usage.cpu_seconds is None else {"cpu_seconds": usage.cpu_seconds}
        return {
            **measured,
            "instructions": instructions,
            "virtual_time_ns": counters.virtual_time_ns if counters else 0,
            "counts_exact": int(counters.exact) if counters else 1,
            "mips": mips,
            "console_bytes": live.console.end,
            "host_cpu_percent": usage.cpu_percent,
            "host_memory_bytes": usage.memory_bytes,
            "host_note": usage.note,
            "t": t,
        }

    async def current_session_metrics(self, live: LiveSession) -> dict[str, float | int | str]:
        """A session's metrics with its current MIPS and host CPU, rated over this session's
        :class:`SessionWindow` (a running session with no usable sample yet is sampled
        twice, ``settle`` apart, so even a first request has a rate)."""
        for gone in [sid for sid in self._windows if live.manager.find(sid) is None]:
            del self._windows[gone]
        window = self._windows.setdefault(live.id, SessionWindow())
        probe = self._probes.setdefault(live.id, HostUsageProbe())
        if window.rate_base(time.monotonic()) is None and live.state == MachineState.RUNNING:
            first = await asyncio.to_thread(self.session_metrics, live, None, probe)
            window.add(_tick(first))
            await asyncio.sleep(window.settle)
        m = await asyncio.to_thread(self.session_metrics, live, None, probe)
        now = _tick(m)
        base = window.rate_base(now.t)
        window.add(now)
        if base is not None:
            m["mips"] = SessionWindow.mips(base, now)
            cpu = SessionWindow.cpu_percent(base, now)
            if cpu is not None:
                m["host_cpu_percent"] = cpu
        return m

    async def stream_session(self, live: LiveSession, interval: float) -> AsyncIterator[dict[str, float | int | str]]:
        interval = check_interval(interval)
        prev: tuple[float, int] | None = None
        probe = HostUsageProbe()
        while live.manager.contains(live):
            m = self.session_metrics(live, prev, probe)
            prev = (float(m["t"]), int(m["instructions"]))
            yield m
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ alert rules

    def create_rule(self, rule: AlertRuleRecord) -> AlertRuleRecord:
        if rule.metric not in ALERT_METRICS:
            raise InvalidArgument("rule.metric", f"unknown metric {rule.metric!r}; known: {', '.join(ALERT_METRICS)}")
        if rule.comparison not in (">", ">=", "<", "<="):
            raise InvalidArgument("rule.comparison", "is required")
        if math.isnan(rule.threshold) or math.isinf(rule.threshold):
            raise InvalidArgument("rule.threshold", "must be a finite number")
        if rule.duration_s < 0 or rule.duration_s > 86400:
            raise InvalidArgument("rule.duration", "must be between 0 and 24 h")
        rule.id = rule.id or "rule-" + secrets.token_hex(5)
        rule.owner, rule.tenant = tenancy.stamp()
        self._db.put("alert_rules", record_row(rule))
        self._ensure_evaluator()
        return rule

    def rules(self) -> list[AlertRuleRecord]:
        """Every tenant's rules (what the evaluator checks)."""
        return [from_row(AlertRuleRecord, r["data"]) for r in self._db.rows("alert_rules")]

    def list_rules(self, page_size: int, page_token: str) -> Page[AlertRuleRecord]:
        """The rules the current caller sees (admins: every tenant's)."""
        scope = tenancy.list_scope({})
        where, params = scope.where()
        rules = [from_row(AlertRuleRecord, r["data"]) for r in self._db.rows("alert_rules", where, params)]
        return paginate(rules, page_size, page_token, scope.token_key(""))

    def delete_rule(self, name: str) -> None:
        """NotFound when there is no such rule or the caller's tenant does not see it."""
        rid = resource_id(name, "alertRules")
        row = self._db.get("alert_rules", rid)
        if row is None or not tenancy.visible(from_row(AlertRuleRecord, row["data"]).tenant):
            raise NotFound("alert rule", rid)
        self._db.delete("alert_rules", rid)
        self._since.pop(rid, None)
        self._firing.pop(rid, None)

    def _ensure_evaluator(self) -> None:
        if self._alert_task is None or self._alert_task.done():
            self._alert_task = asyncio.create_task(self._evaluate_forever())

    async def start(self) -> None:
        if self.rules():
            self._ensure_evaluator()

    async def stop(self) -> None:
        if self._alert_task is not None:
            self._alert_task.cancel()
        for s in self._samplers.values():
            s.hub.close()
            if s.task is not None:
                s.task.cancel()
        self.alerts.close()
        if self.host is not None:
            await asyncio.to_thread(self.host.close)

    async def _evaluate_forever(self) -> None:
        sub = self.subscribe_host(1.0)
        try:
            while (sample := await sub.get()) is not None:
                rules = self.rules()
                if not rules:
                    return
                self.evaluate(rules, sample)
        finally:
            sub.close()

    def evaluate(self, rules: list[AlertRuleRecord], sample: HostSample) -> None:
        for rule in rules:
            value = sample.metric(rule.metric)
            holding = value is not None and rule.holds(value)
            if holding:
                since = self._since.setdefault(rule.id, sample.time)
                if rule.id not in self._firing and sample.time - since >= rule.duration_s:
                    self._firing[rule.id] = self._emit(rule, True, value or 0.0, sample.time)
            else:
                self._since.pop(rule.id, None)
                if self._firing.pop(rule.id, None) is not None:
                    self._emit(rule, False, value if value is not None else float("nan"), sample.time)

    def _emit(self, rule: AlertRuleRecord, firing: bool, value: float, t: float) -> AlertEvent:
        verb = "firing" if firing else "resolved"
        msg = f"{rule.metric} {rule.comparison} {rule.threshold} for {rule.duration_s:g}s: {verb} (value {value:g})"
        event = AlertEvent(rule.name, firing, rule.metric, value, rule.threshold, t, msg, rule.tenant)
        self._db.append("alert_events", {"rule": rule.id, "state": verb, "time": t,
                                         "data": {"value": value, "message": msg}})
        self.alerts.publish(event)
        return event
