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

from machineserver.sdk.errors import InvalidArgument, from_rpc_error

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
        plain: dict[str, Any] = {}
        for key, value in fields.items():
            if isinstance(value, Message):
                getattr(msg, key).CopyFrom(value)
            else:
                plain[key] = value
        if plain:
            try:
                json_format.ParseDict(plain, msg, ignore_unknown_fields=False)
            except json_format.ParseError as exc:
                raise InvalidArgument(f"bad request fields for {cls.DESCRIPTOR.name}: {exc}") from None
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
