"""Calls over a gRPC channel with default deadlines, call metadata and typed errors:
the code both the async client and the sync facade run on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc import aio

from machineserver.sdk.errors import from_rpc_error

M = TypeVar("M", bound=Message)
DEFAULT: Any = object()  # "use the client's default deadline"


@dataclass(frozen=True)
class CallOptions:
    timeout: float | None = 30.0  # default deadline of unary calls; streams have none
    metadata: tuple[tuple[str, str], ...] = ()


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


def channel_options(retry_methods: Iterable[tuple[str, str]], extra: Mapping[str, Any] | None = None) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(retry_methods)),
        ("grpc.max_receive_message_length", 8 << 20),
        ("grpc.max_send_message_length", 8 << 20),
    ]
    opts += list((extra or {}).items())
    return opts


def _set_field(msg: Message, key: str, value: Any) -> None:
    """Set one field from a Python value: scalars and bytes as they are, messages as
    messages or dicts (JSON-shaped), repeated fields from lists, maps from dicts."""
    fd = msg.DESCRIPTOR.fields_by_name.get(key)
    if fd is None:
        raise TypeError(f"{msg.DESCRIPTOR.name} has no field {key!r}")
    target = getattr(msg, key) if fd.message_type is not None or fd.is_repeated else None
    is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
    try:
        if is_map:
            target.update(value)  # type: ignore[union-attr]
        elif fd.is_repeated:
            for item in value:
                if fd.message_type is None:
                    target.append(item)  # type: ignore[union-attr]
                elif isinstance(item, Message):
                    target.add().CopyFrom(item)  # type: ignore[union-attr]
                else:
                    json_format.ParseDict(item, target.add())  # type: ignore[union-attr]
        elif fd.message_type is not None:
            if isinstance(value, Message):
                target.CopyFrom(value)  # type: ignore[union-attr]
            else:
                json_format.ParseDict(value, getattr(msg, key))
        else:
            setattr(msg, key, value)
    except (TypeError, ValueError, json_format.ParseError) as exc:
        raise TypeError(f"{msg.DESCRIPTOR.name}.{key}: {exc}") from None


def _ser(msg: Message) -> bytes:
    return msg.SerializeToString()


@dataclass
class _Base:
    options: CallOptions = field(default_factory=CallOptions)

    def build(self, request: M | None, fields: Mapping[str, Any], cls: type[M]) -> M:
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

    def _timeout(self, timeout: Any, streaming: bool = False) -> float | None:
        if timeout is DEFAULT:
            return None if streaming else self.options.timeout
        return timeout  # type: ignore[no-any-return]

    def _metadata(self, metadata: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        return self.options.metadata + tuple(metadata)


class AsyncTransport(_Base):
    def __init__(self, channel: aio.Channel, options: CallOptions) -> None:
        super().__init__(options)
        self.channel = channel

    async def unary(self, method: str, request: Message, resp: type[M], timeout: Any, metadata: Iterable[tuple[str, str]]) -> M:
        call = self.channel.unary_unary(method, request_serializer=_ser, response_deserializer=resp.FromString)
        try:
            return await call(request, timeout=self._timeout(timeout), metadata=self._metadata(metadata))  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def server_stream(self, method: str, request: Message, resp: type[M], timeout: Any, metadata: Iterable[tuple[str, str]]) -> AsyncIterator[M]:
        call = self.channel.unary_stream(method, request_serializer=_ser, response_deserializer=resp.FromString)
        stream = call(request, timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))
        try:
            async for item in stream:
                yield item
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()

    async def client_stream(self, method: str, requests: AsyncIterable[Message] | Iterable[Message], req: type[Message], resp: type[M], timeout: Any, metadata: Iterable[tuple[str, str]]) -> M:
        call = self.channel.stream_unary(method, request_serializer=_ser, response_deserializer=resp.FromString)
        try:
            return await call(requests, timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))  # type: ignore[no-any-return,arg-type]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def bidi_stream(self, method: str, requests: AsyncIterable[Message] | Iterable[Message], req: type[Message], resp: type[M], timeout: Any, metadata: Iterable[tuple[str, str]]) -> AsyncIterator[M]:
        call = self.channel.stream_stream(method, request_serializer=_ser, response_deserializer=resp.FromString)
        stream = call(requests, timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))  # type: ignore[arg-type]
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

    def unary(self, method: str, request: Message, resp: type[M], timeout: Any, metadata: Iterable[tuple[str, str]]) -> M:
        call = self.channel.unary_unary(method, request_serializer=_ser, response_deserializer=resp.FromString)
        try:
            return call(request, timeout=self._timeout(timeout), metadata=self._metadata(metadata))  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def server_stream(self, method: str, request: Message, resp: type[M], timeout: Any, metadata: Iterable[tuple[str, str]]) -> Iterator[M]:
        call = self.channel.unary_stream(method, request_serializer=_ser, response_deserializer=resp.FromString)
        stream = call(request, timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()

    def client_stream(self, method: str, requests: Iterable[Message], req: type[Message], resp: type[M], timeout: Any, metadata: Iterable[tuple[str, str]]) -> M:
        call = self.channel.stream_unary(method, request_serializer=_ser, response_deserializer=resp.FromString)
        try:
            return call(iter(requests), timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def bidi_stream(self, method: str, requests: Iterable[Message], req: type[Message], resp: type[M], timeout: Any, metadata: Iterable[tuple[str, str]]) -> Iterator[M]:
        call = self.channel.stream_stream(method, request_serializer=_ser, response_deserializer=resp.FromString)
        stream = call(iter(requests), timeout=self._timeout(timeout, True), metadata=self._metadata(metadata))
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()
