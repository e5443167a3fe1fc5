"""The MachineServer client: ``await AsyncClient.connect(...)`` or ``Client.connect(...)``.

Every RPC is a method on a service attribute (``client.sessions.create_session(...)``,
generated from the protos, typed); a few helpers cover the common path (uploading a
file, reading the console). Options are keyword-only: default deadline, credentials
(``api_key=`` or ``bearer_token=`` (a JWT), sent with every call; ``tls=True`` or
``root_certificates=`` for TLS, plus ``private_key=``/``certificate_chain=`` for a client
certificate: mTLS), extra call metadata, retries of idempotent reads (gRPC service config).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncGenerator, Generator, Iterable, Iterator, Mapping
from pathlib import Path

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio

from machineserver.sdk._services import (
    SERVICES,
    AccessService,
    AsyncAccessService,
    AsyncAuditService,
    AsyncCapabilitiesService,
    AsyncCapsuleService,
    AsyncCoSimService,
    AsyncCoverageService,
    AsyncDebugService,
    AsyncJobService,
    AsyncSessionService,
    AsyncTelemetryService,
    AuditService,
    CapabilitiesService,
    CapsuleService,
    CoSimService,
    CoverageService,
    DebugService,
    JobService,
    SessionService,
    TelemetryService,
)
from machineserver.sdk._transport import (
    AsyncTransport,
    CallOptions,
    ChannelArgValue,
    Metadata,
    MetadataValue,
    SyncTransport,
    channel_options,
)
from machineserver.sdk.sources import source_bundle
from machineserver.v1 import (
    access_pb2,
    audit_pb2,
    capabilities_pb2,
    capsule_pb2,
    cosim_pb2,
    coverage_pb2,
    debug_pb2,
    job_pb2,
    session_pb2,
    telemetry_pb2,
)

CHUNK = 64 * 1024
IDEMPOTENT_PREFIXES = ("Get", "List", "Read", "Resolve", "Disassemble")


def retry_methods() -> list[tuple[str, str]]:
    """Unary read-only RPCs: safe to retry when the server is briefly unavailable."""
    return [
        (svc.full_name, m.name)
        for svc in service_descriptors()
        for m in svc.methods
        if not m.client_streaming and not m.server_streaming and m.name.startswith(IDEMPOTENT_PREFIXES)
    ]


def service_descriptors() -> list[ServiceDescriptor]:
    """Every machineserver.v1 service, from the generated modules."""
    mods = (capabilities_pb2, session_pb2, debug_pb2, coverage_pb2, cosim_pb2, telemetry_pb2, access_pb2, audit_pb2,
            job_pb2, capsule_pb2)
    return [svc for mod in mods for svc in mod.DESCRIPTOR.services_by_name.values()]


def _credentials(tls: bool, root_certificates: bytes | None, private_key: bytes | None,
                 certificate_chain: bytes | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None and certificate_chain is None:
        return None
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("a TLS client certificate needs both private_key and certificate_chain")
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _connection(
    *, timeout: float | None, api_key: str | None, bearer_token: str | None, tls: bool,
    root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None,
    metadata: Iterable[tuple[str, MetadataValue]], retries: bool,
    channel_args: Mapping[str, ChannelArgValue] | None,
) -> tuple[list[tuple[str, ChannelArgValue]], grpc.ChannelCredentials | None, CallOptions]:
    """Channel options, credentials and call defaults: what both clients connect with."""
    opts = channel_options(retry_methods() if retries else [], channel_args)
    creds = _credentials(tls, root_certificates, private_key, certificate_chain)
    return opts, creds, CallOptions(timeout, _call_metadata(api_key, bearer_token, metadata))


def _call_metadata(api_key: str | None, bearer_token: str | None,
                   metadata: Iterable[tuple[str, MetadataValue]]) -> Metadata:
    """Metadata sent with every call (unary and streaming): keys as text, values as given
    (bytes stay bytes, for "-bin" keys), plus the credentials: an API key as
    ``authorization: ApiKey <secret>``, a JWT as ``authorization: Bearer <token>``."""
    if api_key and bearer_token:
        raise ValueError("pass either api_key or bearer_token, not both")
    md: Metadata = tuple((str(k), v if isinstance(v, bytes) else str(v)) for k, v in metadata)
    if api_key:
        md += (("authorization", f"ApiKey {api_key}"),)
    elif bearer_token:
        md += (("authorization", f"Bearer {bearer_token}"),)
    return md


def _program_chunks(data: bytes, display_name: str, fmt: session_pb2.ProgramFormat.ValueType,
                    load_address: int, bundle: bytes = b"") -> Iterator[session_pb2.UploadProgramRequest]:
    yield session_pb2.UploadProgramRequest(metadata=session_pb2.ProgramMetadata(
        display_name=display_name, format=fmt, load_address=load_address,
        sha256=hashlib.sha256(data).hexdigest(),
    ))
    for i in range(0, len(data), CHUNK):
        yield session_pb2.UploadProgramRequest(chunk=data[i:i + CHUNK])
    for i in range(0, len(bundle), CHUNK):  # the source bundle, after the program
        yield session_pb2.UploadProgramRequest(sources_chunk=bundle[i:i + CHUNK])


def _read_program(source: str | os.PathLike[str] | bytes, display_name: str) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, display_name
    path = Path(source)
    return path.read_bytes(), display_name or path.name


FORMATS: dict[str, session_pb2.ProgramFormat.ValueType] = {
    "": session_pb2.PROGRAM_FORMAT_UNSPECIFIED,
    "elf": session_pb2.PROGRAM_FORMAT_ELF,
    "bin": session_pb2.PROGRAM_FORMAT_BIN,
    "ihex": session_pb2.PROGRAM_FORMAT_IHEX,
    "hex": session_pb2.PROGRAM_FORMAT_IHEX,
}


def _program_format(name: str) -> session_pb2.ProgramFormat.ValueType:
    fmt = FORMATS.get(name.lower())
    if fmt is None:
        raise ValueError(f"unknown program format {name!r}; one of {', '.join(repr(k) for k in FORMATS if k)}")
    return fmt


class AsyncClient:
    capabilities: AsyncCapabilitiesService
    sessions: AsyncSessionService
    debug: AsyncDebugService
    coverage: AsyncCoverageService
    cosim: AsyncCoSimService
    telemetry: AsyncTelemetryService
    access: AsyncAccessService
    audit: AsyncAuditService
    jobs: AsyncJobService
    capsules: AsyncCapsuleService

    def __init__(self, channel: aio.Channel, options: CallOptions) -> None:
        self.channel = channel
        self._transport = AsyncTransport(channel, options)
        for attr, (async_cls, _) in SERVICES.items():
            setattr(self, attr, async_cls(self._transport))

    @classmethod
    async def connect(
        cls,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = 30.0,
        api_key: str | None = None,
        bearer_token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        metadata: Iterable[tuple[str, MetadataValue]] = (),
        retries: bool = True,
        channel_args: Mapping[str, ChannelArgValue] | None = None,
    ) -> AsyncClient:
        opts, creds, call_options = _connection(
            timeout=timeout, api_key=api_key, bearer_token=bearer_token, tls=tls,
            root_certificates=root_certificates,
            private_key=private_key, certificate_chain=certificate_chain, metadata=metadata,
            retries=retries, channel_args=channel_args)
        channel = aio.secure_channel(target, creds, opts) if creds else aio.insecure_channel(target, opts)
        return cls(channel, call_options)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ helpers

    async def upload_program(self, source: str | os.PathLike[str] | bytes, *, display_name: str = "",
                             format: str = "", load_address: int = 0,
                             sources: str | os.PathLike[str] | bytes | None = None,
                             ) -> session_pb2.UploadProgramResponse:
        """Upload an ELF, BIN (with load_address) or Intel HEX from a path or bytes;
        ``sources``: its source files for coverage HTML (a folder, an archive's path or
        bytes: see :func:`machineserver.sdk.sources.source_bundle`)."""
        data, name = _read_program(source, display_name)
        bundle = b"" if sources is None else source_bundle(sources)
        return await self.sessions.upload_program(
            _program_chunks(data, name, _program_format(format), load_address, bundle)
        )

    async def console(self, session: str, *, offset: int = 0, follow: bool = True) -> AsyncGenerator[bytes, None]:
        """The session's console bytes from offset, following new output."""
        async for msg in self.sessions.stream_console(name=session, offset=offset, follow=follow):
            yield msg.data


class Client:
    """The synchronous facade: the same services and helpers, blocking."""

    capabilities: CapabilitiesService
    sessions: SessionService
    debug: DebugService
    coverage: CoverageService
    cosim: CoSimService
    telemetry: TelemetryService
    access: AccessService
    audit: AuditService
    jobs: JobService
    capsules: CapsuleService

    def __init__(self, channel: grpc.Channel, options: CallOptions) -> None:
        self.channel = channel
        self._transport = SyncTransport(channel, options)
        for attr, (_, sync_cls) in SERVICES.items():
            setattr(self, attr, sync_cls(self._transport))

    @classmethod
    def connect(
        cls,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = 30.0,
        api_key: str | None = None,
        bearer_token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        metadata: Iterable[tuple[str, MetadataValue]] = (),
        retries: bool = True,
        channel_args: Mapping[str, ChannelArgValue] | None = None,
    ) -> Client:
        opts, creds, call_options = _connection(
            timeout=timeout, api_key=api_key, bearer_token=bearer_token, tls=tls,
            root_certificates=root_certificates,
            private_key=private_key, certificate_chain=certificate_chain, metadata=metadata,
            retries=retries, channel_args=channel_args)
        channel = grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)
        return cls(channel, call_options)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upload_program(self, source: str | os.PathLike[str] | bytes, *, display_name: str = "",
                       format: str = "", load_address: int = 0,
                       sources: str | os.PathLike[str] | bytes | None = None) -> session_pb2.UploadProgramResponse:
        data, name = _read_program(source, display_name)
        bundle = b"" if sources is None else source_bundle(sources)
        return self.sessions.upload_program(_program_chunks(data, name, _program_format(format), load_address,
                                                            bundle))

    def console(self, session: str, *, offset: int = 0, follow: bool = True) -> Generator[bytes, None, None]:
        for msg in self.sessions.stream_console(name=session, offset=offset, follow=follow):
            yield msg.data
