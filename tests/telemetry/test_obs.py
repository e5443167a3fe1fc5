"""Prometheus /metrics (OpenTelemetry SDK + its Prometheus exporter, scraped over HTTP and
parsed with prometheus_client's parser) and one OpenTelemetry span per RPC (an SDK
TracerProvider with an in-memory exporter)."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer, start
from machineserver.server.config import ServerConfig
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.api import console_until, until, upload, wait_state


async def scrape(port: int) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            return str(resp.read().decode())

    text = await asyncio.to_thread(get)
    return {f.name: [(s.name, dict(s.labels), s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def value(families: dict[str, list[tuple[str, dict[str, str], float]]], family: str, sample: str,
          **labels: str) -> float:
    for name, got, v in families.get(family, []):
        if name == sample and all(got.get(k) == want for k, want in labels.items()):
            return v
    raise AssertionError(f"no {sample}{labels} in {family}: {families.get(family)}")


async def test_metrics_endpoint_scraped_and_parsed(obs_client: AsyncClient, obs_server: RunningServer) -> None:
    client = obs_client
    assert obs_server.metrics_port > 0
    prog = await upload(client, "lm3s6965evb", "hello")
    s = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, run=True)).session
    assert await console_until(client, s.name, b"\n") == b"Hello from lm3s6965evb!\n"
    await wait_state(client, s.name, cpb.SESSION_STATE_EXITED)
    with pytest.raises(errors.NotFound):
        await client.sessions.get_session(name="sessions/nope")
    for _ in range(3):
        await client.capabilities.get_capabilities()

    m = await scrape(obs_server.metrics_port)
    rpc = "machineserver_rpc_requests"
    assert value(m, rpc, rpc + "_total", rpc_service="machineserver.v1.CapabilitiesService",
                 rpc_method="GetCapabilities", rpc_grpc_status_code="OK") == 3
    assert value(m, rpc, rpc + "_total", rpc_method="GetSession", rpc_grpc_status_code="NOT_FOUND") == 1
    assert value(m, rpc, rpc + "_total", rpc_method="UploadProgram", rpc_grpc_status_code="OK") == 1
    dur = "machineserver_rpc_duration_seconds"
    assert value(m, dur, dur + "_count", rpc_method="GetCapabilities") == 3
    assert value(m, dur, dur + "_bucket", rpc_method="GetCapabilities", le="+Inf") == 3
    assert 0 < value(m, dur, dur + "_sum", rpc_method="GetCapabilities") < 30
    assert value(m, "machineserver_sessions_active", "machineserver_sessions_active", backend="unicorn") == 1
    assert value(m, "machineserver_sessions", "machineserver_sessions", backend="unicorn", state="exited") == 1
    assert value(m, "machineserver_programs_uploaded", "machineserver_programs_uploaded_total") == 1
    assert value(m, "machineserver_programs_stored", "machineserver_programs_stored") == 1
    console = "machineserver_console_output_bytes"
    assert value(m, console, console + "_total") == len(b"Hello from lm3s6965evb!\n")
    assert value(m, "machineserver_alerts_firing", "machineserver_alerts_firing") == 0

    # a snapshot counts; deleting the session keeps its console bytes in the counter
    snap = await client.sessions.create_snapshot(name=s.name)
    assert snap.snapshot.name
    await client.sessions.delete_session(name=s.name)
    await asyncio.sleep(0.6)  # gauges are cached for 0.5 s per scrape
    m = await scrape(obs_server.metrics_port)
    assert value(m, "machineserver_snapshots_created", "machineserver_snapshots_created_total") == 1
    assert value(m, "machineserver_snapshots_stored", "machineserver_snapshots_stored") == 1
    assert value(m, console, console + "_total") == len(b"Hello from lm3s6965evb!\n")
    assert value(m, "machineserver_sessions_active", "machineserver_sessions_active", backend="unicorn") == 0


async def test_metrics_are_off_by_default(server: RunningServer) -> None:
    assert server.metrics is None and server.metrics_port == 0


async def test_metrics_listen_in_use_is_an_error(server_config: ServerConfig, obs_server: RunningServer) -> None:
    from dataclasses import replace

    other = server_config.data_dir.parent / "other"  # its own data dir: that one is locked
    with pytest.raises(OSError, match="cannot serve metrics"):
        await start(replace(server_config, data_dir=other, metrics_listen=f"127.0.0.1:{obs_server.metrics_port}"))


async def test_a_span_per_rpc(obs_client: AsyncClient, spans: InMemorySpanExporter) -> None:
    spans.clear()
    await obs_client.capabilities.get_capabilities(metadata=[("x-request-id", "rid-caps")])
    with pytest.raises(errors.NotFound):
        await obs_client.sessions.get_session(name="sessions/missing", metadata=[("x-request-id", "rid-missing")])
    async for _ in obs_client.telemetry.stream_host_status(metadata=[("x-request-id", "rid-stream")]):
        break

    def finished() -> dict[str, Any]:
        return {s.attributes["machineserver.request_id"]: s for s in spans.get_finished_spans()
                if s.attributes and "machineserver.request_id" in s.attributes}

    # the stream's span ends when the server sees the cancel (nothing signals it): poll
    await until(lambda: "rid-stream" in finished())
    done = finished()
    assert set(done) >= {"rid-caps", "rid-missing", "rid-stream"}
    caps = done["rid-caps"]
    assert caps.name == "machineserver.v1.CapabilitiesService/GetCapabilities"
    assert caps.kind.name == "SERVER"
    assert caps.attributes is not None
    assert caps.attributes["rpc.system"] == "grpc"
    assert caps.attributes["rpc.service"] == "machineserver.v1.CapabilitiesService"
    assert caps.attributes["rpc.method"] == "GetCapabilities"
    assert caps.attributes["rpc.grpc.status_code"] == 0
    assert caps.status.is_ok
    missing = done["rid-missing"]
    assert missing.attributes is not None and missing.attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND
    assert missing.status.status_code.name == "ERROR"
    stream = done["rid-stream"]
    assert stream.attributes is not None and stream.attributes["rpc.method"] == "StreamHostStatus"
    assert len([s for s in spans.get_finished_spans()
                if s.attributes and s.attributes.get("machineserver.request_id") == "rid-caps"]) == 1


async def test_span_continues_the_callers_trace(obs_client: AsyncClient, spans: InMemorySpanExporter) -> None:
    spans.clear()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    await obs_client.capabilities.get_capabilities(
        metadata=[("traceparent", f"00-{trace_id}-{parent}-01"), ("x-request-id", "rid-traced")])
    span = next(s for s in spans.get_finished_spans()
                if s.attributes and s.attributes.get("machineserver.request_id") == "rid-traced")
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None and format(span.parent.span_id, "016x") == parent


def test_rpc_figures_read_as_the_otel_exporter_would_write_them() -> None:
    """The hook keeps RPC counts and durations itself; a scrape must read exactly what the
    OTel SDK and its Prometheus exporter give for the same calls (same names, labels,
    bucket edges: a duration on a bound falls in that bucket)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    from machineserver.server import __version__
    from machineserver.server.obs.metrics import LATENCY_BUCKETS, RpcFigures

    calls = [("svc.A", "Get", "OK", "rpc", s) for s in (0.0, 0.0005, 0.0006, 0.001, 59.9, 60.0, 61.0)]
    calls += [("svc.A", "Get", "NOT_FOUND", "rpc", 0.002), ("svc.A", "Step", "OK", "attach", 0.25)]
    ours = CollectorRegistry()
    figures = RpcFigures()
    ours.register(figures)
    theirs = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=theirs)])
    meter = provider.get_meter("machineserver", __version__)
    requests = meter.create_counter("machineserver.rpc.requests", unit="1",
                                    description="RPCs handled, by service, method and status code")
    duration = meter.create_histogram("machineserver.rpc.duration", unit="s",
                                      description="RPC duration (a stream: its lifetime)",
                                      explicit_bucket_boundaries_advisory=LATENCY_BUCKETS)
    for service, method, code, transport, seconds in calls:
        figures.observe(service, method, code, transport, seconds)
        attrs = {"rpc.service": service, "rpc.method": method, "rpc.grpc.status_code": code, "transport": transport}
        requests.add(1, attrs)
        duration.record(seconds, attrs)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = generate_latest(registry).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) if f.name.startswith("machineserver_rpc")
                for s in f.samples}

    try:
        expected = samples(theirs)
        assert expected and samples(ours) == pytest.approx(expected)
        assert expected[("machineserver_rpc_requests_total", tuple(sorted({
            "otel_scope_name": "machineserver", "otel_scope_schema_url": "", "otel_scope_version": __version__,
            "rpc_service": "svc.A", "rpc_method": "Get", "rpc_grpc_status_code": "OK",
            "transport": "rpc"}.items())))] == 7
    finally:
        provider.shutdown()
