"""The call boundary: request ids, per-call context, the hook chain (where auth, audit and
metrics plug in) and the error boundary, wrapped once around every method handler of every
service (ours, health and reflection), unary and streaming alike. The chain itself is the
core's (:mod:`machineserver.server.core.calls`), which the Attach stream and the GDB bridge
use for each of their commands too.

The handlers are wrapped when they are registered (:class:`MethodTable`), not by a gRPC
server interceptor: grpc.aio runs an interceptor chain as coroutines on every call before it
finds the handler, which costs a unary call about as much as everything this boundary does.
Per call the boundary opens the :class:`CallInfo` (request id: the caller's
``x-request-id`` or a new one, returned in trailing metadata; the metadata as a mapping and
the peer are worked out only if something reads them), makes it the current call (log lines name it through :func:`~machineserver.server.core.calls.add_call_context`),
runs the hooks' ``before`` (only those that have one), the handler, and the hooks' ``after``
with the final code: the handler's error's code, CANCELLED for a handler that did not finish,
or the code the handler set.

A handler may answer with bytes it serialised before (:func:`preserialized`): a cached
answer is then sent as it is, not serialised again on every call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias, TypeVar, cast

import grpc
import structlog
from google.protobuf.message import Message
from grpc import aio

from machineserver.server.api.errors import internal_status, status_for
from machineserver.server.api.validation import Validator, validator_for
from machineserver.server.core.calls import (
    CURRENT,
    AfterOnlyHook,
    CallChain,
    CallHook,
    CallInfo,
    Transport,
    new_request_id,
)
from machineserver.server.core.errors import MachineServerError

log = structlog.get_logger("machineserver.rpc")

REQUEST_ID_KEY = "x-request-id"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

M = TypeVar("M", bound=Message)

# grpc's type stubs describe RpcMethodHandler's behaviours as the sync server runs them;
# under grpc.aio they are coroutine functions (unary responses) or async generators
# (streams; or coroutines that write with context.write) taking an aio.ServicerContext.
AioUnaryBehaviour = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]
AioStreamBehaviour = Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterable[Any] | Awaitable[None]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the type stubs

__all__ = ["AccessLog", "CallBoundary", "CallHook", "CallInfo", "MethodTable", "Registrar", "preserialized"]


class AccessLog(AfterOnlyHook):
    """One structlog line per call: rpc, code, duration, request id."""

    quiet_methods = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

    def __init__(self) -> None:
        # whether info lines are written at all, as logging was configured when the server
        # was built: below the level, a call costs this hook nothing
        is_enabled_for = getattr(log.bind(), "is_enabled_for", None)
        self.enabled = bool(is_enabled_for(logging.INFO)) if callable(is_enabled_for) else True

    def after(self, call: CallInfo) -> None:
        if not self.enabled or call.method in self.quiet_methods:
            return
        log.info("rpc", code=call.code, ms=round(call.elapsed_ms, 3), transport=call.transport.value)


class InvocationMetadata(Mapping[str, str]):
    """A call's metadata (text values; binary ones are left out) as a mapping, built when
    first read: most calls only need their request id."""

    __slots__ = ("_mapping", "_pairs")

    def __init__(self, pairs: Iterable[tuple[str, str | bytes]] | None) -> None:
        self._pairs = pairs or ()
        self._mapping: dict[str, str] | None = None

    def request_id(self) -> str:
        """The caller's ``x-request-id`` ("" when it gave none)."""
        if self._mapping is not None:
            return self._mapping.get(REQUEST_ID_KEY, "")
        for key, value in self._pairs:
            if key == REQUEST_ID_KEY and type(value) is str:
                return value
        return ""

    def _built(self) -> dict[str, str]:
        mapping = self._mapping
        if mapping is None:
            mapping = self._mapping = {k: v for k, v in self._pairs if type(v) is str}
        return mapping

    def __getitem__(self, key: str) -> str:
        return self._built()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())

    def __contains__(self, key: object) -> bool:
        return key in self._built()


class Preserialized:
    """A response message already serialised: the boundary's serializers send it as it is."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def preserialized(data: bytes, response_type: type[M]) -> M:
    """``data`` (a ``response_type`` message, serialised) as a handler's answer. The type
    says what the bytes hold; only a handler registered through a :class:`Registrar` may
    answer this way (its serializer knows the wrapper)."""
    return cast(M, Preserialized(data))


def _serializer(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    def serialize_response(message: Any) -> bytes:
        if type(message) is Preserialized:
            return message.data
        return serialize(message) if serialize is not None else cast(bytes, message)

    return serialize_response


class CallBoundary:
    """Wraps method handlers in the call path (see the module docstring)."""

    def __init__(self, chain: CallChain) -> None:
        self.chain = chain

    def wrap(self, method: str, handler: Handler) -> Handler:
        """``handler`` for ``method`` ("/pkg.Service/Method"), inside the boundary, with a
        serializer that passes :func:`preserialized` answers through."""
        serializer = _serializer(handler.response_serializer)
        check = validator_for(method)  # every request message's size limits (api/validation.py)
        if handler.unary_unary or handler.stream_unary:
            inner = cast(AioUnaryBehaviour, handler.unary_unary or handler.stream_unary)
            make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return make(self._unary(method, _checked(inner, check, handler.request_streaming)),
                        request_deserializer=handler.request_deserializer, response_serializer=serializer)
        inner_stream = cast(AioStreamBehaviour, handler.unary_stream or handler.stream_stream)
        make_stream = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                       else grpc.stream_stream_rpc_method_handler)
        return make_stream(self._stream(method, _checked(inner_stream, check, handler.request_streaming)),
                           request_deserializer=handler.request_deserializer, response_serializer=serializer)

    def _unary(self, method: str, inner: AioUnaryBehaviour) -> AioUnaryBehaviour:
        chain, fail = self.chain, self._fail_unless_abort
        leave, ok, current = chain.leave, grpc.StatusCode.OK, CURRENT

        # the hot path, so _open and _end are written out here (each call to a helper
        # costs a unary call more than its share)
        async def unary_result(request_or_iterator: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            metadata = InvocationMetadata(context.invocation_metadata())
            call = CallInfo(method, metadata.request_id() or new_request_id(), metadata, Transport.RPC, context.peer)
            current.set(call)
            context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
            finished = False
            try:
                if chain.observe_only:
                    call.hooks_entered = len(chain.hooks)
                else:
                    call.auth_context = context.auth_context  # the peer's certificate, for the auth hook
                    await chain.enter(call)
                result = await inner(request_or_iterator, context)
                finished = True
                return result
            except Exception as exc:
                finished = True
                await fail(call, exc, context)
                raise
            finally:
                if call.code == "OK":
                    if not finished:
                        call.code = "CANCELLED"
                    else:
                        code = context.code()
                        if code is not None and code is not ok and isinstance(code, grpc.StatusCode):
                            call.code = code.name
                leave(call)

        return unary_result

    def _stream(self, method: str, inner: AioStreamBehaviour) -> Callable[..., AsyncIterator[Any]]:
        open_call, chain, end = self._open, self.chain, self._end

        async def stream_result(request_or_iterator: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = open_call(method, context)
            finished = False
            try:
                if chain.observe_only:
                    call.hooks_entered = len(chain.hooks)
                else:
                    call.auth_context = context.auth_context  # the peer's certificate, for the auth hook
                    await chain.enter(call)
                result = inner(request_or_iterator, context)
                if isinstance(result, AsyncIterable):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write and returns a coroutine
                    await result
                finished = True
            except Exception as exc:
                finished = True
                await self._fail_unless_abort(call, exc, context)
                raise
            finally:
                end(call, context, finished)

        return stream_result

    # ------------------------------------------------------------------ the boundary

    @staticmethod
    def _open(method: str, context: aio.ServicerContext[Any, Any]) -> CallInfo:
        metadata = InvocationMetadata(context.invocation_metadata())
        call = CallInfo(method, metadata.request_id() or new_request_id(), metadata, Transport.RPC, context.peer)
        CURRENT.set(call)
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        return call

    async def _fail_unless_abort(self, call: CallInfo, exc: Exception, context: aio.ServicerContext[Any, Any]) -> None:
        """Answer the error with its status (context.abort raises AbortError, which must
        pass through untouched; cancellation and GeneratorExit are not Exceptions)."""
        if not isinstance(exc, aio.AbortError):
            await self._fail(call, exc, context)

    @staticmethod
    async def _fail(call: CallInfo, exc: BaseException, context: aio.ServicerContext[Any, Any]) -> None:
        rid = call.request_id
        if isinstance(exc, MachineServerError):
            code, status = status_for(exc, rid)
        else:
            log.error("rpc_internal_error", exc_info=exc)
            code, status = internal_status(rid)
        call.code = code.name
        md = ((STATUS_DETAILS_KEY, status.SerializeToString()), (REQUEST_ID_KEY, rid))
        await context.abort(code, status.message, trailing_metadata=md)

    def _end(self, call: CallInfo, context: aio.ServicerContext[Any, Any], finished: bool) -> None:
        """The hooks' after(), with the final code: a handler that did not finish (its
        task was cancelled, or the client went away from a stream) ended CANCELLED, one
        that set a code ended with it."""
        if call.code == "OK":
            if not finished:
                call.code = "CANCELLED"
            else:
                code = context.code()
                if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
                    call.code = code.name
        self.chain.leave(call)


B = TypeVar("B", AioUnaryBehaviour, AioStreamBehaviour)


def _checked(inner: B, check: Validator | None, request_streaming: bool) -> B:
    """``inner`` with every request message it receives checked against the size limits
    first (a unary request before the handler runs; each message of a client stream as the
    handler reads it): a field over its limit ends the call INVALID_ARGUMENT naming it."""
    if check is None:
        return inner
    if not request_streaming:
        def unary_request(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            check(request)
            return inner(request, context)

        return cast(B, unary_request)

    async def checked_stream(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            check(request)
            yield request

    def stream_request(requests: AsyncIterable[Any], context: aio.ServicerContext[Any, Any]) -> Any:
        return inner(checked_stream(requests), context)

    return cast(B, stream_request)


class MethodTable(grpc.GenericRpcHandler):
    """Every method's handler by its full name ("/pkg.Service/Method"): one lookup per call."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self._handlers = dict(handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self._handlers.get(handler_call_details.method)

    def __contains__(self, method: str) -> bool:
        return method in self._handlers


class Registrar:
    """Stands in for the server while the generated ``add_*_to_server`` functions register a
    service: keeps each method's handler, wrapped once in the boundary, for one
    :class:`MethodTable`. (Every generated module registers its handlers by name through
    ``add_registered_method_handlers``; one that gave only an opaque generic handler could
    not be wrapped, and :meth:`table` refuses it rather than serve it outside the chain.)"""

    def __init__(self, boundary: CallBoundary) -> None:
        self.boundary = boundary
        self._handlers: dict[str, Handler] = {}
        self._generic = 0
        self._named = 0

    def add_generic_rpc_handlers(self, generic_rpc_handlers: object) -> None:
        self._generic += 1  # the same handlers come by name (add_registered_method_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Mapping[str, Handler]) -> None:
        self._named += 1
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            self._handlers[method] = self.boundary.wrap(method, handler)

    def table(self) -> MethodTable:
        if self._generic > self._named:
            raise RuntimeError("a service registered a generic handler without its methods by name; "
                               "it cannot be wrapped in the call boundary")
        return MethodTable(self._handlers)
