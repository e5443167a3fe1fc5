"""TelemetryService."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Mapping

from google.protobuf import duration_pb2
from grpc import aio

from machineserver.server.api import convert
from machineserver.server.api.base import Servicer
from machineserver.server.core.engine import Engine
from machineserver.server.core.sessions import LiveSession
from machineserver.server.core.telemetry import AlertEvent, AlertRuleRecord, HostSample, check_interval
from machineserver.v1 import common_pb2
from machineserver.v1 import telemetry_pb2 as pb
from machineserver.v1 import telemetry_pb2_grpc as pb_grpc

COMPARISON_FROM_PB = {
    pb.COMPARISON_GREATER: ">",
    pb.COMPARISON_GREATER_OR_EQUAL: ">=",
    pb.COMPARISON_LESS: "<",
    pb.COMPARISON_LESS_OR_EQUAL: "<=",
}
COMPARISON_TO_PB = {v: k for k, v in COMPARISON_FROM_PB.items()}


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def host_pb(s: HostSample) -> pb.HostStatus:
    return pb.HostStatus(
        time=convert.timestamp(s.time),
        cpus=[pb.CpuCore(index=c.index, usage_percent=c.usage_percent, frequency_mhz=c.frequency_mhz) for c in s.cpus],
        cpu_percent=s.cpu_percent,
        memory=pb.MemoryUsage(used_bytes=s.memory.used_bytes, total_bytes=s.memory.total_bytes, percent=s.memory.percent),
        swap=pb.MemoryUsage(used_bytes=s.swap.used_bytes, total_bytes=s.swap.total_bytes, percent=s.swap.percent),
        temperatures=[pb.Temperature(sensor=n, celsius=c) for n, c in s.temperatures],
        power_rails=[pb.PowerRail(name=n, current_mw=c, average_mw=a) for n, c, a in s.power_rails],
        gpus=[pb.Gpu(index=g.index, name=g.name, utilization_percent=g.utilization_percent,
                     memory_used_bytes=g.memory_used_bytes, memory_total_bytes=g.memory_total_bytes,
                     temperature_celsius=g.temperature_celsius, power_mw=g.power_mw,
                     graphics_clock_mhz=g.graphics_clock_mhz, memory_clock_mhz=g.memory_clock_mhz)
              for g in s.gpus],
        sources=[pb.TelemetrySource(name=x.name, ok=x.ok, error=x.error) for x in s.sources],
        load_average=list(s.load_average),
    )


def _floats(value: object) -> dict[str, float]:
    return {str(k): float(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def cluster_node_pb(node: Mapping[str, object]) -> common_pb2.ClusterNode:
    gpus = node.get("gpus", 0)
    return common_pb2.ClusterNode(
        node_id=str(node.get("node_id", "")), address=str(node.get("address", "")), alive=bool(node.get("alive")),
        resources=_floats(node.get("resources")), available=_floats(node.get("available")),
        gpus=int(gpus) if isinstance(gpus, int | float) else 0, is_head=bool(node.get("is_head")))


CLUSTER_STATUS_SECONDS = 1.0  # how long an answer about the cluster is reused
_cluster_answers: weakref.WeakKeyDictionary[Engine, tuple[float, common_pb2.ClusterStatus]] = \
    weakref.WeakKeyDictionary()


async def cluster_status(engine: Engine) -> common_pb2.ClusterStatus:
    """The engine jobs run on and its nodes (a Ray cluster's: asked of Ray off the loop;
    none until the Ray engine has started), asked at most once a second: GetCapabilities
    and GetHostStatus carry it, and neither should cost a cluster query per call."""
    cached = _cluster_answers.get(engine)
    now = time.monotonic()
    if cached is not None and now - cached[0] < CLUSTER_STATUS_SECONDS:
        return cached[1]
    status = await _ask_cluster(engine)
    _cluster_answers[engine] = (now, status)
    return status


async def _ask_cluster(engine: Engine) -> common_pb2.ClusterStatus:
    run_engine = engine.jobs.run_engine
    address = getattr(run_engine, "cluster_address", None)

    def ask() -> tuple[str, list[Mapping[str, object]]]:
        return (str(address()) if callable(address) else ""), engine.jobs.nodes()

    where, nodes = await asyncio.to_thread(ask) if run_engine.name == "ray" else ask()
    return common_pb2.ClusterStatus(engine=run_engine.name, address=where, nodes=[cluster_node_pb(n) for n in nodes])


def alert_pb(ev: AlertEvent) -> pb.Alert:
    return pb.Alert(rule=ev.rule, state=pb.ALERT_STATE_FIRING if ev.firing else pb.ALERT_STATE_RESOLVED,
                    metric=ev.metric, value=ev.value, threshold=ev.threshold,
                    time=convert.timestamp(ev.time), message=ev.message)


def rule_pb(r: AlertRuleRecord) -> pb.AlertRule:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(r.duration_s * 1e9))
    return pb.AlertRule(name=r.name, display_name=r.display_name, metric=r.metric,
                        comparison=COMPARISON_TO_PB[r.comparison], threshold=r.threshold, duration=d,
                        create_time=convert.timestamp(r.create_time), owner=r.owner,
                        tenant=r.tenant)


class TelemetryServicer(Servicer, pb_grpc.TelemetryServiceServicer):
    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # Subscribers of one sampler get the same sample: convert it once, not per subscriber.
        self._last_host: tuple[HostSample, pb.HostStatus] | None = None

    def _host(self, sample: HostSample) -> pb.HostStatus:
        last = self._last_host
        if last is None or last[0] is not sample:
            last = self._last_host = (sample, host_pb(sample))
        return last[1]

    def _metrics(self, live: LiveSession, m: dict[str, float | int | str]) -> pb.SessionMetrics:
        return pb.SessionMetrics(
            session=live.record.name, state=convert.STATE_TO_PB[live.state],
            instructions=int(m["instructions"]), virtual_time_ns=int(m["virtual_time_ns"]),
            mips=float(m["mips"]), console_bytes=int(m["console_bytes"]),
            host_cpu_percent=float(m["host_cpu_percent"]), host_memory_bytes=int(m["host_memory_bytes"]),
            host_usage_note=str(m.get("host_note", "")), counts_exact=bool(m["counts_exact"]),
            time=convert.timestamp(time.time()),
        )

    async def GetHostStatus(
        self,
        request: pb.GetHostStatusRequest,
        context: aio.ServicerContext[pb.GetHostStatusRequest, pb.GetHostStatusResponse],
    ) -> pb.GetHostStatusResponse:
        return pb.GetHostStatusResponse(status=host_pb(await self.engine.telemetry.host_status()),
                                        cluster=await cluster_status(self.engine))

    async def StreamHostStatus(
        self,
        request: pb.StreamHostStatusRequest,
        context: aio.ServicerContext[pb.StreamHostStatusRequest, pb.StreamHostStatusResponse],
    ) -> AsyncIterator[pb.StreamHostStatusResponse]:
        sub = self.engine.telemetry.subscribe_host(_seconds(request.interval))
        async for sample in sub:
            yield pb.StreamHostStatusResponse(status=self._host(sample), dropped=sub.dropped)

    async def GetSessionMetrics(
        self,
        request: pb.GetSessionMetricsRequest,
        context: aio.ServicerContext[pb.GetSessionMetricsRequest, pb.GetSessionMetricsResponse],
    ) -> pb.GetSessionMetricsResponse:
        live = self.engine.sessions.get(request.name)
        metrics = await self.engine.telemetry.current_session_metrics(live)
        return pb.GetSessionMetricsResponse(metrics=self._metrics(live, metrics))

    async def StreamSessionMetrics(
        self,
        request: pb.StreamSessionMetricsRequest,
        context: aio.ServicerContext[pb.StreamSessionMetricsRequest, pb.StreamSessionMetricsResponse],
    ) -> AsyncIterator[pb.StreamSessionMetricsResponse]:
        live = self.engine.sessions.get(request.name)
        interval = check_interval(_seconds(request.interval))
        async for m in self.engine.telemetry.stream_session(live, interval):
            yield pb.StreamSessionMetricsResponse(metrics=self._metrics(live, m))

    async def CreateAlertRule(
        self,
        request: pb.CreateAlertRuleRequest,
        context: aio.ServicerContext[pb.CreateAlertRuleRequest, pb.CreateAlertRuleResponse],
    ) -> pb.CreateAlertRuleResponse:
        r = request.rule
        rule = self.engine.telemetry.create_rule(AlertRuleRecord(
            id="", metric=r.metric, comparison=COMPARISON_FROM_PB.get(r.comparison, ""),
            threshold=r.threshold, duration_s=_seconds(r.duration), display_name=r.display_name,
        ))
        return pb.CreateAlertRuleResponse(rule=rule_pb(rule))

    async def ListAlertRules(
        self,
        request: pb.ListAlertRulesRequest,
        context: aio.ServicerContext[pb.ListAlertRulesRequest, pb.ListAlertRulesResponse],
    ) -> pb.ListAlertRulesResponse:
        page = self.engine.telemetry.list_rules(request.page_size, request.page_token)
        return pb.ListAlertRulesResponse(rules=[rule_pb(r) for r in page.items], next_page_token=page.next_page_token)

    async def DeleteAlertRule(
        self,
        request: pb.DeleteAlertRuleRequest,
        context: aio.ServicerContext[pb.DeleteAlertRuleRequest, pb.DeleteAlertRuleResponse],
    ) -> pb.DeleteAlertRuleResponse:
        self.engine.telemetry.delete_rule(request.name)
        return pb.DeleteAlertRuleResponse()

    async def StreamAlerts(
        self,
        request: pb.StreamAlertsRequest,
        context: aio.ServicerContext[pb.StreamAlertsRequest, pb.StreamAlertsResponse],
    ) -> AsyncIterator[pb.StreamAlertsResponse]:
        telemetry = self.engine.telemetry
        sub = telemetry.subscribe_alerts()
        try:
            # Subscribed first, then what fires now, with no await in between: every change
            # after this list is in the subscription's queue.
            firing = [alert_pb(ev) for ev in telemetry.visible_firing()]
            yield pb.StreamAlertsResponse(subscribed=pb.AlertsSubscribed(firing=firing))
            async for ev in sub:
                a = alert_pb(ev)
                yield pb.StreamAlertsResponse(rule=a.rule, state=a.state, metric=a.metric, value=a.value,
                                              threshold=a.threshold, time=a.time, message=a.message)
        finally:
            sub.close()
