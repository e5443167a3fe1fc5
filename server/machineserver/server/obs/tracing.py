"""OpenTelemetry traces: one SERVER span per RPC, from the interceptor's hook chain.

Each span is named ``machineserver.v1.SessionService/CreateSession`` and carries
``rpc.system=grpc``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code`` (the
numeric code, as the semantic conventions say) and ``machineserver.request_id`` (the id
returned in trailing metadata as ``x-request-id`` and bound into log lines; the trace id
is bound there too). A caller's W3C ``traceparent`` metadata makes the span its child.
A span whose call ends with a code other than OK has status ERROR.

Where spans go is the TracerProvider's business: by default the global one (a no-op
unless the process configured one, e.g. ``opentelemetry-instrument machineserver``);
tests pass an SDK TracerProvider with an in-memory exporter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from machineserver.server import __version__

if TYPE_CHECKING:
    from machineserver.server.core.calls import CallInfo

_SPAN_ATTR = "_otel_span"  # kept on the CallInfo itself: it goes away with the call
REQUEST_ID_ATTRIBUTE = "machineserver.request_id"


def tracing_configured(provider: trace.TracerProvider | None) -> bool:
    """Whether spans would go anywhere: a provider was given, or the process set a global
    one (the default global provider is a proxy that records nothing). Without one, the
    hook is left out of the chain: every RPC is cheaper for it."""
    return provider is not None or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


class TracingHook:
    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self.tracer = (provider or trace.get_tracer_provider()).get_tracer("machineserver", __version__)
        self._propagator = TraceContextTextMapPropagator()

    async def before(self, call: CallInfo) -> None:
        parent = self._propagator.extract(call.metadata) if "traceparent" in call.metadata else None
        span = self.tracer.start_span(
            call.method.lstrip("/") or "unknown", context=parent, kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": call.service, "rpc.method": call.rpc,
                        REQUEST_ID_ATTRIBUTE: call.request_id},
        )
        setattr(call, _SPAN_ATTR, span)
        ctx = span.get_span_context()
        if ctx.is_valid:
            structlog.contextvars.bind_contextvars(trace_id=format(ctx.trace_id, "032x"))

    def after(self, call: CallInfo) -> None:
        span: trace.Span | None = getattr(call, _SPAN_ATTR, None)
        if span is None:
            return
        span.set_attribute("rpc.grpc.status_code", call.code_number)
        span.set_attribute("machineserver.transport", call.transport.value)
        if call.code != "OK":
            span.set_status(Status(StatusCode.ERROR, call.code))
        span.end()
        setattr(call, _SPAN_ATTR, None)
