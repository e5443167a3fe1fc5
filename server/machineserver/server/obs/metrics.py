"""Prometheus metrics through the OpenTelemetry SDK and its Prometheus exporter, served
on an HTTP port of their own (``metrics_listen``; port 0 picks a free one).

Each server gets its own MeterProvider and prometheus_client registry (nothing global),
so several servers in one process (tests) never mix their figures. What is exported:

- ``machineserver_rpc_requests_total{rpc_service, rpc_method, rpc_grpc_status_code}``
- ``machineserver_rpc_duration_seconds`` histogram, same labels (a stream: its lifetime)
- ``machineserver_sessions_active{backend}`` (powered on) and ``machineserver_sessions{backend, state}``
- ``machineserver_programs_uploaded_total``, ``machineserver_programs_stored``
- ``machineserver_snapshots_created_total``, ``machineserver_snapshots_stored``
- ``machineserver_console_output_bytes_total`` (bytes every session's machine printed)
- ``machineserver_alerts_firing``, ``machineserver_telemetry_subscribers``

Gauges read the engine on its event loop (the scrape runs in the HTTP server's thread),
with a short timeout so a stuck loop makes a scrape thin, not hung.

The two RPC figures are kept by the call hook itself (:class:`RpcFigures`: a dict update
per call, where the OTel SDK's counter add and histogram record cost a call ~20 us) and
exported on the same registry in the shape the OTel exporter gives every other instrument
(names, units, HELP, the ``otel_scope_*`` labels), so a scrape reads the same.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import structlog
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from machineserver.server import __version__
from machineserver.server.core.calls import AfterOnlyHook
from machineserver.server.core.netpolicy import is_loopback

if TYPE_CHECKING:
    from machineserver.server.core.calls import CallInfo
    from machineserver.server.core.engine import Engine
    from machineserver.server.core.sessions import LiveSession

log = structlog.get_logger("machineserver.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UPLOAD_METHODS = frozenset({"/machineserver.v1.SessionService/UploadProgram"})
SNAPSHOT_METHODS = frozenset({"/machineserver.v1.SessionService/CreateSnapshot",
                              "/machineserver.v1.SessionService/ImportSnapshot"})
GAUGE_TIMEOUT = 2.0


@dataclass
class _EngineFigures:
    active: Counter[str] = field(default_factory=Counter)  # backend -> powered sessions
    sessions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (backend, state)
    console_bytes: int = 0
    programs: int = 0
    snapshots: int = 0
    firing: int = 0
    subscribers: int = 0


# (rpc.service, rpc.method, rpc.grpc.status_code, transport) as Prometheus labels, after
# the instrumentation scope's (what the OTel exporter adds to every sample)
RPC_LABELS = ("otel_scope_name", "otel_scope_schema_url", "otel_scope_version",
              "rpc_service", "rpc_method", "rpc_grpc_status_code", "transport")
METER_NAME = "machineserver"


class RpcFigures(Collector):
    """Calls handled and their durations, by service, method, code and transport: kept in
    plain counts under a lock (the hook runs on the event loop, a scrape in the HTTP
    server's thread), exported as ``machineserver_rpc_requests_total`` and the
    ``machineserver_rpc_duration_seconds`` histogram (:data:`LATENCY_BUCKETS`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> [calls, seconds in all, then calls per bucket (not cumulative), +Inf last]
        self._figures: dict[tuple[str, str, str, str], list[float]] = {}

    def observe(self, service: str, method: str, code: str, transport: str, seconds: float) -> None:
        key = (service, method, code, transport)
        bucket = 2 + bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            figures = self._figures.get(key)
            if figures is None:
                figures = self._figures[key] = [0.0] * (3 + len(LATENCY_BUCKETS))
            figures[0] += 1
            figures[1] += seconds
            figures[bucket] += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rows = [(key, list(figures)) for key, figures in self._figures.items()]
        requests = CounterMetricFamily("machineserver_rpc_requests",
                                       "RPCs handled, by service, method and status code", labels=RPC_LABELS)
        duration = HistogramMetricFamily("machineserver_rpc_duration", "RPC duration (a stream: its lifetime)",
                                         labels=RPC_LABELS, unit="seconds")
        scope = (METER_NAME, "", __version__)
        for key, figures in sorted(rows):
            labels = [*scope, *key]
            requests.add_metric(labels, figures[0])
            buckets, seen = [], 0.0
            for bound, count in zip([*LATENCY_BUCKETS, "+Inf"], figures[2:], strict=True):
                seen += count
                buckets.append((f"{bound}", seen))
            duration.add_metric(labels, buckets=buckets, sum_value=figures[1])
        yield requests
        yield duration


def split_listen(listen: str) -> tuple[str, int]:
    """"host:port" (IPv6 as "[::1]:9464") -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics_listen {listen!r}: expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


class ServerMetrics(AfterOnlyHook):
    """The instruments, the call hook that feeds them, and the /metrics endpoint."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.engine = engine
        self.loop = loop or asyncio.get_running_loop()
        self.registry = CollectorRegistry(auto_describe=True)
        self._reader = PrometheusMetricReader(registry=self.registry)
        self.provider = MeterProvider(
            metric_readers=[self._reader],
            resource=Resource.create({"service.name": "machineserver", "service.version": __version__}),
        )
        meter = self.provider.get_meter(METER_NAME, __version__)
        self.rpc = RpcFigures()
        self.registry.register(self.rpc)
        self.programs_uploaded = meter.create_counter(
            "machineserver.programs.uploaded", unit="1", description="Programs uploaded (UploadProgram answered OK)")
        self.snapshots_created = meter.create_counter(
            "machineserver.snapshots.created", unit="1", description="Snapshots created or imported")
        meter.create_observable_gauge("machineserver.sessions.active", [self._observe_active], unit="1",
                                      description="Powered-on sessions, by backend")
        meter.create_observable_gauge("machineserver.sessions", [self._observe_sessions], unit="1",
                                      description="Sessions, by backend and state")
        meter.create_observable_counter("machineserver.console.output", [self._observe_console], unit="By",
                                        description="Console bytes the sessions' machines wrote")
        meter.create_observable_gauge("machineserver.programs.stored", [self._simple(lambda f: f.programs)], unit="1",
                                      description="Programs stored")
        meter.create_observable_gauge("machineserver.snapshots.stored", [self._simple(lambda f: f.snapshots)], unit="1",
                                      description="Snapshots stored")
        meter.create_observable_gauge("machineserver.alerts.firing", [self._simple(lambda f: f.firing)], unit="1",
                                      description="Alert rules firing now")
        meter.create_observable_gauge("machineserver.telemetry.subscribers", [self._simple(lambda f: f.subscribers)],
                                      unit="1", description="Host status stream subscribers")
        # console bytes of deleted sessions, so the counter never goes down
        self._retired_console = 0
        engine.sessions.delete_hooks.append(self._on_delete)
        self._figures: tuple[float, _EngineFigures] | None = None
        self._figures_lock = threading.Lock()
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the hook

    def after(self, call: CallInfo) -> None:
        self.rpc.observe(call.service, call.rpc, call.code, call.transport.value, call.elapsed_ms / 1000.0)
        if call.code == "OK":
            if call.method in UPLOAD_METHODS:
                self.programs_uploaded.add(1)
            elif call.method in SNAPSHOT_METHODS:
                self.snapshots_created.add(1)

    # ------------------------------------------------------------------ gauges

    def _on_delete(self, live: LiveSession) -> None:
        self._retired_console += live.console.end

    def _gather(self) -> _EngineFigures:
        """On the event loop."""
        f = _EngineFigures()
        for live in self.engine.sessions.all():
            backend = live.record.backend
            f.sessions[(backend, live.state.value)] += 1
            if live.machine is not None:
                f.active[backend] += 1
            f.console_bytes += live.console.end
        f.console_bytes += self._retired_console
        f.programs = self.engine.db.count("programs")
        f.snapshots = self.engine.db.count("snapshots")
        f.firing = self.engine.telemetry.firing_count
        f.subscribers = self.engine.telemetry.subscriber_count()
        return f

    def figures(self) -> _EngineFigures | None:
        """The engine's figures for this scrape (one trip to the loop per scrape)."""
        with self._figures_lock:
            if self._figures is not None and time.monotonic() - self._figures[0] < 0.5:
                return self._figures[1]
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            try:
                if running is self.loop:
                    figures = self._gather()
                else:
                    fut: concurrent.futures.Future[_EngineFigures] = concurrent.futures.Future()

                    def gather() -> None:
                        try:
                            fut.set_result(self._gather())
                        except Exception as exc:
                            fut.set_exception(exc)

                    self.loop.call_soon_threadsafe(gather)
                    figures = fut.result(GAUGE_TIMEOUT)
            except Exception as exc:  # timeout (loop stuck), loop closed, a failing query
                log.warning("metrics_gauges_unavailable", error=str(exc) or type(exc).__name__)
                return None
            self._figures = (time.monotonic(), figures)
            return figures

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        f = self.figures()
        backends = set(self.engine.backends.names()) | (set(f.active) if f else set())
        return [Observation(f.active.get(b, 0), {"backend": b}) for b in sorted(backends)] if f else []

    def _observe_sessions(self, options: CallbackOptions) -> Iterable[Observation]:
        f = self.figures()
        return [Observation(n, {"backend": b, "state": s}) for (b, s), n in sorted(f.sessions.items())] if f else []

    def _observe_console(self, options: CallbackOptions) -> Iterable[Observation]:
        f = self.figures()
        return [Observation(f.console_bytes)] if f else []

    def _simple(self, figure: Callable[[_EngineFigures], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            f = self.figures()
            return [Observation(figure(f))] if f else []

        return observe

    # ------------------------------------------------------------------ endpoint

    def serve(self, listen: str, *, allow_nonloopback: bool = False) -> int:
        """Serve /metrics on ``listen`` ("host:port"); the bound port. /metrics has no
        authentication: beyond loopback only with ``allow_nonloopback``."""
        host, port = split_listen(listen)
        if not allow_nonloopback and not is_loopback(host):
            raise ValueError(f"refusing to serve metrics on {listen}: beyond loopback only with "
                             "metrics_allow_nonloopback (/metrics has no authentication)")
        try:
            self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(5)
        self.provider.shutdown()
        if self._on_delete in self.engine.sessions.delete_hooks:
            self.engine.sessions.delete_hooks.remove(self._on_delete)
