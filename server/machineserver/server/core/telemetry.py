"""Host and session telemetry.

Host samples come from psutil (CPU per core with frequency, memory, swap, temperatures,
load). Subscribers asking for the same interval share one sampler task, which stops when
its last subscriber leaves; each subscriber has a bounded queue (a slow one drops its
oldest samples and is told how many). Alert rules are evaluated on a 1 s host sampler
while any rule exists.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import psutil

from machineserver.server.core.errors import InvalidArgument, NotFound, ResourceExhausted
from machineserver.server.core.listing import Page, paginate, resource_id
from machineserver.server.core.models import from_row, now, record_row
from machineserver.server.core.pubsub import Hub, Subscription
from machineserver.server.core.sessions import LiveSession
from machineserver.server.store.db import Database

MIN_INTERVAL = 0.01
MAX_INTERVAL = 60.0


@dataclass(frozen=True)
class CpuCore:
    index: int
    usage_percent: float
    frequency_mhz: float


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    total_bytes: int
    percent: float


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization_percent: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    temperature_celsius: float = 0.0
    power_mw: float = 0.0
    graphics_clock_mhz: float = 0.0
    memory_clock_mhz: float = 0.0


@dataclass(frozen=True)
class SourceStatus:
    name: str
    ok: bool
    error: str = ""


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


def sample_host() -> HostSample:
    """One sample from psutil. Each part that fails is reported in ``sources``."""
    sources: list[SourceStatus] = []
    per_core = psutil.cpu_percent(percpu=True)
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


class Telemetry:
    def __init__(self, db: Database, *, max_subscribers: int = 1000,
                 sample: Callable[[], HostSample] = sample_host) -> None:
        self._db = db
        self._sample = sample
        self._samplers: dict[float, _Sampler] = {}
        self.max_subscribers = max_subscribers
        self.alerts: Hub[AlertEvent] = Hub(maxlen=256)
        self._alert_task: asyncio.Task[None] | None = None
        self._since: dict[str, float] = {}
        self._firing: set[str] = set()
        self._proc = psutil.Process()

    async def host_status(self) -> HostSample:
        return await asyncio.to_thread(self._sample)

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
            sampler = self._samplers[interval] = _Sampler(interval, self._sample)
        sub = sampler.hub.subscribe()
        if sampler.task is None or sampler.task.done():
            sampler.task = asyncio.create_task(sampler.run())
        return sub

    # ------------------------------------------------------------------ sessions

    def session_metrics(self, live: LiveSession, previous: tuple[float, int] | None) -> dict[str, float | int | str]:
        counters = live.machine.counters() if live.machine is not None else None
        instructions = counters.instructions if counters else 0
        t = time.monotonic()
        mips = 0.0
        if previous is not None and t > previous[0]:
            mips = max(0, instructions - previous[1]) / (t - previous[0]) / 1e6
        return {
            "instructions": instructions,
            "virtual_time_ns": counters.virtual_time_ns if counters else 0,
            "mips": mips,
            "console_bytes": live.console.end,
            "t": t,
        }

    async def stream_session(self, live: LiveSession, interval: float) -> AsyncIterator[dict[str, float | int | str]]:
        interval = check_interval(interval)
        prev: tuple[float, int] | None = None
        while live.manager.contains(live):
            m = self.session_metrics(live, prev)
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
        self._db.put("alert_rules", record_row(rule))
        self._ensure_evaluator()
        return rule

    def rules(self) -> list[AlertRuleRecord]:
        return [from_row(AlertRuleRecord, r["data"]) for r in self._db.rows("alert_rules")]

    def list_rules(self, page_size: int, page_token: str) -> Page[AlertRuleRecord]:
        return paginate(self.rules(), page_size, page_token)

    def delete_rule(self, name: str) -> None:
        rid = resource_id(name, "alertRules")
        if not self._db.delete("alert_rules", rid):
            raise NotFound("alert rule", rid)
        self._since.pop(rid, None)
        self._firing.discard(rid)

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
                    self._firing.add(rule.id)
                    self._emit(rule, True, value or 0.0, sample.time)
            else:
                self._since.pop(rule.id, None)
                if rule.id in self._firing:
                    self._firing.discard(rule.id)
                    self._emit(rule, False, value if value is not None else float("nan"), sample.time)

    def _emit(self, rule: AlertRuleRecord, firing: bool, value: float, t: float) -> None:
        verb = "firing" if firing else "resolved"
        msg = f"{rule.metric} {rule.comparison} {rule.threshold} for {rule.duration_s:g}s: {verb} (value {value:g})"
        event = AlertEvent(rule.name, firing, rule.metric, value, rule.threshold, t, msg)
        self._db.append("alert_events", {"rule": rule.id, "state": verb, "time": t,
                                         "data": {"value": value, "message": msg}})
        self.alerts.publish(event)
