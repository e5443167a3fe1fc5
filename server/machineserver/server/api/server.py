"""Builds the grpc.aio server: every servicer, health (per service) and reflection, each
method's handler wrapped once in the call boundary (:mod:`.interceptors`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import FileDescriptor
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from machineserver.server.api.access import AccessServicer
from machineserver.server.api.audit import AuditServicer
from machineserver.server.api.base import Servicer
from machineserver.server.api.capabilities import CapabilitiesServicer
from machineserver.server.api.capsules import CapsuleServicer
from machineserver.server.api.cosim import CoSimServicer
from machineserver.server.api.coverage import CoverageServicer
from machineserver.server.api.debug import DebugServicer
from machineserver.server.api.errors import code_name
from machineserver.server.api.interceptors import AccessLog, CallBoundary, CallHook, Registrar
from machineserver.server.api.jobs import JobServicer
from machineserver.server.api.sessions import SessionServicer
from machineserver.server.api.telemetry import TelemetryServicer
from machineserver.server.core.audit import AuditHook
from machineserver.server.core.engine import Engine
from machineserver.server.core.quotas import StreamQuota
from machineserver.v1 import (
    access_pb2,
    access_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    capabilities_pb2,
    capabilities_pb2_grpc,
    capsule_pb2,
    capsule_pb2_grpc,
    cosim_pb2,
    cosim_pb2_grpc,
    coverage_pb2,
    coverage_pb2_grpc,
    debug_pb2,
    debug_pb2_grpc,
    job_pb2,
    job_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)

# (servicer class, add_to_server, file descriptor, service name); each add_to_server takes
# its own servicer class, and is handed a Registrar rather than the server, so the list can
# only say Any for those arguments
SERVICES: list[tuple[type[Servicer], Callable[[Any, Any], None], FileDescriptor, str]] = [
    (CapabilitiesServicer, capabilities_pb2_grpc.add_CapabilitiesServiceServicer_to_server,
     capabilities_pb2.DESCRIPTOR, "CapabilitiesService"),
    (SessionServicer, session_pb2_grpc.add_SessionServiceServicer_to_server, session_pb2.DESCRIPTOR, "SessionService"),
    (DebugServicer, debug_pb2_grpc.add_DebugServiceServicer_to_server, debug_pb2.DESCRIPTOR, "DebugService"),
    (CoverageServicer, coverage_pb2_grpc.add_CoverageServiceServicer_to_server, coverage_pb2.DESCRIPTOR,
     "CoverageService"),
    (CoSimServicer, cosim_pb2_grpc.add_CoSimServiceServicer_to_server, cosim_pb2.DESCRIPTOR, "CoSimService"),
    (TelemetryServicer, telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server, telemetry_pb2.DESCRIPTOR,
     "TelemetryService"),
    (AccessServicer, access_pb2_grpc.add_AccessServiceServicer_to_server, access_pb2.DESCRIPTOR, "AccessService"),
    (AuditServicer, audit_pb2_grpc.add_AuditServiceServicer_to_server, audit_pb2.DESCRIPTOR, "AuditService"),
    (JobServicer, job_pb2_grpc.add_JobServiceServicer_to_server, job_pb2.DESCRIPTOR, "JobService"),
    (CapsuleServicer, capsule_pb2_grpc.add_CapsuleServiceServicer_to_server, capsule_pb2.DESCRIPTOR,
     "CapsuleService"),
]

SERVICE_NAMES = [file.services_by_name[name].full_name for _, _, file, name in SERVICES]


def streaming_methods() -> frozenset[str]:
    """The full names of our server-streaming and bidirectional methods (what the
    concurrent_streams quota counts), from the service descriptors."""
    return frozenset(f"/{service.full_name}/{method.name}"
                     for service in (file.services_by_name[name] for _, _, file, name in SERVICES)
                     for method in service.methods if method.server_streaming)

MAX_MESSAGE_BYTES = 8 << 20


async def build_server(
    engine: Engine, listen: str, hooks: Sequence[CallHook] = (), tls: tuple[bytes, bytes] | None = None,
    client_ca: bytes | None = None,
) -> tuple[aio.Server, int, health.aio.HealthServicer]:
    """The server, bound to ``listen``; ``tls`` is (certificate chain, private key) in PEM;
    ``client_ca`` (PEM, with ``tls``): clients must present a certificate it signed (mTLS).
    ``hooks`` join the engine's call chain, which every transport goes through."""
    # the audit hook before any hook that may refuse a call (auth): a refused call is audited too
    streams = [StreamQuota(engine.quotas, streaming_methods())] if engine.quotas.config.limits_streams else []
    engine.calls.configure([AccessLog(), AuditHook(engine.audit), *hooks, *streams], code_name)
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    methods = Registrar(CallBoundary(engine.calls))
    for servicer_cls, add, _, _ in SERVICES:
        add(servicer_cls(engine), methods)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, methods)
    for name in ["", *SERVICE_NAMES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(
            [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]),
        methods,
    )
    server.add_generic_rpc_handlers((methods.table(),))
    try:
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])], root_certificates=client_ca,
                                                require_client_auth=client_ca is not None)
            port = server.add_secure_port(listen, creds)
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen}: the address is in use or not valid here")
    return server, port, health_servicer


async def mark_not_serving(health_servicer: health.aio.HealthServicer) -> None:
    await health_servicer.enter_graceful_shutdown()

