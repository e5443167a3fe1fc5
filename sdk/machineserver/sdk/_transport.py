"""Calls over a gRPC channel with default deadlines, call metadata and typed errors:
the code both the async client and the sync facade run on."""

from __future__ import annotations

import enum
import json
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Final, TypeAlias, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc import aio

from machineserver.sdk.errors import from_rpc_error

M = TypeVar("M", bound=Message)


class Default(enum.Enum):
    """The type of ``DEFAULT``: a call's ``timeout`` left to the client's default."""

    DEADLINE = "the client's default deadline"


DEFAULT: Final = Default.DEADLINE
# A call's deadline in seconds: None waits forever, DEFAULT takes the client's (unary
# calls) or none (streams).
Timeout: TypeAlias = float | Default | None
# Call metadata: (key, value) pairs; a key ending in "-bin" carries bytes.
MetadataValue: TypeAlias = str | bytes
Metadata: TypeAlias = tuple[tuple[str, MetadataValue], ...]
# gRPC channel arguments ("grpc.max_receive_message_length", ...): numbers or strings.
ChannelArgValue: TypeAlias = int | str | bytes


@dataclass(frozen=True)
class CallOptions:
    timeout: float | None = 30.0  # default deadline of unary calls; streams have none
    metadata: Metadata = ()


def service_config(methods: Iterable[tuple[str, str]], attempts: int = 4) -> str:
    """A gRPC service config retrying idempotent reads on UNAVAILABLE with backoff."""
    names = [{"service": s, "method": m} for s, m in methods]
    return json.dumps({
        "methodConfig": [{
            "name": names,
            "retryPolicy": {
                "maxAttempts": attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    })


def channel_options(retry_methods: Iterable[tuple[str, str]],
                    extra: Mapping[str, ChannelArgValue] | None = None) -> list[tuple[str, ChannelArgValue]]:
    opts: list[tuple[str, ChannelArgValue]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(retry_methods)),
        ("grpc.max_receive_message_length", 8 << 20),
        ("grpc.max_send_message_length", 8 << 20),
    ]
    opts += list((extra or {}).items())
    return opts


def _set_field(msg: Message, key: str, value: object) -> None:
    """Set one field from a Python value: scalars and bytes as they are, messages as
    messages or dicts (JSON-shaped), repeated fields from lists, maps from dicts.
    What the field cannot hold is a TypeError that names the field."""
    fd = msg.DESCRIPTOR.fields_by_name.get(key)
    if fd is None:
        raise TypeError(f"{msg.DESCRIPTOR.name} has no field {key!r}")
    is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
    try:
        if is_map:
            getattr(msg, key).update(value)
        elif fd.is_repeated:
            if not isinstance(value, Iterable) or isinstance(value, str | bytes | Mapping):
                raise TypeError(f"a repeated field takes a list, not {type(value).__name__}")
            container = getattr(msg, key)
            for item in value:
                if fd.message_type is None:
                    container.append(item)
                else:
                    _merge_message(container.add(), item)
        elif fd.message_type is not None:
            _merge_message(getattr(msg, key), value)
        else:
            setattr(msg, key, value)
    except (TypeError, ValueError, AttributeError, json_format.ParseError) as exc:
        raise TypeError(f"{msg.DESCRIPTOR.name}.{key}: {exc}") from None


def _merge_message(target: Message, value: object) -> None:
    """A message field from a message, its JSON shape as a dict, or (a well-known type
    such as Duration or FieldMask) its JSON string: "1.5s", "name,config"."""
    if isinstance(value, Message):
        target.CopyFrom(value)
    elif isinstance(value, Mapping):
        json_format.ParseDict(dict(value), target)
    else:
        json_format.Parse(json.dumps(value), target)


def _ser(msg: Message) -> bytes:
    return msg.SerializeToString()


def _request_iterator(requests: AsyncIterable[Message] | Iterable[Message]) -> AsyncIterator[Message] | Iterator[Message]:
    """grpc.aio consumes an async iterator or a plain one: lists and generators alike."""
    if isinstance(requests, AsyncIterable):
        return aiter(requests)
    return iter(requests)


@dataclass
class _Base:
    options: CallOptions = field(default_factory=CallOptions)

    def build(self, request: M | None, fields: Mapping[str, object], cls: type[M]) -> M:
        """The request message: the one given, or one built from keyword fields (plain
        Python values or messages; nested dicts are parsed as JSON-shaped values)."""
        if request is not None:
            if fields:
                raise TypeError("pass either a request message or keyword fields, not both")
            return request
        msg = cls()
        for key, value in fields.items():
            _set_field(msg, key, value)
        return msg

    def _timeout(self, timeout: Timeout, streaming: bool = False) -> float | None:
        if timeout is DEFAULT:
            return None if streaming else self.options.timeout
        return timeout

    def _metadata(self, metadata: Iterable[tuple[str, MetadataValue]]) -> Metadata:
        return self.options.metadata + tuple(metadata)


class AsyncTransport(_Base):
    def __init__(self, channel: aio.Channel, options: CallOptions) -> None:
        super().__init__(options)
        self.channel = channel

    async def unary(self, method: str, request: Message, resp: type[M], timeout: Timeout,
                    metadata: Iterable[tuple[str, MetadataValue]]) -> M:
        call = self.channel.unary_unary(method, request_serializer=_ser, response_deserializer=resp.FromString)
        try:
            return await call(request, timeout=self._timeout(timeout), metadata=self._metadata(metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def server_stream(self, method: str, request: Message, resp: type[M], timeout: Timeout,
                            metadata: Iterable[tuple[str, MetadataValue]]) -> AsyncGenerator[M, None]:
        call = self.channel.unary_stream(method, request_serializer=_ser, response_deserializer=resp.FromString)
        stream = call(request, timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))
        try:
            async for item in stream:
                yield item
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()

    async def client_stream(self, method: str, requests: AsyncIterable[Message] | Iterable[Message],
                            req: type[Message], resp: type[M], timeout: Timeout,
                            metadata: Iterable[tuple[str, MetadataValue]]) -> M:
        call = self.channel.stream_unary(method, request_serializer=_ser, response_deserializer=resp.FromString)
        try:
            return await call(_request_iterator(requests), timeout=self._timeout(timeout, True),
                              metadata=self._metadata(metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def bidi_stream(self, method: str, requests: AsyncIterable[Message] | Iterable[Message],
                          req: type[Message], resp: type[M], timeout: Timeout,
                          metadata: Iterable[tuple[str, MetadataValue]]) -> AsyncGenerator[M, None]:
        call = self.channel.stream_stream(method, request_serializer=_ser, response_deserializer=resp.FromString)
        stream = call(_request_iterator(requests), timeout=self._timeout(timeout, True),
                      metadata=self._metadata(metadata))
        try:
            async for item in stream:
                yield item
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()


class SyncTransport(_Base):
    def __init__(self, channel: grpc.Channel, options: CallOptions) -> None:
        super().__init__(options)
        self.channel = channel

    def unary(self, method: str, request: Message, resp: type[M], timeout: Timeout,
              metadata: Iterable[tuple[str, MetadataValue]]) -> M:
        call = self.channel.unary_unary(method, request_serializer=_ser, response_deserializer=resp.FromString)
        try:
            return call(request, timeout=self._timeout(timeout), metadata=self._metadata(metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def server_stream(self, method: str, request: Message, resp: type[M], timeout: Timeout,
                      metadata: Iterable[tuple[str, MetadataValue]]) -> Generator[M, None, None]:
        call = self.channel.unary_stream(method, request_serializer=_ser, response_deserializer=resp.FromString)
        stream = call(request, timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()

    def client_stream(self, method: str, requests: Iterable[Message], req: type[Message], resp: type[M],
                      timeout: Timeout, metadata: Iterable[tuple[str, MetadataValue]]) -> M:
        call = self.channel.stream_unary(method, request_serializer=_ser, response_deserializer=resp.FromString)
        try:
            return call(iter(requests), timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def bidi_stream(self, method: str, requests: Iterable[Message], req: type[Message], resp: type[M],
                    timeout: Timeout, metadata: Iterable[tuple[str, MetadataValue]]) -> Generator[M, None, None]:
        call = self.channel.stream_stream(method, request_serializer=_ser, response_deserializer=resp.FromString)
        stream = call(iter(requests), timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()
