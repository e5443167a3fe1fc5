"""The MachineServer client: ``async with AsyncClient.connect(...) as ms`` (or
``ms = await AsyncClient.connect(...)``) and ``with Client.connect(...) as ms``.

Every RPC is a method on a service attribute (``client.sessions.create_session(...)``,
generated from the protos, typed); a few helpers cover the common path (uploading a
file, reading the console). The connect options are one :class:`ConnectOptions` (default
deadline, credentials: ``api_key`` or ``bearer_token`` (a JWT), sent with every call;
``tls`` or ``root_certificates`` for TLS, plus ``private_key``/``certificate_chain`` for a
client certificate: mTLS; extra call metadata; retries of idempotent reads (gRPC service
config); channel arguments), given as ``options=`` or as the same keywords, not both.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, Self, TypedDict, TypeVar, Unpack

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


@dataclass(frozen=True, kw_only=True)
class ConnectOptions:
    """How a client connects: what ``AsyncClient.connect`` and ``Client.connect`` share.

    Checked when made (an API key and a bearer token together, half a client certificate:
    ValueError); ``metadata`` is kept as a tuple and ``channel_args`` as a read-only copy,
    so one options object serves any number of connections."""

    timeout: float | None = 30.0  # default deadline of unary calls, s; None: none
    api_key: str | None = None  # sent as "authorization: ApiKey <key>"
    bearer_token: str | None = None  # a JWT, sent as "authorization: Bearer <token>"
    tls: bool = False  # TLS with the system's root certificates
    root_certificates: bytes | None = None  # PEM; implies TLS
    private_key: bytes | None = None  # PEM client key (mTLS), with certificate_chain
    certificate_chain: bytes | None = None  # PEM client certificate (mTLS), with private_key
    metadata: Iterable[tuple[str, MetadataValue]] = ()  # extra metadata on every call
    retries: bool = True  # retry idempotent reads on UNAVAILABLE
    channel_args: Mapping[str, ChannelArgValue] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", tuple(self.metadata))
        if self.channel_args is not None:
            object.__setattr__(self, "channel_args", MappingProxyType(dict(self.channel_args)))
        if self.api_key and self.bearer_token:
            raise ValueError("pass either api_key or bearer_token, not both")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("a TLS client certificate needs both private_key and certificate_chain")

    def channel_options(self) -> list[tuple[str, ChannelArgValue]]:
        return channel_options(retry_methods() if self.retries else [], self.channel_args)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls and self.root_certificates is None and self.certificate_chain is None:
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def call_options(self) -> CallOptions:
        """Call defaults: the deadline, and metadata sent with every call (unary and
        streaming): keys as text, values as given (bytes stay bytes, for "-bin" keys),
        plus the credentials."""
        md: Metadata = tuple((str(k), v if isinstance(v, bytes) else str(v)) for k, v in self.metadata)
        if self.api_key:
            md += (("authorization", f"ApiKey {self.api_key}"),)
        elif self.bearer_token:
            md += (("authorization", f"Bearer {self.bearer_token}"),)
        return CallOptions(self.timeout, md)


class ConnectKeywords(TypedDict, total=False):
    """:class:`ConnectOptions`' fields as ``connect(...)`` keywords (the same names and
    types; tests keep the two in step)."""

    timeout: float | None
    api_key: str | None
    bearer_token: str | None
    tls: bool
    root_certificates: bytes | None
    private_key: bytes | None
    certificate_chain: bytes | None
    metadata: Iterable[tuple[str, MetadataValue]]
    retries: bool
    channel_args: Mapping[str, ChannelArgValue] | None


def connect_options(options: ConnectOptions | None, keywords: ConnectKeywords) -> ConnectOptions:
    """The options a connect call gave: ``options=`` or keywords (then the rest default),
    never both, so no keyword is dropped or overrides silently."""
    if options is None:
        return ConnectOptions(**keywords)
    if not isinstance(options, ConnectOptions):
        raise TypeError(f"options must be a ConnectOptions, not {type(options).__name__}")
    if keywords:
        raise TypeError("connect() takes options= or keyword options, not both; "
                        f"got options= and {', '.join(f'{k}=' for k in sorted(keywords))} "
                        "(dataclasses.replace(options, ...) makes a changed copy)")
    return options


ASYNC_CLIENT = TypeVar("ASYNC_CLIENT", bound="AsyncClient")


class AsyncConnection(Generic[ASYNC_CLIENT]):
    """What ``AsyncClient.connect(...)`` returns: await it for the client
    (``ms = await AsyncClient.connect(...)``, closed by ``await ms.close()`` or
    ``async with ms``), or enter it (``async with AsyncClient.connect(...) as ms``),
    which closes the client on leaving. The channel opens on the first await or enter;
    later ones give the same client."""

    def __init__(self, open_client: Callable[[], ASYNC_CLIENT]) -> None:
        self._open_client = open_client
        self._client: ASYNC_CLIENT | None = None

    async def _open(self) -> ASYNC_CLIENT:
        if self._client is None:
            self._client = self._open_client()
        return self._client

    def __await__(self) -> Generator[Any, None, ASYNC_CLIENT]:
        return self._open().__await__()

    async def __aenter__(self) -> ASYNC_CLIENT:
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()


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
    def connect(cls, target: str = "127.0.0.1:50051", *, options: ConnectOptions | None = None,
                **keywords: Unpack[ConnectKeywords]) -> AsyncConnection[Self]:
        """A client of ``target``: ``async with AsyncClient.connect(...) as ms`` or
        ``ms = await AsyncClient.connect(...)``. Options: ``options=ConnectOptions(...)`` or
        its fields as keywords, not both (TypeError); checked here, before any await."""
        return AsyncConnection(partial(cls._open, target, connect_options(options, keywords)))

    @classmethod
    def _open(cls, target: str, options: ConnectOptions) -> Self:
        opts, creds = options.channel_options(), options.credentials()
        channel = aio.secure_channel(target, creds, opts) if creds else aio.insecure_channel(target, opts)
        return cls(channel, options.call_options())

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
        """The session's console bytes from offset, following new output. (The stream's
        marks, e.g. resets, are left out: ``sessions.stream_console`` has them.)"""
        async for msg in self.sessions.stream_console(name=session, offset=offset, follow=follow):
            if msg.data:
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
    def connect(cls, target: str = "127.0.0.1:50051", *, options: ConnectOptions | None = None,
                **keywords: Unpack[ConnectKeywords]) -> Self:
        """A client of ``target`` (``with Client.connect(...) as ms`` closes it). Options:
        ``options=ConnectOptions(...)`` or its fields as keywords, not both (TypeError)."""
        chosen = connect_options(options, keywords)
        opts, creds = chosen.channel_options(), chosen.credentials()
        channel = grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)
        return cls(channel, chosen.call_options())

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
            if msg.data:
                yield msg.data
